"""Packing padded prompt and completion rows onto a layout's token axis, and reading
completion values back: the members that every layout of prompts and completions has (flat, or sharing prompt
runs across groups).
"""
from __future__ import annotations

from typing import Any

import torch

__all__ = ["CompletionPacking"]


class CompletionPacking:
    """Mixin of :class:`~prefix_grouper.layout.CompletionLayout`: packing
    and unpacking of prompt and completion rows, read from the layout's completion tensors."""

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
        group = self._token_prompt_group  # a prompt token shared across groups: one group holding it
        prompt_col = lp - self.prefix_lens[group] + self.position_ids
        completion_col = self.position_ids - self.prefix_lens[group]
        prompt_flat = prompt_rows.reshape(-1, *prompt_rows.shape[2:])
        completion_flat = completion_rows.reshape(-1, *completion_rows.shape[2:])
        src = torch.cat([prompt_flat, completion_flat], 0)
        index = torch.where(
            is_prefix,
            group * lp + prompt_col,
            prompt_flat.shape[0] + self.token_completion.clamp(min=0) * ls + completion_col,
        )
        packed = src.index_select(0, index)
        if not self.is_flat and not (packed.dtype.is_floating_point or packed.dtype.is_complex):
            self._check_shared_prompts(packed, prompt_flat, lp)
        return packed

    def _check_shared_prompts(self, packed: torch.Tensor, prompt_flat: torch.Tensor, width: int) -> None:
        """Integer prompts (ids) packed across groups must agree on every shared token."""
        positions, offsets, _, lens = self._tables()
        sequence = torch.repeat_interleave(torch.arange(self.num_sequences, device=self.device), lens,
                                           output_size=positions.shape[0])
        offset = torch.arange(positions.shape[0], device=self.device) - torch.tensor(
            offsets[:-1], dtype=torch.long, device=self.device)[sequence]
        group = self.completion_group[sequence]
        in_prompt = offset < self.prefix_lens[group]
        given = prompt_flat.index_select(0, (group * width + width - self.prefix_lens[group] + offset)[in_prompt])
        differs = (packed.index_select(0, positions[in_prompt]) != given).reshape(given.shape[0], -1).any(1)
        if bool(differs.any()):
            b = int(group[in_prompt][differs.nonzero()[0]])
            raise ValueError(f"prompts: group {b}'s prompt differs from another group's on a run the layout "
                             f"shares across groups: these are not the prompts it was built from")

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


