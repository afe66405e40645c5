"""TRL: a drop-in ``GRPOTrainer`` that encodes every prompt once per group of completions.

Usage (the one-line change)::

    from prefix_grouper.integrations.trl import GRPOTrainer   # instead of: from trl import GRPOTrainer

TRL scores a batch of ``N`` rows ``[left-padded prompt; right-padded completion]``, so a
prompt with ``G`` completions is encoded ``G`` times in the policy's loss forward and again
for the old policy and the reference model. This trainer runs those forwards on the packed
``prompt, completion_1..completion_G`` axis (:func:`completion_logits`, shared-prefix
attention) and scores the completion tokens with TRL's own fused LM head (the same
temperature scaling, entropies, float32 statistics and vocabulary tiling, so no
``[tokens, vocab]`` logits are materialized), returning TRL's tuple.

The prompt's last token is packed at the head of every completion (``prompt[:-1]`` is the
shared prefix): each packed position then predicts exactly one token, as TRL's head needs,
for ``G - 1`` extra tokens per group.

Rows with identical prompts are grouped wherever they stand in the batch (TRL shuffles the
rows of a generation batch before cutting it into micro-batches), and the results come back
in the batch's row order. TRL's ``batch_size`` chunking (used for the old-policy and
reference forwards) cuts between groups, never inside one: a group larger than the chunk
runs whole.

Prompts of different groups that begin alike (a system prompt, a tool schema) share that run
too: each forward's layout is the prefix tree of its prompts (``GroupLayout.from_padded(...,
share_across_groups=True)``), a run shared by different prompts split out from
:data:`MIN_SHARED_TOKENS` tokens on.
"""
from __future__ import annotations

import inspect
import warnings
from types import SimpleNamespace

import torch
import trl
from accelerate.utils import is_peft_model
from trl import GRPOTrainer as _TRLGRPOTrainer

from ..checks import as_length_list
from ..layout import GroupLayout
from ..models import completion_logits, install
from ..micro_batches import micro_batch_groups
from ..models.dropout import disable_dropout

__all__ = ["GRPOTrainer", "MIN_SHARED_TOKENS", "OVERRIDDEN_METHOD", "TESTED_TRL_VERSION", "check_trl_override",
           "forward_chunks"]

# Shortest run that different groups' prompts must share to be packed once (a chat template's
# few opening tokens are not worth a tree level: every query under it reads one more key run).
MIN_SHARED_TOKENS = 32

# The one private method of trl.GRPOTrainer this trainer overrides, and the TRL release
# (major, minor) whose signature of it the override copies. TRL has no public hook for the
# per-token log-probs of its loss, so the override is checked against TRL when this module
# is imported: a renamed method or another signature is an error, not a silent bypass.
OVERRIDDEN_METHOD = "_get_per_token_logps_and_entropies"
TESTED_TRL_VERSION = (1, 16)


def forward_chunks(group_sizes: list[int], batch_size: int) -> list[list[int]]:
    """Consecutive groups cut into forward passes of at most ``batch_size`` rows, never
    splitting a group: the group sizes of each pass. A group of more than ``batch_size``
    completions runs alone."""
    (batch_size,) = as_length_list([batch_size], "batch_size")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 (rows per forward pass), got {batch_size}")
    sizes = as_length_list(group_sizes, "group_sizes")
    return [sizes[groups.start:groups.stop] for groups in micro_batch_groups(sizes, max_rows=batch_size)]


def _parameters(function) -> list[tuple[str, object, object]]:
    """``(name, kind, default)`` of every parameter: a signature without its annotations."""
    return [(p.name, p.kind, p.default) for p in inspect.signature(function).parameters.values()]


def check_trl_override(trl_trainer: type = _TRLGRPOTrainer, override=None, version: str = trl.__version__) -> None:
    """Refuse a TRL whose ``GRPOTrainer`` lacks :data:`OVERRIDDEN_METHOD` or takes other
    parameters than the override (TRL would then never call it, or call it with arguments it
    does not expect); warn on a TRL release other than :data:`TESTED_TRL_VERSION` whose
    method still matches."""
    override = GRPOTrainer._get_per_token_logps_and_entropies if override is None else override
    theirs = getattr(trl_trainer, OVERRIDDEN_METHOD, None)
    if not callable(theirs):
        raise ImportError(f"trl {version}: GRPOTrainer has no {OVERRIDDEN_METHOD}, which prefix_grouper's "
                          f"GRPOTrainer overrides (written for trl {'.'.join(map(str, TESTED_TRL_VERSION))}); "
                          f"install trl=={'.'.join(map(str, TESTED_TRL_VERSION))}.*")
    if _parameters(theirs) != _parameters(override):
        raise ImportError(f"trl {version}: GRPOTrainer.{OVERRIDDEN_METHOD}{inspect.signature(theirs)} differs from "
                          f"prefix_grouper's override of it, {OVERRIDDEN_METHOD}{inspect.signature(override)} "
                          f"(written for trl {'.'.join(map(str, TESTED_TRL_VERSION))}); install that version")
    if tuple(int(part) for part in version.split(".")[:2] if part.isdigit()) != TESTED_TRL_VERSION:
        warnings.warn(f"prefix_grouper's GRPOTrainer was tested with trl {'.'.join(map(str, TESTED_TRL_VERSION))}, "
                      f"found {version}; {OVERRIDDEN_METHOD} still has the same parameters", stacklevel=2)


