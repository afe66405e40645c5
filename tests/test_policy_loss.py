"""policy_loss against TRL's GRPOTrainer formulas, written out token by token in float64."""
import math

import pytest
import torch

from prefix_grouper.trainers import LOSS_TYPES, policy_loss

EPS_LOW, EPS_HIGH, BETA = 0.2, 0.28, 0.04


def trl_loss(logp, old, adv, mask, ref, beta, loss_type, max_len, num_items):
    """TRL's compute_loss as plain Python loops over sequences and tokens."""
    n, s = len(logp), len(logp[0])
    per_token = [[0.0] * s for _ in range(n)]
    for i in range(n):
        for t in range(s):
            a = adv[i][t] if isinstance(adv[i], list) else adv[i]
            rho = math.exp(logp[i][t] - old[i][t])
            clipped = min(max(rho, 1 - EPS_LOW), 1 + EPS_HIGH)
            value = -min(rho * a, clipped * a)
            if beta:
                d = ref[i][t] - logp[i][t]
                value += beta * (math.exp(d) - d - 1)
            per_token[i][t] = value
    active = [sum(mask[i]) for i in range(n)]
    total = sum(per_token[i][t] for i in range(n) for t in range(s) if mask[i][t])
    if loss_type == "grpo":
        return sum(sum(per_token[i][t] for t in range(s) if mask[i][t]) / max(active[i], 1) for i in range(n)) / n
    if loss_type == "bnpo":
        return total / max(sum(active), 1)
    if loss_type == "dr_grpo":
        return total / (n * (s if max_len is None else max_len))
    return total / (max(sum(active), 1) if num_items is None else num_items)


def batch(generator, per_token_advantages):
    n, s = 5, 7
    logp = -torch.rand(n, s, generator=generator, dtype=torch.float64) * 3
    old = logp + 0.6 * torch.randn(n, s, generator=generator, dtype=torch.float64)  # rho far outside [0.8, 1.28]
    ref = logp + 0.3 * torch.randn(n, s, generator=generator, dtype=torch.float64)
    shape = (n, s) if per_token_advantages else (n,)
    # Both signs on the long rows, so both clip sides occur.
    signs = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0], dtype=torch.float64).view(n, *[1] * (len(shape) - 1))
    adv = torch.rand(*shape, generator=generator, dtype=torch.float64).add(0.1) * signs
    if per_token_advantages:
        adv[0, :2] *= -1
    lengths = torch.tensor([7, 3, 1, 0, 5])  # ragged, one empty completion
    mask = torch.arange(s)[None] < lengths[:, None]
    return logp, old, adv, mask, ref


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("beta", [0.0, BETA])
@pytest.mark.parametrize("per_token_advantages", [False, True])
@pytest.mark.parametrize("normalizer", [None, 11])
def test_matches_trl_formulas_and_gradient(generator, loss_type, beta, per_token_advantages, normalizer):
    logp, old, adv, mask, ref = batch(generator, per_token_advantages)
    extra = {"dr_grpo": {"max_completion_length": normalizer}, "dapo": {"num_items_in_batch": normalizer}}
    kwargs = extra.get(loss_type, {})
    logp.requires_grad_(True)
    loss, stats = policy_loss(logp, old, adv, mask, loss_type=loss_type, epsilon_low=EPS_LOW,
                              epsilon_high=EPS_HIGH, ref_log_probs=ref if beta else None, beta=beta, **kwargs)
    expected = trl_loss(logp.tolist(), old.tolist(), adv.tolist(), mask.tolist(), ref.tolist(), beta,
                        loss_type, kwargs.get("max_completion_length"), kwargs.get("num_items_in_batch"))
    # fp64 throughout; the two sides only sum in different orders (a few ulp).
    assert abs(loss.item() - expected) <= 1e-12 * max(1.0, abs(expected))

    # Gradient of the written-out formula by central differences on a few tokens.
    loss.backward()
    h = 1e-6
    for i, t in [(0, 0), (0, 6), (1, 2), (2, 0), (4, 4), (3, 1)]:
        plus, minus = logp.detach().clone(), logp.detach().clone()
        plus[i, t] += h
        minus[i, t] -= h
        args = (old.tolist(), adv.tolist(), mask.tolist(), ref.tolist(), beta, loss_type,
                kwargs.get("max_completion_length"), kwargs.get("num_items_in_batch"))
        numeric = (trl_loss(plus.tolist(), *args) - trl_loss(minus.tolist(), *args)) / (2 * h)
        # Central differences of a piecewise-smooth function: O(h^2) truncation plus
        # O(1e-16 / h) rounding, so 1e-7 absolute; no token sits at a clip boundary.
        assert abs(logp.grad[i, t].item() - numeric) <= 1e-7, (i, t)

    # Statistics, TRL's definitions: token means over the mask.
    rho = torch.exp(logp.detach() - old)
    a = adv if per_token_advantages else adv[:, None].expand_as(rho)
    low = ((rho < 1 - EPS_LOW) & (a < 0))[mask].double().mean()
    high = ((rho > 1 + EPS_HIGH) & (a > 0))[mask].double().mean()
    torch.testing.assert_close(stats["clip_frac_low"], low, rtol=0, atol=1e-15)
    torch.testing.assert_close(stats["clip_frac_high"], high, rtol=0, atol=1e-15)
    torch.testing.assert_close(stats["clip_frac"], low + high, rtol=0, atol=1e-15)
    torch.testing.assert_close(stats["ratio"], rho[mask].mean(), rtol=1e-14, atol=0)
    kl_to = ref if beta else old
    d = kl_to - logp.detach()
    torch.testing.assert_close(stats["kl"], (torch.exp(d) - d - 1)[mask].mean(), rtol=1e-14, atol=0)
    assert 0 < low < 1 and 0 < high < 1  # the batch exercises both clip sides


