"""``PrefixGrouper``: the paper package's API (PyPI prefix-grouper 0.0.1.post1) on prefix_attention.

Ours is checked against per-sequence attention and a per-sequence model forward (float64,
no wheel needed), and differentially against the paper's package: its wheel is installed
into a temporary directory and run in a subprocess (it has our import name), on the same
inputs. Those tests skip when the wheel cannot be installed (no network, no local wheel in
PREFIX_GROUPER_PAPER_WHEEL).

Tolerances: float64 attention, 1e-10 (a wrong mask moves outputs by > 1e-2). Model-level
comparisons allow 1e-5: Qwen2's RMSNorm rounds to float32 internally, so a last-bit
difference in attention can become a 1-ulp float32 difference after a norm.
"""
import math
import os
import subprocess
import sys

import pytest
import torch

import prefix_grouper
from prefix_grouper import PrefixGrouper
from prefix_grouper.forward import AttentionForward
from prefix_grouper.utils import batch_repeat_cat

ATOL = 1e-10
MODEL_TOL = 1e-5
GROUPS = [[7, 3, 5], [1, 4], [12, 1, 0, 2]]  # ragged, G = 1, an empty completion, a 1-token prefix


def masks_for(groups, generator):
    """Paper-style inputs: left-padded prompts [B, Lp], right-padded completions [N, Ls]."""
    lp, ls = max(g[0] for g in groups) + 1, max(max(g[1:]) for g in groups) + 2
    prefix_mask = torch.stack([torch.arange(lp) >= lp - g[0] for g in groups])
    suffix_mask = torch.stack([torch.arange(ls) < s for g in groups for s in g[1:]])
    prefix = torch.randint(1, 90, prefix_mask.shape, generator=generator) * prefix_mask
    suffix = torch.randint(1, 90, suffix_mask.shape, generator=generator) * suffix_mask
    return prefix, prefix_mask, suffix, suffix_mask


def sequence_attention(q, k, v, scale, window=None, softcap=None, sinks=None):
    """Causal attention of one sequence: q [Hq, n, D], k/v [Hkv, n, D] -> [n, Hq, D]."""
    rep = q.shape[0] // k.shape[0]
    k, v = k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0)
    s = scale * q @ k.transpose(1, 2)
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    i = torch.arange(q.shape[1])
    visible = i[None, :] <= i[:, None]
    if window is not None:
        visible &= i[None, :] > i[:, None] - window
    s = s.masked_fill(~visible, -math.inf)
    if sinks is not None:
        s = torch.cat([s, sinks[:, None, None].expand(-1, s.shape[1], 1).to(s.dtype)], -1)
    p = torch.softmax(s, -1)[..., :k.shape[1]]
    return (p @ v).transpose(0, 1)


def per_sequence_rows(pg, q, k, v, **options):
    """The grouped rows' expected output [B, L, Hq, D]: every [prefix; suffix_i] run alone."""
    out = q.new_zeros(q.shape[0], q.shape[2], q.shape[1], q.shape[3])
    for b, info in enumerate(pg.group_info):
        cols = pg.padding_mask[b].nonzero().flatten()
        p = info.prefix_len
        prefix_cols = cols[:p]
        out[b, prefix_cols] = sequence_attention(q[b][:, prefix_cols], k[b][:, prefix_cols], v[b][:, prefix_cols],
                                                 **options)
        start = p
        for s in info.suffix_lens:
            seq = torch.cat([prefix_cols, cols[start:start + s]])
            out[b, cols[start:start + s]] = sequence_attention(q[b][:, seq], k[b][:, seq], v[b][:, seq],
                                                               **options)[p:]
            start += s
    return out


