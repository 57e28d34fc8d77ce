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

GRPO (`--algo grpo`). K samples per prompt from the current policy, group-normalised advantages
A_i = (r_i - mean(r)) / (std(r) + eps) (`--no-std_norm`: r_i - mean(r), as Dr. GRPO argues), the
clipped importance ratio of PPO per token, and kl_coef * KL(pi || pi_ref) per token with the k3
estimator exp(q) - q - 1, q = log pi_ref - log pi; loss averaged per token or per sequence.
"""
import copy
import dataclasses
import os
from dataclasses import dataclass

import torch

import gpt
import reward
import sft
from gpt import arg


def gpro_weights(rewards, beta):
    """w = softmax(r / beta) over the K responses of each prompt: rewards (B, K) -> (B, K)."""
    return torch.softmax(rewards / beta, dim=-1)


def gpro_loss(logps, rewards, beta):
    """-sum_i w_i log pi(y_i | x), averaged over prompts; logps, rewards: (B, K). The weights are constants."""
    return -(gpro_weights(rewards, beta).detach() * logps).sum(-1).mean()


def grpo_advantages(rewards, std_norm=True, eps=1e-4):
    """Group-normalised advantages (B, K): r - mean(r) over the group, divided by its std if std_norm."""
    centred = rewards - rewards.mean(-1, keepdim=True)
    return centred / (rewards.std(-1, keepdim=True) + eps) if std_norm else centred


def grpo_loss(logp, old_logp, ref_logp, adv, mask, clip_eps=0.2, beta=0.04, per_token=True):
    """The GRPO objective as a loss. logp, old_logp, ref_logp, mask: (N, T) per response token
    (mask 1 on the response and its <eos>); adv: (N,) one advantage per response, shared by its tokens.
    Per token: -min(rho A, clip(rho, 1-eps, 1+eps) A) + beta (exp(q) - q - 1), q = ref_logp - logp."""
    rho = torch.exp(logp - old_logp)                                            # importance ratio
    pg = -torch.min(rho * adv[:, None], rho.clamp(1 - clip_eps, 1 + clip_eps) * adv[:, None])
    q = ref_logp - logp
    kl = torch.exp(q) - q - 1                                                   # k3: unbiased, >= 0
    per = (pg + beta * kl) * mask
    if per_token:  # every token of the batch counts the same
        return per.sum() / mask.sum()
    return (per.sum(-1) / mask.sum(-1)).mean()  # each response counts the same


# ----------------------------------------------------------------------------------------------
# Training on the arithmetic task

@dataclass(frozen=True)
class GPROConfig:
    algo: str = arg("gpro", "gpro (weighted likelihood, notes 10.9) | grpo (group advantages, clipped ratio, k3 KL)")
    k: int = arg(8, "responses sampled per prompt")
    beta: float = arg(0.1, "gpro: the tilt's temperature, w = softmax(r / beta), target pi_ref exp(r / beta) / Z")
    kl_coef: float = arg(1.0, "grpo: weight of the k3 KL to the reference (smaller lets GRPO exploit the reward model)")
    reward: str = arg("true", "true (the task's r*, partial credit) | exact (1 if correct else 0) | "
                              "rm (out_dir/reward.pt, trained by reward.py if missing)")
    online: bool = arg(False, "gpro: sample from the current policy instead of the reference (repeated tilting)")
    std_norm: bool = arg(True, "grpo: divide the advantages by the group's std")
    clip_eps: float = arg(0.2, "grpo: ratio clip epsilon")
    per_token: bool = arg(True, "grpo: average the loss over tokens (else over responses)")

    def __post_init__(self):
        gpt.check_choice(self, "algo", ("gpro", "grpo"))
        gpt.check_choice(self, "reward", ("true", "exact", "rm"))
        gpt.check(self.k >= 2 and self.beta > 0 and self.kl_coef >= 0, f"need k >= 2, beta > 0 and kl_coef >= 0, "
                  f"got k={self.k}, beta={self.beta}, kl_coef={self.kl_coef}")
        gpt.check(0 < self.clip_eps < 1, f"clip_eps must be in (0, 1), got {self.clip_eps}")


def gpro_defaults():
    return (sft.TaskConfig(), GPROConfig(),
            gpt.TrainConfig(max_steps=300, batch_size=16, lr=5e-4, min_lr=5e-7, warmup_steps=10,
                            eval_interval=100, weight_decay=0.0))


def train_gpro(task, cfg, train_cfg):
    """The whole stage: SFT policy (and the reward model for --reward rm) -> GPRO or GRPO, the before/after
    table and out_dir/gpro_metrics.json. Returns (policy, metrics)."""
    device = gpt.pick_device(train_cfg.device)
    path = os.path.join(train_cfg.out_dir, f"{cfg.algo}.pt")
    gpt.claim_checkpoint(path, train_cfg)
    policy, sft_ckpt = sft.load_sft_policy(task, train_cfg, device)
    ref = copy.deepcopy(policy).eval().requires_grad_(False)
    rm = reward.load_reward_stage(task, train_cfg, device) if cfg.reward == "rm" else None
    before = {**sft.evaluate_policy(policy, task), "kl": sft.kl_to_reference(policy, ref, task)}

    def score(prompts, responses):
        """Rewards (B, K) of the K responses of each prompt."""
        flat_p, flat_y = [p for p in prompts for _ in range(cfg.k)], [y for ys in responses for y in ys]
        if rm is not None:
            with torch.no_grad():
                return reward.rewards(rm, flat_p, flat_y, device).view(-1, cfg.k)
        r = torch.tensor(sft.true_rewards(flat_p, flat_y), device=device).view(-1, cfg.k)
        return (r == 1).float() if cfg.reward == "exact" else r  # r* is 1 exactly when correct

    def get_batch(i):
        rng = gpt.step_rng(train_cfg.seed, i)
        prompts = sft.sample_prompts(task, train_cfg.batch_size, rng)
        sampler = policy if (cfg.algo == "grpo" or cfg.online) else ref  # GPRO: K draws from pi_ref
        responses = reward.sample_responses(sampler, task, prompts, cfg.k, 1.0, seed=rng.randrange(2 ** 31))
        return prompts, responses, score(prompts, responses)

    def loss_fn(net, batch):
        prompts, responses, r = batch
        flat_p = [p for p in prompts for _ in range(cfg.k)]
        ids, target = sft.pack(flat_p, [y for ys in responses for y in ys], device)
        per_token, logp = gpt.sequence_logprobs(net, ids, target)
        stats = {"tokens": ids.numel(), "reward": r.mean().item()}
        if cfg.algo == "gpro":  # entropy of the weights: ln K when uniform, 0 when one sample takes all
            w = gpro_weights(r, cfg.beta)
            stats["weight_entropy"] = -(w * w.clamp_min(1e-12).log()).sum(-1).mean().item()
            return gpro_loss(logp.view(-1, cfg.k), r, cfg.beta) + gpt.aux_loss(policy), stats
        stats["zero_spread"] = (r.std(-1) == 0).float().mean().item()  # groups that teach nothing
        with torch.no_grad():
            ref_tok, _ = gpt.sequence_logprobs(ref, ids, target)
        # one update per rollout: the old policy is the current one, so the ratio is 1 (with gradient)
        adv = grpo_advantages(r, cfg.std_norm).flatten()
        return grpo_loss(per_token, per_token.detach(), ref_tok, adv, target.float(), cfg.clip_eps, cfg.kl_coef,
                         cfg.per_token) + gpt.aux_loss(policy), stats

    def evaluate(m):
        return {**sft.evaluate_policy(m, task), "kl": sft.kl_to_reference(m, ref, task)}

    meta = {"stage": cfg.algo, "config": dataclasses.asdict(policy.cfg), "task": task.identity,
            "gpro": dataclasses.asdict(cfg), "built_from": {"sft": gpt.provenance(sft_ckpt)}}
    m = sft.before_after(before, gpt.train(policy, train_cfg, get_batch, loss_fn, evaluate, path, meta,
                                           desc=cfg.algo))
    if gpt.rank() == 0:
        strength = f"beta={cfg.beta}" if cfg.algo == "gpro" else f"kl_coef={cfg.kl_coef}"
        gpt.print_table(f"{cfg.algo.upper()} (K={cfg.k}, {strength}, reward={cfg.reward}) on held-out prompts",
                        sft.before_after_rows(m) + [("train seconds", m["train_seconds"])])
        gpt.write_metrics("gpro", {**m, "algo": cfg.algo}, train_cfg.out_dir)
    return policy, m


def main(argv=None):
    train_gpro(*gpt.parse_args(list(gpro_defaults()), argv, description="GPRO / GRPO from scalar rewards"))


if __name__ == "__main__":
    gpt.run_main(main)