def test_old_log_probs_none_is_a_single_update(generator):
    logp, _, adv, mask, _ = batch(generator, False)
    logp.requires_grad_(True)
    loss, stats = policy_loss(logp, None, adv, mask, loss_type="bnpo")
    loss.backward()
    # rho = 1: the loss is -mean(A) over active tokens and its gradient is -A / active tokens.
    expected = -(adv[:, None].expand_as(logp) * mask).sum() / mask.sum()
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-14, atol=0)
    torch.testing.assert_close(logp.grad, -adv[:, None] * mask / mask.sum(), rtol=1e-14, atol=0)
    assert stats["clip_frac"] == 0 and stats["ratio"] == 1 and stats["kl"] == 0


def short(x):
    return x[:, :3]


@pytest.mark.parametrize("edit, error, match", [
    (dict(loss_type="sum"), ValueError, "loss_type"),
    (dict(beta=0.1), ValueError, "ref_log_probs"),
    (dict(beta=-0.1, ref_log_probs=lambda b: b["ref"]), ValueError, "beta"),
    (dict(mask=lambda b: b["mask"].int()), TypeError, "mask must be a bool"),
    (dict(mask=lambda b: short(b["mask"])), ValueError, "mask must be"),
    (dict(old=lambda b: short(b["old"])), ValueError, "old_log_probs must have the shape"),
    (dict(beta=0.1, ref_log_probs=lambda b: short(b["ref"])), ValueError, "ref_log_probs must have the shape"),
    (dict(adv=lambda b: b["adv"][:3]), ValueError, "advantages must be"),
    (dict(logp=lambda b: b["logp"][0]), ValueError, "log_probs must be"),
    (dict(loss_type="dapo", num_items_in_batch=-1), ValueError, "num_items_in_batch"),
    (dict(loss_type="dapo", num_items_in_batch=float("inf")), ValueError, "num_items_in_batch"),
    (dict(loss_type="dr_grpo", max_completion_length=-1), ValueError, "max_completion_length"),
    (dict(epsilon_low=-0.1), ValueError, r"epsilon_low must be in \[0, 1\]"),
    (dict(epsilon_low=1.5), ValueError, r"epsilon_low must be in \[0, 1\]"),
    (dict(epsilon_high=-0.1), ValueError, "epsilon_high must be >= 0"),
    (dict(epsilon_high=float("nan")), ValueError, "epsilon_high"),
])
def test_errors(generator, edit, error, match):
    values = dict(zip(("logp", "old", "adv", "mask", "ref"), batch(generator, False)))
    kwargs = {}
    for key, value in edit.items():
        value = value(values) if callable(value) else value
        if key in values:
            values[key] = value
        else:
            kwargs[key] = value
    with pytest.raises(error, match=match):
        policy_loss(values["logp"], values["old"], values["adv"], values["mask"], **kwargs)


@pytest.mark.parametrize("num_items", [0, 0.5, torch.tensor(0)])
def test_dapo_clamps_num_items_in_batch_to_one_as_trl_does(generator, num_items):
    logp, old, adv, mask, _ = batch(generator, False)
    loss, _ = policy_loss(logp, old, adv, mask, loss_type="dapo", num_items_in_batch=num_items, epsilon_low=EPS_LOW,
                          epsilon_high=EPS_HIGH)
    expected = trl_loss(logp.tolist(), old.tolist(), adv.tolist(), mask.tolist(), None, 0.0, "dapo", None, 1)
    assert abs(loss.item() - expected) <= 1e-12 * max(1.0, abs(expected))


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("shape", [(3, 4), (0, 4), (3, 0), (0, 0)], ids=str)
def test_a_batch_without_tokens_gives_zero_loss_and_zero_statistics(loss_type, shape):
    logp = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    loss, stats = policy_loss(logp, logp.detach() + 0.5, torch.ones(shape[0], dtype=torch.float64),
                              torch.zeros(shape, dtype=torch.bool), loss_type=loss_type, num_items_in_batch=0)
    assert loss.item() == 0.0 and not math.isnan(loss.item())
    loss.backward()
    assert logp.grad is not None and torch.equal(logp.grad, torch.zeros_like(logp))
    assert all(value.item() == 0.0 for value in stats.values()), stats


def test_half_precision_inputs_are_computed_in_float32(generator):
    """A bf16 model's log-probs and float64 advantages: the loss is float32 and equals the
    float32 computation (casting the advantages to bf16 would round them to 8 bits)."""
    logp, old, adv, mask, _ = batch(generator, False)
    adv = adv * 1.001  # not representable in bf16
    loss, _ = policy_loss(logp.bfloat16(), old.bfloat16(), adv, mask, loss_type="bnpo")
    want, _ = policy_loss(logp.bfloat16().float(), old.bfloat16().float(), adv.float(), mask, loss_type="bnpo")
    assert loss.dtype == torch.float32
    assert loss.item() == want.item()


def test_micro_batch_shares_follow_each_loss_types_normalizer():
    from prefix_grouper.trainers.loss import LOSS_NORMALIZERS, micro_batch_share

    assert set(LOSS_NORMALIZERS) == set(LOSS_TYPES)
    assert micro_batch_share("grpo", 2, 10, 8, 20) == micro_batch_share("dr_grpo", 2, 10, 8, 20) == 0.25
    assert micro_batch_share("bnpo", 2, 10, 8, 20) == 0.5
    assert micro_batch_share("dapo", 2, 10, 8, 20) == 1.0
    with pytest.raises(ValueError, match="loss_type"):
        micro_batch_share("sum", 2, 10, 8, 20)