@pytest.mark.parametrize("padding_mode", ["right", "left", "custom"])
@pytest.mark.parametrize("heads", [(4, 2), (3, 3), (2, 1)])
def test_forward_equals_per_sequence_attention(padding_mode, heads):
    g = torch.Generator().manual_seed(0)
    if padding_mode == "custom":  # valid tokens scattered along the row, still in order
        width = max(sum(x) for x in GROUPS) + 3
        mask = torch.zeros(len(GROUPS), width, dtype=torch.bool)
        for b, x in enumerate(GROUPS):
            mask[b, torch.randperm(width, generator=g)[:sum(x)].sort().values] = True
        padding_mode = mask
    pg = PrefixGrouper(GROUPS, padding_mode=padding_mode)
    B, L = pg.x_shape
    q = torch.randn(B, heads[0], L, 8, dtype=torch.float64, generator=g, requires_grad=True)
    k, v = (torch.randn(B, heads[1], L, 8, dtype=torch.float64, generator=g, requires_grad=True) for _ in "kv")
    out = pg.forward(None, q, k, v, scaling=0.37)
    expected = per_sequence_rows(pg, q, k, v, scale=0.37)
    assert out.shape == (B, L, heads[0], 8)
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=0)
    w = torch.randn(out.shape, dtype=out.dtype, generator=g)
    grads = torch.autograd.grad((out * w).sum(), (q, k, v))
    expected_grads = torch.autograd.grad((expected * w).sum(), (q, k, v))
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    assert pg.layout() is pg.layout()  # built once per instance and device

    def never_called(*args, **kwargs):
        raise AssertionError("attn_func must not be called")

    assert torch.equal(AttentionForward(never_called)(pg, q, k, v, scaling=0.37), out)


def test_forward_passes_window_softcap_sinks():
    g = torch.Generator().manual_seed(1)
    pg = PrefixGrouper(GROUPS)
    B, L = pg.x_shape
    q = torch.randn(B, 4, L, 8, dtype=torch.float64, generator=g, requires_grad=True)
    k, v = (torch.randn(B, 2, L, 8, dtype=torch.float64, generator=g, requires_grad=True) for _ in "kv")
    sinks = torch.randn(4, dtype=torch.float64, generator=g, requires_grad=True)
    # transformers' names: sliding_window (Mistral, Qwen2, Gemma), softcap (Gemma 2), s_aux (gpt-oss)
    out = pg.forward(None, q, k, v, scaling=0.5, sliding_window=4, softcap=3.0, s_aux=sinks, dropout=0.0)
    expected = per_sequence_rows(pg, q, k, v, scale=0.5, window=4, softcap=3.0, sinks=sinks)
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=0)
    w = torch.randn(out.shape, dtype=out.dtype, generator=g)
    for got, want in zip(torch.autograd.grad((out * w).sum(), (q, k, v, sinks)),
                         torch.autograd.grad((expected * w).sum(), (q, k, v, sinks))):
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    plain = pg.forward(None, q, k, v, scaling=0.5)
    assert (plain - out).abs().max() > 1e-2  # the options changed the result


def test_forward_refuses_what_it_cannot_honor():
    pg = PrefixGrouper(GROUPS)
    B, L = pg.x_shape
    q = torch.randn(B, 2, L, 8)
    with pytest.raises(ValueError, match="dropout"):
        pg.forward(None, q, q, q, dropout=0.1)
    with pytest.raises(TypeError, match="token_type_ids"):
        pg.forward(None, q, q, q, token_type_ids=torch.zeros(1))
    with pytest.raises(TypeError, match="positional argument 0"):
        pg.forward(None, q, q, q, 0.5)
    with pytest.raises(ValueError, match="is_causal"):
        pg.forward(None, q, q, q, is_causal=False)
    with pytest.raises(ValueError, match=r"q must have shape \[3, heads, "):
        pg.forward(None, q[:, :, 1:], q, q)
    with pytest.raises(ValueError, match="prefix_len 0"):
        PrefixGrouper([[0, 2]]).forward(None, *(torch.randn(1, 1, 2, 4),) * 3)
    # The paper's transformers adapter passes the attention layer positionally: accepted.
    assert pg.forward(None, q, q, q, torch.nn.Linear(1, 1), position_ids=None).shape == (B, L, 2, 8)


