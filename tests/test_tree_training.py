"""Reference trainers on prefix trees: the keydoor-history task (every step's prompt is the whole
interaction history), trained per step on a tree of the batch's sequences, equals the unpacked
rows in fp64 (loss and every gradient), and reports the tokens the tree saves."""
import json

import pytest
import torch

from conftest import assert_same_gradients, trainer_gradients
from prefix_grouper.train import main
from prefix_grouper.trainers import (TrainConfig, append_metrics, build_trainer, plot_runs, run_costs,
                                     write_run_costs)

SMALL = dict(group_size=3, prompts_per_step=2)
TASK = "keydoor-history"


def test_history_prompts_chain_each_trajectorys_steps():
    trainer = build_trainer("gigpo", TASK, seed=3, config=TrainConfig(**SMALL))
    rollout = trainer.rollout()
    rows, tokenizer = rollout.rows, trainer.policy.tokenizer
    assert rollout.history and rollout.group_sizes == [1] * rollout.num_rows
    steps_seen = 0
    for traj in rows.traj.unique().tolist():
        index = [i for i in torch.argsort(rows.time).tolist() if rows.traj[i] == traj]
        assert [int(rows.time[i]) for i in index] == list(range(len(index)))
        first = rollout.prompt_ids[index[0]]
        assert first[0] == tokenizer.bos_id and len(first) == 1 + trainer.task.length
        for previous, current in zip(index, index[1:]):
            history = torch.cat([rollout.prompt_ids[previous], rollout.completion_ids[previous]])
            prompt = rollout.prompt_ids[current]
            assert torch.equal(prompt[:len(history)], history)
            observation = tokenizer.decode(prompt[len(history):].tolist())
            assert len(observation) == trainer.task.length  # exactly the new observation follows
        steps_seen += len(index)
    assert steps_seen == rollout.num_rows


@pytest.mark.parametrize("algo", ["gigpo", "grpo"])
def test_tree_and_unpacked_give_equal_loss_and_gradients(algo):
    trainer = build_trainer(algo, TASK, dtype="float64", seed=1,
                            config=TrainConfig(**SMALL, beta=0.05, num_iterations=2))
    prepared = trainer.prepare(trainer.rollout())
    assert all(b.tree is not None for b in prepared.batches)
    # A first update moves the policy off the recorded old log-probs (ratio, clipping, KL all active).
    trainer_gradients(trainer, prepared, True)
    trainer.optimizer.step()
    tree_stats, tree = trainer_gradients(trainer, prepared, True)
    unpacked_stats, unpacked = trainer_gradients(trainer, prepared, False)
    assert tree_stats["ratio"] != 1 and tree_stats["kl"] > 0
    assert abs(tree_stats["loss"] - unpacked_stats["loss"]) <= 1e-10 * max(1.0, abs(unpacked_stats["loss"]))
    assert_same_gradients(tree, unpacked)
    assert any(g.abs().max() > 0 for g in tree.values())
    # Histories share their prefixes: the tree holds far fewer tokens than the rows.
    packed = sum(b.packed_tokens for b in prepared.batches)
    assert packed < sum(b.layout.unpacked_tokens() for b in prepared.batches)


def test_tree_micro_batches_give_the_whole_batch_gradient():
    config = TrainConfig(**SMALL, loss_type="bnpo")
    trainer = build_trainer("gigpo", TASK, dtype="float64", seed=2, config=config)
    rollout = trainer.rollout()
    whole = trainer.prepare(rollout)
    config.micro_batch_rows = 5
    split = trainer.prepare(rollout)
    assert len(whole.batches) == 1 and len(split.batches) > 1
    whole_stats, whole_grads = trainer_gradients(trainer, whole, True)
    split_stats, split_grads = trainer_gradients(trainer, split, True)
    assert abs(whole_stats["loss"] - split_stats["loss"]) <= 1e-12
    assert_same_gradients(split_grads, whole_grads)


