"""The paper package's ``prefix_grouper.utils.register_transformers``, kept for code written
for it: ``register_attention()`` then ``model.set_attn_implementation("prefix_grouper_attention")``
(or ``attn_implementation=`` at load); every model call passes ``prefix_grouper=``.

The functions live, with every other attention function prefix_grouper registers, in
:mod:`prefix_grouper.models.attention`; these are their names in the paper's API.
"""
from __future__ import annotations

from ..models.attention import PAPER_ATTENTION_NAME as ATTENTION_NAME
from ..models.attention import eager_attention_dispatch, route_eager_attention
from ..models.attention import paper_attention_forward as prefix_grouper_attention_forward
from ..models.attention import register_paper_attention as register_attention

__all__ = ["ATTENTION_NAME", "eager_attention_dispatch", "prefix_grouper_attention_forward", "register_attention",
           "route_eager_attention"]
