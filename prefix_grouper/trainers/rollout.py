"""Rollouts: G sampled completions per prompt (tasks) or per-step rows of G episodes (environments).

A :class:`Rollout` is laid out the way the grouped forward wants it: B prefix groups, each one
prompt and its consecutive rows. For a task a group is a prompt and its G completions; for an
environment it is an anchor group (the rows of one episode group whose observation is the
same), so GiGPO's step groups and the layout's prefix groups coincide.
"""
from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from typing import Callable

import torch
from transformers import GenerationConfig

from ..advantages import anchor_index_from_states
from ..micro_batches import group_row_ranges
from .model import Policy
from .tasks import Environment, Task

__all__ = ["Rollout", "RolloutRows", "generate", "sample_episodes", "sample_task"]


@dataclass
class RolloutRows:
    """Per-row CPU tensors ``[N]`` (``channels``: ``[N, K]``) for advantages and metrics.

    Always set: ``group`` (int64 id of the task group: a prompt, or the episodes of one reset
    state), ``traj`` (int64 id of the trajectory; a completion is its own) and ``reward``
    (float64 outcome reward: the weighted channels, or the episode return on every step row).
    Tasks set ``channels`` (float64 channel scores); environments set ``anchor`` (int64 id of
    the anchor state), ``time`` (int64 step index in the episode), ``step_reward``,
    ``success`` (the episode's, on all its rows) and ``invalid`` (float64 each).
    """
    group: torch.Tensor
    traj: torch.Tensor
    reward: torch.Tensor
    channels: torch.Tensor | None = None
    anchor: torch.Tensor | None = None
    time: torch.Tensor | None = None
    step_reward: torch.Tensor | None = None
    success: torch.Tensor | None = None
    invalid: torch.Tensor | None = None

    # Identifiers: equal values mean the same group / trajectory / anchor state. Batches of
    # several ranks keep them distinct by remapping them (Distributed.gather_rows); every
    # other field is a value and is never remapped.
    ID_FIELDS = ("group", "traj", "anchor")

    def __post_init__(self) -> None:
        n = len(self.group)
        for name, value in self._fields():
            if not isinstance(value, torch.Tensor) or value.shape[:1] != (n,):
                raise ValueError(f"RolloutRows.{name} must be a tensor of {n} rows (as group), got "
                                 f"{tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__}")
        for name in self.ID_FIELDS:
            value = getattr(self, name)
            if value is not None and value.dtype != torch.int64:
                raise TypeError(f"RolloutRows.{name} is an id and must be int64, got {value.dtype}")

    def __len__(self) -> int:
        return len(self.group)

    def __getitem__(self, name: str) -> torch.Tensor:
        """``rows["reward"]``: read access by field name, for code written against dict rows."""
        value = getattr(self, name, None) if name in self._names() else None
        if value is None:
            raise KeyError(f"{name!r}: these rows have {', '.join(n for n, _ in self._fields())}")
        return value

    def __contains__(self, name: str) -> bool:
        return name in self._names() and getattr(self, name) is not None

    @classmethod
    def _names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    def _fields(self) -> list[tuple[str, torch.Tensor]]:
        """The fields that are set, as ``(name, tensor)``."""
        return [(name, getattr(self, name)) for name in self._names() if getattr(self, name) is not None]

    def map(self, function: Callable[[str, torch.Tensor], torch.Tensor]) -> "RolloutRows":
        """A copy with ``function(name, tensor)`` applied to every field that is set."""
        return dataclasses.replace(self, **{name: function(name, value) for name, value in self._fields()})

    def index_select(self, index: torch.Tensor) -> "RolloutRows":
        """The rows ``index`` (int64 ``[M]``), in that order."""
        return self.map(lambda _, value: value.index_select(0, index))

    @classmethod
    def cat(cls, parts: list["RolloutRows"]) -> "RolloutRows":
        """The rows of ``parts`` one after the other; they must set the same fields."""
        names = [tuple(name for name, _ in part._fields()) for part in parts]
        if any(n != names[0] for n in names):
            raise ValueError(f"RolloutRows.cat needs parts with the same fields, got {sorted(set(names))}")
        return cls(**{name: torch.cat([getattr(part, name) for part in parts]) for name in names[0]})


