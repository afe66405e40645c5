"""Two gloo processes take the single-process step: whole groups per rank, batch-wide statistics
all-reduced, DDP's gradient average equal to the one-process gradient of the whole batch."""
import os
import random
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from prefix_grouper.trainers import GRPO, Distributed, TrainConfig, build_trainer
from prefix_grouper.trainers.rollout import sample_task

WORLD_SIZE = 2
RANK_GROUPS = [[0, 1], [2]]  # uneven on purpose: 6 and 3 rows
# Every loss type's normalizer, and TRL's batch-std advantages, span ranks.
CASES = [("grpo", "group"), ("dapo", "batch"), ("bnpo", "batch"), ("dr_grpo", "group")]


def one_step_gradients(loss_type, scale, rank_groups, dist_context):
    """Gradient of one update on this rank's groups of a fixed 3-prompt x 3-completion batch."""
    config = TrainConfig(group_size=3, prompts_per_step=3, loss_type=loss_type, micro_batch_rows=3)
    trainer = build_trainer("grpo", dtype="float64", seed=0, config=config, dist=dist_context)
    trainer.algorithm = GRPO("trl", scale=scale)
    torch.manual_seed(5)  # the same completions in every process
    rollout = sample_task(trainer.policy, trainer.task, random.Random(0), num_prompts=3, group_size=3,
                          temperature=1.0, device=torch.device("cpu"))
    prepared = trainer.prepare(rollout.select_groups(rank_groups))
    trainer.optimizer.zero_grad(set_to_none=True)
    stats = trainer.accumulate_gradients(prepared, use_prefix_grouper=True)
    return stats, {n: p.grad for n, p in trainer.policy.model.named_parameters()}


def worker(rank, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE)
    try:
        results = {case: one_step_gradients(*case, RANK_GROUPS[rank], Distributed(rank, WORLD_SIZE))
                   for case in CASES}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("ddp"))
    mp.spawn(worker, args=(free_port(), out_dir), nprocs=WORLD_SIZE, join=True)
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(WORLD_SIZE)]


@pytest.mark.parametrize("case", CASES)
def test_two_ranks_take_the_single_process_step(case, rank_results):
    stats, grads = one_step_gradients(*case, [0, 1, 2], Distributed())
    for rank, results in enumerate(rank_results):
        rank_stats, rank_grads = results[case]
        # float64; ranks sum partial losses in another order than one process: ~1e-16 relative.
        assert abs(rank_stats["loss"] - stats["loss"]) <= 1e-12 * max(1.0, abs(stats["loss"])), rank
        for key in ("kl", "ratio", "entropy"):
            assert abs(rank_stats[key] - stats[key]) <= 1e-12 * max(1.0, abs(stats[key])), (rank, key)
        for name, grad in grads.items():
            scale = grad.abs().max().item()
            assert (rank_grads[name] - grad).abs().max().item() <= 1e-10 * scale, (rank, name)
    assert any(g.abs().max() > 0 for g in grads.values())
