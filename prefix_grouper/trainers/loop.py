"""The one training loop the GRPO, CRPO and GiGPO trainers share.

Per step: roll out (prompts x G completions, or G episodes per reset state); compute the
algorithm's advantages over the whole batch (all ranks); then ``num_iterations`` optimizer
steps on it, the old log-probs recorded before the first. Log-probs come from one grouped
forward per micro-batch (``completion_log_probs`` on the layout; ``sequence_log_probs`` on a
prefix tree of the rows' ``prompt + completion`` for an environment with history) or from the
unpacked rows.
"""
from __future__ import annotations

import contextlib
import copy
import random
import time
from dataclasses import dataclass
from typing import Protocol

import torch

from ..layout import GroupLayout
from ..models.packed import completion_log_probs, sequence_log_probs
from ..micro_batches import group_row_ranges, micro_batch_groups
from ..unpacked import unpacked_completion_log_probs
from .distributed import Distributed
from .loss import micro_batch_share, policy_loss
from .model import Policy
from .rollout import Rollout, RolloutRows, sample_episodes, sample_task
from .tasks import Environment, Task

__all__ = ["Algorithm", "MicroBatch", "Prepared", "TrainConfig", "Trainer"]


@dataclass
class TrainConfig:
    """Hyper-parameters of the loop; the defaults are the CLI's (tuned for the tiny model on CPU)."""
    group_size: int = 8
    prompts_per_step: int = 8        # per rank: prompts (tasks) or reset states (environments)
    lr: float = 1e-3
    num_iterations: int = 1
    loss_type: str = "grpo"
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    beta: float = 0.0
    temperature: float = 1.0
    micro_batch_rows: int = 512      # rows per grouped forward; a larger group gets one of its own
    use_prefix_grouper: bool = True
    attention_backend: str = "auto"


class Algorithm(Protocol):
    """What makes GRPO, CRPO and GiGPO differ: the advantage of every row."""
    name: str

    def advantages(self, rows: RolloutRows) -> torch.Tensor:
        """``[N]`` float64 advantages of the batch's rows."""


@dataclass
class MicroBatch:
    """Whole prefix groups of a rollout: ``layout`` and the ids it packs, rows ``start:stop``.

    A history rollout's micro-batch also has ``tree``, the prefix tree of its rows'
    ``prompt + completion`` sequences (``GroupLayout.from_sequences``), and ``packed_ids``,
    its packed tokens: the grouped forward runs on the tree, the unpacked one on ``layout``
    (one group per row)."""
    layout: GroupLayout
    prompt_ids: list[torch.Tensor]
    completion_ids: list[torch.Tensor]
    start: int
    stop: int
    tree: GroupLayout | None = None
    packed_ids: torch.Tensor | None = None

    @property
    def packed_tokens(self) -> int:
        """Tokens of the grouped forward: the tree's, or the layout's."""
        return (self.tree or self.layout).total_tokens


@dataclass
class Prepared:
    """What the updates of one rollout need: ``advantages`` ``[N]`` (this rank's rows),
    the micro-batches, and per micro-batch ``[n, max_S]`` old and reference log-probs
    (None when not needed: a single iteration, or beta = 0)."""
    advantages: torch.Tensor
    batches: list[MicroBatch]
    old_log_probs: list[torch.Tensor] | None
    ref_log_probs: list[torch.Tensor] | None


