"""fused_linear_log_probs against the float64 reference: values, entropy, every gradient, errors,
and the memory bound (a process that cannot hold the full logits still runs it)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import assert_compiles_for_sm90
from prefix_grouper import fused_linear_log_probs
from prefix_grouper.logprobs import default_chunk_size, reference_log_probs, resolve_backend
from prefix_grouper.logprobs.api import MIN_VOCAB_BLOCK, backward_blocks
from prefix_grouper.logprobs.triton_impl import MAX_BLOCK_V

BACKENDS = ["torch", "triton"]  # triton under the interpreter here (tests/conftest.py)
# Ragged chunks on purpose: 7 and 33 rows in chunks of 4 leave a last chunk of 3 and 1.
SHAPES = [(1, 5, 3), (7, 97, 16), (33, 97, 3), (7, 5, 16)]
CHUNK = 4
TEMPERATURE = 0.7
# float64 inputs: only summation order differs from the reference (V <= 97 terms).
# float32: logits of magnitude ~sqrt(H) ~ 4 carry ~4e-7 rounding, a log-sum-exp and the
# chunked matmul accumulations a few ulps more; 2e-5 leaves a 10x margin.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5}


def make_inputs(rows, vocab, width, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, width, generator=gen, dtype=torch.float64).to(dtype)
    weight = torch.randn(vocab, width, generator=gen, dtype=torch.float64).to(dtype)
    bias = torch.randn(vocab, generator=gen, dtype=torch.float64).to(dtype)
    targets = torch.randint(vocab, (rows,), generator=gen)
    return hidden, weight, bias, targets


OUTPUTS = ["log_probs", "entropy", "d hidden", "d weight", "d bias"]


def values_and_grads(fn, inputs, upstream):
    """``(log_probs, entropy, d hidden, d weight, d bias)`` of ``fn(hidden, weight, bias)`` for
    the upstream gradients ``upstream [2, C]`` of (log_probs, entropy)."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    outputs = fn(*leaves)
    torch.autograd.backward(outputs, [grad.to(out.dtype) for grad, out in zip(upstream, outputs)])
    return tuple(outputs) + tuple(leaf.grad for leaf in leaves)


def fused_and_reference(backend, hidden, weight, bias, targets, temperature=1.0, reference_inputs=None):
    """:func:`values_and_grads` of the fused call and of the float64 reference for one random
    upstream gradient; the reference runs on ``reference_inputs`` (hidden, weight, bias,
    targets), by default the same inputs cast to float64."""
    upstream = torch.randn(2, hidden.shape[0], generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ours = values_and_grads(
        lambda h, w, b: fused_linear_log_probs(h, w, targets, bias=b, temperature=temperature, return_entropy=True,
                                               chunk_size=CHUNK, backend=backend),
        (hidden, weight, bias), upstream)
    *float_inputs, reference_targets = reference_inputs or (hidden.double(), weight.double(), bias.double(), targets)
    expected = values_and_grads(lambda h, w, b: reference_log_probs(h, w, reference_targets, b, temperature),
                                float_inputs, upstream)
    return ours, expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "C{}_V{}_H{}".format(*s))
