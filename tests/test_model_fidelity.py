"""Grouped log-probs and gradients equal each model family's own eager attention; what the
attention cannot honor is refused by name.

For every family whose attention layers carry their own settings (a sliding window on
some or all layers, a logit softcap, attention sinks), a tiny randomly initialized float32
model scores ragged groups through ``completion_log_probs`` (one packed row, prefix
attention) and, as the baseline, through an identical copy of the model with
``attn_implementation="eager"`` on every ``[prompt; completion]`` row run alone: no
padding, no mask, the family's own ``eager_attention_forward``. Prompts (up to 14 tokens)
and completions (up to 10) are longer than the window (8), so a completion's first tokens
see only the end of their prompt, and later ones none of it.

Tolerance: both sides are float32 with the same weights; they differ only in summation
order inside attention (a few ulp per op, ~1e-7 relative) grown through 3-4 layers and a
61-way log-softmax. Measured (reference, torch and Triton-interpreter backends): log-probs
within 3e-6, gradients within 3e-6 of their parameter's largest entry. We allow 1e-5 absolute on log-probs and
1e-5 relative to each parameter's largest gradient entry (after 1e-6 absolute, for
near-zero gradients). Dropping one layer setting (window, softcap or sinks) moves
log-probs by 1.4 to 3.2 (``test_dropping_a_layer_setting_is_caught``): the tests can fail.
"""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from prefix_grouper import GroupLayout  # noqa: E402
from prefix_grouper.attention import available_backends  # noqa: E402
from prefix_grouper.models import attention as attention_module  # noqa: E402
from prefix_grouper.integrations.transformers import (HARMLESS_KWARGS, completion_log_probs, install,  # noqa: E402
                                                      prefix_grouper_attention)
from prefix_grouper.trainers import TrainConfig, build_trainer  # noqa: E402
from prefix_grouper.train import verify_equivalence  # noqa: E402
from prefix_grouper.trainers.model import disable_dropout  # noqa: E402

LOG_PROB_TOL = 1e-5
GRAD_RTOL, GRAD_ATOL = 1e-5, 1e-6
WINDOW = 8
PROMPT_LENS, COMPLETION_LENS = [11, 3, 14], [[5, 9], [4], [1, 10, 6]]
VOCAB = 61
# Weights 10x larger than the families' default init (0.02), so that attention scores are
# O(1): softcaps, windows and sinks then change the log-probs well beyond the tolerance.
SHAPE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, max_position_embeddings=128, initializer_range=0.2,
             tie_word_embeddings=False)

FAMILIES = {
    "mistral": dict(sliding_window=WINDOW),
    # Layers from max_window_layers on slide: layer 0 full, layers 1-2 sliding.
    "qwen2": dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
    "gemma2": dict(sliding_window=WINDOW, attn_logit_softcapping=1.5, query_pre_attn_scalar=8,
                   layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
    "gemma3_text": dict(sliding_window=WINDOW, num_hidden_layers=4, query_pre_attn_scalar=8,
                        layer_types=["sliding_attention"] * 3 + ["full_attention"]),
    "gpt_oss": dict(sliding_window=WINDOW, num_local_experts=2, num_experts_per_tok=1, intermediate_size=32,
                    layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    "llama": {},
    "qwen3": {},
    # Absolute position embeddings: the packed row must feed them the layout's position ids.
    # Its attention dropout (attn_pdrop 0.1) is off in eval mode.
    "gpt2": {},
}
# What each family's layers pass besides the scale: the features under test.
FEATURES = {"mistral": ("window",), "qwen2": ("window",), "gemma2": ("softcap", "window"),
            "gemma3_text": ("window",), "gpt_oss": ("sinks", "window")}


def build(family: str, attn_implementation: str = "eager", **overrides):
    config = transformers.AutoConfig.for_model(family, **{**SHAPE, **FAMILIES[family], **overrides})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    if family == "gpt_oss":
        with torch.no_grad():  # sinks of a trained model are O(1), not the init's 0.2
            for layer in model.model.layers:
                layer.self_attn.sinks.normal_(0.0, 1.0)
    return model.float().eval()


def batch():
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, VOCAB, (p,), generator=g) for p in PROMPT_LENS]
    completions = [torch.randint(0, VOCAB, (s,), generator=g) for group in COMPLETION_LENS for s in group]
    weights = torch.rand(len(completions), max(max(c) for c in COMPLETION_LENS), generator=g)
    return GroupLayout.from_lengths(PROMPT_LENS, COMPLETION_LENS), prompts, completions, weights


