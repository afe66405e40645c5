"""verl 0.9.1 with prefix_grouper installed (skipped without verl; run in the verl environment).

* verl's own helpers (``forward_micro_batch_with_prefix_grouper`` after
  ``apply_prefix_grouper_patch``), written for the paper's package, give a plain forward's
  log-probs, entropies and gradients under sdpa, eager and flex_attention on CPU.
* prefix_grouper.integrations.verl: micro-batch -> layout -> verl's rolled log-probs, the
  engine's grouped forward/backward (fixed and dynamic micro-batch sizes, ragged groups,
  G = 1), the traps (one temperature, positions, a failed activation is an error), equal
  micro-batch counts per rank (2 gloo processes), the ``verl.plugins`` entry point. Prefix
  trees: tests/test_verl_tree.py; Ulysses: tests/test_verl_ulysses.py; the trainer's
  balancing: tests/test_verl_trainer.py.

A tiny Qwen2 in float64; 1e-5 tolerance (Qwen2's RMSNorm rounds to float32 internally).
"""
import os
import subprocess
import sys
import textwrap
import types

import pytest
import torch

verl = pytest.importorskip("verl")
transformers = pytest.importorskip("transformers")

import numpy as np  # noqa: E402
from tensordict import TensorDict  # noqa: E402

from prefix_grouper.integrations import verl as pg_verl  # noqa: E402

TOL = 1e-5
CONFIG = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128)
PROMPTS = [7, 3, 1]          # one prompt per group
RESPONSES = [[3, 6], [1, 4, 0], [5]]  # ragged, an empty response, G = 1
PAD = 0


def tiny_qwen2(implementation="sdpa"):
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**CONFIG)).double()
    model.set_attn_implementation(implementation)
    return model


def padded_batch(seed=0):
    """verl's padded rollout batch: left-padded prompts, right-padded responses, uid per sample."""
    g = torch.Generator().manual_seed(seed)
    n, lp, r = sum(map(len, RESPONSES)), max(PROMPTS) + 1, max(max(x) for x in RESPONSES) + 1
    prompts, responses = torch.full((n, lp), PAD), torch.full((n, r), PAD)
    response_mask, uid, row = torch.zeros(n, r, dtype=torch.long), [], 0
    for b, (p, group) in enumerate(zip(PROMPTS, RESPONSES)):
        prompt = torch.randint(1, 97, (p,), generator=g)
        for s in group:
            prompts[row, lp - p:] = prompt
            responses[row, :s] = torch.randint(1, 97, (s,), generator=g)
            response_mask[row, :s] = 1
            uid.append(f"group{b}")
            row += 1
    return prompts, responses, response_mask, np.array(uid, dtype=object)


def plain_log_probs(model, prompts, responses, response_mask, temperature=1.0):
    """One padded [prompt; response] row per sample through the model's own attention."""
    ids = torch.cat([prompts, responses], 1)
    mask = torch.cat([prompts != PAD, response_mask.bool()], 1).long()
    position_ids = (mask.cumsum(1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False).logits
    logits = logits[:, prompts.shape[1] - 1:-1] / temperature
    log_probs = logits.log_softmax(-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    return log_probs.gather(-1, responses[..., None])[..., 0] * response_mask, entropy * response_mask


def assert_grads_equal(loss, model, expected_loss, baseline):
    grads = torch.autograd.grad(loss, list(model.parameters()))
    want = torch.autograd.grad(expected_loss, list(baseline.parameters()))
    for got, ref in zip(grads, want):
        torch.testing.assert_close(got, ref, atol=TOL, rtol=TOL)


# ---------------------------------------------------------------------- verl's own helpers
@pytest.mark.parametrize("implementation", ["sdpa", "eager", "flex_attention"])
def test_verl_prefix_grouper_helpers_match_plain_forward(implementation):
    from verl.models.transformers.monkey_patch import apply_prefix_grouper_patch
    from verl.trainer.ppo.prefix_grouper_utils import forward_micro_batch_with_prefix_grouper

    apply_prefix_grouper_patch()
    prompts, responses, response_mask, uid = padded_batch()
    micro_batch = dict(prompts=prompts, responses=responses, response_mask=response_mask, uid=uid,
                       pad_token_id=PAD)
    model, baseline = tiny_qwen2(implementation), tiny_qwen2("sdpa")  # flex has no CPU backward
    entropy, log_probs = forward_micro_batch_with_prefix_grouper(
        micro_batch, model, temperature=0.7, calculate_entropy=True, device_name="cpu", param_dtype=torch.float64)
    expected, expected_entropy = plain_log_probs(baseline, prompts, responses, response_mask, temperature=0.7)
    # verl's pg_forward casts the logits to float32
    torch.testing.assert_close(log_probs.double() * response_mask, expected, atol=TOL, rtol=TOL)
    torch.testing.assert_close(entropy.double() * response_mask, expected_entropy, atol=TOL, rtol=TOL)
    w = torch.randn(expected.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert_grads_equal((log_probs.double() * response_mask * w).sum(), model, (expected * w).sum(), baseline)


# ---------------------------------------------------------------------- micro-batch <-> layout <-> log-probs
def nested(sequences):
    """verl's nested [samples, j] of 1-D tensors."""
    lens = torch.tensor([s.shape[0] for s in sequences])
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)])
    return torch.nested.nested_tensor_from_jagged(torch.cat(sequences), offsets)