@pytest.mark.parametrize("algo", ["gigpo", "grpo"])
def test_verify_equivalence_command_on_history(algo, capsys):
    assert main(["--algo", algo, "--task", TASK, "--verify-equivalence", "--dtype", "float64", "--group-size", "3",
                 "--prompts-per-step", "2"]) == 0
    out = capsys.readouterr().out
    assert "a prefix tree per micro-batch" in out and "tolerance (torch.float64): 1e-10 -> PASS" in out


def test_command_reports_tokens_saved(tmp_path):
    assert main(["--algo", "gigpo", "--task", TASK, "--steps", "2", "--out", str(tmp_path), "--group-size", "2",
                 "--prompts-per-step", "2"]) == 0
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    for record in records:
        assert record["tokens_saved"] == record["tokens_unpacked"] - record["tokens_packed"] > 0
        assert {"success_rate", "invalid_frac"} <= record.keys()


def test_build_trainer_passes_task_options():
    trainer = build_trainer("gigpo", TASK, config=TrainConfig(**SMALL),
                            task_options={"max_steps": 6, "invalid_penalty": -0.5})
    assert (trainer.task.max_steps, trainer.task.invalid_penalty) == (6, -0.5)
    assert int(trainer.rollout().rows.time.max()) < 6
    with pytest.raises(TypeError, match="task_options must be a mapping of keyword options, got list"):
        build_trainer("gigpo", TASK, task_options=[("max_steps", 6)])
    with pytest.raises(TypeError, match="unexpected keyword argument 'steps'"):
        build_trainer("gigpo", TASK, task_options={"steps": 6})


def test_tree_and_unpacked_runs_of_one_seed_sample_the_same_rollouts(tmp_path):
    """What scripts/train_history.sh records at full length: from one seed, the run whose
    log-probs come from the prefix tree and the --no-prefix-grouper one update alike, so every
    step samples the same episodes; the tree run forwards fewer tokens."""
    args = ["--algo", "gigpo", "--task", TASK, "--steps", "4", "--group-size", "3", "--prompts-per-step", "2",
            "--seed", "5", "--dtype", "float64"]
    tree, unpacked = str(tmp_path / "tree"), str(tmp_path / "unpacked")
    assert main(args + ["--out", tree]) == 0
    assert main(args + ["--out", unpacked, "--no-prefix-grouper"]) == 0
    rows = [run_costs(tree, grouped=True, wall_s=1.25, reference_dir=tree, window=2),
            run_costs(unpacked, grouped=False, wall_s=2.5, reference_dir=tree, window=2)]
    assert [r["steps_same_rollouts"] for r in rows] == [4, 4]
    tree_row, unpacked_row = rows
    assert all(tree_row[key] == unpacked_row[key] for key in ("tokens_packed", "tokens_unpacked"))
    assert tree_row["tokens_forwarded"] == tree_row["tokens_packed"] < unpacked_row["tokens_forwarded"]
    assert unpacked_row["tokens_forwarded"] == unpacked_row["tokens_unpacked"]
    assert (rows[0]["log_probs"], rows[1]["log_probs"], rows[1]["wall_s"]) == ("grouped", "unpacked", 2.5)
    path = tmp_path / "runs.csv"
    write_run_costs(str(path), rows)
    lines = path.read_text().splitlines()
    assert lines[0].split(",") == list(rows[0]) and len(lines) == 3
    plot = plot_runs(str(tmp_path / "runs.png"), {"tree": tree, "unpacked": unpacked}, "title")
    assert plot is None or (tmp_path / "runs.png").stat().st_size > 0


