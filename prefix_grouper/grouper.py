"""``PrefixGrouper``: the public API of the paper's package (PyPI ``prefix-grouper`` 0.0.1.post1).

Code written for that package (``from prefix_grouper import PrefixGrouper``, verl's
``prefix_grouper_utils``, ROLL, agent-lightning) runs unchanged on this one. A batch holds
one row per group, ``prefix, suffix_1, ..., suffix_G`` with no gap between them (compact,
padded left or right, or placed by a custom ``padding_mode`` mask). The paper's
``forward`` calls the user's attention twice and copies the prefix K/V once per suffix;
this one gathers the valid tokens into one packed row and runs
:func:`prefix_grouper.prefix_attention` on it once, under a :class:`GroupLayout` built once
per instance and device.

Vocabulary: the paper says *prefix* / *suffix* for prompt / completion, and *sample* for a
group. Masks are bool tensors on the ``device`` given at construction; every op works on
its input's device.
"""
from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import torch

from .checks import as_length_list
from .forward import AttentionForward
from .layout import GroupLayout
from .utils import batch_repeat_cat

__all__ = ["GroupInfo", "Info", "PrefixGrouper"]

PADDING_MODES = ("left", "right")


class Info(Sequence):
    """One group: ``prefix_len`` tokens of prompt and ``suffix_lens``, one length per completion.

    Indexes like the list ``[prefix_len, *suffix_lens]`` it was built from.
    """

    def __init__(self, prefix_len: int, suffix_lens: Sequence[int]) -> None:
        self.prefix_len = int(prefix_len)
        self.suffix_lens = list(suffix_lens)

    @property
    def num_samples(self) -> int:
        return len(self.suffix_lens)

    @property
    def total_len(self) -> int:
        return self.prefix_len + sum(self.suffix_lens)

    def __getitem__(self, index):
        return [self.prefix_len, *self.suffix_lens][index]

    def __len__(self) -> int:
        return 1 + len(self.suffix_lens)

    def __repr__(self) -> str:
        return f"Info(prefix_len={self.prefix_len}, suffix_lens={self.suffix_lens})"


class GroupInfo(Sequence):
    """The groups of a batch, one :class:`Info` each, in row order."""

    def __init__(self, info_list: Sequence[Info]) -> None:
        self.info_list = list(info_list)

    @property
    def batch_size(self) -> int:
        return len(self.info_list)

    def __getitem__(self, index):
        return self.info_list[index]

    def __len__(self) -> int:
        return len(self.info_list)

    def __repr__(self) -> str:
        return repr(self.info_list)


def _lengths_mask(lengths: torch.Tensor, width: int, padding_mode: str) -> torch.Tensor:
    """``[len(lengths), width]`` bool: ``lengths[r]`` True entries per row, right- or left-aligned."""
    columns = torch.arange(width, device=lengths.device)[None]
    if padding_mode == "right":
        return columns < lengths[:, None]
    return columns >= width - lengths[:, None]


def _padding_mask(padding_mode: Any, lengths: torch.Tensor, device) -> torch.Tensor:
    """The ``[rows, L]`` mask of rows holding ``lengths`` valid tokens under ``padding_mode``."""
    if isinstance(padding_mode, torch.Tensor):
        if padding_mode.dim() != 2 or padding_mode.shape[0] != lengths.shape[0]:
            raise ValueError(f"padding_mode as a mask must have shape [{lengths.shape[0]}, seq_len], "
                             f"got {tuple(padding_mode.shape)}")
        mask = padding_mode.to(device) != 0
        counts = mask.sum(1)
        if not torch.equal(counts.cpu(), lengths.cpu()):
            raise ValueError(f"padding_mode mask holds {counts.tolist()} valid tokens per row, the groups need "
                             f"{lengths.tolist()}")
        return mask
    if not isinstance(padding_mode, str) or padding_mode not in PADDING_MODES:
        raise ValueError(f"padding_mode must be 'left', 'right' or a [rows, seq_len] bool mask, got {padding_mode!r}")
    width = int(lengths.max()) if lengths.numel() else 0
    return _lengths_mask(lengths.to(device), width, padding_mode)


def _flat_index(mask: torch.Tensor) -> torch.Tensor:
    """Row-major flat positions of the True entries of ``mask``."""
    return mask.reshape(-1).nonzero().reshape(-1)


