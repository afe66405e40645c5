"""Tokenizer, tasks and environment of the reference trainers: exact rewards on hand-made answers."""
import random

import pytest
import torch

from prefix_grouper.trainers.tasks import (ENVIRONMENTS, TASKS, Diagnosis, DiagnosisTask, DigitsTask,
                                           KeyDoorEnvironment, KeyDoorHistoryEnvironment, KeyDoorState, Prompt,
                                           make_task)
from prefix_grouper.trainers.tokenizer import CharTokenizer


# ---- tokenizer ---------------------------------------------------------------------------------

def test_tokenizer_ids_and_round_trip(tmp_path):
    tokenizer = CharTokenizer("ab>")
    assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.vocab_size) == (0, 1, 2, 6)
    assert tokenizer.encode("ba>") == [4, 3, 5]
    assert tokenizer.decode(tokenizer.encode("ba>")) == "ba>"
    # Stops at the first EOS, drops BOS and padding; accepts a tensor of ids.
    assert tokenizer.decode([1, 3, 0, 4, 2, 3, 0]) == "ab"
    assert tokenizer.decode(torch.tensor([4, 4, 2, 3])) == "bb"
    tokenizer.save(str(tmp_path / "tok"))
    loaded = CharTokenizer.load(str(tmp_path / "tok"))
    assert loaded.alphabet == "ab>" and loaded.encode("ab") == tokenizer.encode("ab")


@pytest.mark.parametrize("alphabet, error, match", [
    ("", ValueError, "empty"),
    ("aba", ValueError, "repeats character 'a'"),
    (["a", "b"], TypeError, "alphabet must be a str"),
])
def test_tokenizer_bad_alphabet(alphabet, error, match):
    with pytest.raises(error, match=match):
        CharTokenizer(alphabet)


def test_tokenizer_unknown_character_and_id():
    tokenizer = CharTokenizer("ab")
    with pytest.raises(ValueError, match="character 'x' at index 1"):
        tokenizer.encode("axyb")
    with pytest.raises(ValueError, match=r"ids\[1\] = 5 is outside the tokenizer's vocabulary \[0, 5\)"):
        tokenizer.decode([3, 5])
    with pytest.raises(TypeError):
        tokenizer.decode([3.0])


def test_tokenizer_load_refuses_other_special_tokens(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"special_tokens": ["<s>"], "alphabet": "ab"}')
    with pytest.raises(ValueError, match="special tokens"):
        CharTokenizer.load(str(tmp_path))


@pytest.mark.parametrize("name", [*TASKS, *ENVIRONMENTS])
def test_alphabet_covers_prompts_and_answers(name):
    """Every prompt, every correct answer (and every keydoor action) encodes with the task's tokenizer."""
    task = make_task(name)
    tokenizer = CharTokenizer(task.alphabet)
    rng = random.Random(0)
    for _ in range(50):
        if name in ENVIRONMENTS:
            tokenizer.encode(task.observe(task.reset(rng)) + "lrpo")
        else:
            prompt = task.sample(rng)
            tokenizer.encode(prompt.text + task.reference_answer(prompt))
            # max_new_tokens leaves room for the EOS after a correct answer.
            assert len(task.reference_answer(prompt)) + 1 <= task.max_new_tokens
            hash(prompt)


# ---- digits ------------------------------------------------------------------------------------

@pytest.mark.parametrize("operation, answer", [("copy", "310"), ("reverse", "013"), ("sort", "013")])
def test_digits_answers(operation, answer):
    task = DigitsTask(length=3, num_digits=5, operation=operation)
    rng = random.Random(3)
    prompt = task.sample(rng)
    assert prompt.text[-1] == ">" and len(prompt.text) == 4 and set(prompt.text[:-1]) <= set("01234")
    assert task.score(Prompt("310>", answer), answer) == [1.0]


@pytest.mark.parametrize("completion, reward", [
    ("013", 1.0),
    ("012", 2 / 3),     # one wrong position
    ("310", 1 / 3),     # right digits, wrong order: only the middle one matches
    ("01", 2 / 3),      # missing character counts as wrong
    ("0133", 3 / 4),    # extra character counts as wrong: 3 right of max(3, 4)
    ("", 0.0),
    (">>>>", 0.0),      # garbage
])
def test_digits_score(completion, reward):
    task = DigitsTask(operation="sort")
    assert task.score(Prompt("310>", "013"), completion) == [pytest.approx(reward, abs=1e-15)]


def test_digits_options():
    task = DigitsTask(length=6, num_digits=10, operation="reverse")
    prompt = task.sample(random.Random(1))
    assert prompt.target == prompt.text[:-1][::-1] and task.max_new_tokens == 7
    assert task.alphabet == "0123456789>"


@pytest.mark.parametrize("kwargs, error, match", [
    ({"length": 0}, ValueError, "length must be an integer >= 1"),
    ({"length": 3.0}, TypeError, "length must be an integer"),
    ({"num_digits": 11}, ValueError, r"num_digits must be an integer in \[1, 10\]"),
    ({"operation": "add"}, ValueError, "operation must be one of"),
])
def test_digits_bad_options(kwargs, error, match):
    with pytest.raises(error, match=match):
        DigitsTask(**kwargs)