def test_concat_split_convert_roundtrip():
    g = torch.Generator().manual_seed(2)
    prefix, prefix_mask, suffix, suffix_mask = masks_for(GROUPS, g)
    pg = PrefixGrouper.from_ungrouped_masks(prefix_mask, suffix_mask, [len(x) - 1 for x in GROUPS])
    assert [list(i) for i in pg.group_info] == GROUPS
    assert [(i.prefix_len, i.suffix_lens) for i in pg.group_info] == [(x[0], x[1:]) for x in GROUPS]
    ids = pg.concat_input(prefix, prefix_mask, suffix, suffix_mask)
    for b, x in enumerate(GROUPS):  # compact right padding: prefix, then its suffixes, then zeros
        expected = torch.cat([prefix[b][prefix_mask[b]]] + [suffix[j][suffix_mask[j]] for j in
                             range(sum(len(y) - 1 for y in GROUPS[:b]), sum(len(y) - 1 for y in GROUPS[:b + 1]))])
        assert torch.equal(ids[b, :len(expected)], expected) and not ids[b, len(expected):].any()
    features = torch.randn(*ids.shape, 3, dtype=torch.float64, generator=g, requires_grad=True)
    pg = PrefixGrouper(GROUPS)  # float outputs are split after a model ran forward(): a fresh instance here
    p_out, p_mask, s_out, s_mask = pg.split_output(features)
    assert torch.equal(pg.split_output(ids)[0], prefix[:, -p_out.shape[1]:] * p_mask)
    assert torch.equal(p_mask, prefix_mask[:, -p_mask.shape[1]:])
    assert torch.equal(pg.split_output(ids)[2], suffix[:, :s_out.shape[1]])
    _, _, s1, m1 = pg.split_output(features, include_prefix_last=1)
    back = pg.concat_input(p_out, p_mask, s_out, s_mask)
    torch.testing.assert_close(back, features * pg.padding_mask[..., None])
    assert s1.shape[1] == s_out.shape[1] + 1 and torch.equal(m1[:, 1:], s_mask) and m1[:, 0].all()
    first = batch_repeat_cat(p_out[:, -1:], s_out, 1, pg.num_samples)[:, 0]
    assert torch.equal(s1[:, 0], first)
    (grad,) = torch.autograd.grad(s1.sum(), features)
    assert grad[pg.padding_mask].abs().sum() > 0 and grad[~pg.padding_mask].abs().sum() == 0
    left = PrefixGrouper.convert_padding(suffix, suffix_mask, padding_mode="left")
    assert torch.equal(PrefixGrouper.convert_padding(left, left != 0, "right"), suffix[:, :left.shape[1]])


def test_bad_inputs_are_refused():
    g = torch.Generator().manual_seed(3)
    prefix, prefix_mask, suffix, suffix_mask = masks_for(GROUPS, g)
    pg = PrefixGrouper(GROUPS)
    with pytest.raises(ValueError, match="prefix_mask holds"):
        pg.concat_input(prefix, prefix_mask.roll(1, 0), suffix, suffix_mask)
    with pytest.raises(ValueError, match="group_sizes sums to"):
        PrefixGrouper.from_ungrouped_masks(prefix_mask, suffix_mask, 3)
    with pytest.raises(ValueError, match="padding_mode"):
        PrefixGrouper(GROUPS, padding_mode="middle")
    with pytest.raises(ValueError, match="include_prefix_last"):
        pg.split_output(torch.zeros(pg.x_shape), include_prefix_last=-1)
    with pytest.raises(RuntimeError, match="no groups yet"):
        PrefixGrouper().concat_input(prefix, prefix_mask, suffix, suffix_mask)
    # Rows concatenated, then split with no attention call in between: the model ignored prefix_grouper=.
    ids = pg.concat_input(prefix, prefix_mask, suffix, suffix_mask)
    pg.split_output(ids)  # ids, not logits: nothing to check
    with pytest.raises(RuntimeError, match="no attention layer ran PrefixGrouper.forward"):
        pg.split_output(torch.randn(*ids.shape, 5))


def test_warns_when_the_paper_distribution_is_installed(monkeypatch):
    class Paper:
        version = "0.0.1.post1"

    monkeypatch.setattr(prefix_grouper._metadata, "distribution",
                        lambda name: Paper() if name == "prefix-grouper" else None)
    with pytest.warns(UserWarning, match="pip uninstall -y prefix-grouper"):
        prefix_grouper._warn_if_paper_package_installed()


# ---------------------------------------------------------------------- the README flow on a model
transformers = pytest.importorskip("transformers")
TINY_CONFIG = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=128)


def tiny_qwen2():
    torch.manual_seed(0)
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**TINY_CONFIG)).double()


