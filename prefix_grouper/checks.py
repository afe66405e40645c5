"""Argument checks shared by the whole package: every error names the offending argument."""
from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Set
from typing import Any, Sequence

import torch


def check_choice(value: Any, name: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


def check_float_tensor(x: Any, name: str, ndim: int) -> None:
    """``x`` must be a non-empty floating-point tensor with ``ndim`` dimensions."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be floating point (NaN marks a missing value), got {x.dtype}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty: there is nothing to normalize")


def as_index(ids: Any, name: str, num_rows: int, device: torch.device, rows_name: str) -> torch.Tensor:
    """``ids`` (tensor or sequence of ints) as int64 ``[num_rows]`` on ``device``, checked.

    ``rows_name`` names the argument that fixes ``num_rows`` and ``device``, for the errors.
    """
    if isinstance(ids, (Set, Mapping)):
        # Sets and dicts have no row order to line up with the rows of the batch.
        raise TypeError(f"{name} must be an ordered tensor or sequence of integers, got {type(ids).__name__}")
    if not isinstance(ids, torch.Tensor):
        try:
            ids = torch.as_tensor(ids, device=device)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise TypeError(f"{name} must be a tensor or sequence of integers ({exc})") from exc
    if ids.dtype == torch.bool or ids.dtype.is_floating_point or ids.dtype.is_complex:
        raise TypeError(f"{name} must hold integer ids, got dtype {ids.dtype}")
    if ids.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(ids.shape)}")
    if ids.shape[0] != num_rows:
        raise ValueError(f"{name} has {ids.shape[0]} entries but {rows_name} has {num_rows} rows")
    if ids.device != device:
        raise ValueError(f"{name} is on {ids.device} but {rows_name} is on {device}; move both to one device")
    return ids.long()


def check_real(value: Any, name: str, low: float = -math.inf, high: float = math.inf) -> float:
    """``value`` as a float in ``[low, high]``: a Python/NumPy real or a 0-d tensor, not a bool."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or value.dtype.is_complex or value.dtype == torch.bool:
            raise TypeError(f"{name} must be a real number or 0-d real tensor, got a {value.dtype} tensor "
                            f"of shape {tuple(value.shape)}")
    # numpy registers its floating and integer scalars as numbers.Real; np.bool_ is neither.
    elif isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be a real number in [{low}, {high}], got {value!r}")
    return value


def check_int(value: Any, name: str, low: int, high: int | None = None) -> int:
    """``value`` as an int in ``[low, high]``: floats, bools and tensors are refused (a float
    size is a caller bug)."""
    if isinstance(value, (bool, torch.Tensor)) or not hasattr(value, "__index__"):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    value = value.__index__()
    if value < low or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be an integer {bounds}, got {value}")
    return value


def check_bool(value: Any, name: str) -> None:
    """``value`` must be a bool: None or a string such as "false" would be silently truthy or falsy."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")


def check_positive_real(value: Any, name: str) -> float:
    """``value`` as a positive finite float (Python/NumPy real or 0-d real tensor, not a bool)."""
    value = check_real(value, name)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return value


def check_finite_real(value: Any, name: str) -> float:
    """``value`` as a finite float (Python/NumPy real or 0-d real tensor, not a bool)."""
    value = check_real(value, name)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return value


# The longest packed axis accepted: token offsets must fit in int32, the index type of the Triton
# backend's tile tables (attention/triton_backend.py).
MAX_LENGTH = 2**31 - 1


def as_length_list(values: Any, name: str) -> list[int]:
    """``values`` as a list of Python ints: an ordered sequence or 1-D integer tensor.

    Refuses unordered containers (sets, dicts), bools, floats (even integral ones: a float
    length is a caller bug), non-integer tensors and values above :data:`MAX_LENGTH`.
    """
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise TypeError(f"{name} must be a sequence of integers, got {type(values).__name__} {values!r}")
    if isinstance(values, (Set, Mapping)):
        raise TypeError(f"{name} must be an ordered sequence of integers, got a {type(values).__name__}")
    if isinstance(values, torch.Tensor):
        if values.dtype.is_floating_point or values.dtype.is_complex or values.dtype == torch.bool:
            raise TypeError(f"{name} must hold integers, got a tensor of dtype {values.dtype}")
        if values.dim() != 1:
            raise ValueError(f"{name} must be 1-D, got shape {tuple(values.shape)}")
        out = [int(x) for x in values.tolist()]
    else:
        out = []
        for x in values:
            if isinstance(x, torch.Tensor):
                if x.dim() != 0 or x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
                    raise TypeError(f"{name} must hold integers, got a {x.dtype} tensor of shape "
                                    f"{tuple(x.shape)}")
                x = int(x.item())
            # numpy integers have __index__; floats, numpy floats and bools are refused.
            if isinstance(x, bool) or isinstance(x, float) or not hasattr(x, "__index__"):
                raise TypeError(f"{name} must hold integers, got {type(x).__name__} {x!r}")
            out.append(int(x.__index__()))
    for i, x in enumerate(out):
        if x > MAX_LENGTH:
            raise ValueError(f"{name}[{i}] = {x} is larger than any packable length ({MAX_LENGTH})")
    return out
