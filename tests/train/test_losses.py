"""Hand-computed values (and gradients) for every policy loss, aggregation, KL estimator and off-policy
correction in `leagues.train.losses`, plus the micro-batch split invariance of the composed loss.

Legend: T tokens, S sequences.
"""

import math

import pytest
import torch

from leagues.train.losses import (
    AGGREGATIONS,
    KL_ESTIMATORS,
    OFF_POLICY_CORRECTIONS,
    POLICY_LOSSES,
    LossConfig,
    LossInputs,
    Normalizer,
    kl_penalty_rewards,
    mismatch_metrics,
    policy_loss,
)


def make_inputs(ratios, advantages, mask=None, seq_ids=None, logp=None, **extra) -> LossInputs:
    """Inputs whose ratio exp(logp - old) is `ratios` exactly (logp defaults to 0, so old = -log r)."""
    num_tokens = len(ratios)
    logp_T = torch.tensor(logp if logp is not None else [0.0] * num_tokens, dtype=torch.float64, requires_grad=True)
    old_T = logp_T.detach() - torch.tensor(ratios, dtype=torch.float64).log()
    seq_ids_T = torch.tensor(seq_ids if seq_ids is not None else [0] * num_tokens)
    return LossInputs(
        logprobs_T=logp_T,
        old_logprobs_T=old_T,
        advantages_T=torch.tensor(advantages, dtype=torch.float64),
        mask_T=torch.tensor(mask if mask is not None else [1.0] * num_tokens, dtype=torch.float64),
        seq_ids_T=seq_ids_T,
        num_seqs=int(seq_ids_T.max()) + 1,
        **extra,
    )


def loss_and_grad(name: str, inputs: LossInputs, cfg: LossConfig):
    """Per-token loss and d loss_t / d logp_t (each token's loss depends on its own logp only)."""
    loss_T, metrics = POLICY_LOSSES[name](inputs, cfg)
    (grad_T,) = torch.autograd.grad(loss_T.sum(), inputs.logprobs_T)
    return loss_T.detach(), grad_T, metrics


def close(actual, expected, tol=1e-6) -> None:
    torch.testing.assert_close(
        torch.as_tensor(actual, dtype=torch.float64), torch.tensor(expected, dtype=torch.float64), atol=tol, rtol=tol
    )


# ---------------------------------------------------------------------------------------------------
# policy losses


def test_ppo_clip_higher_values_and_gradients():
    # eps_low 0.2, eps_high 0.3: the ratio is clipped to [0.8, 1.3]
    cfg = LossConfig(eps_clip=0.2, eps_clip_high=0.3)
    ratios = [1.1, 1.5, 0.5, 0.5, 1.25, 1.25]
    advantages = [1.0, 1.0, 1.0, -1.0, -1.0, 1.0]
    loss_T, grad_T, metrics = loss_and_grad("ppo", make_inputs(ratios, advantages), cfg)
    # A>0 inside; A>0 above 1.3 (clipped); A>0 below 0.8 (pessimistic: unclipped); A<0 below 0.8 (clipped);
    # A<0 at 1.25 (unclipped, grows); A>0 at 1.25 (inside only thanks to clip-higher)
    close(loss_T, [-1.1, -1.3, -0.5, 0.8, 1.25, -1.25])
    close(grad_T, [-1.1, 0.0, -0.5, 0.0, 1.25, -1.25])  # d(-A r)/d logp = -A r; 0 where clipped
    close(metrics["policy/clip_frac"], 2 / 6)
    close(metrics["policy/ratio_mean"], sum(ratios) / 6)
    close(metrics["policy/ratio_max"], 1.5)


def test_ppo_symmetric_clip_clips_what_clip_higher_lets_through():
    loss_T, grad_T, _ = loss_and_grad("ppo", make_inputs([1.25], [1.0]), LossConfig(eps_clip=0.2))
    close(loss_T, [-1.2])
    close(grad_T, [0.0])


