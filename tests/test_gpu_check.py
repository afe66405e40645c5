"""The prepared device call (scripts/gpu_check.sh, scripts/gpu_probe.py) checked on CPU, so a
GPU session's few minutes are not spent finding a typo or a wrong reference.

The device call can only be run where a GPU is lent; what it names (benchmark configs,
suites, test files) and the probe's own bf16 baseline can be checked here.
"""
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from prefix_grouper import GroupLayout
from prefix_grouper.attention import flash_engine
from prefix_grouper.attention.reference import reference_prefix_attention

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = (ROOT / "scripts" / "gpu_check.sh").read_text()
sys.path.insert(0, str(ROOT / "scripts"))
import gpu_probe  # noqa: E402


def _step_words(step_name: str) -> list[str]:
    """The words of one `step "<name>" ...` command (continuation lines joined)."""
    joined = SCRIPT.replace("\\\n", " ")
    line = next(line for line in joined.splitlines() if line.startswith(f'step "{step_name}"'))
    return shlex.split(line)


def test_script_parses():
    subprocess.run(["bash", "-n", str(ROOT / "scripts" / "gpu_check.sh")], check=True)


def test_attention_configs_exist_on_the_gpu():
    from benchmarks import bench_attention

    words = _step_words("attention suite")
    named = words[words.index("--configs") + 1:]
    known = {c[0] for c in bench_attention.GPU_CONFIGS + bench_attention.FEATURE_GPU_CONFIGS}
    assert named and set(named) <= known, set(named) - known


def test_suites_and_test_files_exist():
    from benchmarks.run import SUITES

    for step in ("model suite", "tree suite", "advantages suite"):
        words = _step_words(step)
        suites = words[words.index("--suite") + 1:]
        assert suites and set(suites) <= set(SUITES), (step, suites)
    for step in ("GPU tests", "flash GPU tests"):
        files = [w for w in _step_words(step) if w.startswith("tests/")]
        assert files and all((ROOT / f).is_file() for f in files), (step, files)


def test_flash_steps_build_the_merge_kernel_and_run_its_tests():
    build = _step_words("build")
    # Forced: a build that cannot compile csrc/ fails the step instead of leaving flash on its
    # PyTorch merge fallback.
    assert "PREFIX_GROUPER_FORCE_CUDA_BUILD=1" in build and build[-2:] == ["-e", "."]
    files = [w for w in _step_words("flash GPU tests") if w.startswith("tests/")]
    assert files == ["tests/attention/test_prefix_attention_flash_gpu.py", "tests/test_flash_merge.py"]


@pytest.mark.parametrize("step, suite", [("attention suite", "attention"), ("model suite", "model"),
                                         ("tree suite", "tree")])
def test_benchmark_steps_keep_the_flash_rows(step, suite):
    """No suite step narrows the approaches: each suite's flash row runs (or says why not)."""
    words = _step_words(step)
    assert "--approaches" not in words
    assert f"benchmarks.bench_{suite}" in words or suite in words[words.index("--suite") + 1:]


def test_log_probs_step_measures_the_target_shape():
    """The issue's fused log-probs target is read at C=8192, H=1536 on Qwen's vocabulary."""
    from benchmarks import bench_log_probs

    words = _step_words("log_probs suite")
    named = [tuple(int(x) for x in c.split(",")) for c in words[words.index("--configs") + 1:]]
    assert named[0] == (8192, 1536)
    assert set(named) <= {(rows, width) for rows, width, _ in bench_log_probs.GPU_CONFIGS}, named


def test_timeouts_fit_the_budget():
    # Under 8 minutes of steps, so one device call leaves time for a second in a 15-minute lease.
    defaults = [int(s) for s in re.findall(r'"\$\{[A-Z_]+_S:-(\d+)\}"', SCRIPT)]
    assert len(defaults) == 10 and sum(defaults) <= 480, defaults


def test_correctness_steps_run_without_the_autotuning_sweep():
    for step in ("bf16 probe (features, repeatability, host sync)", "flash GPU tests", "GPU tests"):
        assert "PREFIX_GROUPER_AUTOTUNE=off" in _step_words(step), step


@pytest.mark.parametrize("window, softcap, sinks", [(None, None, False), (5, None, False), (None, 3.0, False),
                                                    (None, None, True), (4, 2.0, True)])
def test_probe_baseline_is_the_reference_in_float64(window, softcap, sinks):
    """The probe's PyTorch-eager baseline computes the same attention as the reference, so
    its bf16 error is a fair yardstick (fp64 in, one float32 softmax: ~1e-7 apart)."""
    layout = GroupLayout.from_lengths([1, 9, 4], [[3, 0], [1, 7, 2], [5]])
    gen = torch.Generator().manual_seed(7)
    t = layout.total_tokens
    q, k, v = (torch.randn(t, h, 16, generator=gen, dtype=torch.float64) for h in (6, 2, 2))
    sink_logits = torch.randn(6, generator=gen, dtype=torch.float64) if sinks else None
    ours = gpu_probe.eager_attention(q, k, v, layout, window, softcap, sink_logits)
    truth, _ = reference_prefix_attention(q, k, v, layout, 16 ** -0.5, window=window, softcap=softcap,
                                          sinks=sink_logits)
    torch.testing.assert_close(ours, truth, rtol=0, atol=1e-5)


