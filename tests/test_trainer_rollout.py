"""Typed rollout rows, their cross-rank id remapping, whole-group micro-batches and group
selection, and the float64 RMSNorm patch of the trainers' models."""
import pytest
import torch

from prefix_grouper.trainers import Distributed, RolloutRows, TrainConfig, build_trainer
from prefix_grouper.trainers.model import keep_norms_in_float64
from prefix_grouper.trainers.rollout import Rollout


def episode_rows():
    return RolloutRows(group=torch.tensor([0, 0, 1]), traj=torch.tensor([0, 1, 2]),
                       reward=torch.tensor([1.0, 0.0, 0.5], dtype=torch.float64), anchor=torch.tensor([0, 1, 2]),
                       time=torch.tensor([0, 3, 1]), step_reward=torch.zeros(3, dtype=torch.float64),
                       success=torch.ones(3, dtype=torch.float64), invalid=torch.zeros(3, dtype=torch.float64))


def test_global_ids_remap_only_the_id_fields():
    rows = episode_rows()
    remapped = Distributed(rank=1, world_size=2)._global_ids(rows, 1)
    assert remapped.group.tolist() == [1, 1, 3] and remapped.traj.tolist() == [1, 3, 5]
    assert remapped.anchor.tolist() == [1, 3, 5]
    assert torch.equal(remapped.time, rows.time)  # a step index, int64 but not an id
    assert torch.equal(remapped.reward, rows.reward) and remapped.channels is None


def test_rows_select_concatenate_and_read_by_name():
    rows = episode_rows()
    picked = rows.index_select(torch.tensor([2, 0]))
    assert picked.traj.tolist() == [2, 0] and picked.time.tolist() == [1, 0] and len(picked) == 2
    both = RolloutRows.cat([rows, picked])
    assert both.anchor.tolist() == [0, 1, 2, 2, 0]
    assert torch.equal(rows["time"], rows.time) and "success" in rows and "channels" not in rows
    with pytest.raises(KeyError, match="channels"):
        rows["channels"]
    task_rows = RolloutRows(group=torch.tensor([0]), traj=torch.tensor([0]), reward=torch.zeros(1, dtype=torch.float64))
    with pytest.raises(ValueError, match="same fields"):
        RolloutRows.cat([rows, task_rows])


def test_rows_are_checked():
    with pytest.raises(ValueError, match="reward must be a tensor of 2 rows"):
        RolloutRows(group=torch.tensor([0, 0]), traj=torch.tensor([0, 1]), reward=torch.zeros(3))
    with pytest.raises(TypeError, match="traj is an id and must be int64"):
        RolloutRows(group=torch.tensor([0, 0]), traj=torch.tensor([0.0, 1.0]), reward=torch.zeros(2))


def test_select_groups_keeps_whole_groups_in_the_given_order():
    completions = [torch.tensor([r]) for r in range(6)]
    rows = RolloutRows(group=torch.tensor([0, 0, 1, 2, 2, 2]), traj=torch.arange(6),
                       reward=torch.arange(6, dtype=torch.float64))
    rollout = Rollout([torch.tensor([10]), torch.tensor([11]), torch.tensor([12])], completions, [2, 1, 3], rows)
    picked = rollout.select_groups([2, 0])
    assert picked.group_sizes == [3, 2] and [int(p) for p in picked.prompt_ids] == [12, 10]
    assert [int(c) for c in picked.completion_ids] == [3, 4, 5, 0, 1] and picked.rows.traj.tolist() == [3, 4, 5, 0, 1]


@pytest.mark.parametrize("budget", [1, 3, 4, 7, 100])
def test_micro_batches_cut_between_whole_groups(budget):
    trainer = build_trainer("gigpo", seed=3, config=TrainConfig(group_size=3, prompts_per_step=2,
                                                                micro_batch_rows=budget))
    rollout = trainer.rollout()
    batches = trainer.micro_batches(rollout)
    assert [b.start for b in batches] == [0] + [b.stop for b in batches[:-1]] and batches[-1].stop == rollout.num_rows
    sizes = [size for b in batches for size in b.layout.group_sizes_list]
    assert sizes == list(rollout.group_sizes)
    for b in batches:
        assert b.stop - b.start <= budget or b.layout.num_groups == 1
        assert [len(c) for c in b.completion_ids] == [len(c) for c in rollout.completion_ids[b.start:b.stop]]


@pytest.mark.parametrize("model_type, expected", [("qwen2", 5), ("llama", 5), ("gemma2", 0)])
def test_float64_norms(model_type, expected):
    """Llama-formula RMSNorms (Qwen2, Llama) get a float64 forward; Gemma 2's (1 + weight)
    norm, another formula, is left alone; a second call changes nothing."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float64)
    norm = model.model.norm
    x = torch.randn(2, 16, dtype=torch.float64)
    before = norm(x)
    assert keep_norms_in_float64(model) == expected
    assert keep_norms_in_float64(model) == 0
    exact = norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)) if expected else None
    if expected:
        assert torch.equal(norm(x), exact) and not torch.equal(before, exact)
    else:
        assert torch.equal(norm(x), before)