class Trainer:
    """Rollout, advantages and policy updates of one algorithm on one task or environment."""

    def __init__(self, policy: Policy, task: Task | Environment, algorithm: Algorithm, config: TrainConfig,
                 *, seed: int = 0, dist: Distributed = Distributed()) -> None:
        self.policy, self.task, self.algorithm, self.config, self.dist = policy, task, algorithm, config, dist
        self.device = policy.model.device
        self.model = dist.wrap(policy.model)
        self.optimizer = torch.optim.Adam(policy.model.parameters(), lr=config.lr)
        # Frozen copy of the initial policy, only when the KL penalty needs it.
        self.reference = copy.deepcopy(policy.model).requires_grad_(False) if config.beta > 0 else None
        self.rng = random.Random(seed * 1_000_003 + dist.rank)  # ranks roll out different prompts

    # ------------------------------------------------------------------ rollout
    def rollout(self) -> Rollout:
        """This rank's rollout for one step, sampled from the current policy."""
        c = self.config
        sample = sample_episodes if isinstance(self.task, Environment) else sample_task
        count = "num_groups" if isinstance(self.task, Environment) else "num_prompts"
        self.policy.model.eval()
        return sample(self.policy, self.task, self.rng, group_size=c.group_size, temperature=c.temperature,
                      device=self.device, **{count: c.prompts_per_step})

    def micro_batches(self, rollout: Rollout) -> list[MicroBatch]:
        """Consecutive whole prefix groups of at most ``micro_batch_rows`` rows (a bigger group alone)."""
        rows_of_group = group_row_ranges(rollout.group_sizes)
        batches = []
        for groups in micro_batch_groups(rollout.group_sizes, max_rows=self.config.micro_batch_rows):
            start, stop = rows_of_group[groups.start].start, rows_of_group[groups.stop - 1].stop
            prompts = rollout.prompt_ids[groups.start:groups.stop]
            suffix_lens = [[len(rollout.completion_ids[r]) for r in rows_of_group[g]] for g in groups]
            layout = GroupLayout.from_lengths([len(p) for p in prompts], suffix_lens, device=self.device)
            batch = MicroBatch(layout, prompts, rollout.completion_ids[start:stop], start, stop)
            if rollout.history:
                sequences = [torch.cat([p, c]) for p, c in zip(batch.prompt_ids, batch.completion_ids)]
                batch.tree = GroupLayout.from_sequences(sequences, device=self.device)
                batch.packed_ids = batch.tree.pack_sequences(sequences)
            batches.append(batch)
        return batches

    # ------------------------------------------------------------------ update
    def log_probs(self, model, batch: MicroBatch, use_prefix_grouper: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """``(log_probs [n, max_S], mask [n, max_S])`` of the micro-batch's completions."""
        if use_prefix_grouper and batch.tree is not None:
            return sequence_log_probs(model, batch.tree, batch.packed_ids, [len(c) for c in batch.completion_ids],
                                      backend=self.config.attention_backend, temperature=self.config.temperature)
        if use_prefix_grouper:
            return completion_log_probs(model, batch.layout, batch.prompt_ids, batch.completion_ids,
                                        backend=self.config.attention_backend,
                                        temperature=self.config.temperature)
        return unpacked_completion_log_probs(model, batch.layout, batch.prompt_ids, batch.completion_ids,
                                             temperature=self.config.temperature)

    def advantages(self, rollout: Rollout) -> torch.Tensor:
        """``[N]`` advantages of this rank's rows, from the statistics of every rank's rows."""
        rows, first_row = self.dist.gather_rows(rollout.rows)
        values = self.algorithm.advantages(rows)
        return values[first_row:first_row + rollout.num_rows]

    def prepare(self, rollout: Rollout) -> "Prepared":
        """Advantages, micro-batches and the recorded old / reference log-probs of ``rollout``."""
        c = self.config
        batches = self.micro_batches(rollout)

        def recorded(model) -> list[torch.Tensor]:
            with torch.no_grad():
                return [self.log_probs(model, b, c.use_prefix_grouper)[0] for b in batches]

        # One update per batch needs no recorded old log-probs: rho = 1 at the first iteration.
        self.policy.model.train()
        return Prepared(self.advantages(rollout), batches,
                        recorded(self.model) if c.num_iterations > 1 else None,
                        recorded(self.reference) if self.reference is not None else None)

    def accumulate_gradients(self, prepared: "Prepared", *, use_prefix_grouper: bool) -> dict[str, float]:
        """Backward of the batch's loss, micro-batch by micro-batch, into the parameters' ``.grad``.

        Each micro-batch's loss is weighted so that the sum over micro-batches and ranks is
        :func:`policy_loss` of the whole global batch, times the world size (DDP averages).
        Returns the global loss and token means (kl, ratio, clip fractions, entropy).
        """
        c, batches = self.config, prepared.batches
        tokens = [sum(len(x) for x in b.completion_ids) for b in batches]
        rows_total, tokens_total = self.dist.all_sum([float(batches[-1].stop), float(sum(tokens))], self.device)
        # The loss runs in float32 (float64 for a float64 model) whatever the model's dtype,
        # as TRL's does: policy_loss upcasts the log-probs, the advantages come in that dtype.
        advantages = prepared.advantages.to(self.device, torch.promote_types(self.policy.model.dtype, torch.float32))
        # Summed on the device in float64 and read back once per step: a read per micro-batch
        # would wait for its backward before the next micro-batch's forward could be queued.
        sums = {key: torch.zeros((), dtype=torch.float64, device=self.device)
                for key in ("loss", "kl", "ratio", "clip_frac", "clip_frac_low", "clip_frac_high", "entropy")}
        for i, batch in enumerate(batches):
            share = micro_batch_share(c.loss_type, batch.stop - batch.start, tokens[i], rows_total, tokens_total)
            last = i == len(batches) - 1
            with contextlib.nullcontext() if last or not self.dist.enabled else self.model.no_sync():
                log_probs, mask = self.log_probs(self.model, batch, use_prefix_grouper)
                loss, stats = policy_loss(
                    log_probs, None if prepared.old_log_probs is None else prepared.old_log_probs[i],
                    advantages[batch.start:batch.stop], mask, loss_type=c.loss_type, epsilon_low=c.epsilon_low,
                    epsilon_high=c.epsilon_high, beta=c.beta,
                    ref_log_probs=None if prepared.ref_log_probs is None else prepared.ref_log_probs[i],
                    max_completion_length=self.task.max_new_tokens, num_items_in_batch=tokens_total)
                (loss * (share * self.dist.world_size)).backward()
            sums["loss"] += loss.detach().double() * share
            for key, value in stats.items():
                sums[key] += value.detach().double() * tokens[i]
            # Sampled-token estimate of the per-token entropy: -E[log p] under the policy.
            sums["entropy"] -= (log_probs.detach() * mask).sum().double()
        totals = dict(zip(sums, self.dist.all_sum(torch.stack(list(sums.values())).tolist(), self.device)))
        return {key: value if key == "loss" else value / max(tokens_total, 1.0) for key, value in totals.items()}

    def train_step(self, rollout: Rollout) -> dict[str, float]:
        """``num_iterations`` optimizer steps on ``rollout``; the step's metrics (global means)."""
        prepared = self.prepare(rollout)
        per_iteration = []
        for _ in range(self.config.num_iterations):
            self.optimizer.zero_grad(set_to_none=True)
            per_iteration.append(self.accumulate_gradients(prepared, use_prefix_grouper=self.config.use_prefix_grouper))
            self.optimizer.step()
        metrics = {key: sum(m[key] for m in per_iteration) / len(per_iteration) for key in per_iteration[0]}
        metrics["entropy"] = per_iteration[0]["entropy"]  # of the sampling policy
        batches = prepared.batches
        packed, unpacked = self.dist.all_sum([float(sum(b.packed_tokens for b in batches)),
                                              float(sum(b.layout.unpacked_tokens() for b in batches))], self.device)
        metrics.update(tokens_packed=int(packed), tokens_unpacked=int(unpacked), tokens_saved=int(unpacked - packed))
        return metrics

    def step(self) -> dict[str, float]:
        """One rollout and update: reward metrics of every rank's rows, then the update's metrics."""
        started = time.perf_counter()
        rollout = self.rollout()
        rows, _ = self.dist.gather_rows(rollout.rows)
        metrics = reward_metrics(rows, getattr(self.task, "channels", ()))
        metrics.update(self.train_step(rollout))
        metrics["seconds"] = time.perf_counter() - started
        return metrics


def reward_metrics(rows: RolloutRows, channels: tuple[str, ...]) -> dict[str, float]:
    """``reward_mean`` (mean outcome reward per trajectory), ``reward/<channel>`` for tasks;
    ``success_rate``, ``invalid_frac`` and ``episode_steps`` for environments."""
    _, traj, counts = torch.unique(rows.traj, return_inverse=True, return_counts=True)
    num_traj = counts.numel()
    per_traj_weight = 1.0 / counts[traj].double()  # a trajectory counts once, however many rows it has
    metrics = {"reward_mean": float((rows.reward * per_traj_weight).sum() / num_traj)}
    for k, name in enumerate(channels):
        metrics[f"reward/{name}"] = float(rows.channels[:, k].mean())
    if rows.success is not None:
        metrics.update(success_rate=float((rows.success * per_traj_weight).sum() / num_traj),
                       invalid_frac=float(rows.invalid.mean()), episode_steps=len(traj) / num_traj)
    return metrics