@pytest.mark.parametrize("make_layout", [gpu_probe.random_layout, gpu_probe.random_tree])
def test_probe_cases_run_end_to_end(make_layout, capsys):
    """A probe case, with the torch backend in float32 standing in for Triton in bf16: the
    random layouts build, every gradient is compared, and a correct backend passes."""
    gen = torch.Generator().manual_seed(3)
    features = dict(window=17, softcap=3.0, sinks=True)
    failures = gpu_probe.check_case("cpu", make_layout(gen, "cpu"), (4, 2, 16), features, gen, "cpu",
                                    backends=("torch",), dtype=torch.float32)
    printed = capsys.readouterr().out
    assert failures == 0, printed
    assert all(f"{name} " in printed for name in ("out", "dq", "dk", "dv", "dsinks"))
    assert "bitwise repeatable: True" in printed


@pytest.mark.parametrize("make_layout", [gpu_probe.random_layout, gpu_probe.random_tree])
def test_probe_flash_case_runs_on_the_reference_engine(make_layout, capsys):
    """The probe's flash line, through the composition on the plain-PyTorch test engine in
    float32 (what the GPU runs on FlashAttention-2 in bf16): every gradient compared, passing."""
    gen = torch.Generator().manual_seed(5)
    features = dict(window=17, softcap=3.0, sinks=True)
    with flash_engine("reference"):
        failures = gpu_probe.check_case("cpu", make_layout(gen, "cpu"), (4, 2, 16), features, gen, "cpu",
                                        backends=("flash",), dtype=torch.float32)
    printed = capsys.readouterr().out
    assert failures == 0, printed
    assert "rel err flash/eager" in printed and "dsinks " in printed


def test_probe_skips_flash_where_it_refuses(capsys):
    """Off CUDA (as for a softcap on PyTorch's engine) flash's line is its reason, not a failure."""
    gen = torch.Generator().manual_seed(5)
    failures = gpu_probe.check_case("cpu", gpu_probe.random_layout(gen, "cpu"), (4, 2, 16), {}, gen, "cpu",
                                    backends=("flash",), dtype=torch.float32)
    printed = capsys.readouterr().out
    assert failures == 0 and "flash not run: " in printed and "needs CUDA tensors" in printed, printed


@pytest.mark.parametrize("backend, deterministic, failures", [("triton", False, 1), ("flash", False, 0),
                                                              ("flash", True, 1)])
def test_probe_requires_flash_to_repeat_only_in_deterministic_mode(backend, deterministic, failures, capsys):
    """FlashAttention-2 adds dQ up with atomics: flash's two calls may differ unless
    torch.use_deterministic_algorithms(True); every other backend must repeat bitwise."""
    calls = []

    def drifting(q, k, v, s=None):  # exact the first time, 1 ulp off the second
        calls.append(None)
        return (q + k + v) * (1 + (len(calls) - 1) * torch.finfo(q.dtype).eps)

    q = torch.randn(5, 2, 8, dtype=torch.float64)
    exact = gpu_probe.outputs_and_grads(lambda q, k, v, s=None: q + k + v, [q, q, q, None], torch.ones_like(q))
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        found = gpu_probe.check_backend("case", backend, drifting, [q, q, q, None], torch.ones_like(q), exact, exact,
                                        torch.float64)
    finally:
        torch.use_deterministic_algorithms(was)
    printed = capsys.readouterr().out
    assert found == failures, printed
    assert "bitwise repeatable: False" in printed


def test_probe_merge_kernel_check_says_why_it_cannot_run():
    """On CPU tensors the CUDA merge op cannot run: the probe's check gives the reason (on the
    GPU, a missing reason means the kernel ran)."""
    assert gpu_probe.merge_kernel_missing(torch.device("cpu"))


def test_probe_without_a_gpu_says_so():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_probe.py")], capture_output=True,
                            text=True, cwd=ROOT)
    assert result.returncode == 2 and "needs a CUDA GPU" in result.stderr


def test_probe_model_steps_run():
    """The probe's model steps (timed for host syncs on the GPU) run as written, here in fp32."""
    for head, step in gpu_probe.model_steps(torch.device("cpu"), torch.float32).items():
        step()


def test_probe_sync_sites_fail_only_in_this_package():
    inside = f"{gpu_probe.PACKAGE_DIR}/models/packed.py:120"
    allowed = f"{gpu_probe.PACKAGE_DIR}/logprobs/api.py:211"
    sites = gpu_probe.Counter({inside: 2, allowed: 1, "/x/site-packages/transformers/modeling.py:9": 3})
    assert gpu_probe.unexpected_sync_sites(sites, gpu_probe.ALLOWED_SYNC_FILES["fused"]) == {inside: 2}
    assert gpu_probe.unexpected_sync_sites(sites, gpu_probe.ALLOWED_SYNC_FILES["plain"]) == {inside: 2, allowed: 1}
