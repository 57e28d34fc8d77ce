"""
Tests for the DPO additions (the RPO term, the collapse diagnostics) and the GRPO family (mu updates per
rollout, the loss aggregations, clip-higher, reward scaling, the clip metrics), each against an independent
computation: `python -m pytest -q test_align_draft.py`. Written to be folded into test_all.py, sections 6 and 7
(the end-to-end test uses test_all.py's fixtures).
"""
import copy
import math
import random
import statistics

import pytest
import torch

import dpo
import gpro
import gpt
import sft
from gpt import EOS, GPT, GPTConfig, UserError
from test_all import CPU, corpus, fine_tuned, last_json_line, pretrained, run_script, stage_dir  # noqa: F401


def tiny_policy(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32)).eval()


# =============================================================================================
# dpo.py: RPO's NLL term, the diagnostics

def test_rpo_term_is_the_sft_loss_of_the_chosen_responses():
    """L = L_DPO + alpha * NLL(y+) per token (Pang et al. 2024): the added term is exactly sft.py's prompt-masked
    SFT loss on the chosen responses (an independent path: sft.pack + sft.sft_loss), value and gradient."""
    model = tiny_policy()
    comparisons = [((12, 34), [gpt.encode("46"), gpt.encode("47")], [1.0, 0.5]),
                   ((5, 6), [gpt.encode("11"), gpt.encode("1")], [1.0, 0.5]),
                   ((99, 1), [gpt.encode("100"), gpt.encode("90")], [1.0, 0.0])]
    with torch.no_grad():
        ref = dpo.response_logps(model, comparisons, "cpu")
    n_chosen = torch.tensor([len(ys[0]) + 1 for _, ys, _ in comparisons])
    cfg, plain = dpo.DPOConfig(rpo_alpha=0.7), dpo.DPOConfig()
    loss, stats = dpo.preference_step(dpo.response_logps(model, comparisons, "cpu"), ref, cfg, n_chosen)
    base, _ = dpo.preference_step(dpo.response_logps(model, comparisons, "cpu"), ref, plain, n_chosen)
    ids, target = sft.pack([p for p, _, _ in comparisons], [ys[0] for _, ys, _ in comparisons])
    nll = sft.sft_loss(model, ids, target)
    assert math.isclose(base.item(), math.log(2), rel_tol=1e-6)  # pi = pi_ref: the DPO part is ln 2
    assert torch.allclose(loss, base + 0.7 * nll, atol=1e-6) and math.isclose(stats["nll"], nll.item(), rel_tol=1e-5)
    g_rpo = torch.autograd.grad(loss - base, list(model.parameters()), allow_unused=True)
    g_sft = torch.autograd.grad(0.7 * nll, list(model.parameters()), allow_unused=True)
    for a, b in zip(g_rpo, g_sft):
        assert (a is None and b is None) or torch.allclose(a, b, atol=1e-6)


def test_dpo_config_rejects_a_negative_rpo_alpha():
    with pytest.raises(UserError, match="rpo_alpha"):
        dpo.DPOConfig(rpo_alpha=-1)


def test_answer_stats_against_a_token_by_token_computation():
    model, task = tiny_policy(), sft.TaskConfig()
    prompts = [(123, 456), (999, 1), (500, 500)]
    got = dpo.answer_stats(model, task, prompts, "cpu")
    total = eos = 0.0
    for a, b in prompts:  # log p of each token of "<answer><eos>" from a forward of the whole sequence
        seq = sft.prompt_tokens(a, b) + gpt.encode(sft.answer(a, b)) + [EOS]
        with torch.no_grad():
            logp = gpt.logprobs_from_logits(model(torch.tensor([seq])))[0]
        p = len(sft.prompt_tokens(a, b))
        terms = [logp[t - 1, seq[t]].item() for t in range(p, len(seq))]
        total, eos = total + sum(terms), eos + terms[-1]
    assert math.isclose(got["logps/correct"], total / 3, rel_tol=1e-5)
    assert math.isclose(got["logps/correct_eos"], eos / 3, rel_tol=1e-5)
    g = torch.Generator().manual_seed(0)  # the samples: evaluate_policy's (seed 0, T = 1)
    outs = gpt.generate(model, [sft.prompt_tokens(a, b) for a, b in prompts], task.max_response_tokens, generator=g)
    assert got["samples/length"] == sum(len(sft.strip_eos(o)) for o in outs) / 3
    assert got["samples/no_eos"] == sum(EOS not in o for o in outs) / 3


# =============================================================================================
# gpro.py: GRPO's options, each against its formula

