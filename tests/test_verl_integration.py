"""verl 0.9.1 with prefix_grouper installed (skipped without verl; run in the verl environment).

* verl's own helpers (``forward_micro_batch_with_prefix_grouper`` after
  ``apply_prefix_grouper_patch``), written for the paper's package, give a plain forward's
  log-probs, entropies and gradients under sdpa, eager and flex_attention on CPU.
* prefix_grouper.integrations.verl: micro-batch -> layout -> verl's rolled log-probs, the
  engine's grouped forward/backward, and the traps: whole groups, Ulysses refused, equal
  micro-batch counts per rank (2 gloo processes), a failed activation is an error, the
  ``verl.plugins`` entry point loads.

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
def engine_micro_batch(seed=0, temperature=0.7):
    """What verl's FSDP engine receives: unpadded (nested) sequences, as left_right_2_no_padding makes them."""
    prompts, responses, response_mask, _ = padded_batch(seed)
    attention_mask = torch.cat([prompts != PAD, response_mask.bool()], 1)
    ids = torch.cat([prompts, responses], 1)
    seqs = [row[m] for row, m in zip(ids, attention_mask)]
    lens = torch.tensor([s.shape[0] for s in seqs])
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)])
    input_ids = torch.nested.nested_tensor_from_jagged(torch.cat(seqs), offsets)
    position_ids = torch.nested.nested_tensor_from_jagged(torch.cat([torch.arange(n) for n in lens.tolist()]),
                                                          offsets)
    batch = TensorDict({"input_ids": input_ids, "position_ids": position_ids, "prompts": prompts,
                        "responses": responses, "response_mask": response_mask, "loss_mask": response_mask,
                        "attention_mask": attention_mask.long(),
                        "temperature": torch.full((len(seqs),), temperature, dtype=torch.float32)},
                       batch_size=[len(seqs)])
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


def test_micro_batch_layout():
    batch, _ = engine_micro_batch()
    prompt_lens = pg_verl.prompt_lengths(batch)
    assert prompt_lens == [p for p, g in zip(PROMPTS, RESPONSES) for _ in g]
    layout, prompts, completions = pg_verl.micro_batch_layout(batch["input_ids"], prompt_lens)
    assert layout.group_sizes_list == tuple(map(len, RESPONSES))
    assert list(layout.prefix_lens_list) == PROMPTS and [len(c) for c in completions] == sum(RESPONSES, [])
    values = torch.arange(1, layout.num_completion_tokens + 1, dtype=torch.float64)
    placed = pg_verl.sequence_values(values, layout, prompt_lens, batch["input_ids"].offsets().diff().tolist())
    padded, _ = layout.unpack_completions(values)
    assert torch.equal(placed, rolled(padded, batch))


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


def make_engine(model, group_size, monkeypatch):
    """A PrefixGrouperFSDPEngine around a plain module on CPU (no FSDP, one gloo process)."""
    from verl.workers.engine.fsdp import transformer_impl

    from verl.workers.engine import EngineRegistry

    engine_cls = pg_verl.activate()
    assert EngineRegistry.get_engine_cls("language_model", "fsdp2") is engine_cls  # it overrides verl's
    monkeypatch.setattr(pg_verl, "_device", lambda: ("cpu", "cpu"))
    monkeypatch.setattr(transformer_impl, "get_device_id", lambda: "cpu")
    engine = object.__new__(engine_cls)  # skips building FSDP: the module is given
    engine.module, engine._autocast_dtype, engine.prefix_group_size = model, torch.float32, group_size
    engine.ulysses_sequence_parallel_size, engine.ulysses_device_mesh = 1, None
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


