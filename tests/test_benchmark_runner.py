"""The benchmark runner's CPU path: every suite at its --smoke size writes a stamped CSV and a PNG."""
import argparse
import contextlib
import csv
import io
import re

import pytest

from benchmarks import run

PROVENANCE = ["suite", "device", "versions", "git_commit", "timestamp_utc"]
# Columns each suite's rows must carry beyond the provenance (what the README and the summary read).
SUITE_COLUMNS = {
    "attention": ["config", "approach", "fwd_ms", "fwd_bwd_ms", "peak_extra_gib", "useful_tflops_fwd_bwd",
                  "max_abs_diff_vs_ours", "agrees", "note"],
    "advantages": ["backend", "scope", "rows", "ms", "gbps", "fraction_of_copy"],
    "model": ["config", "approach", "step_ms", "tokens_per_s", "peak_extra_mib", "ideal_token_ratio",
              "max_abs_logprob_diff_vs_unpacked", "note"],
    "training": ["config", "approach", "rollout_s", "update_s", "step_s", "tokens_packed_per_step",
                 "tokens_unpacked_per_step"],
    "log_probs": ["config", "approach", "fwd_bwd_ms", "peak_extra_mib", "max_abs_diff_vs_plain"],
    "trl": ["config", "trl_ms", "prefix_grouper_ms", "speedup", "max_abs_diff_old_log_probs", "tokens_trl",
            "tokens_prefix_grouper", "tokens_one_level", "one_level_ms"],
    "tree": ["config", "approach", "measured", "unpacked_tokens", "one_level_tokens", "tree_tokens", "ms", "ms_min",
             "ms_max", "peak_extra_mib", "max_abs_diff_vs_unpacked", "agrees", "error"],
}


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """``(folder, printed output)`` of one ``--suite all --smoke`` run on CPU (about 30 s in all)."""
    folder = tmp_path_factory.mktemp("bench")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        status = run.main(["--suite", "all", "--smoke", "--device", "cpu", "--out", str(folder)])
    assert status == 0, printed.getvalue()
    return folder, printed.getvalue()


def read_rows(folder, suite):
    (path,) = [p for p in folder.glob(f"{suite}_*.csv") if "_ratios" not in p.name]
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_every_suite_is_tested():
    assert set(SUITE_COLUMNS) == set(run.SUITES)


@pytest.mark.parametrize("suite", list(SUITE_COLUMNS))
def test_smoke_run_writes_stamped_csv_and_png(suite, smoke_run):
    folder, printed = smoke_run
    rows = read_rows(folder, suite)
    assert rows
    assert list(rows[0])[:len(PROVENANCE)] == PROVENANCE
    missing = [c for c in SUITE_COLUMNS[suite] if c not in rows[0]]
    assert not missing, f"{suite} CSV lacks {missing}"
    for row in rows:
        assert row["suite"] == suite and row["device"].startswith("CPU")
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", row["timestamp_utc"])
        assert re.fullmatch(r"[0-9a-f]{12}(-dirty)?|unknown", row["git_commit"])
        assert "torch " in row["versions"]
    (csv_path,) = [p for p in folder.glob(f"{suite}_*.csv") if "_ratios" not in p.name]
    png = csv_path.with_suffix(".png")  # log_probs writes a second one, _memory.png
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"wrote {folder}/{suite}_" in printed


def test_model_suite_checks_log_probs_and_says_why_flex_is_missing(smoke_run):
    folder, printed = smoke_run
    rows = {r["approach"]: r for r in read_rows(folder, "model")}
    assert set(rows) == {"unpacked", "flex", "prefix_grouper", "prefix_grouper_fused", "prefix_grouper_flash"}
    # FlexAttention has no CPU backward: the row names torch's own refusal and holds no time.
    assert rows["flex"]["step_ms"] == "nan" and "backward" in rows["flex"]["note"]
    # Flash runs CUDA kernels: on CPU its row holds prefix_attention's refusal.
    flash = rows["prefix_grouper_flash"]
    assert flash["step_ms"] == "nan" and flash["note"].startswith("not run: ") and "CUDA" in flash["note"]
    for name in ("prefix_grouper", "prefix_grouper_fused"):
        # float32, same weights: the layouts differ only in summation order (measured ~5e-7).
        assert float(rows[name]["max_abs_logprob_diff_vs_unpacked"]) <= 1e-4
        assert float(rows[name]["step_ms"]) > 0 and rows[name]["note"] == ""
    # 1 prompt of 32 tokens, 2 completions of 8: unpacked 2 * 40 = 80 tokens, packed 48.
    assert rows["unpacked"]["ideal_token_ratio"] == f"{80 / 48:.2f}"


