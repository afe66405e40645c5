"""TRL: a drop-in ``GRPOTrainer`` that encodes every prompt once per group of completions.

Usage (the one-line change)::

    from prefix_grouper.integrations.trl import GRPOTrainer   # instead of: from trl import GRPOTrainer

TRL scores a batch of ``N`` rows ``[left-padded prompt; right-padded completion]``, so a
prompt with ``G`` completions is encoded ``G`` times in the policy's loss forward and again
for the old policy and the reference model. This trainer runs those forwards on the packed
``prompt, completion_1..completion_G`` axis (:func:`completion_logits`), with the same
temperature scaling, entropies and returned tuple as TRL.

Rows with identical prompts are grouped wherever they stand in the batch (TRL shuffles the
rows of a generation batch before cutting it into micro-batches), and the results come back
in the batch's row order. TRL's ``batch_size`` chunking (used for the old-policy and
reference forwards) cuts between groups, never inside one: a group larger than the chunk
runs whole.
"""
from __future__ import annotations

import warnings

import torch
from accelerate.utils import is_peft_model
from trl import GRPOTrainer as _TRLGRPOTrainer

from ..layout import GroupLayout
from .transformers import completion_logits, install

__all__ = ["GRPOTrainer", "forward_chunks"]


def forward_chunks(group_sizes: list[int], batch_size: int) -> list[list[int]]:
    """Consecutive groups cut into forward passes of at most ``batch_size`` rows, never
    splitting a group: the group sizes of each pass. A group of more than ``batch_size``
    completions runs alone."""
    chunks: list[list[int]] = [[]]
    for size in group_sizes:
        if chunks[-1] and sum(chunks[-1]) + size > batch_size:
            chunks.append([])
        chunks[-1].append(size)
    return chunks


def _rows_grouped_by_prompt(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """``(order [N], group_sizes)``: ``order`` puts rows with identical prompts next to each other."""
    # Padding is set to -1 so that two rows compare on their real tokens (and padding width) only.
    prompts = prompt_ids.masked_fill(prompt_mask == 0, -1)
    _, prompt_of_row, rows_per_prompt = torch.unique(prompts, dim=0, return_inverse=True, return_counts=True)
    return torch.argsort(prompt_of_row, stable=True), rows_per_prompt.tolist()


def _log_probs_and_entropies(logits: torch.Tensor, targets: torch.Tensor, temperature: float,
                             compute_entropy: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``log_softmax(logits / temperature)`` at ``targets`` and the entropy, from one log-softmax.

    logits ``[M, V]``, targets ``[M]`` -> ``([M], [M] or None)`` in float32 as TRL's fused LM
    head returns them. Like TRL, the logits are scaled in float32 (float64 for a float64 model).
    """
    scaled = logits.to(torch.promote_types(logits.dtype, torch.float32)) * (1.0 / temperature)
    log_probs = torch.log_softmax(scaled, dim=-1)
    selected = log_probs.gather(-1, targets[:, None])[:, 0].float()
    entropies = -(log_probs.exp() * log_probs).sum(-1).float() if compute_entropy else None
    return selected, entropies


def _padded_completions(values: torch.Tensor, layout: GroupLayout, width: int) -> torch.Tensor:
    """``[num_completion_tokens]`` -> ``[N, width]`` right-padded with zeros, as TRL returns them."""
    padded, _ = layout.unpack_completions(values)
    return torch.nn.functional.pad(padded, (0, width - padded.shape[1]))


class _TrainingModelCall:
    """``model`` as :func:`completion_logits` calls it: the model TRL hands over (maybe wrapped by
    accelerate or PEFT, whose forward carries their hooks) run under the accelerator's autocast
    as TRL runs it, with the config of the transformers model inside, which :func:`install`
    already switched."""

    def __init__(self, model, transformers_model, accelerator) -> None:
        self.model, self.config, self.accelerator = model, transformers_model.config, accelerator

    def __call__(self, **kwargs):
        with self.accelerator.autocast():
            return self.model(**kwargs)


class GRPOTrainer(_TRLGRPOTrainer):
    """``trl.GRPOTrainer`` whose per-token log-probs and entropies come from one forward pass
    per group of completions (same constructor, same ``GRPOConfig``).

    Falls back to TRL's own computation, with a warning the first time for each reason, on
    inputs the grouped forward does not handle: multimodal inputs (``pixel_values``,
    ``image_grid_thw``, ``token_type_ids``...) and the MoE load-balancing loss
    (``compute_aux_loss=True``). Generation, evaluation and every other call of the model
    keep its own attention.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._fallbacks_warned: set[str] = set()

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
        model_call = _TrainingModelCall(model, transformers_model, self.accelerator)

        order, group_sizes = _rows_grouped_by_prompt(input_ids[:, :-logits_to_keep],
                                                     attention_mask[:, :-logits_to_keep])
        input_ids, attention_mask = input_ids[order], attention_mask[order]
        prompt_ids, completion_ids = input_ids[:, :-logits_to_keep], input_ids[:, -logits_to_keep:]
        prompt_mask, completion_mask = attention_mask[:, :-logits_to_keep], attention_mask[:, -logits_to_keep:]
        all_log_probs, all_entropies = [], []
        start = 0
        for chunk_sizes in forward_chunks(group_sizes, batch_size):
            end = start + sum(chunk_sizes)
            layout = GroupLayout.from_padded(prompt_mask[start:end], completion_mask[start:end], chunk_sizes)
            logits, targets = completion_logits(model_call, layout, prompt_ids[start:end],
                                                completion_ids[start:end])
            log_probs, entropies = _log_probs_and_entropies(logits, targets, self.temperature, compute_entropy)
            all_log_probs.append(_padded_completions(log_probs, layout, logits_to_keep))
            if compute_entropy:
                all_entropies.append(_padded_completions(entropies, layout, logits_to_keep))
            start = end
        batch_order = torch.argsort(order)
        log_probs = torch.cat(all_log_probs)[batch_order]
        entropies = torch.cat(all_entropies)[batch_order] if compute_entropy else None
        return log_probs, entropies

    def _warn_fallback_once(self, reason: str) -> None:
        if reason not in self._fallbacks_warned:
            self._fallbacks_warned.add(reason)
            warnings.warn(f"prefix_grouper GRPOTrainer: the grouped forward does not handle {reason}; these "
                          f"log-probs come from TRL's own (ungrouped) computation", stacklevel=3)