@pytest.mark.parametrize("make, words", [(lambda: gpro.GPROConfig(mu=0), "mu must be >= 1"),
                                         (lambda: gpro.GPROConfig(scale_rewards="std"), "scale_rewards="),
                                         (lambda: gpro.GPROConfig(loss_agg="mean"), "loss_agg="),
                                         (lambda: gpro.GPROConfig(clip_eps_high=-0.1), "clip_eps_high")])
def test_grpo_config_rejects_bad_values(make, words):
    with pytest.raises(UserError, match=words):
        make()


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_grpo_advantages_match_their_formulas(scale):
    """A_i = (r_i - mean of its group) / (std + 1e-4), the std of the group, of the whole batch, or no division."""
    r = torch.tensor([[1.0, 0.0, 0.5, 0.25], [0.2, 0.2, 0.2, 0.2], [1.0, 1.0, 0.0, 0.0]])
    got = gpro.grpo_advantages(r, scale)
    rows = r.tolist()
    every = [x for row in rows for x in row]
    for i, row in enumerate(rows):
        std = {"group": statistics.stdev(row), "batch": statistics.stdev(every), "none": None}[scale]
        for j, x in enumerate(row):
            want = (x - statistics.mean(row)) / (std + 1e-4) if std is not None else x - statistics.mean(row)
            assert math.isclose(got[i, j].item(), want, rel_tol=1e-5, abs_tol=1e-6), (i, j)
    assert (got[1] == 0).all()  # a group of equal rewards teaches nothing, however it is scaled


def random_grpo_batch(seed=0, N=5, T=6):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(N, T, generator=g) * 2
    old = logp + 0.4 * torch.randn(N, T, generator=g)
    ref = logp + 0.4 * torch.randn(N, T, generator=g)
    adv = torch.randn(N, generator=g)
    lengths = [1, 3, 6, 4, 2][:N]
    mask = torch.tensor([[1.0] * n + [0.0] * (T - n) for n in lengths])
    return logp, old, ref, adv, mask, lengths


@pytest.mark.parametrize("agg", ["sequence", "token", "constant"])
@pytest.mark.parametrize("eps_high", [None, 0.28])
def test_grpo_loss_aggregations_match_their_formulas(agg, eps_high):
    """Per token l = -min(rho A, clip(rho, 1 - eps, 1 + eps_high) A) + beta (exp(q) - q - 1), written out with
    Python floats; then GRPO's mean of per-response means, DAPO's sum over tokens / their count, or Dr. GRPO's
    sum / (N x max_len)."""
    logp, old, ref, adv, mask, lengths = random_grpo_batch()
    eps, beta, max_len = 0.2, 0.3, 8
    high = eps if eps_high is None else eps_high
    per_response = []
    for i, n in enumerate(lengths):
        terms = []
        for t in range(n):
            rho, a = math.exp(logp[i, t].item() - old[i, t].item()), adv[i].item()
            q = ref[i, t].item() - logp[i, t].item()
            terms.append(-min(rho * a, min(max(rho, 1 - eps), 1 + high) * a) + beta * (math.exp(q) - q - 1))
        per_response.append(terms)
    want = {"sequence": statistics.mean(sum(ts) / len(ts) for ts in per_response),
            "token": sum(map(sum, per_response)) / sum(lengths),
            "constant": sum(map(sum, per_response)) / (len(lengths) * max_len)}[agg]
    got = gpro.grpo_loss(logp, old, ref, adv, mask, eps, beta, agg, max_len, eps_high)
    assert math.isclose(got.item(), want, rel_tol=1e-5)