@dataclass
class Rollout:
    """``N`` training rows in ``B`` prefix groups.

    ``prompt_ids``: B tensors ``[P_b]``; ``completion_ids``: N tensors ``[S_j]``, group by
    group; ``group_sizes``: B row counts; ``rows``: the per-row values (:class:`RolloutRows`).
    """
    prompt_ids: list[torch.Tensor]
    completion_ids: list[torch.Tensor]
    group_sizes: list[int]
    rows: RolloutRows
    # True for an environment with history: every row is its own prefix group (one prompt per
    # row), and rows share history prefixes across groups, which the trainer packs as a tree.
    history: bool = False

    @property
    def num_rows(self) -> int:
        return len(self.completion_ids)

    def select_groups(self, groups: list[int]) -> "Rollout":
        """The prefix groups ``groups`` (indices into ``group_sizes``), in that order."""
        ranges = group_row_ranges(self.group_sizes)
        row_index = [r for b in groups for r in ranges[b]]
        index = torch.tensor(row_index, dtype=torch.long)
        return Rollout([self.prompt_ids[b] for b in groups], [self.completion_ids[r] for r in row_index],
                       [self.group_sizes[b] for b in groups], self.rows.index_select(index), self.history)


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

    ``rows.channels``: ``[N, K]`` float64 channel scores.
    """
    prompts = [task.sample(rng) for _ in range(num_prompts)]
    prompt_ids = [policy.prompt_ids(p.text, device) for p in prompts]
    completions = generate(policy, [ids for ids in prompt_ids for _ in range(group_size)],
                           max_new_tokens=task.max_new_tokens, temperature=temperature)
    scores = torch.tensor([task.score(prompts[j // group_size], policy.tokenizer.decode(c.tolist()))
                           for j, c in enumerate(completions)], dtype=torch.float64)
    num_rows = num_prompts * group_size
    rows = RolloutRows(group=torch.arange(num_prompts).repeat_interleave(group_size), traj=torch.arange(num_rows),
                       reward=scores @ torch.tensor(task.weights, dtype=torch.float64), channels=scores)
    return Rollout(prompt_ids, completions, [group_size] * num_prompts, rows)


def sample_episodes(policy: Policy, env: Environment, rng: random.Random, *, num_groups: int, group_size: int,
                    temperature: float, device: torch.device) -> Rollout:
    """``group_size`` episodes from each of ``num_groups`` reset states, every step a row.

    All live episodes act in one ``generate`` call per time step. Rows are regrouped into
    anchor groups (identical observation within an episode group); ``rows`` also holds
    ``anchor``, ``time``, ``step_reward``, ``success`` and ``invalid`` (see :class:`RolloutRows`).
    An environment with ``history`` prompts each step with its trajectory's previous prompt,
    action ids and the new observation; its rollout has one prefix group per row
    (``Rollout.history``), in the same anchor order.
    """
    starts = [env.reset(rng) for _ in range(num_groups)]
    states = [starts[t // group_size] for t in range(num_groups * group_size)]
    records = []  # (traj, time, observation, prompt ids, action ids, reward, invalid)
    histories: list[torch.Tensor | None] = [None] * len(states)  # last prompt + action, per trajectory
    live = list(range(len(states)))
    for time in range(env.max_steps):
        observations = [env.observe(states[t]) for t in live]
        prompt_ids = [policy.prompt_ids(o, device) if histories[t] is None else
                      torch.cat([histories[t], torch.tensor(policy.tokenizer.encode(o), dtype=torch.long,
                                                            device=device)])
                      for t, o in zip(live, observations)]
        actions = generate(policy, prompt_ids, max_new_tokens=env.max_new_tokens, temperature=temperature)
        still_live = []
        for t, observation, prompt, action in zip(live, observations, prompt_ids, actions):
            states[t], reward, done, invalid = env.step(states[t], policy.tokenizer.decode(action.tolist()))
            records.append((t, time, observation, prompt, action, reward, invalid))
            if env.history:
                histories[t] = torch.cat([prompt, action])
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
    rows = RolloutRows(group=group, traj=traj, reward=episode_return[traj], anchor=anchor,
                       time=torch.tensor([r[1] for r in records]), step_reward=step_reward, success=success[traj],
                       invalid=torch.tensor([float(r[6]) for r in records], dtype=torch.float64))
    rows = rows.index_select(order)
    sorted_records = [records[i] for i in order.tolist()]
    if env.history:
        return Rollout([r[3] for r in sorted_records], [r[4] for r in sorted_records], [1] * len(sorted_records),
                       rows, history=True)
    group_sizes = torch.unique_consecutive(rows.anchor, return_counts=True)[1].tolist()
    first_rows = torch.cumsum(torch.tensor([0] + group_sizes[:-1]), 0).tolist()
    return Rollout([sorted_records[i][3] for i in first_rows], [r[4] for r in sorted_records], group_sizes, rows)
