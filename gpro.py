"""
gpro.py: alignment from scalar rewards: GPRO (notes 10.9) and GRPO.

GPRO. For a prompt x draw K responses y_1..y_K from the reference policy, score them r_i, and
minimise the weighted negative log-likelihood

    L(theta) = - sum_i w_i log pi_theta(y_i | x),     w_i = softmax(r_i / beta) over the K responses.

Why this reaches pi* = pi_ref exp(r / beta) / Z(x) without computing Z: for a fixed x the
minimiser of -sum_y c(y) log pi(y) is pi(y) proportional to c(y), and here c(y) is the expected
weight the K-sample draw gives to y. As K grows, w_i -> exp(r_i / beta) / (K E_ref[exp(r / beta)]),
the self-normalised importance weights of pi* against the proposal pi_ref, so c(y) ->
pi_ref(y) exp(r(y) / beta) / E_ref[exp(r / beta)] = pi*(y): the normaliser Z is estimated by the
sum over the K samples instead of being computed. For small K the estimate is biased towards
pi_ref (test_all.py measures the distance shrinking with K). `--online` draws the K samples
from the current policy instead, which tilts it again at every step (repeated tilting: it keeps
moving past pi*, towards the reward's argmax, as beta -> 0 would).

GRPO (`--algo grpo`; Shao et al. 2024, DeepSeekMath, Algorithm 1), written as its nested loop:

1. Rollout: freeze theta_old = theta, draw K responses for each of a batch of prompts, score them, and
   record the old and the reference per-token log-probs in the training precision (so that the first
   ratio is exactly 1). Advantages A_i = r_i - mean(r) over the group, divided by a std (`--scale_rewards`):
   the group's (the paper), the batch's (Liu et al. 2025, "Tricks or Traps?"), or none (Dr. GRPO, Liu et
   al. 2025, "Understanding R1-Zero-Like Training", which shows the std favours too easy and too hard groups).
2. Update: `--mu` optimizer steps on that one batch. Per response token
       l_t = -min(rho_t A, clip(rho_t, 1 - eps_low, 1 + eps_high) A) + kl_coef (exp(q_t) - q_t - 1),
   rho_t = pi_theta / pi_old, q_t = log pi_ref - log pi_theta (the k3 estimator: unbiased and >= 0). With
   mu = 1 the ratio is 1 and the step is the plain policy gradient; with mu > 1 the clip stops a token's
   gradient once its ratio has left the trust region on the side its advantage pushes towards.
   eps_high > eps_low is DAPO's clip-higher (Yu et al. 2025): low-probability tokens with A > 0 may grow more.
   The loss aggregates l_t (`--loss_agg`): per sequence (the GRPO paper: mean over a response's tokens,
   then over responses), per token (DAPO: sum over all tokens / their count, so long responses weigh
   more), or by a constant (Dr. GRPO: sum / (responses x the maximum response length), no length bias).

The defaults (mu 1, per-token aggregation, group std, symmetric clip 0.2: TRL's) were measured against the
other options on this task: at equal numbers of rollouts mu = 2 or 4, the three aggregations, batch std and
clip-higher all land within a point of each other (the responses are 3-5 tokens long, so the aggregations
barely differ, and kl_coef sets how far the policy goes), while mu > 1 costs time. Dropping the std
(--scale_rewards none) loses 15 points at the default kl_coef: a group's r* has a std of about 0.14, so the
advantages are then about seven times smaller and the same kl_coef holds the policy that much harder.

Two members of the family from the same loop. RLOO (`--algo rloo`; Ahmadian et al. 2024, TRL's RLOOTrainer):
the advantage of a response is its reward minus the mean reward of the K - 1 other responses to its prompt,
and the KL to the reference enters the reward, r - kl_coef log(pi_old(y) / pi_ref(y)), instead of the loss.
GSPO (`--importance_sampling_level sequence`; Zheng et al. 2025): one importance ratio per response, the
geometric mean of its tokens' ratios, clipped as a whole; with mu = 1 the ratio is 1, so GSPO differs from
GRPO only with mu > 1, and its clip range is far narrower (the paper: 3e-4 below, 4e-4 above).
"""
import copy
import dataclasses
import os
import time
from dataclasses import dataclass