def test_trl_suite_shares_a_system_prompt_across_groups(smoke_run):
    folder, _ = smoke_run
    rows = {r["config"]: r for r in read_rows(folder, "trl")}
    plain, system = rows["smoke tiny P32 S8 G2 x1"], rows["smoke tiny system 40 P48 S8 G2 x2"]
    assert plain["one_level_ms"] == "nan" and plain["tokens_one_level"] == plain["tokens_prefix_grouper"]
    # 2 groups whose prompts (48 and 47 tokens) open with the same 40: the tree packs those once.
    assert int(system["tokens_one_level"]) - int(system["tokens_prefix_grouper"]) == 40
    assert float(system["one_level_ms"]) > 0 and float(system["max_abs_diff_old_log_probs"]) <= 1e-5


def test_tree_suite_counts_tokens_and_agrees_with_the_unpacked_rows(smoke_run):
    folder, printed = smoke_run
    rows = read_rows(folder, "tree")
    assert {r["config"] for r in rows} == {"(a) system prompt", "(b) multi-turn", "(c) history", "(d) GRPO depth 1",
                                           "build 64x512"}
    for row in rows:
        if row["approach"].endswith(" flash"):  # CUDA kernels: on CPU the rows say why and hold no time
            assert row["error"].startswith("not run: ") and row["ms"] == "nan" and row["agrees"] == "", row
        else:
            assert row["error"] == "" and row["agrees"] == "True", row
    assert {r["approach"] for r in rows if r["config"] == "(a) system prompt"} == {
        "unpacked", "looped", "one-level torch", "tree torch", "one-level flash", "tree flash"}
    tokens = {r["config"]: tuple(int(r[c] or 0) for c in ("unpacked_tokens", "one_level_tokens", "tree_tokens"))
              for r in rows}
    # --smoke divides lengths by 64. (a): system prompt 32, 8 questions of 4, G=8 completions of 8.
    assert tokens["(a) system prompt"] == (64 * (32 + 4 + 8), 8 * (32 + 4 + 8 * 8), 32 + 8 * 4 + 64 * 8)
    # (b): prompt 16, turns of 4 branching 4, 2, 2, 2: 4 + 8 + 16 + 32 turn nodes.
    assert tokens["(b) multi-turn"] == (32 * (16 + 4 * 4), 16 + 32 * 4 * 4, 16 + 60 * 4)
    unpacked, one_level, tree = tokens["(d) GRPO depth 1"]
    assert one_level == tree < unpacked
    # (c): 2 reset states x 8 episodes x 8 steps; first observation 8, actions 1, observations 4.
    assert tokens["(c) history"] == (2 * 8 * sum(8 + 1 + 5 * t for t in range(8)),
                                     2 * (8 + 8 + 8 * sum(8 + 1 + 5 * t for t in range(1, 8))), 2 * (8 + 8 * (8 + 7 * 4)))
    assert "(a) system prompt: tree holds 1/" in printed


# Every timed column and the range beside it, per suite (the ratio's significance reads them).
TIMED_COLUMNS = {"attention": ["fwd_ms", "fwd_bwd_ms"], "advantages": ["ms"], "model": ["step_ms"],
                 "training": ["rollout_s", "update_s", "step_s"], "log_probs": ["fwd_bwd_ms"],
                 "trl": ["trl_ms", "prefix_grouper_ms", "one_level_ms"], "tree": ["ms"]}


@pytest.mark.parametrize("suite", list(TIMED_COLUMNS))
def test_every_timed_row_reports_min_median_and_max(suite, smoke_run):
    folder, _ = smoke_run
    for row in read_rows(folder, suite):
        for metric in TIMED_COLUMNS[suite]:
            low, median, high = (float(row[f"{metric}{end}"]) for end in ("_min", "", "_max"))
            if median == median:  # NaN: not measured on this device (flex's backward on CPU)
                assert low <= median <= high, (suite, metric, row)