def grouped_position_ids(pg):
    """Each suffix restarts at its prefix length, as the paper's README asks."""
    pos = torch.zeros(pg.x_shape, dtype=torch.long)
    for b, info in enumerate(pg.group_info):
        row = list(range(info.prefix_len)) + [info.prefix_len + t for s in info.suffix_lens for t in range(s)]
        pos[b, pg.padding_mask[b].nonzero().flatten()] = torch.tensor(row, dtype=torch.long)
    return pos


def readme_flow(model, prefix, prefix_mask, suffix, suffix_mask, group_sizes, **model_kwargs):
    """The paper README's training step: per-token log-probs [N, Ls] and their mask."""
    pg = PrefixGrouper.from_ungrouped_masks(prefix_mask=prefix_mask, suffix_mask=suffix_mask,
                                            group_sizes=group_sizes, padding_mode="right")
    input_ids = pg.concat_input(prefix, prefix_mask, suffix, suffix_mask)
    logits = model(input_ids=input_ids, attention_mask=pg.padding_mask, position_ids=grouped_position_ids(pg),
                   prefix_grouper=pg, use_cache=False, **model_kwargs).logits
    _, _, suffix_out, suffix_out_mask = pg.split_output(logits, include_prefix_last=1)
    targets = pg.convert_padding(suffix, suffix_mask, padding_mode="right")
    suffix_out, suffix_out_mask = suffix_out[:, :-1], suffix_out_mask[:, 1:]
    log_probs = suffix_out.log_softmax(-1).gather(-1, targets[..., None])[..., 0]
    return log_probs * suffix_out_mask, suffix_out_mask


def per_sequence_log_probs(model, prefix, prefix_mask, suffix, suffix_mask, group_sizes):
    rows = torch.repeat_interleave(torch.arange(len(group_sizes)), torch.tensor(group_sizes))
    out = torch.zeros(suffix.shape, dtype=torch.float64)
    for j, b in enumerate(rows.tolist()):
        seq = torch.cat([prefix[b][prefix_mask[b]], suffix[j][suffix_mask[j]]])
        n, p = int(suffix_mask[j].sum()), int(prefix_mask[b].sum())
        logits = model(input_ids=seq[None], use_cache=False).logits[0]
        out[j, :n] = logits[p - 1:p - 1 + n].log_softmax(-1).gather(-1, seq[p:, None])[:, 0]
    return out


@pytest.mark.parametrize("implementation", ["sdpa", "eager", "prefix_grouper_attention"])
def test_readme_training_step_equals_per_sequence_model(implementation, monkeypatch):
    from prefix_grouper.utils.register_transformers import register_attention

    register_attention()
    g = torch.Generator().manual_seed(4)
    prefix, prefix_mask, suffix, suffix_mask = masks_for(GROUPS, g)
    sizes = [len(x) - 1 for x in GROUPS]
    model, baseline = tiny_qwen2(), tiny_qwen2()
    if implementation == "prefix_grouper_attention":
        model.set_attn_implementation(implementation)
        kwargs = {"prefix_grouper_attn_func": "sdpa"}
    else:  # the paper's attention protocol reached through a wrapper, as verl patches it
        model.set_attn_implementation(implementation)
        kwargs = {}
        wrap_attention_like_verl(implementation, monkeypatch)
    log_probs, mask = readme_flow(model, prefix, prefix_mask, suffix, suffix_mask, sizes, **kwargs)
    expected = per_sequence_log_probs(baseline, prefix, prefix_mask, suffix, suffix_mask, sizes)
    assert torch.equal(mask, suffix_mask[:, :mask.shape[1]])
    torch.testing.assert_close(log_probs, expected[:, :mask.shape[1]], atol=MODEL_TOL, rtol=MODEL_TOL)
    w = torch.randn(log_probs.shape, dtype=torch.float64, generator=g)
    grads = torch.autograd.grad((log_probs * w).sum(), list(model.parameters()))
    want = torch.autograd.grad((expected[:, :mask.shape[1]] * w).sum(), list(baseline.parameters()))
    for got, ref in zip(grads, want):
        torch.testing.assert_close(got, ref, atol=MODEL_TOL, rtol=MODEL_TOL)