def test_bad_rng_and_completion():
    task = DigitsTask()
    with pytest.raises(TypeError, match="rng must be a random.Random"):
        task.sample(0)
    with pytest.raises(TypeError, match="completion must be the decoded text"):
        task.score(Prompt("310>", "310"), [3, 1, 0])


# ---- diagnosis ---------------------------------------------------------------------------------

DIAGNOSIS_PROMPT = Prompt("dvc>", Diagnosis("B", "cd"))


@pytest.mark.parametrize("completion, rewards", [
    # accuracy, faithfulness, comprehensiveness, format
    ("B|cd", [1, 1, 1, 1]),
    ("B|dc", [1, 1, 1, 1]),                # citation order is free
    ("B|c", [1, 1, 1 / 2, 1]),             # cites half the key findings
    ("B|cv", [1, 1, 1 / 2, 1]),            # a present distractor is faithful but not a key finding
    ("B|ca", [1, 1 / 2, 1 / 2, 1]),        # "a" is not in the prompt
    ("A|cd", [0, 1, 1, 1]),                # wrong disease
    # format: a third per well-formed part (letter first, the only "|" second, distinct findings cited)
    ("B|cc", [1, 1, 1 / 2, 2 / 3]),        # repeated citation breaks the evidence part
    ("B|", [1, 0, 0, 2 / 3]),              # nothing cited
    ("B", [1, 0, 0, 1 / 3]),
    ("Bcd", [1, 0, 0, 1 / 3]),             # no separator: nothing is cited
    ("B|c>", [1, 1 / 2, 1 / 2, 2 / 3]),    # a non-finding after the separator
    ("x|cd", [0, 1, 1, 2 / 3]),            # no disease letter first
    ("B|c|d", [1, 2 / 3, 1, 1 / 3]),       # a second separator: cited "c|d" is not all findings
    ("", [0, 0, 0, 0]),
    ("||||", [0, 0, 0, 0]),                # garbage
])
def test_diagnosis_score(completion, rewards):
    task = DiagnosisTask()
    assert task.score(DIAGNOSIS_PROMPT, completion) == [pytest.approx(r, abs=1e-15) for r in rewards]


def test_diagnosis_sample_follows_the_rule_book():
    task = DiagnosisTask()
    assert task.channels[0] == "accuracy" and len(task.weights) == len(task.channels)
    rng = random.Random(0)
    seen = set()
    for _ in range(200):
        prompt = task.sample(rng)
        findings = prompt.text[:-1]
        key = set(task.rule_book[prompt.target.disease])
        assert set(prompt.target.key_findings) == set(findings) & key and prompt.target.key_findings
        assert len(set(findings) - key) <= task.max_distractors
        assert set(findings) - key <= set(task.distractors)
        seen.add(prompt.target.disease)
    assert seen == set(task.rule_book)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"rule_book": {}}, ValueError, "non-empty mapping"),
    ({"rule_book": {"AB": "x"}}, ValueError, "single characters"),
    ({"rule_book": {"A": ""}}, ValueError, r"rule_book\['A'\] must be a non-empty str"),
    ({"rule_book": {"A": "xy", "B": "yz"}}, ValueError, r"repeated: \['y'\]"),
    ({"distractors": "a"}, ValueError, r"repeated: \['a'\]"),
    ({"distractors": "|"}, ValueError, r"repeated: \['\|'\]"),
    ({"max_distractors": 3}, ValueError, r"max_distractors must be an integer in \[0, 2\]"),
    ({"weights": (1.0, 1.0)}, ValueError, "one entry per channel"),
    ({"weights": (1.0, 1.0, float("inf"), 1.0)}, ValueError, r"weights\[2\] must be a finite number"),
])
def test_diagnosis_bad_options(kwargs, error, match):
    with pytest.raises(error, match=match):
        DiagnosisTask(**kwargs)


# ---- keydoor -----------------------------------------------------------------------------------

def scripted_optimal_action(env: KeyDoorEnvironment, state: KeyDoorState) -> str:
    """Walk to the key, pick it up, walk to the door, open it."""
    goal = env.length - 2 if state.key is None else state.key
    if state.agent != goal:
        return "r" if goal > state.agent else "l"
    return "o" if state.key is None else "p"


@pytest.mark.parametrize("length", [3, 4, 5])
def test_keydoor_scripted_policy_solves_every_start(length):
    env = KeyDoorEnvironment(length=length, max_steps=2 * length - 2)
    starts = set()
    rng = random.Random(0)
    for _ in range(100):
        state = env.reset(rng)
        starts.add(state)
        total, steps, done = 0.0, 0, False
        while not done:
            state, reward, done, invalid = env.step(state, scripted_optimal_action(env, state))
            total, steps = total + reward, steps + 1
            assert not invalid
        assert env.success(state) and total == 1.0 and steps <= env.max_steps
    # Every (agent, key) pair of walkable cells is a start, so every start is solvable in max_steps.
    walkable = length - 1
    assert len(starts) == walkable * (walkable - 1)


