"""
sft.py: the instruction task every alignment script shares, prompt-masked supervised fine-tuning
(notes 10.3) and LoRA (notes 10.4).

The task: add two d-digit integers. The prompt is "123+456", the correct response "579". The
demonstrations come from a sloppy demonstrator who, on a fraction of prompts, forgets one carry,
as human demonstrators make mistakes: imitating them plateaus below 100% however long SFT runs,
while the ground-truth scorer r*(prompt, response), which the alignment stages and the simulated
labeller of reward.py use, knows the right answer.

Chat template: <bos> prompt <sep> response <eos>, right-padded with <pad> (distinct from <eos>).

`python sft.py` fine-tunes out/gpt.pt (pretraining it first with gpt.py's defaults if missing)
and saves out/sft.pt. `--lora_rank 8` trains a low-rank update instead of all weights.
"""
import dataclasses
import math
import os
import random
from dataclasses import dataclass

import torch
import torch.nn as nn

import gpt
from gpt import BOS, EOS, PAD, SEP, UserError, arg

# ----------------------------------------------------------------------------------------------
# 1. The task: prompts, a sloppy demonstrator, the ground-truth scorer r*


@dataclass
class TaskConfig:
    digits: int = arg(3, "digits of each operand")
    slip: float = arg(0.4, "fraction of prompts on which the demonstrator forgets one carry")
    heldout: int = arg(200, "held-out prompts for evaluation (never trained on)")

    def __post_init__(self):
        if not 1 <= self.digits <= 6:
            raise UserError(f"digits must be in 1..6, got {self.digits}")
        if not 0.0 <= self.slip <= 1.0:
            raise UserError(f"slip must be in [0, 1], got {self.slip}")
        if self.heldout < 1:
            raise UserError(f"heldout must be >= 1, got {self.heldout}")


def is_heldout(a, b):
    """A fixed 1-in-16 split of all operand pairs, the same in every script and run."""
    return (a * 7919 + b * 104729) % 16 == 0


def sample_prompts(task, n, rng, heldout=False):
    """n operand pairs (a, b), each d digits, from the training or the held-out split."""
    lo, hi = 10 ** (task.digits - 1), 10 ** task.digits - 1
    out = []
    while len(out) < n:
        a, b = rng.randint(lo, hi), rng.randint(lo, hi)
        if is_heldout(a, b) == heldout:
            out.append((a, b))
    return out


def heldout_prompts(task):
    return sample_prompts(task, task.heldout, random.Random(12345), heldout=True)


def prompt_text(a, b):
    return f"{a}+{b}"


def answer(a, b):
    return str(a + b)


def column_add(a, b, forget=None):
    """Column addition from the right, as taught in school; the carry out of column `forget`
    (0 = the ones) is dropped. Returns the sum's digits and the columns that carried."""
    da, db = str(a)[::-1], str(b)[::-1]
    digits, carry, carried = [], 0, []
    for i in range(max(len(da), len(db))):
        s = int(da[i:i + 1] or 0) + int(db[i:i + 1] or 0) + carry
        digits.append(str(s % 10))
        carry = s // 10
        if carry:
            carried.append(i)
        if i == forget:
            carry = 0
    if carry:
        digits.append("1")
    return "".join(reversed(digits)), carried


def demonstrate(a, b, slip, rng):
    """The sloppy demonstrator: with probability `slip` it forgets one of the carries (chosen at
    random among those that occur); prompts without a carry it always gets right."""
    exact, carried = column_add(a, b)
    if carried and rng.random() < slip:
        return column_add(a, b, forget=rng.choice(carried))[0]
    return exact


def true_reward(a, b, response):
    """r*(prompt, response) in [0, 1] with partial credit: the share of digit positions, aligned
    from the right, that match the correct sum (a response that is not a number scores 0), so two
    wrong answers can still be ranked. 1 exactly when the response is correct."""
    want = answer(a, b)
    if not response.isdigit():
        return 0.0
    n = max(len(want), len(response))
    right = sum(x == y for x, y in zip(want.rjust(n, "_"), response.rjust(n, "_")))
    return right / n


