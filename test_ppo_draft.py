"""
Tests of ppo.py's KL estimators, reward normalisation, samples per prompt and minibatch layouts, each against an
independent computation: exact expectations over every action of small tabular policies (autograd on the closed
form where a gradient is claimed), statistics of concatenated batches, and the script end to end.
`python -m pytest -q test_ppo_draft.py`.
"""
import copy
import json
import math
import random

import pytest
import torch

import gpt
import ppo
import sft
from gpt import UserError
from test_all import corpus, fine_tuned, pretrained, reward_trained  # noqa: F401 (the fixtures the script test uses)
from test_all import CPU, last_json_line, run_script, stage_dir
from test_all import seeded_model


def tabular(V=6, seed=0):
    """A random categorical policy (logits with gradient) and a reference: log pi, log pi_ref, both (V,)."""
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(V, generator=g).requires_grad_()
    return theta, torch.log_softmax(torch.randn(V, generator=g), 0)


def exact_kl(logp, ref_logp):
    return (logp.exp() * (logp - ref_logp)).sum()


@pytest.mark.parametrize("estimator", ["k1", "k3", "exact"])
def test_kl_estimators_are_unbiased_for_the_exact_kl(estimator):
    """E_{a ~ pi}[k(a)] = KL(pi || pi_ref) for k1 and k3 (the expectation taken exactly, over every action);
    k3 is never negative; exact is the sum itself, per state."""
    V = 7
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(1))
    ref = torch.randn(3, V, generator=torch.Generator().manual_seed(2))
    logp, ref_logp = torch.log_softmax(logits, -1), torch.log_softmax(ref, -1)
    want = (logp.exp() * (logp - ref_logp)).sum(-1)                               # (3,)
    a = torch.arange(V).expand(3, V)                                              # every action of every state
    k = ppo.kl_estimate(estimator, logp.gather(-1, a), ref_logp.gather(-1, a), logp[:, None].expand(3, V, V),
                        ref_logp[:, None].expand(3, V, V))                        # (3, V): k(a) per state
    assert torch.allclose((logp.exp() * k).sum(-1), want, atol=1e-6)
    if estimator == "k3":
        assert (k >= 0).all()


def expected_grad(loss_of_theta, theta):
    theta.grad = None
    loss_of_theta().backward()
    return theta.grad.clone()


def test_shaping_estimators_policy_gradient_against_the_kl_gradient():
    """KL_t in the shaped reward enters the policy gradient as E_{a ~ pi}[grad log pi(a) * (-beta KL_t(a))]
    (the reward a constant). With k1 that is -beta grad KL(pi || pi_ref) exactly; with k3 it is
    -beta (grad KL(pi || pi_ref) - grad KL(pi_ref || pi)), which vanishes to second order at pi = pi_ref."""
    theta, ref_logp = tabular()

    def score_function(estimator):
        logp = torch.log_softmax(theta, 0)
        k = ppo.kl_estimate(estimator, logp, ref_logp).detach()
        return -(logp.exp().detach() * logp * k).sum()          # the surrogate sum_a pi(a) log pi(a) A(a), A = -k

    forward = expected_grad(lambda: exact_kl(torch.log_softmax(theta, 0), ref_logp), theta)
    reverse = expected_grad(lambda: exact_kl(ref_logp, torch.log_softmax(theta, 0)), theta)
    assert torch.allclose(expected_grad(lambda: score_function("k1"), theta), -forward, atol=1e-6)
    assert torch.allclose(expected_grad(lambda: score_function("k3"), theta), -(forward - reverse), atol=1e-6)
    # near the reference the k3 reward hardly pulls back: at pi = pi_ref + small, its gradient is second order
    near = (ref_logp + 0.01 * torch.randn(6, generator=torch.Generator().manual_seed(3))).requires_grad_()
    theta.data.copy_(near.data)
    g_k3 = expected_grad(lambda: score_function("k3"), theta).norm()
    g_kl = expected_grad(lambda: exact_kl(torch.log_softmax(theta, 0), ref_logp), theta).norm()
    assert g_k3 < 0.05 * g_kl


