"""
reward.py: preference data from a simulated labeller, and a reward model trained on it (notes 10.5,
"Stage 2: Reward Modelling"; InstructGPT, Ouyang et al. 2022).

Preference data: for training prompts, the SFT policy samples responses; a simulated labeller who
knows the true reward r* of sft.py prefers y1 over y2 with the Bradley-Terry probability
    P(y1 > y2) = sigmoid((r*(y1) - r*(y2)) / tau)   (Bradley & Terry 1952; homework 2; problem set 4.3(c)(i))
and ranks K responses by Plackett-Luce sampling from the same model. No model can agree with such
noisy labels more often than the noise ceiling, mean over pairs of max(P, 1 - P), printed beside
the reward model's accuracy. dpo.py reuses this data code.

Reward model: the SFT transformer with its LM head replaced by a scalar head W_r p + b_r on a pooled
hidden state p (last non-pad token, mean over the response, the <eos> token, or the mean of M learned
latents that cross-attend to the whole sequence, notes 4.5-4.6), trained with the Bradley-Terry, hinge,
MSE or listwise loss. Saves out/reward.pt.
"""
import copy
import dataclasses
import math
import os
import random
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import gpt
import sft
import train
from gpt import EOS
from kernels import attention
from train import UserError, arg

# ----------------------------------------------------------------------------------------------
# 1. Preference data


@dataclass(frozen=True)
class PrefConfig:
    n_pairs: int = arg(24000, "training comparisons (pairs, or K-way rankings for --loss listwise)")
    n_eval: int = arg(1000, "held-out comparisons, on held-out prompts")
    tau: float = arg(0.1, "labeller temperature: P(y1 > y2) = sigmoid((r*(y1) - r*(y2)) / tau)")
    k: int = arg(4, "candidates per ranking for --loss listwise")
    sample_temperature: float = arg(1.0, "temperature of the SFT policy's samples")

    def __post_init__(self):
        train.check(self.tau > 0, f"tau must be > 0, got {self.tau}")
        train.check(self.k >= 2, f"k must be >= 2, got {self.k}")
        train.check(self.n_pairs >= 1 and self.n_eval >= 1, "n_pairs and n_eval must be >= 1")
        train.check(self.sample_temperature > 0, f"sample_temperature must be > 0, got {self.sample_temperature}")


def bt_prob(r1, r2, tau):
    """The labeller's Bradley-Terry probability that a response of true reward r1 beats one of r2."""
    return 1.0 / (1.0 + math.exp(-(r1 - r2) / tau))


def plackett_luce_ranking(rewards, tau, rng):
    """Indices from best to worst: repeatedly pick among the remaining with probability
    softmax(r* / tau) (Plackett-Luce; with two candidates this is Bradley-Terry)."""
    left, order = list(range(len(rewards))), []
    while left:
        m = max(rewards[i] for i in left)
        weights = [math.exp((rewards[i] - m) / tau) for i in left]
        pick = rng.choices(left, weights)[0]
        order.append(pick)
        left.remove(pick)
    return order


@torch.no_grad()
def sample_responses(policy, task, prompts, k, temperature, seed, batch=256):
    """k responses (token lists, without <eos>) per prompt from the policy, batched with the KV cache."""
    device = next(policy.parameters()).device
    g = torch.Generator(device=device).manual_seed(seed)
    flat = [task.prompt_tokens(p) for p in prompts for _ in range(k)]
    out, bar = [], train.Progress(len(flat), "sampling", enabled=train.rank() == 0 and len(flat) > batch)
    for i in range(0, len(flat), batch):
        out += [sft.strip_eos(o) for o in gpt.generate(policy, flat[i:i + batch], task.max_response_tokens,
                                                        temperature, generator=g)]
        bar.update(len(flat[i:i + batch]))
    bar.close()
    return [out[j * k:(j + 1) * k] for j in range(len(prompts))]


