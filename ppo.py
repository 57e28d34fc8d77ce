"""
ppo.py: RLHF with PPO (notes 10.5 "Stage 3", 10.6, 10.7; problem set 4.3(b)).

The policy pi_theta and a frozen reference pi_ref both start from out/sft.pt. The objective is
eq. 12: max E_{x, y ~ pi_theta}[R(x, y)] - beta KL(pi_theta || pi_ref), with R the frozen reward
model (out/reward.pt) or, with --reward true, the task's ground-truth scorer r*. Every iteration k
is the notes' nested loop:

1. Rollout: freeze theta_old = theta_k, sample a response for each of a batch of prompts (KV cache,
   temperature T); record per token the old log-prob, the reference log-prob and the value V(s_t).
2. Learning signals: per-token reward r_t = -beta KL_t, KL_t = log pi_old(a_t|s_t) - log pi_ref(a_t|s_t),
   plus R(x, y) at the last response token; TD residuals and GAE by the backward recursion of
   eq. 15 with done flags; value targets G_t = A_t + V(s_t) (eq. 16); advantages whitened.
3. Update: E epochs over token-step minibatches of the rollout: the clipped surrogate, the critic's
   squared error (optionally clipped), the entropy bonus: loss = -(L_actor - c_v L_critic + c_e L_entropy).
   --kl_mode loss is PPO-KL (notes 10.7): the exact per-token KL(pi_theta || pi_ref) over the whole
   vocabulary becomes a loss term and leaves the reward.

The critic is a separate transformer initialised from the reward model's trunk, as in InstructGPT:
the value loss then cannot pull on the policy's features, and that trunk already reads what decides
the reward. Its value head starts at zero weights and a bias equal to the SFT policy's mean reward, the
right expected return at the start. It learns at --critic_lr_scale
times the policy's learning rate, since it must track returns the policy changes every rollout.
"""
import copy
import dataclasses
import os
import random
from dataclasses import dataclass

import torch
import torch.nn as nn

