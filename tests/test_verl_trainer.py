"""verl's v1 trainer with use_prefix_grouper=True: ranks get whole groups (ragged, G = 1)
where they fit, balanced by packed tokens; the wrap of ``_balance_batch`` is installed when
the trainer's module is imported, and pads with verl's synthetic samples (skipped without
verl; run in the verl environment)."""
import sys
import types

import pytest
import torch

pytest.importorskip("verl")

from prefix_grouper.integrations import verl as pg_verl  # noqa: E402


def test_balanced_group_order_gives_ranks_whole_groups():
    g = torch.Generator().manual_seed(4)
    sizes = [3, 1, 2, 3, 1, 2]  # ragged groups and G = 1 steps: 12 samples
    keys = [f"uid{b}_{s}_0" for b, n in enumerate(sizes) for s in range(n)]
    keys = keys[::2] + keys[1::2]  # samples of a prompt are not adjacent
    seq_lens = torch.randint(40, 200, (len(keys),), generator=g).tolist()
    prompt_lens = [30] * len(keys)
    order = pg_verl.balanced_group_order(keys, seq_lens, 2, prompt_lens)
    assert sorted(order) == list(range(len(keys)))
    uid = [k.split("_")[0] for k in keys]
    loads = []
    for rank in range(2):
        part = order[rank * 6:(rank + 1) * 6]
        groups = [uid[i] for i in part]
        for u in set(groups):  # whole, contiguous groups: they all fit
            assert groups.count(u) == uid.count(u) and groups[groups.index(u):][:uid.count(u)] == [u] * uid.count(u)
        loads.append(sum(seq_lens[i] for i in part) - 30 * (len(part) - len(set(groups))))
    group_tokens = [sum(seq_lens[i] for i in range(len(keys)) if uid[i] == u) for u in set(uid)]
    assert abs(loads[0] - loads[1]) <= max(group_tokens)
    # 3 ranks of 2 samples: a group of 4 fits no rank and is spread over two, the pair stays whole
    keys = [f"big_{s}_0" for s in range(4)] + ["a_0_0", "a_1_0"]
    order = pg_verl.balanced_group_order(keys, [10] * 6, 3)
    assert order[:4] == [0, 1, 2, 3] and sorted(order[4:]) == [4, 5]
    with pytest.raises(ValueError, match="divide by the data-parallel size 4"):
        pg_verl.balanced_group_order(keys, [10] * 6, 4)


def test_trainer_module_is_patched_on_import(tmp_path, monkeypatch):
    (tmp_path / "fake_verl_trainer_base.py").write_text(
        "class PPOTrainer:\n    def _balance_batch(self, batch, metrics, logging_prefix='', keep_minibatch=False):\n"
        "        return batch\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(pg_verl.trainer, "TRAINER_MODULE", "fake_verl_trainer_base")
    pg_verl.trainer.install_trainer_hook()
    import fake_verl_trainer_base

    assert fake_verl_trainer_base.PPOTrainer._balance_batch.prefix_grouper_hook
    assert not any(isinstance(f, pg_verl.trainer._PatchTrainerOnImport) for f in sys.meta_path)  # removed itself
    monkeypatch.delitem(sys.modules, "fake_verl_trainer_base")


def test_patched_trainer_balances_groups_only_when_asked(monkeypatch):
    class Batch:
        def __init__(self, keys):
            self.keys = list(keys)
            self.tags = [{"seq_len": 10 + i, "prompt_len": 5} for i in range(len(keys))]

        def __len__(self):
            return len(self.keys)

        def reorder(self, order):
            self.keys, self.tags = [self.keys[i] for i in order], [self.tags[i] for i in order]

    class Trainer:
        def _balance_batch(self, batch, metrics, logging_prefix="global_seqlen", keep_minibatch=False):
            return "original"

        def _get_required_batch_multiple(self, dp_size):
            return dp_size * 2

    def pad(trainer, batch, multiple):  # verl's upsampling: synthetic samples of one uid
        padded = Batch(batch.keys + [f"pad_{i}_0" for i in range(-len(batch) % multiple)])
        return padded

    monkeypatch.setattr(pg_verl.trainer, "_pad_batch", pad)
    pg_verl.patch_trainer(Trainer)
    pg_verl.patch_trainer(Trainer)  # idempotent
    trainer = Trainer()
    workers = types.SimpleNamespace(_dispatch_info={}, _query_dispatch_info=lambda role: [0, 1])
    actor = {"use_prefix_grouper": False}
    trainer.config = types.SimpleNamespace(actor_rollout_ref=types.SimpleNamespace(
        actor=actor, rollout=types.SimpleNamespace(n=2)))
    trainer.actor_rollout_wg = workers
    keys = [f"u{b}_{s}_0" for s in range(2) for b in range(4)]
    assert trainer._balance_batch(Batch(keys), {}) == "original"
    actor["use_prefix_grouper"] = True
    metrics = {}
    batch = trainer._balance_batch(Batch(keys), metrics)
    assert [k.split("_")[0] for k in batch.keys[::2]] == [k.split("_")[0] for k in batch.keys[1::2]]
    assert any(name.startswith("global_seqlen") for name in metrics)
    batch = trainer._balance_batch(Batch(keys[:6]), {})  # 6 samples: padded to 8, none refused
    assert len(batch) == 8 and sum(k.startswith("pad_") for k in batch.keys) == 2
