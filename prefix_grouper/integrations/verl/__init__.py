"""verl 0.9.1: ``actor_rollout_ref.actor.use_prefix_grouper=True`` in the v1 trainer's FSDP engine.

In verl 0.9.1 that switch only changes the v0 trainer's batch balancing; the training
engine never reads it. Installed with the ``verl`` extra, this package is a ``verl.plugins``
entry point, loaded by ``import verl`` in the driver and in every Ray worker. On load it
only wraps ``ActorConfig.__post_init__`` (and, when imported, the v1 trainer's
``_balance_batch``); an actor config built with ``use_prefix_grouper=True`` then activates
the integration in that process:

* :class:`PrefixGrouperFSDPEngine` (:mod:`.engine`, a subclass of verl's
  ``FSDPEngineWithLMHead``) is registered with ``EngineRegistry`` for ``language_model`` on
  fsdp/fsdp2 and this platform's device and vendor, and the actor's engine config is marked.
  Its micro-batches (:mod:`.batching`) hold whole groups where they fit: with
  ``use_dynamic_bsz=True`` at most ``max_token_len_per_gpu x ulysses_sequence_parallel_size``
  packed tokens each, else ``micro_batch_size_per_gpu`` groups each; every rank runs the
  same number of them (FSDP hangs otherwise).
* Each micro-batch runs as one packed row: the prefix tree of its samples
  (:func:`micro_batch_layout`, :mod:`.tree`): a group's samples share their prompt, samples
  with different prompts share a common leading run of at least 32 tokens (a system prompt,
  an earlier agent step's whole sequence). :func:`grouped_log_probs` returns verl's per-token
  log-probs (and entropies) on the unpadded samples, split over the Ulysses group when
  ``ulysses_sequence_parallel_size > 1`` (:mod:`.forward`).
* The v1 trainer's ``PPOTrainer._balance_batch`` (:mod:`.trainer`) gives data-parallel
  ranks whole groups (samples whose TransferQueue keys share the prompt uid) where they fit,
  balanced by packed tokens. Groups of any size are accepted (per-step samples, GiGPO).

Refused loudly, never ignored: fused kernels, multi-modal inputs, 3-D (mrope) position ids,
per-sample temperatures. A failed activation raises from the actor config, since verl logs
a plugin that fails to load only at debug level. Imported where verl is not installed, the
package loads nothing and logs nothing.
"""
from __future__ import annotations

import importlib.util
import logging

from . import engine
from .batching import balanced_group_order
from .engine import ENGINE_FLAG, activate
from .forward import grouped_log_probs
from .trainer import patch_trainer
from .tree import (MIN_SHARED_TOKENS, MicroBatchLayout, group_sizes_of, micro_batch_layout, prompt_lengths,
                   sequence_values)

__all__ = ["ENGINE_FLAG", "MIN_SHARED_TOKENS", "MicroBatchLayout", "PrefixGrouperFSDPEngine", "activate",
           "balanced_group_order", "group_sizes_of", "grouped_log_probs", "micro_batch_layout", "patch_trainer",
           "prompt_lengths", "sequence_values"]

_log = logging.getLogger(__name__)


def __getattr__(name: str):
    if name == "PrefixGrouperFSDPEngine":  # defined by activate(): it subclasses verl's engine
        return engine.state["engine"]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _load_plugin() -> None:
    """The entry point's work: never raises (verl would hide it), records what failed."""
    if importlib.util.find_spec("verl") is None:
        return  # imported without verl (docs, tests): there is nothing to hook
    from .engine import install_config_hook
    from .trainer import install_trainer_hook

    try:
        install_config_hook()
        install_trainer_hook()
    except Exception as error:  # recorded for on_actor_config, and said loudly now
        engine.state["error"] = error
        _log.error("prefix_grouper's verl plugin failed to load (use_prefix_grouper=True will not work): %r", error)


_load_plugin()