def unpadded_micro_batch(sequences, prompt_lens, temperature=0.7, weight_seed=None):
    """What verl's FSDP engine receives: unpadded (nested) sequences, as left_right_2_no_padding
    makes them, nested prompts; with ``weight_seed``, a nested per-token ``weight`` for losses."""
    input_ids = nested(sequences)
    offsets = input_ids.offsets()
    fields = {"input_ids": input_ids,
              "position_ids": torch.nested.nested_tensor_from_jagged(
                  torch.cat([torch.arange(s.shape[0]) for s in sequences]), offsets),
              "prompts": nested([s[:p] for s, p in zip(sequences, prompt_lens)]),
              "loss_mask": nested([(torch.arange(s.shape[0]) >= p).long() for s, p in zip(sequences, prompt_lens)]),
              "temperature": torch.full((len(sequences),), temperature, dtype=torch.float32)}
    if weight_seed is not None:
        g = torch.Generator().manual_seed(weight_seed)
        fields["weight"] = torch.nested.nested_tensor_from_jagged(
            torch.randn(int(offsets[-1]), dtype=torch.float64, generator=g), offsets)
    return TensorDict(fields, batch_size=[len(sequences)])


def plain_rolled(model, sequences, prompt_lens, temperature=0.7):
    """Oracle: every sample alone through the model's own attention; ``(log_probs, entropy)``
    on verl's rolled unpadded axis (the value predicting token t + 1 at t, zeros elsewhere)."""
    log_probs, entropies = [], []
    for seq, p in zip(sequences, prompt_lens):
        logits = model(input_ids=seq[None], use_cache=False).logits[0, :-1] / temperature
        lp = logits.log_softmax(-1)
        keep = (torch.arange(seq.shape[0]) >= p - 1)[:-1].to(lp.dtype)
        log_probs.append(torch.cat([lp.gather(-1, seq[1:, None])[:, 0] * keep, lp.new_zeros(1)]))
        entropies.append(torch.cat([-(lp.exp() * lp).sum(-1) * keep, lp.new_zeros(1)]))
    return torch.cat(log_probs), torch.cat(entropies)


def engine_micro_batch(seed=0, temperature=0.7):
    """The padded batch's samples, unpadded as verl's FSDP engine receives them."""
    prompts, responses, response_mask, _ = padded_batch(seed)
    attention_mask = torch.cat([prompts != PAD, response_mask.bool()], 1)
    ids = torch.cat([prompts, responses], 1)
    seqs = [row[m] for row, m in zip(ids, attention_mask)]
    batch = unpadded_micro_batch(seqs, (prompts != PAD).sum(1).tolist(), temperature)
    batch["prompts"], batch["responses"], batch["attention_mask"] = prompts, responses, attention_mask.long()
    return batch, (prompts, responses, response_mask)


