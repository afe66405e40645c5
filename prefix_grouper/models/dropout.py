"""Turning off a transformers model's dropout, as RL policy updates need (and as the shared-prefix
attention requires of attention dropout)."""
from __future__ import annotations

import math

import torch

__all__ = ["attention_dropout_error", "disable_dropout"]

# Config fields that hold a model's attention dropout probability, by name in transformers'
# configs (GPT-2, GPT-J, CodeGen: attn_pdrop; BERT-style: attention_probs_dropout_prob).
_ATTENTION_DROPOUT_FIELDS = ("attention_dropout", "attn_pdrop", "attention_probs_dropout_prob", "attn_dropout")


def _is_dropout_name(name: str) -> bool:
    # transformers names dropout probabilities *dropout* (attention_dropout, hidden_dropout,
    # classifier_dropout) or *pdrop (GPT-2's attn_pdrop, resid_pdrop, embd_pdrop).
    return "dropout" in name or name.endswith("pdrop")


def _zero_dropout_fields(owner, prefix: str) -> list[str]:
    """Set every float dropout probability among ``owner``'s attributes to 0; their names."""
    changed = []
    for name, value in list(vars(owner).items()):
        if _is_dropout_name(name) and isinstance(value, float) and value != 0.0:
            setattr(owner, name, 0.0)
            changed.append(prefix + name)
    return changed


def disable_dropout(model: torch.nn.Module) -> list[str]:
    """Turn off every dropout of a transformers ``model``, in place; returns what was changed.

    RL policy updates run without dropout (TRL's ``disable_dropout``, verl): the old,
    reference and current log-probs of a ratio must come from one deterministic policy,
    and prefix attention refuses attention dropout. Sets ``p = 0`` on every
    ``torch.nn.Dropout``, and 0 on every float dropout probability held by a module (Llama's
    attention keeps ``attention_dropout`` as a float read from the config at build time) or
    by a config (``attention_dropout``, GPT-2's ``attn_pdrop``...), so that the model, its
    saved config and a model rebuilt from it all agree.
    """
    changed = []
    configs = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Dropout) and module.p != 0:
            module.p = 0.0
            changed.append(f"{name or type(module).__name__}.p")
        changed += _zero_dropout_fields(module, f"{name}." if name else "")
        config = getattr(module, "config", None)
        if config is not None:
            configs[id(config)] = config
            text = config.get_text_config() if hasattr(config, "get_text_config") else config
            configs[id(text)] = text
    for config in configs.values():
        changed += _zero_dropout_fields(config, f"{type(config).__name__}.")
    return changed


def attention_dropout_error(module, dropout, attention_name: str) -> ValueError:
    """The error for attention dropout that would apply, naming the config field that sets it."""
    if module is None:
        return ValueError(f"prefix_grouper's attention does not implement attention dropout (got dropout={dropout} "
                          f"from a caller that names no layer): pass dropout=0, as an attention layer in eval mode "
                          f"does; RL policy updates run without dropout")
    config = getattr(module, "config", None)
    fields = [name for name in _ATTENTION_DROPOUT_FIELDS if isinstance(getattr(config, name, None), (int, float))]
    # The field whose value the layer passed, else any attention-dropout field the config has.
    matching = [name for name in fields if math.isclose(getattr(config, name), dropout)] or fields
    where = (f"set config.{matching[0]} = 0 on {type(config).__name__} before building the model"
             if matching else f"set {type(module).__name__}'s attention dropout to 0")
    return ValueError(
        f"attn_implementation='{attention_name}' does not implement attention dropout ({type(module).__name__} "
        f"passed dropout={dropout} in training mode): {where}, or disable every dropout of the loaded model "
        f"with prefix_grouper.models.disable_dropout(model) (as TRL's disable_dropout does); "
        f"RL policy updates run without dropout")