def _gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x [rows, L, ...]`` -> ``[len(index), ...]``: the tokens at flat positions ``index``."""
    return x.reshape(-1, *x.shape[2:]).index_select(0, index.to(x.device))


def _place(tokens: torch.Tensor, index: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """``[shape..., ...]`` zeros with ``tokens`` written at flat positions ``index`` (differentiable)."""
    out = tokens.new_zeros((shape[0] * shape[1], *tokens.shape[1:]))
    return out.index_copy(0, index.to(tokens.device), tokens).view(*shape, *tokens.shape[1:])


def _as_mask(mask: Any, name: str, rows: int | None = None) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        raise ValueError(f"{name} must be a 2-D [rows, seq_len] tensor, got "
                         f"{tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__}")
    if rows is not None and mask.shape[0] != rows:
        raise ValueError(f"{name} must have {rows} rows, got {mask.shape[0]}")
    return mask != 0


class PrefixGrouper:
    """Groups in the paper's row format, with :func:`prefix_attention` behind :meth:`forward`.

    Args:
        group_info: one list ``[prefix_len, suffix_len_1, ...]`` per group, or None to call
            :meth:`init` later.
        device: where the masks and index tensors are built (ops follow their inputs).
        padding_mode: ``"right"`` / ``"left"`` (compact rows, padding after / before), or
            a ``[groups, seq_len]`` bool mask placing every row's valid tokens.
        backend: the :func:`prefix_attention` backend of :meth:`forward` (not in the
            paper's API; keyword only).
    """

    def __init__(self, group_info: Sequence[Sequence[int]] | None = None, device=None,
                 padding_mode: str | torch.Tensor = "right", *, backend: str = "auto") -> None:
        self.backend = backend
        if group_info is not None:
            self.init(group_info, device, padding_mode)

    def init(self, group_info: Sequence[Sequence[int]], device=None,
             padding_mode: str | torch.Tensor = "right") -> None:
        """Set the groups (see the class docstring); every cached layout is dropped."""
        if isinstance(group_info, (str, bytes)) or not isinstance(group_info, Sequence) or len(group_info) == 0:
            raise ValueError(f"group_info must be a non-empty list of [prefix_len, suffix_len_1, ...] lists, "
                             f"got {group_info!r}")
        entries = []
        for b, group in enumerate(group_info):
            lengths = as_length_list(group, f"group_info[{b}]")
            if len(lengths) < 2:
                raise ValueError(f"group_info[{b}] = {list(lengths)}: a group needs its prefix length and at "
                                 f"least one suffix length")
            if min(lengths) < 0:
                raise ValueError(f"group_info[{b}] = {list(lengths)}: lengths must be >= 0")
            entries.append(Info(lengths[0], lengths[1:]))
        self.group_info = GroupInfo(entries)
        self._build_masks(torch.device(device) if device is not None else torch.device("cpu"), padding_mode)
        self._layouts: dict[torch.device, tuple[GroupLayout, torch.Tensor]] = {}
        # concat_input() followed by split_output() of a float output (logits, hidden states)
        # with no forward() in between: the model's attention never saw the groups, its
        # suffixes attended to each other.
        self._inputs_concatenated = False
        self._attention_calls = 0
        if "transformers.modeling_utils" in sys.modules:
            # Before the model call that passes this grouper: make "eager" honor prefix_grouper=.
            from .models.attention import route_eager_attention

            route_eager_attention()

    @classmethod
    def from_ungrouped_masks(cls, prefix_mask: torch.Tensor, suffix_mask: torch.Tensor,
                             group_sizes: int | Sequence[int], device=None,
                             padding_mode: str | torch.Tensor = "right", *, backend: str = "auto") -> "PrefixGrouper":
        """Groups read from masks: ``prefix_mask [groups, Lp]`` (one row per prompt) and
        ``suffix_mask [completions, Ls]``, completions of a group on consecutive rows;
        ``group_sizes`` an int (every group) or one int per group."""
        prefix = _as_mask(prefix_mask, "prefix_mask")
        suffix = _as_mask(suffix_mask, "suffix_mask")
        if isinstance(group_sizes, bool):
            raise TypeError("group_sizes must be an int or a list of ints, got a bool")
        if isinstance(group_sizes, int):
            sizes = [group_sizes] * prefix.shape[0]
        else:
            sizes = as_length_list(group_sizes, "group_sizes")
            if len(sizes) != prefix.shape[0]:
                raise ValueError(f"group_sizes has {len(sizes)} entries but prefix_mask {prefix.shape[0]} rows")
        if min(sizes, default=0) < 1:
            raise ValueError(f"group_sizes must be >= 1, got {group_sizes!r}")
        if sum(sizes) != suffix.shape[0]:
            raise ValueError(f"group_sizes sums to {sum(sizes)} but suffix_mask has {suffix.shape[0]} rows")
        prefix_lens = prefix.sum(1).tolist()
        suffix_lens = suffix.sum(1).tolist()
        groups, start = [], 0
        for p, g in zip(prefix_lens, sizes):
            groups.append([p, *suffix_lens[start:start + g]])
            start += g
        return cls(groups, device=device, padding_mode=padding_mode, backend=backend)

    # ------------------------------------------------------------------ masks
    def _build_masks(self, device: torch.device, padding_mode) -> None:
        infos = self.group_info.info_list
        long = dict(dtype=torch.long, device=device)
        self.prefix_lens = torch.tensor([i.prefix_len for i in infos], **long)
        self.grouped_suffix_lens = torch.tensor([sum(i.suffix_lens) for i in infos], **long)
        self.ungrouped_suffix_lens = torch.tensor([s for i in infos for s in i.suffix_lens], **long)
        self.num_samples = torch.tensor([i.num_samples for i in infos], **long)
        self.total_lens = self.prefix_lens + self.grouped_suffix_lens
        self.padding_mask = _padding_mask(padding_mode, self.total_lens, device)
        # Rank of every token among its row's valid tokens: prefix first, then the suffixes.
        rank = self.padding_mask.long().cumsum(1) - 1
        valid = self.padding_mask
        self.grouped_prefix_mask = valid & (rank < self.prefix_lens[:, None])
        self.grouped_suffix_mask = valid & (rank >= self.prefix_lens[:, None])
        # Split out, prefixes are left-padded and suffixes right-padded: with the last
        # prefix token next to the first suffix token, include_prefix_last is a concatenation.
        max_prefix = int(self.prefix_lens.max())
        max_suffix = int(self.ungrouped_suffix_lens.max()) if self.ungrouped_suffix_lens.numel() else 0
        self.ungrouped_prefix_mask = _lengths_mask(self.prefix_lens, max_prefix, "left")
        self.ungrouped_suffix_mask = _lengths_mask(self.ungrouped_suffix_lens, max_suffix, "right")
        self.prefix_attn_mask = self.ungrouped_prefix_mask
        self.suffix_attn_mask = self.batch_repeat_cat(self.ungrouped_prefix_mask, self.ungrouped_suffix_mask, 1)
        self.grouped_prefix_indices = self.grouped_prefix_mask.nonzero()
        self.grouped_suffix_indices = self.grouped_suffix_mask.nonzero()
        self.ungrouped_prefix_indices = self.ungrouped_prefix_mask.nonzero()
        self.ungrouped_suffix_indices = self.ungrouped_suffix_mask.nonzero()
        self.x_shape = self.padding_mask.shape
        self.prefix_x_shape = self.ungrouped_prefix_mask.shape
        self.suffix_x_shape = self.ungrouped_suffix_mask.shape
        self._flat = {name: _flat_index(getattr(self, name + "_mask")) for name in
                      ("padding", "grouped_prefix", "grouped_suffix", "ungrouped_prefix", "ungrouped_suffix")}

    def _index(self, name: str, device) -> torch.Tensor:
        return self._flat[name].to(device)

    def _require_init(self) -> None:
        if not hasattr(self, "group_info"):
            raise RuntimeError("PrefixGrouper has no groups yet: pass group_info or call init(group_info)")

    def _check_rows(self, x: Any, name: str, shape: tuple[int, ...]) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() < 2 or tuple(x.shape[:2]) != tuple(shape):
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{name} must have shape [{shape[0]}, {shape[1]}, ...], got {got}")

    # ------------------------------------------------------------------ the packed layout
    def layout(self, device=None) -> GroupLayout:
        """The :class:`GroupLayout` of the valid tokens (row after row), built once per device."""
        return self.layout_and_index(torch.device(device) if device is not None else self.padding_mask.device)[0]

    def record_attention_call(self) -> None:  # by AttentionForward, once per layer it runs
        self._attention_calls += 1

    def layout_and_index(self, device: torch.device) -> tuple[GroupLayout, torch.Tensor]:
        """``(layout, index [T])``: the valid tokens' layout and rows in ``[b * seq]``, once per device."""
        self._require_init()
        device = torch.empty(0, device=device).device  # "cuda" -> "cuda:N", one cache entry
        if device not in self._layouts:
            infos = self.group_info.info_list
            empty = [b for b, i in enumerate(infos) if i.prefix_len < 1]
            if empty:
                raise ValueError(f"group_info[{empty[0]}] has prefix_len 0: prefix attention needs at least one "
                                 f"prefix token per group (its last token predicts the first suffix token)")
            layout = GroupLayout.from_lengths([i.prefix_len for i in infos], [i.suffix_lens for i in infos], device=device)
            self._layouts[device] = (layout, self._index("padding", device))
        return self._layouts[device]

    # ------------------------------------------------------------------ data in and out
    def concat_input(self, prefix: torch.Tensor, prefix_mask: torch.Tensor, suffix: torch.Tensor,
                     suffix_mask: torch.Tensor) -> torch.Tensor:
        """``prefix [groups, Lp, ...]`` and ``suffix [completions, Ls, ...]`` (ids or features;
        the valid tokens are where the masks are nonzero, in order) -> ``[groups, L, ...]``
        rows ``prefix, suffix_1, ...`` placed by ``padding_mask``. Differentiable."""
        self._require_init()
        p_mask = _as_mask(prefix_mask, "prefix_mask", self.group_info.batch_size)
        s_mask = _as_mask(suffix_mask, "suffix_mask", len(self.ungrouped_suffix_lens))
        self._check_rows(prefix, "prefix", tuple(p_mask.shape))
        self._check_rows(suffix, "suffix", tuple(s_mask.shape))
        if prefix.shape[2:] != suffix.shape[2:] or prefix.dtype != suffix.dtype:
            raise ValueError(f"prefix and suffix must share trailing shape and dtype, got {tuple(prefix.shape)} "
                             f"{prefix.dtype} and {tuple(suffix.shape)} {suffix.dtype}")
        for name, mask, lens in (("prefix_mask", p_mask, self.prefix_lens),
                                 ("suffix_mask", s_mask, self.ungrouped_suffix_lens)):
            counts = mask.sum(1).cpu()
            if not torch.equal(counts, lens.cpu()):
                raise ValueError(f"{name} holds {counts.tolist()} tokens per row, group_info says {lens.tolist()}")
        device = prefix.device
        prefix_tokens = _gather(prefix, _flat_index(p_mask).to(device))
        suffix_tokens = _gather(suffix, _flat_index(s_mask).to(device))
        rows = prefix_tokens.new_zeros((self.x_shape[0] * self.x_shape[1], *prefix.shape[2:]))
        rows = rows.index_copy(0, self._index("grouped_prefix", device), prefix_tokens)
        rows = rows.index_copy(0, self._index("grouped_suffix", device), suffix_tokens)
        self._inputs_concatenated = True
        self._attention_calls = 0
        return rows.view(*self.x_shape, *prefix.shape[2:])

    def split_output(self, output: torch.Tensor, include_prefix_last: int = 0):
        """``output [groups, L, ...]`` -> ``(prefix_output [groups, Lp, ...] left-padded,
        prefix_mask, suffix_output [completions, Ls, ...] right-padded, suffix_mask)``.

        ``include_prefix_last=k`` moves every prefix's last ``k`` positions (padding
        included when a prefix is shorter) to the front of each of its suffixes: with
        ``k=1`` the suffix outputs hold the logits that predict every suffix token.
        """
        self._require_init()
        if isinstance(include_prefix_last, bool) or not isinstance(include_prefix_last, int) \
                or include_prefix_last < 0:
            raise ValueError(f"include_prefix_last must be an int >= 0, got {include_prefix_last!r}")
        self._check_rows(output, "output", tuple(self.x_shape))
        if self._inputs_concatenated and self._attention_calls == 0 and output.is_floating_point():
            raise RuntimeError(
                "split_output() after concat_input() but no attention layer ran PrefixGrouper.forward: the model "
                "ignored prefix_grouper= (e.g. an attention implementation that drops unknown keywords), its "
                "suffixes attended to each other, and these outputs are wrong. Use an attention implementation "
                "that calls prefix_grouper.forward (register_attention(), or verl's apply_prefix_grouper_patch)")
        device = output.device
        prefix_out = _place(_gather(output, self._index("grouped_prefix", device)),
                            self._index("ungrouped_prefix", device), tuple(self.prefix_x_shape))
        suffix_out = _place(_gather(output, self._index("grouped_suffix", device)),
                            self._index("ungrouped_suffix", device), tuple(self.suffix_x_shape))
        prefix_mask, suffix_mask = self.ungrouped_prefix_mask, self.ungrouped_suffix_mask
        k = include_prefix_last
        if k > 0:
            suffix_out = self.batch_repeat_cat(prefix_out[:, prefix_out.shape[1] - k:], suffix_out, 1)
            suffix_mask = self.batch_repeat_cat(prefix_mask[:, prefix_mask.shape[1] - k:], suffix_mask, 1)
            prefix_out, prefix_mask = prefix_out[:, :prefix_out.shape[1] - k], prefix_mask[:, :prefix_mask.shape[1] - k]
        return prefix_out, prefix_mask, suffix_out, suffix_mask

    @staticmethod
    def convert_padding(x: torch.Tensor, x_mask: torch.Tensor, padding_mode: str | torch.Tensor = "right"):
        """``x [rows, L, ...]`` with valid tokens where ``x_mask`` is nonzero -> ``[rows,
        max valid, ...]`` with them packed left (``"right"`` padding), right (``"left"``), or
        where a ``padding_mode`` mask says. Differentiable."""
        mask = _as_mask(x_mask, "x_mask")
        if not isinstance(x, torch.Tensor) or x.dim() < 2 or tuple(x.shape[:2]) != tuple(mask.shape):
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must have shape [{mask.shape[0]}, {mask.shape[1]}, ...] like x_mask, got {got}")
        target = _padding_mask(padding_mode, mask.sum(1), x.device)
        tokens = _gather(x, _flat_index(mask).to(x.device))
        return _place(tokens, _flat_index(target), tuple(target.shape))

    # ------------------------------------------------------------------ the paper's split attention
    def ungroup(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """``[groups, heads, L, D]`` q, k, v -> ``(q_prefix, k_prefix, v_prefix, q_suffix,
        k_suffix, v_suffix)``: prefixes ``[groups, heads, Lp, D]`` left-padded, suffixes
        ``[completions, heads, Ls, D]`` right-padded."""
        self._require_init()
        for name, x in (("q", q), ("k", k), ("v", v)):
            if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[0] != self.x_shape[0] \
                    or x.shape[2] != self.x_shape[1]:
                got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
                raise ValueError(f"{name} must have shape [{self.x_shape[0]}, heads, {self.x_shape[1]}, head_dim], "
                                 f"got {got}")
        out = []
        for source, target, shape in (("grouped_prefix", "ungrouped_prefix", self.prefix_x_shape),
                                      ("grouped_suffix", "ungrouped_suffix", self.suffix_x_shape)):
            for x in (q, k, v):
                rows = x.transpose(1, 2)
                part = _place(_gather(rows, self._index(source, x.device)), self._index(target, x.device),
                              tuple(shape))
                out.append(part.transpose(1, 2))
        return tuple(out)

    def group(self, o_prefix: torch.Tensor, o_suffix: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`ungroup` for outputs: ``o_prefix [groups, Lp, heads, D]`` and
        ``o_suffix [completions, Ls, heads, D]`` -> ``[groups, L, heads, D]``."""
        self._require_init()
        self._check_rows(o_prefix, "o_prefix", tuple(self.prefix_x_shape))
        self._check_rows(o_suffix, "o_suffix", tuple(self.suffix_x_shape))
        device = o_prefix.device
        rows = o_prefix.new_zeros((self.x_shape[0] * self.x_shape[1], *o_prefix.shape[2:]))
        rows = rows.index_copy(0, self._index("grouped_prefix", device),
                               _gather(o_prefix, self._index("ungrouped_prefix", device)))
        rows = rows.index_copy(0, self._index("grouped_suffix", device),
                               _gather(o_suffix, self._index("ungrouped_suffix", device)))
        return rows.view(*self.x_shape, *o_prefix.shape[2:])

    def forward(self, attn_func, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Shared-prefix attention: q ``[groups, Hq, L, D]``, k/v ``[groups, Hkv, L, D]`` in
        this instance's rows -> ``[groups, L, Hq, D]`` (zeros at padding).

        ``attn_func`` is not called: :class:`prefix_grouper.forward.AttentionForward` runs
        :func:`prefix_attention` once on the valid tokens, honoring the attention keywords
        transformers passes (``scaling``, ``sliding_window``, ``softcap``, ``s_aux``) and
        refusing those it cannot honor.
        """
        return AttentionForward(attn_func)(self, q, k, v, *args, **kwargs)

    def batch_repeat_cat(self, prefix: torch.Tensor, suffix: torch.Tensor, cat_dim: int) -> torch.Tensor:
        """Every group's ``prefix`` row repeated once per completion, concatenated to ``suffix``."""
        return batch_repeat_cat(prefix, suffix, cat_dim, self.num_samples)
