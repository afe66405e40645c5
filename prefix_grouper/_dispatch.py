"""One registry of every op's backends: what implements an op, where each backend can run,
and which one ``backend="auto"`` picks.

Each op module registers its backends once, at import: ``prefix_attention`` in
:mod:`prefix_grouper.attention.api`, ``fused_linear_log_probs`` in
:mod:`prefix_grouper.logprobs.api`, ``advantages`` in :mod:`prefix_grouper.advantages.dispatch`.
Their public ``resolve_backend`` / ``available_backends`` are thin wrappers over the functions
here, so every op resolves ``"auto"`` and refuses an unusable backend the same way, with one
error message. Adding a backend to an op is one more :class:`Backend` in its ``register_op`` call.

Resolution runs on every call of an op, also inside ``torch.compile``'d code: it only reads
these tables and calls the runtime checks (which compiled code takes as constants).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence

import torch

from .checks import check_choice

__all__ = ["Backend", "BackendUnavailableError", "available_backends", "backend_names", "implementation",
           "register_op", "resolve_backend"]

# None when a backend can run on tensors on the device with that dtype (dtype None: the
# device alone is asked about), else a one-line reason it cannot.
UnavailableReason = Callable[[torch.device, Optional[torch.dtype]], Optional[str]]


def _always_available(device: torch.device, dtype: torch.dtype | None) -> None:
    return None


class BackendUnavailableError(RuntimeError, TypeError, ValueError):
    """An explicitly requested backend cannot run on the inputs' device or dtype.

    One error for every op and reason. It is also a TypeError and a ValueError because the ops
    raised those for dtype and device refusals before the registry existed, and callers that
    catch them keep working.
    """


@dataclasses.dataclass(frozen=True)
class Backend:
    """One backend of an op.

    name: what ``backend=`` calls it.
    implementation: the object the op runs; its calling convention is the op's own. A backend
        whose module needs an optional dependency (Triton) registers a function that imports
        it when called: an import of a loaded module is cheap, and torch.compile traces it.
    unavailable: ``(device, dtype) -> None | reason``; the default runs everywhere.
    auto_devices: device types on which ``"auto"`` may pick it (None: any device it runs on).
        Triton runs on CPU tensors only under its interpreter, a test tool ``"auto"`` skips.
    """
    name: str
    implementation: Any
    unavailable: UnavailableReason = _always_available
    auto_devices: Optional[frozenset] = None


@dataclasses.dataclass(frozen=True)
class _Op:
    name: str
    backends: dict  # name -> Backend, in registration order (slowest first)
    auto_order: tuple  # names "auto" tries first to last
    choices: tuple  # ("auto", *backends): what ``backend=`` accepts


_OPS: dict[str, _Op] = {}


def register_op(op: str, backends: Sequence[Backend], auto_order: Sequence[str]) -> None:
    """Declare ``op``'s backends (listed slowest first, the order ``available_backends``
    reports) and the order in which ``"auto"`` tries them. Registering ``op`` again replaces it."""
    table = {backend.name: backend for backend in backends}
    if len(table) != len(backends) or "auto" in table:
        raise ValueError(f"{op}: backend names must be distinct and not 'auto', got {[b.name for b in backends]}")
    unknown = [name for name in auto_order if name not in table]
    if unknown or not auto_order:
        raise ValueError(f"{op}: auto_order must name registered backends {list(table)}, got {list(auto_order)}")
    _OPS[op] = _Op(op, table, tuple(auto_order), ("auto",) + tuple(table))


def _op(op: str) -> _Op:
    spec = _OPS.get(op)
    if spec is None:
        raise ValueError(f"no op {op!r} is registered (an op registers when its module is imported); "
                         f"registered: {', '.join(map(repr, _OPS))}")
    return spec


def backend_names(op: str) -> tuple:
    """The names ``op`` accepts for ``backend=``: ``"auto"`` and every registered backend."""
    return _op(op).choices


def _where(device: torch.device, dtype: torch.dtype | None) -> str:
    return str(device) if dtype is None else f"{device} for {str(dtype).replace('torch.', '')}"


def _reasons(spec: _Op, device: torch.device, dtype: torch.dtype | None) -> dict:
    """name -> None (it runs) or the reason it cannot, for every backend of ``spec``."""
    return {name: backend.unavailable(device, dtype) for name, backend in spec.backends.items()}


def available_backends(op: str, device: torch.device | str, dtype: torch.dtype | None = None) -> list[str]:
    """The backends of ``op`` that can run on tensors on ``device`` (of ``dtype``, when given),
    slowest first."""
    device = torch.device(device)
    return [name for name, reason in _reasons(_op(op), device, dtype).items() if reason is None]


def _auto(spec: _Op, device: torch.device, dtype: torch.dtype | None) -> str | None:
    for name in spec.auto_order:
        backend = spec.backends[name]
        if backend.auto_devices is not None and device.type not in backend.auto_devices:
            continue
        if backend.unavailable(device, dtype) is None:
            return name
    return None


def _unavailable_message(spec: _Op, requested: str, device: torch.device, dtype: torch.dtype | None) -> str:
    """The one refusal format: what was asked, why not, what runs there and why the rest do not."""
    reasons = _reasons(spec, device, dtype)
    where = _where(device, dtype)
    available = [name for name, reason in reasons.items() if reason is None]
    if requested == "auto":
        head = f"{spec.name}: no backend can run on {where}"
    else:
        head = f"{spec.name}: backend={requested!r} is not available on {where}: {reasons[requested]}"
    parts = [head]
    if available:
        auto = _auto(spec, device, dtype)
        parts.append(f"Available there: {', '.join(map(repr, available))}"
                     + (f" ('auto' picks {auto!r})" if auto else ""))
    others = [f"{name!r} ({reason})" for name, reason in reasons.items()
              if reason is not None and name != requested]
    if others:
        parts.append(f"Also unavailable: {'; '.join(others)}")
    return ". ".join(parts)


def resolve_backend(op: str, backend: str, device: torch.device | str, dtype: torch.dtype | None = None) -> str:
    """The backend ``op`` runs for ``backend=`` on tensors on ``device`` of ``dtype``.

    ``"auto"`` is the first backend of the op's ``auto_order`` that runs there (skipping those
    whose ``auto_devices`` exclude the device); an explicit name is returned as is when it can
    run, else refused with :class:`BackendUnavailableError`. An unknown name is a ValueError
    listing the accepted ones.
    """
    spec = _op(op)
    check_choice(backend, "backend", spec.choices)
    device = torch.device(device)
    if backend == "auto":
        name = _auto(spec, device, dtype)
        if name is None:
            raise BackendUnavailableError(_unavailable_message(spec, backend, device, dtype))
        return name
    if spec.backends[backend].unavailable(device, dtype) is not None:
        raise BackendUnavailableError(_unavailable_message(spec, backend, device, dtype))
    return backend


def implementation(op: str, backend: str) -> Any:
    """What ``op`` runs for a resolved ``backend``."""
    return _op(op).backends[backend].implementation
