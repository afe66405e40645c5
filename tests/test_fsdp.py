"""FSDP2: the grouped forward under ``torch.distributed.fsdp.fully_shard`` on 2 CPU processes (gloo).

Each rank runs its own groups through a sharded tiny Qwen2, both ways the package offers
(``completion_log_probs`` on a GroupLayout, and the paper-API ``PrefixGrouper`` flow with
``prefix_grouper_attention``), and backpropagates. The sharded gradients, gathered, must
equal those of the unsharded model on the mean of the two ranks' losses (FSDP2 averages
gradients over ranks). float64; 1e-5 (Qwen2's RMSNorm rounds to float32 internally).
TRL under torchrun (plain data parallel) is tested in test_train_distributed.py.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("transformers")
if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

WORKER = textwrap.dedent('''
    import sys
    import torch
    import torch.distributed as dist
    import transformers
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from prefix_grouper import GroupLayout, PrefixGrouper
    from prefix_grouper.integrations.transformers import completion_log_probs
    from prefix_grouper.utils.register_transformers import register_attention

    rank, world, port = int(sys.argv[1]), 2, sys.argv[2]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    CONFIG = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128)

    def tiny():
        torch.manual_seed(0)
        return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**CONFIG)).double()

    def rank_data(r):
        g = torch.Generator().manual_seed(10 + r)
        prompt_lens, completion_lens = ([7, 1], [[3, 5], [4]]) if r == 0 else ([12], [[1, 6, 0]])
        prompts = [torch.randint(1, 97, (p,), generator=g) for p in prompt_lens]
        completions = [torch.randint(1, 97, (s,), generator=g) for group in completion_lens for s in group]
        return GroupLayout.from_lengths(prompt_lens, completion_lens), prompts, completions

    def paper_flow(model, layout, prompts, completions):
        """PrefixGrouper (the paper's API): right-padded concatenated rows, prefix_grouper= in the call."""
        pg = PrefixGrouper([[p.shape[0], *s] for p, s in zip(prompts, layout.suffix_lens_per_group)])
        lp, ls = max(p.shape[0] for p in prompts), max(layout.max_suffix_len, 1)
        prefix = torch.stack([torch.nn.functional.pad(p, (lp - p.shape[0], 0)) for p in prompts])
        suffix = torch.stack([torch.nn.functional.pad(c, (0, ls - c.shape[0])) for c in completions])
        prefix_mask = torch.arange(lp)[None] >= lp - torch.tensor([p.shape[0] for p in prompts])[:, None]
        suffix_mask = torch.arange(ls)[None] < torch.tensor([c.shape[0] for c in completions])[:, None]
        position_ids = torch.zeros(pg.x_shape, dtype=torch.long)
        for b, info in enumerate(pg.group_info):
            row = list(range(info.prefix_len)) + [info.prefix_len + t for s in info.suffix_lens for t in range(s)]
            position_ids[b, :len(row)] = torch.tensor(row)
        logits = model(input_ids=pg.concat_input(prefix, prefix_mask, suffix, suffix_mask),
                       attention_mask=pg.padding_mask, position_ids=position_ids, prefix_grouper=pg,
                       use_cache=False).logits
        _, _, out, mask = pg.split_output(logits, include_prefix_last=1)
        targets = pg.convert_padding(suffix, suffix_mask, padding_mode="right")
        return (out[:, :-1].log_softmax(-1).gather(-1, targets[..., None])[..., 0] * mask[:, 1:]).sum()

    register_attention()
    sharded, paper_sharded = tiny(), tiny()
    paper_sharded.load_state_dict(sharded.state_dict())
    paper_sharded.set_attn_implementation("prefix_grouper_attention")
    mesh = init_device_mesh("cpu", (world,))
    for model in (sharded, paper_sharded):
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    # paper_sharded runs the PrefixGrouper flow, sharded the GroupLayout one: two FSDP modules, summed grads.
    layout, prompts, completions = rank_data(rank)
    log_probs, mask = completion_log_probs(sharded, layout, prompts, completions)
    ((log_probs * mask).sum() + paper_flow(paper_sharded, layout, prompts, completions)).backward()
    grads = [a.grad.full_tensor() + b.grad.full_tensor()
             for a, b in zip(sharded.parameters(), paper_sharded.parameters())]
    assert any(type(p).__name__ == "DTensor" for p in sharded.parameters())

    reference, paper_reference = tiny(), tiny()
    paper_reference.set_attn_implementation("prefix_grouper_attention")
    total = 0
    for r in range(world):
        layout, prompts, completions = rank_data(r)
        log_probs, mask = completion_log_probs(reference, layout, prompts, completions)
        total = total + (log_probs * mask).sum() + paper_flow(paper_reference, layout, prompts, completions)
    (total / world).backward()
    expected = [a.grad + b.grad for a, b in zip(reference.parameters(), paper_reference.parameters())]
    worst = max(((g - e).abs().max() / e.abs().max().clamp_min(1e-30)).item() for g, e in zip(grads, expected))
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)
    print(f"RANK {rank} OK worst relative difference {worst:.2e}")
    dist.destroy_process_group()
''')


def test_grouped_forward_under_fully_shard_gives_unsharded_gradients(tmp_path):
    script = tmp_path / "fsdp_worker.py"
    script.write_text(WORKER)
    port = str(29900 + os.getpid() % 90)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(script), str(rank), port], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for rank in range(2)]
    try:
        outputs = [p.communicate(timeout=600) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for rank, (p, (out, err)) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"rank {rank} failed:\n{err[-3000:]}"
        assert f"RANK {rank} OK" in out, out