def test_grpo_clipped_gradient_vanishes_exactly_where_it_should():
    """d loss / d log pi_t is 0 exactly where the clip is active on the side the advantage favours (rho > 1 + eps_high
    with A > 0, rho < 1 - eps_low with A < 0) and -A rho_t / normaliser everywhere else, including the other two
    corners (rho above the range with A < 0, below it with A > 0), where min() keeps the unclipped term."""
    eps_low, eps_high = 0.2, 0.28
    rhos = torch.tensor([0.5, 0.79, 0.81, 1.0, 1.1, 1.27, 1.29, 2.0])
    old = torch.full((2, 8), -1.0)
    logp = (old + rhos.log()).requires_grad_()                    # row 0: A = +1.5, row 1: A = -0.7
    adv, mask = torch.tensor([1.5, -0.7]), torch.ones(2, 8)
    loss = gpro.grpo_loss(logp, old, old, adv, mask, eps_low, 0.0, "token", clip_eps_high=eps_high)
    grad, = torch.autograd.grad(loss, logp)
    for i, a in enumerate(adv.tolist()):
        for t, rho in enumerate(rhos.tolist()):
            clipped = (a > 0 and rho > 1 + eps_high) or (a < 0 and rho < 1 - eps_low)
            if clipped:
                assert grad[i, t].item() == 0.0, (a, rho)
            else:
                assert math.isclose(grad[i, t].item(), -a * rho / 16, rel_tol=1e-5), (a, rho)
    fr = gpro.clip_fractions(logp.detach(), old, adv, mask, eps_low, eps_high)
    assert fr["clip_ratio/high_mean"] == 2 / 16 and fr["clip_ratio/low_mean"] == 2 / 16  # 1.29, 2.0 | 0.5, 0.79
    assert fr["clip_ratio/region_mean"] == 4 / 16
    # symmetric clipping (clip_eps_high = None): 1.27 is now above 1 + 0.2 and clipped too
    assert gpro.clip_fractions(logp.detach(), old, adv, mask, eps_low)["clip_ratio/high_mean"] == 3 / 16


def test_grpo_rollout_then_mu_updates():
    """The loop's pieces on a tiny policy: the rollout's old log-probs are the policy's own (ratio exactly 1 on the
    first update, no clipping, the plain policy gradient), the reference's are recorded, the advantages follow the
    rewards; after an optimizer step on the same batch the ratio moves and the clip acts."""
    policy, task = tiny_policy(1), sft.TaskConfig()
    ref = copy.deepcopy(policy).requires_grad_(False)
    cfg = gpro.GPROConfig(algo="grpo", k=4, mu=2, kl_coef=0.0, loss_agg="token", scale_rewards="none")
    prompts = sft.sample_prompts(task, 3, random.Random(0))
    r = torch.tensor([[1.0, 0.0, 0.5, 0.0], [0.3, 0.3, 0.3, 0.3], [0.0, 1.0, 0.0, 0.0]])
    batch, stats = gpro.grpo_rollout(policy, ref, task, prompts, lambda p, ys: r, cfg, torch.Generator().manual_seed(0))
    assert torch.equal(batch["old_logp"], batch["ref_logp"])  # the policy is still the reference
    assert torch.allclose(batch["adv"], (r - r.mean(-1, keepdim=True)).flatten())
    assert math.isclose(stats["frac_reward_zero_std"], 1 / 3, rel_tol=1e-6)
    assert stats["completions/mean_length"] == batch["mask"].sum(1).mean().item()
    policy.train()
    opt = torch.optim.SGD(policy.parameters(), lr=30.0)
    loss, first = gpro.grpo_update(policy, batch, cfg, task.max_response_tokens)
    logp, _ = gpt.sequence_logprobs(policy, batch["ids"], batch["mask"])
    assert torch.equal(logp.detach(), batch["old_logp"]) and first["clip_ratio/region_mean"] == 0
    want = -(batch["adv"][:, None] * logp * batch["mask"]).sum() / batch["mask"].sum()  # REINFORCE with a baseline
    for a, b in zip(torch.autograd.grad(loss, list(policy.parameters()), retain_graph=True, allow_unused=True),
                    torch.autograd.grad(want, list(policy.parameters()), allow_unused=True)):
        assert (a is None and b is None) or torch.allclose(a, b, atol=1e-6)
    opt.zero_grad()
    loss.backward()
    opt.step()
    _, second = gpro.grpo_update(policy, batch, cfg, task.max_response_tokens)
    assert second["clip_ratio/region_mean"] > 0, second


@pytest.mark.parametrize("flags", [["--mu", "2", "--loss_agg", "constant", "--scale_rewards", "batch",
                                    "--clip_eps_high", "0.28"]])
def test_grpo_main_with_several_updates_per_rollout(tmp_path, fine_tuned, flags):  # noqa: F811
    out = stage_dir(tmp_path, fine_tuned[1] / "sft.pt")
    r = run_script(["gpro.py", "--algo", "grpo", "--out_dir", str(out), "--max_steps", "5", "--eval_interval", "4",
                    "--batch_size", "2", "--k", "3", "--heldout", "8", *CPU, *flags], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    metrics = last_json_line(r)
    assert metrics["steps"] == 5 and metrics["algo"] == "grpo"
    for key in gpro.CLIP_KEYS:
        assert 0 <= metrics[key] <= 1
    ckpt = gpt.load_checkpoint(str(out / "grpo.pt"))
    assert ckpt["finished"] and ckpt["gpro"]["mu"] == 2