def wrap_attention_like_verl(name, monkeypatch):
    """What verl's apply_prefix_grouper_patch does (without verl): calls with prefix_grouper=
    go to prefix_grouper.forward. "eager" is wrapped only once PrefixGrouper registered it."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from prefix_grouper.utils.register_transformers import route_eager_attention

    route_eager_attention()
    original = ALL_ATTENTION_FUNCTIONS[name]

    def wrapped(module, query, key, value, attention_mask, *args, **kwargs):
        pg = kwargs.pop("prefix_grouper", None)
        if pg is None:
            return original(module, query, key, value, attention_mask, *args, **kwargs)

        def attn_func(q, k, v, mask, *inner_args, **inner_kwargs):
            return original(module, q, k, v, mask, *inner_args, **inner_kwargs)[0]

        return pg.forward(attn_func, query, key, value, *args, **kwargs), None

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS, name, wrapped)


# ---------------------------------------------------------------------- differential: the paper's package
PAPER_REQUIREMENT = "prefix-grouper==0.0.1.post1"
PROPERTIES = ["prefix_lens", "grouped_suffix_lens", "ungrouped_suffix_lens", "num_samples", "total_lens",
              "padding_mask", "grouped_prefix_mask", "grouped_suffix_mask", "ungrouped_prefix_mask",
              "ungrouped_suffix_mask", "prefix_attn_mask", "suffix_attn_mask", "grouped_prefix_indices",
              "grouped_suffix_indices", "ungrouped_prefix_indices", "ungrouped_suffix_indices", "x_shape",
              "prefix_x_shape", "suffix_x_shape"]

PAPER_SCRIPT = r'''
import math, sys
import torch
target, in_path, out_path = sys.argv[1:4]
import prefix_grouper
assert prefix_grouper.__file__.startswith(target), prefix_grouper.__file__  # the paper's package, not ours
from prefix_grouper import PrefixGrouper
from prefix_grouper.utils.register_transformers import register_attention

def eager(q, k, v, mask, *args, scaling=None, **kwargs):
    """A correct attention for the paper's protocol: mask [b, kv] marks valid keys; the
    queries are the last q_len key positions (bottom-right causal)."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    s = scale * q @ k.transpose(-1, -2)
    q_len, kv_len = q.shape[2], k.shape[2]
    causal = torch.arange(kv_len)[None] <= torch.arange(q_len)[:, None] + (kv_len - q_len)
    visible = causal[None, None] & mask.bool()[:, None, None, :]
    s = s.masked_fill(~visible, torch.finfo(s.dtype).min)
    return (torch.softmax(s, -1) @ v).transpose(1, 2)

data = torch.load(in_path)
PROPERTIES = data.get("properties", [])
out = {}
for name, case in data["cases"].items():
    pg = PrefixGrouper.from_ungrouped_masks(case["prefix_mask"], case["suffix_mask"], case["sizes"],
                                            padding_mode=case["padding_mode"])
    r = out[name] = {"group_info": [list(i) for i in pg.group_info], "padding_mask": pg.padding_mask}
    r["ids"] = pg.concat_input(case["prefix"], case["prefix_mask"], case["suffix"], case["suffix_mask"])
    feats = case["features"].clone().requires_grad_(True)
    r["split0"] = pg.split_output(feats)
    r["split1"] = pg.split_output(feats, include_prefix_last=1)
    r["split_grad"] = torch.autograd.grad(r["split1"][2].mul(case["split_weight"]).sum(), feats)[0]
    r["split0"] = tuple(x.detach() for x in r["split0"])
    r["split1"] = tuple(x.detach() for x in r["split1"])
    r["convert"] = {m: PrefixGrouper.convert_padding(case["suffix"], case["suffix_mask"], padding_mode=m)
                    for m in ("left", "right")}
    r["properties"] = {name: getattr(pg, name) for name in PROPERTIES}
    r["ungroup"] = pg.ungroup(case["q"], case["k"], case["v"])
    r["group"] = pg.group(r["ungroup"][0].transpose(1, 2), r["ungroup"][3].transpose(1, 2))
    q, k, v = (case[x].clone().requires_grad_(True) for x in "qkv")
    o = pg.forward(eager, q, k, v, scaling=case["scale"])
    r["forward"] = o.detach()
    r["forward_grads"] = torch.autograd.grad((o * case["out_weight"]).sum(), (q, k, v))

