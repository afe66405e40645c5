"""verl's v1 trainer: ``PPOTrainer._balance_batch`` giving data-parallel ranks whole groups.

With ``use_prefix_grouper=True`` the wrapped ``_balance_batch`` pads the batch to the size
verl needs with verl's own synthetic samples (one group of their own), then orders it so
that each rank's equal slice holds whole groups where they fit, balanced by packed tokens
(:func:`~.batching.balanced_group_order`). The wrap is installed when the trainer's module is
first imported: the plugin loads with ``import verl``, before the trainer, which it must not
import itself.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys

from .batching import balanced_group_order

__all__ = ["TRAINER_MODULE", "install_trainer_hook", "patch_trainer"]

TRAINER_MODULE = "verl.trainer.ppo.v1.trainer_base"


def _pad_batch(trainer, batch, multiple: int):
    from verl.trainer.ppo.padding_utils import upsample_batch_to_divisible_size

    return upsample_batch_to_divisible_size(batch, multiple, trainer.tokenizer.eos_token_id)


def _balance_metrics(seq_lens, partitions, prefix) -> dict:
    """verl's balance statistics of the ranks' sequence tokens, as its own balancing logs them."""
    from verl.utils.seqlen_balancing import log_seqlen_unbalance

    return log_seqlen_unbalance(seqlen_list=seq_lens, partitions=partitions, prefix=prefix)


def patch_trainer(trainer_cls) -> None:
    """Wrap ``trainer_cls._balance_batch`` (verl's v1 ``PPOTrainer``) to balance whole groups
    when ``actor_rollout_ref.actor.use_prefix_grouper`` is set (idempotent)."""
    original = trainer_cls._balance_batch
    if getattr(original, "prefix_grouper_hook", False):
        return

    def _balance_batch(self, batch, metrics, logging_prefix="global_seqlen", keep_minibatch=False):
        if not self.config.actor_rollout_ref.actor.get("use_prefix_grouper", False):
            return original(self, batch, metrics, logging_prefix=logging_prefix, keep_minibatch=keep_minibatch)
        workers = self.actor_rollout_wg
        if "actor" not in workers._dispatch_info:
            workers._dispatch_info["actor"] = workers._query_dispatch_info("actor")
        dp_size = max(workers._dispatch_info["actor"]) + 1
        multiple = self._get_required_batch_multiple(dp_size)
        if len(batch) % multiple:
            batch = _pad_batch(self, batch, multiple)
        seq_lens = [tag["seq_len"] for tag in batch.tags]
        order = balanced_group_order(batch.keys, seq_lens, dp_size, [tag.get("prompt_len", 0) for tag in batch.tags])
        batch.reorder(order)
        per_rank = len(order) // dp_size
        metrics.update(_balance_metrics(seq_lens, [order[r * per_rank:(r + 1) * per_rank] for r in range(dp_size)],
                                        logging_prefix))
        return batch

    _balance_batch.prefix_grouper_hook = True
    trainer_cls._balance_batch = _balance_batch


class _PatchTrainerOnImport(importlib.abc.MetaPathFinder):
    """Patches verl's v1 trainer when its module is first imported."""

    def find_spec(self, name, path, target=None):
        if name != TRAINER_MODULE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            patch_trainer(module.PPOTrainer)

        spec.loader.exec_module = exec_and_patch
        return spec


def install_trainer_hook() -> None:
    if TRAINER_MODULE in sys.modules:
        patch_trainer(sys.modules[TRAINER_MODULE].PPOTrainer)
    elif not any(isinstance(finder, _PatchTrainerOnImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _PatchTrainerOnImport())