import gpt
import reward
import sft
from gpt import EOS, arg


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
    favours: o > 1+eps with A > 0, o < 1-eps with A < 0. Returns (loss, clip fraction)."""
    o = torch.exp(logp - old_logp)
    surrogate = torch.min(o * adv, o.clamp(1 - eps, 1 + eps) * adv)
    clipped = ((o - 1).abs() > eps).float()
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
    beta: float = arg(0.2, "KL coefficient beta of eq. 12")
    kl_mode: str = arg("shaping", "shaping (-beta KL_t in the per-token reward, notes 10.5) | loss (PPO-KL, notes 10.7)")
    kl_target: float = arg(0.0, "adapt beta towards this KL per response after every rollout (0 = fixed beta)")
    gamma: float = arg(1.0, "discount")
    lam: float = arg(0.95, "GAE lambda")
    clip_eps: float = arg(0.2, "ratio clip epsilon")
    value_clip: float = arg(0.0, "clip the critic's change per rollout to this (0 = plain squared error)")
    critic_lr_scale: float = arg(10.0, "the critic's learning rate as a multiple of the policy's")
    c_v: float = arg(0.5, "critic loss coefficient c_v")
    c_e: float = arg(0.0, "entropy bonus coefficient c_e")
    epochs: int = arg(2, "epochs E over each rollout")
    minibatches: int = arg(2, "token-step minibatches per epoch")
    temperature: float = arg(1.0, "sampling temperature of the rollouts (log-probs use the same)")
    top_k: int = arg(0, "top-k of the rollouts (0 = off; the log-probs do not see the truncation)")
    top_p: float = arg(1.0, "top-p of the rollouts (1 = off; likewise)")
    missing_eos_penalty: float = arg(0.0, "subtracted from R when a response hits the length limit")
    whiten_adv: bool = arg(True, "whiten the advantages over the rollout's response tokens")

    def __post_init__(self):
        gpt.check_choice(self, "reward", ("rm", "true"))
        gpt.check_choice(self, "kl_mode", ("shaping", "loss"))
        gpt.check(self.beta >= 0 and self.kl_target >= 0 and self.temperature > 0,
                  "need beta >= 0, kl_target >= 0 and temperature > 0")
        gpt.check(min(self.epochs, self.minibatches) >= 1, "epochs and minibatches must be >= 1")
        gpt.check(0 <= self.gamma <= 1 and 0 <= self.lam <= 1 and 0 < self.clip_eps < 1,
                  "need gamma and lam in [0, 1] and clip_eps in (0, 1)")
        gpt.check(self.value_clip >= 0 and self.critic_lr_scale > 0 and self.c_v >= 0 and self.c_e >= 0,
                  "need value_clip >= 0, critic_lr_scale > 0, c_v >= 0 and c_e >= 0")
        gpt.check(self.missing_eos_penalty >= 0, f"missing_eos_penalty must be >= 0, got {self.missing_eos_penalty}")
        gpt.check_sampling(self.temperature, self.top_k, self.top_p)


@torch.no_grad()
def rollout(model, ref, task, prompts, score, cfg, beta, generator, dtype="auto"):
    """Step 1 and 2 of the nested loop for one batch of prompts: sample with theta_old, record the old
    and reference log-probs and values, and compute the rewards, advantages and value targets.
    score(prompts, responses) -> (R (B,), stats). Returns the batch (a dict of (B, T) tensors) and stats."""
    device = next(model.parameters()).device
    outs = gpt.generate(model.policy, [sft.prompt_tokens(a, b) for a, b in prompts], task.max_response_tokens,
                        cfg.temperature, cfg.top_k, cfg.top_p, generator=generator)
    ids, resp = sft.pack_generated(prompts, outs, device)
    mask = resp.float()
    with gpt.autocast(device, dtype):  # the precision of the update, so that the first ratio is exactly 1
        logits, values = model(ids)
        old_logp, _ = gpt.shifted_logprobs(logits, ids, resp, cfg.temperature)
        ref_logp, ref_dist = gpt.shifted_logprobs(ref(ids), ids, resp, cfg.temperature)
    values = torch.cat([torch.zeros_like(values[:, :1]), values[:, :-1]], 1) * mask  # V(s_t), s_t ends at t-1
    R, stats = score(prompts, [sft.strip_eos(o) for o in outs])
    R = R - cfg.missing_eos_penalty * torch.tensor([EOS not in o for o in outs], device=device).float()
    last = (resp * torch.arange(ids.shape[1], device=device)).argmax(1)          # the last response token
    kl_t = (old_logp - ref_logp) * mask                                          # KL_t on the sampled tokens
    rewards = -beta * kl_t if cfg.kl_mode == "shaping" else torch.zeros_like(kl_t)
    rewards[torch.arange(len(outs)), last] += R                                  # + R(x, y) at t = T_b
    dones = 1.0 - mask
    dones[torch.arange(len(outs)), last] = 1.0
    adv, returns = gae(rewards, values, dones, cfg.gamma, cfg.lam)
    if cfg.whiten_adv:
        adv = whiten(adv, mask)
    resid = (returns - values)[resp.bool()]
    stats = {**stats, "kl_ref": kl_t.sum(1).mean().item(), "length": mask.sum(1).mean().item(), "beta": beta,
             "explained_var": (1 - resid.var() / returns[resp.bool()].var().clamp_min(1e-8)).item()}
    batch = {"ids": ids, "resp": resp, "old_logp": old_logp, "ref_dist": ref_dist, "values": values,
             "adv": adv, "returns": returns}
    return batch, stats


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
    if cfg.kl_mode == "loss":                                         # PPO-KL: + beta E_t[KL(pi || pi_ref)]
        loss = loss + beta * masked_mean(kl_full(dist, b["ref_dist"]), mask)
    log_ratio = (logp - b["old_logp"]).detach()
    stats = {"tokens": int(mask.sum()), "clip_frac": clip_frac.item(), "value_loss": critic.item(),
             "entropy": ent.item(),
             "approx_kl": masked_mean(log_ratio.exp() - 1 - log_ratio, mask).item()}  # k3 KL(old || new)
    return loss, stats


def ppo_defaults():
    # batch_size: prompts per rollout; each rollout gives epochs * minibatches optimizer steps
    return (sft.TaskConfig(), PPOConfig(),
            gpt.TrainConfig(max_steps=800, batch_size=64, lr=3e-6, min_lr=3e-7, warmup_steps=10,
                            eval_interval=200, weight_decay=0.0))


def train_ppo(task, cfg, train_cfg):
    """The whole stage: SFT policy and reward model -> the nested PPO loop (rollout, then epochs, then
    token-step minibatches), the before/after table and out_dir/ppo_metrics.json. Returns (policy, metrics)."""
    gpt.check(train_cfg.grad_accum == 1, "PPO's minibatches are its accumulation: use --minibatches, not --grad_accum")
    device = gpt.pick_device(train_cfg.device)
    path = os.path.join(train_cfg.out_dir, "ppo.pt")
    gpt.claim_checkpoint(path, train_cfg)
    policy, sft_ckpt = sft.load_sft_policy(task, train_cfg, device)
    ref = copy.deepcopy(policy).eval().requires_grad_(False)
    rm = reward.load_reward_stage(task, train_cfg, device).requires_grad_(False)
    # The critic is a trunk initialised from the reward model's, trained (requires_grad on again).
    critic = Critic(copy.deepcopy(rm.backbone).requires_grad_(True)).to(device)
    model = ActorCritic(policy, critic)
    held = sft.heldout_prompts(task)

    def heldout(pi):
        """Held-out accuracy, r* and KL, and the reward model's mean score of held-out samples: when it
        climbs while r* falls, the policy is exploiting the reward model (over-optimisation)."""
        responses = [ys[0] for ys in reward.sample_responses(pi, task, held, 1, cfg.temperature, seed=0)]
        return {**sft.evaluate_policy(pi, task), "kl": sft.kl_to_reference(pi, ref, task),
                "rm_score": reward.rewards(rm, held, responses, device).mean().item()}

    def score(prompts, responses):
        """R (B,) from the reward model or r*, and both means for the log: their gap is over-optimisation."""
        true = torch.tensor(sft.true_rewards(prompts, responses), device=device)
        rm_score = reward.rewards(rm, prompts, responses, device)
        return (rm_score if cfg.reward == "rm" else true), {"r_true": true.mean().item(), "r_rm": rm_score.mean().item()}

    before = heldout(policy)
    # V starts at the SFT policy's mean reward on training prompts (about 0 for the reward model, which is
    # normalised that way; about 0.87 for r*). A critic that starts far off makes GAE's advantages depend
    # on the position in the response (A_t = lam^(T-t) R - V for V = 0), which the policy then learns.
    prompts = sft.sample_prompts(task, 256, random.Random(train_cfg.seed - 1))
    responses = reward.sample_responses(policy, task, prompts, 1, cfg.temperature, seed=train_cfg.seed - 1)
    with torch.no_grad():
        critic.head.bias.fill_(score(prompts, [ys[0] for ys in responses])[0].mean().item())
    meta = {"stage": "ppo", "config": dataclasses.asdict(policy.cfg), "task": task.identity,
            "ppo": dataclasses.asdict(cfg), "built_from": {"sft": gpt.provenance(sft_ckpt)}}
    run = gpt.Trainer(model, train_cfg, path, meta, groups=[(policy, 1.0), (critic, cfg.critic_lr_scale)],
                      saved={"model": policy, "critic": critic}, desc="ppo")
    run.state.setdefault("beta", cfg.beta)
    while not run.done:
        # 1-2. Rollout k with theta_old = the current policy: samples, log-probs, values, rewards, GAE
        k, start = run.step // (cfg.epochs * cfg.minibatches), run.step
        rng = gpt.step_rng(train_cfg.seed, k)
        prompts = sft.sample_prompts(task, train_cfg.batch_size, rng)
        g = torch.Generator(device=device).manual_seed(rng.randrange(2 ** 31))
        model.eval()
        batch, rollout_stats = rollout(model, ref, task, prompts, score, cfg, run.state["beta"], g, train_cfg.dtype)
        model.train()
        if cfg.kl_target:  # adaptive KL coefficient (Ziegler et al. 2019): proportional control of beta
            error = max(-0.2, min(0.2, rollout_stats["kl_ref"] / cfg.kl_target - 1))
            run.state["beta"] *= 1 + 0.1 * error
        # 3. E epochs over the rollout, each split into token-step minibatches (a random partition of its tokens)
        resp = batch["resp"].bool()
        for epoch in range(cfg.epochs):
            part_of = torch.randint(cfg.minibatches, resp.shape, generator=random_generator(rng)).to(device)
            for part in range(cfg.minibatches):
                if run.done:
                    break
                run.optimizer_step(lambda micro: with_stats(
                    ppo_loss(run.net, batch, resp & (part_of == part), cfg, run.state["beta"]), rollout_stats))
        if run.due(since=start):
            run.validate(lambda m: heldout(m.policy))
    m = sft.before_after(before, run.finish())
    if gpt.rank() == 0:
        gpt.print_table(f"PPO (reward={cfg.reward}, beta={cfg.beta}, kl_mode={cfg.kl_mode}) on held-out prompts",
                        sft.before_after_rows(m) + [
                            ("reward model score, sampled", f"{m['before']['rm_score']:.3f} -> {m['rm_score']:.3f}"),
                            ("train seconds", m["train_seconds"])])
        gpt.write_metrics("ppo", m, train_cfg.out_dir)
    return policy, m


def random_generator(rng):
    """A torch CPU generator seeded from the Python stream rng."""
    return torch.Generator().manual_seed(rng.randrange(2 ** 31))


def with_stats(loss_and_stats, extra):
    loss, stats = loss_and_stats
    return loss, {**extra, **stats}


def main(argv=None):
    train_ppo(*gpt.parse_args(list(ppo_defaults()), argv, description="RLHF with PPO"))


if __name__ == "__main__":
    gpt.run_main(main)
