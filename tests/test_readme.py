"""README.md as written: every ```python block runs, and the commands it names exist.

Each block runs in order, in a fresh namespace, on this machine (Triton under the
interpreter when there is no GPU: tests/conftest.py sets TRITON_INTERPRET before any
import of triton). A block that names a CUDA device without choosing it by
``torch.cuda.is_available()`` is skipped, with that reason, where there is no GPU. Test ids are the heading a block sits under.
"""
from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass

import pytest
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO_ROOT, "README.md")


@dataclass
class CodeBlock:
    heading: str
    line: int  # 1-based line of the block's first code line in README.md
    language: str
    code: str


def readme_blocks(path: str = README) -> list[CodeBlock]:
    """Every fenced block of ``path`` with the nearest heading above it."""
    blocks, heading, fence = [], "(top)", None
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    for number, text in enumerate(lines, start=1):
        if fence is None:
            opening = re.match(r"^```(\w*)\s*$", text)
            if opening:
                fence = CodeBlock(heading, number + 1, opening.group(1), "")
            elif text.startswith("#"):
                heading = text.lstrip("#").strip()
        elif text.startswith("```"):
            blocks.append(fence)
            fence = None
        else:
            fence.code += text + "\n"
    if fence is not None:
        raise ValueError(f"{path}: the block opened at line {fence.line - 1} is never closed")
    return blocks


def block_ids(blocks: list[CodeBlock]) -> list[str]:
    """A readable id per block: its heading as a slug, numbered when a heading holds several."""
    slugs = [re.sub(r"[^a-z0-9]+", "-", b.heading.lower()).strip("-") for b in blocks]
    return [s if slugs.count(s) == 1 else f"{s}-{slugs[:i + 1].count(s)}" for i, s in enumerate(slugs)]


def section(heading: str) -> list[CodeBlock]:
    return [b for b in readme_blocks() if b.heading == heading]


PYTHON_BLOCKS = [b for b in readme_blocks() if b.language == "python"]


def test_readme_has_python_examples():
    assert PYTHON_BLOCKS, "README.md has no ```python block: nothing here proves its examples"


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=block_ids(PYTHON_BLOCKS))
def test_python_block_runs(block, tmp_path, monkeypatch):
    needs_gpu = re.search(r"""["']cuda""", block.code) and "torch.cuda.is_available()" not in block.code
    if needs_gpu and not torch.cuda.is_available():
        pytest.skip(f"README.md line {block.line} ({block.heading}) runs on a CUDA device; none here")
    monkeypatch.chdir(tmp_path)  # a block that writes files leaves the work tree clean
    torch.manual_seed(0)
    exec(compile(block.code, f"README.md:{block.line} ({block.heading})", "exec"), {"__name__": "__readme__"})


def test_two_commands_exist():
    """The two commands of "## Two commands" name scripts that exist and parse."""
    commands = [line.split("#")[0].split() for b in section("Two commands") if b.language == "bash"
                for line in b.code.splitlines() if line.strip()]
    assert len(commands) == 2, f'"## Two commands" must hold exactly two commands, found {commands}'
    for words in commands:
        assert words[0] == "bash" and len(words) == 2, f"expected `bash scripts/NAME.sh`, got {' '.join(words)}"
        script = os.path.join(REPO_ROOT, words[1])
        assert os.path.isfile(script), f"README's command names {words[1]}, which does not exist"
        subprocess.run(["bash", "-n", script], check=True)


def test_named_scripts_and_modules_exist():
    """Every ``scripts/*.sh`` and ``python -m benchmarks.NAME`` the README mentions exists."""
    with open(README, encoding="utf-8") as f:
        text = f.read()
    scripts = set(re.findall(r"scripts/[\w.-]+\.sh", text))
    modules = set(re.findall(r"python -m (benchmarks\.\w+)", text))
    assert scripts and modules, "README.md names no scripts/*.sh or no `python -m benchmarks.*` command"
    missing = [s for s in scripts if not os.path.isfile(os.path.join(REPO_ROOT, s))]
    missing += [m for m in modules if not os.path.isfile(os.path.join(REPO_ROOT, *m.split(".")) + ".py")]
    assert not missing, f"README.md names what does not exist: {sorted(missing)}"
