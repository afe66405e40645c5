"""The backend registry (prefix_grouper._dispatch): every op resolves "auto", lists what runs
where and refuses an unusable backend through it, with one error format. Runs on CPU; CUDA
availability is faked by patching the runtime checks the ops' registrations call."""
from __future__ import annotations

import pytest
import torch

import prefix_grouper.advantages.dispatch as advantages_dispatch
import prefix_grouper.attention.api as attention_api
import prefix_grouper.logprobs.api as logprobs_api
from prefix_grouper import _dispatch, advantages, attention, logprobs
from prefix_grouper._dispatch import Backend, BackendUnavailableError

CPU, META, CUDA = torch.device("cpu"), torch.device("meta"), torch.device("cuda")
OPS = ("prefix_attention", "fused_linear_log_probs", "advantages")


@pytest.fixture
def triton_everywhere(monkeypatch):
    """Triton usable on every device (as on a GPU machine), the CUDA extension not built."""
    for module in (attention_api, logprobs_api, advantages_dispatch):
        monkeypatch.setattr(module, "triton_unavailable_reason", lambda device: None)
    monkeypatch.setattr(advantages_dispatch, "cuda_extension_unavailable_reason",
                        lambda device: "the CUDA extension is not built")


def test_every_op_is_registered_with_its_backends():
    assert _dispatch.backend_names("prefix_attention") == ("auto", "reference", "torch", "triton", "flash")
    assert _dispatch.backend_names("fused_linear_log_probs") == ("auto", "torch", "triton")
    assert _dispatch.backend_names("advantages") == ("auto", "torch", "triton", "cuda")
    assert attention.BACKENDS == _dispatch.backend_names("prefix_attention")[1:]
    assert logprobs.BACKENDS == _dispatch.backend_names("fused_linear_log_probs")[1:]


def test_available_on_cpu_under_the_triton_interpreter():
    # tests/conftest.py sets TRITON_INTERPRET=1: Triton runs on CPU tensors, interpreted.
    assert _dispatch.available_backends("prefix_attention", CPU) == ["reference", "torch", "triton"]
    assert _dispatch.available_backends("prefix_attention", CPU, torch.float64) == ["reference", "torch"]
    assert _dispatch.available_backends("prefix_attention", CPU, torch.bfloat16) == ["reference", "torch"]
    assert _dispatch.available_backends("prefix_attention", CPU, torch.float16) == ["reference", "torch", "triton"]
    assert _dispatch.available_backends("fused_linear_log_probs", "cpu") == ["torch", "triton"]
    assert _dispatch.available_backends("advantages", "cpu") == ["torch", "triton"]
    for op in OPS:
        assert _dispatch.available_backends(op, META) == [name for name in _dispatch.backend_names(op)[1:]
                                                          if name not in ("triton", "cuda")]


def test_the_ops_public_wrappers_are_the_registry():
    for device in (CPU, META):
        assert attention.available_backends(device) == _dispatch.available_backends("prefix_attention", device)
        assert logprobs.available_backends(device) == _dispatch.available_backends("fused_linear_log_probs", device)
        assert advantages.available_backends(device) == _dispatch.available_backends("advantages", device)
    assert attention.resolve_backend("reference", CPU, torch.float64) == "reference"
    assert logprobs.resolve_backend("triton", CPU) == "triton"
    assert advantages_dispatch.resolve_backend("triton", CPU) == "triton"


@pytest.mark.parametrize("op", OPS)
def test_auto_is_torch_on_cpu_even_under_the_interpreter(op):
    assert _dispatch.resolve_backend(op, "auto", CPU) == "torch"
    assert _dispatch.resolve_backend(op, "auto", CPU, torch.float32) == "torch"
    assert _dispatch.resolve_backend(op, "auto", META) == "torch"


def test_auto_on_cuda_is_triton_except_for_float64_attention(triton_everywhere):
    for dtype in (torch.float16, torch.bfloat16, torch.float32, None):
        assert _dispatch.resolve_backend("prefix_attention", "auto", CUDA, dtype) == "triton"
    assert _dispatch.resolve_backend("prefix_attention", "auto", CUDA, torch.float64) == "torch"
    assert attention.resolve_backend("auto", "cuda", torch.float64) == "torch"
    assert logprobs.resolve_backend("auto", CUDA) == "triton"
    assert advantages_dispatch.resolve_backend("auto", CUDA) == "triton"  # the extension is not built
    assert advantages_dispatch.resolve_backend("auto", CPU) == "torch"


def test_auto_prefers_the_cuda_extension_for_advantages(triton_everywhere, monkeypatch):
    monkeypatch.setattr(advantages_dispatch, "cuda_extension_unavailable_reason",
                        lambda device: None if device.type == "cuda" else "needs CUDA tensors")
    assert advantages_dispatch.resolve_backend("auto", CUDA) == "cuda"
    assert advantages_dispatch.resolve_backend("auto", CPU) == "torch"


def test_explicit_unavailable_backend_names_the_reason_and_what_is_available():
    with pytest.raises(BackendUnavailableError) as info:
        _dispatch.resolve_backend("advantages", "triton", META)
    message = str(info.value)
    assert message.startswith("advantages: backend='triton' is not available on meta: "
                              "Triton kernels do not support meta tensors. "), message
    assert "Available there: 'torch' ('auto' picks 'torch')" in message
    assert "Also unavailable: 'cuda' (needs CUDA tensors, got tensors on meta)" in message
    # The one error stays catchable as the types the ops raised before the registry.
    assert isinstance(info.value, RuntimeError) and isinstance(info.value, TypeError)
    assert isinstance(info.value, ValueError)


