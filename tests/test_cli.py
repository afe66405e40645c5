"""`python -m prefix_grouper.train` as a user meets it: misuse is a usage error (exit status 2,
one line, no traceback); a run without matplotlib keeps its metrics; the progress readout."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from prefix_grouper.train import progress_text

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_RUN = ["--steps", "1", "--group-size", "2", "--prompts-per-step", "2"]


def run_module(args, *, cwd, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=env)


def env_with_pythonpath(*folders):
    """This interpreter's environment with ``folders`` first on PYTHONPATH, the repository after them."""
    path = [*map(str, folders), REPO_ROOT, os.environ.get("PYTHONPATH", "")]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in path if p))


# Each kind of misuse the issue names runs as a user would (a subprocess: ~5-10 s each on a
# busy 2-core machine); the variations below run in-process through parse_args.
MISUSE = [
    (["--algo", "grpo", "--steps", "0"], "--steps"),
    (["--algo", "grpo", "--group-size", "0"], "--group-size"),
    (["--algo", "grpo", "--num-iterations", "0"], "--num-iterations"),
    (["--algo", "grpo", "--prompts-per-step", "-1"], "--prompts-per-step"),
    (["--algo", "grpo", "--micro-batch-rows", "0"], "--micro-batch-rows"),
    (["--algo", "grpo", "--lr", "0"], "--lr"),
    (["--algo", "grpo", "--temperature", "0"], "--temperature"),
    (["--algo", "grpo", "--temperature", "nan"], "--temperature"),
    (["--algo", "grpo", "--temperature", "inf"], "--temperature"),
    (["--algo", "gigpo", "--task", "digits"], "--algo gigpo"),
    (["--algo", "grpo", "--out", "{file}"], "--out"),
]
MORE_MISUSE = [
    (["--algo", "grpo", "--steps", "-3"], "--steps"),
    (["--algo", "grpo", "--steps", "1.5"], "--steps"),
    (["--algo", "grpo", "--lr", "-1e-3"], "--lr"),
    (["--algo", "grpo", "--lr", "inf"], "--lr"),
    (["--algo", "grpo", "--temperature", "-1"], "--temperature"),
    (["--algo", "grpo", "--temperature", "1e-39"], "--temperature"),  # its inverse overflows float32
    (["--algo", "grpo", "--epsilon-low", "1.5"], "--epsilon-low"),
    (["--algo", "grpo", "--epsilon-high", "-0.1"], "--epsilon-high"),
    (["--algo", "grpo", "--beta", "-0.1"], "--beta"),
    (["--algo", "gigpo", "--gamma", "2"], "--gamma"),
    (["--algo", "crpo", "--task", "keydoor"], "--algo crpo"),
    (["--algo", "grpo", "--out", "{file}/run"], "--out"),
]


def with_file(args, folder):
    existing_file = folder / "metrics.txt"
    existing_file.write_text("not a directory")
    return [a.replace("{file}", str(existing_file)) for a in args]


def ids(case):
    return " ".join(case) if isinstance(case, list) else None


@pytest.mark.parametrize("args, names", MISUSE, ids=ids)
def test_invalid_arguments_are_usage_errors(args, names, tmp_path):
    result = run_module(["prefix_grouper.train", *with_file(args, tmp_path)], cwd=tmp_path, env=env_with_pythonpath())
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("python -m prefix_grouper.train: error: ") and names in last, last
    assert not (tmp_path / "runs").exists(), "a refused run must not start"


@pytest.mark.parametrize("args, names", MORE_MISUSE, ids=ids)
def test_more_invalid_arguments_are_usage_errors(args, names, tmp_path, capsys):
    from prefix_grouper.train import parse_args

    with pytest.raises(SystemExit) as exit_info:
        parse_args(with_file(args, tmp_path))
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("python -m prefix_grouper.train: error: ") and names in last, last


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