def eager_rows(model, layout, prompts, completions):
    """Per-completion log-probs, every row ``[prompt; completion]`` through the model alone."""
    rows = []
    for j, completion in enumerate(completions):
        prompt = prompts[int(layout.completion_group[j])]
        logits = model(input_ids=torch.cat([prompt, completion])[None], use_cache=False).logits[0]
        predicting = logits[len(prompt) - 1:len(prompt) + len(completion) - 1].float()
        rows.append(torch.log_softmax(predicting, -1).gather(-1, completion[:, None])[:, 0])
    return rows


def loss_of_rows(rows, weights):
    return sum((row * weights[j, :len(row)]).sum() for j, row in enumerate(rows))


def grouped_and_eager(family, backend, *, with_grads=True, fused=False, **overrides):
    """(grouped rows, grouped grads, eager rows, eager grads, parameter names) of one batch."""
    eager = build(family, **overrides)
    grouped = copy.deepcopy(eager)
    install(grouped)
    layout, prompts, completions, weights = batch()
    expected = eager_rows(eager, layout, prompts, completions)
    log_probs, mask = completion_log_probs(grouped, layout, prompts, completions, backend=backend, fused=fused)
    rows = [log_probs[j, :len(c)] for j, c in enumerate(completions)]
    assert mask.sum().item() == layout.num_completion_tokens
    if not with_grads:
        return rows, [], expected, [], []
    expected_grads = torch.autograd.grad(loss_of_rows(expected, weights), list(eager.parameters()))
    grads = torch.autograd.grad(loss_of_rows(rows, weights), list(grouped.parameters()))
    return rows, grads, expected, expected_grads, [name for name, _ in eager.named_parameters()]


def max_errors(rows, grads, expected, expected_grads, names):
    log_prob_error = max((a - e).abs().max().item() for a, e in zip(rows, expected))
    grad_error, where = 0.0, None
    for name, a, e in zip(names, grads, expected_grads):
        excess = ((a - e).abs() - GRAD_ATOL).max().item() / max(e.abs().max().item(), 1e-30)
        if excess > grad_error:
            grad_error, where = excess, name
    return log_prob_error, grad_error, where


BACKENDS = [b for b in ("reference", "torch") if b in available_backends("cpu")]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_grouped_log_probs_and_grads_equal_the_familys_eager_attention(family, backend):
    log_prob_error, grad_error, where = max_errors(*grouped_and_eager(family, backend))
    assert log_prob_error <= LOG_PROB_TOL, f"{family}: log-prob error {log_prob_error:.3g}"
    assert grad_error <= GRAD_RTOL, f"{family}: gradient error {grad_error:.3g} (relative) at {where}"


# The two families that between them use every feature (window, softcap, sinks); every
# family takes ~15 s in the Triton interpreter on 2 shared CPU cores.
@pytest.mark.parametrize("family", ["gemma2", "gpt_oss"])
def test_triton_backend_equals_the_familys_eager_attention(family):
    if "triton" not in available_backends("cpu"):
        pytest.skip("Triton is not available")
    log_prob_error, grad_error, where = max_errors(*grouped_and_eager(family, "triton"))
    assert log_prob_error <= LOG_PROB_TOL, f"{family}: log-prob error {log_prob_error:.3g}"
    assert grad_error <= GRAD_RTOL, f"{family}: gradient error {grad_error:.3g} (relative) at {where}"


@pytest.mark.parametrize("family", ["mistral", "gemma3_text", "gpt_oss"])
def test_fused_head_path_honors_the_layer_settings(family):
    """fused=True runs the model's body (get_decoder()) on the packed row: the same attention."""
    log_prob_error, grad_error, where = max_errors(*grouped_and_eager(family, "torch", fused=True))
    assert log_prob_error <= LOG_PROB_TOL, f"{family}: log-prob error {log_prob_error:.3g}"
    assert grad_error <= GRAD_RTOL, f"{family}: gradient error {grad_error:.3g} (relative) at {where}"


