"""GiGPO environment: a 1-D corridor with a key and a locked door at its right end.

Observation (the raw state), e.g. "a.kd" for length 4 (the default): cells 0..length-2 are walkable
("." empty, "a" agent, "k" key, "K" agent standing on the key), the last cell is the door
("d" locked, "D" open). A held key appears nowhere on the map. Actions are one character:
"l" / "r" walk, "p" picks up the key under the agent, "o" opens the door from the cell next
to it with the key held (reward 1, episode done). Any other action is invalid: reward
``invalid_penalty``, state unchanged. The state space is small, so states recur across the
trajectories of a group and within one, which is what GiGPO's anchor groups need.
"""
from __future__ import annotations

import random
from typing import ClassVar, NamedTuple

from ...checks import check_finite_real, check_int
from .base import Environment, check_completion, check_rng

ACTIONS = "lrpo"
EMPTY, AGENT, KEY, AGENT_ON_KEY, DOOR_LOCKED, DOOR_OPEN = ".akKdD"


class KeyDoorState(NamedTuple):
    """Agent cell, key cell (None once held) and whether the door is open."""
    agent: int
    key: int | None
    door_open: bool


class KeyDoorEnvironment(Environment):
    """Corridor of ``length`` cells (the last is the door); episodes are cut after ``max_steps`` steps."""
    name = "keydoor"
    # Every action is one character, so one token completes it: no EOS to learn first, which
    # makes a random-init policy's actions parseable 4 times in 13 instead of about 1 in 40.
    max_new_tokens = 1

    # Defaults from probes (2-layer 64-wide Qwen2, plain GiGPO, one update per batch of 4 reset
    # states x 8 episodes, lr 1e-3, 120 steps), 4 cells and 8 steps: with invalid_penalty -0.02
    # the success rate went from under 1% (first 20 steps) to 99-100% (last 20) in each of seeds
    # 0, 1 and 2. With -0.1 the return rose from -0.58 to 0 but success stayed near 0 (found in 1 run
    # of 3): 'p' and 'o', invalid almost everywhere, were unlearned before a success was sampled,
    # and neither temperature 1.5 nor G = 16 changed that. 3 cells are solved with -0.1 too.
    def __init__(self, *, length: int = 4, max_steps: int = 8, invalid_penalty: float = -0.02) -> None:
        # Two walkable cells at least, so the agent and the key can start apart.
        self.length = check_int(length, "length", 3)
        # Worst start: agent next to the door, key at the far end: walk there, pick, walk back, open.
        longest_optimal_episode = 2 * (self.length - 2) + 2
        self.max_steps = check_int(max_steps, "max_steps", longest_optimal_episode)
        self.invalid_penalty = check_finite_real(invalid_penalty, "invalid_penalty")
        if self.invalid_penalty > 0:
            raise ValueError(f"invalid_penalty must be <= 0 (a penalty), got {self.invalid_penalty}")
        self.alphabet = EMPTY + AGENT + KEY + AGENT_ON_KEY + DOOR_LOCKED + DOOR_OPEN + ACTIONS

    @property
    def door_side(self) -> int:
        """The walkable cell next to the door."""
        return self.length - 2

    def reset(self, rng: random.Random) -> KeyDoorState:
        check_rng(rng)
        agent, key = rng.sample(range(self.length - 1), 2)
        return KeyDoorState(agent, key, False)

    def observe(self, state: KeyDoorState) -> str:
        self._check_state(state)
        cells = [EMPTY] * (self.length - 1)
        if state.key is not None:
            cells[state.key] = KEY
        cells[state.agent] = AGENT_ON_KEY if state.agent == state.key else AGENT
        return "".join(cells) + (DOOR_OPEN if state.door_open else DOOR_LOCKED)

    def step(self, state: KeyDoorState, action: str) -> tuple[KeyDoorState, float, bool, bool]:
        self._check_state(state)
        if state.door_open:
            raise ValueError("state is terminal (the door is open): the episode is over, reset instead")
        check_completion(action)
        agent, key = state.agent, state.key
        if action == "l" and agent > 0:
            return KeyDoorState(agent - 1, key, False), 0.0, False, False
        if action == "r" and agent < self.door_side:
            return KeyDoorState(agent + 1, key, False), 0.0, False, False
        if action == "p" and key == agent:
            return KeyDoorState(agent, None, False), 0.0, False, False
        if action == "o" and key is None and agent == self.door_side:
            return KeyDoorState(agent, None, True), 1.0, True, False
        # Unparseable, into a wall or the locked door, picking where no key lies, opening without
        # the key or away from the door.
        return state, self.invalid_penalty, False, True

    def success(self, state: KeyDoorState) -> bool:
        self._check_state(state)
        return state.door_open

    def _check_state(self, state: KeyDoorState) -> None:
        if not isinstance(state, KeyDoorState):
            raise TypeError(f"state must be a KeyDoorState from reset or step, got {type(state).__name__}")
        walkable = range(self.length - 1)
        if state.agent not in walkable or (state.key is not None and state.key not in walkable):
            raise ValueError(f"state {state} has a cell outside this corridor's walkable cells 0..{self.length - 2}")


class KeyDoorHistoryEnvironment(KeyDoorEnvironment):
    """The corridor, with the whole interaction history as every step's prompt: BOS, the first
    observation, then per step taken its action and the next observation ("a.kdr.akd..."). The
    anchor state of a step (GiGPO) is still its current observation. A batch's step rows share
    their trajectory's history, and its episodes share their common first steps: the trainer
    packs them as a prefix tree.

    Episodes default to 12 steps, not 8. A policy that reads its history can settle on patterns
    of its own past actions before it learns to read the current observation: undoing its last
    move avoids every invalid-action penalty without ever fetching the key, and trying to open
    the door from the door side goes on whether the key is held or not. With 8 steps, 2 more
    than the longest start needs, random episodes rarely open the door: the penalty then teaches
    the undo loop before successes teach anything, or a start whose episodes all fail alike
    gives its group no reward variance, hence no gradient. 12 steps make random successes
    likelier and leave 6 steps of slack, so an episode that tries another action where the
    policy is stuck can still finish. The runs per seed of both budgets are in
    benchmarks/results/training/keydoor_sweep.csv (scripts/keydoor_sweep.py).
    A whole episode, 1 + (length + 1) * max_steps tokens (61 by default), fits the tiny
    model's 64 positions.
    """
    name = "keydoor-history"
    history: ClassVar[bool] = True

    def __init__(self, *, length: int = 4, max_steps: int = 12, invalid_penalty: float = -0.02) -> None:
        super().__init__(length=length, max_steps=max_steps, invalid_penalty=invalid_penalty)
