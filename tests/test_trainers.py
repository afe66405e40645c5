"""Reference trainers: grouped vs unpacked equivalence (fp64), micro-batching, GiGPO's layout, the CLI."""
import json
import os

import pytest
import torch

from conftest import assert_same_gradients, trainer_gradients
from prefix_grouper.train import main
from prefix_grouper.trainers import ALGORITHMS, LOSS_TYPES, TrainConfig, build_trainer

# Tiny batches: 2 prompts (or reset states) x 3 completions (or episodes).
SMALL = dict(group_size=3, prompts_per_step=2)


@pytest.mark.parametrize("algo", ALGORITHMS)
def test_grouped_and_unpacked_give_equal_loss_and_gradients(algo):
    trainer = build_trainer(algo, dtype="float64", seed=1, config=TrainConfig(**SMALL, beta=0.05, num_iterations=2))
    prepared = trainer.prepare(trainer.rollout())
    # A first update moves the policy off the recorded old log-probs, so the ratio, the
    # clipping and the KL to the reference all take part in the compared step.
    trainer_gradients(trainer, prepared, True)
    trainer.optimizer.step()
    grouped_stats, grouped = trainer_gradients(trainer, prepared, True)
    unpacked_stats, unpacked = trainer_gradients(trainer, prepared, False)
    assert grouped_stats["ratio"] != 1 and grouped_stats["kl"] > 0
    assert abs(grouped_stats["loss"] - unpacked_stats["loss"]) <= 1e-10 * max(1.0, abs(unpacked_stats["loss"]))
    assert_same_gradients(grouped, unpacked)
    assert any(g.abs().max() > 0 for g in grouped.values())
    packed = sum(b.layout.total_tokens for b in prepared.batches)
    assert packed < sum(b.layout.unpacked_tokens() for b in prepared.batches)


def test_verify_equivalence_command(capsys):
    assert main(["--algo", "crpo", "--verify-equivalence", "--dtype", "float64", "--group-size", "3",
                 "--prompts-per-step", "2"]) == 0
    assert "tolerance (torch.float64): 1e-10 -> PASS" in capsys.readouterr().out


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_micro_batches_give_the_whole_batch_gradient(loss_type):
    config = TrainConfig(group_size=3, prompts_per_step=4, loss_type=loss_type)
    trainer = build_trainer("grpo", dtype="float64", seed=2, config=config)
    rollout = trainer.rollout()
    whole = trainer.prepare(rollout)
    config.micro_batch_rows = 4  # groups of 3: one group per micro-batch
    split = trainer.prepare(rollout)
    assert len(whole.batches) == 1 and [b.layout.num_groups for b in split.batches] == [1, 1, 1, 1]
    whole_stats, whole_grads = trainer_gradients(trainer, whole, True)
    split_stats, split_grads = trainer_gradients(trainer, split, True)
    assert abs(whole_stats["loss"] - split_stats["loss"]) <= 1e-12
    assert_same_gradients(split_grads, whole_grads)


def test_gigpo_prefix_groups_are_anchor_groups():
    trainer = build_trainer("gigpo", seed=3, config=TrainConfig(**SMALL))
    rollout = trainer.rollout()
    rows = rollout.rows
    start = 0
    seen = set()
    for prompt, size in zip(rollout.prompt_ids, rollout.group_sizes):
        key = {(int(g), int(a)) for g, a in zip(rows.group[start:start + size], rows.anchor[start:start + size])}
        assert len(key) == 1 and not key & seen  # one anchor state per prefix group, each once
        seen |= key
        start += size
    assert start == rollout.num_rows == len(rows.traj)
    assert len(rollout.group_sizes) < rollout.num_rows  # states recur: groups share prompts


@pytest.mark.parametrize("algo, task, steps", [("grpo", None, 2), ("crpo", None, 1), ("gigpo", None, 1),
                                              ("grpo", "keydoor", 1)])
def test_command_writes_metrics_and_plot(algo, task, steps, tmp_path):
    args = ["--algo", algo, "--steps", str(steps), "--out", str(tmp_path), "--group-size", "2", "--prompts-per-step", "2",
            "--num-iterations", "2", "--beta", "0.01"]
    assert main(args + (["--task", task] if task else [])) == 0
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    required = {"step", "reward_mean", "loss", "kl", "clip_frac", "entropy", "tokens_unpacked", "tokens_packed",
                "seconds"}
    if algo == "crpo":
        required |= {f"reward/{c}" for c in ("accuracy", "faithfulness", "comprehensiveness", "format")}
    if task == "keydoor" or algo == "gigpo":
        required |= {"success_rate", "invalid_frac"}
    assert required <= records[0].keys()
    assert all(r["tokens_packed"] <= r["tokens_unpacked"] for r in records)
    assert os.path.getsize(tmp_path / "rewards.png") > 0


@pytest.mark.parametrize("algo, task, match", [
    ("gigpo", "digits", "gigpo needs a multi-step environment"),
    ("crpo", "keydoor", "crpo needs a task with reward channels"),
    ("ppo", None, "algo must be one of"),
])
def test_build_errors(algo, task, match):
    with pytest.raises(ValueError, match=match):
        build_trainer(algo, task)


@pytest.mark.parametrize("model", ["llama", "checkpoint"])
def test_verify_equivalence_on_other_models(model, tmp_path, capsys):
    if model == "checkpoint":  # a local directory as users pass their own: weights + tokenizer
        policy = build_trainer("gigpo", seed=4).policy
        policy.model.save_pretrained(tmp_path)
        policy.tokenizer.save(str(tmp_path))
        model = str(tmp_path)
    assert main(["--algo", "gigpo", "--model", model, "--verify-equivalence", "--dtype", "float64",
                 "--group-size", "2", "--prompts-per-step", "2"]) == 0
    assert "-> PASS" in capsys.readouterr().out


def test_sampling_ignores_the_checkpoints_generation_settings():
    """A checkpoint's generation_config (repetition_penalty, min_new_tokens...) reshaped the
    samples while the update assumed the plain temperature-scaled policy."""
    from prefix_grouper.trainers.model import load_policy
    from prefix_grouper.trainers.rollout import generate

    policy = load_policy("tiny", "0123456789", dtype=torch.float32, device="cpu")
    prompts = [policy.prompt_ids("12", "cpu")] * 16
    torch.manual_seed(0)
    plain = generate(policy, prompts, max_new_tokens=8, temperature=1.0)
    policy.model.generation_config.repetition_penalty = 1e6
    policy.model.generation_config.min_new_tokens = 8
    torch.manual_seed(0)
    again = generate(policy, prompts, max_new_tokens=8, temperature=1.0)
    assert all(torch.equal(a, b) for a, b in zip(plain, again))
    assert policy.model.generation_config.repetition_penalty == 1e6  # the model's own is restored
