"""Importing prefix_grouper.integrations.verl where verl is not installed (docs, a user
browsing the package) loads nothing and logs nothing: the plugin only has work to do inside
verl. Runs in the environment without verl; the verl environment tests the loaded plugin
(tests/test_verl_integration.py)."""
import importlib.util
import subprocess
import sys

import pytest


@pytest.mark.skipif(importlib.util.find_spec("verl") is not None, reason="verl is installed here")
def test_import_without_verl_is_silent():
    script = ("import logging\nlogging.basicConfig(level=logging.DEBUG)\n"
              "from prefix_grouper.integrations import verl\n"
              "assert verl.PrefixGrouperFSDPEngine is None\n"
              "assert callable(verl.micro_batch_layout) and callable(verl.grouped_log_probs)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "ERROR" not in done.stderr and "prefix_grouper" not in done.stderr, done.stderr[-2000:]
