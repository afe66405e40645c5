"""The command lines as a user meets them (``python -m prefix_grouper.train``,
``python -m benchmarks.run``, ``python -m benchmarks.demo``): ``--help`` states every
option's default and imports no torch; misuse is a usage error (exit status 2, a one-line
synopsis and a one-line error, no traceback); a run that fails later says so in one line
and keeps what it wrote; a run ends with a one-line summary."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from prefix_grouper.train import progress_text

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_RUN = ["--steps", "1", "--group-size", "2", "--prompts-per-step", "2"]
CLIS = {"prefix_grouper.train": "python -m prefix_grouper.train", "benchmarks.run": "python -m benchmarks.run",
        "benchmarks.demo": "python -m benchmarks.demo"}


def run_module(args, *, cwd, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=env)


def env_with_pythonpath(*folders):
    """This interpreter's environment with ``folders`` first on PYTHONPATH, the repository after them."""
    path = [*map(str, folders), REPO_ROOT, os.environ.get("PYTHONPATH", "")]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in path if p))


# Each runs as a user would (a subprocess, a fraction of a second: no torch before the
# arguments pass). "{file}" is an existing file, "{dir}" a directory without config.json.
MISUSE = [
    (["prefix_grouper.train", "--algo", "grpo", "--steps", "0"], "--steps"),
    (["prefix_grouper.train", "--algo", "grpo", "--steps", "-3"], "--steps"),
    (["prefix_grouper.train", "--algo", "grpo", "--group-size", "0"], "--group-size"),
    (["prefix_grouper.train", "--algo", "grpo", "--num-iterations", "0"], "--num-iterations"),
    (["prefix_grouper.train", "--algo", "grpo", "--prompts-per-step", "-1"], "--prompts-per-step"),
    (["prefix_grouper.train", "--algo", "grpo", "--micro-batch-rows", "0"], "--micro-batch-rows"),
    (["prefix_grouper.train", "--algo", "grpo", "--lr", "0"], "--lr"),
    (["prefix_grouper.train", "--algo", "grpo", "--temperature", "0"], "--temperature"),
    (["prefix_grouper.train", "--algo", "grpo", "--temperature", "nan"], "--temperature"),
    (["prefix_grouper.train", "--algo", "grpo", "--temperature", "inf"], "--temperature"),
    (["prefix_grouper.train", "--algo", "grpo", "--seed", "x"], "--seed"),
    (["prefix_grouper.train", "--algo", "ppo"], "--algo"),
    (["prefix_grouper.train", "--algo", "grpo", "--task", "chess"], "--task"),
    (["prefix_grouper.train", "--steps", "5"], "--algo"),
    (["prefix_grouper.train", "--algo", "grpo", "stray"], "stray"),
    (["prefix_grouper.train", "--algo", "gigpo", "--task", "digits"], "--algo gigpo"),
    (["prefix_grouper.train", "--algo", "grpo", "--out", "{file}"], "--out"),
    (["prefix_grouper.train", "--algo", "grpo", "--out", "{file}/run"], "--out"),
    (["prefix_grouper.train", "--algo", "grpo", "--out", "/proc/prefix_grouper_run"], "--out"),
    (["prefix_grouper.train", "--algo", "grpo", "--verify-equivalence", "--dtype", "bfloat16"], "--dtype bfloat16"),
    (["prefix_grouper.train", "--algo", "grpo", "--model", "{dir}"], "--model"),
    (["prefix_grouper.train", "--algo", "grpo", "--model", "./no_such_checkpoint"], "--model"),
    (["prefix_grouper.train", "--algo", "grpo", "--device", "bogus"], "--device"),
    (["prefix_grouper.train", "--algo", "grpo", "--device", "cuda:x"], "--device"),
    (["benchmarks.run", "--suite", "all", "--device", "bogus"], "--device"),
    (["benchmarks.run", "--suite", "all", "--out", "{file}"], "--out"),
    (["benchmarks.run", "--suite", "nope"], "--suite"),
    (["benchmarks.run"], "--suite"),
    (["benchmarks.run", "--suite", "all", "--threads", "-2"], "--threads"),
    (["benchmarks.run", "--suite", "all", "--quick", "--smoke"], "--smoke"),
    (["benchmarks.demo", "--device", "tpu"], "--device"),
    (["benchmarks.demo", "--out", "{file}"], "--out"),
    (["benchmarks.demo", "--out", "x", "--update-results"], "--update-results"),
    (["benchmarks.demo", "--threads", "0"], "--threads"),
]
MISUSE_WITHOUT_GPU = [  # where torch sees no GPU
    (["prefix_grouper.train", "--algo", "grpo", "--device", "cuda"], "--device"),
    (["benchmarks.run", "--suite", "all", "--device", "cuda"], "--device"),
    (["benchmarks.demo", "--device", "cuda:0"], "--device"),
]


