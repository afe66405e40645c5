"""prefix_grouper.advantages against independent float64 loops of each convention, and every
backend against the package's float64 reference (prefix_grouper.advantages.reference).

Tolerances: float64 inputs 1e-12 (absolute on advantages of order 1, relative otherwise);
float32 1e-4 (inputs near 300); bfloat16 outputs 1e-2 relative (their rounding). Triton runs under the
interpreter on CPU (small N); the CUDA extension runs only where a GPU is present.
"""
import math
import random
import statistics

import pytest
import torch

from prefix_grouper import GroupLayout
from prefix_grouper.advantages import (
    anchor_index_from_states,
    available_backends,
    broadcast_to_padded,
    broadcast_to_tokens,
    discounted_returns,
    gigpo_advantages,
    grpo_advantages,
    multi_objective_advantages,
    reference,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
BACKENDS = [(backend, device) for device in DEVICES for backend in available_backends(device)]
BACKEND_IDS = [f"{backend}-{device}" for backend, device in BACKENDS]
F64 = dict(rtol=1e-12, atol=1e-12)


def close(actual, expected, **tolerance):
    torch.testing.assert_close(actual.detach().cpu().double(), expected.double(), **(tolerance or F64))


# ---------------------------------------------------------------------- conventions, written
# as each framework states them (contiguous groups, statistics module), independent of the
# package's reference.
def verl_reference(rewards, uid, eps=1e-6, norm_by_std=True):
    """verl compute_grpo_outcome_advantage: per-uid lists; a lone completion: mean 0, std 1."""
    scores = {}
    for r, u in zip(rewards, uid):
        scores.setdefault(u, []).append(r)
    out = []
    for r, u in zip(rewards, uid):
        mean, std = (0.0, 1.0) if len(scores[u]) == 1 else (statistics.fmean(scores[u]), statistics.stdev(scores[u]))
        out.append((r - mean) / (std + eps) if norm_by_std else r - mean)
    return torch.tensor(out, dtype=torch.float64)


def trl_reference(rewards, num_generations, scale_rewards="group", eps=1e-4):
    """TRL GRPOTrainer: consecutive blocks of num_generations; nan-aware mean/std; NaN -> 0."""
    valid = [r for r in rewards if not math.isnan(r)]
    batch_std = statistics.stdev(valid)
    out = []
    for start in range(0, len(rewards), num_generations):
        block = rewards[start:start + num_generations]
        kept = [r for r in block if not math.isnan(r)]
        mean, std = statistics.fmean(kept), statistics.stdev(kept)
        for r in block:
            if math.isnan(r):
                out.append(0.0)
            elif scale_rewards == "group":
                out.append((r - mean) / (std + eps))
            elif scale_rewards == "batch":
                out.append((r - mean) / (batch_std + eps))
            else:
                out.append(r - mean)
    return torch.tensor(out, dtype=torch.float64)


def openrlhf_reference(rewards, n_samples_per_prompt, eps=1e-9):
    """OpenRLHF group_norm: rows of n_samples_per_prompt, (r - mean) / (std + 1e-9)."""
    out = []
    for start in range(0, len(rewards), n_samples_per_prompt):
        block = rewards[start:start + n_samples_per_prompt]
        mean, std = statistics.fmean(block), statistics.stdev(block)
        out.extend((r - mean) / (std + eps) for r in block)
    return torch.tensor(out, dtype=torch.float64)


def rewards_for(num_groups, group_size, seed, binary=False):
    rng = random.Random(seed)
    draw = (lambda: float(rng.random() < 0.5)) if binary else (lambda: rng.gauss(0.3, 1.7))
    return [draw() for _ in range(num_groups * group_size)]


@pytest.mark.parametrize("binary", [False, True])
def test_verl_convention(binary):
    rewards = rewards_for(6, 5, seed=1, binary=binary) + [2.5]  # + a singleton group
    uid = [f"prompt{j // 5}" for j in range(30)] + ["lonely"]
    group_index = [hash(u) for u in uid]  # arbitrary, huge, unsorted integer ids
    r = torch.tensor(rewards, dtype=torch.float64)
    close(grpo_advantages(r, group_index), verl_reference(rewards, uid))
    close(grpo_advantages(r, group_index, scale="none"), verl_reference(rewards, uid, norm_by_std=False))
    close(reference.grpo_advantages(r, group_index), verl_reference(rewards, uid))


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_trl_convention(scale):
    rewards = rewards_for(5, 4, seed=2)
    rewards[3] = rewards[9] = rewards[10] = math.nan  # unscorable completions
    group_index = torch.arange(20) // 4
    r = torch.tensor(rewards, dtype=torch.float64)
    expected = trl_reference(rewards, 4, scale_rewards=scale)
    close(grpo_advantages(r, group_index, eps=1e-4, scale=scale), expected)
    close(reference.grpo_advantages(r, group_index, eps=1e-4, scale=scale), expected)


def test_openrlhf_convention():
    rewards = rewards_for(4, 8, seed=3)
    r = torch.tensor(rewards, dtype=torch.float64)
    group_index = torch.arange(32) // 8
    expected = openrlhf_reference(rewards, 8)
    close(grpo_advantages(r, group_index, eps=1e-9), expected)
    close(reference.grpo_advantages(r, group_index, eps=1e-9), expected)


def test_singleton_and_nan_rules_by_hand():
    # group 7: rewards 1 and NaN -> a singleton once the NaN is left out; group 9: all NaN.
    r = torch.tensor([1.0, math.nan, 3.0, 5.0, math.nan], dtype=torch.float64)
    g = torch.tensor([7, 7, -4, -4, 9])
    close(grpo_advantages(r, g), torch.tensor([1 / (1 + 1e-6), 0, -1 / (math.sqrt(2) + 1e-6),
                                               1 / (math.sqrt(2) + 1e-6), 0], dtype=torch.float64))
    close(grpo_advantages(r, g, singleton="zero"), torch.tensor([0, 0, -1 / (math.sqrt(2) + 1e-6),
                                                                 1 / (math.sqrt(2) + 1e-6), 0],
                                                                dtype=torch.float64))
    batch = statistics.stdev([1.0, 3.0, 5.0])
    # "raw": the singleton keeps its reward (mean 0, std 1) under scale "batch" too.
    close(grpo_advantages(r, g, scale="batch"),
          torch.tensor([1 / (1 + 1e-6), 0, -1 / (batch + 1e-6), 1 / (batch + 1e-6), 0], dtype=torch.float64))
    close(grpo_advantages(r, g, scale="none"), torch.tensor([1.0, 0, -1, 1, 0], dtype=torch.float64))
    biased = grpo_advantages(r, g, unbiased=False)
    close(biased[2:4], torch.tensor([-1 / (1 + 1e-6), 1 / (1 + 1e-6)], dtype=torch.float64))


# ---------------------------------------------------------------------- backends vs reference
def random_batch(num_rows, seed, sorted_ids=False, nan_fraction=0.1, dtype=torch.float64):
    """Rewards with NaNs and ids that are negative, huge, unsorted, with singleton groups."""
    gen = torch.Generator().manual_seed(seed)
    rewards = (torch.randn(num_rows, generator=gen, dtype=torch.float64) * 2 + 5).to(dtype)
    rewards[torch.rand(num_rows, generator=gen) < nan_fraction] = math.nan
    id_pool = torch.tensor([-(2**62), -17, 0, 3, 99, 2**40 + 1, 2**62, -5] + list(range(1000, 1000 + num_rows)))
    ids = id_pool[torch.randint(0, 8 + num_rows // 6, (num_rows,), generator=gen)]
    if sorted_ids:
        ids = torch.sort(ids).values
    return rewards, ids


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("sorted_ids", [False, True], ids=["shuffled", "sorted"])
def test_grpo_backends_match_reference(backend, device, sorted_ids):
    rewards, ids = random_batch(150, seed=4, sorted_ids=sorted_ids)
    for scale in ("group", "batch", "none"):
        for singleton in ("raw", "zero"):
            for unbiased in (True, False):
                options = dict(scale=scale, singleton=singleton, unbiased=unbiased, eps=1e-6)
                out = grpo_advantages(rewards.to(device), ids.to(device), backend=backend, **options)
                assert out.dtype == torch.float64 and out.device.type == device
                close(out, reference.grpo_advantages(rewards, ids, **options))


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
def test_grpo_float32_and_long_groups(backend, device):
    # One group far longer than the others forces the kernels' multi-chunk / lane loops.
    gen = torch.Generator().manual_seed(5)
    ids = torch.cat([torch.arange(40).repeat_interleave(8), torch.full((700,), 40)])
    ids = ids[torch.randperm(ids.numel(), generator=gen)]
    # Far from 0, float32 inputs keep ~3e-5 of absolute precision; the float64 statistics
    # (two-pass) add nothing to that, so the float32 result stays within 1e-4.
    rewards = torch.randn(ids.numel(), generator=gen) * 2 + 300
    out = grpo_advantages(rewards.to(device), ids.to(device), backend=backend)
    assert out.dtype == torch.float32
    close(out, reference.grpo_advantages(rewards, ids), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
def test_grpo_bfloat16(backend, device):
    rewards, ids = random_batch(64, seed=6, dtype=torch.bfloat16)
    out = grpo_advantages(rewards.to(device), ids.to(device), backend=backend)
    assert out.dtype == torch.bfloat16
    close(out, reference.grpo_advantages(rewards, ids), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_identical_rewards_give_exactly_zero(backend, device, dtype):
    # Regression: with float32 statistics the mean of 12 x 0.7 was an ulp off and the std
    # ~1e-8, so eps=1e-9 turned that ulp into advantages near +-0.95 (torch) or 0 (Triton).
    # A 300-row group of another constant crosses the kernels' chunk boundaries.
    ids = torch.cat([torch.zeros(12, dtype=torch.long), torch.ones(300, dtype=torch.long)]).to(device)
    rewards = torch.where(ids == 0, 0.7, 0.1).to(dtype)
    for scale in ("group", "batch", "none"):
        out = grpo_advantages(rewards, ids, eps=1e-9, scale=scale, backend=backend)
        assert out.dtype == dtype and out.device.type == device
        assert torch.equal(out.cpu(), torch.zeros(312, dtype=dtype)), scale
    options = dict(eps=1e-9, backend=backend)
    both = torch.stack([rewards, rewards], 1)
    for mode in ("sum_then_normalize", "normalize_then_sum"):
        out = multi_objective_advantages(both, ids, [1.0, 0.5], mode=mode, **options)
        assert torch.equal(out.cpu(), torch.zeros(312, dtype=dtype)), mode
    out = gigpo_advantages(rewards, rewards, ids, torch.zeros_like(ids), mode="mean_std_norm", **options)
    assert torch.equal(out.cpu(), torch.zeros(312, dtype=dtype))


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
def test_nearly_identical_float32_rewards(backend, device):
    # The last reward is an ulp or two above the others: a real, tiny spread that float64
    # statistics resolve (std ~3e-8, so the advantages are of order 1) and float32 ones did not.
    rewards = torch.tensor([0.7] * 11 + [0.7000001])
    assert rewards[-1] != rewards[0]
    ids = torch.zeros(12, dtype=torch.long)
    out = grpo_advantages(rewards.to(device), ids.to(device), eps=1e-9, backend=backend)
    assert out.dtype == torch.float32
    close(out, reference.grpo_advantages(rewards, ids, eps=1e-9), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
def test_singleton_raw_keeps_its_reward_under_every_scale(backend, device):
    # Group 3 is a singleton: mean 0 and std 1 under every scale, so 4 / (1 + eps), or 4 with
    # "none"; it used to be divided by the batch std under "batch".
    rewards = torch.tensor([4.0, 1.0, 2.0, 6.0], dtype=torch.float64, device=device)
    ids = torch.tensor([3, 0, 0, 0], device=device)
    for scale, kept in (("group", 4 / (1 + 1e-6)), ("batch", 4 / (1 + 1e-6)), ("none", 4.0)):
        out = grpo_advantages(rewards, ids, scale=scale, backend=backend)
        close(out[:1], torch.tensor([kept], dtype=torch.float64))
        close(out, reference.grpo_advantages(rewards.cpu(), ids.cpu(), scale=scale))


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
def test_float64_eps_is_not_rounded_to_float32(backend, device):
    # float32(0.1) is 1.5e-9 above 0.1: an eps handed to a kernel as fp32 moves every float64
    # advantage by ~1e-8 relative, 4 orders above the 1e-12 tolerance. (The Triton interpreter
    # keeps Python floats exact, so on CPU only the sm_90 compile test sees the fp32 parameter.)
    rewards, ids = random_batch(60, seed=14)
    for scale in ("group", "batch"):
        out = grpo_advantages(rewards.to(device), ids.to(device), eps=0.1, scale=scale, backend=backend)
        close(out, reference.grpo_advantages(rewards, ids, eps=0.1, scale=scale))


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
def test_results_are_new_tensors_that_do_not_require_grad(backend, device):
    """The one contract of every backend: advantages and returns are constants of the policy
    gradient, new tensors (an in-place edit leaves the inputs alone) that never require grad."""
    rewards = torch.tensor([1.0, 2.0, 4.0, 3.0], dtype=torch.float64, device=device, requires_grad=True)
    ids = torch.tensor([0, 0, 1, 1], device=device)
    one_step_each = torch.arange(4, device=device)  # the doubling scan runs no step
    on_backend = dict(backend=backend)
    outputs = {
        "grpo": grpo_advantages(rewards, ids, **on_backend),
        "grpo none": grpo_advantages(rewards, ids, scale="none", **on_backend),
        "sum_then_normalize": multi_objective_advantages(rewards[:, None], ids, [1.0], **on_backend),
        "normalize_then_sum": multi_objective_advantages(rewards[:, None], ids, [1.0], mode="normalize_then_sum",
                                                         batch_normalize=False, **on_backend),
        "gigpo": gigpo_advantages(rewards, rewards, ids, ids, **on_backend),
        "discounted_returns": discounted_returns(rewards, one_step_each, 0.9),
    }
    before = rewards.detach().clone()
    for name, out in outputs.items():
        assert not out.requires_grad, name
        out.add_(100.0)
        assert torch.equal(rewards.detach(), before), name


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
def test_normalize_then_sum_batch_scale_is_per_objective(backend, device):
    # Each objective is divided by its own batch std, so scaling one objective by 100 changes
    # the result only through eps (1e-6 against stds ~0.3: < 1e-5 relative). Divided by the
    # std of all K * N values pooled, the x100 objective used to swamp the other.
    gen = torch.Generator().manual_seed(15)
    rewards = torch.rand(40, 2, generator=gen, dtype=torch.float64)
    ids = torch.arange(40) // 4
    options = dict(mode="normalize_then_sum", scale="batch", batch_normalize=False)
    out = multi_objective_advantages(rewards.to(device), ids.to(device), [1.0, 1.0], backend=backend, **options)
    rescaled = multi_objective_advantages((rewards * torch.tensor([100.0, 1.0], dtype=torch.float64)).to(device),
                                          ids.to(device), [1.0, 1.0], backend=backend, **options)
    close(rescaled, out.cpu(), rtol=1e-5, atol=1e-5)
    close(out, reference.multi_objective_advantages(rewards, ids, [1.0, 1.0], **options))


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
def test_multi_objective_rounds_once(backend, device):
    # Every step runs in float64 and only the result is rounded to bfloat16, so it equals the
    # rounded float64 reference exactly (the ~1e-15 float64 differences would have to land on
    # a bfloat16 rounding boundary to show). Per-objective advantages rounded to bfloat16
    # before their weighted sum used to differ from it by several bfloat16 ulps.
    gen = torch.Generator().manual_seed(16)
    rewards = torch.rand(48, 3, generator=gen).to(torch.bfloat16)
    ids = torch.arange(48) // 6
    weights = [1.0, 0.3, 2.0]
    for mode in ("sum_then_normalize", "normalize_then_sum"):
        out = multi_objective_advantages(rewards.to(device), ids.to(device), weights, mode=mode, backend=backend)
        expected = reference.multi_objective_advantages(rewards, ids, weights, mode=mode).to(torch.bfloat16)
        assert torch.equal(out.cpu(), expected), mode


def test_auto_backend_matches_torch():
    rewards, ids = random_batch(100, seed=7)
    for device in DEVICES:
        close(grpo_advantages(rewards.to(device), ids.to(device)), reference.grpo_advantages(rewards, ids))


# ---------------------------------------------------------------------- CRPO
def crpo_reference(rows, groups, weights, mode, eps=1e-6):
    """The two aggregations as the CRPO / TRL text states them, for NaN-free groups of >= 2."""
    def zscore(values, keys):
        members = {}
        for v, k in zip(values, keys):
            members.setdefault(k, []).append(v)
        return [(v - statistics.fmean(members[k])) / (statistics.stdev(members[k]) + eps)
                for v, k in zip(values, keys)]

    if mode == "sum_then_normalize":
        return torch.tensor(zscore([sum(w * v for w, v in zip(weights, row)) for row in rows], groups),
                            dtype=torch.float64)
    columns = [zscore([row[k] for row in rows], groups) for k in range(len(weights))]
    summed = [sum(w * column[i] for w, column in zip(weights, columns)) for i in range(len(rows))]
    return torch.tensor(zscore(summed, [0] * len(rows)), dtype=torch.float64)


@pytest.mark.parametrize("mode", ["sum_then_normalize", "normalize_then_sum"])
def test_crpo_convention(mode):
    rng = random.Random(8)
    # accuracy (0/1), faithfulness and comprehensiveness in [0, 1], format (0/1)
    rows = [[float(rng.random() < 0.5), rng.random(), rng.random(), float(rng.random() < 0.8)] for _ in range(30)]
    groups = [j // 5 * 11 - 20 for j in range(30)]
    weights = [10.0, 1.0, 1.0, 0.5]
    rewards = torch.tensor(rows, dtype=torch.float64)
    expected = crpo_reference(rows, groups, weights, mode)
    close(multi_objective_advantages(rewards, groups, weights, mode=mode), expected)
    close(reference.multi_objective_advantages(rewards, groups, weights, mode=mode), expected)


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
def test_crpo_backends_match_reference(backend, device):
    gen = torch.Generator().manual_seed(9)
    rewards = torch.rand(90, 3, generator=gen, dtype=torch.float64)
    rewards[torch.rand(90, 3, generator=gen) < 0.15] = math.nan
    rewards[5] = math.nan  # a row with no applicable objective
    ids = torch.randint(-3, 25, (90,), generator=gen)
    weights = torch.tensor([2.0, -0.5, 1.0], dtype=torch.float64)
    cases = [dict(mode="sum_then_normalize", scale=s) for s in ("group", "batch", "none")]
    cases += [dict(mode="normalize_then_sum", scale=s, batch_normalize=b) for s in ("group", "batch", "none")
              for b in (True, False)]
    cases += [dict(mode="normalize_then_sum", singleton="zero", eps=1e-4)]
    for options in cases:
        out = multi_objective_advantages(rewards.to(device), ids.to(device), weights.to(device),
                                         backend=backend, **options)
        expected = reference.multi_objective_advantages(rewards, ids, weights, **options)
        close(out, expected)
        assert out[5].item() == 0.0


# ---------------------------------------------------------------------- GiGPO
def agent_batch(seed, num_tasks=3, trajectories_per_task=4, gamma=0.9):
    """Rows of interleaved trajectories (step-major), states from a small set so they repeat."""
    rng = random.Random(seed)
    lengths = {(task, t): rng.randint(1, 6) for task in range(num_tasks) for t in range(trajectories_per_task)}
    rewards = {key: [rng.choice([0.0, 0.0, -0.1, 1.0]) for _ in range(n)] for key, n in lengths.items()}
    states = {key: [f"room{rng.randint(0, 2)}-{step % 3}" for step in range(n)] for key, n in lengths.items()}
    rows = []
    for step in range(max(lengths.values())):
        for (task, t), n in lengths.items():
            if step < n:
                rows.append((task, task * 100 + t, step, rewards[(task, t)][step], states[(task, t)][step]))
    group = [r[0] * 7 - 3 for r in rows]
    traj = [r[1] for r in rows]
    step_reward = [r[3] for r in rows]
    state = [r[4] for r in rows]
    episode = [sum(rewards[(r[0], r[1] - r[0] * 100)]) for r in rows]
    # Discounted returns written as the explicit sum, not the recurrence.
    step_return = [sum(gamma ** k * x for k, x in enumerate(rewards[(r[0], r[1] - r[0] * 100)][r[2]:]))
                   for r in rows]
    return dict(group=group, traj=traj, step_reward=step_reward, state=state, episode=episode,
                step_return=step_return, gamma=gamma)


def gigpo_reference(batch, mode, episode_stats, omega, eps=1e-6):
    """verl-agent GiGPO as described: episode level over rows or trajectories, step level over
    (group, identical state) with a singleton anchor group contributing 0."""
    def normalize(value, members, singleton_is_zero):
        if len(members) == 1 and singleton_is_zero:
            return 0.0
        mean, std = (0.0, 1.0) if len(members) == 1 else (statistics.fmean(members), statistics.stdev(members))
        return value - mean if mode == "mean_norm" else (value - mean) / (std + eps)

    by_group, by_anchor, seen = {}, {}, set()
    for g, t, e, s, x in zip(batch["group"], batch["traj"], batch["episode"], batch["state"], batch["step_return"]):
        if episode_stats == "rows" or t not in seen:
            by_group.setdefault(g, []).append(e)
            seen.add(t)
        by_anchor.setdefault((g, s), []).append(x)
    out = []
    for g, e, s, x in zip(batch["group"], batch["episode"], batch["state"], batch["step_return"]):
        episode_adv = normalize(e, by_group[g], singleton_is_zero=False)
        step_adv = normalize(x, by_anchor[(g, s)], singleton_is_zero=True)
        out.append(episode_adv + omega * step_adv)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("mode", ["mean_norm", "mean_std_norm"])
@pytest.mark.parametrize("episode_stats", ["rows", "trajectories"])
def test_gigpo_convention(mode, episode_stats):
    batch = agent_batch(seed=10)
    # A task with a single one-step trajectory: singleton episode group and anchor group.
    for key, value in dict(group=12345, traj=-1, step_reward=1.0, state="room0-0", episode=1.0,
                           step_return=1.0).items():
        batch[key].append(value)
    anchors = anchor_index_from_states(batch["state"], batch["group"])
    step_returns = discounted_returns(torch.tensor(batch["step_reward"], dtype=torch.float64), batch["traj"],
                                      batch["gamma"])
    close(step_returns, torch.tensor(batch["step_return"], dtype=torch.float64))
    args = (torch.tensor(batch["episode"], dtype=torch.float64), step_returns, batch["group"], anchors)
    traj = batch["traj"] if episode_stats == "trajectories" else None  # refused with "rows"
    options = dict(mode=mode, episode_stats=episode_stats, omega=0.7, traj_index=traj)
    expected = gigpo_reference(batch, mode, episode_stats, omega=0.7)
    close(gigpo_advantages(*args, **options), expected)
    close(reference.gigpo_advantages(*args, **options), expected)


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
def test_gigpo_backends_match_reference(backend, device):
    batch = agent_batch(seed=11, num_tasks=4, trajectories_per_task=5)
    anchors = anchor_index_from_states(batch["state"], batch["group"])
    args = [torch.tensor(batch["episode"], dtype=torch.float64),
            torch.tensor(batch["step_return"], dtype=torch.float64), torch.tensor(batch["group"]), anchors]
    traj = torch.tensor(batch["traj"])
    for mode in ("mean_norm", "mean_std_norm"):
        for episode_stats in ("rows", "trajectories"):
            options = dict(mode=mode, episode_stats=episode_stats, omega=1.3)
            rows_traj = traj if episode_stats == "trajectories" else None  # refused with "rows"
            out = gigpo_advantages(*[a.to(device) for a in args], backend=backend, **options,
                                   traj_index=None if rows_traj is None else rows_traj.to(device))
            close(out, reference.gigpo_advantages(*args, traj_index=rows_traj, **options))


# ---------------------------------------------------------------------- trajectories
@pytest.mark.parametrize("device", DEVICES)
def test_discounted_returns(device):
    gen = torch.Generator().manual_seed(12)
    traj = torch.randint(-4, 40, (300,), generator=gen) * 1_000_003  # interleaved, unsorted ids
    rewards = torch.randn(300, generator=gen, dtype=torch.float64)
    for gamma in (0.0, 0.95, 1.0):
        close(discounted_returns(rewards.to(device), traj.to(device), gamma),
              reference.discounted_returns(rewards, traj, gamma))
    # NaN stays inside its trajectory (earlier steps only).
    rewards = torch.tensor([1.0, 2.0, math.nan, 4.0, 8.0], dtype=torch.float32)
    out = discounted_returns(rewards.to(device), torch.tensor([0, 1, 0, 1, 1], device=device), 0.5).cpu()
    assert math.isnan(out[0]) and math.isnan(out[2])
    assert out[[1, 3, 4]].tolist() == [2 + 0.5 * 4 + 0.25 * 8, 4 + 0.5 * 8, 8]


def test_anchor_index_from_states():
    states = ["a", "b", "a", ("x", 1), "a", ("x", 1), torch.tensor([1, 2]), torch.tensor([1, 2]),
              torch.tensor([1.0, 2.0])]
    groups = [0, 0, 0, 0, 5, 5, 5, 5, 5]
    ids = anchor_index_from_states(states, torch.tensor(groups))
    assert ids.dtype == torch.long
    # first appearance numbering; same state in another group -> another id; tensors by content
    assert ids.tolist() == [0, 1, 0, 2, 3, 4, 5, 5, 6]


# ---------------------------------------------------------------------- broadcasting
def test_broadcast_to_tokens_and_padded():
    layout = GroupLayout.from_lengths([2, 1], [[2, 0, 1], [3]])
    values = torch.tensor([0.5, -1.0, 2.0, 3.0])
    # packed: p p c0 c0 c2 | p c3 c3 c3  (completion 1 is empty)
    assert broadcast_to_tokens(values, layout).tolist() == [0, 0, 0.5, 0.5, 2.0, 0, 3.0, 3.0, 3.0]
    padded, mask = broadcast_to_padded(values, layout)
    assert mask.tolist() == [[True, True, False], [False, False, False], [True, False, False], [True, True, True]]
    assert padded.tolist() == [[0.5, 0.5, 0], [0, 0, 0], [2.0, 0, 0], [3.0, 3.0, 3.0]]
    completion_mask = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0]])
    padded, mask = broadcast_to_padded(values, completion_mask)
    assert mask.dtype == torch.bool and padded[:, :3].tolist() == [[0.5, 0.5, 0], [0, 0, 0], [2.0, 0, 0],
                                                                   [3.0, 3.0, 3.0]]
    assert padded[:, 3].tolist() == [0, 0, 0, 0]


# ---------------------------------------------------------------------- CUDA op registration
@pytest.mark.skipif("cuda" not in available_backends("cuda"), reason="needs a GPU and the built extension")
def test_cuda_op_schema_and_fake_kernel():
    from prefix_grouper.advantages.cuda_impl import group_normalize_cuda
    from prefix_grouper.advantages.options import NormalizeOptions
    from prefix_grouper.advantages.grouping import Segments

    rewards, ids = random_batch(100, seed=13)
    rewards = rewards.cuda()
    segments = Segments(ids.cuda())
    options = NormalizeOptions(scale="group", eps=1e-6, unbiased=True, singleton_raw=True)
    group_normalize_cuda(rewards, segments, options, None)  # registers the fake kernel
    torch.library.opcheck(torch.ops.prefix_grouper.group_normalize,
                          (rewards, segments.perm, segments.offsets, None, 0, 1e-6, True, True))
    batch_scale = torch.full((segments.num_groups,), 2.0, dtype=torch.float64, device="cuda")
    torch.library.opcheck(torch.ops.prefix_grouper.group_normalize,
                          (rewards, segments.perm, segments.offsets, batch_scale, 1, 1e-6, True, True))