if "model" in data:
    import transformers
    from transformers import AttentionInterface
    m = data["model"]
    AttentionInterface.register("paper_test_eager", lambda module, q, k, v, mask, *a, **kw: (eager(q, k, v, mask, **kw), None))
    register_attention()
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**m["config"])).double()
    model.load_state_dict(m["state_dict"])
    model.set_attn_implementation("prefix_grouper_attention")
    pg = PrefixGrouper.from_ungrouped_masks(prefix_mask=m["prefix_mask"], suffix_mask=m["suffix_mask"],
                                            group_sizes=m["sizes"], padding_mode="right")
    input_ids = pg.concat_input(m["prefix"], m["prefix_mask"], m["suffix"], m["suffix_mask"])
    logits = model(input_ids=input_ids, attention_mask=pg.padding_mask, position_ids=m["position_ids"],
                   prefix_grouper=pg, prefix_grouper_attn_func="paper_test_eager", use_cache=False).logits
    _, _, suffix_out, suffix_mask = pg.split_output(logits, include_prefix_last=1)
    targets = pg.convert_padding(m["suffix"], m["suffix_mask"], padding_mode="right")
    suffix_out, suffix_mask = suffix_out[:, :-1], suffix_mask[:, 1:]
    log_probs = suffix_out.log_softmax(-1).gather(-1, targets[..., None])[..., 0] * suffix_mask
    grads = torch.autograd.grad((log_probs * m["weight"]).sum(), list(model.parameters()))
    out["model"] = {"log_probs": log_probs.detach(), "mask": suffix_mask, "grads": grads}
