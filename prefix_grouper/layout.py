"""Packed shared-prefix layout of a GRPO batch.

A batch holds B groups. Group b has one prompt (prefix) of ``P_b`` tokens and ``G_b``
completions (suffixes) of ``S_b1 .. S_bG`` tokens. The packed token axis holds, group
after group, ``prefix_b, suffix_b1, ..., suffix_bG``; its length is
``T = sum_b (P_b + sum_i S_bi)``.

Everything here is computed once per batch, from host-side lengths, so that attention
forward and backward never have to synchronize with the device to learn a shape.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch.utils.weak import WeakIdKeyDictionary

from .checks import as_length_list

__all__ = ["GroupLayout", "cached_per_layout", "decode_host_lengths", "encode_host_lengths", "split_by_group"]


def split_by_group(flat: Sequence[Any], group_sizes: Sequence[int]) -> list[tuple[Any, ...]]:
    """``flat`` (one entry per completion, group after group) cut into one tuple per group."""
    out, start = [], 0
    for size in group_sizes:
        out.append(tuple(flat[start:start + size]))
        start += size
    return out


def encode_host_lengths(prefix_lens: Sequence[int], group_sizes: Sequence[int],
                        suffix_lens: Sequence[int]) -> torch.Tensor:
    """The layout as one read-only CPU int64 tensor ``[1 + 2B + N]``: B, the prefix lengths,
    the group sizes, then the completion lengths.

    Ops read it without a device sync, and torch.compile sees one tensor input (never of
    size 0 or 1, so never specialized) instead of specializing on the host ints.
    """
    return torch.tensor([len(prefix_lens), *prefix_lens, *group_sizes, *suffix_lens],
                        dtype=torch.long, device="cpu")


def decode_host_lengths(host_lengths: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """``(prefix_lens [B], group_sizes [B], suffix_lens [N])`` of :func:`encode_host_lengths`'s tensor."""
    if (not isinstance(host_lengths, torch.Tensor) or host_lengths.device.type != "cpu"
            or host_lengths.dtype != torch.int64 or host_lengths.dim() != 1):
        raise ValueError("host_lengths must be a 1-D CPU int64 tensor (GroupLayout.host_lengths)")
    values = host_lengths.tolist()  # a CPU tensor: no device synchronization
    num_groups = values[0] if values else 0
    prefix = tuple(values[1:1 + num_groups])
    sizes = tuple(values[1 + num_groups:1 + 2 * num_groups])
    suffix = tuple(values[1 + 2 * num_groups:])
    if (num_groups < 1 or len(sizes) != num_groups or sum(sizes) != len(suffix)
            or min(prefix) < 1 or min(sizes) < 1 or (suffix and min(suffix) < 0)):
        raise ValueError("host_lengths is not [B, prefix_lens (>= 1) x B, group_sizes (>= 1) x B, "
                         "completion_lens (>= 0) x sum(group_sizes)]; use GroupLayout.host_lengths")
    return prefix, sizes, suffix


# host_lengths tensor -> {key: value}: the one cache of per-layout data (tile schedules,
# masks, plans). Keyed by identity (tensors compare by value); an entry vanishes with its
# tensor, hence with its layout. Ops that receive only host_lengths reach it too.
_PER_LAYOUT: "WeakIdKeyDictionary" = WeakIdKeyDictionary()


def cached_per_layout(host_lengths: torch.Tensor, key: Any, build: Callable[[], Any]) -> Any:
    """Memoize ``build()`` under ``key`` for the layout whose ``host_lengths`` this is."""
    entry = _PER_LAYOUT.get(host_lengths)
    if entry is None:
        entry = _PER_LAYOUT[host_lengths] = {}
    if key not in entry:
        entry[key] = build()
    return entry[key]


