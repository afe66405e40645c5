"""README.md and docs/*.md as written: every ```python block runs, and what they name exists.

Each block runs in order, in a fresh namespace, on this machine (Triton under the
interpreter when there is no GPU: tests/conftest.py sets TRITON_INTERPRET before any
import of triton). A block that names a CUDA device without choosing it by
``torch.cuda.is_available()`` is skipped, with that reason, where there is no GPU. Test ids
are the file and the heading a block sits under.

Beside the blocks: the scripts, modules and files the pages name exist, their relative
links (and #anchors) resolve, the command lines of this repository's CLIs parse with those
CLIs' own parsers, and the training commands beside the committed results are the ones
scripts/train_all.sh runs. The figures quoted from result files: tests/test_docs_figures.py.
"""
from __future__ import annotations

import glob
import importlib
import os
import re
import shlex
import subprocess
from dataclasses import dataclass

import pytest
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO_ROOT, "README.md")
DOC_FILES = [README, *sorted(glob.glob(os.path.join(REPO_ROOT, "docs", "*.md")))]
# Modules of other projects the pages run with `python -m`; anything else must be ours and exist.
EXTERNAL_MODULES = {"verl.trainer.main_ppo"}
# Top-level folders and files of this repository: a path the pages name under them must exist.
REPO_PATH = re.compile(r"(?<![\w./-])((?:prefix_grouper|benchmarks|scripts|tests|examples|csrc|docs)/[\w./-]*[\w/]"
                       r"|ARCHITECTURE\.md|CMakeLists\.txt|setup\.py|pyproject\.toml)")
# Command lines whose flags are checked against the CLI's own argparse parser.
PARSED_MODULES = ("prefix_grouper.train", "benchmarks.run", "benchmarks.bench_attention", "benchmarks.bench_log_probs")


@dataclass
class CodeBlock:
    path: str
    heading: str
    line: int  # 1-based line of the block's first code line
    language: str
    code: str

    @property
    def where(self) -> str:
        return f"{os.path.relpath(self.path, REPO_ROOT)}:{self.line} ({self.heading})"


def relative(path: str) -> str:
    return os.path.relpath(path, REPO_ROOT)


def read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def doc_blocks(path: str = README) -> list[CodeBlock]:
    """Every fenced block of ``path`` with the nearest heading above it."""
    blocks, heading, fence = [], "(top)", None
    for number, text in enumerate(read(path).splitlines(), start=1):
        if fence is None:
            opening = re.match(r"^```(\w*)\s*$", text)
            if opening:
                fence = CodeBlock(path, heading, number + 1, opening.group(1), "")
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


def prose(path: str) -> str:
    """The page without its fenced blocks."""
    return re.sub(r"^```.*?^```[ \t]*$", "", read(path), flags=re.S | re.M)


def block_ids(blocks: list[CodeBlock]) -> list[str]:
    """A readable id per block: file and heading as a slug, numbered when a heading holds several."""
    slugs = [f"{relative(b.path)}::" + re.sub(r"[^a-z0-9]+", "-", b.heading.lower()).strip("-") for b in blocks]
    return [s if slugs.count(s) == 1 else f"{s}-{slugs[:i + 1].count(s)}" for i, s in enumerate(slugs)]


def section(heading: str, path: str = README) -> list[CodeBlock]:
    return [b for b in doc_blocks(path) if b.heading == heading]


ALL_BLOCKS = [b for path in DOC_FILES for b in doc_blocks(path)]
PYTHON_BLOCKS = [b for b in ALL_BLOCKS if b.language == "python"]
SHELL_BLOCKS = [b for b in ALL_BLOCKS if b.language in ("bash", "sh")]


def shell_commands(block: CodeBlock) -> list[list[str]]:
    """The block's command lines as argv lists: continuations joined, comments dropped,
    ``a && b`` split into two commands."""
    commands = []
    for line in block.code.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        while words:
            cut = words.index("&&") if "&&" in words else len(words)
            commands.append(words[:cut])
            words = words[cut + 1:]
    return [c for c in commands if c]


def module_of(argv: list[str]) -> tuple[str, list[str]] | None:
    """``(module, its arguments)`` of a ``python -m`` or ``torchrun ... -m`` command."""
    if argv[0] in ("python", "python3", "torchrun") and "-m" in argv:
        at = argv.index("-m")
        return argv[at + 1], argv[at + 2:]
    return None


def test_docs_have_python_examples():
    for path in DOC_FILES[:1]:
        assert any(b.language == "python" for b in doc_blocks(path)), f"{relative(path)} has no ```python block"
    assert len(DOC_FILES) > 1, "docs/ holds no page"


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=block_ids(PYTHON_BLOCKS))
def test_python_block_runs(block, tmp_path, monkeypatch):
    needs_gpu = re.search(r"""["']cuda""", block.code) and "torch.cuda.is_available()" not in block.code
    if needs_gpu and not torch.cuda.is_available():
        pytest.skip(f"{block.where} runs on a CUDA device; none here")
    monkeypatch.chdir(tmp_path)  # a block that writes files leaves the work tree clean
    torch.manual_seed(0)
    exec(compile(block.code, block.where, "exec"), {"__name__": "__readme__"})


