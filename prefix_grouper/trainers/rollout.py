"""Rollouts: G sampled completions per prompt (tasks) or per-step rows of G episodes (environments).

A :class:`Rollout` is laid out the way the grouped forward wants it: B prefix groups, each one
prompt and its consecutive rows. For a task a group is a prompt and its G completions; for an
environment it is an anchor group (the rows of one episode group whose observation is the
same), so GiGPO's step groups and the layout's prefix groups coincide.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from transformers import GenerationConfig

from ..advantages import anchor_index_from_states
from .model import Policy
from .tasks import Environment, Task

__all__ = ["Rollout", "generate", "sample_episodes", "sample_task"]


@dataclass
class Rollout:
    """``N`` training rows in ``B`` prefix groups.

    ``prompt_ids``: B tensors ``[P_b]``; ``completion_ids``: N tensors ``[S_j]``, group by
    group; ``group_sizes``: B row counts; ``rows``: per-row CPU tensors ``[N]`` (or ``[N, K]``)
    for advantages and metrics: always ``group`` (int64 task group: a prompt, or the episodes
    of one reset state), ``traj`` (int64 trajectory; a completion is its own) and ``reward``
    (float64 outcome reward: the weighted channels, or the episode return on every step row).
    """
    prompt_ids: list[torch.Tensor]
    completion_ids: list[torch.Tensor]
    group_sizes: list[int]
    rows: dict[str, torch.Tensor]

    @property
    def num_rows(self) -> int:
        return len(self.completion_ids)

    def select_groups(self, groups: list[int]) -> "Rollout":
        """The prefix groups ``groups`` (indices into ``group_sizes``), in that order."""
        starts = [0]
        for size in self.group_sizes:
            starts.append(starts[-1] + size)
        row_index = [r for b in groups for r in range(starts[b], starts[b + 1])]
        index = torch.tensor(row_index, dtype=torch.long)
        return Rollout([self.prompt_ids[b] for b in groups], [self.completion_ids[r] for r in row_index],
                       [self.group_sizes[b] for b in groups],
                       {key: value.index_select(0, index) for key, value in self.rows.items()})


def generate(policy: Policy, prompts: list[torch.Tensor], *, max_new_tokens: int,
             temperature: float) -> list[torch.Tensor]:
    """One sampled completion per prompt (``[P_i]`` ids): ``[S_i]`` ids ending at the first EOS
    (kept, so the policy learns to stop), or ``max_new_tokens`` ids without one."""
    tokenizer = policy.tokenizer
    width = max(len(p) for p in prompts)
    device = prompts[0].device
    input_ids = torch.full((len(prompts), width), tokenizer.pad_id, dtype=torch.long, device=device)
    attention_mask = torch.zeros_like(input_ids)
    for i, prompt in enumerate(prompts):  # left padding: every row's next token is at the end
        input_ids[i, width - len(prompt):] = prompt
        attention_mask[i, width - len(prompt):] = 1
    # Sample from the temperature-scaled policy itself, the distribution the update's log-probs
    # are computed under. generate() fills every field a config leaves unset from the model's
    # own generation_config (a checkpoint's repetition_penalty, min_p, min_new_tokens...), so
    # that one is swapped for a config holding only these settings during the call.
    sampling = GenerationConfig(do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                                max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_id,
                                pad_token_id=tokenizer.pad_id)
    model_config, policy.model.generation_config = policy.model.generation_config, sampling
    try:
        with torch.no_grad():
            output = policy.model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                           generation_config=sampling)
    finally:
        policy.model.generation_config = model_config
    completions = []
    for row in output[:, width:].tolist():
        end = row.index(tokenizer.eos_id) + 1 if tokenizer.eos_id in row else len(row)
        completions.append(torch.tensor(row[:end], dtype=torch.long, device=device))
    return completions


def sample_task(policy: Policy, task: Task, rng: random.Random, *, num_prompts: int, group_size: int,
                temperature: float, device: torch.device) -> Rollout:
    """``num_prompts`` prompts with ``group_size`` completions each, scored on every channel.

    ``rows["channels"]``: ``[N, K]`` float64 channel scores.
    """
    prompts = [task.sample(rng) for _ in range(num_prompts)]
    prompt_ids = [policy.prompt_ids(p.text, device) for p in prompts]
    completions = generate(policy, [ids for ids in prompt_ids for _ in range(group_size)],
                           max_new_tokens=task.max_new_tokens, temperature=temperature)
    scores = torch.tensor([task.score(prompts[j // group_size], policy.tokenizer.decode(c.tolist()))
                           for j, c in enumerate(completions)], dtype=torch.float64)
    num_rows = num_prompts * group_size
    rows = {
        "group": torch.arange(num_prompts).repeat_interleave(group_size),
        "traj": torch.arange(num_rows),
        "channels": scores,
        "reward": scores @ torch.tensor(task.weights, dtype=torch.float64),
    }
    return Rollout(prompt_ids, completions, [group_size] * num_prompts, rows)


def sample_episodes(policy: Policy, env: Environment, rng: random.Random, *, num_groups: int, group_size: int,
                    temperature: float, device: torch.device) -> Rollout:
    """``group_size`` episodes from each of ``num_groups`` reset states, every step a row.

    All live episodes act in one ``generate`` call per time step. Rows are regrouped into
    anchor groups (identical observation within an episode group); extra ``rows``:
    ``anchor`` (int64), ``time`` (int64 step of the row), ``step_reward``, ``success`` and
    ``invalid`` (float64; success is the episode's, on all its rows).
    """
    starts = [env.reset(rng) for _ in range(num_groups)]
    states = [starts[t // group_size] for t in range(num_groups * group_size)]
    records = []  # (traj, time, observation, prompt ids, action ids, reward, invalid)
    live = list(range(len(states)))
    for time in range(env.max_steps):
        observations = [env.observe(states[t]) for t in live]
        prompt_ids = [policy.prompt_ids(o, device) for o in observations]
        actions = generate(policy, prompt_ids, max_new_tokens=env.max_new_tokens, temperature=temperature)
        still_live = []
        for t, observation, prompt, action in zip(live, observations, prompt_ids, actions):
            states[t], reward, done, invalid = env.step(states[t], policy.tokenizer.decode(action.tolist()))
            records.append((t, time, observation, prompt, action, reward, invalid))
            if not done:
                still_live.append(t)
        live = still_live
        if not live:
            break

    traj = torch.tensor([r[0] for r in records])
    group = traj // group_size
    step_reward = torch.tensor([r[5] for r in records], dtype=torch.float64)
    episode_return = torch.zeros(len(states), dtype=torch.float64).index_add_(0, traj, step_reward)
    success = torch.tensor([float(env.success(s)) for s in states], dtype=torch.float64)
    anchor = anchor_index_from_states([r[2] for r in records], group)
    # Anchor ids are numbered by first appearance: a stable sort makes each anchor group
    # one run of rows, which becomes one prefix group of the layout.
    order = torch.sort(anchor, stable=True).indices
    rows = {
        "group": group, "traj": traj, "time": torch.tensor([r[1] for r in records]), "anchor": anchor,
        "reward": episode_return[traj], "step_reward": step_reward, "success": success[traj],
        "invalid": torch.tensor([float(r[6]) for r in records], dtype=torch.float64),
    }
    rows = {key: value.index_select(0, order) for key, value in rows.items()}
    sorted_records = [records[i] for i in order.tolist()]
    group_sizes = torch.unique_consecutive(rows["anchor"], return_counts=True)[1].tolist()
    first_rows = torch.cumsum(torch.tensor([0] + group_sizes[:-1]), 0).tolist()
    return Rollout([sorted_records[i][3] for i in first_rows], [r[4] for r in sorted_records], group_sizes, rows)