def test_attention_suite_says_why_flash_does_not_run_on_cpu(smoke_run):
    folder, _ = smoke_run
    rows = read_rows(folder, "attention")
    flash = [r for r in rows if r["approach"] == "flash"]
    assert len(flash) == len({r["config"] for r in rows}), "one flash row per config"
    for row in flash:
        assert row["note"].startswith("not run: ") and "CUDA" in row["note"], row
        assert row["fwd_ms"] == row["fwd_bwd_ms"] == "nan" and row["agrees"] == ""
    assert all(r["note"] == "" for r in rows if r["approach"] != "flash")


def test_flash_rows_run_and_agree_where_flash_runs():
    """Where flash runs (here its plain-PyTorch test engine on CPU, on a GPU FlashAttention-2),
    every suite's flash rows are checked like the others and timed: the GPU run starts from
    working code."""
    import math

    import torch

    from benchmarks import bench_attention, bench_model, bench_tree
    from prefix_grouper.attention import flash_engine

    cpu, f32, once = torch.device("cpu"), torch.float32, (0, 1)
    with flash_engine("reference"):
        for name, prefix, suffix, hq, hkv, d, *features in (bench_attention.SMOKE_CONFIGS
                                                            + bench_attention.FEATURE_SMOKE_CONFIGS):
            (row,) = bench_attention.bench_config(name, prefix, suffix, hq, hkv, d, cpu, f32, ["flash"], once,
                                                  *features)
            assert row["note"] == "" and row["agrees"] is True and math.isfinite(float(row["fwd_bwd_ms"])), row
        tree_rows = {r["approach"]: r for r in bench_tree.bench_shape("(c)", bench_tree.history_shape(64), cpu, f32,
                                                                       (2, 1, 8), once)}
        for approach in ("one-level flash", "tree flash"):
            row = tree_rows[approach]
            assert row["error"] == "" and row["agrees"] is True and math.isfinite(float(row["ms"])), row
        model_rows = {r["approach"]: r for r in bench_model.bench_config(*bench_model.SMOKE_CONFIGS[0], cpu, f32, once)}
        row = model_rows["prefix_grouper_flash"]
        # float32, same weights: the attention differs only in summation order.
        assert row["note"] == "" and float(row["max_abs_logprob_diff_vs_unpacked"]) <= 1e-4, row
        assert math.isfinite(float(row["step_ms"]))


def test_smoke_prints_no_ratios_and_cpu_runs_pin_one_thread(smoke_run):
    folder, printed = smoke_run
    assert not re.search(r"[0-9.]+x vs ", printed), "--smoke is a plumbing check: no ratios"
    assert not list(folder.glob("*_ratios.csv"))
    assert printed.count("timing on 1 CPU thread(s)") == len(SUITE_COLUMNS)
    for suite in SUITE_COLUMNS:
        assert all(r["device"].endswith(", 1 threads)") for r in read_rows(folder, suite))


def timed_rows(*timings):
    """Rows of one config: ``(approach, min, median, max)`` each."""
    return [{"config": "c", "approach": name, "ms": str(median), "ms_min": str(low), "ms_max": str(high)}
            for name, low, median, high in timings]


def test_a_ratio_whose_ranges_overlap_is_not_significant():
    from benchmarks.common import ratio_text, ratios

    apart = ratios(timed_rows(("base", 9, 10, 11), ("ours", 4, 5, 6)), config="config", approach="approach",
                   metric="ms", baselines=("base",))
    assert apart == [{"config": "c", "approach": "ours", "baseline": "base", "metric": "ms", "ratio": "2.00",
                      "significant": True}]
    assert ratio_text(apart[0]) == "c: ours 2.00x vs base (ms)"
    (overlap,) = ratios(timed_rows(("base", 5, 10, 11), ("ours", 4, 5, 6)), config="config", approach="approach",
                        metric="ms", baselines=("base",))
    assert overlap["ratio"] == "2.00" and overlap["significant"] is False
    assert ratio_text(overlap).endswith("not significant: the min-max ranges overlap")