@pytest.mark.parametrize("estimator", ["k1", "k3", "exact"])
def test_kl_loss_gradient_at_theta_old_is_the_exact_kl_gradient(estimator):
    """PPO-KL's penalty on tokens drawn from pi_old (taken exactly: the mask weights each action by pi_old(a)),
    at theta = theta_old: its value is KL(pi || pi_ref) and its gradient grad KL(pi || pi_ref), for every
    estimator (k1 and k3 through the ratio o = pi / pi_old)."""
    theta, ref_logp = tabular(seed=4)
    V = theta.numel()

    def penalty():
        logp = torch.log_softmax(theta, 0)
        old = logp.detach()
        return ppo.kl_loss(estimator, logp[None], old[None], ref_logp[None], logp[None, None].expand(1, V, V),
                           ref_logp[None, None].expand(1, V, V), old.exp()[None])

    want = expected_grad(lambda: exact_kl(torch.log_softmax(theta, 0), ref_logp), theta)
    assert torch.allclose(penalty(), exact_kl(torch.log_softmax(theta, 0), ref_logp), atol=1e-6)
    assert torch.allclose(expected_grad(penalty, theta), want, atol=1e-6)


def test_kl_loss_without_the_ratio_would_be_wrong():
    """Why k1 and k3 carry o = pi / pi_old in the loss: without it, at theta = theta_old, k1's expected gradient
    is zero and k3's is that of the reverse KL(pi_ref || pi) (what GRPO's k3 term optimises)."""
    theta, ref_logp = tabular(seed=5)

    def plain(estimator):
        logp = torch.log_softmax(theta, 0)
        return (logp.exp().detach() * ppo.kl_estimate(estimator, logp, ref_logp)).sum()

    reverse = expected_grad(lambda: exact_kl(ref_logp, torch.log_softmax(theta, 0)), theta)
    assert torch.allclose(expected_grad(lambda: plain("k1"), theta), torch.zeros(6), atol=1e-6)
    assert torch.allclose(expected_grad(lambda: plain("k3"), theta), reverse, atol=1e-6)


def two_step_tree(V=4, seed=0):
    """A tabular two-token episode: pi(a0), pi(a1 | a0) from logits with gradient, a reference, and every one of
    the V^2 sequences with its probability. Returns theta0 (V,), theta1 (V, V), the reference's log-probs and a
    function giving, per sequence (V^2, 2), log pi of the sampled tokens, the full distributions and weights."""
    g = torch.Generator().manual_seed(seed)
    theta0, theta1 = torch.randn(V, generator=g).requires_grad_(), torch.randn(V, V, generator=g).requires_grad_()
    ref0, ref1 = torch.log_softmax(torch.randn(V, generator=g), 0), torch.log_softmax(torch.randn(V, V, generator=g), 1)
    a0, a1 = torch.arange(V).repeat_interleave(V), torch.arange(V).repeat(V)     # all sequences (a0, a1)

    def unroll():
        l0, l1 = torch.log_softmax(theta0, 0), torch.log_softmax(theta1, 1)
        dist = torch.stack([l0.expand(V * V, V), l1[a0]], 1)                      # (V^2, 2, V)
        ref_dist = torch.stack([ref0.expand(V * V, V), ref1[a0]], 1)
        logp = torch.stack([l0[a0], l1[a0, a1]], 1)                               # (V^2, 2)
        ref_logp = torch.stack([ref0[a0], ref1[a0, a1]], 1)
        w = logp.sum(1).exp().detach()                                            # P(sequence) under pi_old = pi
        return logp, ref_logp, dist, ref_dist, w

    return theta0, theta1, unroll


@pytest.mark.parametrize("estimator", ["k1", "exact"])
def test_kl_shaping_gives_the_gradient_of_the_sequence_kl(estimator):
    """Notes 10.5: with only the KL in the reward (R = 0), the expected PPO update at theta = theta_old (ratio 1,
    GAE with gamma = lam = 1 and V = 0, no whitening) is -beta grad KL(pi(y) || pi_ref(y)) over whole sequences.
    k1 gets there through the policy gradient alone; the exact per-state KL through the policy gradient (how a0
    changes the KL at the second state) plus ppo.py's direct term beta E_t[KL(pi(.|s_t) || pi_ref)]."""
    beta = 0.3
    theta0, theta1, unroll = two_step_tree()

    def objective():
        logp, ref_logp, dist, ref_dist, w = unroll()
        kl_t = ppo.kl_estimate(estimator, logp, ref_logp, dist, ref_dist).detach()
        dones = torch.tensor([[0.0, 1.0]]).expand_as(kl_t)
        adv, _ = ppo.gae(-beta * kl_t, torch.zeros_like(kl_t), dones, 1.0, 1.0)
        mask = w[:, None].expand_as(kl_t)                    # each token weighted by its sequence's probability
        loss, _ = ppo.clipped_surrogate(logp, logp.detach(), adv, mask, 0.2)
        if estimator == "exact":
            loss = loss + beta * ppo.kl_loss(estimator, logp, logp.detach(), ref_logp, dist, ref_dist, mask)
        return loss

    def sequence_kl():
        logp, ref_logp, _, _, _ = unroll()
        return (logp.sum(1).exp() * (logp - ref_logp).sum(1)).sum()

    got = [g.clone() for g in torch.autograd.grad(objective(), (theta0, theta1))]
    want = torch.autograd.grad(sequence_kl(), (theta0, theta1))
    for a, b in zip(got, want):   # the loss is a mean over the 2 tokens of each sequence: beta KL / 2
        assert torch.allclose(a, beta * b / 2, atol=1e-6), (a, beta * b / 2)


