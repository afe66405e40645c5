"""The policy: a tiny transformers causal LM from random init, or any transformers checkpoint."""
from __future__ import annotations

import json
import os
import types
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ..models.dropout import disable_dropout
from .tokenizer import FILE_NAME as CHAR_TOKENIZER_FILE
from .tokenizer import CharTokenizer

__all__ = ["DTYPES", "TINY_MODEL", "HFTokenizer", "Policy", "disable_dropout", "keep_norms_in_float64",
           "load_policy"]

TINY_MODEL = "tiny"
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}
# Small enough for 200 RL steps on 2 CPU cores in minutes; GQA (4 query / 2 KV heads) so
# the grouped attention path is exercised as in real models.
TINY_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)


class HFTokenizer:
    """A transformers tokenizer behind :class:`CharTokenizer`'s interface (encode, decode, special ids)."""

    def __init__(self, tokenizer: Any) -> None:
        if tokenizer.eos_token_id is None:
            raise ValueError(f"{type(tokenizer).__name__} has no eos_token_id: completions could never end")
        self.tokenizer = tokenizer
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        # Models without a BOS token (Qwen) start prompts with their first text token.
        self.bos_id = tokenizer.bos_token_id
        self.vocab_size = len(tokenizer)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids: Sequence[int]) -> str:
        ids = list(ids)
        if self.eos_id in ids:
            ids = ids[:ids.index(self.eos_id)]
        return self.tokenizer.decode(ids, skip_special_tokens=True)


@dataclass
class Policy:
    model: Any                      # a transformers causal LM
    tokenizer: CharTokenizer | HFTokenizer

    def prompt_ids(self, text: str, device: torch.device) -> torch.Tensor:
        """``[P]`` int64: BOS (when the tokenizer has one) then the encoded ``text``."""
        bos = [] if self.tokenizer.bos_id is None else [self.tokenizer.bos_id]
        return torch.tensor(bos + self.tokenizer.encode(text), dtype=torch.long, device=device)


def _is_char_tokenizer_dir(path: str) -> bool:
    # CharTokenizer.save and transformers both name their file tokenizer.json: tell them apart by content.
    file = os.path.join(path, CHAR_TOKENIZER_FILE)
    if not os.path.isfile(file):
        return False
    with open(file, encoding="utf-8") as handle:
        saved = json.load(handle)
    return isinstance(saved, dict) and set(saved) == {"special_tokens", "alphabet"}


def _float64_rms_norm(self, hidden_states: torch.Tensor) -> torch.Tensor:
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def _float32_rms_norm(module: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """transformers' ``LlamaRMSNorm`` formula (input rounded to float32 and back)."""
    x = hidden_states.to(torch.float32)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + module.variance_epsilon)
    return module.weight * x.to(hidden_states.dtype)


def _rounds_to_float32(module: torch.nn.Module) -> bool:
    """Whether ``module`` is a float64 RMSNorm whose forward computes exactly the
    ``LlamaRMSNorm`` formula through float32: its output on a random float64 probe equals
    that formula's bit for bit. Read from what the forward does, not from its source, so a
    copied class (Qwen2RMSNorm...) or a wrapped forward is recognized, and a norm with
    another formula (Gemma's ``1 + weight``, one already in float64) is left alone."""
    weight = getattr(module, "weight", None)
    epsilon = getattr(module, "variance_epsilon", None)
    if (not isinstance(weight, torch.Tensor) or weight.dim() != 1 or weight.dtype != torch.float64
            or not isinstance(epsilon, float)):
        return False
    generator = torch.Generator().manual_seed(0)
    probe = torch.randn(3, weight.numel(), dtype=torch.float64, generator=generator).to(weight.device)
    try:
        with torch.no_grad():
            output = module(probe)
    except Exception:  # a module that merely has these attributes; not a norm we know how to run
        return False
    with torch.no_grad():
        expected = _float32_rms_norm(module, probe)
    return isinstance(output, torch.Tensor) and torch.equal(output, expected)


def keep_norms_in_float64(model: torch.nn.Module) -> int:
    """Give the Llama-family RMSNorms of a float64 ``model`` a float64 forward; returns how many.

    transformers' ``LlamaRMSNorm`` (copied as Qwen2, Qwen3, Mistral, ... RMSNorm) casts its
    input to float32, which in a float64 model is a downcast: the norm's backward then
    rounds to float32, and float64 equivalence checks would measure float32 rounding. Only
    modules whose forward computes exactly that formula (checked numerically, see
    :func:`_rounds_to_float32`) are changed, to the same formula in float64.
    """
    changed = 0
    for module in model.modules():
        if _rounds_to_float32(module):
            module.forward = types.MethodType(_float64_rms_norm, module)
            changed += 1
    return changed


def load_policy(model: str, alphabet: str, *, dtype: torch.dtype, device: torch.device | str) -> Policy:
    """The policy named by ``model``.

    ``"tiny"``: a 2-layer Qwen2 (hidden 64, 4 heads, 2 KV heads) from random init with a
    :class:`CharTokenizer` over ``alphabet``. A transformers model type (``"llama"``,
    ``"qwen2"``, ...): that architecture in the same tiny shape from random init. Anything
    else: a local checkpoint directory or a model id, loaded with ``AutoModelForCausalLM``;
    its tokenizer is a saved :class:`CharTokenizer` or ``AutoTokenizer``'s.

    Every dropout of the policy is turned off (:func:`disable_dropout`).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if model == TINY_MODEL or model in CONFIG_MAPPING_NAMES:
        tokenizer = CharTokenizer(alphabet)
        config = AutoConfig.for_model("qwen2" if model == TINY_MODEL else model, vocab_size=tokenizer.vocab_size,
                                      bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
                                      pad_token_id=tokenizer.pad_id, **TINY_SHAPE)
        network = AutoModelForCausalLM.from_config(config, dtype=dtype)
    else:
        network = AutoModelForCausalLM.from_pretrained(model, dtype=dtype)
        tokenizer = (CharTokenizer.load(model) if os.path.isdir(model) and _is_char_tokenizer_dir(model)
                     else HFTokenizer(AutoTokenizer.from_pretrained(model)))
    if network.get_input_embeddings().num_embeddings < tokenizer.vocab_size:
        raise ValueError(f"model {model!r} embeds {network.get_input_embeddings().num_embeddings} tokens but its "
                         f"tokenizer has {tokenizer.vocab_size}")
    if dtype == torch.float64:
        keep_norms_in_float64(network)
    disable_dropout(network)
    return Policy(network.to(device), tokenizer)