def test_run_costs_counts_the_steps_before_the_rollouts_differ(tmp_path):
    record = dict(reward_mean=0.5, success_rate=0.5, invalid_frac=0.1, episode_steps=4.0, tokens_packed=10,
                  tokens_unpacked=30, seconds=0.5)
    for name, success in (("a", [0.5, 0.5, 0.5]), ("b", [0.5, 0.5, 0.75])):
        (tmp_path / name).mkdir()
        for step, value in enumerate(success, 1):
            append_metrics(str(tmp_path / name), {**record, "step": step, "success_rate": value})
    row = run_costs(str(tmp_path / "b"), grouped=False, wall_s=3.0, reference_dir=str(tmp_path / "a"), window=2)
    assert row["steps_same_rollouts"] == 2 and row["success_first2"] == 0.5 and row["success_last2"] == 0.625
    assert (row["tokens_forwarded"], row["step_seconds_sum"]) == (90, 1.5)
    assert "steps_same_rollouts" not in run_costs(str(tmp_path / "a"), grouped=True, wall_s=1.0, window=3)
    with pytest.raises(ValueError, match="has 3 steps, fewer than window=4"):
        run_costs(str(tmp_path / "a"), grouped=True, wall_s=1.0, window=4)
    with pytest.raises(ValueError, match="window must be >= 1, got 0"):
        run_costs(str(tmp_path / "a"), grouped=True, wall_s=1.0, window=0)
    with pytest.raises(ValueError, match="rows is empty"):
        write_run_costs(str(tmp_path / "x.csv"), [])
    plot = plot_runs(str(tmp_path / "ab.png"), {"a": str(tmp_path / "a"), "b": str(tmp_path / "b")}, "a vs b")
    assert plot is None or (tmp_path / "ab.png").stat().st_size > 0  # with the step-3 divergence marked


def test_trl_drop_in_shares_a_system_prompt_across_groups(tmp_path):
    """TRL's rows whose prompts (of different groups) open with one 40-token system prompt: the
    drop-in packs it once per forward, and its log-probs and entropies stay TRL's."""
    trl = pytest.importorskip("trl")
    from test_trl_integration import PAD, TOL, WORDS, make_trainer, save_tiny_model

    from prefix_grouper.integrations.trl import MIN_SHARED_TOKENS, GRPOTrainer

    trainer = make_trainer(GRPOTrainer, save_tiny_model(tmp_path / "model"), tmp_path / "out")
    g = torch.Generator().manual_seed(4)
    vocab = 3 + len(WORDS)
    system = torch.randint(3, vocab, (40,), generator=g)
    prompt_lens, completion_lens = (5, 2, 7), [[3, 6, 1], [6, 4], [2, 5]]
    width = 40 + max(prompt_lens)
    rows, masks = [], []
    for p, lens in zip(prompt_lens, completion_lens):
        prompt = torch.cat([system, torch.randint(3, vocab, (p,), generator=g)])
        for s in lens:
            completion = torch.where(torch.arange(6) < s, torch.randint(3, vocab, (6,), generator=g), PAD)
            rows.append(torch.cat([torch.full((width - len(prompt),), PAD), prompt, completion]))
            masks.append(torch.cat([torch.arange(width) >= width - len(prompt), torch.arange(6) < s]))
    input_ids, attention_mask = torch.stack(rows), torch.stack(masks).long()
    packed_tokens = []
    hook = trainer.model.model.register_forward_hook(
        lambda module, args, kwargs, out: packed_tokens.append(kwargs["input_ids"].shape[1]), with_kwargs=True)
    try:
        grouped = trainer._get_per_token_logps_and_entropies(trainer.model, input_ids, attention_mask, 6,
                                                             compute_entropy=True)
        trainer.share_across_groups = False  # one level: each group's prompt packed on its own
        one_level = trainer._get_per_token_logps_and_entropies(trainer.model, input_ids, attention_mask, 6,
                                                               compute_entropy=True)
    finally:
        hook.remove()
    expected = trl.GRPOTrainer._get_per_token_logps_and_entropies(trainer, trainer.model, input_ids, attention_mask,
                                                                  6, compute_entropy=True)
    # The system prompt once, each group's other prompt tokens but its last once, and per
    # completion the prompt's last token and its own tokens.
    completions = sum(len(lens) + sum(lens) for lens in completion_lens)
    assert 40 >= MIN_SHARED_TOKENS
    assert packed_tokens == [40 + sum(p - 1 for p in prompt_lens) + completions,
                             sum(40 + p - 1 for p in prompt_lens) + completions]
    for result in (grouped, one_level):
        torch.testing.assert_close(result[0], expected[0], rtol=TOL, atol=TOL)
        torch.testing.assert_close(result[1], expected[1], rtol=TOL, atol=TOL)
