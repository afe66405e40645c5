"""Ulysses sequence parallelism in the verl plugin: 2 gloo processes split every packed tree
row of a micro-batch, and give the log-probs, entropies and (averaged, as FSDP averages them)
gradients of ``ulysses_sequence_parallel_size=1`` (skipped without verl; run in the verl
environment). Covered: prefix trees (system prompt, ragged groups, an agent step's history),
a packed row that does not divide over the ranks, key/value heads repeated to divide (one
key/value head), gradient checkpointing (the attention is recomputed in backward)."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("verl")

SCRIPT = textwrap.dedent('''
    import sys, torch
    import torch.distributed as dist
    sys.path.insert(0, sys.argv[3])
    import transformers
    from test_verl_integration import CONFIG, TOL, ragged_samples, unpadded_micro_batch
    from test_verl_tree import history_batch
    from prefix_grouper.integrations import verl as pg_verl

    rank = int(sys.argv[1])
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + sys.argv[2], rank=rank, world_size=2)
    group = dist.group.WORLD

    def model(kv_heads, checkpointing):
        torch.manual_seed(0)
        config = transformers.Qwen2Config(**{**CONFIG, "num_key_value_heads": kv_heads})
        m = transformers.Qwen2ForCausalLM(config).double()
        if checkpointing:
            m.gradient_checkpointing_enable()
            m.train()
        return m

    def run(m, batch, sp_group):
        log_probs, entropy = pg_verl.grouped_log_probs(m, m, batch, 0.7, True, sequence_parallel_group=sp_group)
        w = torch.randn(log_probs.values().shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        (log_probs.values() * w + entropy.values() * w.flip(0)).sum().backward()
        return log_probs.values().detach(), entropy.values().detach(), [p.grad for p in m.parameters()]

    cases = [("ragged", ragged_samples(), 2, False), ("history", history_batch(), 1, True)]
    for name, (sequences, prompt_lens), kv_heads, checkpointing in cases:
        batch = unpadded_micro_batch(sequences, prompt_lens)
        layout = pg_verl.micro_batch_layout(batch["input_ids"], prompt_lens).layout
        split, one = model(kv_heads, checkpointing), model(kv_heads, checkpointing)
        got, want = run(split, batch, group), run(one, batch, None)
        for grad in got[2]:
            dist.all_reduce(grad, op=dist.ReduceOp.AVG)  # FSDP averages over the sequence-parallel ranks
        for a, b in zip([got[0], got[1]] + got[2], [want[0], want[1]] + want[2]):
            torch.testing.assert_close(a, b, atol=TOL, rtol=TOL)
        print("OK", rank, name, layout.total_tokens, layout.total_tokens % 2)
''')


def test_two_ulysses_ranks_equal_one(tmp_path):
    script = tmp_path / "ulysses.py"
    script.write_text(SCRIPT)
    port = str(29900 + os.getpid() % 90)
    tests = str(Path(__file__).resolve().parent)
    procs = [subprocess.Popen([sys.executable, str(script), str(r), port, tests], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    lines = [line.split() for out, _ in outs for line in out.splitlines() if line.startswith("OK")]
    assert sorted((rank, name) for _, rank, name, *_ in lines) == [
        ("0", "history"), ("0", "ragged"), ("1", "history"), ("1", "ragged")]
    assert {name: remainder for _, _, name, _, remainder in lines}["ragged"] == "1"  # odd: the split pads one