def gpu_visible() -> bool:
    import torch

    return torch.cuda.is_available()


def placeholders(args, folder):
    existing_file, empty_dir = folder / "metrics.txt", folder / "not_a_checkpoint"
    existing_file.write_text("not a directory")
    empty_dir.mkdir(exist_ok=True)
    return [a.replace("{file}", str(existing_file)).replace("{dir}", str(empty_dir)) for a in args]


def ids(case):
    return " ".join(case) if isinstance(case, list) else None


def assert_usage_error(result, prog, names):
    """Exit status 2; stderr: the one-line synopsis (pointing at --help), then the error naming ``names``."""
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"usage: {prog} ") and "--help" in lines[0], lines
    assert lines[1].startswith(f"{prog}: error: ") and names in lines[1], lines[1]


@pytest.mark.parametrize("args, names", MISUSE + MISUSE_WITHOUT_GPU, ids=ids)
def test_misuse_is_a_two_line_usage_error(args, names, tmp_path):
    if (args, names) in MISUSE_WITHOUT_GPU and gpu_visible():
        pytest.skip("torch sees a GPU here")
    result = run_module(placeholders(args, tmp_path), cwd=tmp_path, env=env_with_pythonpath())
    assert_usage_error(result, CLIS[args[0]], names)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.txt", "not_a_checkpoint"], \
        "a refused run must not start (nor leave anything behind)"


@pytest.mark.parametrize("module", list(CLIS))
def test_help_states_every_default_and_imports_no_torch(module, tmp_path):
    """--help answers before torch is imported (torch alone takes ~2 s): -X importtime lists
    every module the process imported."""
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", module, "--help"], cwd=tmp_path,
                            capture_output=True, text=True, env=env_with_pythonpath(), timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if "|" in line}
    assert "prefix_grouper.cli_arguments" in imported
    assert not {"torch", "transformers", "numpy", "triton"} & imported
    assert result.stdout.startswith(f"usage: {CLIS[module]} ")
    options = re.split(r"\noptions:\n", result.stdout)[1]
    # One entry per option: "  --name ..." then its help, up to the next option.
    entries = re.split(r"\n(?=  -)", options.strip("\n"))
    assert len(entries) >= 5
    for entry in entries:
        text = " ".join(entry.split())
        if text.startswith("-h, --help"):
            continue
        flag = text.split()[0]
        assert "default" in text or "(required)" in text, f"{module} {flag}: no default in its help: {text}"
        assert len(text) > len(flag) + 15, f"{module} {flag}: no help line"


@pytest.mark.parametrize("model, names", [("mamba", "AttentionInterface"), ("t5", "no causal LM")])
def test_a_model_the_grouped_attention_cannot_enter_is_a_usage_error(model, names, tmp_path, capsys):
    from prefix_grouper.train import parse_args

    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--algo", "grpo", "--model", model, "--out", str(tmp_path / "run")])
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("python -m prefix_grouper.train: error: argument --model: ") and names in last, last


def test_temperature_whose_inverse_overflows_is_a_usage_error(capsys):
    from prefix_grouper.train import parse_args

    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--algo", "grpo", "--temperature", "1e-39"])  # 1/T overflows float32
    assert exit_info.value.code == 2
    assert "argument --temperature: " in capsys.readouterr().err.strip().splitlines()[-1]


