"""``fused_linear_log_probs``: completion log-probs (and entropy) through the LM head without
ever holding more than one chunk of logits.

The forward walks the rows in chunks: ``logits = hidden[chunk] @ weight.T + bias`` (cuBLAS,
in the input dtype), reduced per row in float32 (float64 for float64 inputs) to
``log p(target)``, ``lse`` and entropy; only those ``[C]`` statistics are kept. The backward
walks blocks of the same size, but across the vocabulary: a block's logits gradient needs
only its rows' saved ``lse`` and entropy, and a block of every row and some vocabulary
columns gives those columns' weight gradient in one matmul over all rows, written once in
the weight's dtype (cuBLAS accumulates in float32, as PyTorch's own backward of the head),
with no float32 ``[V, H]`` accumulator summed chunk after chunk. The ``[C, H]`` hidden
gradient is what sums over the blocks. Recomputing the logits is one more
``hidden @ weight.T`` than plain PyTorch (and than Liger-Kernel, whose loss is a scalar so
it can form gradients in the forward): an upstream gradient per row, for both outputs, is
only known in the backward.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import torch
from torch.autograd.function import once_differentiable

from .. import _dispatch as registry
from .._dispatch import Backend, register_op
from ..checks import check_bool, check_positive_real
from ..runtime import triton_unavailable_reason
from .torch_impl import chunk_grad_logits_torch_, chunk_stats_torch

__all__ = ["BACKENDS", "LOGITS_CHUNK_BYTES", "available_backends", "default_chunk_size", "fused_linear_log_probs",
           "resolve_backend"]

OP = "fused_linear_log_probs"
BACKENDS = ("torch", "triton")

# Memory budget of one chunk of logits counted in float32 (float64 for float64 inputs), the
# dtype the torch backend upcasts them to. 256 MiB is 441 rows of Qwen's 151,936-token
# vocabulary: matmuls of that height still run near cuBLAS peak, and the chunk is a small
# fraction of any training GPU. The Triton backend keeps bf16/fp16 logits as they are
# (half the budget); the torch backend holds up to ~3 such buffers at once (its temporaries,
# and the gradient cast to a bf16/fp16 weight dtype for the matmuls).
LOGITS_CHUNK_BYTES = 256 * 2**20


class ChunkKernels(NamedTuple):
    """A backend's two per-chunk steps (see :mod:`.torch_impl` for the contract)."""
    stats: Callable[..., None]
    grad_logits_: Callable[..., torch.Tensor]


def _chunk_stats_triton(*args, **kwargs):
    from .triton_impl import chunk_stats_triton  # imports triton: only when it runs

    return chunk_stats_triton(*args, **kwargs)


def _chunk_grad_logits_triton_(*args, **kwargs):
    from .triton_impl import chunk_grad_logits_triton_  # imports triton: only when it runs

    return chunk_grad_logits_triton_(*args, **kwargs)