torch.save(out, out_path)
'''


@pytest.fixture(scope="module")
def paper_package(tmp_path_factory):
    """Directory holding the paper's package, installed with pip --target (skips without it)."""
    target = tmp_path_factory.mktemp("paper_package")
    source = os.environ.get("PREFIX_GROUPER_PAPER_WHEEL", PAPER_REQUIREMENT)
    try:
        done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                               source], capture_output=True, text=True, timeout=180)
    except subprocess.TimeoutExpired:
        pytest.skip(f"pip install {source} timed out")
    if done.returncode != 0 or not (target / "prefix_grouper" / "__init__.py").exists():
        pytest.skip(f"cannot install the paper's package ({source}): {done.stderr.strip()[-300:]}")
    return target


def run_paper(target, tmp_path, data):
    in_path, out_path, script = tmp_path / "in.pt", tmp_path / "out.pt", tmp_path / "paper.py"
    torch.save(data, in_path)
    script.write_text(PAPER_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(target)}
    done = subprocess.run([sys.executable, str(script), str(target), str(in_path), str(out_path)],
                          capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out_path)


def paper_case(groups, padding_mode, seed):
    g = torch.Generator().manual_seed(seed)
    prefix, prefix_mask, suffix, suffix_mask = masks_for(groups, g)
    pg = PrefixGrouper(groups, padding_mode=padding_mode)
    B, L = pg.x_shape
    n, ls = suffix.shape
    qkv = {"q": torch.randn(B, 4, L, 8, dtype=torch.float64, generator=g)}
    qkv.update({x: torch.randn(B, 2, L, 8, dtype=torch.float64, generator=g) for x in "kv"})
    lp = max(x[0] for x in groups)
    return dict(prefix=prefix, prefix_mask=prefix_mask, suffix=suffix, suffix_mask=suffix_mask,
                sizes=[len(x) - 1 for x in groups], padding_mode=padding_mode, scale=0.41,
                features=torch.randn(B, L, 3, dtype=torch.float64, generator=g),
                split_weight=torch.randn(n, max(max(x[1:]) for x in groups) + 1, 3, dtype=torch.float64,
                                         generator=g),
                out_weight=torch.randn(B, L, 4, 8, dtype=torch.float64, generator=g), lp=lp, **qkv)


def test_paper_package_gives_our_outputs(paper_package, tmp_path):
    cases = {"right": paper_case(GROUPS, "right", 5), "left": paper_case(GROUPS, "left", 6),
             "one_group": paper_case([[5, 2]], "right", 7)}
    theirs = run_paper(paper_package, tmp_path, {"cases": cases, "properties": PROPERTIES})
    for name, case in cases.items():
        r = theirs[name]
        pg = PrefixGrouper.from_ungrouped_masks(case["prefix_mask"], case["suffix_mask"], case["sizes"],
                                                padding_mode=case["padding_mode"])
        assert [list(i) for i in pg.group_info] == r["group_info"]
        assert torch.equal(pg.padding_mask, r["padding_mask"])
        assert torch.equal(pg.concat_input(case["prefix"], case["prefix_mask"], case["suffix"], case["suffix_mask"]),
                           r["ids"])
        pg = PrefixGrouper(r["group_info"], padding_mode=case["padding_mode"])  # split float rows: no model ran
        feats = case["features"].clone().requires_grad_(True)
        for ours, want in ((pg.split_output(feats), r["split0"]),
                           (pg.split_output(feats, include_prefix_last=1), r["split1"])):
            assert len(ours) == 4
            for a, b in zip(ours, want):
                assert a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.detach(), b)
        s1 = pg.split_output(feats, include_prefix_last=1)[2]
        assert torch.equal(torch.autograd.grad(s1.mul(case["split_weight"]).sum(), feats)[0], r["split_grad"])
        for mode in ("left", "right"):
            assert torch.equal(PrefixGrouper.convert_padding(case["suffix"], case["suffix_mask"], mode),
                               r["convert"][mode])
        for name in PROPERTIES:  # the mask, index and length attributes verl and ROLL read
            ours, want = getattr(pg, name), r["properties"][name]
            assert (torch.equal(ours, want) if isinstance(want, torch.Tensor) else tuple(ours) == tuple(want)), name
        ungrouped = pg.ungroup(case["q"], case["k"], case["v"])
        assert all(torch.equal(a, b) for a, b in zip(ungrouped, r["ungroup"])) and len(ungrouped) == 6
        assert torch.equal(pg.group(ungrouped[0].transpose(1, 2), ungrouped[3].transpose(1, 2)), r["group"])
        q, k, v = (case[x].clone().requires_grad_(True) for x in "qkv")
        o = pg.forward(None, q, k, v, scaling=case["scale"])
        torch.testing.assert_close(o, r["forward"], atol=ATOL, rtol=0)
        for got, want in zip(torch.autograd.grad((o * case["out_weight"]).sum(), (q, k, v)), r["forward_grads"]):
            torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_paper_readme_flow_matches_ours_and_per_sequence(paper_package, tmp_path):
    from prefix_grouper.utils.register_transformers import register_attention

    register_attention()
    g = torch.Generator().manual_seed(8)
    prefix, prefix_mask, suffix, suffix_mask = masks_for(GROUPS, g)
    sizes = [len(x) - 1 for x in GROUPS]
    model, baseline = tiny_qwen2(), tiny_qwen2()
    model.set_attn_implementation("prefix_grouper_attention")
    pg = PrefixGrouper.from_ungrouped_masks(prefix_mask, suffix_mask, sizes)
    weight = torch.randn(suffix.shape[0], max(max(x[1:]) for x in GROUPS), dtype=torch.float64, generator=g)
    theirs = run_paper(paper_package, tmp_path, {"cases": {}, "model": dict(
        config=TINY_CONFIG, state_dict=model.state_dict(), prefix=prefix, prefix_mask=prefix_mask, suffix=suffix,
        suffix_mask=suffix_mask, sizes=sizes, position_ids=grouped_position_ids(pg), weight=weight)})["model"]
    log_probs, mask = readme_flow(model, prefix, prefix_mask, suffix, suffix_mask, sizes)
    expected = per_sequence_log_probs(baseline, prefix, prefix_mask, suffix, suffix_mask, sizes)[:, :mask.shape[1]]
    assert torch.equal(mask, theirs["mask"])
    torch.testing.assert_close(theirs["log_probs"], expected, atol=MODEL_TOL, rtol=MODEL_TOL)  # theirs is right
    torch.testing.assert_close(log_probs, theirs["log_probs"], atol=MODEL_TOL, rtol=MODEL_TOL)
    grads = torch.autograd.grad((log_probs * weight).sum(), list(model.parameters()))
    for got, want in zip(grads, theirs["grads"]):
        torch.testing.assert_close(got, want, atol=MODEL_TOL, rtol=MODEL_TOL)