@pytest.mark.parametrize("family,feature", [(f, x) for f, features in FEATURES.items() for x in features])
def test_dropping_a_layer_setting_is_caught(family, feature, monkeypatch):
    """Each feature under test changes these log-probs far beyond the tolerance: the
    integration before it passed each layer's settings through fails these tests."""
    attention = attention_module.prefix_attention
    monkeypatch.setattr(attention_module, "prefix_attention",
                        lambda *args, **kwargs: attention(*args, **{**kwargs, feature: None}))
    log_prob_error, _, _ = max_errors(*grouped_and_eager(family, "reference", with_grads=False))
    assert log_prob_error > 100 * LOG_PROB_TOL, f"{family} without its {feature}: {log_prob_error:.3g}"


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text", "gpt_oss"])
def test_a_model_whose_layers_are_all_full_ignores_its_unused_sliding_mask(family):
    """These families build a sliding-window mask whatever their layer types; with every
    layer on full attention no layer receives it, and nothing slides."""
    layers = SHAPE["num_hidden_layers"] if family != "gemma3_text" else 4
    log_prob_error, grad_error, where = max_errors(
        *grouped_and_eager(family, "reference", layer_types=["full_attention"] * layers))
    assert log_prob_error <= LOG_PROB_TOL and grad_error <= GRAD_RTOL, (log_prob_error, grad_error, where)


def test_sliding_layers_are_read_per_call():
    """Gemma 2 alternates sliding and full layers: each layer's own window reaches the attention."""
    model = build("gemma2")
    install(model)
    seen = []
    original = attention_module.prefix_attention

    def recording(*args, **kwargs):
        seen.append((kwargs["window"], kwargs["softcap"]))
        return original(*args, **kwargs)

    layout, prompts, completions, _ = batch()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(attention_module, "prefix_attention", recording)
        completion_log_probs(model, layout, prompts, completions, backend="reference")
    assert seen == [(WINDOW, 1.5), (None, 1.5), (WINDOW, 1.5)]


def test_a_window_wider_than_every_row_equals_full_attention():
    """sliding_window >= the longest row masks nothing: Mistral then equals Llama's numbers."""
    rows, grads, expected, expected_grads, names = grouped_and_eager("mistral", "reference", sliding_window=64)
    log_prob_error, grad_error, _ = max_errors(rows, grads, expected, expected_grads, names)
    assert log_prob_error <= LOG_PROB_TOL and grad_error <= GRAD_RTOL
    unwindowed = eager_rows(build("mistral", sliding_window=None), *batch()[:3])
    assert max((a - e).abs().max().item() for a, e in zip(rows, unwindowed)) <= LOG_PROB_TOL


def test_gpt2_trains_with_the_grouped_forward(capsys):
    """``--model gpt2`` (a tiny GPT-2 from its config, attention dropout 0.1 by default):
    the trainer turns dropout off, grouped and unpacked updates agree, and steps run."""
    config = TrainConfig(group_size=4, prompts_per_step=2, beta=0.04, num_iterations=2)
    trainer = build_trainer("grpo", model="gpt2", config=config)
    model = trainer.policy.model
    assert model.config.model_type == "gpt2" and model.config.attn_pdrop == 0.0
    assert not [m for m in model.modules() if isinstance(m, torch.nn.Dropout) and m.p != 0]
    assert verify_equivalence(trainer), capsys.readouterr().out
    for _ in range(2):
        metrics = trainer.step()
        assert all(torch.isfinite(torch.tensor(metrics[k])) for k in ("loss", "reward_mean", "kl"))


# ---------------------------------------------------------------- what the attention refuses
def packed_call(model, **kwargs):
    """The model on one packed row, as completion_logits calls it, with extra model-call ``kwargs``."""
    install(model)
    layout, prompts, completions, _ = batch()
    packed = layout.pack(prompts, completions)
    record = attention_module.PackedCall()
    token = attention_module.PACKED_CALL.set(record)
    try:
        output = model(input_ids=packed[None], position_ids=layout.position_ids[None], use_cache=False,
                       prefix_layout=layout, prefix_backend="reference", **kwargs)
    finally:
        attention_module.PACKED_CALL.reset(token)
    record.check(model)
    return output


def attention_inputs(heads=4, kv_heads=2, head_dim=8):
    """``(layout, query [1, H, T, D], key, value)``: transformers' head-first layout."""
    layout = GroupLayout.from_lengths([3], [[2, 1]])
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, layout.total_tokens, head_dim, generator=g) for h in (heads, kv_heads, kv_heads))
    return layout, q, k, v


def test_an_attention_keyword_that_is_not_implemented_is_named():
    """A model feature the attention does not implement must not be dropped silently."""
    with pytest.raises(TypeError, match=r"Qwen2Attention passed the attention keyword\(s\) some_new_feature"):
        packed_call(build("qwen2"), some_new_feature=4)
    layout, q, k, v = attention_inputs()
    # Another packing's boundaries cannot be honored next to the layout's.
    with pytest.raises(TypeError, match="cu_seq_lens_q, max_length_q"):
        prefix_grouper_attention(torch.nn.Module(), q, k, v, None, prefix_layout=layout,
                                 cu_seq_lens_q=torch.tensor([0, 5]), max_length_q=5)


