"""Argument handling shared by the command lines (``python -m prefix_grouper.train``,
``python -m benchmarks.run``, ``python -m benchmarks.demo``).

Imports nothing heavy: ``--help`` and usage errors answer before torch (about 2 s to import)
is loaded. Checks that need torch run after parsing, through :func:`check_device`, and
report through the same one-line usage error (exit status 2).
"""
from __future__ import annotations

import argparse
import ctypes
import math
import os
import re
import sys
import tempfile

AUTO_DEVICE = "auto"
DEVICE_HELP = "cpu, cuda or cuda:N; auto: cuda where torch sees a GPU, else cpu"


class UsageErrorParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage error is two lines, not the whole usage: a one-line
    synopsis with where to find every option, then ``prog: error: message`` (exit status 2)."""

    def __init__(self, *args, synopsis: str = "[options]", **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        kwargs.setdefault("usage", f"%(prog)s {synopsis}")
        super().__init__(*args, **kwargs)
        self.synopsis = synopsis

    def error(self, message: str):
        self.exit(2, f"usage: {self.prog} {self.synopsis}  (--help lists every option and its default)\n"
                     f"{self.prog}: error: {message}\n")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's line breaks and ends every option's help with its default
    (unless the help already states one, or the option is required)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.required or "default" in text or action.default is argparse.SUPPRESS or not action.option_strings:
            return text
        if isinstance(action, argparse._StoreTrueAction):  # a switch: "False" reads like a value to pass
            return f"{text} (default: off)"
        return f"{text} (default: %(default)s)"


def positive_int(text: str) -> int:
    value = int(text)  # a ValueError reads "invalid positive_int value: 'x'"
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def positive_float(text: str) -> float:
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def unit_float(text: str) -> float:
    value = finite_float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def device_argument(text: str) -> str:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (what the trainers and benchmarks run on),
    checked by spelling only; :func:`check_device` asks torch once it is imported."""
    if text in (AUTO_DEVICE, "cpu") or re.fullmatch(r"cuda(:\d+)?", text):
        if text.startswith("cuda") and not gpu_driver_present():
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has no GPU driver (no libcuda, no /dev/kfd): "
                                             f"use --device cpu")
        return text
    raise argparse.ArgumentTypeError(f"must be {DEVICE_HELP.split(';')[0]} (or auto), got {text!r}")


def gpu_driver_present() -> bool:
    """Whether a GPU torch could use as "cuda" may be present, asked without importing torch:
    the NVIDIA driver's libcuda.so.1 (never bundled in torch wheels) loads, or ROCm's
    /dev/kfd exists. False is certain; True leaves the answer to :func:`check_device`."""
    if not sys.platform.startswith("linux"):
        return True
    if os.path.exists("/dev/kfd"):
        return True
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def check_device(parser: argparse.ArgumentParser, text: str):
    """The ``torch.device`` of a :func:`device_argument` (``auto`` resolved), or a usage
    error where torch sees no such GPU. Imports torch."""
    import torch

    if text == AUTO_DEVICE:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(text)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            parser.error(f"argument --device: {text}: torch {torch.__version__} sees no CUDA device "
                         f"(use --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            parser.error(f"argument --device: {text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def check_output_dir(parser: argparse.ArgumentParser, flag: str, path: str) -> None:
    """A usage error unless ``path`` is, or can be created as, a writable directory. Its
    nearest existing ancestor must be a directory in which a directory can be made (tried
    with a temporary one, removed at once: permissions alone do not tell, root may not
    write under /proc either). Creates nothing."""
    existing = os.path.abspath(path)
    while not os.path.exists(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        parser.error(f"argument {flag}: {path}: {existing} is an existing file; name a directory")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".write_check_", dir=existing))
    except OSError as error:
        parser.error(f"argument {flag}: {path}: cannot write into {existing} ({error.strerror or error})")


def make_output_dir(parser: argparse.ArgumentParser, flag: str, path: str) -> None:
    """Create ``path`` after :func:`check_output_dir` passed (a usage error should the
    system still refuse)."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as error:
        parser.error(f"argument {flag}: {path}: cannot create it ({error.strerror or error})")