@pytest.mark.parametrize("backend", BACKENDS)
def test_values_entropy_and_gradients_match_float64_reference(backend, shape, dtype):
    ours, expected = fused_and_reference(backend, *make_inputs(*shape, dtype), temperature=TEMPERATURE)
    assert ours[0].dtype == ours[1].dtype == dtype
    for name, got, want in zip(OUTPUTS, ours, expected):
        torch.testing.assert_close(got.double(), want, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype], msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_vocabulary_of_several_kernel_tiles(backend, dtype):
    """V spans three Triton tiles, and a rising bias moves each row's running max into later
    tiles, so the online log-sum-exp and entropy rescale (the small shapes fit one tile)."""
    vocab = 2 * MAX_BLOCK_V + 5
    hidden, weight, bias, targets = make_inputs(3, vocab, 3, dtype)
    bias += torch.linspace(-4, 4, vocab, dtype=dtype)
    targets[:2] = torch.tensor([7, vocab - 1])
    ours, expected = fused_and_reference(backend, hidden, weight, bias, targets, temperature=TEMPERATURE)
    for name, got, want in zip(OUTPUTS, ours, expected):
        torch.testing.assert_close(got.double(), want, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype], msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_final_logit_softcap_matches_float64_reference(backend, dtype):
    """Gemma 2's ``softcap * tanh(logits / softcap)`` before the temperature, on logits of
    several softcaps (bias up to 30, softcap 3: the tanh saturates), with a banned token
    (a -inf bias caps to -softcap, as in the model), over row chunks and vocabulary blocks."""
    hidden, weight, bias, targets = make_inputs(37, 700, 5, dtype, seed=4)
    bias = bias * 10
    bias[3] = float("-inf")
    targets[:2] = torch.tensor([3, 699])
    upstream = torch.randn(2, 37, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ours = values_and_grads(
        lambda h, w, b: fused_linear_log_probs(h, w, targets, bias=b, temperature=TEMPERATURE, softcap=3.0,
                                               return_entropy=True, chunk_size=5, backend=backend),
        (hidden, weight, bias), upstream)
    expected = values_and_grads(lambda h, w, b: reference_log_probs(h, w, targets, b, TEMPERATURE, softcap=3.0),
                                (hidden.double(), weight.double(), bias.double()), upstream)
    for name, got, want in zip(OUTPUTS, ours, expected):
        torch.testing.assert_close(got.double(), want, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype], msg=name)
    uncapped = fused_linear_log_probs(hidden, weight, targets, bias=bias, temperature=TEMPERATURE, backend=backend)
    assert (uncapped - ours[0]).abs().max() > 1.0  # the cap is really applied


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64_with_softcap(backend):
    hidden, weight, bias, targets = make_inputs(3, 5, 2, torch.float64, seed=2)
    inputs = [t.requires_grad_() for t in (hidden, weight, bias)]
    assert torch.autograd.gradcheck(
        lambda h, w, b: fused_linear_log_probs(h, w, targets, bias=b, temperature=1.3, softcap=0.8,
                                               return_entropy=True, chunk_size=2, backend=backend),
        inputs)


