"""Completion log-probs and entropy through the LM head, one chunk of logits at a time."""
from .api import (BACKENDS, LOGITS_CHUNK_BYTES, available_backends, default_chunk_size, fused_linear_log_probs,
                  resolve_backend)
from .reference import reference_log_probs
from .tokens import token_log_probs

__all__ = ["BACKENDS", "LOGITS_CHUNK_BYTES", "available_backends", "default_chunk_size", "fused_linear_log_probs",
           "reference_log_probs", "resolve_backend", "token_log_probs"]
