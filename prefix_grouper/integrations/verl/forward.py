"""verl's per-token log-probs (and entropies) of a micro-batch from one packed forward of its
prefix tree, on one rank or split over a Ulysses sequence-parallel group.

Ulysses: every rank of the group holds the same micro-batch; the packed row (padded to a
multiple of the group size) is cut into equal chunks, one per rank, which runs the model on
its chunk. Around :func:`~prefix_grouper.prefix_attention`, each attention layer gathers the
sequence and scatters the heads, so that a rank sees the whole row for ``heads / group
size`` heads, and back (:class:`SequenceHeadsAllToAll`: verl's ``gather_seq_scatter_heads``
does the same with ``all_to_all`` on tensor lists, which gloo lacks; ``all_to_all_single``
runs on NCCL and gloo alike, so the CPU tests check the code path GPUs run). Each rank scores
the response tokens predicted in its chunk; the scores are gathered with verl's
``gather_outputs_and_unpad``, whose backward scales by the group size as verl's own Ulysses
log-probs do: FSDP then averages the ranks' gradients.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch

from ...logprobs.tokens import token_log_probs
from ...models.attention import BACKEND_KWARG, LAYOUT_KWARG, PACKED_CALL, WRAPPER_KWARG, PackedCall, install
from .tree import micro_batch_layout, prompt_lengths, scored_positions

__all__ = ["SequenceHeadsAllToAll", "grouped_log_probs", "sequence_parallel_attention"]


def _all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int, group) -> torch.Tensor:
    size = torch.distributed.get_world_size(group)
    chunks = torch.stack(x.chunk(size, dim=scatter_dim))  # chunk r goes to rank r
    received = torch.empty_like(chunks)
    torch.distributed.all_to_all_single(received, chunks, group=group)
    return torch.cat(received.unbind(0), dim=gather_dim)


class SequenceHeadsAllToAll(torch.autograd.Function):
    """``x`` split in equal chunks along ``scatter_dim`` over the ranks of ``group``, the
    chunks received concatenated along ``gather_dim`` (in rank order); backward the reverse."""

    @staticmethod
    def forward(ctx, x, scatter_dim: int, gather_dim: int, group):
        ctx.dims, ctx.group = (scatter_dim, gather_dim), group
        return _all_to_all(x, scatter_dim, gather_dim, group)

    @staticmethod
    def backward(ctx, grad):
        scatter_dim, gather_dim = ctx.dims
        return _all_to_all(grad, gather_dim, scatter_dim, ctx.group), None, None, None


def _local_heads(tensor: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    per_rank = tensor.shape[0] // size
    return tensor.narrow(0, rank * per_rank, per_rank)


def sequence_parallel_attention(attention, module, query, key, value, attention_mask, dropout=0.0, scaling=None, *,
                                group, **kwargs):
    """A packed call's ``attention`` (:func:`~prefix_grouper.models.attention.prefix_grouper_attention`)
    on this rank's chunk of the packed row (query ``[1, Hq, T / sp, D]``): all-to-all to
    ``[1, Hq / sp, T, D]``, prefix attention, and back. Passed down as the model-call keyword
    :data:`~prefix_grouper.models.attention.WRAPPER_KWARG` with ``group`` bound."""
    size, rank = torch.distributed.get_world_size(group), torch.distributed.get_rank(group)
    heads, kv_heads = query.shape[1], key.shape[1]
    # Key/value heads are repeated until they divide over the ranks, each query head still
    # reading its own key/value head (repeat_interleave keeps the grouping).
    repeat = size // math.gcd(kv_heads, size)
    if heads % size or heads % (kv_heads * repeat):
        raise ValueError(f"ulysses_sequence_parallel_size={size} needs the attention heads to divide over the "
                         f"ranks: {type(module).__name__} has {heads} query heads and {kv_heads} key/value heads")
    if repeat > 1:
        key, value = key.repeat_interleave(repeat, dim=1), value.repeat_interleave(repeat, dim=1)
    total = kwargs[LAYOUT_KWARG].total_tokens
    # [1, heads, T_pad / size, D] -> [1, heads / size, T, D] (the padding dropped)
    query, key, value = (SequenceHeadsAllToAll.apply(x, 1, 2, group).narrow(2, 0, total) for x in (query, key, value))
    for name in ("s_aux", "sinks"):  # per-head attention sinks (gpt-oss): this rank's heads
        if kwargs.get(name) is not None:
            kwargs[name] = _local_heads(kwargs[name], rank, size)
    output, _ = attention(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    # [1, T, heads / size, D] -> [1, T_pad / size, heads, D]
    output = torch.nn.functional.pad(output, (0, 0, 0, 0, 0, _padding(total, size)))
    return SequenceHeadsAllToAll.apply(output, 1, 2, group), None


def _padding(total: int, size: int) -> int:
    """Tokens that pad a packed row of ``total`` tokens to a multiple of ``size``."""
    return -total % size


def _logits(model, module, layout, input_ids, position_ids, logits_to_keep, backend, **call_kwargs):
    """``module``'s logits at ``logits_to_keep`` of a packed row (``module``: ``model`` or its
    FSDP wrapper), refused when no attention layer ran prefix attention."""
    install(model)
    packed_call = PackedCall()
    token = PACKED_CALL.set(packed_call)
    try:
        output = module(input_ids=input_ids[None], position_ids=position_ids[None], use_cache=False,
                        logits_to_keep=logits_to_keep, **call_kwargs,
                        **{LAYOUT_KWARG: layout, BACKEND_KWARG: backend})
    finally:
        PACKED_CALL.reset(token)
    packed_call.check(model)
    return output.logits[0]


def _score(logits, targets, temperature, calculate_entropy) -> torch.Tensor:
    """``[M, 1]`` log-probs or ``[M, 2]`` log-probs and entropies."""
    values = token_log_probs(logits, targets, temperature, return_entropy=calculate_entropy)
    return torch.stack(values, -1) if calculate_entropy else values[:, None]


def _sequence_parallel_scores(model, module, layout, packed_ids, logit_at, targets, temperature,
                              calculate_entropy, backend, group) -> torch.Tensor:
    from verl.utils.ulysses import gather_outputs_and_unpad

    size, rank = torch.distributed.get_world_size(group), torch.distributed.get_rank(group)
    pad = _padding(layout.total_tokens, size)
    chunk = (layout.total_tokens + pad) // size
    ids = torch.nn.functional.pad(packed_ids, (0, pad))
    positions = torch.nn.functional.pad(layout.position_ids, (0, pad))
    owner = (logit_at // chunk).cpu().numpy()
    counts = np.bincount(owner, minlength=size)
    mine = torch.from_numpy(np.flatnonzero(owner == rank)).to(logit_at.device)
    local = slice(rank * chunk, (rank + 1) * chunk)
    logits = _logits(model, module, layout, ids[local], positions[local], logit_at[mine] - rank * chunk, backend,
                     **{WRAPPER_KWARG: functools.partial(sequence_parallel_attention, group=group)})
    scores = _score(logits, targets[mine], temperature, calculate_entropy)
    width = int(counts.max())
    scores = torch.nn.functional.pad(scores, (0, 0, 0, width - scores.shape[0]))
    gathered = gather_outputs_and_unpad(scores, gather_dim=0, group=group)  # [size * width, k]
    # Score j sits in its owner's block of the gathered scores, at its place among that owner's.
    order = np.argsort(owner, kind="stable")
    slot = np.empty(len(owner), dtype=np.int64)
    slot[order] = owner[order] * width + np.arange(len(owner)) - np.repeat(np.cumsum(counts) - counts, counts)
    return gathered[torch.from_numpy(slot).to(gathered.device)]


def grouped_log_probs(model, module, micro_batch, temperature: float, calculate_entropy: bool,
                      backend: str = "auto", sequence_parallel_group=None):
    """verl's ``(log_probs, entropy or None)``, nested like ``micro_batch["input_ids"]`` (the
    value predicting token ``t + 1`` at ``t``, zeros outside the responses), from one packed
    forward of the micro-batch's prefix tree (:func:`micro_batch_layout`) through ``module``
    (``model`` or its FSDP wrapper).

    ``sequence_parallel_group``: the Ulysses group (verl's ``ulysses_parallel_group``); with
    more than one rank the packed row is split over them (see the module docstring).
    """
    input_ids = micro_batch["input_ids"]
    prompt_lens = prompt_lengths(micro_batch)
    layout, packed_ids, _ = micro_batch_layout(input_ids, prompt_lens)
    sequence_lens = input_ids.offsets().diff().tolist()
    rows, logit_at, target_at = scored_positions(layout, prompt_lens, sequence_lens)
    targets = packed_ids[target_at]
    if sequence_parallel_group is not None and torch.distributed.get_world_size(sequence_parallel_group) > 1:
        scores = _sequence_parallel_scores(model, module, layout, packed_ids, logit_at, targets, temperature,
                                           calculate_entropy, backend, sequence_parallel_group)
    else:
        logits = _logits(model, module, layout, packed_ids, layout.position_ids, logit_at, backend)
        scores = _score(logits, targets, temperature, calculate_entropy)
    values = scores.new_zeros(sum(sequence_lens), scores.shape[1]).index_copy(0, rows, scores)
    cu = input_ids.offsets()

    def nested(x):
        return torch.nested.nested_tensor_from_jagged(x.contiguous(), cu)

    return nested(values[:, 0]), (nested(values[:, 1]) if calculate_entropy else None)