def test_explicit_unavailable_for_a_dtype():
    with pytest.raises(BackendUnavailableError,
                       match=r"^prefix_attention: backend='triton' is not available on cpu for float64: the Triton "
                             r"kernels support float16, bfloat16 and float32, not float64\. Available there: "
                             r"'reference', 'torch' \('auto' picks 'torch'\)\. Also unavailable: 'flash' \(it runs "
                             r"FlashAttention-class CUDA kernels and needs CUDA tensors, got cpu .*\)$"):
        _dispatch.resolve_backend("prefix_attention", "triton", CPU, torch.float64)
    with pytest.raises(BackendUnavailableError, match="for bfloat16: on CPU \\(the Triton interpreter\\)"):
        attention.resolve_backend("triton", CPU, torch.bfloat16)


def test_triton_without_the_interpreter_says_how_to_enable_it(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "triton" not in _dispatch.available_backends("fused_linear_log_probs", CPU)
    with pytest.raises(RuntimeError, match="backend='triton' is not available on cpu: .*set TRITON_INTERPRET=1"):
        logprobs.resolve_backend("triton", CPU)


@pytest.mark.parametrize("op", OPS)
def test_unknown_backend_lists_the_accepted_names(op):
    accepted = ", ".join(map(repr, _dispatch.backend_names(op)))
    with pytest.raises(ValueError, match=f"^backend must be one of {accepted}; got 'jax'$"):
        _dispatch.resolve_backend(op, "jax", CPU)


def test_unknown_op():
    with pytest.raises(ValueError, match="no op 'flash' is registered .*'prefix_attention'"):
        _dispatch.resolve_backend("flash", "auto", CPU)
    with pytest.raises(ValueError, match="no op 'flash' is registered"):
        _dispatch.available_backends("flash", CPU)


@pytest.fixture
def toy_op(monkeypatch):
    """A registered op of three backends: "slow" anywhere, "gpu" on CUDA only, "test" on CPU
    but never picked by "auto"."""
    monkeypatch.setattr(_dispatch, "_OPS", dict(_dispatch._OPS))
    _dispatch.register_op("toy", [
        Backend("slow", "slow impl"),
        Backend("gpu", "gpu impl", unavailable=lambda device, dtype: None if device.type == "cuda" else "no GPU"),
        Backend("test", "test impl", unavailable=lambda device, dtype: None if device.type == "cpu" else "CPU only",
                auto_devices=frozenset({"cuda"})),
    ], auto_order=("gpu", "test", "slow"))
    return "toy"


def test_auto_follows_the_preference_order_and_auto_devices(toy_op):
    assert _dispatch.resolve_backend(toy_op, "auto", CUDA) == "gpu"
    assert _dispatch.resolve_backend(toy_op, "auto", CPU) == "slow"  # "test" runs on CPU, but not for "auto"
    assert _dispatch.resolve_backend(toy_op, "test", CPU) == "test"
    assert _dispatch.available_backends(toy_op, CPU) == ["slow", "test"]
    assert _dispatch.implementation(toy_op, "gpu") == "gpu impl"


def test_auto_with_nothing_available_explains_every_backend(monkeypatch):
    monkeypatch.setattr(_dispatch, "_OPS", dict(_dispatch._OPS))
    _dispatch.register_op("cuda_only", [Backend("gpu", None, unavailable=lambda device, dtype: "no GPU")],
                          auto_order=("gpu",))
    with pytest.raises(BackendUnavailableError, match=r"^cuda_only: no backend can run on cpu\. "
                                                      r"Also unavailable: 'gpu' \(no GPU\)$"):
        _dispatch.resolve_backend("cuda_only", "auto", CPU)


def test_registration_is_checked(monkeypatch):
    monkeypatch.setattr(_dispatch, "_OPS", dict(_dispatch._OPS))
    with pytest.raises(ValueError, match="backend names must be distinct and not 'auto'"):
        _dispatch.register_op("bad", [Backend("torch", 1), Backend("torch", 2)], auto_order=("torch",))
    with pytest.raises(ValueError, match="backend names must be distinct and not 'auto'"):
        _dispatch.register_op("bad", [Backend("auto", 1)], auto_order=("auto",))
    with pytest.raises(ValueError, match=r"auto_order must name registered backends \['torch'\], got \['cuda'\]"):
        _dispatch.register_op("bad", [Backend("torch", 1)], auto_order=("cuda",))
    assert "bad" not in _dispatch._OPS


def test_ops_run_what_the_registry_holds(monkeypatch):
    """prefix_attention and the advantages call the registered implementation of the resolved backend."""
    from prefix_grouper import GroupLayout, prefix_attention

    calls = []
    monkeypatch.setattr(_dispatch, "_OPS", dict(_dispatch._OPS))
    spec = _dispatch._OPS["prefix_attention"]
    torch_impl = spec.backends["torch"].implementation

    def spy(*args, **kwargs):
        calls.append("attention")
        return torch_impl(*args, **kwargs)

    _dispatch.register_op("prefix_attention", [Backend("reference", spec.backends["reference"].implementation),
                                               Backend("torch", spy)], auto_order=("torch",))
    layout = GroupLayout.from_lengths([2], [[1, 3]])
    q = torch.randn(layout.total_tokens, 2, 4)
    prefix_attention(q, q, q, layout)
    assert calls == ["attention"]

    spec = _dispatch._OPS["advantages"]
    torch_impl = spec.backends["torch"].implementation

    def spy_advantages(*args):
        calls.append("advantages")
        return torch_impl(*args)

    _dispatch.register_op("advantages", [Backend("torch", spy_advantages)], auto_order=("torch",))
    advantages.grpo_advantages(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0, 0, 1]))
    assert calls == ["attention", "advantages"]