def prompt_tokens(a, b):
    """<bos> prompt <sep>: what the policy is conditioned on."""
    return [BOS] + gpt.encode(prompt_text(a, b)) + [SEP]


def strip_eos(tokens):
    """Generated tokens up to (not including) the first <eos>."""
    return tokens[:tokens.index(EOS)] if EOS in tokens else tokens


def response_text(tokens):
    return gpt.decode(strip_eos(tokens))


def pack(prompts, responses, device="cpu"):
    """Chat-template sequences, right-padded: ids (B, T) and the SFT target mask (B, T), which is 1 on
    the response tokens and the final <eos> only (notes 10.3: prompt positions are masked).
    responses are token lists, without <eos>."""
    seqs = [prompt_tokens(a, b) + r + [EOS] for (a, b), r in zip(prompts, responses)]
    T = max(map(len, seqs))
    ids = torch.full((len(seqs), T), PAD, dtype=torch.long)
    target = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, ((a, b), s) in enumerate(zip(prompts, seqs)):
        p = len(prompt_tokens(a, b))
        ids[i, :len(s)] = torch.tensor(s)
        target[i, p:len(s)] = 1
    return ids.to(device), target.to(device)


@torch.no_grad()
def evaluate_policy(model, task, prompts=None, seed=0):
    """The figures every alignment stage reports on the held-out prompts: exact-match `accuracy` of
    greedy decoding, `sample_accuracy` at temperature 1 (what the policy actually does, and what RL
    optimises) and the mean true reward r* of those samples."""
    prompts = prompts or heldout_prompts(task)
    inputs = [prompt_tokens(a, b) for a, b in prompts]
    n_new = task.digits + 3
    greedy = gpt.generate(model, inputs, n_new, temperature=0)
    g = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    sampled = gpt.generate(model, inputs, n_new, temperature=1.0, generator=g)
    correct = lambda outs: [response_text(o) == answer(a, b) for (a, b), o in zip(prompts, outs)]
    return {"accuracy": sum(correct(greedy)) / len(prompts),
            "sample_accuracy": sum(correct(sampled)) / len(prompts),
            "true_reward": sum(true_reward(a, b, response_text(o)) for (a, b), o in zip(prompts, sampled)) / len(prompts)}


@torch.no_grad()
def kl_to_reference(policy, ref, task, prompts=None, seed=0):
    """Monte-Carlo KL(pi || pi_ref) per prompt: mean over held-out prompts of log pi(y|x) - log pi_ref(y|x)
    for y sampled from the policy at temperature 1 (notes 10.5: the sum of the per-token log ratios)."""
    prompts = prompts or heldout_prompts(task)
    device = next(policy.parameters()).device
    g = torch.Generator(device=device).manual_seed(seed)
    outs = gpt.generate(policy, [prompt_tokens(a, b) for a, b in prompts], task.digits + 3, generator=g)
    responses = [strip_eos(o) for o in outs]
    ids, target = pack(prompts, responses, device)
    for i, o in enumerate(outs):
        if EOS not in o:  # cut at the length limit: the <eos> that pack() appends was never sampled
            target[i, len(prompt_tokens(*prompts[i])) + len(o)] = 0
    return (gpt.sequence_logprobs(policy, ids, target)[1] - gpt.sequence_logprobs(ref, ids, target)[1]).mean().item()


def before_after(before, result):
    """What an alignment stage reports: its training result plus the held-out figures before and after."""
    after = {k: result[k] for k in ("accuracy", "sample_accuracy", "true_reward", "kl") if k in result}
    return {**result, "before": before, "after": after}


def before_after_rows(m):
    """The rows of the before -> after table every alignment stage prints."""
    b, a = m["before"], m["after"]
    return [("exact match, sampled (T=1)", f"{b['sample_accuracy']:.1%} -> {a['sample_accuracy']:.1%}"),
            ("exact match, greedy", f"{b['accuracy']:.1%} -> {a['accuracy']:.1%}"),
            ("true reward r*, sampled", f"{b['true_reward']:.3f} -> {a['true_reward']:.3f}"),
            ("KL(pi || pi_ref) per prompt", f"{a['kl']:.3f}")]


