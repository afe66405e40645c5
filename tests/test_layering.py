"""Core modules (everything in prefix_grouper/ outside integrations/) never import from
prefix_grouper.integrations: the integrations sit on top of the core, not under it."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "prefix_grouper"
INTEGRATIONS = "prefix_grouper.integrations"


def _package_of(path: Path) -> str:
    """The package a module's relative imports start from: ``prefix_grouper.trainers`` for
    ``prefix_grouper/trainers/loop.py`` and for ``prefix_grouper/trainers/__init__.py``."""
    return ".".join(path.relative_to(PACKAGE.parent).parent.parts)


def imported_modules(source: str, package: str) -> list[tuple[int, str]]:
    """``(line, absolute module name)`` of every import in ``source``, relative ones resolved
    against ``package``; ``from X import a`` also yields ``X.a``, which may be a submodule."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((node.lineno, target))
            found += [(node.lineno, f"{target}.{alias.name}") for alias in node.names]
    return found


def reaches_integrations(name: str) -> bool:
    return name == INTEGRATIONS or name.startswith(INTEGRATIONS + ".")


def test_core_modules_do_not_import_integrations():
    files = [p for p in sorted(PACKAGE.rglob("*.py")) if "integrations" not in p.relative_to(PACKAGE).parts]
    assert len(files) > 30, f"found only {len(files)} core modules under {PACKAGE}"
    offenders = [f"{path.relative_to(PACKAGE.parent)}:{line}: {name}" for path in files
                 for line, name in imported_modules(path.read_text(), _package_of(path))
                 if reaches_integrations(name)]
    assert not offenders, "core modules import prefix_grouper.integrations:\n" + "\n".join(offenders)


@pytest.mark.parametrize("source, package, expected", [
    ("from ..integrations.transformers import install", "prefix_grouper.trainers", True),
    ("from .. import integrations", "prefix_grouper.trainers", True),
    ("from .integrations import trl", "prefix_grouper", True),
    ("import prefix_grouper.integrations.trl", "prefix_grouper.trainers", True),
    ("from prefix_grouper.integrations import verl", "prefix_grouper", True),
    ("def f():\n    from ...integrations import verl", "prefix_grouper.trainers.tasks", True),
    ("from ..models import install", "prefix_grouper.trainers", False),
    ("from .integrations_like import x", "prefix_grouper", False),
    ("from . import models", "prefix_grouper", False),
])
def test_the_check_sees_every_import_form(source, package, expected):
    names = [name for _, name in imported_modules(source, package)]
    assert any(map(reaches_integrations, names)) is expected, names


def test_triton_is_optional_one_way():
    """Without triton the package imports and its torch backends run: the Triton modules are
    imported only when a Triton backend runs, and host-only modules (the tile schedules) never
    need triton."""
    import subprocess
    import sys

    script = """
import sys
sys.modules["triton"] = None  # any import of triton fails
import torch
import prefix_grouper
from prefix_grouper import GroupLayout, prefix_attention
from prefix_grouper.attention import triton_schedule, available_backends
from prefix_grouper.advantages import grpo_advantages
layout = GroupLayout.from_lengths([3], [[2, 1]])
q = torch.randn(layout.total_tokens, 2, 4)
prefix_attention(q, q, q, layout, backend="torch")
grpo_advantages(torch.randn(4), torch.tensor([0, 0, 1, 1]), backend="torch")
assert "triton" not in available_backends("cpu"), available_backends("cpu")
assert not [name for name in sys.modules if name.startswith("prefix_grouper") and "triton" in name
            and name.rsplit(".", 1)[-1] not in ("triton_schedule",)], sorted(sys.modules)
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            cwd=PACKAGE.parent)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


def test_no_module_imports_triton_but_the_triton_modules():
    """Triton is imported by the modules that hold Triton kernels (``triton_*``) and the
    availability check, nowhere else."""
    allowed = {"runtime.py", "triton_math.py"}
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name.startswith("triton_") and path.name != "triton_schedule.py" or path.name in allowed:
            continue
        for line, name in imported_modules(path.read_text(), _package_of(path)):
            if name == "triton" or name.startswith("triton."):
                offenders.append(f"{path.relative_to(PACKAGE)}:{line}")
    assert not offenders, offenders