def test_the_harmless_keywords_are_what_the_families_pass():
    assert HARMLESS_KWARGS == {"position_ids", "use_cache", "output_router_logits", "prefix_layout",
                               "prefix_backend"}


@pytest.mark.parametrize("kwargs, module_is_causal", [({}, False), ({"is_causal": False}, True)])
def test_non_causal_attention_is_refused(kwargs, module_is_causal):
    layout, q, k, v = attention_inputs()
    module = torch.nn.Module()
    module.is_causal = module_is_causal
    with pytest.raises(ValueError, match=r"Module runs non-causal attention \(is_causal=False"):
        prefix_grouper_attention(module, q, k, v, None, prefix_layout=layout, **kwargs)


@pytest.mark.parametrize("sliding_window", [0, -3, 2.5, True])
def test_a_sliding_window_that_is_not_a_positive_int_is_named(sliding_window):
    layout, q, k, v = attention_inputs()
    with pytest.raises(ValueError, match=rf"Module passed sliding_window={sliding_window!r}.*an int >= 1"):
        prefix_grouper_attention(torch.nn.Module(), q, k, v, None, prefix_layout=layout,
                                 sliding_window=sliding_window)


def test_token_first_inputs_are_refused_naming_both_layouts():
    layout, q, k, v = attention_inputs()
    with pytest.raises(ValueError, match=r"head-first layout.*query \[1, heads, T, head_dim\].*T = layout.total_tokens "
                                         r"= 6; got key \(1, 6, 2, 8\): it looks token-first"):
        prefix_grouper_attention(torch.nn.Module(), q, k.transpose(1, 2), v, None, prefix_layout=layout)
    with pytest.raises(ValueError, match=r"T = layout.total_tokens = 6; got query \(1, 4, 5, 8\): \(query"):
        prefix_grouper_attention(torch.nn.Module(), q[:, :, :5], k, v, None, prefix_layout=layout)


def test_a_sliding_mask_that_no_layer_receives_is_refused():
    """A model that builds a sliding-window mask but does not pass its layers sliding_window
    (which the packed path reads) would get full attention there: refused."""
    model = build("qwen2", sliding_window=4)
    for layer in model.model.layers:
        layer.self_attn.sliding_window = None
    with pytest.raises(ValueError, match=r"Qwen2Attention was given a local attention mask of size 4 \(a sliding "
                                         r"window or chunked attention\) but passed sliding_window=None"):
        packed_call(model)


def test_a_mask_with_extra_rules_is_refused():
    """Masks that add a model's own rules (Gemma 3's bidirectional image tokens) are not
    what the layout expresses."""
    from transformers.masking_utils import create_causal_mask

    model = build("llama")
    install(model)
    token = attention_module.PACKED_CALL.set(attention_module.PackedCall())
    try:
        with pytest.raises(ValueError, match="or_mask_function / and_mask_function"):
            # The cache argument, 4th, is past_key_values in transformers 5.10 and cache in 5.24.
            create_causal_mask(model.config, torch.zeros(1, 5, 32), None, None, position_ids=torch.arange(5)[None],
                               or_mask_function=lambda b, h, q, k: q < 0)
    finally:
        attention_module.PACKED_CALL.reset(token)


@pytest.mark.parametrize("model_type, field", [("qwen2", "attention_dropout"), ("gpt2", "attn_pdrop")])
def test_attention_dropout_in_training_names_the_config_field(model_type, field):
    config = transformers.AutoConfig.for_model(model_type, **{**SHAPE, field: 0.1})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    layout, prompts, completions, _ = batch()
    model.train()
    with pytest.raises(ValueError, match=rf"does not implement attention dropout .*dropout=0.1 in training mode\): "
                                         rf"set config.{field} = 0"):
        completion_log_probs(model, layout, prompts, completions, backend="reference")
    model.eval()  # no dropout at evaluation: runs
    expected, _ = completion_log_probs(model, layout, prompts, completions, backend="reference")
    model.train()
    changed = disable_dropout(model)
    assert f"{type(config).__name__}.{field}" in changed and getattr(model.config, field) == 0.0
    assert not [m for m in model.modules() if isinstance(m, torch.nn.Dropout) and m.p != 0]
    log_probs, _ = completion_log_probs(model, layout, prompts, completions, backend="reference")
    torch.testing.assert_close(log_probs, expected, rtol=0, atol=0)