def test_ppo_dual_clip_caps_negative_advantages():
    cfg = LossConfig(eps_clip=0.2, eps_clip_c=3.0)
    ratios, advantages = [4.0, 2.0, 4.0, 0.5], [-1.0, -2.0, 1.0, -1.0]
    loss_T, grad_T, metrics = loss_and_grad("ppo", make_inputs(ratios, advantages), cfg)
    # A<0, r=4 > c: capped at -A c = 3 (no gradient); A<0, r=2 < c: -A r = 4; A>0: ordinary clip at 1.2;
    # A<0, r=0.5: ordinary clip at 0.8
    close(loss_T, [3.0, 4.0, -1.2, 0.8])
    close(grad_T, [0.0, 4.0, 0.0, 0.0])
    close(metrics["policy/dual_clip_frac"], 1 / 4)


def test_ppo_ignores_garbage_on_masked_tokens():
    inputs = make_inputs([1.0, 1.0], [1.0, 1.0], mask=[1.0, 0.0], logp=[0.0, 1e4])
    loss, _ = policy_loss(inputs, LossConfig(), Normalizer(num_tokens=1, num_seqs=1))
    (grad_T,) = torch.autograd.grad(loss, inputs.logprobs_T)
    assert torch.isfinite(loss) and torch.isfinite(grad_T).all()
    close(loss, -1.0)
    close(grad_T, [-1.0, 0.0])


def test_gspo_sequence_ratio_and_clipping():
    # seq 0: log-ratios 0.1, 0.3 (and a masked token with garbage) -> s = e^0.2 = 1.2214 > 1.2: clipped
    # seq 1: log-ratio -0.6 -> s = e^-0.6 = 0.5488 < 0.8, A > 0: pessimistic branch is unclipped
    ratios = [math.exp(0.1), math.exp(0.3), math.exp(5.0), math.exp(-0.6)]
    inputs = make_inputs(ratios, [1.0] * 4, mask=[1.0, 1.0, 0.0, 1.0], seq_ids=[0, 0, 0, 1])
    loss_T, grad_T, metrics = loss_and_grad("gspo", inputs, LossConfig(eps_clip=0.2))
    s1 = math.exp(-0.6)
    close(loss_T[[0, 1, 3]], [-1.2, -1.2, -s1])
    close(grad_T[[0, 1, 3]], [0.0, 0.0, -s1])
    close(metrics["policy/clip_frac"], 2 / 3)  # token-weighted: seq 0's two tokens are clipped
    close(metrics["policy/ratio_mean"], (2 * math.exp(0.2) + s1) / 3)


def test_gspo_gradient_matches_sequence_level_objective():
    """With constant advantages per sequence and no clipping, GSPO-token's gradient equals that of
    J = -mean_i A_i exp(mean_t (logp - old)) (seq_mean_token_mean)."""
    torch.manual_seed(0)
    seq_ids = [0, 0, 0, 1, 1, 2]
    inputs = make_inputs(
        (torch.rand(6) * 0.4 + 0.8).tolist(),
        [1.0, 1.0, 1.0, -2.0, -2.0, 0.5],
        seq_ids=seq_ids,
        logp=(-torch.rand(6)).tolist(),
    )
    cfg = LossConfig(policy_loss="gspo", eps_clip=0.9, aggregation="seq_mean_token_mean")
    loss, _ = policy_loss(inputs, cfg, Normalizer(num_tokens=6, num_seqs=3))
    (grad_T,) = torch.autograd.grad(loss, inputs.logprobs_T)

    logp_T = inputs.logprobs_T.detach().clone().requires_grad_(True)
    diff_T = logp_T - inputs.old_logprobs_T
    seq_ratio_S = torch.stack([diff_T[[0, 1, 2]].mean(), diff_T[[3, 4]].mean(), diff_T[[5]].mean()]).exp()
    reference = -(torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) * seq_ratio_S).mean()
    (ref_grad_T,) = torch.autograd.grad(reference, logp_T)
    close(loss, reference.item())
    close(grad_T, ref_grad_T.tolist())