def rolled(values, batch):
    """[N, R] response values -> verl's unpadded rolled axis (value predicting token t + 1 at t)."""
    prompt_lens = pg_verl.prompt_lengths(batch)
    out = []
    for j, (p, n) in enumerate(zip(prompt_lens, batch["input_ids"].offsets().diff().tolist())):
        row = torch.zeros(n, dtype=values.dtype)
        row[p - 1:n - 1] = values[j, :n - p]
        out.append(row)
    return torch.cat(out)


def test_micro_batch_layout_of_groups_is_one_level():
    batch, _ = engine_micro_batch()
    prompt_lens = pg_verl.prompt_lengths(batch)
    assert prompt_lens == [p for p, g in zip(PROMPTS, RESPONSES) for _ in g]
    layout, packed_ids, sequences = pg_verl.micro_batch_layout(batch["input_ids"], prompt_lens)
    assert layout.is_flat and layout.group_sizes_list == tuple(map(len, RESPONSES))
    assert list(layout.prefix_lens_list) == PROMPTS and list(layout.suffix_lens_list) == sum(RESPONSES, [])
    assert torch.equal(packed_ids, layout.pack([s[:p] for s, p in zip(sequences, prompt_lens)],
                                               [s[p:] for s, p in zip(sequences, prompt_lens)]))
    values = torch.arange(1, layout.num_completion_tokens + 1, dtype=torch.float64)
    placed = pg_verl.sequence_values(values, layout, prompt_lens, batch["input_ids"].offsets().diff().tolist())
    padded, _ = layout.unpack_completions(values)
    assert torch.equal(placed, rolled(padded, batch))
    with pytest.raises(ValueError, match=r"prompt_lens\[1\] = 0"):
        pg_verl.micro_batch_layout(batch["input_ids"], [7, 0, 3, 3, 3, 1])
    with pytest.raises(TypeError, match="nested"):
        pg_verl.micro_batch_layout(batch["input_ids"].values(), prompt_lens)


def test_grouped_log_probs_match_plain_forward():
    batch, (prompts, responses, response_mask) = engine_micro_batch()
    model, baseline = tiny_qwen2(), tiny_qwen2()
    log_probs, entropy = pg_verl.grouped_log_probs(model, model, batch, temperature=0.7, calculate_entropy=True)
    assert log_probs.is_nested and torch.equal(log_probs.offsets(), batch["input_ids"].offsets())
    expected, expected_entropy = plain_log_probs(baseline, prompts, responses, response_mask, temperature=0.7)
    torch.testing.assert_close(log_probs.values(), rolled(expected, batch), atol=TOL, rtol=TOL)
    torch.testing.assert_close(entropy.values(), rolled(expected_entropy, batch), atol=TOL, rtol=TOL)
    w = torch.randn(log_probs.values().shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    assert_grads_equal((log_probs.values() * w).sum(), model, (rolled(expected, batch) * w).sum(), baseline)
    log_probs_only, none = pg_verl.grouped_log_probs(model, model, batch, temperature=0.7, calculate_entropy=False)
    assert none is None and torch.equal(log_probs_only.values(), log_probs.values())


def make_engine(model, monkeypatch):
    """A PrefixGrouperFSDPEngine around a plain module on CPU (no FSDP, one gloo process)."""
    from verl.workers.engine import EngineRegistry
    from verl.workers.engine.fsdp import transformer_impl

    engine_cls = pg_verl.activate()
    assert EngineRegistry.get_engine_cls("language_model", "fsdp2") is engine_cls  # it overrides verl's
    monkeypatch.setattr(pg_verl.engine, "_device", lambda: ("cpu", "cpu"))
    monkeypatch.setattr(transformer_impl, "get_device_id", lambda: "cpu")
    engine = object.__new__(engine_cls)  # skips building FSDP: the module is given
    engine.module, engine._autocast_dtype, engine.prefix_group_size = model, torch.float32, 2
    engine.ulysses_sequence_parallel_size, engine.ulysses_device_mesh, engine.ulysses_parallel_group = 1, None, None
    engine.engine_config = types.SimpleNamespace(use_no_sync_for_gradient_accumulation=True)
    return engine


@pytest.fixture
def one_process_group():
    """A gloo group of one process for verl's all-reduces, gone after the test."""
    if torch.distributed.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{29500 + os.getpid() % 400}",
                                         rank=0, world_size=1)
    yield
    torch.distributed.destroy_process_group()


