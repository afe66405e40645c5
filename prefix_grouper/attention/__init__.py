"""Shared-prefix attention over a packed GRPO batch."""
from .api import BACKENDS, available_backends, prefix_attention, resolve_backend
from .flash_engines import flash_engine
from .reference import prefix_sharing_mask, reference_prefix_attention

__all__ = ["BACKENDS", "available_backends", "flash_engine", "prefix_attention", "prefix_sharing_mask",
           "reference_prefix_attention", "resolve_backend"]