class GroupLayout:
    """Lengths and index tensors of a packed ``prefix, suffix_1..suffix_G`` batch.

    Build it with :meth:`from_lengths` or :meth:`from_padded`. Host-side lengths are kept
    as Python tuples (``prefix_lens_list``, ``suffix_lens_list``, ``group_sizes_list``);
    the tensor attributes below live on ``device``:

    ========================  =================  ===============================================
    attribute                 shape, dtype       meaning
    ========================  =================  ===============================================
    ``prefix_lens``           [B] int64          P_b
    ``group_sizes``           [B] int64          G_b (completions of group b)
    ``suffix_lens``           [N] int64          length of every completion, group by group
    ``completion_group``      [N] int64          group of every completion
    ``cu_group_seqlens``      [B+1] int64        packed start of every group, then T
    ``prefix_starts``         [B] int64          packed start of every prefix
    ``suffix_starts``         [N] int64          packed start of every completion
    ``cu_seqlens``            [B+N+1] int64      starts of all segments in packed order, then T
    ``position_ids``          [T] int64          0..P_b-1 on a prefix, P_b.. on every suffix
    ``token_group``           [T] int64          group of every packed token
    ``token_completion``      [T] int64          completion of every token, -1 on prefixes
    ========================  =================  ===============================================

    ``host_lengths`` is the one CPU tensor: int64 ``[1 + 2B + N]`` = B, prefix lengths, group
    sizes, completion lengths, read by the Triton ops without a device synchronization.

    ``N = sum_b G_b``. Prefixes must hold at least one token (the token that predicts the
    first completion token); completions may be empty (they then own no packed token).
    """

    def __init__(
        self,
        prefix_lens: Sequence[int],
        suffix_lens: Sequence[Sequence[int]],
        device: torch.device | str | None = None,
    ) -> None:
        prefix = as_length_list(prefix_lens, "prefix_lens")
        if isinstance(suffix_lens, (int, float, str, bytes)) or not hasattr(suffix_lens, "__len__"):
            raise TypeError(f"suffix_lens must hold one sequence of completion lengths per group, "
                            f"got {type(suffix_lens).__name__}")
        if len(prefix) == 0:
            raise ValueError("prefix_lens is empty: a layout needs at least one group")
        if len(suffix_lens) != len(prefix):
            raise ValueError(
                f"suffix_lens must list one sequence of completion lengths per group: "
                f"got {len(suffix_lens)} entries for {len(prefix)} prefixes"
            )
        groups = [as_length_list(s, f"suffix_lens[{b}]") for b, s in enumerate(suffix_lens)]
        for b, p in enumerate(prefix):
            if p < 1:
                raise ValueError(
                    f"prefix_lens[{b}] = {p}: every prefix needs at least 1 token (its last "
                    f"token predicts the first completion token); prepend a BOS token"
                )
        for b, g in enumerate(groups):
            if len(g) == 0:
                raise ValueError(f"suffix_lens[{b}] is empty: every group needs at least one completion")
            for i, s in enumerate(g):
                if s < 0:
                    raise ValueError(f"suffix_lens[{b}][{i}] = {s}: completion lengths must be >= 0")

        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.prefix_lens_list: tuple[int, ...] = tuple(prefix)
        self.group_sizes_list: tuple[int, ...] = tuple(len(g) for g in groups)
        self.suffix_lens_list: tuple[int, ...] = tuple(s for g in groups for s in g)
        self.num_groups = len(prefix)
        self.num_completions = len(self.suffix_lens_list)
        self.num_completion_tokens = sum(self.suffix_lens_list)
        self.total_tokens = sum(prefix) + self.num_completion_tokens
        self.max_prefix_len = max(prefix)
        self.max_suffix_len = max(self.suffix_lens_list)
        self.max_group_suffix_tokens = max(sum(g) for g in groups)
        self._build_index_tensors(groups)
        # "cuda" and "cuda:0" compare unequal: keep the device the tensors actually report.
        self.device = self.prefix_lens.device

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_lengths(
        cls,
        prefix_lens: Sequence[int],
        suffix_lens: Sequence[Sequence[int]],
        device: torch.device | str | None = None,
    ) -> "GroupLayout":
        """``prefix_lens[b]`` = P_b; ``suffix_lens[b]`` lists group b's completion lengths."""
        return cls(prefix_lens, suffix_lens, device=device)

    @classmethod
    def from_padded(
        cls,
        prompt_mask: torch.Tensor,
        completion_mask: torch.Tensor,
        group_sizes: Sequence[int] | torch.Tensor,
    ) -> "GroupLayout":
        """Layout of what a GRPO loop holds: left-padded prompts and right-padded completions.

        Args:
            prompt_mask: ``[B, Lp]`` bool/int, 1 on real prompt tokens (left padding).
            completion_mask: ``[N, Ls]`` bool/int, 1 on real completion tokens (right
                padding); the completions of a group are consecutive rows.
            group_sizes: ``[B]`` number of completions of each group, summing to N.

        Reads the mask lengths back to the host (a few synchronizations, once per batch).
        """
        for name, mask in (("prompt_mask", prompt_mask), ("completion_mask", completion_mask)):
            if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
                shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
                raise ValueError(f"{name} must be a 2-D tensor, got {shape}")
            if mask.dtype.is_floating_point:
                raise TypeError(f"{name} must be bool or integer, got {mask.dtype}")
        sizes = as_length_list(group_sizes, "group_sizes")
        for b, g in enumerate(sizes):
            if g < 1:
                raise ValueError(f"group_sizes[{b}] = {g}: every group needs at least one completion")
        if len(sizes) != prompt_mask.shape[0]:
            raise ValueError(
                f"group_sizes has {len(sizes)} entries but prompt_mask has {prompt_mask.shape[0]} rows"
            )
        if sum(sizes) != completion_mask.shape[0]:
            raise ValueError(
                f"group_sizes sums to {sum(sizes)} but completion_mask has {completion_mask.shape[0]} rows"
            )
        if completion_mask.device != prompt_mask.device:
            raise ValueError(
                f"prompt_mask is on {prompt_mask.device} but completion_mask on {completion_mask.device}"
            )
        pm, cm = prompt_mask.bool(), completion_mask.bool()
        prompt_counts, completion_counts = pm.sum(1), cm.sum(1)
        # Padding must sit on the promised side, or pack() would pick the wrong tokens.
        prompt_cols = torch.arange(pm.shape[1], device=pm.device)
        completion_cols = torch.arange(cm.shape[1], device=cm.device)
        if not bool((pm == (prompt_cols[None] >= pm.shape[1] - prompt_counts[:, None])).all()):
            raise ValueError("prompt_mask must be left-padded: zeros first, then ones, in every row")
        if not bool((cm == (completion_cols[None] < completion_counts[:, None])).all()):
            raise ValueError("completion_mask must be right-padded: ones first, then zeros, in every row")
        empty_prompts = (prompt_counts == 0).nonzero().flatten().tolist()
        if empty_prompts:
            raise ValueError(f"prompt_mask row {empty_prompts[0]} has no real token: every prompt needs at "
                             f"least 1 (its last token predicts the first completion token)")
        suffix = split_by_group(completion_counts.tolist(), sizes)
        prefix = prompt_counts.tolist()
        return cls(prefix, suffix, device=prompt_mask.device)

    # ------------------------------------------------------------------ index tensors
    def _build_index_tensors(self, groups: list[list[int]]) -> None:
        dev = self.device
        long = dict(dtype=torch.long, device=dev)
        prefix = self.prefix_lens_list
        group_tokens = [p + sum(g) for p, g in zip(prefix, groups)]

        seg_lens: list[int] = []
        for p, g in zip(prefix, groups):
            seg_lens.append(p)
            seg_lens.extend(g)
        cu = [0]
        for n in seg_lens:
            cu.append(cu[-1] + n)
        cu_group = [0]
        for n in group_tokens:
            cu_group.append(cu_group[-1] + n)

        prefix_starts = cu_group[:-1]
        suffix_starts, completion_group, seg = [], [], 0
        for b, g in enumerate(groups):
            seg += 1  # the prefix segment
            for _ in g:
                suffix_starts.append(cu[seg])
                completion_group.append(b)
                seg += 1

        self.prefix_lens = torch.tensor(prefix, **long)
        self.group_sizes = torch.tensor(self.group_sizes_list, **long)
        self.suffix_lens = torch.tensor(self.suffix_lens_list, **long)
        self.completion_group = torch.tensor(completion_group, **long)
        self.cu_group_seqlens = torch.tensor(cu_group, **long)
        self.prefix_starts = torch.tensor(prefix_starts, **long)
        self.suffix_starts = torch.tensor(suffix_starts, **long)
        self.cu_seqlens = torch.tensor(cu, **long)
        self.host_lengths = encode_host_lengths(prefix, self.group_sizes_list, self.suffix_lens_list)

        # Per-token tables, vectorized from the segment tables.
        seg_len_t = torch.tensor(seg_lens, **long)
        seg_id = torch.repeat_interleave(torch.arange(len(seg_lens), **long), seg_len_t,
                                         output_size=self.total_tokens)
        is_prefix_seg = torch.tensor(
            [i == 0 for g in groups for i in range(len(g) + 1)], dtype=torch.bool, device=dev
        )
        seg_group = torch.repeat_interleave(
            torch.arange(self.num_groups, **long), self.group_sizes + 1, output_size=len(seg_lens)
        )
        seg_completion = torch.cumsum((~is_prefix_seg).long(), 0) - 1
        seg_completion = torch.where(is_prefix_seg, torch.full_like(seg_completion, -1), seg_completion)
        seg_pos0 = torch.where(is_prefix_seg, torch.zeros_like(seg_group), self.prefix_lens[seg_group])

        offset_in_seg = torch.arange(self.total_tokens, **long) - self.cu_seqlens[seg_id]
        self.token_group = seg_group[seg_id]
        self.token_completion = seg_completion[seg_id]
        self.position_ids = seg_pos0[seg_id] + offset_in_seg
        self.token_segment = seg_id

        n_ct = self.num_completion_tokens
        completion_of = torch.repeat_interleave(torch.arange(self.num_completions, **long),
                                                self.suffix_lens, output_size=n_ct)
        first_of_completion = torch.cumsum(self.suffix_lens, 0) - self.suffix_lens
        offset_in_completion = torch.arange(n_ct, **long) - first_of_completion[completion_of]
        self._completion_positions = self.suffix_starts[completion_of] + offset_in_completion
        self._completion_padded_index = completion_of * self.max_suffix_len + offset_in_completion
        # The first token of a completion is predicted by its group's last prefix token;
        # any later one by the token right before it.
        first = self.position_ids[self._completion_positions] == self.prefix_lens[
            self.token_group[self._completion_positions]]
        last_prefix = self.prefix_starts + self.prefix_lens - 1
        self._completion_logit_positions = torch.where(
            first,
            last_prefix[self.token_group[self._completion_positions]],
            self._completion_positions - 1,
        )

    # ------------------------------------------------------------------ helpers
    def cached(self, key: Any, build: Callable[[], Any]) -> Any:
        """Memoize per-layout metadata (e.g. a kernel's tile schedule) under ``key``."""
        return cached_per_layout(self.host_lengths, key, build)

    def to(self, device: torch.device | str) -> "GroupLayout":
        """The same layout with its tensors on ``device``."""
        device = torch.empty(0, device=device).device  # resolves "cuda" to "cuda:N"
        if device == self.device:
            return self
        return GroupLayout(self.prefix_lens_list, self.suffix_lens_per_group, device=device)

    @property
    def suffix_lens_per_group(self) -> list[tuple[int, ...]]:
        return split_by_group(self.suffix_lens_list, self.group_sizes_list)

    def naive_tokens(self) -> int:
        """Tokens the naive layout processes: ``sum_b sum_i (P_b + S_bi)``."""
        return sum(
            self.prefix_lens_list[b] * g for b, g in enumerate(self.group_sizes_list)
        ) + self.num_completion_tokens

    def __repr__(self) -> str:
        return (
            f"GroupLayout(groups={self.num_groups}, completions={self.num_completions}, "
            f"tokens={self.total_tokens}, max_prefix={self.max_prefix_len}, "
            f"max_suffix={self.max_suffix_len}, device={self.device})"
        )

    # ------------------------------------------------------------------ packing
    def completion_positions(self) -> torch.Tensor:
        """``[num_completion_tokens]`` packed index of every completion token, in order."""
        return self._completion_positions

    def completion_logit_positions(self) -> torch.Tensor:
        """``[num_completion_tokens]`` packed index whose logits predict each completion token.

        ``log_softmax(logits[completion_logit_positions()])`` gathered at
        ``input_ids[completion_positions()]`` gives the completion log-probs.
        """
        return self._completion_logit_positions

    def pack(self, prompts: Any, completions: Any) -> torch.Tensor:
        """Pack prompts and completions into the ``[T, ...]`` token axis.

        Args:
            prompts: ``[B, Lp, ...]`` left-padded (real tokens at the end of every row),
                or a list of B tensors ``[P_b, ...]``.
            completions: ``[N, Ls, ...]`` right-padded, the completions of a group on
                consecutive rows, or a list of N tensors ``[S_j, ...]``.

        Returns ``[T, ...]``: ``prefix_b, suffix_b1..suffix_bG`` per group (e.g. input ids).
        """
        prompt_rows = self._rows(prompts, "prompts", self.prefix_lens_list, left_padded=True)
        completion_rows = self._rows(completions, "completions", self.suffix_lens_list, left_padded=False)
        if prompt_rows.device != self.device or completion_rows.device != self.device:
            raise ValueError(
                f"prompts and completions must be on the layout's device {self.device}, got "
                f"{prompt_rows.device} and {completion_rows.device}"
            )
        if prompt_rows.shape[2:] != completion_rows.shape[2:] or prompt_rows.dtype != completion_rows.dtype:
            raise ValueError(
                f"prompts and completions must share trailing shape and dtype, got "
                f"{tuple(prompt_rows.shape[2:])}/{prompt_rows.dtype} and "
                f"{tuple(completion_rows.shape[2:])}/{completion_rows.dtype}"
            )
        lp, ls = prompt_rows.shape[1], completion_rows.shape[1]
        is_prefix = self.token_completion < 0
        prompt_col = lp - self.prefix_lens[self.token_group] + self.position_ids
        completion_col = self.position_ids - self.prefix_lens[self.token_group]
        prompt_flat = prompt_rows.reshape(-1, *prompt_rows.shape[2:])
        completion_flat = completion_rows.reshape(-1, *completion_rows.shape[2:])
        src = torch.cat([prompt_flat, completion_flat], 0)
        index = torch.where(
            is_prefix,
            self.token_group * lp + prompt_col,
            prompt_flat.shape[0] + self.token_completion.clamp(min=0) * ls + completion_col,
        )
        return src.index_select(0, index)

    def _rows(self, x: Any, name: str, lens: tuple[int, ...], left_padded: bool) -> torch.Tensor:
        if isinstance(x, (list, tuple)):
            if len(x) != len(lens):
                raise ValueError(f"{name}: expected {len(lens)} tensors, got {len(x)}")
            for i, (t, n) in enumerate(zip(x, lens)):
                if not isinstance(t, torch.Tensor) or t.dim() < 1 or t.shape[0] != n:
                    shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                    raise ValueError(f"{name}[{i}]: expected a tensor with {n} rows, got {shape}")
            width = max(lens)
            out = x[0].new_zeros((len(lens), width, *x[0].shape[1:]))
            for i, (t, n) in enumerate(zip(x, lens)):
                if left_padded:
                    out[i, width - n:] = t
                else:
                    out[i, :n] = t
            return out
        if not isinstance(x, torch.Tensor) or x.dim() < 2:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{name} must be a padded [rows, length, ...] tensor or a list of tensors, got {shape}")
        if x.shape[0] != len(lens):
            raise ValueError(f"{name} has {x.shape[0]} rows, the layout has {len(lens)}")
        if x.shape[1] < max(lens):
            raise ValueError(f"{name} has length {x.shape[1]} but the layout needs {max(lens)}")
        return x

    def unpack_completions(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-completion padded view of per-token values.

        Args:
            x: ``[T, ...]`` values on the packed axis, or ``[num_completion_tokens, ...]``
                values of the completion tokens only (e.g. log-probs).

        Returns ``(values [N, max_S, ...], mask [N, max_S] bool)``, zeros where padded.
        """
        if not isinstance(x, torch.Tensor) or x.dim() == 0:
            raise TypeError(f"x must be a tensor with a leading token dim, got "
                            f"{type(x).__name__ if not isinstance(x, torch.Tensor) else 'a 0-d tensor'}")
        if x.shape[0] == self.total_tokens:
            x = x.index_select(0, self._completion_positions.to(x.device))
        elif x.shape[0] != self.num_completion_tokens:
            raise ValueError(
                f"x must have T={self.total_tokens} or num_completion_tokens="
                f"{self.num_completion_tokens} rows, got shape {tuple(x.shape)}"
            )
        cols = torch.arange(self.max_suffix_len, device=self.device)
        mask = cols[None, :] < self.suffix_lens[:, None]
        out = x.new_zeros((self.num_completions * self.max_suffix_len, *x.shape[1:]))
        out = out.index_copy(0, self._completion_padded_index.to(x.device), x)
        return out.view(self.num_completions, self.max_suffix_len, *x.shape[1:]), mask.to(x.device)