import torch

import gpt
import reward
import sft
import train
from train import arg


def gpro_weights(rewards, beta):
    """w = softmax(r / beta) over the K responses of each prompt: rewards (B, K) -> (B, K)."""
    return torch.softmax(rewards / beta, dim=-1)


def gpro_loss(logps, rewards, beta):
    """-sum_i w_i log pi(y_i | x), averaged over prompts; logps, rewards: (B, K). The weights are constants."""
    return -(gpro_weights(rewards, beta).detach() * logps).sum(-1).mean()


def rloo_advantages(rewards):
    """RLOO's advantages (B, K) (Ahmadian et al. 2024, "Back to Basics"; Kool et al. 2019): each reward minus the
    mean of the K - 1 others of its group, a baseline that does not depend on the response it is subtracted
    from, so the policy gradient stays unbiased. Equal to K / (K - 1) (r - mean(r))."""
    K = rewards.shape[-1]
    return rewards - (rewards.sum(-1, keepdim=True) - rewards) / (K - 1)


def grpo_advantages(rewards, scale="group", eps=1e-4):
    """Advantages (B, K) from rewards (B, K), one group of K per prompt: r - mean(r) over the group, divided
    by std + eps of the group (scale="group", the GRPO paper), of the whole batch ("batch"), or not ("none")."""
    centred = rewards - rewards.mean(-1, keepdim=True)
    if scale == "none":
        return centred
    std = rewards.std(-1, keepdim=True) if scale == "group" else rewards.std()
    return centred / (std + eps)


def aggregate(per_token, mask, how, max_len=None):
    """Reduce per-token losses (N, T) over the response tokens (mask (N, T)) to one number: "sequence" (mean over
    each response's tokens, then over responses), "token" (sum / number of tokens) or "constant" (sum / (N *
    max_len), max_len the length limit of a response)."""
    per_token = per_token * mask
    if how == "sequence":
        return (per_token.sum(-1) / mask.sum(-1).clamp_min(1)).mean()
    if how == "token":
        return per_token.sum() / mask.sum().clamp_min(1)
    if how == "constant":
        return per_token.sum() / (mask.shape[0] * max_len)
    raise ValueError(f"unknown aggregation {how!r}")


