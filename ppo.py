"""
ppo.py: RLHF with PPO (notes 10.5 "Stage 3", 10.6, 10.7; PPO, Schulman et al. 2017; problem set 4.3(b)).

The policy pi_theta and a frozen reference pi_ref both start from out/sft.pt. The objective is
eq. 12: max E_{x, y ~ pi_theta}[R(x, y)] - beta KL(pi_theta || pi_ref), with R the frozen reward
model (out/reward.pt) or, with --reward true, the task's ground-truth scorer r*. Every iteration k
is the notes' nested loop, written out in train_ppo():

1. Rollout: freeze theta_old = theta_k, sample --samples_per_prompt responses for each of a batch of
   prompts (KV cache, temperature T); record per token the old log-prob, the reference log-prob and
   the value V(s_t).
2. Learning signals: per-token reward r_t = -beta KL_t, plus R(x, y) at the last response token; TD
   residuals and GAE by the backward recursion of eq. 15 with done flags; value targets
   G_t = A_t + V(s_t) (eq. 16); advantages whitened. KL_t is the exact per-state KL, the sum over the
   vocabulary (--kl_estimator exact, the default), or notes 10.5's sampled log pi_old(a_t|s_t) -
   log pi_ref(a_t|s_t) (k1), or k3 (kl_estimate).
3. Update: E epochs over minibatches of the rollout (token-step, as in the notes, or whole responses):
   the clipped surrogate, the critic's squared error (optionally clipped), the entropy bonus:
   loss = -(L_actor - c_v L_critic + c_e L_entropy). --kl_mode loss is PPO-KL (notes 10.7): the KL
   leaves the reward and beta E_t[KL(pi_theta(.|s_t) || pi_ref(.|s_t))] becomes a loss term.

The reward in units of its spread (--reward_norm ref, the default): R' = (R - mu) / sigma with mu,
sigma of the reference policy's rewards, a fixed affine map, so eq. 12 is unchanged with beta
measured in reward spreads. Without it beta means ten times more for r* (std about 0.2: most samples
are right, on addition a demonstrator's slip costs one digit of three) than for the reward model (std about 2): at
beta = 0.2, pi_ref exp(r* / beta) / Z is itself only about 80% correct, and the noise of the sampled
KL_t, beta (k1 - exact), weighs as much in the advantages as r*'s spread once the policy has moved.

Why the defaults (measured on the held-out prompts, RESULTS.md): with Adam every step moves each weight
by about lr whatever the gradient's scale, and the first step after each rollout has ratio 1, where the
clip cannot act, so lr sets how far the policy moves per rollout. At 3e-3 the KL to the reference
overshoots to several nats in the first rollouts, the noise of KL_t then outweighs R in the advantages,
and the gain is lost; 3e-4 does not. The exact KL_t has no sampling noise, and its gradient holds the
policy near the reference when a step is too large: at three times the default lr, from the weakest of
three SFT and reward models, k1 drifted to 16 nats of KL and 10% accuracy, exact to 3 nats and back to
73%; at the default lr k1 is a few points higher with the reward model and level with r* (RESULTS.md).
Minibatches are whole responses: a token-step minibatch needs the whole of every response it touches in
the forward pass, so on a transformer each of them costs a full pass over the rollout. Two epochs of two
minibatches give four steps per rollout for the price of two passes, and the clip acts on the last
three.

The critic is a separate transformer initialised from the reward model's trunk, as in InstructGPT:
the value loss then cannot pull on the policy's features, and that trunk already reads what decides
the reward. Its value head starts at zero weights and a bias equal to the mean reward (0 after
normalisation), the right expected return at the start. It learns at --critic_lr_scale times the
policy's learning rate, since it must track returns the policy changes every rollout. Here it explains
little of the return (the outcome is decided when the one token that can go wrong is sampled), so the advantage is
mostly R minus its mean.
"""
import copy
import dataclasses
import os
import random
import time
from dataclasses import dataclass

import torch
import torch.nn as nn

import gpt
import reward
import sft
import train
from gpt import EOS
from train import arg