# ----------------------------------------------------------------------------------------------
# 2. LoRA (notes 10.4): W = W_0 + (alpha / r) B A, W_0 frozen, B = 0 at the start

class LoRALinear(nn.Module):
    """A frozen nn.Linear plus the low-rank update (alpha / r) B A, A: (r, d_in), B: (d_out, r)."""

    def __init__(self, base: nn.Linear, rank, alpha):
        super().__init__()
        self.base = base
        self.base.requires_grad_(False)
        self.A = nn.Parameter(torch.randn(rank, base.in_features) / math.sqrt(base.in_features))
        self.B = nn.Parameter(torch.zeros(base.out_features, rank))  # so W = W_0 at the start
        self.scale = alpha / rank

    def forward(self, x):
        return self.base(x) + (x @ self.A.t() @ self.B.t()) * self.scale

    def merged(self):
        """The equivalent plain nn.Linear with W_0 + (alpha / r) B A: no added inference latency."""
        out = nn.Linear(self.base.in_features, self.base.out_features, bias=self.base.bias is not None)
        with torch.no_grad():
            out.weight.copy_(self.base.weight + self.scale * self.B @ self.A)
            if self.base.bias is not None:
                out.bias.copy_(self.base.bias)
        return out.to(self.base.weight.device)


def apply_lora(model, rank, alpha, targets="qv"):
    """Freeze the model and wrap the query and value projections (targets="qv", the notes' default)
    or every linear layer of the blocks (targets="all") in LoRALinear. Returns the model."""
    model.requires_grad_(False)
    names = ("q_proj", "v_proj") if targets == "qv" else None
    for block in model.blocks:
        for parent in list(block.modules()):  # listed before any wrapping
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear) and (names is None or name in names):
                    setattr(parent, name, LoRALinear(child, rank, alpha))
    return model


def merge_lora(model):
    """Replace every LoRALinear by its merged nn.Linear; the model is a plain GPT again."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                setattr(parent, name, child.merged())
    model.requires_grad_(True)
    return model


# ----------------------------------------------------------------------------------------------
# 3. Supervised fine-tuning

@dataclass
class SFTConfig:
    init: str = arg("", "checkpoint to start from; empty = out_dir/gpt.pt (pretrained first if missing)")
    lora_rank: int = arg(0, "LoRA rank r (0 = fine-tune all weights)")
    lora_alpha: float = arg(16.0, "LoRA scaling alpha: the update is (alpha / r) B A")
    lora_targets: str = arg("qv", "qv (query and value projections) | all (every linear layer)")

    def __post_init__(self):
        if self.lora_rank < 0:
            raise UserError(f"lora_rank must be >= 0, got {self.lora_rank}")
        if self.lora_targets not in ("qv", "all"):
            raise UserError(f"lora_targets={self.lora_targets!r} is not one of qv, all")


def sft_loss(model, ids, target):
    """Mean negative log-likelihood of the target tokens (notes 10.3, eq. SFT), prompt positions masked."""
    per_token, _ = gpt.sequence_logprobs(model, ids, target)
    return -per_token.sum() / target.sum()


def sft_batches(task, batch_size, seed):
    """get_batch(i): batch_size training prompts with the demonstrator's responses, a pure function of i."""
    def get_batch(i):
        rng = random.Random(seed * 1_000_003 + i)
        prompts = sample_prompts(task, batch_size, rng)
        responses = [gpt.encode(demonstrate(a, b, task.slip, rng)) for a, b in prompts]
        return pack(prompts, responses)
    return get_batch