def ragged_samples(seed=5):
    """Ragged groups (3, 1, 2 samples; one G = 1 agent step whose prompt opens with an earlier
    sample's whole sequence) under a shared 34-token system prompt."""
    g = torch.Generator().manual_seed(seed)

    def rand(n):
        return torch.randint(1, 97, (n,), generator=g)

    system = rand(34)
    first = torch.cat([system, rand(4)])
    sequences = [torch.cat([first, rand(n)]) for n in (3, 5, 0)]
    step = torch.cat([sequences[0], rand(3)])
    sequences.append(torch.cat([step, rand(4)]))
    second = torch.cat([system, rand(6)])
    sequences += [torch.cat([second, rand(n)]) for n in (2, 6)]
    prompt_lens = [len(first)] * 3 + [len(step)] + [len(second)] * 2
    return sequences, prompt_lens


@pytest.mark.parametrize("dynamic", [False, True])
def test_engine_forward_backward_batch_gives_plain_gradients(monkeypatch, one_process_group, dynamic):
    from verl.utils import tensordict_utils as tu

    sequences, prompt_lens = ragged_samples()
    batch = unpadded_micro_batch(sequences, prompt_lens, weight_seed=3)
    if dynamic:  # the tree of the 6 samples packs 67 tokens
        tu.assign_non_tensor(batch, use_dynamic_bsz=True, max_token_len_per_gpu=56, calculate_entropy=False)
    else:
        tu.assign_non_tensor(batch, use_dynamic_bsz=False, micro_batch_size_per_gpu=1, calculate_entropy=False)
    tu.assign_non_tensor(batch, return_model_output=True)
    model, baseline = tiny_qwen2(), tiny_qwen2()
    engine = make_engine(model, monkeypatch)
    seen = []

    def loss_function(model_output, data, dp_group=None):
        seen.append(pg_verl.micro_batch_layout(data["input_ids"], pg_verl.prompt_lengths(data)).layout.total_tokens)
        return (model_output["log_probs"].values() * data["weight"].values()).sum(), {}

    output = engine.forward_backward_batch(batch, loss_function, forward_only=False)
    expected, _ = plain_rolled(baseline, sequences, prompt_lens)
    if dynamic:
        # the first group with the step opening with its first sample's sequence, then the other group
        assert sorted(seen) == [48, 53]
    else:
        assert seen == [46, 48, 48]  # one group per micro-batch, in order: 3 samples, the step, 2 samples
    # verl's output comes back in the batch's sample order
    torch.testing.assert_close(output["model_output"]["log_probs"].values(), expected.detach(), atol=TOL, rtol=TOL)
    (expected * batch["weight"].values()).sum().backward()
    for got, ref in zip(model.parameters(), baseline.parameters()):
        torch.testing.assert_close(got.grad, ref.grad, atol=TOL, rtol=TOL)


# ---------------------------------------------------------------------- traps
def test_micro_batch_checks():
    batch, _ = engine_micro_batch()
    with pytest.raises(ValueError, match="one temperature"):
        pg_verl.engine.check_micro_batch(batch, torch.tensor([0.7, 1.0]))
    assert pg_verl.engine.check_micro_batch(batch, batch["temperature"]) == pytest.approx(0.7)
    shifted = batch["position_ids"].values() + 1
    batch["position_ids"] = torch.nested.nested_tensor_from_jagged(shifted, batch["input_ids"].offsets())
    with pytest.raises(ValueError, match="position_ids 0, 1, ..."):
        pg_verl.engine.check_micro_batch(batch, 0.7)