def test_keydoor_observation():
    assert KeyDoorEnvironment().observe(KeyDoorState(0, 2, False)) == "a.kd"
    assert KeyDoorEnvironment(length=3).observe(KeyDoorState(1, 0, False)) == "kad"
    env = KeyDoorEnvironment(length=5)
    assert env.observe(KeyDoorState(0, 2, False)) == "a.k.d"
    assert env.observe(KeyDoorState(2, 2, False)) == "..K.d"
    assert env.observe(KeyDoorState(1, None, False)) == ".a..d"
    assert env.observe(KeyDoorState(3, None, True)) == "...aD"


@pytest.mark.parametrize("state, action", [
    (KeyDoorState(0, 2, False), "l"),      # wall
    (KeyDoorState(3, None, False), "r"),   # into the door
    (KeyDoorState(1, 2, False), "p"),      # no key here
    (KeyDoorState(1, None, False), "p"),   # key already held
    (KeyDoorState(3, 1, False), "o"),      # no key
    (KeyDoorState(2, None, False), "o"),   # not at the door
    (KeyDoorState(1, 2, False), "rr"),     # unparseable
    (KeyDoorState(1, 2, False), ""),
    (KeyDoorState(1, 2, False), "x"),
])
def test_keydoor_invalid_action_is_penalized_and_keeps_the_state(state, action):
    env = KeyDoorEnvironment(length=5, invalid_penalty=-0.25)
    assert env.step(state, action) == (state, -0.25, False, True)
    assert KeyDoorEnvironment(length=5).step(state, action)[1] == -0.02


def test_keydoor_states_are_hashable_and_recur():
    env = KeyDoorEnvironment()
    start = env.reset(random.Random(5))
    rng = random.Random(1)
    visits = {}
    for _ in range(8):  # one GiGPO group: trajectories from one start
        state = start
        for _ in range(env.max_steps):
            visits[env.observe(state)] = visits.get(env.observe(state), 0) + 1
            state, _, done, _ = env.step(state, rng.choice("lrpo"))
            if done:
                break
    assert max(visits.values()) > 8  # some state is revisited across or within trajectories
    assert env.observe(start) in visits and len(visits) < 8 * env.max_steps
    assert hash(start) == hash(KeyDoorState(start.agent, start.key, False))


def test_keydoor_errors():
    env = KeyDoorEnvironment(length=5)
    with pytest.raises(ValueError, match="terminal"):
        env.step(KeyDoorState(3, None, True), "l")
    with pytest.raises(TypeError, match="state must be a KeyDoorState"):
        env.observe((0, 2, False))
    with pytest.raises(ValueError, match="outside this corridor"):
        env.observe(KeyDoorState(4, 2, False))
    with pytest.raises(ValueError, match="max_steps must be an integer >= 8"):
        KeyDoorEnvironment(length=5, max_steps=7)
    with pytest.raises(ValueError, match="max_steps must be an integer >= 6"):
        KeyDoorEnvironment(max_steps=5)
    with pytest.raises(ValueError, match="invalid_penalty must be <= 0"):
        KeyDoorEnvironment(invalid_penalty=0.1)
    with pytest.raises(ValueError, match="length must be an integer >= 3"):
        KeyDoorEnvironment(length=2)


def test_keydoor_history_defaults():
    """The history variant's longer episodes (see KeyDoorHistoryEnvironment): its other options
    and their checks are the corridor's, and a whole episode fits the tiny model's positions."""
    from prefix_grouper.trainers.model import TINY_SHAPE

    env = KeyDoorHistoryEnvironment()
    assert env.history and (env.length, env.max_steps, env.invalid_penalty) == (4, 12, -0.02)
    episode_tokens = 1 + (env.length + 1) * env.max_steps  # BOS, then per step an observation and an action
    assert episode_tokens <= TINY_SHAPE["max_position_embeddings"]
    assert KeyDoorEnvironment().max_steps == 8  # the memoryless corridor keeps its budget
    assert make_task("keydoor-history", max_steps=8, invalid_penalty=-0.1).max_steps == 8
    with pytest.raises(ValueError, match="max_steps must be an integer >= 6"):
        KeyDoorHistoryEnvironment(max_steps=5)
    with pytest.raises(ValueError, match="invalid_penalty must be <= 0"):
        KeyDoorHistoryEnvironment(invalid_penalty=0.5)


# ---- registry ----------------------------------------------------------------------------------

def test_make_task():
    assert set(TASKS) == {"digits", "diagnosis"} and set(ENVIRONMENTS) == {"keydoor", "keydoor-history"}
    assert make_task("keydoor-history").history and not make_task("keydoor").history
    assert make_task("digits", operation="copy").operation == "copy" and DigitsTask().operation == "sort"
    assert make_task("keydoor", max_steps=12).max_steps == 12
    with pytest.raises(ValueError, match="unknown task 'chess'; tasks: digits, diagnosis; environments: keydoor, keydoor-history"):
        make_task("chess")
    with pytest.raises(TypeError):
        make_task("digits", 3)
    with pytest.raises(TypeError, match="unexpected keyword"):
        make_task("digits", width=3)
