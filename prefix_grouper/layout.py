"""Packed shared-prefix layout of a GRPO batch.

A batch holds B groups. Group b has one prompt (prefix) of ``P_b`` tokens and ``G_b``
completions (suffixes) of ``S_b1 .. S_bG`` tokens. The packed token axis holds, group
after group, ``prefix_b, suffix_b1, ..., suffix_bG``; its length is
``T = sum_b (P_b + sum_i S_bi)``.

Vocabulary: the layout and attention say *prefix* and *suffix* (``prefix_lens``,
``suffix_lens``: lengths on the packed axis); functions that take model inputs say
*prompt* and *completion* (``prompt_ids``, ``completion_mask``). A group's prefix is its
prompt, suffix ``i`` its completion ``i``.

Everything here is computed once per batch, from host-side lengths, so that attention
forward and backward never have to synchronize with the device to learn a shape.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

from collections.abc import Mapping, Set

import torch
from torch.utils.weak import WeakIdKeyDictionary

from .checks import MAX_LENGTH, as_length_list, check_float_tensor

__all__ = [
    "GroupLayout",
    "broadcast_to_padded",
    "broadcast_to_tokens",
    "cached_per_layout",
    "decode_host_lengths",
    "encode_host_lengths",
    "split_by_group",
]


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

    Prefix = prompt, suffix = completion (see the module docstring for the vocabulary).
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
    ``first_completion``      [B] int64          index of every group's first completion
    ``cu_group_seqlens``      [B+1] int64        packed start of every group, then T
    ``prefix_starts``         [B] int64          packed start of every prefix
    ``suffix_starts``         [N] int64          packed start of every completion
    ``cu_seqlens``            [B+N+1] int64      starts of all segments in packed order, then T
    ``position_ids``          [T] int64          0..P_b-1 on a prefix, P_b.. on every suffix
    ``token_group``           [T] int64          group of every packed token
    ``token_completion``      [T] int64          completion of every token, -1 on prefixes
    ========================  =================  ===============================================

    ``host_lengths`` is the one CPU tensor: the lengths as :func:`encode_host_lengths` encodes
    them (:func:`decode_host_lengths` reads them back), for ops that must not synchronize.

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
        if isinstance(suffix_lens, (Set, Mapping)):
            # A set has no group order to line up with prefix_lens (and drops repeats).
            raise TypeError(f"suffix_lens must be an ordered sequence (one entry per group), "
                            f"got a {type(suffix_lens).__name__}")
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
        total = sum(prefix) + sum(sum(g) for g in groups)
        if total > MAX_LENGTH:
            raise ValueError(f"the layout packs {total} tokens, more than any packable length ({MAX_LENGTH}); "
                             f"split the batch")

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
        group_sizes: Sequence[int] | torch.Tensor | None = None,
        *,
        prompt_ids: torch.Tensor | None = None,
    ) -> "GroupLayout":
        """Layout of what a GRPO loop holds: left-padded prompts and right-padded completions.

        Args:
            prompt_mask: bool/int, 1 on real prompt tokens (left padding): ``[B, Lp]``, one
                row per group, or ``[N, Lp]``, one row per completion as TRL and verl hold a
                batch (a group's prompt repeated on its consecutive rows).
            completion_mask: ``[N, Ls]`` bool/int, 1 on real completion tokens (right
                padding); the completions of a group are consecutive rows.
            group_sizes: ``[B]`` number of completions of each group, summing to N. May be
                omitted when ``prompt_mask`` has N rows and ``prompt_ids`` is given:
                consecutive rows holding identical prompts then form a group.
            prompt_ids: ``[rows of prompt_mask, Lp]`` integer prompt tokens (read only under
                the mask). With N rows, rows given as one group must hold identical prompts.

        Reads the mask lengths back to the host (a few synchronizations, once per batch).
        """
        for name, mask in (("prompt_mask", prompt_mask), ("completion_mask", completion_mask)):
            if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
                shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
                raise ValueError(f"{name} must be a 2-D tensor, got {shape}")
            if mask.dtype.is_floating_point:
                raise TypeError(f"{name} must be bool or integer, got {mask.dtype}")
        if completion_mask.device != prompt_mask.device:
            raise ValueError(
                f"prompt_mask is on {prompt_mask.device} but completion_mask on {completion_mask.device}"
            )
        if prompt_ids is not None:
            if (not isinstance(prompt_ids, torch.Tensor) or prompt_ids.dtype.is_floating_point
                    or prompt_ids.dtype.is_complex or prompt_ids.dtype == torch.bool):
                kind = prompt_ids.dtype if isinstance(prompt_ids, torch.Tensor) else type(prompt_ids).__name__
                raise TypeError(f"prompt_ids must be an integer tensor, got {kind}")
            if prompt_ids.shape != prompt_mask.shape or prompt_ids.device != prompt_mask.device:
                raise ValueError(f"prompt_ids must match prompt_mask's shape {tuple(prompt_mask.shape)} and device "
                                 f"{prompt_mask.device}, got {tuple(prompt_ids.shape)} on {prompt_ids.device}")
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

        rows, num_completions = pm.shape[0], cm.shape[0]

        def same_prompt(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            """``[len(a)]`` bool: prompt rows ``a`` and ``b`` hold the same prompt."""
            same = (pm[a] == pm[b]).all(1)
            if prompt_ids is not None:
                same &= ((prompt_ids[a] == prompt_ids[b]) | ~pm[a]).all(1)
            return same

        if group_sizes is None:
            if rows != num_completions:
                raise ValueError(f"group_sizes is required unless prompt_mask has one row per completion: it has "
                                 f"{rows} rows, completion_mask {num_completions}")
            if prompt_ids is None:
                raise ValueError(f"prompt_mask has one row per completion (N={num_completions}) and no group_sizes: "
                                 f"pass prompt_ids (consecutive rows with identical prompts form a group) or "
                                 f"group_sizes")
            index = torch.arange(rows, device=pm.device)
            new_group = torch.ones(rows, dtype=torch.bool, device=pm.device)
            new_group[1:] = ~same_prompt(index[1:], index[:-1])
            starts = new_group.nonzero().flatten().tolist() + [rows]
            sizes = [b - a for a, b in zip(starts[:-1], starts[1:])]
        else:
            sizes = as_length_list(group_sizes, "group_sizes")
            for b, g in enumerate(sizes):
                if g < 1:
                    raise ValueError(f"group_sizes[{b}] = {g}: every group needs at least one completion")
            if sum(sizes) != num_completions:
                raise ValueError(
                    f"group_sizes sums to {sum(sizes)} but completion_mask has {num_completions} rows"
                )
            if rows not in (len(sizes), num_completions):
                raise ValueError(f"prompt_mask has {rows} rows: expected one per group (group_sizes has "
                                 f"{len(sizes)} entries) or one per completion ({num_completions})")
        if rows == num_completions and len(sizes) != rows:
            # One row per completion: every group's rows must repeat its first row.
            size_t = torch.tensor(sizes, device=pm.device)
            first = torch.repeat_interleave(torch.cumsum(size_t, 0) - size_t, size_t, output_size=rows)
            differs = (~same_prompt(torch.arange(rows, device=pm.device), first)).nonzero().flatten().tolist()
            if differs:
                r = differs[0]
                what = "different prompts" if prompt_ids is not None else "prompts of different lengths"
                raise ValueError(f"prompt rows {int(first[r])} and {r} are given as one group but hold {what}")
            prompt_counts = prompt_counts[torch.cumsum(size_t, 0) - size_t]
        suffix = split_by_group(completion_counts.tolist(), sizes)
        return cls(prompt_counts.tolist(), suffix, device=prompt_mask.device)

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
        self.first_completion = torch.cumsum(self.group_sizes, 0) - self.group_sizes
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

    def unpacked_tokens(self) -> int:
        """Tokens the unpacked rows hold (:mod:`prefix_grouper.unpacked`): ``sum_b sum_i (P_b + S_bi)``."""
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
    def completion_mask(self) -> torch.Tensor:
        """``[N, max_S]`` bool: True on the real tokens of every right-padded completion row."""
        columns = torch.arange(self.max_suffix_len, device=self.device)
        return columns[None, :] < self.suffix_lens[:, None]

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
                or a list of B tensors ``[P_b, ...]``; or the same with one row per
                completion (``[N, Lp, ...]`` or N tensors, as TRL and verl hold prompts),
                whose rows within a group must be identical (the first one is used;
                checking it reads one flag back from the device).
            completions: ``[N, Ls, ...]`` right-padded, the completions of a group on
                consecutive rows, or a list of N tensors ``[S_j, ...]``.

        Returns ``[T, ...]``: ``prefix_b, suffix_b1..suffix_bG`` per group (e.g. input ids).
        """
        prompt_rows = self._prompt_rows(prompts)
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

    def _prompt_rows(self, prompts: Any) -> torch.Tensor:
        """``[B, Lp, ...]`` left-padded prompt rows from one row per group or per completion."""
        count = len(prompts) if isinstance(prompts, (list, tuple)) else getattr(prompts, "shape", (None,))[0]
        if count == self.num_groups or count != self.num_completions:
            return self._rows(prompts, "prompts", self.prefix_lens_list, left_padded=True)
        per_completion = tuple(self.prefix_lens_list[b] for b in self.completion_group.tolist())
        rows = self._rows(prompts, "prompts", per_completion, left_padded=True)
        width = rows.shape[1]
        first = self.first_completion[self.completion_group].to(rows.device)
        in_prompt = (torch.arange(width, device=rows.device)[None]
                     >= width - self.prefix_lens[self.completion_group].to(rows.device)[:, None])
        differs = (rows != rows[first]).reshape(*rows.shape[:2], -1).any(-1) & in_prompt
        bad = differs.any(1).nonzero().flatten().tolist()
        if bad:
            raise ValueError(f"prompts: rows {int(first[bad[0]])} and {bad[0]} belong to group "
                             f"{int(self.completion_group[bad[0]])} but hold different prompts")
        return rows[self.first_completion.to(rows.device)]

    def _rows(self, x: Any, name: str, lens: tuple[int, ...], left_padded: bool) -> torch.Tensor:
        if isinstance(x, (list, tuple)):
            if len(x) != len(lens):
                raise ValueError(f"{name}: expected {len(lens)} tensors, got {len(x)}")
            for i, (t, n) in enumerate(zip(x, lens)):
                if not isinstance(t, torch.Tensor) or t.dim() < 1 or t.shape[0] != n:
                    shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                    raise ValueError(f"{name}[{i}]: expected a tensor with {n} rows, got {shape}")
                if t.dtype != x[0].dtype or t.device != x[0].device or t.shape[1:] != x[0].shape[1:]:
                    raise ValueError(f"{name}[{i}] is a {tuple(t.shape)} {t.dtype} tensor on {t.device} but "
                                     f"{name}[0] a {tuple(x[0].shape)} {x[0].dtype} one on {x[0].device}: "
                                     f"the tensors must share dtype, device and trailing shape")
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
            expected = (f"{self.num_groups} (one per group) or {self.num_completions} (one per completion)"
                        if name == "prompts" else str(len(lens)))
            raise ValueError(f"{name} has {x.shape[0]} rows, the layout needs {expected}")
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
        mask = self.completion_mask()
        out = x.new_zeros((self.num_completions * self.max_suffix_len, *x.shape[1:]))
        out = out.index_copy(0, self._completion_padded_index.to(x.device), x)
        return out.view(self.num_completions, self.max_suffix_len, *x.shape[1:]), mask.to(x.device)


# ---------------------------------------------------------------------- broadcasting
def _check_values(values: torch.Tensor, num_completions: int, device: torch.device) -> None:
    check_float_tensor(values, "values", 1)
    if values.shape[0] != num_completions:
        raise ValueError(f"values has {values.shape[0]} entries but there are {num_completions} completions")
    if values.device != device:
        raise ValueError(f"values is on {values.device} but the layout / mask is on {device}")


def broadcast_to_tokens(values: torch.Tensor, layout: GroupLayout) -> torch.Tensor:
    """``[T]``: every completion token of ``layout`` gets its completion's value, prefixes 0.

    Args:
        values: ``[N]`` one value per completion, in the layout's completion order.
        layout: the packed batch (``layout.token_completion`` maps tokens to completions).
    """
    if not isinstance(layout, GroupLayout):
        raise TypeError(f"layout must be a GroupLayout, got {type(layout).__name__}; for padded rows "
                        f"use broadcast_to_padded")
    _check_values(values, layout.num_completions, layout.device)
    completion = layout.token_completion
    return torch.where(completion >= 0, values.index_select(0, completion.clamp(min=0)), 0.0).to(values.dtype)


def broadcast_to_padded(
    values: torch.Tensor, target: GroupLayout | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-completion values on padded completion rows.

    Args:
        values: ``[N]`` one value per completion.
        target: a :class:`GroupLayout` (rows ``[N, max_S]``) or a right-padded
            ``completion_mask [N, L]`` (bool or 0/1), 1 on real tokens.

    Returns ``(padded [N, S], mask [N, S] bool)``; ``padded`` is 0 where ``mask`` is False.
    """
    if isinstance(target, GroupLayout):
        mask = target.completion_mask()
    elif isinstance(target, torch.Tensor) and target.dim() == 2 and not target.dtype.is_floating_point:
        mask = target.bool()
    else:
        shape = tuple(target.shape) if isinstance(target, torch.Tensor) else type(target).__name__
        raise TypeError(f"target must be a GroupLayout or a bool/int completion_mask [N, L], got {shape}")
    _check_values(values, mask.shape[0], mask.device)
    return torch.where(mask, values[:, None], 0.0).to(values.dtype), mask
