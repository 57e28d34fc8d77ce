"""
dpo.py: Direct Preference Optimization (notes 10.8; homework 2) and its relatives.

The policy pi_theta and a frozen reference pi_ref both start from the SFT model. On preference
pairs (x, y+, y-) labelled by the simulated labeller of reward.py, DPO minimises

    L_DPO = -log sigmoid(beta * (log pi_theta(y+|x)/pi_ref(y+|x) - log pi_theta(y-|x)/pi_ref(y-|x)))

which is the Bradley-Terry likelihood of the labels under the implicit reward
r_hat(x, y) = beta * log pi_theta(y|x) / pi_ref(y|x): the optimum of the KL-regularised objective
max E[r] - beta KL(pi || pi_ref) is pi* = pi_ref exp(r / beta) / Z(x), so r = beta log pi*/pi_ref +
beta log Z(x), and log Z(x) cancels in a difference of two responses to the same prompt.

Losses (--loss): sigmoid (DPO), ipo (squared: (h - 1/(2 beta))^2 on the log-ratio margin h),
hinge (SLiC: max(0, 1 - beta h)); --label_smoothing eps for the sigmoid loss (conservative DPO).
IPO's h here is the margin of the sequence log-ratios log pi(y|x)/pi_ref(y|x), summed over tokens as every
loss of this file, so that its target 1/(2 beta) is the one of IPO's objective as the paper writes it, on whole
sequences (Azar et al. 2023); --ipo_per_token takes the mean over each response's tokens (and <eos>)
instead, as TRL does and as the IPO authors say their experiments did: a length-independent margin.
The Plackett-Luce form ranks K responses (homework 2(g)); with K = 2 it is DPO exactly.
--rpo_alpha adds the NLL of the chosen response (RPO, Pang et al. 2024): L = L_DPO + alpha NLL(y+).

Why plain DPO collapses when trained longer, and what holds it. The loss only asks for a margin: its
gradient is -beta sigmoid(-beta h) (grad log pi(y+) - grad log pi(y-)) (homework 2(f)), and with a small
beta the weight sigmoid(-beta h) stays near 1/2 for thousands of steps, so every pair keeps pulling. Nothing
says where the rejected response's probability should go, and here the two responses are samples of one
SFT model that share most of their tokens (on addition half the pairs differ in one digit, followed by
tokens both have): pushing y- down pushes its correct tokens down too, in a context close to y+'s. So log pi(y+)
falls with log pi(y-) (likelihood displacement, Razin et al. 2024), the correct response loses probability even
on tokens the SFT model almost never gets wrong, and sampled accuracy collapses while the held-out preference
accuracy stays where it was. Two members of the family stop it: a larger beta (the weight falls once beta h is a few
units, so training stops pulling; IPO's target 1 / (2 beta) does the same), and the NLL term on y+, which
keeps the chosen likely so that the margin has to grow by the rejected falling. `python dpo.py` uses both.
"""
import copy
import dataclasses
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import gpt
import reward
import sft
import train
from train import arg


def dpo_loss(logp_chosen, logp_rejected, ref_chosen, ref_rejected, beta, loss="sigmoid", label_smoothing=0.0):
    """Per-pair losses (B,) and the implicit rewards beta * log pi/pi_ref of both responses (B,).
    Inputs are sequence log-probs (B,) of the chosen and rejected responses under the policy and
    the reference."""
    r_chosen = beta * (logp_chosen - ref_chosen)          # implicit reward r_hat(x, y+)
    r_rejected = beta * (logp_rejected - ref_rejected)    # implicit reward r_hat(x, y-)
    margin = r_chosen - r_rejected                        # beta * h
    if loss == "sigmoid":   # Bradley-Terry likelihood; eps: the label is flipped with probability eps
        losses = -(1 - label_smoothing) * F.logsigmoid(margin) - label_smoothing * F.logsigmoid(-margin)
    elif loss == "ipo":     # regress the log-ratio margin h onto 1 / (2 beta)
        losses = (margin / beta - 1 / (2 * beta)) ** 2
    elif loss == "hinge":   # SLiC: a margin of 1 in implicit reward
        losses = F.relu(1 - margin)
    else:
        raise ValueError(f"unknown DPO loss {loss!r}")
    return losses, r_chosen, r_rejected


def plackett_luce_loss(logps, ref_logps, beta):
    """Negative log-likelihood of K responses ranked best first (B, K) under the Plackett-Luce model
    with the implicit rewards (homework 2(g)): -sum_k log( exp(r_k) / sum_{j >= k} exp(r_j) ).
    With K = 2 this is -log sigmoid(r_1 - r_2), the DPO loss."""
    r = beta * (logps - ref_logps)                                      # (B, K)
    tail_logsumexp = torch.logcumsumexp(r.flip(-1), -1).flip(-1)       # log sum_{j >= k} exp(r_j)
    return (tail_logsumexp - r)[:, :-1].sum(-1)                         # the last term is log 1 = 0


