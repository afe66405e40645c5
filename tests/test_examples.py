"""examples/ as a user runs them: each script exits 0 and does what its docstring says."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_trl_grpo_example_trains_two_steps(tmp_path):
    pytest.importorskip("trl", reason="the TRL example needs the trl extra")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (REPO_ROOT, os.environ.get("PYTHONPATH")) if p),
               HF_HUB_OFFLINE="1")  # nothing may be downloaded
    result = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "examples", "trl_grpo.py"), "--out",
                             str(tmp_path / "out")], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    steps = [line for line in result.stdout.splitlines() if line.startswith("step ")]
    assert [line.split(":")[0] for line in steps] == ["step 1", "step 2"], result.stdout[-2000:]
    assert "ungrouped" not in result.stderr, "the drop-in fell back to TRL's own log-probs"
    import json
    logs = json.loads((tmp_path / "out" / "log_history.json").read_text())  # what the docstring promises
    assert [log["step"] for log in logs if "loss" in log] == [1, 2]