def test_cispo_weight_clipped_and_gradient_only_through_logp():
    logp = [-1.0, -2.0, -0.5]
    inputs = make_inputs([1.5, 0.5, 1.0], [1.0, -1.0, 2.0], logp=logp)
    loss_T, grad_T, metrics = loss_and_grad("cispo", inputs, LossConfig(eps_clip=0.2))
    weights = [1.2, 0.8, 1.0]  # clip(r, 0.8, 1.2), detached
    close(loss_T, [-w * a * lp for w, a, lp in zip(weights, [1.0, -1.0, 2.0], logp, strict=True)])
    close(grad_T, [-1.2, 0.8, -2.0])  # -sg(w) A: clipped tokens keep their gradient
    close(metrics["policy/clip_frac"], 2 / 3)


def test_reinforce_has_no_ratio():
    inputs = make_inputs([3.0, 0.1], [2.0, -1.0], logp=[-0.5, -3.0])
    loss_T, grad_T, _ = loss_and_grad("reinforce", inputs, LossConfig())
    close(loss_T, [1.0, -3.0])
    close(grad_T, [-2.0, 1.0])


# ---------------------------------------------------------------------------------------------------
# aggregations


AGG_LOSS_T = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
AGG_MASK_T = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0, 1.0])
AGG_SEQ_IDS_T = torch.tensor([0, 0, 0, 1, 1, 2])
# masked sum 18 over 5 tokens and 3 sequences; per-sequence token means 1.5, 4.5, 6; constant = 3 seqs x 4
AGG_EXPECTED = {"token_mean": 18 / 5, "seq_mean_token_mean": 4.0, "seq_mean_token_sum": 6.0, "constant": 1.5}


def agg_inputs(sl: slice, seq_offset: int) -> LossInputs:
    seq_ids_T = AGG_SEQ_IDS_T[sl] - seq_offset
    zeros_T = torch.zeros_like(AGG_LOSS_T[sl])
    return LossInputs(
        logprobs_T=zeros_T,
        old_logprobs_T=zeros_T,
        advantages_T=zeros_T,
        mask_T=AGG_MASK_T[sl],
        seq_ids_T=seq_ids_T,
        num_seqs=int(seq_ids_T.max()) + 1,
    )


@pytest.mark.parametrize("name", sorted(AGGREGATIONS))
def test_aggregation_values_and_micro_batch_split(name):
    norm = Normalizer(num_tokens=5, num_seqs=3, constant=12.0)
    whole = AGGREGATIONS[name](AGG_LOSS_T, agg_inputs(slice(0, 6), 0), norm)
    close(whole, AGG_EXPECTED[name])
    # the same tokens as two micro-batches (seq 0 | seqs 1, 2), each with local seq ids, global counts
    first = AGGREGATIONS[name](AGG_LOSS_T[:3], agg_inputs(slice(0, 3), 0), norm)
    second = AGGREGATIONS[name](AGG_LOSS_T[3:], agg_inputs(slice(3, 6), 1), norm)
    close(first + second, AGG_EXPECTED[name])


def test_seq_mean_token_mean_uses_given_counts():
    norm = Normalizer(num_tokens=5, num_seqs=3, seq_num_tokens_T=torch.tensor([2.0, 2.0, 2.0, 2.0, 2.0, 1.0]))
    close(AGGREGATIONS["seq_mean_token_mean"](AGG_LOSS_T, agg_inputs(slice(0, 6), 0), norm), 4.0)


def random_batch(seed: int, num_tokens: int = 12) -> dict:
    gen = torch.Generator().manual_seed(seed)
    rand = lambda: torch.rand(num_tokens, generator=gen, dtype=torch.float64)  # noqa: E731
    return {
        "logp": -rand() * 2,
        "old": -rand() * 2,
        "rollout": -rand() * 2,
        "ref": -rand() * 2,
        "entropy": rand(),
        "adv": rand() * 2 - 1,
        "mask": (rand() > 0.3).double(),
        "seq_ids": torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 2, 3, 3, 3]),
    }