# ----------------------------------------------------------------------------------------------
# Training: the policy on preference data sampled from the SFT model and labelled by the labeller

@dataclass(frozen=True)
class DPOConfig:
    beta: float = arg(0.1, "KL strength beta: the implicit reward is beta * log pi/pi_ref")
    loss: str = arg("sigmoid", "sigmoid (DPO) | ipo | hinge | plackett_luce (ranks --k responses)")
    label_smoothing: float = arg(0.0, "sigmoid loss: probability that a label is flipped")
    rpo_alpha: float = arg(0.0, "weight of the NLL of the chosen response per token (RPO, Pang et al. 2024; "
                                "0 = the preference loss alone)")
    ipo_per_token: bool = arg(False, "ipo: the margin of the per-token mean log-ratios (TRL's IPO) instead of the "
                                     "summed sequence log-ratios")

    def __post_init__(self):
        train.check(self.beta > 0, f"beta must be > 0, got {self.beta}")
        train.check_choice(self, "loss", ("sigmoid", "ipo", "hinge", "plackett_luce"))
        train.check(0 <= self.label_smoothing < 0.5, f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        train.check(self.rpo_alpha >= 0, f"rpo_alpha must be >= 0, got {self.rpo_alpha}")
        train.check(not self.ipo_per_token or self.loss == "ipo", f"--ipo_per_token changes the ipo loss: use it "
                    f"with --loss ipo, got --loss {self.loss}")


def response_logps(model, task, comparisons, device):
    """Sequence log-probs (N, K) of every response (and its <eos>) of every comparison."""
    K = len(comparisons[0][1])
    prompts = [p for p, ys, _ in comparisons for _ in ys]
    ids, target = sft.pack(task, prompts, [y for _, ys, _ in comparisons for y in ys], device)
    return gpt.sequence_logprobs(model, ids, target)[1].view(len(comparisons), K)


def chosen_nll(logp_chosen, n_tokens):
    """The NLL term of RPO (Pang et al. 2024, "Iterative Reasoning Preference Optimization"): the negative
    log-likelihood of the chosen responses per token, -sum_b log pi(y+_b | x_b) / sum_b |y+_b|, with |y+| counting
    the response and its <eos> (as TRL's rpo_alpha). logp_chosen, n_tokens: (B,)."""
    return -logp_chosen.sum() / n_tokens.sum()


def preference_step(logps, ref_logps, cfg, lengths=None):
    """The loss and the metrics practitioners log, from log-probs (B, K) ranked best first; lengths (B, K): the
    responses' lengths with <eos>, for the RPO term (cfg.rpo_alpha > 0) and cfg.ipo_per_token."""
    if cfg.loss == "plackett_luce":
        losses = plackett_luce_loss(logps, ref_logps, cfg.beta)
        r_c, r_r = cfg.beta * (logps[:, 0] - ref_logps[:, 0]), cfg.beta * (logps[:, -1] - ref_logps[:, -1])
    else:
        per = lengths if cfg.ipo_per_token else 1  # TRL's IPO: mean log-probs per token
        losses, r_c, r_r = dpo_loss(*(logps / per).unbind(-1), *(ref_logps / per).unbind(-1), cfg.beta,
                                    cfg.loss, cfg.label_smoothing)
    stats = {"rewards/chosen": r_c.mean().item(), "rewards/rejected": r_r.mean().item(),
             "rewards/margins": (r_c - r_r).mean().item(), "rewards/accuracies": (r_c > r_r).float().mean().item(),
             "logps/chosen": logps[:, 0].mean().item(), "logps/rejected": logps[:, -1].mean().item()}
    loss = losses.mean()
    if cfg.rpo_alpha:  # L_DPO + alpha L_NLL: keeps the chosen likely while the margin grows
        nll = chosen_nll(logps[:, 0], lengths[:, 0])
        loss, stats["nll"] = loss + cfg.rpo_alpha * nll, nll.item()
    return loss, stats


@torch.no_grad()
def correct_response_stats(model, task, prompts, device):
    """What a collapse shows first, on held-out prompts: the mean log-prob of the correct response and its <eos>
    (logps/correct, logps/correct_eos), and the mean length of the T=1 samples and the share of them that
    never emit <eos> (samples/length, samples/no_eos; the samples are evaluate_policy's, same seed)."""
    ids, target = sft.pack(task, prompts, [gpt.encode(task.correct(p)) for p in prompts], device)
    per_token, total = gpt.sequence_logprobs(model, ids, target)
    last = (target * torch.arange(ids.shape[1], device=device)).argmax(1)        # the <eos> position
    g = torch.Generator(device=device).manual_seed(0)
    outs = gpt.generate(model, [task.prompt_tokens(p) for p in prompts], task.max_response_tokens, generator=g)
    return {"logps/correct": total.mean().item(),
            "logps/correct_eos": per_token[torch.arange(len(prompts)), last].mean().item(),
            "samples/length": sum(len(sft.strip_eos(o)) for o in outs) / len(outs),
            "samples/no_eos": sum(gpt.EOS not in o for o in outs) / len(outs)}


def dpo_defaults():
    """Defaults of `python dpo.py`, chosen by measurement: beta 0.5 with the RPO term (alpha 1) at lr 5e-5. Plain
    DPO (DPOConfig(): beta 0.1, no NLL term) collapses with 1500 steps at lr 5e-6 or 600 at 1e-4; this recipe
    holds for 3000 steps, and for 600 at lr 1e-4 (the module docstring says why)."""
    return (sft.TaskConfig(), reward.PrefConfig(n_pairs=4000, n_eval=400), DPOConfig(beta=0.5, rpo_alpha=1.0),
            train.TrainConfig(max_steps=600, batch_size=32, lr=5e-5, min_lr=5e-6, warmup_steps=20,
                            eval_interval=200, weight_decay=0.0))


def train_dpo(task, pref, cfg, train_cfg):
    """The whole stage: SFT policy -> preference data -> DPO, the before/after table and
    out_dir/dpo_metrics.json. Returns (policy, metrics)."""
    device = train.pick_device(train_cfg.device)
    path = os.path.join(train_cfg.out_dir, "dpo.pt")
    train.claim_checkpoint(path, train_cfg)
    policy, sft_ckpt = sft.load_sft_policy(task, train_cfg, device)
    ref = copy.deepcopy(policy).eval().requires_grad_(False)  # pi_ref: the frozen SFT model
    k = pref.k if cfg.loss == "plackett_luce" else 2
    if train.rank() == 0:
        print(f"sampling {pref.n_pairs} comparisons of {k} responses from the SFT policy, labelled with tau={pref.tau}")
    data = reward.make_comparisons(policy, task, pref.n_pairs, k, pref.tau, pref.sample_temperature, train_cfg.seed)
    held = reward.make_comparisons(policy, task, pref.n_eval, 2, pref.tau, pref.sample_temperature,
                                   train_cfg.seed + 1, heldout=True)
    with torch.no_grad():  # the reference log-probs, computed once
        ref_logps = torch.cat([response_logps(ref, task, data[i:i + 256], device) for i in range(0, len(data), 256)])
        held_ref = response_logps(ref, task, held, device)
    held_prompts = task.heldout_prompts()
    before = {**sft.evaluate_policy(policy, task), "kl": sft.kl_to_reference(policy, ref, task),  # kl 0: pi = pi_ref
              **correct_response_stats(policy, task, held_prompts, device)}

    def get_batch(i):
        rng = train.step_rng(train_cfg.seed, i)
        idx = [rng.randrange(len(data)) for _ in range(train_cfg.batch_size)]
        return [data[j] for j in idx], ref_logps[idx]

    def loss_fn(net, batch):
        comparisons, ref_b = batch
        lengths = torch.tensor([[len(y) + 1 for y in ys] for _, ys, _ in comparisons], device=device)  # + <eos>
        loss, stats = preference_step(response_logps(net, task, comparisons, device), ref_b, cfg, lengths)
        return loss + gpt.aux_loss(policy), {"tokens": sum(len(y) + 1 for _, ys, _ in comparisons for y in ys),
                                             "margin": stats["rewards/margins"], "acc": stats["rewards/accuracies"],
                                             "logp_c": stats["logps/chosen"], "logp_r": stats["logps/rejected"]}

    def evaluate(m):
        _, stats = preference_step(response_logps(m, task, held, device), held_ref,
                                   dataclasses.replace(cfg, loss="sigmoid", rpo_alpha=0.0, ipo_per_token=False))
        return {**{f"heldout_{k}": v for k, v in stats.items()}, **sft.evaluate_policy(m, task),
                "kl": sft.kl_to_reference(m, ref, task), **correct_response_stats(m, task, held_prompts, device)}

    meta = {"stage": "dpo", "config": dataclasses.asdict(policy.cfg), "task": task.identity,
            "pref": dataclasses.asdict(pref), "dpo": dataclasses.asdict(cfg),
            "built_from": {"sft": train.provenance(sft_ckpt)}}
    # train_mode=False: no dropout, so that the policy and the reference score alike (DPO's term starts at ln 2)
    m = sft.before_after(before, train.train(policy, train_cfg, get_batch, loss_fn, evaluate, path, meta, desc="dpo",
                                           train_mode=False))
    if train.rank() == 0:
        train.print_table(f"DPO ({cfg.loss}, beta={cfg.beta}) on held-out prompts: SFT -> aligned",
                        sft.before_after_rows(m) + [("held-out preference accuracy",
                                                     f"{m['heldout_rewards/accuracies']:.1%}"),
                                                    ("train seconds", m["train_seconds"])])
        train.write_metrics("dpo", m, train_cfg.out_dir)
    return policy, m


def main(argv=None):
    task_cfg, *cfgs = sft.parse_args(list(dpo_defaults()), argv, description="DPO on simulated preferences")
    train_dpo(task_cfg.build(), *cfgs)


if __name__ == "__main__":
    train.run_main(main)