register_op(OP, [
    Backend("torch", ChunkKernels(chunk_stats_torch, chunk_grad_logits_torch_)),
    Backend("triton", ChunkKernels(_chunk_stats_triton, _chunk_grad_logits_triton_),
            unavailable=lambda device, dtype: triton_unavailable_reason(device), auto_devices=frozenset({"cuda"})),
], auto_order=("triton", "torch"))


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Logits, statistics and outputs are float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def default_chunk_size(vocab_size: int, dtype: torch.dtype) -> int:
    """Rows per chunk so that one chunk of logits upcast from ``dtype`` fits :data:`LOGITS_CHUNK_BYTES`."""
    return max(1, LOGITS_CHUNK_BYTES // (vocab_size * compute_dtype(dtype).itemsize))


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Backends that can run on ``device``, fastest last."""
    return registry.available_backends(OP, device)


def resolve_backend(backend: str, device: torch.device) -> str:
    """``"auto"`` is triton on CUDA tensors when Triton is available, else torch; an explicit
    backend that cannot run on ``device`` is refused with the reason
    (:class:`~prefix_grouper._dispatch.BackendUnavailableError`)."""
    return registry.resolve_backend(OP, backend, device)


def inputs_dtype_matmuls(device: torch.device):
    """Autocast off: under autocast the forward's head matmul would run in bf16 while the
    backward's recomputation (where autocast is usually off) ran in the inputs' dtype, and
    the recomputed logits would disagree with the saved ``lse``."""
    return torch.autocast(device.type, enabled=False)


# Narrowest vocabulary block of the backward: narrower, the head's matmuls get skinny; a
# batch with more rows than a chunk's logits hold at this width is cut into row blocks too.
MIN_VOCAB_BLOCK = 256


def backward_blocks(rows: int, vocab_size: int, chunk_size: int) -> tuple[int, int]:
    """``(rows, columns)`` of the backward's blocks of logits: at most ``chunk_size * vocab_size``
    entries (the forward's chunk), every row at once (the whole vocabulary when the rows fit
    one chunk) unless that leaves fewer than :data:`MIN_VOCAB_BLOCK` columns."""
    if rows <= chunk_size:
        return max(rows, 1), vocab_size
    budget = chunk_size * vocab_size
    columns = min(vocab_size, max(MIN_VOCAB_BLOCK, budget // rows))
    return min(rows, max(1, budget // columns)), columns


def chunk_logits(hidden_chunk: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A fresh ``[c, V]`` buffer of logits in the input dtype, which the kernels may overwrite."""
    return hidden_chunk @ weight.t() if bias is None else torch.addmm(bias, hidden_chunk, weight.t())


class FusedLinearLogProbs(torch.autograd.Function):
    """``(log_probs [C], entropy [C])``; saves the inputs and ``lse [C]``, never logits."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, inv_temperature: float, softcap: float | None, chunk_size: int,
                kernels: ChunkKernels):
        rows, dtype = hidden.shape[0], compute_dtype(hidden.dtype)
        log_probs, lse, entropy = (torch.empty(rows, dtype=dtype, device=hidden.device) for _ in range(3))
        with inputs_dtype_matmuls(hidden.device):
            for start in range(0, rows, chunk_size):
                end = min(start + chunk_size, rows)
                kernels.stats(chunk_logits(hidden[start:end], weight, bias), targets[start:end], inv_temperature,
                              softcap, log_probs[start:end], lse[start:end], entropy[start:end])
        ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy)
        # An output the loss does not use gets grad None, not zeros: the entropy term is skipped.
        ctx.set_materialize_grads(False)
        ctx.inv_temperature, ctx.softcap, ctx.chunk_size, ctx.kernels = inv_temperature, softcap, chunk_size, kernels
        return log_probs, entropy

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_log_probs, grad_entropy):
        hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
        needs_hidden, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        # The kernels index rows of flat [C] buffers: an expanded grad (from .sum()) must be made dense.
        grad_log_probs = (torch.zeros_like(lse) if grad_log_probs is None
                          else grad_log_probs.to(lse.dtype).contiguous())
        if grad_entropy is not None:
            grad_entropy = grad_entropy.to(lse.dtype).contiguous()
        rows, vocab_size = hidden.shape[0], weight.shape[0]
        row_block, vocab_block = backward_blocks(rows, vocab_size, ctx.chunk_size)
        # Sums over several blocks accumulate in float32 (float64 for float64 inputs) and are
        # cast once at the end: summing bf16 partial products in bf16 would round after every
        # block (benchmarks/results/design_measurements.md has the measured error).
        grad_hidden = grad_weight = None
        if needs_hidden:
            grad_hidden = (torch.empty_like(hidden) if vocab_block == vocab_size
                           else torch.zeros(hidden.shape, dtype=lse.dtype, device=hidden.device))
        if needs_weight:  # every block writes its rows of it, unless there are no rows to write
            grad_weight = torch.zeros_like(weight) if rows == 0 else torch.empty_like(weight)
        grad_bias = torch.zeros(vocab_size, dtype=lse.dtype, device=weight.device) if needs_bias else None
        with inputs_dtype_matmuls(hidden.device):
            for v_start in range(0, vocab_size, vocab_block):
                v_end = min(v_start + vocab_block, vocab_size)
                weight_block = weight[v_start:v_end]
                grad_weight_sum = (torch.zeros(weight_block.shape, dtype=lse.dtype, device=weight.device)
                                   if needs_weight and row_block < rows else None)
                for start in range(0, rows, row_block):
                    end = min(start + row_block, rows)
                    hidden_chunk = hidden[start:end]
                    grad_logits = ctx.kernels.grad_logits_(
                        chunk_logits(hidden_chunk, weight_block, None if bias is None else bias[v_start:v_end]),
                        targets[start:end], v_start, lse[start:end], entropy[start:end], grad_log_probs[start:end],
                        None if grad_entropy is None else grad_entropy[start:end], ctx.inv_temperature, ctx.softcap)
                    if needs_bias:
                        grad_bias[v_start:v_end] += grad_logits.sum(0, dtype=grad_bias.dtype)
                    # cuBLAS at the weight's precision, as plain PyTorch's backward of the head would run.
                    grad_logits = grad_logits.to(weight.dtype)
                    if needs_hidden:
                        _mm_into(grad_hidden[start:end], grad_logits, weight_block, add=vocab_block < vocab_size)
                    if grad_weight_sum is not None:
                        _mm_into(grad_weight_sum, grad_logits.t(), hidden_chunk, add=True)
                    elif needs_weight:
                        torch.mm(grad_logits.t(), hidden_chunk, out=grad_weight[v_start:v_end])
                if grad_weight_sum is not None:
                    grad_weight[v_start:v_end] = grad_weight_sum
        if needs_hidden:
            grad_hidden = grad_hidden.to(hidden.dtype)
        if needs_bias:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None


def _mm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, add: bool) -> None:
    """``out = a @ b`` or, with ``add``, ``out += a @ b``; ``out`` may be of a wider dtype than
    ``a`` and ``b`` (an accumulator): the product is then rounded to theirs before the sum."""
    if not add:
        torch.mm(a, b, out=out)
    elif out.dtype == a.dtype:
        out.addmm_(a, b)
    else:
        out += torch.mm(a, b)


def check_chunk_size(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"chunk_size must be None or a positive int (rows per chunk), got "
                        f"{type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"chunk_size must be a positive number of rows, got {value}")
    return value


def check_inverse_temperature(temperature: Any, dtype: torch.dtype) -> float:
    """``1 / temperature``, refused where it would overflow the logits: the kernels scale the
    logits by it in :func:`compute_dtype`, so it must leave room for logits of any size a
    model produces (up to the square root of that dtype's largest value, 1.8e19 in float32).
    Past that the scaled logits are inf and the log-probs NaN."""
    temperature = check_positive_real(temperature, "temperature")
    largest = torch.finfo(compute_dtype(dtype)).max
    limit = largest ** 0.5
    if temperature < 1.0 / limit:
        raise ValueError(f"temperature must be at least {1.0 / limit:.3g} for {dtype} inputs (computed in "
                         f"{compute_dtype(dtype)}): 1/temperature = {1.0 / temperature:.3g} leaves too little room below "
                         f"that dtype's largest value ({largest:.3g}) for the scaled logits; got "
                         f"temperature={temperature!r}")
    return 1.0 / temperature


def check_softcap(softcap: Any, inv_temperature: float, dtype: torch.dtype) -> float | None:
    """``softcap`` as a float (or None), refused where the kernels' ``1 / softcap`` or the
    capped logits' bound ``softcap / temperature`` would leave :func:`compute_dtype`'s range
    (as for the temperature, the scaled logits keep the square root of its largest value)."""
    if softcap is None:
        return None
    softcap = check_positive_real(softcap, "softcap")
    largest = torch.finfo(compute_dtype(dtype)).max
    if 1.0 / softcap > largest or softcap * inv_temperature > largest ** 0.5:
        raise ValueError(f"softcap must be in [{1.0 / largest:.3g}, {largest ** 0.5 / inv_temperature:.3g}] for "
                         f"{dtype} inputs at this temperature (computed in {compute_dtype(dtype)}), got "
                         f"softcap={softcap!r}")
    return softcap


def check_operands(hidden: Any, weight: Any, bias: Any) -> None:
    for name, tensor, ndim, shape in (("hidden", hidden, 2, "[C, H]"), ("weight", weight, 2, "[V, H]"),
                                      ("bias", bias, 1, "[V]")):
        if name == "bias" and tensor is None:
            continue
        if not (isinstance(tensor, torch.Tensor) and tensor.dtype.is_floating_point):
            got = f"dtype {tensor.dtype}" if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise TypeError(f"{name} must be a floating-point tensor {shape}, got {got}")
        if tensor.dim() != ndim:
            raise ValueError(f"{name} must be {ndim}-D {shape}, got shape {tuple(tensor.shape)}")
        if name != "hidden" and (tensor.dtype != hidden.dtype or tensor.device != hidden.device):
            raise ValueError(f"{name} ({tensor.dtype}, {tensor.device}) must have hidden's dtype and device "
                             f"({hidden.dtype}, {hidden.device})")
    if weight.shape[0] == 0:
        raise ValueError("weight has no rows: the vocabulary V must be at least 1")
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight [V, H] has H = {weight.shape[1]} but hidden [C, H] has H = {hidden.shape[1]}")
    if bias is not None and bias.shape[0] != weight.shape[0]:
        raise ValueError(f"bias must be [V] = [{weight.shape[0]}] like weight's rows, got shape {tuple(bias.shape)}")


def check_targets(targets: Any, hidden: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """``targets`` as contiguous int64 ``[C]`` on hidden's device, every id in ``[0, V)``."""
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be an integer torch.Tensor [C], got {type(targets).__name__}")
    if targets.dtype == torch.bool or targets.dtype.is_floating_point or targets.dtype.is_complex:
        raise TypeError(f"targets must hold integer token ids, got dtype {targets.dtype}")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets must be [C] = [{hidden.shape[0]}] like hidden's rows, got shape "
                         f"{tuple(targets.shape)}")
    if targets.device != hidden.device:
        raise ValueError(f"targets is on {targets.device} but hidden is on {hidden.device}")
    if targets.numel():
        # One device-to-host read of (min, max): the only sync of the call. An id out of range
        # would make the kernels read outside the row (Triton) or fail deep inside gather.
        if targets.dtype in (torch.uint16, torch.uint32, torch.uint64):  # torch has no min/max for these
            host = targets.cpu().numpy()  # numpy keeps an id above 2**63 exact (int64 would wrap it negative)
            low, high = int(host.min()), int(host.max())
        else:
            low, high = torch.stack(torch.aminmax(targets)).tolist()
        if low < 0 or high >= vocab_size:
            raise ValueError(f"targets must be token ids in [0, V) = [0, {vocab_size}), got ids from {low} to {high}")
    return targets.long().contiguous()


def fused_linear_log_probs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                           bias: torch.Tensor | None = None, temperature: float = 1.0, softcap: float | None = None,
                           return_entropy: bool = False, chunk_size: int | None = None, backend: str = "auto"):
    """``log_softmax((hidden @ weight.T + bias) / temperature)`` gathered at ``targets``.

    Args:
        hidden: ``[C, H]`` float16/bfloat16/float32/float64, e.g. the last hidden states at
            the completion positions.
        weight: ``[V, H]`` the LM head (or the tied embedding), hidden's dtype and device.
        targets: ``[C]`` integer token ids in ``[0, V)``.
        bias: optional ``[V]``, hidden's dtype and device.
        temperature: positive finite; the logits are divided by it (TRL/verl sampling temperature).
        softcap: optional positive real: the logits are capped to ``softcap * tanh(logits /
            softcap)`` before the temperature, as Gemma 2's forward does with
            ``config.final_logit_softcapping``.
        return_entropy: also return the entropy of the same distribution.
        chunk_size: rows per chunk of logits; default :func:`default_chunk_size`
            (:data:`LOGITS_CHUNK_BYTES` of upcast logits).
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` (see :func:`resolve_backend`).

    Returns:
        ``log_probs [C]`` float32 (float64 for float64 inputs), or ``(log_probs, entropy)``.
        Both are differentiable with respect to ``hidden``, ``weight`` and ``bias``.
    """
    check_operands(hidden, weight, bias)
    targets = check_targets(targets, hidden, weight.shape[0])
    inv_temperature = check_inverse_temperature(temperature, hidden.dtype)
    softcap = check_softcap(softcap, inv_temperature, hidden.dtype)
    check_bool(return_entropy, "return_entropy")
    chunk_size = check_chunk_size(chunk_size) or default_chunk_size(weight.shape[0], hidden.dtype)
    kernels = registry.implementation(OP, resolve_backend(backend, hidden.device))
    log_probs, entropy = FusedLinearLogProbs.apply(hidden, weight, bias, targets, inv_temperature, softcap,
                                                   chunk_size, kernels)
    return (log_probs, entropy) if return_entropy else log_probs