def importance_ratio(logp, old_logp, mask, level="token"):
    """pi_theta / pi_old per response token (N, T): each token's own (level="token", GRPO), or the response's,
    exp of the mean of its tokens' log-ratios, the same for all its tokens (level="sequence": GSPO, Zheng et al.
    2025, the geometric mean, so that the ratio of a long response is on the scale of a short one's)."""
    log_ratio = logp - old_logp
    if level == "sequence":
        log_ratio = ((log_ratio * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp_min(1)).expand_as(
            log_ratio)
    return torch.exp(log_ratio)


def grpo_loss(logp, old_logp, ref_logp, adv, mask, clip_eps=0.2, beta=0.04, loss_agg="token", max_len=None,
              clip_eps_high=None, level="token"):
    """The GRPO objective as a loss. logp, old_logp, ref_logp, mask: (N, T) per response token (mask 1 on the
    sampled response tokens and their <eos>); adv: (N,) one advantage per response, shared by its tokens.
    Per token: -min(rho A, clip(rho, 1 - clip_eps, 1 + clip_eps_high) A) + beta (exp(q) - q - 1),
    rho = importance_ratio(..., level), q = ref_logp - logp; clip_eps_high None = clip_eps. Aggregated by
    aggregate()."""
    high = clip_eps if clip_eps_high is None else clip_eps_high
    rho, a = importance_ratio(logp, old_logp, mask, level), adv[:, None]        # importance ratio pi / pi_old
    pg = -torch.min(rho * a, rho.clamp(1 - clip_eps, 1 + high) * a)
    q = ref_logp - logp
    kl = torch.exp(q) - q - 1                                                   # k3: unbiased, >= 0
    return aggregate(pg + beta * kl, mask, loss_agg, max_len)


def clip_fractions(logp, old_logp, adv, mask, clip_eps=0.2, clip_eps_high=None, level="token"):
    """The share of response tokens where the clip is active, so that their gradient is zero (TRL's names and
    definition; ppo.py's clip_ratio/region_mean is the same): low (rho < 1 - eps_low with A < 0), high
    (rho > 1 + eps_high with A > 0), region (either)."""
    high = clip_eps if clip_eps_high is None else clip_eps_high
    rho, a = importance_ratio(logp, old_logp, mask, level), adv[:, None]
    low_clipped, high_clipped = (rho < 1 - clip_eps) & (a < 0), (rho > 1 + high) & (a > 0)
    frac = lambda x: ((x.float() * mask).sum() / mask.sum().clamp_min(1)).item()  # noqa: E731
    return {"clip_ratio/low_mean": frac(low_clipped), "clip_ratio/high_mean": frac(high_clipped),
            "clip_ratio/region_mean": frac(low_clipped | high_clipped)}


# ----------------------------------------------------------------------------------------------
# Training on the task

@dataclass(frozen=True)
class GPROConfig:
    algo: str = arg("gpro", "gpro (weighted likelihood, notes 10.9) | grpo (group advantages, clipped ratio, k3 KL) "
                            "| rloo (GRPO's loop with leave-one-out advantages and the KL in the reward)")
    k: int = arg(8, "responses sampled per prompt")
    beta: float = arg(0.1, "gpro: the tilt's temperature, w = softmax(r / beta), target pi_ref exp(r / beta) / Z")
    kl_coef: float = arg(1.0, "grpo: weight of the k3 KL to the reference (smaller lets GRPO exploit the reward model);"
                              " rloo: of the response's KL log(pi_old / pi_ref) subtracted from its reward (TRL: 0.05)")
    reward: str = arg("true", "true (the task's r*, partial credit) | exact (1 if correct else 0) | "
                              "rm (out_dir/reward.pt, trained by reward.py if missing)")
    online: bool = arg(False, "gpro: sample from the current policy instead of the reference (repeated tilting)")
    mu: int = arg(1, "grpo: optimizer steps on each rollout (GRPO's mu; with 1 the ratio is 1 and nothing is clipped; "
                     "--max_steps counts optimizer steps, so max_steps / mu rollouts)")
    clip_eps: float = arg(0.2, "grpo: ratio clip epsilon (the lower one, rho >= 1 - clip_eps, with --clip_eps_high)")
    clip_eps_high: float = arg(0.0, "grpo: upper clip epsilon, rho <= 1 + clip_eps_high (DAPO's clip-higher, "
                                    "e.g. 0.28; 0 = clip_eps)")
    scale_rewards: str = arg("group", "grpo: divide the centred rewards by the std of the group | batch | none")
    loss_agg: str = arg("token", "grpo: sequence (mean per response, then over responses: GRPO) | token (over all "
                                 "tokens: DAPO) | constant (sum / (responses x max response length): Dr. GRPO)")
    importance_sampling_level: str = arg("token", "grpo, rloo: the ratio pi / pi_old of each token | sequence: of the "
                                                  "whole response (GSPO, Zheng et al. 2025; TRL's name)")

    def __post_init__(self):
        train.check_choice(self, "algo", ("gpro", "grpo", "rloo"))
        train.check_choice(self, "reward", ("true", "exact", "rm"))
        train.check_choice(self, "scale_rewards", ("group", "batch", "none"))
        train.check_choice(self, "loss_agg", ("sequence", "token", "constant"))
        train.check_choice(self, "importance_sampling_level", ("token", "sequence"))
        train.check(self.k >= 2 and self.beta > 0 and self.kl_coef >= 0, f"need k >= 2, beta > 0 and kl_coef >= 0, "
                  f"got k={self.k}, beta={self.beta}, kl_coef={self.kl_coef}")
        train.check(self.beta >= 1e-6, f"beta must be >= 1e-6 (below it r / beta overflows for large rewards, and "
                    f"the weights softmax(r / beta) are already the best response's alone), got {self.beta}")
        train.check(self.mu >= 1, f"mu must be >= 1, got {self.mu}")
        train.check(0 < self.clip_eps < 1, f"clip_eps must be in (0, 1), got {self.clip_eps}")
        train.check(self.clip_eps_high >= 0, f"clip_eps_high must be >= 0 (0 = clip_eps), got {self.clip_eps_high}")

    @property
    def eps_high(self):
        return self.clip_eps_high or self.clip_eps


def gpro_defaults():
    return (sft.TaskConfig(), GPROConfig(),
            train.TrainConfig(max_steps=300, batch_size=16, lr=5e-4, min_lr=5e-7, warmup_steps=10,
                            eval_interval=100, weight_decay=0.0))


@torch.no_grad()
def grpo_rollout(policy, ref, task, prompts, score, cfg, generator, dtype="auto"):
    """Step 1 of GRPO's loop: cfg.k responses per prompt sampled from theta_old (the current policy, T = 1), their
    rewards (B, K) = score(prompts, responses), the advantages, and the old and the reference per-token log-probs
    in the training precision, so that the first update's ratio is exactly 1. Returns (batch, stats): ids, mask
    (1 on the sampled tokens, <eos> included where one was sampled), old_logp, ref_logp (N, T), adv (N,)."""
    device = next(policy.parameters()).device
    flat = [p for p in prompts for _ in range(cfg.k)]
    outs = gpt.generate(policy, [task.prompt_tokens(p) for p in flat], task.max_response_tokens,
                        generator=generator)
    ids, mask = sft.pack_generated(task, flat, outs, device)
    with train.autocast(device, dtype):
        old_logp, _ = gpt.sequence_logprobs(policy, ids, mask)
        ref_logp, _ = gpt.sequence_logprobs(ref, ids, mask)
    responses = [sft.strip_eos(o) for o in outs]
    r = score(prompts, [responses[i * cfg.k:(i + 1) * cfg.k] for i in range(len(prompts))])     # (B, K)
    if cfg.algo == "rloo":  # RLOO's reward: r - kl_coef log(pi_old(y) / pi_ref(y)), then the leave-one-out baseline
        kl = ((old_logp - ref_logp).float() * mask).sum(1).view(-1, cfg.k)                  # (B, K)
        adv = rloo_advantages(r - cfg.kl_coef * kl)
    else:
        adv = grpo_advantages(r, cfg.scale_rewards)
    std = r.std(-1)
    stats = {"reward": r.mean().item(), "reward_std": std.mean().item(),
             # groups whose K rewards are all equal: their advantages are 0, they teach nothing
             "frac_reward_zero_std": torch.isclose(std, torch.zeros_like(std), atol=1e-6).float().mean().item(),
             "completions/mean_length": mask.sum(1).float().mean().item(),  # tokens, <eos> included
             "completions/clipped_ratio": sum(gpt.EOS not in o for o in outs) / len(outs)}  # hit the length limit
    batch = {"ids": ids, "mask": mask.float(), "old_logp": old_logp.float(), "ref_logp": ref_logp.float(),
             "adv": adv.flatten()}
    return batch, stats


def grpo_update(net, batch, cfg, max_len):
    """Step 2, one of the mu optimizer steps on a rollout: the GRPO loss and the metrics TRL logs (the clip
    fractions; kl_k3, the k3 KL to the reference per token)."""
    logp, _ = gpt.sequence_logprobs(net, batch["ids"], batch["mask"])
    mask, adv = batch["mask"], batch["adv"]
    kl_coef = cfg.kl_coef if cfg.algo == "grpo" else 0.0  # RLOO's KL is in its reward
    loss = grpo_loss(logp, batch["old_logp"], batch["ref_logp"], adv, mask, cfg.clip_eps, kl_coef, cfg.loss_agg,
                     max_len, cfg.eps_high, cfg.importance_sampling_level) + gpt.aux_loss(net)
    with torch.no_grad():
        q = batch["ref_logp"] - logp
        kl = ((torch.exp(q) - q - 1) * mask).sum() / mask.sum()
    return loss, {"tokens": batch["ids"].numel(), "kl_k3": kl.item(),
                  **clip_fractions(logp.detach(), batch["old_logp"], adv, mask, cfg.clip_eps, cfg.eps_high,
                                   cfg.importance_sampling_level)}


CLIP_KEYS = ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean")


def train_gpro(task, cfg, train_cfg):
    """The whole stage: SFT policy (and the reward model for --reward rm) -> GPRO or GRPO into out_dir/<algo>.pt,
    the before/after table and out_dir/<algo>_metrics.json. Returns (policy, metrics)."""
    train.check(cfg.algo == "gpro" or train_cfg.grad_accum == 1, "GRPO's batch is one rollout: use --batch_size "
                "(prompts per rollout), not --grad_accum")  # before any stage trains
    device = train.pick_device(train_cfg.device)
    path = os.path.join(train_cfg.out_dir, f"{cfg.algo}.pt")
    train.claim_checkpoint(path, train_cfg)
    policy, sft_ckpt = sft.load_sft_policy(task, train_cfg, device)
    ref = copy.deepcopy(policy).eval().requires_grad_(False)
    rm = reward.load_reward_stage(task, train_cfg, device, sft_ckpt) if cfg.reward == "rm" else None
    before = {**sft.evaluate_policy(policy, task), "kl": sft.kl_to_reference(policy, ref, task)}

    def score(prompts, responses):
        """Rewards (B, K) of the K responses of each prompt."""
        flat_p, flat_y = [p for p in prompts for _ in range(cfg.k)], [y for ys in responses for y in ys]
        if rm is not None:
            with torch.no_grad():
                return reward.rewards(rm, task, flat_p, flat_y, device).view(-1, cfg.k)
        r = torch.tensor(task.true_rewards(flat_p, flat_y), device=device).view(-1, cfg.k)
        return (r == 1).float() if cfg.reward == "exact" else r  # r* is 1 exactly when correct

    def evaluate(m):
        return {**sft.evaluate_policy(m, task), "kl": sft.kl_to_reference(m, ref, task)}

    meta = {"stage": cfg.algo, "config": dataclasses.asdict(policy.cfg), "task": task.identity,
            "gpro": dataclasses.asdict(cfg), "built_from": {"sft": train.provenance(sft_ckpt)}}
    if cfg.algo == "gpro":
        result = train_weighted_likelihood(policy, ref, task, cfg, train_cfg, score, evaluate, path, meta)
    else:
        result = train_grpo(policy, ref, task, cfg, train_cfg, score, evaluate, path, meta)
    m = sft.before_after(before, result)
    if train.rank() == 0:
        strength = f"beta={cfg.beta}" if cfg.algo == "gpro" else f"kl_coef={cfg.kl_coef}, mu={cfg.mu}"
        rows = [("train seconds", m["train_seconds"])]
        if cfg.algo != "gpro":
            rows.insert(0, ("clipped tokens, mean over steps: low / high", f"{m['clip_ratio/low_mean']:.2%} / "
                                                                          f"{m['clip_ratio/high_mean']:.2%}"))
        train.print_table(f"{cfg.algo.upper()} (K={cfg.k}, {strength}, reward={cfg.reward}) on held-out prompts",
                        sft.before_after_rows(m) + rows)
        train.write_metrics(cfg.algo, {**m, "algo": cfg.algo}, train_cfg.out_dir)  # beside its checkpoint, <algo>.pt
    return policy, m


def train_weighted_likelihood(policy, ref, task, cfg, train_cfg, score, evaluate, path, meta):
    """GPRO: train.train's plain loop, each batch K draws per prompt from pi_ref (from the policy with --online)."""
    device = next(policy.parameters()).device

    def get_batch(i):
        rng = train.step_rng(train_cfg.seed, i)
        prompts = task.sample_prompts(train_cfg.batch_size, rng)
        responses = reward.sample_responses(policy if cfg.online else ref, task, prompts, cfg.k, 1.0,
                                            seed=rng.randrange(2 ** 31))
        return prompts, responses, score(prompts, responses)

    def loss_fn(net, batch):
        prompts, responses, r = batch
        flat_p = [p for p in prompts for _ in range(cfg.k)]
        ids, target = sft.pack(task, flat_p, [y for ys in responses for y in ys], device)
        _, logp = gpt.sequence_logprobs(net, ids, target)
        w = gpro_weights(r, cfg.beta)  # its entropy: ln K when uniform, 0 when one sample takes all
        stats = {"tokens": ids.numel(), "reward": r.mean().item(),
                 "weight_entropy": -(w * w.clamp_min(1e-12).log()).sum(-1).mean().item()}
        return gpro_loss(logp.view(-1, cfg.k), r, cfg.beta) + gpt.aux_loss(policy), stats

    return train.train(policy, train_cfg, get_batch, loss_fn, evaluate, path, meta, desc="gpro", train_mode=False)


def train_grpo(policy, ref, task, cfg, train_cfg, score, evaluate, path, meta):
    """GRPO's loop (Shao et al. 2024, Algorithm 1) from train.Trainer's pieces: each rollout samples a group batch
    with theta_old and records its log-probs, then mu optimizer steps train on it. Returns the Trainer's figures
    plus the clip fractions averaged over all optimizer steps."""
    run = train.Trainer(policy, train_cfg, path, meta, desc=cfg.algo, train_mode=False)  # trains as it samples
    sums = run.state.setdefault("clip_sums", dict.fromkeys(CLIP_KEYS, 0.0))
    while not run.done:
        # 1. Rollout number step // mu with theta_old = the current policy
        rollout, start, t = run.step // cfg.mu, run.step, time.perf_counter()
        rng = train.step_rng(train_cfg.seed, rollout)
        prompts = task.sample_prompts(train_cfg.batch_size, rng)
        g = torch.Generator(device=run.device).manual_seed(rng.randrange(2 ** 31))
        batch, rollout_stats = grpo_rollout(policy, ref, task, prompts, score, cfg, g, train_cfg.dtype)
        run.train_seconds += time.perf_counter() - t  # sampling is training time, as in train.train's get_batch
        # 2. mu optimizer steps on this batch: the ratio pi / pi_old leaves 1 after the first
        for _ in range(cfg.mu):
            if run.done:
                break
            _, stats = run.optimizer_step(lambda micro: grpo_update(run.net, batch, cfg, task.max_response_tokens),
                                          extra=rollout_stats)
            for key in CLIP_KEYS:
                sums[key] += stats[key]
        if run.due(since=start):
            run.validate(evaluate)
    result = run.finish()
    return {**result, **{key: sums[key] / max(1, result["steps"]) for key in CLIP_KEYS}}


def main(argv=None):
    task_cfg, *cfgs = sft.parse_args(list(gpro_defaults()), argv, description="GPRO / GRPO from scalar rewards")
    train_gpro(task_cfg.build(), *cfgs)


if __name__ == "__main__":
    train.run_main(main)