def _rows_grouped_by_prompt(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """``(order [N], group_sizes)``: ``order`` puts rows with identical prompts next to each other."""
    # Padding is set to -1 so that two rows compare on their real tokens (and padding width) only.
    prompts = prompt_ids.masked_fill(prompt_mask == 0, -1)
    _, prompt_of_row, rows_per_prompt = torch.unique(prompts, dim=0, return_inverse=True, return_counts=True)
    return torch.argsort(prompt_of_row, stable=True), rows_per_prompt.tolist()


def _completion_scores(scores: torch.Tensor, layout: GroupLayout, width: int) -> torch.Tensor:
    """Per-token scores of the packed completions ``[last prompt token; completion]``
    (``[sum_j (1 + S_j), ...]``) as TRL returns them: ``[N, width, ...]``, the prompt token's
    own score dropped, right-padded with zeros."""
    padded, _ = layout.unpack_completions(scores)
    completions = padded[:, 1:]
    return torch.nn.functional.pad(completions, (0, 0) * (scores.dim() - 1) + (0, width - completions.shape[1]))


class _FusedHeadCall:
    """``model`` as :func:`completion_logits` calls it: the model TRL hands over (maybe wrapped
    by accelerate or PEFT, whose forward carries their hooks), under the accelerator's
    autocast as TRL runs it, with the config of the transformers model inside (which
    :func:`install` already switched).

    :func:`completion_logits` asks for the logits at ``logits_to_keep`` (the packed positions
    that predict each packed completion token); this answers with what TRL's fused LM head
    computes there instead, ``[1, M, 2]`` (log-prob, entropy) or ``[1, M, 1]`` (log-prob, for
    a head without entropy), without vocabulary-wide logits.
    """

    def __init__(self, model, transformers_model, accelerator) -> None:
        self.model, self.config, self.accelerator = model, transformers_model.config, accelerator

    def __call__(self, *, input_ids, logits_to_keep, prefix_layout, **kwargs):
        labels = torch.full_like(input_ids, -100)
        # The last prefix position appears once per completion in logits_to_keep, always
        # with the same label: the prompt's last token, packed at every completion's head.
        labels[0, logits_to_keep] = input_ids[0, prefix_layout.completion_positions()]
        with self.accelerator.autocast():
            out = self.model(input_ids=input_ids, shift_labels=labels, fused_lm_head=True,
                             prefix_layout=prefix_layout, **kwargs)
        per_token = [out.log_probs] if out.entropy is None else [out.log_probs, out.entropy]
        return SimpleNamespace(logits=torch.stack(per_token, -1)[:, logits_to_keep])


class GRPOTrainer(_TRLGRPOTrainer):
    """``trl.GRPOTrainer`` whose per-token log-probs and entropies come from one forward pass
    per group of completions (same constructor, same ``GRPOConfig``).

    Falls back to TRL's own computation, with a warning the first time for each reason, on
    inputs the grouped forward does not handle: multimodal inputs (``pixel_values``,
    ``image_grid_thw``, ``token_type_ids``...), the MoE load-balancing loss
    (``compute_aux_loss=True``) and batches holding a one-token prompt. Generation,
    evaluation and every other call of the model keep its own attention.

    Dropout is turned off in the policy and the reference model, whatever
    ``GRPOConfig.disable_dropout`` says (with a warning when that changes a model): shared-
    prefix attention has no dropout, and the ratio of current to old log-probs assumes one
    deterministic policy (verl runs without dropout too).

    ``share_across_groups`` (True): prompts of different groups that open with the same run of
    at least :data:`MIN_SHARED_TOKENS` tokens share it (a prefix tree); False keeps one level,
    each group's prompt packed on its own.
    """
    share_across_groups: bool = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._fallbacks_warned: set[str] = set()
        changed = [name for model in (self.model, getattr(self, "ref_model", None)) if model is not None
                   for name in disable_dropout(model)]
        if changed and not self.args.disable_dropout:
            warnings.warn(f"prefix_grouper GRPOTrainer turned off dropout ({', '.join(changed[:4])}"
                          f"{', ...' if len(changed) > 4 else ''}): the grouped forward has no attention dropout, "
                          f"and GRPO's ratios assume a deterministic policy; pass GRPOConfig(disable_dropout=True) "
                          f"to say so", stacklevel=2)

    # The one override of a private TRL method (OVERRIDDEN_METHOD, checked by check_trl_override
    # at import): it only picks TRL's own path or the grouped one.
    def _get_per_token_logps_and_entropies(
        self,
        model,
        input_ids,
        attention_mask,
        logits_to_keep,
        batch_size=None,
        compute_entropy=False,
        compute_aux_loss=False,
        pixel_values=None,
        image_grid_thw=None,
        num_images=None,
        pixel_attention_mask=None,
        spatial_shapes=None,
        num_tiles=None,
        image_sizes=None,
        token_type_ids=None,
        mm_token_type_ids=None,
        image_position_ids=None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Per-token log-probs ``[N, logits_to_keep]`` float32, entropies (same shape, or None
        without ``compute_entropy``) and the MoE aux loss (None), zero on padded completion tokens.

        ``input_ids`` and ``attention_mask`` are ``[N, Lp + logits_to_keep]``: left-padded
        prompts, then right-padded completions, as TRL builds them.
        """
        extra_inputs = {
            "pixel_values": pixel_values, "image_grid_thw": image_grid_thw, "num_images": num_images,
            "pixel_attention_mask": pixel_attention_mask, "spatial_shapes": spatial_shapes,
            "num_tiles": num_tiles, "image_sizes": image_sizes, "token_type_ids": token_type_ids,
            "mm_token_type_ids": mm_token_type_ids, "image_position_ids": image_position_ids,
        }
        unhandled = [name for name, value in extra_inputs.items() if value is not None]
        if compute_aux_loss:
            unhandled.append("compute_aux_loss=True")
        prompt_width = input_ids.shape[1] - logits_to_keep
        if prompt_width < 2 or not bool(attention_mask[:, prompt_width - 2].all()):
            # The shared prefix is the prompt but its last token, so it needs 2 tokens.
            unhandled.append("prompts of one token")
        if unhandled:
            self._warn_fallback_once(", ".join(unhandled))
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size=batch_size,
                compute_entropy=compute_entropy, compute_aux_loss=compute_aux_loss, **extra_inputs)
        log_probs, entropies = self._grouped_log_probs_and_entropies(
            model, input_ids, attention_mask, logits_to_keep, batch_size or input_ids.size(0), compute_entropy)
        return log_probs, entropies, None

    def _grouped_log_probs_and_entropies(self, model, input_ids, attention_mask, logits_to_keep: int,
                                         batch_size: int, compute_entropy: bool):
        unwrapped = self.accelerator.unwrap_model(model)
        transformers_model = unwrapped.get_base_model() if is_peft_model(unwrapped) else unwrapped
        install(transformers_model)
        model_call = _FusedHeadCall(model, transformers_model, self.accelerator)

        prompt_width = input_ids.shape[1] - logits_to_keep
        order, group_sizes = _rows_grouped_by_prompt(input_ids[:, :prompt_width], attention_mask[:, :prompt_width])
        input_ids, attention_mask = input_ids[order], attention_mask[order]
        chunk_scores, start = [], 0
        for chunk_sizes in forward_chunks(group_sizes, batch_size):
            rows = slice(start, start + sum(chunk_sizes))
            # Shared prefix: the prompt but its last token, which heads every packed completion.
            layout = GroupLayout.from_padded(attention_mask[rows, :prompt_width - 1],
                                             attention_mask[rows, prompt_width - 1:], chunk_sizes,
                                             prompt_ids=input_ids[rows, :prompt_width - 1],
                                             share_across_groups=self.share_across_groups,
                                             min_shared=MIN_SHARED_TOKENS if self.share_across_groups else None)
            scores, _ = completion_logits(model_call, layout, input_ids[rows, :prompt_width - 1],
                                          input_ids[rows, prompt_width - 1:])
            chunk_scores.append(_completion_scores(scores, layout, logits_to_keep))
            start = rows.stop
        scores = torch.cat(chunk_scores)[torch.argsort(order)]
        if compute_entropy and scores.shape[-1] < 2:
            raise ValueError(f"compute_entropy=True, but {type(model).__name__}'s fused LM head computes no "
                             f"entropy (TRL asks for entropies of the policy only)")
        return scores[..., 0], scores[..., 1] if compute_entropy else None

    def _warn_fallback_once(self, reason: str) -> None:
        if reason not in self._fallbacks_warned:
            self._fallbacks_warned.add(reason)
            warnings.warn(f"prefix_grouper GRPOTrainer: the grouped forward does not handle {reason}; these "
                          f"log-probs come from TRL's own (ungrouped) computation", stacklevel=3)


check_trl_override()