def test_two_commands_exist():
    """The two commands of the README's "## Two commands" name scripts that exist and parse."""
    commands = [c for b in section("Two commands") if b.language == "bash" for c in shell_commands(b)]
    assert len(commands) == 2, f'"## Two commands" must hold exactly two commands, found {commands}'
    for words in commands:
        assert words[0] == "bash" and len(words) == 2, f"expected `bash scripts/NAME.sh`, got {' '.join(words)}"
        script = os.path.join(REPO_ROOT, words[1])
        assert os.path.isfile(script), f"README's command names {words[1]}, which does not exist"
        subprocess.run(["bash", "-n", script], check=True)


@pytest.mark.parametrize("path", DOC_FILES, ids=[relative(p) for p in DOC_FILES])
def test_named_paths_and_modules_exist(path):
    """Every repository path and ``python -m`` module a page names (prose, inline code or
    command) exists, and every script a shell block runs parses."""
    text = read(path)
    missing = [p for p in set(REPO_PATH.findall(text)) if not os.path.exists(os.path.join(REPO_ROOT, p))]
    for module in set(re.findall(r"(?:python3?|torchrun)\b[^\n`]*?\s-m\s+([\w.]+)", text)):
        if module in EXTERNAL_MODULES:
            continue
        file = os.path.join(REPO_ROOT, *module.split("."))
        if not (os.path.isfile(file + ".py") or os.path.isfile(os.path.join(file, "__main__.py"))):
            missing.append(f"python -m {module}")
    assert not missing, f"{relative(path)} names what does not exist: {sorted(missing)}"
    for block in doc_blocks(path):
        if block.language in ("bash", "sh"):
            for argv in shell_commands(block):
                if argv[0] == "bash" and len(argv) > 1:
                    subprocess.run(["bash", "-n", os.path.join(REPO_ROOT, argv[1])], check=True)
                if argv[0] in ("python", "python3") and len(argv) > 1 and argv[1].endswith(".py"):
                    assert os.path.isfile(os.path.join(REPO_ROOT, argv[1])), f"{block.where}: no {argv[1]}"


def heading_anchors(path: str) -> set[str]:
    """GitHub's anchors of a page's headings."""
    anchors = set()
    for line in prose(path).splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", title)))
    return anchors


@pytest.mark.parametrize("path", DOC_FILES, ids=[relative(p) for p in DOC_FILES])
def test_relative_links_resolve(path):
    """Every relative markdown link (and image) of a page points to a file, and its #anchor
    to a heading of that file."""
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", prose(path)):
        if re.match(r"\w+://", target):
            continue
        file, _, anchor = target.partition("#")
        resolved = os.path.normpath(os.path.join(os.path.dirname(path), file)) if file else path
        if not os.path.exists(resolved):
            broken.append(target)
        elif anchor and resolved.endswith(".md") and anchor not in heading_anchors(resolved):
            broken.append(target)
    assert not broken, f"{relative(path)} links to what does not exist: {broken}"


CLI_COMMANDS = [(b, argv) for b in SHELL_BLOCKS for argv in shell_commands(b)
                if (module_of(argv) or ("",))[0] in PARSED_MODULES]


@pytest.mark.parametrize("block,argv", CLI_COMMANDS,
                         ids=[f"{relative(b.path)}:{' '.join(a)[:60]}" for b, a in CLI_COMMANDS])
def test_cli_commands_parse(block, argv):
    """A command line of ours that the pages show is accepted by its CLI's own parser."""
    module, arguments = module_of(argv)
    parser = importlib.import_module(module).build_parser()
    try:
        parser.parse_args(arguments)
    except SystemExit as exit_:
        pytest.fail(f"{block.where}: `{' '.join(argv)}` is refused by {module}'s parser (exit {exit_.code})")


def training_runs(argvs: list[list[str]]) -> list[list[str]]:
    """``python -m prefix_grouper.train`` arguments without the output folder (and the
    script's pass-through ``$@``): what decides a run's figures."""
    runs = []
    for argv in argvs:
        found = module_of(argv)
        if found and found[0] == "prefix_grouper.train":
            arguments = [a for a in found[1] if a != "$@"]
            if "--out" in arguments:
                at = arguments.index("--out")
                del arguments[at:at + 2]
            runs.append(arguments)
    return runs


def test_results_commands_are_train_all():
    """The commands printed beside the committed training results are the runs
    scripts/train_all.sh makes (a run without its --steps or --prompts-per-step gives other
    figures)."""
    script = os.path.join(REPO_ROOT, "scripts", "train_all.sh")
    script_runs = training_runs([shlex.split(line, comments=True) for line in
                                 read(script).replace("\\\n", " ").splitlines() if "-m prefix_grouper.train " in line])
    shown = training_runs([argv for b in section("Results", os.path.join(REPO_ROOT, "docs", "training.md"))
                           for argv in shell_commands(b)])
    assert shown, "docs/training.md's Results section shows no training command"
    assert shown == script_runs, f"docs/training.md shows {shown}, scripts/train_all.sh runs {script_runs}"