def test_the_command_line_names_what_the_trainers_offer():
    """train.py names the choices and defaults itself (no torch before parsing): they must
    stay the trainers' own."""
    from prefix_grouper import train, trainers
    from prefix_grouper.trainers import model, tasks

    assert train.ALGORITHMS == tuple(trainers.ALGORITHMS)
    assert train.DEFAULT_TASKS == dict(trainers.DEFAULT_TASKS)
    assert train.TASKS == tuple(tasks.TASKS) and train.ENVIRONMENTS == tuple(tasks.ENVIRONMENTS)
    assert train.LOSS_TYPES == tuple(trainers.LOSS_TYPES)
    assert train.CONVENTIONS == tuple(trainers.CONVENTIONS)
    assert train.DTYPES == tuple(model.DTYPES) and train.TINY_MODEL == trainers.TINY_MODEL
    config = trainers.TrainConfig()
    assert {name: getattr(config, name) for name in train.CONFIG_DEFAULTS} == train.CONFIG_DEFAULTS


def test_a_run_ends_with_a_one_line_summary(tmp_path, capsys):
    from prefix_grouper.train import main

    out = tmp_path / "run"
    assert main(["--algo", "grpo", *TINY_RUN, "--steps", "2", "--out", str(out)]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    rewards = [json.loads(line)["reward_mean"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert last.startswith(f"grpo on digits: 2 steps, mean reward {rewards[0]:.3f} -> {rewards[-1]:.3f} "), last
    assert f"wrote {out}/metrics.jsonl" in last


def test_a_run_that_fails_later_says_so_in_one_line_and_keeps_its_steps(tmp_path, monkeypatch, capsys):
    from prefix_grouper import train

    def failing_at_step_2(args, dist):
        trainer = make_trainer(args, dist)
        step, calls = trainer.step, []

        def step_once():
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError("out of memory\nsecond line")
            return step()

        trainer.step = step_once
        return trainer

    make_trainer = train.make_trainer
    monkeypatch.setattr(train, "make_trainer", failing_at_step_2)
    out = tmp_path / "run"
    assert train.main(["--algo", "grpo", *TINY_RUN, "--steps", "3", "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("python -m prefix_grouper.train: failed after 1 step(s)") and \
        "RuntimeError: out of memory (traceback in" in err[-1], err
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1]
    assert "second line" in (out / "traceback.txt").read_text()


def test_verify_equivalence_ends_with_its_verdict(capsys):
    from prefix_grouper.train import main

    assert main(["--algo", "grpo", "--verify-equivalence", "--dtype", "float64", "--group-size", "2",
                 "--prompts-per-step", "2"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("grpo --verify-equivalence: PASS")


BLOCK_MATPLOTLIB = "import sys\nsys.modules['matplotlib'] = None  # import matplotlib raises ImportError\n"


@pytest.fixture
def no_matplotlib(tmp_path):
    """An environment in which ``import matplotlib`` fails, as in the core install (no extras)."""
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(BLOCK_MATPLOTLIB)
    return env_with_pythonpath(shim)


def test_training_without_matplotlib_keeps_the_metrics(tmp_path, no_matplotlib):
    out = tmp_path / "run"
    result = run_module(["prefix_grouper.train", "--algo", "grpo", *TINY_RUN, "--out", str(out)], cwd=tmp_path,
                        env=no_matplotlib)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1]
    assert not (out / "rewards.png").exists()
    hints = [line for line in result.stdout.splitlines() if "matplotlib is not installed" in line]
    assert len(hints) == 1 and "pip install matplotlib" in hints[0] and "bench" in hints[0], result.stdout


def test_every_benchmark_suite_runs_without_matplotlib(tmp_path, no_matplotlib):
    result = run_module(["benchmarks.run", "--suite", "all", "--smoke", "--device", "cpu", "--out", str(tmp_path)],
                        cwd=REPO_ROOT, env=no_matplotlib, timeout=600)
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    from benchmarks.run import SUITES

    for suite in SUITES:
        assert len(list(tmp_path.glob(f"{suite}_*.csv"))) == 1, suite
    assert not list(tmp_path.glob("*.png"))
    hints = [line for line in result.stdout.splitlines() if "matplotlib is not installed" in line]
    assert len(hints) == len(SUITES) and all("pip install matplotlib" in h for h in hints), result.stdout


def test_progress_shows_reward_kl_clip_fraction_and_a_readable_loss():
    text = progress_text({"reward_mean": 0.4375, "kl": 0.0012345678, "clip_frac": 0.0625, "loss": -2.7e-09})
    assert text == "reward=0.4375, kl=0.001235, clip=0.0625, loss=-2.7e-09"
