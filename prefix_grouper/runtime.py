"""Where the package's kernels can run: the Triton and CUDA-extension availability checks the
backend registry (:mod:`prefix_grouper._dispatch`) asks, and one CUDA device guard."""
from __future__ import annotations

import contextlib
import functools
import os

import torch

from ._extension import require_cuda_extension

__all__ = ["cuda_extension_unavailable_reason", "device_guard", "triton_interpreted", "triton_unavailable_reason"]


@functools.lru_cache(maxsize=None)
def _triton():
    try:
        import triton
    except ImportError as exc:
        return None, str(exc)
    return triton, None


@functools.lru_cache(maxsize=None)
def triton_interpreted() -> bool:
    """True when ``triton.jit`` builds interpreter functions, which happens only when
    TRITON_INTERPRET=1 was set before triton was imported."""
    triton, _ = _triton()
    if triton is None:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    def probe():
        pass

    return isinstance(triton.jit(probe), InterpretedFunction)


# Whether Triton can run cannot change while a program runs, and torch.compile cannot trace
# the check (it builds a triton.jit probe): compiled code takes its result as a constant.
@torch.compiler.assume_constant_result
def triton_unavailable_reason(device: torch.device | str) -> str | None:
    """None when Triton kernels can run on tensors on ``device``, else a one-line reason."""
    device = torch.device(device)
    triton, error = _triton()
    if triton is None:
        return f"triton cannot be imported ({error})"
    if device.type == "cuda":
        return None if torch.cuda.is_available() else "CUDA is not available"
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            return ("Triton runs on CPU tensors only under its interpreter: set TRITON_INTERPRET=1 "
                    "before importing triton")
        if not triton_interpreted():
            return "TRITON_INTERPRET=1 was set after triton was imported; set it before the first import"
        return None
    return f"Triton kernels do not support {device.type} tensors"


def cuda_extension_unavailable_reason(device: torch.device) -> str | None:
    """None when the compiled CUDA extension can run on tensors on ``device``, else a one-line reason."""
    if device.type != "cuda":
        return f"needs CUDA tensors, got tensors on {device}"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    try:
        require_cuda_extension("it")
    except RuntimeError as exc:
        return str(exc).rstrip(".")
    return None


def device_guard(x: torch.Tensor):
    """Kernel launches go to the current CUDA device, which need not be ``x``'s."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()