def make_comparisons(policy, task, n, k, tau, temperature, seed, heldout=False):
    """n comparisons: (prompt, its k sampled responses ranked best first by the labeller, their true
    rewards). k = 2 gives preference pairs (chosen, rejected). A prompt whose k samples are all the
    same says nothing and is replaced by a fresh prompt."""
    rng = random.Random(seed)
    data, asked = [], 0
    while len(data) < n:  # each round draws as many fresh prompts as comparisons are still missing
        prompts = task.sample_prompts(n - len(data), rng, heldout=heldout)
        for p, ys in zip(prompts, sample_responses(policy, task, prompts, k, temperature, rng.randrange(2 ** 31))):
            if len({tuple(y) for y in ys}) > 1:
                r = task.true_rewards([p] * k, ys)
                order = plackett_luce_ranking(r, tau, rng)
                data.append((p, [ys[i] for i in order], [r[i] for i in order]))
        asked += len(prompts)
        # the missing ones shrink by the share of usable prompts each round (geometrically, however many rounds
        # that takes); a policy that almost never differs would not finish
        if len(data) < n and len(data) < 0.05 * asked:
            raise UserError(f"the policy's {k} samples per prompt are too often identical to make {n} comparisons: "
                            "raise --sample_temperature")
    return data


def noise_ceiling(data, tau):
    """The best pairwise accuracy any model can reach on these labels: a model that always picks the
    response of higher r* agrees with the labeller with probability max(P, 1 - P) on each pair."""
    return sum(max(q, 1 - q) for q in (bt_prob(r[0], r[1], tau) for _, _, r in data)) / len(data)


# ----------------------------------------------------------------------------------------------
# 2. The reward model

@dataclass(frozen=True)
class RewardConfig:
    pooling: str = arg("last", "last (last non-pad token) | mean (over the response) | eos (the <eos> token) | "
                               "latent (M learned latents cross-attend to the sequence, notes 4.5-4.6)")
    n_latents: int = arg(4, "latent vectors M for --pooling latent")
    loss: str = arg("bt", "bt (Bradley-Terry) | hinge | mse | listwise")
    margin: float = arg(1.0, "hinge margin m")
    target_gap: float = arg(2.0, "MSE target gap t")

    def __post_init__(self):
        train.check_choice(self, "pooling", ("last", "mean", "eos", "latent"))
        train.check(self.n_latents >= 1, f"n_latents must be >= 1, got {self.n_latents}")
        train.check_choice(self, "loss", ("bt", "hinge", "mse", "listwise"))
        train.check(self.margin > 0 and self.target_gap > 0, f"margin and target_gap must be > 0, got {self.margin}, "
                  f"{self.target_gap}")


