"""Where the package's kernels can run: one Triton availability check and one CUDA device
guard, shared by attention and advantages."""
from __future__ import annotations

import contextlib
import functools
import os

import torch

__all__ = ["device_guard", "require_triton", "triton_interpreted", "triton_on_cuda", "triton_unavailable_reason"]


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


def triton_on_cuda(device: torch.device) -> bool:
    """What ``backend="auto"`` asks before choosing Triton: CUDA tensors and a usable Triton."""
    return device.type == "cuda" and triton_unavailable_reason(device) is None


def require_triton(device: torch.device) -> None:
    """Refuse an explicit ``backend="triton"`` that cannot run on ``device``, with the reason."""
    reason = triton_unavailable_reason(device)
    if reason is not None:
        raise RuntimeError(f"backend='triton' is not available on {device}: {reason}")


def device_guard(x: torch.Tensor):
    """Kernel launches go to the current CUDA device, which need not be ``x``'s."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()