def test_engine_forward_backward_batch_gives_plain_gradients(monkeypatch, one_process_group):
    from verl.utils import tensordict_utils as tu

    # Two groups of two completions each: force_group_size=2 keeps groups whole.
    monkeypatch.setattr(sys.modules[__name__], "RESPONSES", [[3, 6], [1, 4]])
    monkeypatch.setattr(sys.modules[__name__], "PROMPTS", [7, 3])
    batch, (prompts, responses, response_mask) = engine_micro_batch()
    tu.assign_non_tensor(batch, use_dynamic_bsz=False, micro_batch_size_per_gpu=1, calculate_entropy=False)
    model, baseline = tiny_qwen2(), tiny_qwen2()
    engine = make_engine(model, 2, monkeypatch)
    w = torch.randn(batch["input_ids"].values().shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    seen, start = [], [0]

    def loss_function(model_output, data, dp_group=None):
        # Without dynamic batch sizes verl chunks in order: the weights follow the tokens.
        values = model_output["log_probs"].values()
        seen.append(data["input_ids"].shape[0])
        weight = w[start[0]:start[0] + values.shape[0]]
        start[0] += values.shape[0]
        return (values * weight).sum(), {}

    engine.forward_backward_batch(batch, loss_function, forward_only=False)
    assert seen == [2, 2]  # micro_batch_size_per_gpu=1 group of 2 samples each
    expected, _ = plain_log_probs(baseline, prompts, responses, response_mask, temperature=0.7)
    (rolled(expected, batch) * w).sum().backward()
    for got, ref in zip(model.parameters(), baseline.parameters()):
        torch.testing.assert_close(got.grad, ref.grad, atol=TOL, rtol=TOL)


# ---------------------------------------------------------------------- traps
def test_partial_groups_and_ulysses_are_refused():
    batch, _ = engine_micro_batch()
    with pytest.raises(ValueError, match="whole groups of rollout.n=2"):
        pg_verl.check_whole_groups(batch, 2)  # group sizes 2, 3, 1
    with pytest.raises(ValueError, match="Ulysses"):
        pg_verl.check_engine_config(types.SimpleNamespace(ulysses_sequence_parallel_size=2))
    with pytest.raises(ValueError, match="one temperature"):
        pg_verl.check_micro_batch(batch, torch.tensor([0.7, 1.0]))
    assert pg_verl.check_micro_batch(batch, batch["temperature"]) == pytest.approx(0.7)
    shifted = batch["position_ids"].values() + 1
    batch["position_ids"] = torch.nested.nested_tensor_from_jagged(shifted, batch["input_ids"].offsets())
    with pytest.raises(ValueError, match="position_ids 0, 1, ..."):
        pg_verl.check_micro_batch(batch, 0.7)


def test_failed_activation_is_an_error(monkeypatch):
    config = types.SimpleNamespace(use_prefix_grouper=True, rollout_n=2,
                                   engine=types.SimpleNamespace(ulysses_sequence_parallel_size=1))
    monkeypatch.setitem(pg_verl._state, "engine", None)

    def broken():
        raise ImportError("simulated")

    monkeypatch.setattr(pg_verl, "_define_engine", broken)
    with pytest.raises(RuntimeError, match="could not be registered"):
        pg_verl.on_actor_config(config)
    monkeypatch.setitem(pg_verl._state, "error", ImportError("simulated load failure"))
    with pytest.raises(RuntimeError, match="failed to load"):
        pg_verl.on_actor_config(config)
    pg_verl.on_actor_config(types.SimpleNamespace(use_prefix_grouper=False))  # off: nothing happens


def test_actor_config_marks_its_engine(monkeypatch):
    from verl.workers.config.actor import ActorConfig

    monkeypatch.setitem(pg_verl._state, "engine", object)  # registration is tested above
    pg_verl.install_config_hook()
    config = ActorConfig(strategy="fsdp", rollout_n=4, ppo_micro_batch_size_per_gpu=1, use_prefix_grouper=True)
    assert getattr(config.engine, pg_verl.ENGINE_FLAG) == 4
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


def test_balanced_group_order_gives_ranks_whole_groups():
    g = torch.Generator().manual_seed(4)
    uids = [f"uid{b}" for b in range(6)]
    keys = [f"{u}_{session}_0" for session in range(3) for u in uids]  # samples of a prompt are not adjacent
    seq_lens = torch.randint(5, 200, (len(keys),), generator=g).tolist()
    order = pg_verl.balanced_group_order(keys, seq_lens, dp_size=2, group_size=3)
    assert sorted(order) == list(range(len(keys)))
    loads = []
    for rank in range(2):
        part = [keys[i] for i in order[rank * 9:(rank + 1) * 9]]
        prompts = [k.split("_")[0] for k in part]
        assert all(prompts[i:i + 3] == [prompts[i]] * 3 for i in range(0, 9, 3))  # whole, contiguous groups
        loads.append(sum(seq_lens[i] for i in order[rank * 9:(rank + 1) * 9]))
    group_tokens = [sum(seq_lens[i] for i, k in enumerate(keys) if k.startswith(u + "_")) for u in uids]
    assert abs(loads[0] - loads[1]) <= max(group_tokens)
    with pytest.raises(ValueError, match="rollout.n=3"):
        pg_verl.balanced_group_order(keys[:-1], seq_lens[:-1], dp_size=2, group_size=3)
    with pytest.raises(ValueError, match="divide by the data-parallel size 4"):
        pg_verl.balanced_group_order(keys, seq_lens, dp_size=4, group_size=3)


def test_trainer_module_is_patched_on_import(tmp_path, monkeypatch):
    (tmp_path / "fake_verl_trainer_base.py").write_text(
        "class PPOTrainer:\n    def _balance_batch(self, batch, metrics, logging_prefix='', keep_minibatch=False):\n"
        "        return batch\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(pg_verl, "_TRAINER_MODULE", "fake_verl_trainer_base")
    pg_verl.install_trainer_hook()
    import fake_verl_trainer_base

    assert fake_verl_trainer_base.PPOTrainer._balance_batch.prefix_grouper_hook
    assert not any(isinstance(f, pg_verl._PatchTrainerOnImport) for f in sys.meta_path)  # removed itself
    monkeypatch.delitem(sys.modules, "fake_verl_trainer_base")


def test_patched_trainer_balances_groups_only_when_asked():
    class Batch:
        def __init__(self, keys):
            self.keys, self.tags = list(keys), [{"seq_len": 10 + i} for i in range(len(keys))]

        def __len__(self):
            return len(self.keys)

        def reorder(self, order):
            self.keys, self.tags = [self.keys[i] for i in order], [self.tags[i] for i in order]

    class Trainer:
        def _balance_batch(self, batch, metrics, logging_prefix="global_seqlen", keep_minibatch=False):
            return "original"

        def _get_required_batch_multiple(self, dp_size):
            return dp_size * 2

    pg_verl.patch_trainer(Trainer)
    pg_verl.patch_trainer(Trainer)  # idempotent
    trainer = Trainer()
    workers = types.SimpleNamespace(_dispatch_info={}, _query_dispatch_info=lambda role: [0, 1])
    actor = {"use_prefix_grouper": False}
    trainer.config = types.SimpleNamespace(actor_rollout_ref=types.SimpleNamespace(
        actor=actor, rollout=types.SimpleNamespace(n=2)))
    trainer.actor_rollout_wg = workers
    keys = [f"u{b}_{s}_0" for s in range(2) for b in range(4)]
    assert trainer._balance_batch(Batch(keys), {}) == "original"
    actor["use_prefix_grouper"] = True
    batch = trainer._balance_batch(Batch(keys), {})
    assert [k.split("_")[0] for k in batch.keys[::2]] == [k.split("_")[0] for k in batch.keys[1::2]]
    with pytest.raises(ValueError, match="without synthetic padding"):
        trainer._balance_batch(Batch(keys[:6]), {})


EQUAL_COUNTS = textwrap.dedent('''
    import os, sys, torch
    import torch.distributed as dist
    from tensordict import TensorDict
    from verl.utils import seqlen_balancing
    from verl.utils import tensordict_utils as tu
    from verl.workers.engine.utils import prepare_micro_batches
    seqlen_balancing.get_device_name = lambda: "cpu"
    rank = int(sys.argv[1])
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + sys.argv[2], rank=rank, world_size=2)
    # rank 0: 3 groups of 2 with long sequences, rank 1: 3 groups of 2 with short ones
    lens = [30, 28, 25, 27, 29, 26] if rank == 0 else [3, 4, 2, 5, 3, 2]
    offsets = torch.tensor([0] + lens).cumsum(0)
    ids = torch.nested.nested_tensor_from_jagged(torch.arange(sum(lens)), offsets)
    data = TensorDict({"input_ids": ids, "group": torch.arange(6) // 2}, batch_size=[6])
    tu.assign_non_tensor(data, use_dynamic_bsz=True, max_token_len_per_gpu=60, force_group_size=2)
    micro, _ = prepare_micro_batches(data, dp_group=dist.group.WORLD, same_micro_num_in_dp=True)
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