class CrossAttention(nn.Module):
    """Multi-head attention of queries from z over keys and values from x (notes 4.5, eq. 9-11; Vaswani et al. 2017):
    Q = Z W_q, K = X W_k, V = X W_v, A_h = softmax(Q_h K_h^T / sqrt(d_head)) V_h, heads concatenated and
    mixed by W_O. No causal mask and no positions. With x = z it is self-attention."""

    def __init__(self, cfg: gpt.GPTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
                                                              for _ in range(4))

    def forward(self, z, x, key_valid=None):
        """z: (B, M, C) queries, x: (B, L, C) keys and values, key_valid: (B, L), 0 for padding. -> (B, M, C)"""
        (B, M, C), L, H = z.shape, x.shape[1], self.n_head
        q = self.q_proj(z).view(B, M, H, C // H).transpose(1, 2)       # (B, H, M, hd)
        k = self.k_proj(x).view(B, L, H, C // H).transpose(1, 2)       # (B, H, L, hd)
        v = self.v_proj(x).view(B, L, H, C // H).transpose(1, 2)       # (B, H, L, hd)
        mask = None if key_valid is None else key_valid.bool()[:, None, None, :]  # (B, 1, 1, L)
        y = attention(q, k, v, causal=False, mask=mask)                # (B, H, M, hd), scores S_h: (B, H, M, L)
        return self.o_proj(y.transpose(1, 2).reshape(B, M, C))


class LatentBlock(nn.Module):
    """Perceiver-style latent block (notes 4.6; Perceiver, Jaegle et al. 2021): M learned latents Z (1, M, C),
    shared across the batch, read the sequence X (B, L, C), then exchange what they read, each step pre-norm
    with a residual:
        z = z + CrossAttention(q <- z, k, v <- x)     "what should I learn from all of you tokens?"
        z = z + SelfAttention(q, k, v <- z)
        z = z + MLP(z)
    The cross-attention scores are M x L, not L x L: the cost is linear in the sequence length.
    Returns the mean of the latents (B, C)."""

    def __init__(self, cfg: gpt.GPTConfig, n_latents):
        super().__init__()
        self.latents = nn.Parameter(0.02 * torch.randn(1, n_latents, cfg.n_embd))  # Z
        self.norm_cross, self.norm_self, self.norm_mlp, self.norm_out = (gpt.make_norm(cfg) for _ in range(4))
        self.cross, self.self_attn, self.mlp = CrossAttention(cfg), CrossAttention(cfg), gpt.FeedForward(cfg)

    def forward(self, x, key_valid):
        """x: (B, L, C) the backbone's (already normalised) final hidden states; key_valid: (B, L)."""
        z = self.latents.expand(x.shape[0], -1, -1)                    # (B, M, C)
        z = z + self.cross(self.norm_cross(z), x, key_valid)           # (B, M, C), padding is never a key
        h = self.norm_self(z)
        z = z + self.self_attn(h, h)                                   # (B, M, C), scores (B, H, M, M)
        z = z + self.mlp(self.norm_mlp(z))
        return self.norm_out(z).mean(1)                                # (B, C)


class RewardModel(nn.Module):
    """R_phi(x, y) = W_r p + b_r, p the pooled final hidden state of the transformer (notes 10.5)."""

    def __init__(self, backbone: gpt.GPT, pooling="last", n_latents=RewardConfig.n_latents):
        super().__init__()
        self.backbone, self.pooling = backbone, pooling
        backbone.lm_head = nn.Identity()  # headless (tied embeddings stay in wte)
        if pooling == "latent":
            self.latent = LatentBlock(backbone.cfg, n_latents)
        self.head = nn.Linear(backbone.cfg.n_embd, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, ids, attn_mask, response_mask):
        """ids, attn_mask, response_mask: (B, T); response_mask marks the response and its <eos>.
        Padding may be on either side. Returns rewards (B,)."""
        h = self.backbone.hidden_states(ids, attn_mask)                          # (B, T, C)
        if self.pooling == "latent":
            p = self.latent(h, attn_mask)                                        # (B, C)
        elif self.pooling == "mean":
            w = response_mask.to(h.dtype)
            p = (h * w[..., None]).sum(1) / w.sum(1, keepdim=True)              # (B, C)
        else:
            mark = attn_mask if self.pooling == "last" else (ids == EOS) & response_mask.bool()
            last = (mark.long() * torch.arange(ids.shape[1], device=ids.device)).argmax(1)  # last marked position
            p = h[torch.arange(ids.shape[0], device=ids.device), last]         # (B, C)
        return self.head(p).squeeze(-1)


def pack_for_rm(task, prompts, responses, side="right", device="cpu"):
    """<bos> prompt <sep> response <eos>, padded on the given side: ids, attention mask, response mask."""
    ids, target = sft.pack(task, prompts, responses)
    attn = (ids != gpt.PAD).long()
    if side == "left":  # move each row's padding to the front
        n = attn.sum(1)
        T = ids.shape[1]
        idx = (torch.arange(T)[None, :] + n[:, None]) % T
        ids, attn, target = ids.gather(1, idx), attn.gather(1, idx), target.gather(1, idx)
    return ids.to(device), attn.to(device), target.to(device)


def preference_loss(r, cfg):
    """r: (B, K) rewards of each comparison's responses, best first. The losses of notes 10.5:
    bt       -log sigmoid(r+ - r-)
    hinge    max(0, m - (r+ - r-))
    mse      (r+ - r- - t)^2
    listwise -log softmax(r)_best over the K candidates (K = 2: Bradley-Terry)."""
    if cfg.loss == "listwise":
        return F.cross_entropy(r, torch.zeros(r.shape[0], dtype=torch.long, device=r.device))
    gap = r[:, 0] - r[:, 1]
    if cfg.loss == "bt":
        return -F.logsigmoid(gap).mean()
    if cfg.loss == "hinge":
        return F.relu(cfg.margin - gap).mean()
    return (gap - cfg.target_gap).pow(2).mean()


def rewards(rm, task, prompts, responses, device, batch=256):
    """R_phi(x, y) (N,) of each prompt and response (token list, without <eos>)."""
    out = []
    for i in range(0, len(prompts), batch):
        out.append(rm(*pack_for_rm(task, prompts[i:i + batch], responses[i:i + batch], device=device)))
    return torch.cat(out)


def score(rm, task, comparisons, device):
    """Rewards (N, K) of every response of every comparison."""
    K = len(comparisons[0][1])
    return rewards(rm, task, [p for p, ys, _ in comparisons for _ in ys], [y for _, ys, _ in comparisons for y in ys],
                   device).view(len(comparisons), K)


def pearson(x, y):
    x, y = x - x.mean(), y - y.mean()
    return (x * y).sum() / (x.norm() * y.norm() + 1e-12)


def build_reward_model(ckpt, path):
    try:
        rm = RewardModel(gpt.GPT(gpt.GPTConfig(**ckpt["config"])), ckpt["reward_model"]["pooling"],
                         ckpt["reward_model"]["n_latents"])
        rm.load_state_dict(ckpt["model"])
    except (KeyError, TypeError, RuntimeError) as e:
        raise UserError(f"{path} is not a reward model of this version of reward.py ({str(e).splitlines()[0]}); "
                        "delete it and run reward.py again") from None
    return rm


def load_reward_model(path, device="cpu"):
    return build_reward_model(train.load_checkpoint(path), path).to(device).eval()


def reward_defaults():
    """The configs of `python reward.py` (also what a later stage runs when out/reward.pt is missing)."""
    return (sft.TaskConfig(), PrefConfig(), RewardConfig(),
            train.TrainConfig(max_steps=3000, batch_size=32, lr=3e-4, min_lr=3e-5, warmup_steps=30,
                            eval_interval=1000, weight_decay=0.0))


def load_reward_stage(task, train_cfg, device, sft_ckpt):
    """out_dir/reward.pt, checked to be finished and built for this task on this sft.pt (sft_ckpt, the policy's);
    trained first with this script's defaults (and the caller's task, seed, device, dtype) when it is missing.
    Returns the reward model."""
    _, pref, rcfg, defaults = reward_defaults()
    rm, _ = train.load_stage(os.path.join(train_cfg.out_dir, "reward.pt"), "reward", lambda: train_reward(
        task, pref, rcfg, train.inherit(defaults, train_cfg)), build_reward_model, device,
        requires={"task": task.identity, "built_from": {"sft": train.provenance(sft_ckpt)}},
        defaults=reward_defaults())
    return rm.eval()


def comparison_batches(data, batch_size, seed):
    """get_batch(i): batch_size comparisons drawn from data with step i's random stream."""
    def get_batch(i):
        rng = train.step_rng(seed, i)
        return [data[rng.randrange(len(data))] for _ in range(batch_size)]
    return get_batch


def train_reward(task, pref, rcfg, train_cfg):
    """The whole stage: SFT policy -> comparisons -> reward model, the table and out_dir/reward_metrics.json.
    Returns (reward model, metrics)."""
    device = train.pick_device(train_cfg.device)
    path = os.path.join(train_cfg.out_dir, "reward.pt")
    train.claim_checkpoint(path, train_cfg)
    policy, sft_ckpt = sft.load_sft_policy(task, train_cfg, device)
    k = pref.k if rcfg.loss == "listwise" else 2
    if train.rank() == 0:
        print(f"sampling {pref.n_pairs} training and {pref.n_eval} held-out comparisons of {k} responses from the "
              "SFT policy")
    train_data = make_comparisons(policy, task, pref.n_pairs, k, pref.tau, pref.sample_temperature, train_cfg.seed)
    eval_data = make_comparisons(policy, task, pref.n_eval, 2, pref.tau, pref.sample_temperature,
                                 train_cfg.seed + 1, heldout=True)
    ceiling = noise_ceiling(eval_data, pref.tau)
    rm = RewardModel(copy.deepcopy(policy), rcfg.pooling, rcfg.n_latents)  # the SFT backbone; the policy intact

    def loss_fn(net, batch):
        r = score(net, task, batch, device)
        return preference_loss(r, rcfg) + gpt.aux_loss(rm), {"tokens": sum(len(y) for _, ys, _ in batch for y in ys)}

    true_gap = torch.tensor([r[0] - r[1] for _, _, r in eval_data])

    def evaluate(m):
        r = score(m, task, eval_data, device)
        gap = (r[:, 0] - r[:, 1]).cpu()
        strict = true_gap != 0  # the noiseless r* ordering, where r* tells the two apart
        return {"pairwise_accuracy": ((gap > 0).float() + 0.5 * (gap == 0).float()).mean().item(),  # ties: half
                "true_order_accuracy": ((gap > 0) == (true_gap > 0))[strict].float().mean().item(),
                "eval_loss": preference_loss(r[:, :2], dataclasses.replace(rcfg, loss="bt")).item()}

    meta = {"stage": "reward", "config": dataclasses.asdict(policy.cfg), "task": task.identity,
            "pref": dataclasses.asdict(pref), "reward_model": dataclasses.asdict(rcfg),
            "built_from": {"sft": train.provenance(sft_ckpt)}}
    get_batch = comparison_batches(train_data, train_cfg.batch_size, train_cfg.seed)
    result = train.train(rm, train_cfg, get_batch, loss_fn, evaluate, path, meta, desc="reward")
    # Normalise: mean reward 0 on the SFT policy's own samples (the bias absorbs the shift; BT is
    # invariant to it, problem set 4.3(c)(i)), then correlation with r* on fresh samples.
    rm.eval()
    fresh = make_comparisons(policy, task, 300, 2, pref.tau, pref.sample_temperature, train_cfg.seed + 2)
    with torch.no_grad():
        r = score(rm, task, fresh, device)
        rm.head.bias -= r.mean()
        r = r - r.mean()
    truth = torch.tensor([x for _, _, rs in fresh for x in rs])
    m = {**result, "noise_ceiling": ceiling, "reward_r_star_correlation": pearson(r.flatten().cpu(), truth).item(),
         "loss": rcfg.loss, "pooling": rcfg.pooling}
    if train.rank() != 0:
        return rm, m
    train.save_checkpoint(path, **{**train.load_checkpoint(path), "model": rm.state_dict(), "optimizer": None})
    train.print_table("reward model on held-out comparisons", [
        ("pairwise accuracy (labeller)", f"{m['pairwise_accuracy']:.1%}"),
        ("noise ceiling", f"{m['noise_ceiling']:.1%}"),
        ("accuracy vs noiseless r* order", f"{m['true_order_accuracy']:.1%}"),
        ("corr(reward, r*), fresh samples", m["reward_r_star_correlation"]),
        ("loss / pooling", f"{m['loss']} / {m['pooling']}"), ("train seconds", m["train_seconds"])])
    train.write_metrics("reward", m, train_cfg.out_dir)
    return rm, m


def main(argv=None):
    task_cfg, *cfgs = sft.parse_args(list(reward_defaults()), argv, description="reward model on simulated preferences")
    train_reward(task_cfg.build(), *cfgs)


if __name__ == "__main__":
    train.run_main(main)
