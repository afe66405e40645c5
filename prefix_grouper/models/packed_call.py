"""What a packed model call carries past transformers' masking: the per-call counter that
proves prefix_grouper's attention ran, and the mask function of the dispatching implementation
``"prefix_grouper+<previous>"`` (registered with the attention functions in
:mod:`prefix_grouper.models.attention`).
"""
from __future__ import annotations

import contextvars
from dataclasses import dataclass

__all__ = ["ATTENTION_NAME", "PACKED_CALL", "LocalMask", "PackedCall", "fallback_of", "prefix_grouper_mask"]

ATTENTION_NAME = "prefix_grouper"
# "prefix_grouper+sdpa": the dispatching implementation over sdpa. Not "|": transformers
# reads "a|b" as a hub-kernel name.
FALLBACK_SEPARATOR = "+"


@dataclass
class PackedCall:
    """One packed model call: how many attention calls ran prefix_attention in it."""
    attention_calls: int = 0

    def check(self, model) -> None:
        """Refuse a call in which the packed row went through attention prefix_grouper did not run."""
        if not self.attention_calls:
            raise RuntimeError(f"no attention layer of {type(model).__name__} ran prefix_grouper's attention: the "
                               f"packed row went through plain causal attention, and its log-probs would be wrong")


@dataclass(frozen=True)
class LocalMask:
    """The mask :func:`prefix_grouper_mask` gives a packed call's sliding-window (or chunked)
    layers in place of a dense one: its size, which the layer's own ``sliding_window`` must
    equal. A model that builds such a mask but does not pass its layer the window (or
    builds a chunked mask, which no window expresses) is refused instead of attending fully."""
    size: int


# Set by the packed forward for the duration of its model (or body) call.
PACKED_CALL: contextvars.ContextVar[PackedCall | None] = contextvars.ContextVar("prefix_grouper_packed_call",
                                                                               default=None)


def fallback_of(implementation: str | None) -> str | None:
    """The previous implementation that :func:`install` recorded in the name, or None."""
    prefix = ATTENTION_NAME + FALLBACK_SEPARATOR
    if isinstance(implementation, str) and implementation.startswith(prefix):
        return implementation[len(prefix):]
    return None


def prefix_grouper_mask(*args, config=None, **kwargs):
    """transformers mask function of the dispatching implementation: none for a packed call
    (the layout is the mask), else the previous implementation's.

    In a packed call a sliding-window (or chunked) mask becomes a :class:`LocalMask` of its
    size, which the layers it reaches check against their ``sliding_window``; masks with
    extra rules (``or_mask_function`` / ``and_mask_function``, e.g. Gemma 3's bidirectional
    image tokens), which the layout does not express, are refused.
    """
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    fallback = fallback_of(getattr(config, "_attn_implementation", None))
    if fallback is None:
        raise ValueError(f"prefix_grouper_mask serves the implementations install() registers, got config "
                         f"{type(config).__name__} with attn_implementation "
                         f"{getattr(config, '_attn_implementation', None)!r}")
    packed_call = PACKED_CALL.get()
    if packed_call is not None:
        if kwargs.get("use_vmap"):
            # transformers asks for vmap exactly when a model adds its own mask function.
            raise ValueError(f"{type(config).__name__}'s model adds its own rules to the attention mask "
                             f"(or_mask_function / and_mask_function, e.g. bidirectional image tokens), which the "
                             f"prefix layout does not express; use the unpacked rows for such inputs")
        local_size = kwargs.get("local_size")
        return None if local_size is None else LocalMask(local_size)
    if fallback not in ALL_MASK_ATTENTION_FUNCTIONS:
        # What transformers itself does for an implementation without a mask function.
        return kwargs.get("attention_mask")
    return ALL_MASK_ATTENTION_FUNCTIONS[fallback](*args, config=config, **kwargs)