def batch_inputs(batch: dict, logp_T: torch.Tensor, sl: slice) -> LossInputs:
    seq_ids_T = batch["seq_ids"][sl] - batch["seq_ids"][sl][0]
    return LossInputs(
        logprobs_T=logp_T[sl],
        old_logprobs_T=batch["old"][sl],
        advantages_T=batch["adv"][sl],
        mask_T=batch["mask"][sl],
        seq_ids_T=seq_ids_T,
        num_seqs=int(seq_ids_T.max()) + 1,
        rollout_logprobs_T=batch["rollout"][sl],
        ref_logprobs_T=batch["ref"][sl],
        entropy_T=batch["entropy"][sl] * logp_T[sl].exp(),  # anything differentiable
    )


@pytest.mark.parametrize("aggregation", sorted(AGGREGATIONS))
@pytest.mark.parametrize("loss_name", sorted(POLICY_LOSSES))
def test_composed_loss_is_independent_of_micro_batch_split(loss_name, aggregation):
    batch = random_batch(seed=1)
    cfg = LossConfig(
        policy_loss=loss_name,
        aggregation=aggregation,
        kl_coef=0.1,
        entropy_coef=0.01,
        off_policy="token_tis",
        eps_clip_c=3.0,
    )
    norm = Normalizer(num_tokens=float(batch["mask"].sum()), num_seqs=4, constant=4 * 5.0)
    logp_T = batch["logp"].clone().requires_grad_(True)
    whole, _ = policy_loss(batch_inputs(batch, logp_T, slice(0, 12)), cfg, norm)
    (whole_grad_T,) = torch.autograd.grad(whole, logp_T)
    # split between sequences 1 and 2 (token 7)
    logp_T = batch["logp"].clone().requires_grad_(True)
    parts = [policy_loss(batch_inputs(batch, logp_T, sl), cfg, norm)[0] for sl in (slice(0, 7), slice(7, 12))]
    (split_grad_T,) = torch.autograd.grad(sum(parts), logp_T)
    close(sum(parts), whole.item(), tol=1e-10)
    close(split_grad_T, whole_grad_T.tolist(), tol=1e-10)


def test_composition_kl_entropy_and_weights():
    # reinforce, token MIS: token 1 (ratio 4) is dropped; KL k1 and entropy added per token
    inputs = make_inputs(
        [1.0, 1.0],
        [1.0, 1.0],
        logp=[-1.0, -1.0],
        rollout_logprobs_T=torch.tensor([-1.0 - math.log(1.5), -1.0 - math.log(4.0)], dtype=torch.float64),
        ref_logprobs_T=torch.tensor([-1.5, -1.5], dtype=torch.float64),
        entropy_T=torch.tensor([2.0, 2.0], dtype=torch.float64),
    )
    cfg = LossConfig(policy_loss="reinforce", off_policy="token_mis", kl_coef=0.1, kl_estimator="k1", entropy_coef=0.01)
    loss, metrics = policy_loss(inputs, cfg, Normalizer(num_tokens=2, num_seqs=1))
    # token 0: w = 1.5, pg = -A logp = 1, kl = 0.5, entropy 2 -> 1.5 + 0.05 - 0.02; token 1 dropped
    close(loss, (1.5 + 0.05 - 0.02) / 2)
    close(metrics["off_policy/masked_frac"], 0.5)
    close(metrics["kl/mean"], 0.5)
    assert "mismatch/kl_k3" in metrics


# ---------------------------------------------------------------------------------------------------
# KL estimators


