"""What every layout answers about its full token sequences, whatever its tree: where each
sequence's tokens are packed, packing per-sequence values, and the logit positions that
predict each token.

A sequence is a path from a root of the prefix tree: for a one-level layout, completion
``i``'s sequence is its group's prompt followed by the completion; for
``GroupLayout.from_sequences``, the ``i``-th sequence given.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from ..checks import check_int
from .construction import sequence_tables
from .segmentation import KeyRun, Segmentation

__all__ = ["SequenceMembers"]


class SequenceMembers:
    """Mixin of :class:`~prefix_grouper.layout.GroupLayout`: the members that work on every
    layout (a prefix tree of any depth). The layout sets ``_sequence_segments`` (the segment
    each sequence ends on), ``num_sequences``, ``sequence_lens_list`` and ``device``."""

    _sequence_segments: tuple[int, ...]
    num_sequences: int
    sequence_lens_list: tuple[int, ...]
    device: torch.device
    segmentation: Segmentation

    def key_runs(self, segment: int) -> tuple[KeyRun, ...]:
        """``(start, length)`` packed key runs segment ``segment``'s queries see, in order:
        its ancestors' runs, root first (for a completion: its prefix's run), then its own."""
        return self.segmentation.key_runs(segment)

    def subtree_end(self, segment: int) -> int:
        """Packed end of segment ``segment``'s subtree, ``[start, subtree_end)``."""
        return self.segmentation.subtree_end(segment)

    @property
    def sequence_lens(self) -> torch.Tensor:
        """``[num_sequences]`` int64 on the layout's device: ``L_i``, the tokens of sequence ``i``."""
        return self._tables()[3]

    def _tables(self) -> tuple[torch.Tensor, list[int], torch.Tensor, torch.Tensor]:
        """Built on first use (a one-level layout never pays for them otherwise)."""
        tables = self.__dict__.get("_sequence_tables")
        if tables is None:
            positions, offsets, source = sequence_tables(self.segmentation, self._sequence_segments, self.device)
            lens = torch.tensor(self.sequence_lens_list, dtype=torch.long, device=self.device)
            tables = self.__dict__["_sequence_tables"] = (positions, offsets, source, lens)
        return tables

    def _sequence_index(self, i: Any) -> int:
        return check_int(i, "i", 0, self.num_sequences - 1)

    def sequence_positions(self, i: int | None = None) -> torch.Tensor:
        """``[L_i]`` int64: the packed index of every token of sequence ``i``, in order (its
        path's runs, root first). Shared tokens have the same index in every sequence that
        holds them. ``i=None``: every sequence's, concatenated (``[sum_i L_i]``)."""
        positions, offsets, _, _ = self._tables()
        if i is None:
            return positions
        i = self._sequence_index(i)
        return positions[offsets[i]:offsets[i + 1]]

    def token_log_prob_positions(self, i: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logit_positions, target_positions)``, each ``[L_i - 1]`` int64: the packed
        index of the logits that predict tokens ``1..L_i-1`` of sequence ``i``, and of
        those target tokens. ``log_softmax(logits[logit_positions])`` gathered at
        ``packed_ids[target_positions]`` gives the sequence's token log-probs.
        ``i=None``: every sequence's, concatenated (``[sum_i (L_i - 1)]``)."""
        positions, offsets, _, _ = self._tables()
        if i is not None:
            own = self.sequence_positions(i)
            return own[:-1], own[1:]
        is_first = torch.zeros(positions.shape[0], dtype=torch.bool, device=positions.device)
        is_first[torch.tensor(offsets[:-1], dtype=torch.long, device=positions.device)] = True
        is_last = torch.roll(is_first, -1)
        return positions[~is_last], positions[~is_first]

    def pack_sequences(self, sequences: Sequence[Any]) -> torch.Tensor:
        """The ``[T, ...]`` packed values of per-sequence values.

        Args:
            sequences: ``num_sequences`` tensors ``[L_i, ...]`` (or lists of ints), one per
                sequence in the layout's order: token ids, or per-token features sharing
                dtype and trailing shape. They are moved to the layout's device.

        A shared token takes the value of the first sequence holding it. Integer values
        (token ids) must agree on every shared token (checked: one flag read back).
        """
        if isinstance(sequences, torch.Tensor) or not isinstance(sequences, (list, tuple)):
            raise TypeError(f"sequences must be a list of {self.num_sequences} tensors [L_i, ...], "
                            f"got {type(sequences).__name__}")
        if len(sequences) != self.num_sequences:
            raise ValueError(f"sequences: expected {self.num_sequences} entries (one per sequence), "
                             f"got {len(sequences)}")
        rows = [x if isinstance(x, torch.Tensor) else torch.as_tensor(x) for x in sequences]
        for i, (x, n) in enumerate(zip(rows, self.sequence_lens_list)):
            if x.dim() < 1 or x.shape[0] != n:
                raise ValueError(f"sequences[{i}]: expected {n} tokens (sequence {i} of the layout), "
                                 f"got shape {tuple(x.shape)}")
            if x.dtype != rows[0].dtype or x.shape[1:] != rows[0].shape[1:]:
                raise ValueError(f"sequences[{i}] is a {tuple(x.shape)} {x.dtype} tensor but sequences[0] "
                                 f"a {tuple(rows[0].shape)} {rows[0].dtype} one: they must share dtype "
                                 f"and trailing shape")
        flat = torch.cat([x.to(self.device) for x in rows], 0)
        positions, _, source, _ = self._tables()
        packed = flat.index_select(0, source)
        if not (flat.dtype.is_floating_point or flat.dtype.is_complex):
            differs = (packed.index_select(0, positions) != flat).reshape(flat.shape[0], -1).any(1)
            if bool(differs.any()):
                entry = int(differs.nonzero()[0])
                _, offsets, _, _ = self._tables()
                i = max(s for s in range(self.num_sequences) if offsets[s] <= entry)
                raise ValueError(f"sequences[{i}] token {entry - offsets[i]} differs from the other sequences "
                                 f"sharing it in the layout: these are not the sequences it was built from")
        return packed
