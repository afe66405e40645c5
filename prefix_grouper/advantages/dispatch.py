"""Which backend runs, and the one primitive every estimator reduces to: normalize values
within groups.

The ids are compacted once with torch (:class:`~prefix_grouper.advantages.grouping.Segments`);
the chosen backend computes each group's count, mean and sum of squared deviations and
writes ``(x - mean) / (std + eps)`` in one fused pass.
"""
from __future__ import annotations

import torch

from .. import _dispatch as registry
from .._dispatch import Backend, register_op
from ..runtime import cuda_extension_unavailable_reason, triton_unavailable_reason
from .cuda_impl import group_normalize_cuda
from .options import NormalizeOptions
from .grouping import Segments
from .torch_impl import batch_std, group_normalize_torch

__all__ = ["available_backends", "check_no_inf", "normalize_in_groups", "resolve_backend"]

OP = "advantages"

# Every implementation takes (values float64 [N], segments, options, batch_scale [G] or None)
# and returns [N] float64 advantages. Every backend computes in float64, whatever the
# rewards' dtype, so only the device decides where one runs.
def _group_normalize_triton(*args, **kwargs):
    from .triton_impl import group_normalize_triton  # imports triton: only when it runs

    return group_normalize_triton(*args, **kwargs)


register_op(OP, [
    Backend("torch", group_normalize_torch),
    Backend("triton", _group_normalize_triton, unavailable=lambda device, dtype: triton_unavailable_reason(device),
            auto_devices=frozenset({"cuda"})),
    Backend("cuda", group_normalize_cuda, unavailable=lambda device, dtype: cuda_extension_unavailable_reason(device)),
], auto_order=("cuda", "triton", "torch"))


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """The explicit backends that can run on tensors on ``device`` (torch always can)."""
    return registry.available_backends(OP, device)


def resolve_backend(backend: str, device: torch.device) -> str:
    """``backend`` made concrete for tensors on ``device``; raises if it cannot run there
    (:class:`~prefix_grouper._dispatch.BackendUnavailableError`, with the reason).

    "auto" picks the CUDA extension on CUDA tensors when it is built, else Triton on CUDA
    tensors, else torch (always on CPU tensors, even under the Triton interpreter).
    """
    return registry.resolve_backend(OP, backend, device)


def check_no_inf(values: torch.Tensor, name: str) -> None:
    """Refuse +-inf in ``values``: it would make its group's (or the batch's) mean and std NaN.

    NaN keeps meaning "missing". This costs one fused ``isinf().any()`` read of the input and
    one device-to-host sync per call, small next to the normalization itself.
    """
    if bool(torch.isinf(values).any()):
        row = tuple(int(i) for i in torch.nonzero(torch.isinf(values))[0])
        raise ValueError(f"{name} holds +-inf (first at index {row[0] if len(row) == 1 else row}); "
                         f"rewards and returns must be finite, or NaN for a missing value")


def normalize_in_groups(
    values: torch.Tensor,
    segments: Segments,
    options: NormalizeOptions,
    backend: str,
    num_batches: int = 1,
) -> torch.Tensor:
    """``[N]`` advantages of ``values [N]`` within ``segments`` on a resolved ``backend``.

    ``values`` may stack ``num_batches`` independent batches of equal length (batch ``b``
    holds rows ``b * N / num_batches`` onward and segments ``b * G / num_batches`` onward, G
    the number of segments); ``scale="batch"`` divides by each batch's own std.

    Every backend computes in float64 and the result, cast back to the dtype of ``values``,
    is a constant: computed under ``torch.no_grad()``, it never requires grad.
    """
    with torch.no_grad():
        # float32 statistics are not enough: the float32 mean of identical rewards can be an ulp
        # off, and that ulp divided by a ~1e-8 std (eps 1e-9) becomes an advantage near +-1. The
        # float64 mean of identical float32/half values is exact, so they get exactly 0.
        compute = values.to(torch.float64).contiguous()
        batch_scale = None
        if options.scale == "batch":
            per_batch = batch_std(compute.view(num_batches, -1), options.unbiased)
            batch_scale = per_batch.repeat_interleave(segments.num_groups // num_batches)
        out = registry.implementation(OP, backend)(compute, segments, options, batch_scale)
        return out.to(values.dtype)