def gae(rewards, values, dones, gamma, lam):
    """Generalised advantage estimation by the backward recursion of eq. 15, and the value targets of
    eq. 16. rewards, values, dones: (B, T); values[:, t] = V(s_t); dones[:, t] = 1 where the episode
    ends at t (and on padding). delta_t = r_t + gamma (1 - done_t) V(s_{t+1}) - V(s_t),
    A_t = delta_t + gamma lam (1 - done_t) A_{t+1}. Returns (A, G = A + V), both (B, T)."""
    adv = torch.zeros_like(rewards)
    next_adv = next_value = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        keep = 1.0 - dones[:, t]
        delta = rewards[:, t] + gamma * keep * next_value - values[:, t]
        next_adv = delta + gamma * lam * keep * next_adv
        adv[:, t], next_value = next_adv, values[:, t]
    return adv, adv + values


def masked_mean(x, mask):
    return (x * mask).sum() / mask.sum().clamp_min(1)


def whiten(x, mask, eps=1e-8):
    """(x - mean) / std over the positions where mask is 1 (the response tokens of the batch)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + eps) * mask


def clipped_surrogate(logp, old_logp, adv, mask, eps):
    """The actor term as a loss: -(1/|M|) sum min(o_t A_t, clip(o_t, 1-eps, 1+eps) A_t), o_t = pi/pi_old
    (notes 10.6 (III)). Its gradient is zero where the clip is active on the side the advantage
    favours: o > 1+eps with A > 0, o < 1-eps with A < 0. Returns (loss, the share of tokens where it is: TRL's
    clip_ratio/region_mean, the definition gpro.py's GRPO logs too)."""
    o = torch.exp(logp - old_logp)
    surrogate = torch.min(o * adv, o.clamp(1 - eps, 1 + eps) * adv)
    clipped = (((o > 1 + eps) & (adv > 0)) | ((o < 1 - eps) & (adv < 0))).float()
    return -masked_mean(surrogate, mask), masked_mean(clipped, mask)


def critic_loss(v, old_v, target, mask, clip):
    """(V_psi(s_t) - G_t)^2 (notes 10.6 (IV)); with clip > 0 the pessimistic max with the squared error
    of V clipped to old_v +- clip, so the critic, like the actor, moves little per rollout."""
    err = (v - target) ** 2
    if clip > 0:
        err = torch.max(err, (old_v + (v - old_v).clamp(-clip, clip) - target) ** 2)
    return masked_mean(err, mask)


def entropy(logp):
    """H(pi(.|s)) = -sum_a pi(a|s) log pi(a|s) over the last dim (notes 10.6 (V))."""
    return -(logp.exp() * logp).sum(-1)


def kl_full(logp, ref_logp):
    """Exact KL(pi(.|s) || pi_ref(.|s)) = sum_a pi(a|s) (log pi(a|s) - log pi_ref(a|s)) (notes 10.5, 10.7)."""
    return (logp.exp() * (logp - ref_logp)).sum(-1)


def kl_estimate(estimator, logp, ref_logp, dist=None, ref_dist=None):
    """Per-token estimate of KL(pi(.|s_t) || pi_ref(.|s_t)), (B, T), for a_t ~ pi (Schulman 2020,
    "Approximating KL divergence"): logp, ref_logp (B, T) are log pi(a_t|s_t), log pi_ref(a_t|s_t); dist,
    ref_dist (B, T, V) the whole distributions.
      k1     log pi(a_t) - log pi_ref(a_t): notes 10.5's KL_t; unbiased, either sign, noisy
      k3     exp(q) - q - 1, q = log pi_ref(a_t) - log pi(a_t): unbiased, >= 0, lower variance
      exact  sum_a pi(a) log(pi(a) / pi_ref(a)): the expectation of both over a_t, no sampling noise
    The three agree in expectation over a_t, not in their gradients. In the shaped reward only k1's policy
    gradient E_a[grad log pi(a) k1(a)] is grad KL(pi || pi_ref); k3's is grad KL(pi || pi_ref) - grad
    KL(pi_ref || pi), which vanishes to second order near pi_ref (it hardly holds the policy back); exact
    depends on s_t only, so ppo_loss adds its direct part. As a loss term, see kl_loss."""
    if estimator == "k1":
        return logp - ref_logp
    if estimator == "k3":
        q = ref_logp - logp
        return q.exp() - q - 1
    return kl_full(dist, ref_dist)


class RunningMoments:
    """Mean and variance of every value seen so far, merged batch by batch (Chan, Golub and LeVeque 1979):
    the same as torch.mean / torch.var over the concatenation, without keeping it. state() is a plain dict,
    so a resumed run continues the same statistics."""

    def __init__(self, state=None):
        state = state or {"n": 0, "mean": 0.0, "m2": 0.0}
        self.n, self.mean, self.m2 = state["n"], state["mean"], state["m2"]

    def update(self, x):
        n, mean, m2 = x.numel(), x.mean().item(), ((x - x.mean()) ** 2).sum().item()
        delta, total = mean - self.mean, self.n + n
        self.mean += delta * n / total
        self.m2 += m2 + delta ** 2 * self.n * n / total
        self.n = total

    @property
    def std(self):
        return (self.m2 / max(1, self.n - 1)) ** 0.5

    def state(self):
        return {"n": self.n, "mean": self.mean, "m2": self.m2}


def normalise_rewards(R, mode, ref_moments, running):
    """The terminal reward in units of its spread, (R - mu) / sigma, so that beta means the same for the reward
    model (std about 2) and r* (std about 0.2):
      none     R unchanged (beta in the reward's own units)
      ref      mu, sigma of the reference policy's rewards, measured once before training: a fixed affine
               map, so the objective is eq. 12 with beta * sigma in the reward's units
      running  mu, sigma of every reward seen in training so far, this batch included
      batch    mu, sigma of this rollout only (as the policy becomes consistently right, sigma shrinks and
               the same KL weighs less and less: whitening of a nearly constant reward)
    ref_moments, running: RunningMoments (running is updated with R here)."""
    if mode == "none":
        return R
    if mode == "batch":
        return (R - R.mean()) / (R.std() + 1e-8) if R.numel() > 1 else R - R.mean()
    moments = ref_moments if mode == "ref" else running
    if mode == "running":
        running.update(R)
    return (R - moments.mean) / (moments.std + 1e-8)


class Critic(nn.Module):
    """V_psi(s_t): a transformer trunk and a scalar value head on its hidden state at each position."""

    def __init__(self, trunk):
        super().__init__()
        self.trunk, self.head = trunk, nn.Linear(trunk.cfg.n_embd, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, idx, attn_mask=None):
        return self.head(self.trunk.hidden_states(idx, attn_mask)).squeeze(-1).float()      # (B, T)


class ActorCritic(nn.Module):
    """The two trained networks in one module, so that one forward (and DDP) serves both."""

    def __init__(self, policy, critic):
        super().__init__()
        self.policy, self.critic = policy, critic

    def forward(self, idx, attn_mask=None):
        """Policy logits (B, T, V) and V_psi of the state that ends at each position (B, T)."""
        return self.policy(idx, attn_mask=attn_mask), self.critic(idx, attn_mask)


@dataclass(frozen=True)
class PPOConfig:
    reward: str = arg("rm", "rm (out_dir/reward.pt, trained by reward.py if missing) | true (the task's r*)")
    beta: float = arg(0.2, "KL coefficient beta of eq. 12 (in units of the reward's spread under --reward_norm)")
    kl_mode: str = arg("shaping", "shaping (-beta KL_t in the per-token reward, notes 10.5) | loss (PPO-KL, "
                                  "notes 10.7)")
    kl_estimator: str = arg("exact", "the per-token KL_t: exact (the sum over the vocabulary) | k1 (log pi - log "
                                     "pi_ref, notes 10.5) | k3 (exp(q) - q - 1)")
    reward_norm: str = arg("ref", "the terminal reward as (R - mu) / sigma: none | ref (mu, sigma of the reference "
                                   "policy's samples, fixed) | running (all rollouts so far) | batch (this rollout)")
    samples_per_prompt: int = arg(1, "responses sampled per prompt in each rollout (batch_size prompts each)")
    kl_target: float = arg(0.0, "adapt beta towards this KL per response after every rollout (0 = fixed beta)")
    gamma: float = arg(1.0, "discount")
    lam: float = arg(0.95, "GAE lambda")
    clip_eps: float = arg(0.2, "ratio clip epsilon")
    value_clip: float = arg(0.0, "clip the critic's change per rollout to this (0 = plain squared error)")
    critic_lr_scale: float = arg(10.0, "the critic's learning rate as a multiple of the policy's")
    c_v: float = arg(0.5, "critic loss coefficient c_v")
    c_e: float = arg(0.0, "entropy bonus coefficient c_e")
    epochs: int = arg(2, "epochs E over each rollout")
    minibatches: int = arg(2, "minibatches per epoch")
    minibatch: str = arg("sequences", "tokens (token-step minibatches, a random partition of the rollout's tokens, "
                                      "notes 10.6: every step runs on all its responses) | sequences (episode-level, "
                                      "a random partition of its responses: a step runs on its share of them only)")
    temperature: float = arg(1.0, "sampling temperature of the rollouts (log-probs use the same)")
    top_k: int = arg(0, "top-k of the rollouts (0 = off; the log-probs do not see the truncation)")
    top_p: float = arg(1.0, "top-p of the rollouts (1 = off; likewise)")
    missing_eos_penalty: float = arg(0.0, "subtracted from R when a response hits the length limit")
    whiten_adv: bool = arg(True, "whiten the advantages over the rollout's response tokens")

    def __post_init__(self):
        train.check_choice(self, "reward", ("rm", "true"))
        train.check_choice(self, "kl_mode", ("shaping", "loss"))
        train.check_choice(self, "kl_estimator", ("k1", "k3", "exact"))
        train.check_choice(self, "reward_norm", ("none", "ref", "running", "batch"))
        train.check_choice(self, "minibatch", ("tokens", "sequences"))
        train.check(self.beta >= 0 and self.kl_target >= 0 and self.temperature > 0,
                  "need beta >= 0, kl_target >= 0 and temperature > 0")
        train.check(min(self.epochs, self.minibatches, self.samples_per_prompt) >= 1,
                  "epochs, minibatches and samples_per_prompt must be >= 1")
        train.check(0 <= self.gamma <= 1 and 0 <= self.lam <= 1 and 0 < self.clip_eps < 1,
                  "need gamma and lam in [0, 1] and clip_eps in (0, 1)")
        train.check(self.value_clip >= 0 and self.critic_lr_scale > 0 and self.c_v >= 0 and self.c_e >= 0,
                  "need value_clip >= 0, critic_lr_scale > 0, c_v >= 0 and c_e >= 0")
        train.check(self.missing_eos_penalty >= 0, f"missing_eos_penalty must be >= 0, got {self.missing_eos_penalty}")
        gpt.check_sampling(self.temperature, self.top_k, self.top_p)


@torch.no_grad()
def rollout(model, ref, task, prompts, score, cfg, beta, generator, dtype="auto", normalise=None):
    """Step 1 and 2 of the nested loop for one batch of prompts: sample with theta_old, record the old
    and reference log-probs and values, and compute the rewards, advantages and value targets.
    score(prompts, responses) -> (R (B,), stats); normalise(R) -> R in the units beta is given in (default:
    unchanged). Returns the batch (a dict of (B, T) tensors) and stats."""
    device = next(model.parameters()).device
    outs = gpt.generate(model.policy, [task.prompt_tokens(p) for p in prompts], task.max_response_tokens,
                        cfg.temperature, cfg.top_k, cfg.top_p, generator=generator)
    ids, resp = sft.pack_generated(task, prompts, outs, device)
    mask = resp.float()
    m = resp.bool()
    with train.autocast(device, dtype):  # the precision of the update, so that the first ratio is exactly 1
        logits, values = model(ids)
        old_logp, old_dist = gpt.shifted_logprobs(logits, ids, resp, cfg.temperature)
        ref_logp, ref_dist = gpt.shifted_logprobs(ref(ids), ids, resp, cfg.temperature)
    values = torch.cat([torch.zeros_like(values[:, :1]), values[:, :-1]], 1) * mask  # V(s_t), s_t ends at t-1
    R_raw, stats = score(prompts, [sft.strip_eos(o) for o in outs])
    R_raw = R_raw - cfg.missing_eos_penalty * torch.tensor([EOS not in o for o in outs], device=device).float()
    R = normalise(R_raw) if normalise else R_raw
    last = (resp * torch.arange(ids.shape[1], device=device)).argmax(1)          # the last response token
    rows = torch.arange(len(outs), device=device)
    kl_t = kl_estimate(cfg.kl_estimator, old_logp, ref_logp, old_dist, ref_dist) * mask  # KL_t of theta_old
    terminal = torch.zeros_like(kl_t)
    terminal[rows, last] = R                                                     # R(x, y) at t = T_b
    shaping = -beta * kl_t if cfg.kl_mode == "shaping" else torch.zeros_like(kl_t)
    rewards = shaping + terminal
    dones = 1.0 - mask
    dones[rows, last] = 1.0
    adv, returns = gae(rewards, values, dones, cfg.gamma, cfg.lam)
    # What the advantages are made of: GAE is linear in (rewards, values), so A = A_R + A_KL + A_V, the GAE of
    # the terminal reward alone, of the KL shaping alone and of the values alone (the critic's baseline).
    zeros = torch.zeros_like(rewards)
    parts = {name: gae(r, v, dones, cfg.gamma, cfg.lam)[0][m].std().item()
             for name, (r, v) in {"adv_R": (terminal, zeros), "adv_kl": (shaping, zeros),
                                  "adv_V": (zeros, values)}.items()}
    log_ratio = (old_logp - ref_logp) * mask
    exact = kl_full(old_dist, ref_dist) * mask
    stats = {**stats, **parts, "adv_std": adv[m].std().item(), "R_std": R.std().item() if len(outs) > 1 else 0.0,
             "kl_ref": log_ratio.sum(1).mean().item(),       # sum_t k1 = log pi_old(y|x) / pi_ref(y|x), notes 10.5
             "kl_exact": exact.sum(1).mean().item(),         # sum_t of the exact per-state KL: the same in expectation
             "kl_t_noise": (log_ratio - exact)[m].std().item(),  # the sampling noise of k1 per token
             "length": mask.sum(1).mean().item(), "beta": beta,
             "explained_var": (1 - (returns - values)[m].var() / returns[m].var().clamp_min(1e-8)).item()}
    if cfg.whiten_adv:
        adv = whiten(adv, mask)
    batch = {"ids": ids, "resp": resp, "old_logp": old_logp, "ref_logp": ref_logp, "ref_dist": ref_dist,
             "values": values, "adv": adv, "returns": returns}
    return batch, stats


def kl_loss(estimator, logp, old_logp, ref_logp, dist, ref_dist, mask):
    """PPO-KL's penalty E_t[KL(pi_theta(.|s_t) || pi_ref(.|s_t))] (notes 10.7) on tokens sampled from pi_old. exact:
    the per-state sum over the vocabulary. k1, k3: the estimate at a_t weighted by the ratio o_t = pi / pi_old, so
    that its expectation is under pi_theta; at theta = theta_old the gradient of both is then that of the
    exact KL, E_old[grad log pi(a) log(pi(a) / pi_ref(a))] (k3 without the constant term of k1's). Without
    o_t, k1's gradient would vanish in expectation and k3's would be that of KL(pi_ref || pi)."""
    if estimator == "exact":
        return masked_mean(kl_full(dist, ref_dist), mask)
    o = torch.exp(logp - old_logp)
    return masked_mean(o * kl_estimate(estimator, logp, ref_logp), mask)


def ppo_loss(net, batch, mask, cfg, beta):
    """Step 3 on one token-step minibatch (mask (B, T) selects its tokens). Returns (loss, stats)."""
    rows = mask.any(1)                      # only the sequences that have a token in this minibatch
    b = {k: v[rows] for k, v in batch.items()}
    mask = mask[rows].float()
    logits, values = net(b["ids"])
    logp, dist = gpt.shifted_logprobs(logits, b["ids"], b["resp"], cfg.temperature)
    values = torch.cat([torch.zeros_like(values[:, :1]), values[:, :-1]], 1)
    actor, clip_frac = clipped_surrogate(logp, b["old_logp"], b["adv"], mask, cfg.clip_eps)
    critic = critic_loss(values, b["values"], b["returns"], mask, cfg.value_clip)
    ent = masked_mean(entropy(dist), mask)
    loss = actor + cfg.c_v * critic - cfg.c_e * ent                  # minus the notes' L^PPO
    log_ratio = (logp - b["old_logp"]).detach()
    stats = {"tokens": int(mask.sum()), "clip_ratio/region_mean": clip_frac.item(), "value_loss": critic.item(),
             "entropy": ent.item(),
             "approx_kl": masked_mean(log_ratio.exp() - 1 - log_ratio, mask).item()}  # k3 KL(old || new)
    if cfg.kl_mode == "loss" or cfg.kl_estimator == "exact":         # PPO-KL: + beta E_t[KL(pi || pi_ref)]
        # (shaping with the exact KL: the reward -beta KL(pi_old(.|s_t) || pi_ref) depends on s_t only, so the
        # policy gradient sees how a_t changes the later states' KL but not KL at s_t itself; this term is that
        # direct part, which k1's own token holds in expectation: E_a[grad log pi(a) k1(a)] = grad KL(s_t))
        kl = kl_loss(cfg.kl_estimator, logp, b["old_logp"], b["ref_logp"], dist, b["ref_dist"], mask)
        loss = loss + beta * kl
        stats["kl_loss"] = kl.item()
    return loss, stats


def ppo_defaults():
    # batch_size: prompts per rollout; each rollout gives epochs * minibatches optimizer steps. 300 rollouts
    # (1200 steps) train in 63-75 s on two idle cores; 1600 steps took 80-97 s for about a point more (RESULTS.md)
    return (sft.TaskConfig(), PPOConfig(),
            train.TrainConfig(max_steps=1200, batch_size=64, lr=3e-4, min_lr=3e-5, warmup_steps=10,
                            eval_interval=400, weight_decay=0.0))


def train_ppo(task, cfg, train_cfg):
    """The whole stage: SFT policy and reward model -> the nested PPO loop (rollout, then epochs, then
    minibatches of token steps or of responses), the before/after table and out_dir/ppo_metrics.json.
    Returns (policy, metrics)."""
    train.check(train_cfg.grad_accum == 1, "PPO's minibatches are its accumulation: use --minibatches, not "
                "--grad_accum")
    n = train_cfg.batch_size * cfg.samples_per_prompt
    train.check(cfg.minibatches <= n, f"--minibatches {cfg.minibatches} is more than the {n} responses of a rollout "
              "(batch_size x samples_per_prompt), so some minibatches would be empty: use fewer")
    device = train.pick_device(train_cfg.device)
    path = os.path.join(train_cfg.out_dir, "ppo.pt")
    train.claim_checkpoint(path, train_cfg)
    policy, sft_ckpt = sft.load_sft_policy(task, train_cfg, device)
    ref = copy.deepcopy(policy).eval().requires_grad_(False)
    rm = reward.load_reward_stage(task, train_cfg, device, sft_ckpt).requires_grad_(False)
    # The critic is a trunk initialised from the reward model's, trained (requires_grad on again).
    critic = Critic(copy.deepcopy(rm.backbone).requires_grad_(True)).to(device)
    model = ActorCritic(policy, critic)
    held = task.heldout_prompts()

    def heldout(pi):
        """Held-out accuracy, r* and KL, and the reward model's mean score of held-out samples: when it
        climbs while r* falls, the policy is exploiting the reward model (over-optimisation)."""
        responses = [ys[0] for ys in reward.sample_responses(pi, task, held, 1, cfg.temperature, seed=0)]
        return {**sft.evaluate_policy(pi, task), "kl": sft.kl_to_reference(pi, ref, task),
                "rm_score": reward.rewards(rm, task, held, responses, device).mean().item()}

    def score(prompts, responses):
        """R (B,) from the reward model or r*, and both means for the log: their gap is over-optimisation."""
        true = torch.tensor(task.true_rewards(prompts, responses), device=device)
        rm_score = reward.rewards(rm, task, prompts, responses, device)
        stats = {"r_true": true.mean().item(), "r_rm": rm_score.mean().item()}
        return (rm_score if cfg.reward == "rm" else true), stats

    before = heldout(policy)
    # The reference policy's rewards on 256 training prompts: mu and sigma of --reward_norm ref (the start of
    # --reward_norm running), and the critic's start. V starts at the mean reward in the units of the
    # rollouts: R's mean without normalisation (about 0 for the reward model, which is normalised that way;
    # about 0.84 for r*), else 0. A critic that starts far off makes GAE's advantages depend on the position
    # in the response (A_t = lam^(T-t) R - V for V = 0), which the policy then learns.
    prompts = task.sample_prompts(256, random.Random(train_cfg.seed - 1))
    responses = reward.sample_responses(policy, task, prompts, 1, cfg.temperature, seed=train_cfg.seed - 1)
    ref_moments = RunningMoments()
    ref_moments.update(score(prompts, [ys[0] for ys in responses])[0])
    with torch.no_grad():
        critic.head.bias.fill_(ref_moments.mean if cfg.reward_norm == "none" else 0.0)
    meta = {"stage": "ppo", "config": dataclasses.asdict(policy.cfg), "task": task.identity,
            "ppo": dataclasses.asdict(cfg), "built_from": {"sft": train.provenance(sft_ckpt)}}
    # train_mode=False: the policy trains as it samples (no dropout, no MoE capacity), so the first ratio is 1
    run = train.Trainer(model, train_cfg, path, meta, groups=[(policy, 1.0), (critic, cfg.critic_lr_scale)],
                      saved={"model": policy, "critic": critic}, desc="ppo", train_mode=False)
    run.state.setdefault("beta", cfg.beta)
    running = RunningMoments(run.state.get("reward_moments", ref_moments.state()))

    def normalise(R):
        R = normalise_rewards(R, cfg.reward_norm, ref_moments, running)
        run.state["reward_moments"] = running.state()
        return R

    while not run.done:
        # 1-2. Rollout k with theta_old = the current policy: samples for batch_size prompts, samples_per_prompt
        # responses each; log-probs, values, rewards, GAE. Its seconds count as training time (the Trainer
        # counts its optimizer steps), so that --max_seconds compares PPO with other stages at equal wall time.
        t = time.perf_counter()
        k, start = run.step // (cfg.epochs * cfg.minibatches), run.step
        rng = train.step_rng(train_cfg.seed, k)
        prompts = [p for p in task.sample_prompts(train_cfg.batch_size, rng)
                   for _ in range(cfg.samples_per_prompt)]
        g = torch.Generator(device=device).manual_seed(rng.randrange(2 ** 31))
        batch, rollout_stats = rollout(model, ref, task, prompts, score, cfg, run.state["beta"], g, train_cfg.dtype,
                                       normalise)
        if cfg.kl_target:  # adaptive KL coefficient (Ziegler et al. 2019): proportional control of beta
            # on the exact per-state KL summed over the response: the same expectation as the summed k1, less noise
            error = max(-0.2, min(0.2, rollout_stats["kl_exact"] / cfg.kl_target - 1))
            run.state["beta"] *= 1 + 0.1 * error
        run.train_seconds += time.perf_counter() - t
        # 3. E epochs over the rollout, each split into minibatches: a random partition of its tokens (token-step
        # minibatches, notes 10.6) or of its responses (episode-level)
        resp = batch["resp"].bool()
        for epoch in range(cfg.epochs):
            part_of = minibatch_parts(resp, cfg.minibatches, cfg.minibatch, random_generator(rng)).to(device)
            for part in range(cfg.minibatches):
                if run.done:
                    break
                run.optimizer_step(lambda micro: ppo_loss(run.net, batch, resp & (part_of == part), cfg,
                                                          run.state["beta"]), extra=rollout_stats)
        if run.due(since=start):
            run.validate(lambda m: heldout(m.policy))
    m = sft.before_after(before, run.finish())
    if train.rank() == 0:
        train.print_table(f"PPO (reward={cfg.reward}, reward_norm={cfg.reward_norm}, beta={cfg.beta}, "
                        f"kl_mode={cfg.kl_mode}, kl_estimator={cfg.kl_estimator}, "
                        f"samples_per_prompt={cfg.samples_per_prompt}) on held-out prompts",
                        sft.before_after_rows(m) + [
                            ("reward model score, sampled", f"{m['before']['rm_score']:.3f} -> {m['rm_score']:.3f}"),
                            ("train seconds", m["train_seconds"])])
        train.write_metrics("ppo", m, train_cfg.out_dir)
    return policy, m


def minibatch_parts(resp, n, by, generator):
    """(B, T) minibatch index in 0..n-1 of every token: independently per token (by="tokens"), or one per response,
    the responses dealt round-robin in a random order so that the parts differ in size by one at most."""
    if by == "tokens":
        return torch.randint(n, resp.shape, generator=generator)
    order = torch.randperm(resp.shape[0], generator=generator)
    part = torch.empty_like(order)
    part[order] = torch.arange(resp.shape[0]) % n
    return part[:, None].expand(resp.shape).contiguous()


def random_generator(rng):
    """A torch CPU generator seeded from the Python stream rng."""
    return torch.Generator().manual_seed(rng.randrange(2 ** 31))


def main(argv=None):
    task_cfg, *cfgs = sft.parse_args(list(ppo_defaults()), argv, description="RLHF with PPO")
    train_ppo(task_cfg.build(), *cfgs)


if __name__ == "__main__":
    train.run_main(main)