def test_gae_is_linear_in_rewards_and_values():
    """What rollout() logs as adv_R, adv_kl and adv_V adds up to the advantages: GAE is linear."""
    g = torch.Generator().manual_seed(0)
    r1, r2, v = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    dones = (torch.rand(4, 6, generator=g) < 0.3).float()
    dones[:, -1] = 1
    whole, _ = ppo.gae(r1 + r2, v, dones, 0.9, 0.8)
    zero = torch.zeros_like(v)
    parts = sum(ppo.gae(r, value, dones, 0.9, 0.8)[0] for r, value in ((r1, zero), (r2, zero), (zero, v)))
    assert torch.allclose(whole, parts, atol=1e-5)


def test_running_moments_equal_the_statistics_of_the_concatenation():
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(n, generator=g) * 3 + 1 for n in (5, 1, 17, 64)]
    m = ppo.RunningMoments()
    for i, b in enumerate(batches):
        m.update(b)
        seen = torch.cat(batches[:i + 1])
        assert math.isclose(m.mean, seen.mean().item(), rel_tol=1e-5, abs_tol=1e-6)
        if seen.numel() > 1:
            assert math.isclose(m.std, seen.std().item(), rel_tol=1e-5)
    resumed = ppo.RunningMoments(m.state())              # what a resumed run continues from
    assert (resumed.n, resumed.mean, resumed.m2) == (m.n, m.mean, m.m2)


def test_normalise_rewards_each_mode():
    g = torch.Generator().manual_seed(0)
    ref_R, R = torch.rand(256, generator=g), torch.rand(64, generator=g) * 0.1 + 0.9
    ref = ppo.RunningMoments()
    ref.update(ref_R)
    assert torch.equal(ppo.normalise_rewards(R, "none", ref, ppo.RunningMoments(ref.state())), R)
    assert torch.allclose(ppo.normalise_rewards(R, "ref", ref, None), (R - ref_R.mean()) / ref_R.std(), atol=1e-5)
    b = ppo.normalise_rewards(R, "batch", ref, None)
    assert abs(b.mean().item()) < 1e-5 and abs(b.std().item() - 1) < 1e-4
    running = ppo.RunningMoments(ref.state())
    seen = torch.cat([ref_R, R])
    assert torch.allclose(ppo.normalise_rewards(R, "running", ref, running), (R - seen.mean()) / seen.std(), atol=1e-5)
    assert running.n == 320
    # a nearly constant batch: batch whitening blows its differences up to unit spread, ref keeps them small
    assert b.std() > 5 * ppo.normalise_rewards(R, "ref", ref, None).std()


def test_minibatch_parts_partition_tokens_or_whole_responses():
    resp = torch.ones(9, 5, dtype=torch.bool)
    seq = ppo.minibatch_parts(resp, 4, "sequences", torch.Generator().manual_seed(0))
    assert (seq == seq[:, :1]).all()                                   # a response stays in one minibatch
    sizes = torch.bincount(seq[:, 0], minlength=4)
    assert sizes.max() - sizes.min() <= 1 and sizes.sum() == 9
    tok = ppo.minibatch_parts(resp, 3, "tokens", torch.Generator().manual_seed(0))
    assert tok.min() >= 0 and tok.max() <= 2 and not (tok == tok[:, :1]).all()


@pytest.mark.parametrize("make, words", [
    (lambda: ppo.PPOConfig(kl_estimator="k2"), "kl_estimator="),
    (lambda: ppo.PPOConfig(reward_norm="whiten"), "reward_norm="),
    (lambda: ppo.PPOConfig(samples_per_prompt=0), "samples_per_prompt"),
    (lambda: ppo.PPOConfig(minibatch="rows"), "minibatch=")])