def finetune(model, task, sft_cfg, train_cfg, ckpt_name="sft.pt"):
    """Prompt-masked SFT of `model` (optionally with LoRA); saves out_dir/<ckpt_name> with the LoRA
    update merged, so later stages load a plain GPT. Returns (model, metrics)."""
    if sft_cfg.lora_rank:
        apply_lora(model, sft_cfg.lora_rank, sft_cfg.lora_alpha, sft_cfg.lora_targets)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        print(f"LoRA r={sft_cfg.lora_rank} alpha={sft_cfg.lora_alpha} on {sft_cfg.lora_targets}: "
              f"{trainable:,} trainable of {total:,} parameters ({trainable / total:.2%})")
    rank = gpt.rank()
    get_batch = sft_batches(task, train_cfg.batch_size, train_cfg.seed + 7919 * rank)
    held = heldout_prompts(task)
    held_batch = pack(held, [gpt.encode(answer(a, b)) for a, b in held])  # correct answers

    def loss_fn(net, batch):
        ids, target = (t.to(next(model.parameters()).device) for t in batch)
        return sft_loss(net, ids, target), {"tokens": ids.numel()}

    def evaluate(m):
        ids, target = (t.to(next(m.parameters()).device) for t in held_batch)
        return {"loss": sft_loss(m, ids, target).item(), **evaluate_policy(m, task, held)}

    path = os.path.join(train_cfg.out_dir, ckpt_name)
    result = gpt.train(model, train_cfg, get_batch, loss_fn, evaluate, path, desc="sft")
    if sft_cfg.lora_rank:
        merge_lora(model)
        if rank == 0:
            gpt.save_checkpoint(path, model=model.state_dict(), config=dataclasses.asdict(model.cfg),
                                step=train_cfg.max_steps, metrics=result)
    return model, result


def sft_defaults(out_dir="out", device="auto"):
    """The configs of `python sft.py` (also what a later stage runs when out/sft.pt is missing)."""
    return TaskConfig(), SFTConfig(), gpt.TrainConfig(max_steps=3000, batch_size=32, lr=3e-3, min_lr=3e-4,
                                                      warmup_steps=50, eval_interval=1000, weight_decay=0.0,
                                                      out_dir=out_dir, device=device)


def train_sft(task, sft_cfg, train_cfg):
    """The whole stage: load (or pretrain) the base model, fine-tune, report. Returns (model, metrics)."""
    device = gpt.pick_device(train_cfg.device)
    if sft_cfg.init:
        model, _ = gpt.load_model(sft_cfg.init, device)
    else:
        model, _ = gpt.load_stage(os.path.join(train_cfg.out_dir, "gpt.pt"), lambda: gpt.pretrain(
            gpt.GPTConfig(), gpt.TrainConfig(out_dir=train_cfg.out_dir, device=train_cfg.device), gpt.DataConfig()),
            device)
    before = evaluate_policy(model, task)
    model, result = finetune(model, task, sft_cfg, train_cfg)
    return model, {**result, "before": before}


def load_sft_policy(train_cfg, device):
    """out_dir/sft.pt, the starting point of every alignment stage; fine-tuned first with this
    script's defaults (and pretrained before that) when it is missing."""
    return gpt.load_stage(os.path.join(train_cfg.out_dir, "sft.pt"),
                          lambda: train_sft(*sft_defaults(train_cfg.out_dir, train_cfg.device)), device)[0]


def main(argv=None):
    task, sft_cfg, train_cfg = gpt.parse_args(list(sft_defaults()), argv, description="prompt-masked SFT with LoRA")
    model, m = train_sft(task, sft_cfg, train_cfg)
    if gpt.rank() != 0:
        return
    gpt.print_table("SFT on held-out prompts", [
        ("exact match, greedy", f"{m['before']['accuracy']:.1%} -> {m['accuracy']:.1%}"),
        ("exact match, sampled (T=1)", f"{m['before']['sample_accuracy']:.1%} -> {m['sample_accuracy']:.1%}"),
        ("true reward r*, sampled", f"{m['before']['true_reward']:.3f} -> {m['true_reward']:.3f}"),
        ("loss on the correct answers", m["loss"]), ("train seconds", m["train_seconds"])])
    (a, b), = sample_prompts(task, 1, random.Random(1), heldout=True)
    out = gpt.generate(model, [prompt_tokens(a, b)], task.digits + 3, temperature=0)[0]
    print(f"\nsample: {prompt_text(a, b)} -> {response_text(out)} (correct: {answer(a, b)})")
    gpt.write_metrics("sft", m, train_cfg.out_dir)


if __name__ == "__main__":
    gpt.run_main(main)