def test_failed_activation_is_an_error(monkeypatch):
    config = types.SimpleNamespace(use_prefix_grouper=True, rollout_n=2,
                                   engine=types.SimpleNamespace(ulysses_sequence_parallel_size=2))
    monkeypatch.setitem(pg_verl.engine.state, "engine", None)

    def broken():
        raise ImportError("simulated")

    monkeypatch.setattr(pg_verl.engine, "_define_engine", broken)
    with pytest.raises(RuntimeError, match="could not be registered"):
        pg_verl.engine.on_actor_config(config)
    monkeypatch.setitem(pg_verl.engine.state, "error", ImportError("simulated load failure"))
    with pytest.raises(RuntimeError, match="failed to load"):
        pg_verl.engine.on_actor_config(config)
    pg_verl.engine.on_actor_config(types.SimpleNamespace(use_prefix_grouper=False))  # off: nothing happens


def test_actor_config_marks_its_engine(monkeypatch):
    from verl.workers.config.actor import ActorConfig

    monkeypatch.setitem(pg_verl.engine.state, "engine", object)  # registration is tested above
    pg_verl.engine.install_config_hook()
    config = ActorConfig(strategy="fsdp", rollout_n=4, ppo_micro_batch_size_per_gpu=1, use_prefix_grouper=True)
    assert getattr(config.engine, pg_verl.ENGINE_FLAG) == 4
    assert pg_verl.PrefixGrouperFSDPEngine is object
    plain = ActorConfig(strategy="fsdp", rollout_n=4, ppo_micro_batch_size_per_gpu=1)
    assert not hasattr(plain.engine, pg_verl.ENGINE_FLAG)


def test_verl_plugins_entry_point_loads(tmp_path):
    dist = tmp_path / "prefix_grouper_verl_plugin_test-0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: prefix-grouper-verl-plugin-test\nVersion: 0\n")
    (dist / "entry_points.txt").write_text("[verl.plugins]\nprefix_grouper = prefix_grouper.integrations.verl\n")
    script = ("import verl\nfrom verl.workers.config.actor import ActorConfig\n"
              "assert getattr(ActorConfig.__post_init__, 'prefix_grouper_hook', False), 'plugin not loaded'\n"
              "import sys\n"  # the v1 trainer (it needs transfer_queue) is patched when imported
              "assert any(type(f).__name__ == '_PatchTrainerOnImport' for f in sys.meta_path), 'no trainer hook'\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "ERROR" not in done.stderr


EQUAL_COUNTS = textwrap.dedent('''
    import os, sys, torch
    import torch.distributed as dist
    from tensordict import TensorDict
    from verl.utils import tensordict_utils as tu
    from prefix_grouper.integrations import verl as pg_verl
    rank = int(sys.argv[1])
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + sys.argv[2], rank=rank, world_size=2)
    # rank 0: 3 groups of 2 with long sequences, rank 1: 3 groups of 2 with short ones
    lens = [30, 28, 25, 27, 29, 26] if rank == 0 else [3, 4, 2, 5, 3, 2]
    seqs = [torch.cat([torch.full((1,), 1 + i // 2), torch.arange(n - 1) + 10 * i]) for i, n in enumerate(lens)]
    offsets = torch.tensor([0] + lens).cumsum(0)
    ids = torch.nested.nested_tensor_from_jagged(torch.cat(seqs), offsets)
    prompts = torch.nested.nested_tensor_from_jagged(torch.cat([s[:1] for s in seqs]), torch.arange(7))
    data = TensorDict({"input_ids": ids, "prompts": prompts, "group": torch.arange(6) // 2}, batch_size=[6])
    tu.assign_non_tensor(data, use_dynamic_bsz=True, max_token_len_per_gpu=60)
    micro, _ = pg_verl.engine.packed_micro_batches(data, dist.group.WORLD, 1, "cpu")
    for mb in micro:
        groups = mb["group"].tolist()
        assert all(groups.count(g) == 2 for g in groups), groups  # whole groups
    print("COUNT", rank, len(micro))
''')


def test_micro_batch_counts_equal_over_ranks(tmp_path):
    script = tmp_path / "counts.py"
    script.write_text(EQUAL_COUNTS)
    port = str(29600 + os.getpid() % 300)
    procs = [subprocess.Popen([sys.executable, str(script), str(r), port], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
    counts = {line.split()[1]: int(line.split()[2]) for out, _ in outs for line in out.splitlines()
              if line.startswith("COUNT")}
    assert counts["0"] == counts["1"] >= 2  # rank 1 alone would need one micro-batch