def test_kl_estimators_known_values():
    logp_T, ref_T = torch.tensor([0.0]), torch.tensor([-math.log(2.0)])  # logp - ref = log 2
    log2 = math.log(2.0)
    close(KL_ESTIMATORS["k1"](logp_T, ref_T), [log2])
    close(KL_ESTIMATORS["k2"](logp_T, ref_T), [0.5 * log2**2])
    close(KL_ESTIMATORS["k3"](logp_T, ref_T), [0.5 + log2 - 1])
    close(KL_ESTIMATORS["low_var_kl"](logp_T, ref_T), [0.5 + log2 - 1])
    # k1 is negative where the policy is below the reference; k3 never
    close(KL_ESTIMATORS["k1"](ref_T, logp_T), [-log2])
    close(KL_ESTIMATORS["k3"](ref_T, logp_T), [2 - log2 - 1])


def test_low_var_kl_is_clamped():
    logp_T, ref_T = torch.tensor([-30.0, 0.0]), torch.tensor([0.0, -5.0])
    assert KL_ESTIMATORS["k3"](logp_T, ref_T)[0] > 1e12
    close(KL_ESTIMATORS["low_var_kl"](logp_T, ref_T), [10.0, math.exp(-5.0) + 4.0])


def test_k1_and_k3_are_unbiased_k2_and_k3_non_negative():
    torch.manual_seed(0)
    p_V, q_V = (
        torch.softmax(torch.randn(7, dtype=torch.float64), 0),
        torch.softmax(torch.randn(7, dtype=torch.float64), 0),
    )
    exact = (p_V * (p_V.log() - q_V.log())).sum()
    for name in ("k1", "k3"):  # the expectation under the policy p, taken exactly over the vocabulary
        close((p_V * KL_ESTIMATORS[name](p_V.log(), q_V.log())).sum(), exact.item())
    for name in ("k2", "k3", "low_var_kl"):
        assert (KL_ESTIMATORS[name](p_V.log(), q_V.log()) >= 0).all()


def test_kl_penalty_rewards():
    logp_T = torch.tensor([0.0, -1.0, 5.0], requires_grad=True)
    ref_T = torch.tensor([-0.5, -0.5, 0.0])
    rewards_T = kl_penalty_rewards(logp_T, ref_T, torch.tensor([1.0, 1.0, 0.0]), kl_coef=0.2)
    close(rewards_T, [-0.1, 0.1, 0.0])
    assert not rewards_T.requires_grad


# ---------------------------------------------------------------------------------------------------
# off-policy corrections and mismatch metrics


def correction_inputs() -> LossInputs:
    # old / rollout per token: seq 0: 3, 0.25 (+ a masked garbage token); seq 1: 1.5; seq 2: 1.8, 1.8
    ratios = torch.tensor([3.0, 0.25, math.exp(50.0), 1.5, 1.8, 1.8], dtype=torch.float64)
    old_T = torch.full((6,), -1.0, dtype=torch.float64)
    return LossInputs(
        logprobs_T=old_T.clone(),
        old_logprobs_T=old_T,
        advantages_T=torch.ones(6, dtype=torch.float64),
        mask_T=torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0, 1.0], dtype=torch.float64),
        seq_ids_T=torch.tensor([0, 0, 0, 1, 2, 2]),
        num_seqs=3,
        rollout_logprobs_T=old_T - ratios.log(),
    )


MASKED = [0, 1, 3, 4, 5]  # the mask tokens of correction_inputs()


@pytest.mark.parametrize(
    ("name", "weights", "keep"),
    [
        ("none", [1, 1, 1, 1, 1], [1, 1, 1, 1, 1]),
        ("token_tis", [2, 0.25, 1.5, 1.8, 1.8], [1, 1, 1, 1, 1]),  # min(r, C=2)
        ("token_mis", [0, 0, 1.5, 1.8, 1.8], [0, 0, 1, 1, 1]),  # r in [0.5, 2] kept with weight r
        ("seq_tis", [0.75, 0.75, 1.5, 2, 2], [1, 1, 1, 1, 1]),  # rho = 3 * 0.25, 1.5, 1.8 * 1.8 = 3.24 -> 2
        ("seq_mis", [0.75, 0.75, 1.5, 0, 0], [1, 1, 1, 0, 0]),  # seq 2 (rho 3.24) dropped
    ],
)
def test_off_policy_corrections(name, weights, keep):
    weight_T, keep_T, _ = OFF_POLICY_CORRECTIONS[name](correction_inputs(), LossConfig())
    close(weight_T[MASKED], weights)
    assert keep_T[MASKED].tolist() == [bool(k) for k in keep]
    assert not keep_T[2]
    assert not weight_T.requires_grad