@pytest.mark.parametrize("chunk_size, blocks", [(20, (37, 378)), (5, (13, 256))], ids=["vocab-blocks", "2d-blocks"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_blocks_across_the_vocabulary(backend, chunk_size, blocks):
    """More rows than a chunk: the backward walks blocks of vocabulary columns (every row at
    once: 2 blocks of 378 and 322 columns), or, where that would leave fewer than 256
    columns, row blocks too (3 x 3 blocks, weight gradient summed over row blocks). Targets
    sit in every column block and on its first and last column."""
    rows, vocab = 37, 700
    assert backward_blocks(rows, vocab, chunk_size) == blocks
    hidden, weight, bias, targets = make_inputs(rows, vocab, 5, torch.float64, seed=3)
    targets[:6] = torch.tensor([0, 255, 256, 377, 378, vocab - 1])
    upstream = torch.randn(2, rows, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ours = values_and_grads(
        lambda h, w, b: fused_linear_log_probs(h, w, targets, bias=b, temperature=TEMPERATURE, return_entropy=True,
                                               chunk_size=chunk_size, backend=backend),
        (hidden, weight, bias), upstream)
    expected = values_and_grads(lambda h, w, b: reference_log_probs(h, w, targets, b, TEMPERATURE),
                                (hidden, weight, bias), upstream)
    for name, got, want in zip(OUTPUTS, ours, expected):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10, msg=name)


@pytest.mark.parametrize("rows, vocab, chunk_size", [(0, 9, 4), (4, 9, 4), (5, 9, 4), (2048, 151936, 441),
                                                     (32768, 151936, 441), (10**6, 151936, 441), (10**6, 7, 1)])
def test_backward_blocks_fit_the_chunk_budget(rows, vocab, chunk_size):
    """Blocks hold at most a forward chunk's logits (chunk_size x V); all rows at once while
    that leaves >= MIN_VOCAB_BLOCK columns (GRPO's 2048-32768 completion tokens of Qwen's
    vocabulary: 2 to 28 blocks of columns, no weight-gradient accumulator)."""
    row_block, columns = backward_blocks(rows, vocab, chunk_size)
    # Never narrower than the minimum block (unless the vocabulary is), never more rows than there are.
    assert columns >= min(vocab, MIN_VOCAB_BLOCK) and row_block <= max(rows, 1)
    assert row_block * columns <= max(chunk_size * vocab, MIN_VOCAB_BLOCK)
    if rows <= chunk_size:
        assert columns == vocab
    if rows * min(vocab, MIN_VOCAB_BLOCK) <= chunk_size * vocab:
        assert row_block >= rows


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64_both_outputs(backend):
    """The full Jacobian of both outputs w.r.t. hidden, weight and bias (any upstream gradient)."""
    hidden, weight, bias, targets = make_inputs(3, 5, 2, torch.float64, seed=2)
    inputs = [t.requires_grad_() for t in (hidden, weight, bias)]
    assert torch.autograd.gradcheck(
        lambda h, w, b: fused_linear_log_probs(h, w, targets, bias=b, temperature=1.3, return_entropy=True,
                                               chunk_size=2, backend=backend),
        inputs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_half_inputs_give_float32_outputs_and_half_grads(backend, dtype):
    ours, expected = fused_and_reference(backend, *make_inputs(7, 97, 16, dtype))
    assert ours[0].dtype == ours[1].dtype == torch.float32
    assert [g.dtype for g in ours[2:]] == [dtype] * 3
    # The head's matmuls run in the input dtype (fp32 accumulation, output rounded to bf16's
    # 8 bits of mantissa): logits of magnitude ~5 are off by up to ~0.02, gradients (~1) by a
    # few bf16 ulps. fp16 (11 bits) is 8x tighter; one bound covers both.
    for name, got, want in zip(OUTPUTS, ours, expected):
        torch.testing.assert_close(got.double(), want, atol=0.06, rtol=0.02, msg=name)


def head_grad_errors(log_probs_fn, rows, width, vocab):
    """Relative Frobenius errors, against float64, of the bf16 hidden and LM-head weight
    gradients of ``sum(g * log_probs_fn(hidden, weight, targets))`` for a random upstream
    ``g``: ``[(hidden, weight) of PyTorch's plain path, (hidden, weight) of log_probs_fn]``."""
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(rows, width, generator=gen, dtype=torch.float64) / width**0.5
    weight = torch.randn(vocab, width, generator=gen, dtype=torch.float64) * 2  # logits of a few units
    targets = torch.randint(vocab, (rows,), generator=gen)
    upstream = torch.randn(rows, generator=gen, dtype=torch.float64)

    def grads(fn, dtype):
        h, w = (x.to(dtype).detach().clone().requires_grad_() for x in (hidden, weight))
        (fn(h, w, targets).double() * upstream).sum().backward()
        return h.grad.double(), w.grad.double()

    def plain(h, w, t):  # PyTorch's own path: bf16 logits, float32 log_softmax
        return torch.log_softmax((h @ w.t()).float(), dim=-1).gather(1, t[:, None]).squeeze(1)

    exact = grads(lambda h, w, t: torch.log_softmax(h @ w.t(), -1).gather(1, t[:, None]).squeeze(1), torch.float64)
    return [tuple(((got - want).norm() / want.norm()).item() for got, want in zip(grads(fn, torch.bfloat16), exact))
            for fn in (plain, log_probs_fn)]


@pytest.mark.parametrize("backend,rows,vocab,chunk", [("torch", 4096, 512, 64), ("torch", 512, 4096, 16),
                                                     ("triton", 512, 512, 8)])
def test_bfloat16_gradients_are_as_accurate_as_pytorchs(backend, rows, vocab, chunk):
    """The backward's blocks (torch: 32 row x 2 vocabulary blocks, then 2 x 16; triton, a shape
    the interpreter runs: 32 x 2) sum into the weight gradient over row blocks and into the
    hidden gradient over vocabulary blocks. Summed in bf16 each sum rounds (measured 2.9x and
    2.5x PyTorch's weight-gradient error, 64 chunks); in float32, cast once, the errors were
    1.1x (both gradients, both torch shapes). Bound: 2x."""
    (plain_hidden, plain_weight), (fused_hidden, fused_weight) = head_grad_errors(
        lambda h, w, t: fused_linear_log_probs(h, w, t, chunk_size=chunk, backend=backend), rows, 64, vocab)
    assert 0 < plain_hidden < 0.01 and 0 < plain_weight < 0.01
    assert fused_weight <= 2 * plain_weight, (fused_weight, plain_weight)
    assert fused_hidden <= 2 * plain_hidden, (fused_hidden, plain_hidden)


@pytest.mark.parametrize("backend", BACKENDS)
def test_banned_token_bias_minus_inf_equals_vocabulary_without_it(backend):
    """A -inf bias (a banned token) has p = 0: values and gradients equal those of the
    vocabulary without that token, and its weight row gets a zero gradient (not NaN)."""
    hidden, weight, bias, targets = make_inputs(6, 9, 4, torch.float64, seed=4)
    banned = 3
    bias[banned] = float("-inf")
    targets[targets == banned] = banned + 1
    kept = [v for v in range(9) if v != banned]
    remapped = targets - (targets > banned).long()
    ours, expected = fused_and_reference(backend, hidden, weight, bias, targets,
                                         reference_inputs=(hidden, weight[kept], bias[kept], remapped))
    for name, got, want in zip(OUTPUTS[:3], ours[:3], expected[:3]):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10, msg=name)
    torch.testing.assert_close(ours[3][kept], expected[3], atol=1e-10, rtol=1e-10)
    assert torch.equal(ours[3][banned], torch.zeros(4, dtype=torch.float64))
    assert ours[4][banned] == 0


@pytest.mark.parametrize("used", ["log_probs", "entropy"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_through_one_output_alone(backend, used):
    """The output the loss leaves out reaches the backward as None, not zeros: both paths."""
    hidden, weight, bias, targets = make_inputs(7, 11, 3, torch.float64)

    def grads(fn):
        leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
        fn(*leaves)[OUTPUTS.index(used)].sum().backward()
        return [leaf.grad for leaf in leaves]

    ours = grads(lambda h, w, b: fused_linear_log_probs(h, w, targets, bias=b, temperature=TEMPERATURE,
                                                        return_entropy=True, chunk_size=CHUNK, backend=backend))
    expected = grads(lambda h, w, b: reference_log_probs(h, w, targets, b, TEMPERATURE))
    for name, got, want in zip(OUTPUTS[2:], ours, expected):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_log_probs_only_sum_backward_and_empty_batch(backend):
    """return_entropy=False returns one tensor; .sum() hands the backward an expanded grad."""
    hidden, weight, _, targets = make_inputs(5, 11, 3, torch.float64)
    hidden.requires_grad_()
    log_probs = fused_linear_log_probs(hidden, weight, targets, chunk_size=2, backend=backend)
    log_probs.sum().backward()
    expected_hidden = hidden.detach().clone().requires_grad_()
    reference_log_probs(expected_hidden, weight, targets)[0].sum().backward()
    torch.testing.assert_close(hidden.grad, expected_hidden.grad, atol=1e-10, rtol=1e-10)

    empty_weight = weight.clone().requires_grad_()
    log_probs, entropy = fused_linear_log_probs(hidden[:0], empty_weight, targets[:0], return_entropy=True,
                                                backend=backend)
    assert log_probs.shape == entropy.shape == (0,)
    (log_probs.sum() + entropy.sum()).backward()
    assert torch.equal(empty_weight.grad, torch.zeros_like(weight))


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_does_not_change_the_result(backend):
    """Under autocast the forward's matmul would run in bf16 but the backward's recomputation
    (autocast off there) in float32: logits inconsistent with the saved lse. The head runs
    in the inputs' dtype in both, so autocast changes nothing."""
    inputs = make_inputs(7, 97, 16, torch.float32)
    plain, _ = fused_and_reference(backend, *inputs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast, _ = fused_and_reference(backend, *inputs)
    for name, got, want in zip(OUTPUTS, under_autocast, plain):
        torch.testing.assert_close(got, want, atol=0, rtol=0, msg=name)


def test_default_chunk_size_fits_the_budget():
    assert default_chunk_size(151936, torch.bfloat16) == 441  # 256 MiB of float32 logits
    assert default_chunk_size(151936, torch.float64) == 220
    assert default_chunk_size(2**40, torch.float32) == 1


def test_backend_resolution():
    assert resolve_backend("auto", torch.device("cpu")) == "torch"  # even under the Triton interpreter
    with pytest.raises(RuntimeError, match="backend='triton' is not available on meta"):
        resolve_backend("triton", torch.device("meta"))


def error_cases():
    hidden, weight, bias, targets = make_inputs(4, 6, 3, torch.float32)
    return [
        (dict(targets=torch.tensor([0, 1, 6, 2])), ValueError, r"targets must be token ids in \[0, V\) = \[0, 6\)"),
        (dict(targets=torch.tensor([0, -1, 2, 2])), ValueError, r"got ids from -1 to 2"),
        (dict(targets=targets.float()), TypeError, "targets must hold integer token ids"),
        (dict(targets=[0, 1, 2, 3]), TypeError, "targets must be an integer torch.Tensor"),
        (dict(targets=targets[:3]), ValueError, r"targets must be \[C\] = \[4\]"),
        (dict(hidden=hidden[0]), ValueError, r"hidden must be 2-D \[C, H\]"),
        (dict(hidden=hidden.long()), TypeError, "hidden must be a floating-point tensor"),
        (dict(weight=weight[:, :2]), ValueError, "weight .V, H. has H = 2 but hidden .C, H. has H = 3"),
        (dict(weight=weight.double()), ValueError, "weight .torch.float64, cpu. must have hidden's dtype"),
        (dict(weight=weight[:0]), ValueError, "the vocabulary V must be at least 1"),
        (dict(bias=bias[:5]), ValueError, r"bias must be \[V\] = \[6\]"),
        (dict(bias=bias.half()), ValueError, "bias .torch.float16, cpu. must have hidden's dtype"),
        (dict(temperature=0.0), ValueError, "temperature must be a positive finite number"),
        (dict(temperature=-1.0), ValueError, "temperature must be a positive finite number"),
        (dict(temperature=float("nan")), ValueError, "temperature"),
        (dict(temperature=float("inf")), ValueError, "temperature must be a positive finite number"),
        (dict(temperature="1.0"), TypeError, "temperature must be a real number"),
        # 1/temperature would overflow float32 once it multiplies the logits (NaN log-probs before).
        (dict(temperature=1e-38), ValueError, r"temperature must be at least 5.42e-20 for torch.float32"),
        (dict(temperature=1e-30), ValueError, "temperature must be at least"),
        (dict(temperature=5e-324), ValueError, "temperature must be at least"),
        (dict(softcap=0.0), ValueError, "softcap must be a positive finite number"),
        (dict(softcap=-30.0), ValueError, "softcap must be a positive finite number"),
        (dict(softcap=float("inf")), ValueError, "softcap must be a positive finite number"),
        (dict(softcap="30"), TypeError, "softcap must be a real number"),
        # 1/softcap would overflow float32 in the kernels.
        (dict(softcap=1e-39), ValueError, r"softcap must be in \[2.94e-39, 1.84e\+19\] for torch.float32"),
        (dict(chunk_size=0), ValueError, "chunk_size must be a positive number of rows"),
        (dict(chunk_size=2.0), TypeError, "chunk_size must be None or a positive int"),
        (dict(chunk_size=True), TypeError, "chunk_size must be None or a positive int"),
        (dict(backend="cuda"), ValueError, "backend must be one of 'auto', 'torch', 'triton'"),
        (dict(return_entropy="yes"), TypeError, "return_entropy must be True or False"),
    ]


@pytest.mark.parametrize("change,error,match", error_cases(), ids=lambda x: None)
def test_errors_name_the_argument(change, error, match):
    hidden, weight, bias, targets = make_inputs(4, 6, 3, torch.float32)
    args = dict(hidden=hidden, weight=weight, targets=targets)
    kwargs = dict(bias=bias)
    for name, value in change.items():
        (args if name in args else kwargs)[name] = value
    with pytest.raises(error, match=match):
        fused_linear_log_probs(args["hidden"], args["weight"], args["targets"], **kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", BACKENDS)
def test_cuda_bfloat16_matches_reference_and_holds_only_chunks(backend):
    cuda_inputs = [t.cuda() for t in make_inputs(700, 50000, 64, torch.bfloat16)]
    ours, expected = fused_and_reference(backend, *cuda_inputs)
    for name, got, want in zip(OUTPUTS, ours, expected):
        # The bf16 bound of test_half_inputs_give_float32_outputs_and_half_grads.
        torch.testing.assert_close(got.double(), want, atol=0.06, rtol=0.02, msg=name)

    hidden, weight, _, targets = (t.cuda() for t in make_inputs(4096, 50000, 64, torch.bfloat16))
    hidden.requires_grad_()
    weight.requires_grad_()
    chunk = 256
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    log_probs, entropy = fused_linear_log_probs(hidden, weight, targets, return_entropy=True, chunk_size=chunk,
                                                backend=backend)
    (log_probs.sum() + entropy.sum()).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    # At most ~3 float32 chunks at a time (torch backend: upcast logits, exp, bf16 gradient
    # copy), plus the gradients and outputs; full float32 logits would be 4096 * 50000 * 4
    # = 819 MB, this bound 4 chunks = 205 MB plus 8 MB. The backward's blocks are all 4096
    # rows by 3125 columns (backward_blocks), so the weight gradient is written once, in bf16,
    # with no float32 [V, H] accumulator; the hidden gradient sums in a float32 [C, H] one.
    grads_and_outputs = (hidden.numel() + weight.numel()) * 2 + hidden.numel() * 4 + 4 * 4096 * 4
    assert backward_blocks(4096, 50000, chunk) == (4096, 3125)
    assert extra <= 4 * chunk * 50000 * 4 + grads_and_outputs + 2**20, extra


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_targets_on_another_device_are_refused():
    hidden, weight, _, targets = make_inputs(4, 6, 3, torch.float32)
    with pytest.raises(ValueError, match="targets is on cpu but hidden is on cuda"):
        fused_linear_log_probs(hidden.cuda(), weight.cuda(), targets)


MEMORY_BOUND_SCRIPT = textwrap.dedent(r"""
    import resource
    import torch
    from prefix_grouper import fused_linear_log_probs
    from prefix_grouper.logprobs import reference_log_probs

    torch.set_num_threads(1)
    rows, vocab, width = 4096, 65536, 16  # full float32 logits: 1 GiB
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(rows, width, generator=gen).requires_grad_()
    weight = torch.randn(vocab, width, generator=gen).requires_grad_()
    targets = torch.randint(vocab, (rows,), generator=gen)
    # Warm-up (lazy library loads, allocator arenas) before the address space is measured.
    fused_linear_log_probs(hidden[:2], weight, targets[:2], return_entropy=True, chunk_size=1)[1].sum().backward()
    hidden.grad = weight.grad = None
    vm_size = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmSize"))
    resource.setrlimit(resource.RLIMIT_AS, (vm_size + (512 << 20), resource.RLIM_INFINITY))
    try:
        torch.log_softmax(hidden.detach() @ weight.detach().t(), dim=-1)
    except (RuntimeError, MemoryError):
        print("full logits refused")
    # 256 rows a chunk: 64 MiB of logits, a few such temporaries at a time.
    log_probs, entropy = fused_linear_log_probs(hidden, weight, targets, return_entropy=True, chunk_size=256)
    (log_probs.sum() + entropy.sum()).backward()
    expected_log_probs, expected_entropy = reference_log_probs(hidden[-3:].detach(), weight.detach(), targets[-3:])
    assert torch.allclose(log_probs[-3:].double(), expected_log_probs, atol=1e-4)
    assert torch.allclose(entropy[-3:].double(), expected_entropy, atol=1e-4)
    assert bool(hidden.grad.isfinite().all()) and bool(weight.grad.isfinite().all())
    print("fused ran")
""")


def test_peak_memory_stays_bounded_under_an_address_space_limit():
    """Limit the process to its warm size + 512 MiB: plain full logits (1 GiB) fail, the
    chunked forward and backward run."""
    env = dict(os.environ, MALLOC_ARENA_MAX="1", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", MEMORY_BOUND_SCRIPT], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "full logits refused" in result.stdout and "fused ran" in result.stdout, result.stdout


COMPILE_KERNELS = r"""
import itertools
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from prefix_grouper.logprobs.triton_impl import log_prob_grad_kernel, log_prob_stats_kernel

# (logits, statistics): half-precision logits are read as they are and computed on in float32.
for kernel in (log_prob_stats_kernel, log_prob_grad_kernel):
    for logits, dtype in (("*fp32", "*fp32"), ("*bf16", "*fp32"), ("*fp16", "*fp32"), ("*fp64", "*fp64")):
        signature = {p.name: (dtype if p.name.endswith("_ptr") else "i64") for p in kernel.params}
        signature.update(logits_ptr=logits, targets_ptr="*i64", vocab_size="i32", scale="fp64", inv_softcap="fp64")
        for has_grad_entropy, has_softcap in itertools.product(
                (True, False) if kernel is log_prob_grad_kernel else (None,), (False, True)):
            constants = dict(BLOCK_V=4096, HAS_SOFTCAP=has_softcap)
            if has_grad_entropy is not None:
                constants.update(HAS_GRAD_ENTROPY=has_grad_entropy)
            signature.update({name: "constexpr" for name in constants})
            source = ASTSource(fn=kernel, signature=signature, constexprs=constants)
            ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32)).asm["ptx"]
            assert "ld.global" in ptx and "st.global" in ptx
            if dtype == "*fp64":
                assert "cvt.f64.f32" not in ptx, "an fp32 value is widened in the float64 kernel"
print("compiled")
"""


def test_triton_kernels_compile_for_sm90():
    """The interpreter accepts code the compiler rejects (e.g. loop-carried type changes)."""
    pytest.importorskip("triton")
    assert_compiles_for_sm90(COMPILE_KERNELS, timeout=300)
