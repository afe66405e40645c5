"""The figures README.md and docs/*.md quote from committed results match those results.

A quoted figure carries, right after the number, a marker naming its file, row and column:

    plain 84.8<!-- csv: benchmarks/results/cpu_quick/log_probs_cpu__x86_64__1_threads.csv approach=plain col=fwd_bwd_ms --> ms

(docs/README.md, "Quoting a measured figure"). The number must equal the file's value
rounded to the digits it shows, so a re-measured file makes every stale figure fail here.
Beside them: the README stays short, the training summary is what its committed metrics
give, the benchmark page lists the runner's suites, and the README's picture shows the mask
that ``prefix_attention`` applies.
"""
from __future__ import annotations

import csv
import glob
import importlib.util
import io
import os
import re
import shlex
from decimal import Decimal, InvalidOperation

import pytest
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO_ROOT, "README.md")
DOC_FILES = [README, *sorted(glob.glob(os.path.join(REPO_ROOT, "docs", "*.md")))]
README_MAX_LINES = 300
# A minus sign belongs to the number unless it joins a range ("942.5<!-- ... -->-950.1").
MARKER = re.compile(r"(?P<number>(?:(?<![\w>.-])-)?(?<![\d.])\d[\d.]*(?:e[-+]?\d+)?)<!-- csv: (?P<spec>.*?) -->")
ANY_MARKER = re.compile(r"<!-- csv:")


def read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def prose(text: str) -> str:
    """The page without its fenced blocks (a marker shown as an example is not a quote)."""
    return re.sub(r"^```.*?^```[ \t]*$", "", text, flags=re.S | re.M)


def table_rows(path: str) -> list[dict[str, str]]:
    """A CSV's rows, or the first markdown table of a ``.md`` file read the same way."""
    text = read(path)
    if path.endswith(".csv"):
        return list(csv.DictReader(io.StringIO(text)))
    lines = [line for line in text.splitlines() if line.lstrip().startswith("|")]
    cells = [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines]
    header, body = cells[0], [c for c in cells[1:] if not all(set(x) <= set("-: ") for x in c)]
    return [dict(zip(header, row)) for row in body]


def quoted_figures() -> list[tuple[str, int, str, str]]:
    """``(page, line, number, marker spec)`` of every marker outside the pages' code blocks."""
    figures = []
    for path in DOC_FILES:
        for number, line in enumerate(prose(read(path)).splitlines(), start=1):
            found = list(MARKER.finditer(line))
            assert len(found) == len(ANY_MARKER.findall(line)), (
                f"{os.path.relpath(path, REPO_ROOT)}: a csv marker without a number right before it in: {line.strip()}")
            figures += [(os.path.relpath(path, REPO_ROOT), number, m["number"], m["spec"]) for m in found]
    return figures


FIGURES = quoted_figures()


def value_in_file(spec: str) -> str:
    """The cell a marker names: ``FILE key=value ... col=NAME``, exactly one row selected."""
    file, *pairs = shlex.split(spec)
    selectors = dict(pair.split("=", 1) for pair in pairs)
    column = selectors.pop("col", None)
    assert column, f"marker {spec!r} names no col="
    path = os.path.join(REPO_ROOT, file)
    assert os.path.isfile(path), f"marker {spec!r} names {file}, which does not exist"
    rows = table_rows(path)
    assert rows and column in rows[0], f"{file} has no column {column!r} (it has {list(rows[0]) if rows else []})"
    unknown = [k for k in selectors if k not in rows[0]]
    assert not unknown, f"{file} has no column {unknown} to select rows by"
    matches = [r for r in rows if all(r[k] == v for k, v in selectors.items())]
    assert len(matches) == 1, f"{file}: {selectors} selects {len(matches)} rows, not one"
    return matches[0][column]


def test_docs_quote_figures():
    assert len([f for f in FIGURES if f[0] == "README.md"]) >= 5, "the README's headline figures carry no csv markers"


@pytest.mark.parametrize("page,line,number,spec", FIGURES,
                         ids=[f"{p}:{n}:{num}" for p, n, num, _ in FIGURES])
def test_quoted_figure_matches_its_file(page, line, number, spec):
    cell = value_in_file(spec)
    try:
        actual, quoted = Decimal(cell), Decimal(number)
    except InvalidOperation:
        pytest.fail(f"{page}:{line}: {spec} holds {cell!r}, not a number")
    half_step = Decimal(1).scaleb(quoted.as_tuple().exponent) / 2  # the quoted number's last digit, halved
    assert abs(actual - quoted) <= half_step * Decimal("1.000001"), (
        f"{page}:{line} quotes {number} but {spec.split()[0]} says {cell}: update the figure (or the file)")


def test_readme_is_short():
    lines = len(read(README).splitlines())
    assert lines <= README_MAX_LINES, (f"README.md has {lines} lines (at most {README_MAX_LINES}): move detail to "
                                       f"a page under docs/")


def test_training_summary_is_what_the_metrics_give():
    """benchmarks/results/training/summary.md, which the docs quote, is summary_table of the
    committed metrics.jsonl files in scripts/train_all.sh's order."""
    from prefix_grouper.trainers import summary_table

    training = os.path.join(REPO_ROOT, "benchmarks", "results", "training")
    runs = [row["run"] for row in table_rows(os.path.join(training, "summary.md"))]
    expected = summary_table([os.path.join(training, run) for run in runs])
    assert read(os.path.join(training, "summary.md")).strip() == expected.strip()


def test_benchmark_page_lists_the_runners_suites():
    from benchmarks.run import SUITES

    page = read(os.path.join(REPO_ROOT, "docs", "benchmarks.md"))
    listed = re.findall(r"^\| `(\w+)` \| `python -m benchmarks\.bench_\w+`", page, flags=re.M)
    assert listed == list(SUITES), f"docs/benchmarks.md lists the suites {listed}, benchmarks/run.py has {list(SUITES)}"
    for suite in SUITES:
        assert f"python -m benchmarks.bench_{suite}`" in page


def load_draw_layout():
    spec = importlib.util.spec_from_file_location("draw_layout", os.path.join(REPO_ROOT, "scripts", "draw_layout.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_picture_shows_the_mask_prefix_attention_applies():
    """The mask the README's picture draws (from the layout's key runs) is the one the
    reference backend applies: with zero scores and one-hot values, query i's output is
    nonzero exactly at the keys it sees."""
    from prefix_grouper import prefix_attention

    draw_layout = load_draw_layout()
    layout = draw_layout.example_layout()
    total = layout.total_tokens
    zeros = torch.zeros(total, 1, total, dtype=torch.float64)
    values = torch.eye(total, dtype=torch.float64)[:, None, :]
    seen = prefix_attention(zeros, zeros, values, layout, backend="reference")[:, 0] > 0
    assert torch.equal(draw_layout.attention_mask(layout), seen)
    assert os.path.isfile(os.path.join(REPO_ROOT, "docs", "images", "packed_layout.png"))
    assert "docs/images/packed_layout.png" in read(README)


def test_picture_script_draws(tmp_path):
    pytest.importorskip("matplotlib")
    draw_layout = load_draw_layout()
    draw_layout.main(["--out", str(tmp_path / "layout.png")])
    assert (tmp_path / "layout.png").stat().st_size > 10_000