def test_off_policy_metrics():
    inputs, cfg = correction_inputs(), LossConfig()
    close(OFF_POLICY_CORRECTIONS["token_tis"](inputs, cfg)[2]["off_policy/truncated_frac"], 1 / 5)
    close(OFF_POLICY_CORRECTIONS["token_mis"](inputs, cfg)[2]["off_policy/masked_frac"], 2 / 5)
    close(OFF_POLICY_CORRECTIONS["seq_mis"](inputs, cfg)[2]["off_policy/masked_frac"], 2 / 5)


def test_mismatch_metrics():
    old_T = torch.tensor([-1.0, -2.0, -0.5, -3.0])
    diff = [0.1, -0.3, 0.2]  # old - rollout on the mask tokens; the 4th token is masked garbage
    rollout_T = old_T - torch.tensor([*diff, 40.0])
    inputs = LossInputs(
        logprobs_T=old_T,
        old_logprobs_T=old_T,
        advantages_T=torch.zeros(4),
        mask_T=torch.tensor([1.0, 1.0, 1.0, 0.0]),
        seq_ids_T=torch.zeros(4, dtype=torch.long),
        num_seqs=1,
        rollout_logprobs_T=rollout_T,
    )
    metrics = mismatch_metrics(inputs)
    close(metrics["mismatch/abs_diff_mean"], 0.2, tol=1e-6)
    close(metrics["mismatch/abs_diff_max"], 0.3, tol=1e-6)
    close(metrics["mismatch/kl_k3"], sum(math.exp(d) - d - 1 for d in diff) / 3, tol=1e-6)


# ---------------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize("field", ["policy_loss", "aggregation", "kl_estimator", "off_policy"])
def test_unknown_registry_key_is_a_value_error(field):
    with pytest.raises(ValueError, match=rf"unknown {field} 'nope' \(known: .*\)"):
        LossConfig(**{field: "nope"})


def test_unknown_key_set_after_construction_fails_at_use():
    cfg = LossConfig()
    cfg.policy_loss = "nope"
    with pytest.raises(ValueError, match="cispo, gspo, ppo, reinforce"):
        policy_loss(make_inputs([1.0], [1.0]), cfg, Normalizer(num_tokens=1, num_seqs=1))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"eps_clip": 0.0},
        {"eps_clip_high": -0.1},
        {"eps_clip_c": 1.0},
        {"kl_coef": -1.0},
        {"tis_clip": 0.0},
        {"mis_lower": 3.0},
    ],
)
def test_bad_values_are_value_errors(kwargs):
    with pytest.raises(ValueError):
        LossConfig(**kwargs)


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        (LossConfig(kl_coef=0.1), "ref_logprobs_T"),
        (LossConfig(entropy_coef=0.1), "entropy_T"),
        (LossConfig(off_policy="seq_tis"), "rollout_logprobs_T"),
        (LossConfig(aggregation="constant"), "Normalizer.constant"),
    ],
)
def test_missing_inputs_are_value_errors(cfg, message):
    with pytest.raises(ValueError, match=message):
        policy_loss(make_inputs([1.0], [1.0]), cfg, Normalizer(num_tokens=1, num_seqs=1))


def test_empty_normalizer_is_a_value_error():
    with pytest.raises(ValueError, match="empty global batch"):
        Normalizer(num_tokens=0, num_seqs=1)