def test_new_ppo_options_reject_bad_values(make, words):
    with pytest.raises(UserError, match=words):
        make()


def test_shaping_exact_adds_the_direct_kl_term_to_the_loss():
    """ppo_loss with kl_mode shaping and the exact estimator adds beta * E_t[KL(pi(.|s_t) || pi_ref)] (and k1 does
    not): at the first inner step, the loss differs from beta = 0's by exactly that."""
    policy = seeded_model(0, block_size=32)
    model = ppo.ActorCritic(policy, ppo.Critic(seeded_model(1, block_size=32)))
    ref = seeded_model(2, block_size=32).requires_grad_(False)
    task = sft.TaskConfig(heldout=8)
    prompts = sft.sample_prompts(task, 5, random.Random(0))
    score = lambda ps, ys: (torch.tensor(sft.true_rewards(ps, ys)), {})  # noqa: E731
    for estimator in ("exact", "k1"):
        cfg = ppo.PPOConfig(reward="true", kl_estimator=estimator)
        batch, _ = ppo.rollout(model, ref, task, prompts, score, cfg, 0.0, torch.Generator().manual_seed(0))
        resp = batch["resp"].bool()
        with torch.no_grad():
            with_kl, stats = ppo.ppo_loss(model, batch, resp, cfg, 0.5)
            without, _ = ppo.ppo_loss(model, batch, resp, cfg, 0.0)
            logits, _ = model(batch["ids"])
            _, dist = gpt.shifted_logprobs(logits, batch["ids"], batch["resp"])
            kl = ppo.masked_mean(ppo.kl_full(dist, batch["ref_dist"]), resp.float())
        if estimator == "exact":
            assert kl > 0 and torch.allclose(with_kl - without, 0.5 * kl, atol=1e-6)
            assert math.isclose(stats["kl_loss"], kl.item(), rel_tol=1e-5)
        else:
            assert with_kl == without and "kl_loss" not in stats


def test_rollout_with_normalised_rewards_and_several_samples_per_prompt():
    """The terminal reward R enters GAE after normalise(); samples of one prompt are separate episodes."""
    policy = seeded_model(0, block_size=32)
    model = ppo.ActorCritic(policy, ppo.Critic(seeded_model(1, block_size=32)))
    ref = copy.deepcopy(policy).requires_grad_(False)
    cfg = ppo.PPOConfig(reward="true", gamma=1.0, lam=1.0, whiten_adv=False)
    prompts = [p for p in [(12, 34), (5, 678)] for _ in range(3)]
    R = torch.tensor([0.3, -1.0, 2.0, 0.5, 0.0, 1.0])
    batch, stats = ppo.rollout(model, ref, sft.TaskConfig(), prompts, lambda ps, ys: (R, {}), cfg, 0.1,
                               torch.Generator().manual_seed(1), normalise=lambda r: (r - 1.0) / 2.0)
    resp = batch["resp"].bool()
    want = ((R - 1.0) / 2.0)[:, None].expand_as(resp)
    assert torch.allclose(batch["returns"][resp], want[resp], atol=1e-5)   # KL_t = 0 at the start: G_t = R'
    assert math.isclose(stats["R_std"], ((R - 1.0) / 2.0).std().item(), rel_tol=1e-5)


@pytest.mark.parametrize("flags", [["--reward_norm", "running", "--samples_per_prompt", "2", "--kl_estimator", "k3",
                                    "--kl_mode", "loss", "--minibatch", "sequences"],
                                   ["--reward_norm", "batch", "--kl_estimator", "exact", "--reward", "true"]])
def test_ppo_script_with_the_new_options(tmp_path, fine_tuned, reward_trained, flags):  # noqa: F811
    out = stage_dir(tmp_path, fine_tuned[1] / "sft.pt", reward_trained[1] / "reward.pt")
    r = run_script(["ppo.py", "--out_dir", str(out), "--max_steps", "4", "--eval_interval", "4", "--batch_size", "3",
                    "--epochs", "2", "--minibatches", "2", "--heldout", "8", *CPU, *flags], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    metrics = json.loads((out / "ppo_metrics.json").read_text())
    assert last_json_line(r) == metrics and metrics["steps"] == 4
    assert metrics["train_seconds"] > 0 and 0 <= metrics["after"]["sample_accuracy"] <= 1
    ckpt = gpt.load_checkpoint(str(out / "ppo.pt"))
    assert ckpt["finished"] and ckpt["ppo"]["reward_norm"] == flags[1]
    assert "reward_moments" in ckpt["state"]