def test_a_timed_run_prints_and_writes_its_ratios_with_their_significance(tmp_path, capsys):
    import types

    from benchmarks.common import add_device_arguments, add_size_arguments, ratios, run_suite

    parser = argparse.ArgumentParser()
    add_device_arguments(parser)
    add_size_arguments(parser)
    parser.add_argument("--out")
    parser.add_argument("--update-results", action="store_true")
    module = types.SimpleNamespace(
        run=lambda args: iter(timed_rows(("base", 9, 10, 11), ("ours", 4, 5, 6), ("close", 8, 9.5, 12))),
        summary=lambda rows: [],
        ratios=lambda rows: ratios(rows, config="config", approach="approach", metric="ms", baselines=("base",)),
        plot=lambda rows, path, where: open(path, "wb").write(b"png"))
    run_suite("fake", module, parser.parse_args(["--device", "cpu", "--threads", "2", "--out", str(tmp_path)]))
    printed = capsys.readouterr().out
    assert "timing on 2 CPU thread(s)" in printed
    assert "c: ours 2.00x vs base (ms)\n" in printed
    assert "c: close 1.05x vs base (ms) - not significant: the min-max ranges overlap" in printed
    (path,) = tmp_path.glob("fake_*_ratios.csv")
    with open(path, newline="") as f:
        written = {r["approach"]: r for r in csv.DictReader(f)}
    assert written["ours"]["significant"] == "True" and written["close"]["significant"] == "False"
    assert written["ours"]["device"].startswith("CPU") and written["ours"]["timestamp_utc"]


def test_a_failing_suite_keeps_its_rows_and_the_others_still_run(tmp_path, monkeypatch, capsys):
    def broken(args):  # measures one config, then dies (as a suite stopped by a timeout would)
        yield {"config": "first", "approach": "plain", "fwd_bwd_ms": 1.0}
        raise RuntimeError("suite broke")

    monkeypatch.setattr(run.suite_module("log_probs"), "run", broken)
    status = run.main(["--suite", "log_probs", "advantages", "--smoke", "--device", "cpu", "--out", str(tmp_path)])
    assert status == 1
    printed = capsys.readouterr()
    assert "FAILED: log_probs" in printed.out
    # One line says what broke; the traceback goes to a file beside the results.
    (line,) = [line for line in printed.err.splitlines() if "suite log_probs failed" in line]
    assert "RuntimeError: suite broke" in line and "Traceback" not in printed.err
    assert "suite broke" in (tmp_path / "log_probs_traceback.txt").read_text()
    assert [r["config"] for r in read_rows(tmp_path, "log_probs")] == ["first"]
    assert not list(tmp_path.glob("log_probs_*.png"))
    assert read_rows(tmp_path, "advantages")


def test_quick_and_smoke_exclude_each_other():
    with pytest.raises(SystemExit):
        run.main(["--suite", "all", "--quick", "--smoke"])


def test_flex_grouped_model_matches_the_unpacked_rows_forward():
    """The FlexAttention-grouped model is timed only where FlexAttention has a backward (GPU):
    its forward, which CPU has, is checked here so that a GPU run starts from working code."""
    import torch
    import transformers

    from benchmarks.attention_contenders import flex_for_layout
    from benchmarks.bench_model import SMOKE, flex_completion_log_probs, flex_model
    from prefix_grouper import GroupLayout
    from prefix_grouper.unpacked import unpacked_completion_log_probs

    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(max_position_embeddings=512, **SMOKE))
    model.set_attn_implementation("sdpa")
    layout = GroupLayout.from_lengths([32, 17], [[8, 3], [5]])
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(SMOKE["vocab_size"], (p,), generator=gen) for p in (32, 17)]
    completions = [torch.randint(SMOKE["vocab_size"], (s,), generator=gen) for s in (8, 3, 5)]
    with torch.no_grad():
        want, mask = unpacked_completion_log_probs(model, layout, prompts, completions)
        got, got_mask = flex_completion_log_probs(flex_model(model), layout, prompts, completions,
                                                  flex_for_layout(layout))
    assert torch.equal(got_mask, mask)
    # float32, 2 layers: the layouts differ only in summation order (measured 0.0 here).
    assert (got - want)[mask].abs().max().item() <= 1e-5


def test_the_runner_writes_its_wall_times(smoke_run):
    folder, _ = smoke_run
    rows = read_rows(folder, "run")
    assert [r["suite"] for r in rows] == [*SUITE_COLUMNS, "total"]
    assert all(r["size"] == "smoke" and r["failed"] == "False" and r["timestamp_utc"] for r in rows)
    assert abs(sum(float(r["seconds"]) for r in rows[:-1]) - float(rows[-1]["seconds"])) < 0.5
