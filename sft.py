"""
sft.py: the instruction task every alignment script shares, prompt-masked supervised fine-tuning
(notes 10.3; InstructGPT, Ouyang et al. 2022) and parameter-efficient fine-tuning (notes 10.4).

The task: add two d-digit integers. The prompt is "123+456", the correct response "579". The
demonstrations come from a sloppy demonstrator who, on a fraction of prompts, forgets one carry,
as human demonstrators make mistakes: imitating them plateaus below 100% however long SFT runs,
while the ground-truth scorer r*(prompt, response), which the alignment stages and the simulated
labeller of reward.py use, knows the right answer. The stages reach the task only through the Task
interface of section 1, so it can be swapped: `--task sort` (on every stage) sorts a string of digits
instead, and a new task is a subclass of Task registered in TASKS (README: "Your own task").

Chat template: <bos> prompt <sep> response <eos>, right-padded with <pad> (distinct from <eos>).

`python sft.py` fine-tunes out/gpt.pt (pretraining it first with gpt.py's defaults if missing)
and saves out/sft.pt. Parameter-efficient fine-tuning (notes 10.4): `--lora_rank 16` trains a low-rank
update of every linear layer instead of all weights, `--qlora` adds a frozen base stored in 4-bit NormalFloat,
and `--adapter_dim 16` trains bottleneck adapters beside every linear layer (parallel adapters); with these the
token table (`--tokens template`: only the rows of <sep> and <eos>, which pretraining never saw) and the
normalisation gains train too (`--tokens none`, `--no-norms` freeze them; RESULTS.md has why each is needed). Each
method has its own budget and schedule (`sft_defaults`): the steps that fit full fine-tuning's seconds, at half its
rate decayed to 0. `--prefix_lm` fine-tunes with a bidirectional prompt (notes 8.4).

Using a trained model of any stage (section 4): `python sft.py --sample out/dpo.pt --prompt 123+456 --n 5` prints
five answers with r* (no --prompt: a prompt per line of stdin); `python sft.py --export_hf out/sft.pt --export_dir
hf` writes it in the Hugging Face Llama format (gpt.export_hf), for transformers, vLLM, TRL.
"""
import argparse
import dataclasses
import math
import os
import random
import sys
import types
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import gpt
import train
from gpt import BOS, EOS, PAD, SEP
from train import arg

# ----------------------------------------------------------------------------------------------
# 1. The task: prompts, a sloppy demonstrator, the ground-truth scorer r*

class Task:
    """A verifiable task: everything the stages know of it. A prompt is a hashable value that only the task
    reads (addition's is the operand pair); a response is text. A new task subclasses Task, defines the
    methods that raise NotImplementedError and registers itself in TASKS (README: "Your own task").
    `defaults`: the TaskConfig flags whose defaults this task changes, e.g. {"digits": 6}."""
    name = ""
    defaults = {}

    def __init__(self, cfg):
        self.cfg = cfg  # the TaskConfig: --digits (the prompt's size), --slip, --heldout

    # what a task defines
    def random_prompt(self, rng):
        """One prompt drawn with the random.Random `rng`, from the training and held-out splits together."""
        raise NotImplementedError

    def is_heldout(self, prompt):
        """The held-out split: a fixed function of the prompt, so never trained on in any script or run."""
        raise NotImplementedError

    def heldout_size(self):
        """How many distinct prompts the held-out split has (the bound of --heldout)."""
        raise NotImplementedError

    def prompt_text(self, prompt):
        raise NotImplementedError

    def correct(self, prompt):
        """The correct response text."""
        raise NotImplementedError

    def demonstrate(self, prompt, rng):
        """The sloppy demonstrator's response text: on a fraction `slip` of the prompts, the task's natural mistake."""
        raise NotImplementedError

    def true_reward(self, prompt, response):
        """r*(prompt, response text) in [0, 1] with partial credit, so that two wrong responses can be ranked; 1
        exactly when the response is correct."""
        raise NotImplementedError

    def parse_prompt(self, text):
        """The prompt whose prompt_text is `text`, or None (optional: `sft.py --sample` then prints no r*)."""
        return None

    @property
    def max_response_tokens(self):
        """The length limit of every sampled response."""
        raise NotImplementedError

    # what every task shares
    @property
    def identity(self):
        """What a model trained on this task depends on, recorded in its checkpoints (heldout only sizes the
        evaluation); the name first, so a model built for another task is refused naming task.name."""
        return {"name": self.name, "digits": self.cfg.digits, "slip": self.cfg.slip}

    @property
    def n_heldout(self):
        return self.cfg.heldout or min(1000, self.heldout_size())

    def sample_prompts(self, n, rng, heldout=False):
        """n prompts from the training or the held-out split."""
        out = []
        while len(out) < n:
            p = self.random_prompt(rng)
            if self.is_heldout(p) == heldout:
                out.append(p)
        return out

    def heldout_prompts(self):
        """n_heldout distinct prompts of the held-out split, the same in every script and run."""
        rng, prompts = random.Random(12345), {}  # a dict keeps the order in which the prompts were drawn
        while len(prompts) < self.n_heldout:
            prompts.update(dict.fromkeys(self.sample_prompts(self.n_heldout - len(prompts), rng, heldout=True)))
        return list(prompts)

    def prompt_tokens(self, prompt):
        """<bos> prompt <sep>: what the policy is conditioned on."""
        return [BOS] + gpt.encode(self.prompt_text(prompt)) + [SEP]

    def true_rewards(self, prompts, responses):
        """r* of each (prompt, response token list) pair, as a list of floats."""
        return [self.true_reward(p, gpt.decode(y)) for p, y in zip(prompts, responses)]


def positions_right(want, response, align="left"):
    """The share of character positions of `response` that match `want`, the shorter padded (on the right for
    align="left", on the left for "right"): a missing or extra character costs its position."""
    n = max(len(want), len(response))
    pad = str.ljust if align == "left" else str.rjust
    return sum(x == y for x, y in zip(pad(want, n, "_"), pad(response, n, "_"))) / n


class Addition(Task):
    """Add two d-digit integers (--digits d): the prompt (a, b) reads "123+456", the correct response "579". The
    demonstrator, on a fraction of prompts, forgets one carry, as human demonstrators make mistakes: imitating
    it plateaus below 100% however long SFT runs, while r* knows the right answer."""
    name = "add"

    def __init__(self, cfg):
        train.check(1 <= cfg.digits <= 6, f"digits must be in 1..6, got {cfg.digits}")
        super().__init__(cfg)

    def random_prompt(self, rng):
        lo, hi = 10 ** (self.cfg.digits - 1), 10 ** self.cfg.digits - 1
        return rng.randint(lo, hi), rng.randint(lo, hi)

    def is_heldout(self, prompt):
        """A fixed 1-in-16 split of all operand pairs."""
        a, b = prompt
        return (a * 7919 + b * 104729) % 16 == 0

    def heldout_size(self):
        """Counted exactly by the residues of a and b mod 16."""
        lo, hi = 10 ** (self.cfg.digits - 1), 10 ** self.cfg.digits - 1
        count = lambda r: (hi - r) // 16 - (lo - 1 - r) // 16  # numbers in [lo, hi] that are r mod 16
        return sum(count(ra) * count(rb) for ra in range(16) for rb in range(16) if self.is_heldout((ra, rb)))

    def prompt_text(self, prompt):
        return "{}+{}".format(*prompt)

    def correct(self, prompt):
        return str(sum(prompt))

    def parse_prompt(self, text):
        a, plus, b = text.partition("+")
        ok = plus and all(x.isascii() and x.isdigit() and len(x) == self.cfg.digits for x in (a, b))
        return (int(a), int(b)) if ok and self.prompt_text((int(a), int(b))) == text else None

    def demonstrate(self, prompt, rng):
        """With probability `slip` it forgets one of the carries (chosen at random among those that occur);
        prompts without a carry it always gets right."""
        exact, carried = column_add(*prompt)
        if carried and rng.random() < self.cfg.slip:
            return column_add(*prompt, forget=rng.choice(carried))[0]
        return exact

    def true_reward(self, prompt, response):
        """The share of digit positions, aligned from the right, that match the correct sum; a response that is
        not a number scores 0."""
        return positions_right(self.correct(prompt), response, "right") if response.isdigit() else 0.0

    @property
    def max_response_tokens(self):
        """The longest sum (digits + 1), <eos>, one spare."""
        return self.cfg.digits + 3


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


class Sort(Task):
    """Sort a string of d digits (--digits d, 6 by default for this task): the prompt "831520" reads "sort 831520",
    the correct response "012358". The demonstrator, on a fraction of prompts, leaves one adjacent pair of its
    sorted digits out of order (a pass short, as a hasty sorter does); prompts of one repeated digit it always
    gets right."""
    name = "sort"
    defaults = {"digits": 6}

    def __init__(self, cfg):
        train.check(2 <= cfg.digits <= 12, f"digits must be in 2..12 for --task sort, got {cfg.digits}")
        super().__init__(cfg)

    def random_prompt(self, rng):
        return "".join(str(rng.randrange(10)) for _ in range(self.cfg.digits))

    def is_heldout(self, prompt):
        """A fixed 1-in-16 split of all digit strings: sum_i (2i + 1) d_i = 0 mod 16."""
        return sum((2 * i + 1) * int(c) for i, c in enumerate(prompt)) % 16 == 0

    def heldout_size(self):
        """Counted exactly: the number of strings with each residue of the weighted sum, one digit at a time."""
        counts = [1] + [0] * 15
        for i in range(self.cfg.digits):
            counts = [sum(counts[(r - (2 * i + 1) * d) % 16] for d in range(10)) for r in range(16)]
        return counts[0]

    def prompt_text(self, prompt):
        return f"sort {prompt}"

    def correct(self, prompt):
        return "".join(sorted(prompt))

    def parse_prompt(self, text):
        digits = text.removeprefix("sort ")
        ok = text.startswith("sort ") and digits.isascii() and digits.isdigit() and len(digits) == self.cfg.digits
        return digits if ok else None

    def demonstrate(self, prompt, rng):
        """With probability `slip` it swaps one adjacent pair of distinct digits of the sorted string (chosen at
        random among them)."""
        exact = self.correct(prompt)
        steps = [i for i in range(len(exact) - 1) if exact[i] != exact[i + 1]]
        if steps and rng.random() < self.cfg.slip:
            i = rng.choice(steps)
            return exact[:i] + exact[i + 1] + exact[i] + exact[i + 2:]
        return exact

    def true_reward(self, prompt, response):
        """The share of positions, aligned from the left, that hold the right digit; 0 unless the response is made
        of digits."""
        return positions_right(self.correct(prompt), response, "left") if response.isdigit() else 0.0

    @property
    def max_response_tokens(self):
        """The sorted string, <eos>, one spare."""
        return self.cfg.digits + 2


TASKS = {task.name: task for task in (Addition, Sort)}  # --task NAME; a new task adds itself here


@dataclass(frozen=True)
class TaskConfig:
    task: str = arg("add", f"the task: {' | '.join(TASKS)} (a task may set its own defaults of these flags: sort's "
                           "--digits is 6)")
    digits: int = arg(3, "the prompt's size: digits of each operand (add), digits to sort (sort)")
    slip: float = arg(0.4, "fraction of prompts on which the demonstrator makes the task's mistake (add: forgets "
                           "one carry; sort: leaves one adjacent pair out of order)")
    heldout: int = arg(0, "distinct held-out prompts for evaluation, never trained on (0 = 1000, or the whole "
                          "held-out split when it is smaller)")

    def __post_init__(self):
        train.check_choice(self, "task", tuple(TASKS))
        train.check(0.0 <= self.slip <= 1.0, f"slip must be in [0, 1], got {self.slip}")
        n = TASKS[self.task](self).heldout_size()
        train.check(0 <= self.heldout <= n, f"heldout must be in 0..{n} (the held-out split of --task {self.task} "
                    f"--digits {self.digits} has {n} prompts), got {self.heldout}")

    def build(self):
        """The Task these flags choose."""
        return TASKS[self.task](self)


def task_of(identity):
    """The Task a checkpoint records (its Task.identity)."""
    return TaskConfig(task=identity.get("name", "add"), digits=identity["digits"], slip=identity["slip"]).build()


def peek_flag(argv, name, default):
    """The value of --name in argv (None: the command line) as given, before the flags are parsed: for the defaults
    that depend on it. A bad value is left for the flags' parser to refuse."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument(f"--{name}", default=default,
                     **({"action": argparse.BooleanOptionalAction} if isinstance(default, bool) else {}))
    return getattr(pre.parse_known_args(argv)[0], name)


def parse_args(defaults, argv=None, description=None):
    """train.parse_args for a stage on the task: the TaskConfig among `defaults` takes the defaults that its --task
    declares (Task.defaults) before the flags are read, so that `--task sort` alone runs that task's defaults."""
    name = peek_flag(argv, "task", TaskConfig.task)
    if name in TASKS:  # another name is refused, naming the choices, by TaskConfig
        defaults = [dataclasses.replace(d, task=name, **TASKS[name].defaults) if isinstance(d, TaskConfig) else d
                    for d in defaults]
    return train.parse_args(defaults, argv, description)


def strip_eos(tokens):
    """Generated tokens up to (not including) the first <eos>."""
    return tokens[:tokens.index(EOS)] if EOS in tokens else tokens


def response_text(tokens):
    return gpt.decode(strip_eos(tokens))


def pack(task, prompts, responses, device="cpu"):
    """Chat-template sequences, right-padded: ids (B, T) and the SFT target mask (B, T), which is 1 on
    the response tokens and the final <eos> only (notes 10.3: prompt positions are masked).
    responses are token lists, without <eos>."""
    seqs = [task.prompt_tokens(p) + r + [EOS] for p, r in zip(prompts, responses)]
    T = max(map(len, seqs))
    ids = torch.full((len(seqs), T), PAD, dtype=torch.long)
    target = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, (p, s) in enumerate(zip(prompts, seqs)):
        ids[i, :len(s)] = torch.tensor(s)
        target[i, len(task.prompt_tokens(p)):len(s)] = 1
    return ids.to(device), target.to(device)


def pack_generated(task, prompts, outs, device="cpu"):
    """pack() for what generate() returned (with <eos> when one was sampled): the target mask is 1 on
    every sampled token; a response cut at the length limit has no <eos> and is not given one."""
    ids, target = pack(task, prompts, [strip_eos(o) for o in outs], device)
    for i, o in enumerate(outs):
        if EOS not in o:  # the <eos> that pack() appends was never sampled
            target[i, len(task.prompt_tokens(prompts[i])) + len(o)] = 0
    return ids, target


@torch.no_grad()
def evaluate_policy(model, task, prompts=None, seed=0):
    """The figures every alignment stage reports on the held-out prompts: exact-match `accuracy` of
    greedy decoding, `sample_accuracy` at temperature 1 (what the policy actually does, and what RL
    optimises), each with its 95% interval, and the mean true reward r* of the samples."""
    prompts = prompts or task.heldout_prompts()
    inputs = [task.prompt_tokens(p) for p in prompts]
    greedy = gpt.generate(model, inputs, task.max_response_tokens, temperature=0)
    g = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    sampled = [strip_eos(o) for o in gpt.generate(model, inputs, task.max_response_tokens, generator=g)]
    n_correct = lambda outs: sum(response_text(o) == task.correct(p) for p, o in zip(prompts, outs))
    k_greedy, k_sampled = n_correct(greedy), n_correct(sampled)
    return {"accuracy": k_greedy / len(prompts), "accuracy_ci": wilson_interval(k_greedy, len(prompts)),
            "sample_accuracy": k_sampled / len(prompts), "sample_accuracy_ci": wilson_interval(k_sampled, len(prompts)),
            "true_reward": sum(task.true_rewards(prompts, sampled)) / len(prompts)}


def wilson_interval(k, n, z=1.96):
    """The 95% Wilson score interval [low, high] of a proportion k / n (Wilson 1927): unlike p +- z se it stays
    inside [0, 1] and keeps its coverage near 0 and 1."""
    p, z2 = k / n, z * z
    centre, half = (p + z2 / (2 * n)) / (1 + z2 / n), z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return [max(0.0, centre - half), min(1.0, centre + half)]


@torch.no_grad()
def kl_to_reference(policy, ref, task, prompts=None, seed=0):
    """Monte-Carlo KL(pi || pi_ref) per prompt: mean over held-out prompts of log pi(y|x) - log pi_ref(y|x)
    for y sampled from the policy at temperature 1 (notes 10.5: the sum of the per-token log ratios)."""
    prompts = prompts or task.heldout_prompts()
    device = next(policy.parameters()).device
    g = torch.Generator(device=device).manual_seed(seed)
    outs = gpt.generate(policy, [task.prompt_tokens(p) for p in prompts], task.max_response_tokens, generator=g)
    ids, target = pack_generated(task, prompts, outs, device)
    return (gpt.sequence_logprobs(policy, ids, target)[1] - gpt.sequence_logprobs(ref, ids, target)[1]).mean().item()


def before_after(before, result):
    """What an alignment stage reports: its training result plus the held-out figures before and after."""
    keys = ("accuracy", "accuracy_ci", "sample_accuracy", "sample_accuracy_ci", "true_reward", "kl")
    return {**result, "before": before, "after": {k: result[k] for k in keys if k in result}}


def percent_ci(m, key):
    """'72.5% [69.6, 75.2]': a held-out accuracy and its 95% interval."""
    low, high = m[f"{key}_ci"]
    return f"{m[key]:.1%} [{100 * low:.1f}, {100 * high:.1f}]"


def before_after_rows(m):
    """The rows of the before -> after table every alignment stage prints."""
    b, a = m["before"], m["after"]
    return [("exact match, sampled (T=1), 95% CI",
             f"{percent_ci(b, 'sample_accuracy')} -> {percent_ci(a, 'sample_accuracy')}"),
            ("exact match, greedy, 95% CI", f"{percent_ci(b, 'accuracy')} -> {percent_ci(a, 'accuracy')}"),
            ("true reward r*, sampled", f"{b['true_reward']:.3f} -> {a['true_reward']:.3f}"),
            ("KL(pi || pi_ref) per prompt", f"{a['kl']:.3f}")]


# ----------------------------------------------------------------------------------------------
# 2. Parameter-efficient fine-tuning (notes 10.4): LoRA, QLoRA, adapters

def linear_with(weight, bias):
    """A plain nn.Linear holding copies of weight (d_out, d_in) and bias (or None)."""
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None).to(weight.device)
    with torch.no_grad():
        out.weight.copy_(weight)
        if bias is not None:
            out.bias.copy_(bias)
    return out


class LoRALinear(nn.Module):
    """A frozen linear layer (nn.Linear, or NF4Linear for QLoRA) plus the low-rank update
    (alpha / r) B A: W = W_0 + (alpha / r) B A (LoRA, Hu et al. 2021; notes 10.4), A: (r, d_in), B: (d_out, r)."""

    def __init__(self, base, rank, alpha):
        super().__init__()
        self.base = base
        self.base.requires_grad_(False)
        self.A = nn.Parameter(torch.randn(rank, base.in_features) / math.sqrt(base.in_features))
        self.B = nn.Parameter(torch.zeros(base.out_features, rank))  # so W = W_0 at the start
        self.scale = alpha / rank
        # Over forward and backward, for N tokens, the factored W_0 x + (alpha / r) B (A x) costs 3 N r (d_in + d_out)
        # more than W_0 x alone, forming W_0 + (alpha / r) B A first costs N d_in d_out more (the formed weight's
        # gradient, as in full fine-tuning): the same result, the cheaper one is taken. At this width, r = d / 4,
        # the formed one; at LLM widths, r << d, the factored one.
        self.formed = 3 * rank * (base.in_features + base.out_features) >= base.in_features * base.out_features

    def forward(self, x):
        if self.formed:
            return F.linear(x, self.weight, self.base.bias)
        return self.base(x) + (x @ self.A.t() @ self.B.t()) * self.scale

    @property
    def weight(self):
        """W_0 + (alpha / r) B A, (d_out, d_in); under QLoRA W_0 is the dequantised NF4 weight."""
        return torch.addmm(self.base.weight, self.B, self.A, alpha=self.scale)

    @torch.no_grad()
    def merged(self):
        """The equivalent plain nn.Linear: no added inference latency."""
        return linear_with(self.weight, self.base.bias)


NF4_BLOCK, SCALE_BLOCK = 64, 256  # weights per absmax scale; scales per 8-bit second-level scale (QLoRA)


def nf4_levels():
    """The 16 levels of 4-bit NormalFloat (Dettmers et al. 2023, QLoRA, sec. 3): quantiles of N(0, 1)
    normalised to [-1, 1], 8 on the positive side and 7 on the negative side plus an exact 0. The
    outermost quantile is taken at p = delta = 1 - (1/30 + 1/32) / 2, not at p = 1 (infinite)."""
    delta = 1 - (1 / 30 + 1 / 32) / 2
    pos = torch.special.ndtri(torch.linspace(delta, 0.5, 9, dtype=torch.float64)[:-1])   # 8 quantiles > 0
    neg = -torch.special.ndtri(torch.linspace(delta, 0.5, 8, dtype=torch.float64)[:-1])  # 7 quantiles < 0
    levels = torch.cat([neg, torch.zeros(1, dtype=torch.float64), pos]).sort().values
    return (levels / levels.max()).float()                                               # (16,) in [-1, 1]


def blockwise(x, size):
    """x flattened and zero-padded to whole blocks: (n_blocks, size)."""
    x = x.flatten()
    return F.pad(x, (0, -x.numel() % size)).view(-1, size)


class NF4Linear(nn.Module):
    """A frozen linear layer stored as QLoRA stores W_0 (Dettmers et al. 2023; notes 10.4): W_0 = s * W_0^quantized per
    block of 64 weights, s the block's absmax and W_0^quantized one of the 16 NF4 levels (4 bits,
    two codes per uint8). Double quantisation: the scales s, their mean subtracted, are stored in
    8 bits with one fp32 absmax per block of 256 scales (the paper uses 8-bit floats, this uses int8
    absmax, the same memory). `weight` dequantises on the fly in every forward."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        w = base.weight.detach().float()
        self.register_buffer("levels", nf4_levels().to(w.device), persistent=False)  # (16,)
        # a byte's two levels, low code first: byte c -> (levels[c & 15], levels[c >> 4]), one lookup per byte
        self.register_buffer("pairs", torch.stack([self.levels.repeat(16), self.levels.repeat_interleave(16)], 1),
                             persistent=False)                                         # (256, 2)
        blocks = blockwise(w, NF4_BLOCK)                                               # (n_blocks, 64)
        absmax = blocks.abs().amax(1)                                                  # (n_blocks,) the scales s
        mid = (self.levels[1:] + self.levels[:-1]) / 2                                 # nearest level = bucket
        codes = torch.bucketize(blocks / absmax.clamp(min=1e-12)[:, None], mid).flatten().to(torch.uint8)
        self.register_buffer("codes", codes[0::2] | codes[1::2] << 4)                  # (n_blocks * 32,) uint8
        self.register_buffer("scale_mean", absmax.mean())                              # () fp32
        centred = blockwise(absmax - self.scale_mean, SCALE_BLOCK)                     # (n_scale_blocks, 256)
        self.register_buffer("scale_absmax", centred.abs().amax(1).clamp(min=1e-12))  # (n_scale_blocks,) fp32
        q = torch.round(centred / self.scale_absmax[:, None] * 127).to(torch.int8)
        self.register_buffer("scale_codes", q.flatten()[:absmax.numel()])              # (n_blocks,) int8
        self.bias = base.bias
        err = w - self.weight  # the quantisation error, kept as three sums for the report
        self.error_sums = (err.pow(2).sum().item(), w.pow(2).sum().item(), err.abs().sum().item())

    def scales(self):
        """The block scales s after double quantisation: (n_blocks,)."""
        step = self.scale_absmax.repeat_interleave(SCALE_BLOCK)[:self.scale_codes.numel()] / 127
        return self.scale_codes.float() * step + self.scale_mean

    @property
    def weight(self):
        """W_0 dequantised: level[code] * s, (out_features, in_features) fp32."""
        # the byte's row of pairs: F.embedding is a gather (the same numbers), 2-4x faster than pairs[codes] on a CPU
        w = F.embedding(self.codes.int(), self.pairs).view(-1, NF4_BLOCK) * self.scales()[:, None]  # (n_blocks, 64)
        return w.flatten()[:self.out_features * self.in_features].view(self.out_features, self.in_features)

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)

    def nbytes(self):
        """Bytes of the stored weight: 4-bit codes, 8-bit scales, fp32 second-level scales and mean."""
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale_codes, self.scale_absmax,
                                                          self.scale_mean))

    def merged(self):
        """A plain nn.Linear holding the dequantised weight."""
        return linear_with(self.weight, self.bias)


def apply_lora(model, rank, alpha, targets="all", quantize=False):
    """Freeze the model and wrap every linear layer of the blocks (targets="all") or only the query and value
    projections (targets="qv", the notes' and Hu et al.'s choice) in LoRALinear. quantize=True is QLoRA: every
    linear layer of the blocks is first stored in NF4, LoRA (in fp32) on top. Returns the model."""
    names = ("q_proj", "v_proj") if targets == "qv" else None

    def wrap(name, linear):
        base = NF4Linear(linear) if quantize else linear
        return LoRALinear(base, rank, alpha) if names is None or name in names else base
    return wrap_linears(model, wrap)


def wrap_linears(model, wrap):
    """Freeze the model and replace every nn.Linear of its blocks by wrap(its name, it). Returns the model."""
    model.requires_grad_(False)
    for block in model.blocks:
        for parent in list(block.modules()):  # listed before any wrapping
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, wrap(name, child))
    return model


class TokenRows(nn.Module):
    """A frozen token table, the input embedding (nn.Embedding) or the output head (nn.Linear), both
    (vocab, C), plus trainable rows delta (k, C) for the tokens `ids`: W' = W + delta on those rows.
    For the chat template's <sep> and <eos>, which pretraining never saw: frozen at their pretrained
    values (<eos>'s logit pushed down everywhere, <sep> never trained) a frozen model cannot learn to
    read or write them (as HF PEFT's trainable_token_indices). With tied embeddings the embedding and
    the head share one delta, so they stay tied."""

    def __init__(self, base, ids, delta=None):
        super().__init__()
        self.base = base
        self.base.requires_grad_(False)
        self.register_buffer("ids", torch.tensor(ids))
        self.delta = delta if delta is not None else nn.Parameter(torch.zeros(len(ids), base.weight.shape[1]))

    def forward(self, x):
        out = self.base(x)
        if isinstance(self.base, nn.Embedding):  # token ids (B, T) -> (B, T, C)
            return out + (x[..., None] == self.ids).to(out.dtype) @ self.delta       # one-hot (B, T, k) @ (k, C)
        return out.index_add(-1, self.ids, (x @ self.delta.t()).to(out.dtype))       # logits (B, T, vocab)

    @torch.no_grad()
    def merged(self):
        """The base module with delta added into its table; delta is zeroed, so that a tied twin sharing
        both the table and delta adds nothing more."""
        self.base.weight.index_add_(0, self.ids, self.delta.to(self.base.weight.dtype))
        self.delta.zero_()
        return self.base


def train_template_tokens(model, ids=(SEP, EOS)):
    """Make the rows of `ids` in the (frozen) input embedding and output head trainable. Returns the model."""
    model.wte = TokenRows(model.wte, ids)
    model.lm_head = TokenRows(model.lm_head, ids, model.wte.delta if model.cfg.tie_embeddings else None)
    return model


def merge_lora(model):
    """Replace every LoRALinear by its merged nn.Linear, every NF4Linear by its dequantised one and every
    TokenRows by its updated table: all exact. Without adapters the model is a plain GPT again (after
    QLoRA: the dequantised base plus the LoRA update)."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, (LoRALinear, NF4Linear, TokenRows)):
                setattr(parent, name, child.merged())
    model.requires_grad_(True)
    return model


class Adapter(nn.Module):
    """A bottleneck adapter (notes 10.4) in parallel with a frozen linear layer W_0 (He et al. 2022):
    y = W_0 x + s W_up act(W_down x), x: (..., d_in), W_down: (dim, d_in), W_up: (d_out, dim), s a fixed scale in
    the role of LoRA's alpha / r. The notes' adapter (Houlsby et al. 2019) sits in series on a sublayer's output h,
    h + W_up act(W_down h): on this task it learns nothing (RESULTS.md). W_up = 0 at the start: the frozen layer;
    W_down ~ N(0, 1 / d_in), as LoRA's A (with nn.Linear's uniform init a seed of five learnt late, RESULTS.md)."""

    def __init__(self, base, dim, scale):
        super().__init__()
        self.base, self.scale = base, scale
        self.base.requires_grad_(False)
        self.down = nn.Linear(base.in_features, dim)
        self.up = nn.Linear(dim, base.out_features)
        nn.init.normal_(self.down.weight, std=base.in_features ** -0.5)  # as LoRA's A (nn.Linear's is 1.7x smaller)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x):
        return self.base(x) + self.scale * self.up(F.gelu(self.down(x)))  # (..., dim) in the bottleneck


def apply_adapters(model, dim, scale):
    """Freeze the model and put an adapter beside every linear layer of the blocks, as LoRA's updates. Only the
    adapters train. Returns the model. Why not Houlsby et al.'s places, in series after the attention and the
    FFN: an adapter on a sublayer's output cannot change which positions attend to which, and this task needs new
    attention patterns (RESULTS.md: there they do not learn it at any width, scale or rate tried)."""
    return wrap_linears(model, lambda name, linear: Adapter(linear, dim, scale))


def wrap_peft(model, sft_cfg):
    """Wrap `model` for the method of sft_cfg (an SFTConfig, or the settings a checkpoint records of one): LoRA or
    QLoRA, or adapters, the trainable rows of the template tokens and the normalisation gains. Returns the model."""
    if sft_cfg.lora_rank:
        apply_lora(model, sft_cfg.lora_rank, sft_cfg.lora_alpha, sft_cfg.lora_targets, sft_cfg.qlora)
    elif sft_cfg.adapter_dim:
        apply_adapters(model, sft_cfg.adapter_dim, sft_cfg.adapter_scale)
    else:
        return model  # full fine-tuning: everything trains
    if sft_cfg.tokens == "all":  # the whole token table: the embedding and, tied or not, the output head
        model.wte.weight.requires_grad_(True)
        model.lm_head.weight.requires_grad_(True)
    elif sft_cfg.tokens == "template":
        train_template_tokens(model)
    if getattr(sft_cfg, "norms", False):  # off in checkpoints from before the option
        for m in model.modules():
            if isinstance(m, (gpt.RMSNorm, nn.LayerNorm)):
                m.requires_grad_(True)
    return model


# ----------------------------------------------------------------------------------------------
# 3. Supervised fine-tuning

# Each parameter-efficient method's steps at its defaults: full fine-tuning's seconds (3000 steps) on the 2-core CPU,
# where a step costs 1.05x (LoRA), 1.11x (QLoRA: the NF4 base is dequantised in every forward) and 1.34x (adapters)
# full fine-tuning's (RESULTS.md). At this width (r = d / 4) freezing W_0 saves no multiply-adds: the forward and the
# input gradient are full fine-tuning's, and so is LoRA's formed weight gradient (LoRALinear).
PEFT_STEPS = {"lora": 2850, "qlora": 2700, "adapters": 2200}


@dataclass(frozen=True)
class SFTConfig:
    init: str = arg("", "checkpoint to start from; empty = out_dir/gpt.pt (pretrained first if missing)")
    lora_rank: int = arg(0, "LoRA rank r (0 = fine-tune all weights); with it --lr defaults to 1e-3, half the "
                            f"full fine-tuning rate, --min_lr to 0 and --max_steps to {PEFT_STEPS['lora']} "
                            f"({PEFT_STEPS['qlora']} with --qlora), full fine-tuning's seconds (RESULTS.md)")
    lora_alpha: float = arg(128.0, "LoRA scaling alpha: the update is (alpha / r) B A; 128 at r = 16 is a scale of 8, "
                                   "at which, with LoRA's default rate, LoRA and QLoRA learnt on all of ten seeds "
                                   "(RESULTS.md)")
    lora_targets: str = arg("all", "all (every linear layer of the blocks, as QLoRA found necessary to match full "
                                   "fine-tuning) | qv (query and value projections only, Hu et al.'s choice: it does "
                                   "not learn this task, RESULTS.md)")
    qlora: bool = arg(False, "QLoRA: the frozen linear weights of the blocks in 4-bit NF4 (needs --lora_rank)")
    adapter_dim: int = arg(0, "adapter bottleneck width (0 = off); with it --lr defaults to 1e-3, --min_lr to 0 and "
                              f"--max_steps to {PEFT_STEPS['adapters']}, full fine-tuning's seconds; saved as "
                              "out_dir/sft_adapter.pt, not sft.pt")
    adapter_scale: float = arg(8.0, "adapter output scale s: y = W_0 x + s W_up gelu(W_down x), in the role of "
                                    "LoRA's alpha / r and, as it, 8 at half the rate (RESULTS.md)")
    tokens: str = arg("all", "with LoRA, QLoRA or adapters, which rows of the token table (the embedding and the "
                             "output head) also train: all | template (<sep> and <eos>, which pretraining never saw; "
                             "without them a frozen model barely learns) | none (RESULTS.md)")
    norms: bool = arg(True, "with LoRA, QLoRA or adapters, also train the normalisation gains (n_embd each): "
                            "frozen, they bound how sharp the output distribution can become (RESULTS.md)")
    prefix_lm: bool = arg(False, "fine-tune as a prefix LM: the prompt up to and including <sep> attends "
                                 "bidirectionally (notes 8.4); recorded in the checkpoint's config")
    seeds: str = arg("", "a benchmark instead of one run: fine-tune once per seed of this comma-separated list, "
                         "all from out_dir/gpt.pt, each into out_dir/seed_<N>, and print every run and the spread")

    def __post_init__(self):
        train.check(self.lora_rank >= 0, f"lora_rank must be >= 0, got {self.lora_rank}")
        train.check(self.lora_alpha > 0, f"lora_alpha must be > 0, got {self.lora_alpha}")
        train.check_choice(self, "lora_targets", ("qv", "all"))
        train.check_choice(self, "tokens", ("all", "template", "none"))
        train.check(not self.qlora or self.lora_rank, "--qlora trains LoRA on a 4-bit base: give it a rank, e.g. "
                  "--lora_rank 16")
        train.check(self.adapter_dim >= 0, f"adapter_dim must be >= 0, got {self.adapter_dim}")
        train.check(self.adapter_scale > 0, f"adapter_scale must be > 0, got {self.adapter_scale}")
        train.check(not (self.adapter_dim and self.lora_rank), "choose one parameter-efficient method: --adapter_dim "
                  "or --lora_rank, not both")
        train.check(not self.init or os.path.isfile(self.init), f"--init {self.init}: no such file")
        train.check(all(x.strip().lstrip("-").isdigit() for x in self.seeds.split(",")) if self.seeds else True,
                  f"--seeds {self.seeds!r}: give comma-separated integers, e.g. 0,1,2,3,4")
        seeds = self.seed_list()
        train.check(len(set(seeds)) == len(seeds), f"--seeds {self.seeds!r} names a seed twice (each run goes to "
                    "out_dir/seed_<N>)")
        for seed in seeds:
            train.check_seed(seed, "each of --seeds")

    def seed_list(self):
        return [int(x) for x in self.seeds.split(",")] if self.seeds else []

    def method(self):
        """A short description of what trains."""
        tokens = {"all": " + token table", "template": " + <sep>, <eos> rows", "none": ""}[self.tokens] + (
            " + norm gains" if self.norms else "")
        if self.adapter_dim:
            return (f"adapters of width {self.adapter_dim} (scale {self.adapter_scale}) beside every linear "
                    f"layer{tokens}")
        if self.lora_rank:
            return (f"{'QLoRA (NF4 base)' if self.qlora else 'LoRA'} r={self.lora_rank} alpha={self.lora_alpha} "
                    f"on {self.lora_targets}{tokens}")
        return "full fine-tuning"


def sft_loss(model, ids, target):
    """Mean negative log-likelihood of the target tokens (notes 10.3, eq. SFT), prompt positions masked."""
    per_token, _ = gpt.sequence_logprobs(model, ids, target)
    return -per_token.sum() / target.sum()


def sft_batches(task, batch_size, seed):
    """get_batch(i): batch_size training prompts with the demonstrator's responses, from step i's stream."""
    def get_batch(i):
        rng = train.step_rng(seed, i)
        prompts = task.sample_prompts(batch_size, rng)
        responses = [gpt.encode(task.demonstrate(p, rng)) for p in prompts]
        return pack(task, prompts, responses)
    return get_batch


def apply_peft(model, sft_cfg):
    """Wrap `model` for the configured method (notes 10.4) and return what it costs: trainable
    parameters, the bytes holding the blocks' linear weights as stored and in fp32 (NF4 codes and
    scales under QLoRA) and, under QLoRA, the quantisation error ||W - deq(W)||_F / ||W||_F and
    mean |W - deq(W)| over those weights."""
    params = sum(p.numel() for p in model.parameters())
    n_linear = sum(m.weight.numel() for m in model.blocks.modules() if isinstance(m, nn.Linear))
    wrap_peft(model, sft_cfg)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if train.rank() == 0:
        print(f"{sft_cfg.method()}: {trainable:,} trainable of {params:,} parameters ({trainable / params:.2%})")
    nf4 = [m for m in model.modules() if isinstance(m, NF4Linear)]
    stored = sum(m.nbytes() for m in nf4) if nf4 else 4 * n_linear
    stats = {"method": sft_cfg.method(), "trainable_params": trainable, "linear_weight_bytes": stored,
             "linear_weight_bytes_fp32": 4 * n_linear, "linear_weight_bits": 8 * stored / n_linear}
    if nf4:
        sq_err, sq_norm, abs_err = (sum(s) for s in zip(*(m.error_sums for m in nf4)))
        stats["nf4_relative_error"] = math.sqrt(sq_err / sq_norm)
        stats["nf4_mean_abs_error"] = abs_err / n_linear
    return stats


def checkpoint_path(sft_cfg, train_cfg):
    """out_dir/sft.pt, or out_dir/sft_adapter.pt for adapters (they cannot be merged into a plain GPT)."""
    return os.path.join(train_cfg.out_dir, "sft_adapter.pt" if sft_cfg.adapter_dim else "sft.pt")


def finetune(model, task, sft_cfg, train_cfg, built_from=None):
    """Prompt-masked SFT of `model` (a GPT; built_from: the provenance of its checkpoint), of all its weights
    or parameter-efficient (notes 10.4), into checkpoint_path(). LoRA (and the template tokens' rows) are
    merged into the weights when it finishes (after QLoRA: the dequantised NF4 base plus the LoRA update), so
    sft.pt is a plain GPT for the later stages. Returns (model, metrics)."""
    if sft_cfg.prefix_lm:  # the same weights under a prefix-LM mask (notes 8.4); the config records it
        causal, model = model, gpt.GPT(dataclasses.replace(model.cfg, prefix_lm=True))
        model.load_state_dict(causal.state_dict())
    config = dataclasses.asdict(model.cfg)
    torch.manual_seed(train_cfg.seed)  # LoRA's A, the adapters' down-projections: this run's seed, not the process's
    stats = apply_peft(model, sft_cfg)
    held = task.heldout_prompts()
    held_batch = pack(task, held, [gpt.encode(task.correct(p)) for p in held])  # correct responses

    def loss_fn(net, batch):
        ids, target = (t.to(next(model.parameters()).device) for t in batch)
        return sft_loss(net, ids, target) + gpt.aux_loss(model), {"tokens": ids.numel()}

    def evaluate(m):
        ids, target = (t.to(next(m.parameters()).device) for t in held_batch)
        return {"loss": sft_loss(m, ids, target).item(), **evaluate_policy(m, task, held)}

    path = checkpoint_path(sft_cfg, train_cfg)
    meta = {"stage": "sft", "config": config, "task": task.identity, "sft": dataclasses.asdict(sft_cfg),
            "built_from": built_from or {}}
    result = train.train(model, train_cfg, sft_batches(task, train_cfg.batch_size, train_cfg.seed), loss_fn,
                       evaluate, path, meta, desc="sft")
    result = {**result, **stats, "checkpoint": path}
    if sft_cfg.lora_rank or sft_cfg.adapter_dim:
        merge_lora(model)  # LoRA, NF4 and the token rows merge exactly; adapters stay
        if train.rank() == 0:
            ckpt = train.load_checkpoint(path)  # the finished run, its weights replaced by the merged ones
            train.save_checkpoint(path, **{**ckpt, "model": model.state_dict(), "optimizer": None})
            print(f"saved {path}: " + (
                "adapters cannot be merged into the weights (the bottleneck is nonlinear), read it with "
                "sft.load_trained; sft.pt, where the later stages start, is unchanged" if sft_cfg.adapter_dim else
                f"a plain GPT, the LoRA update merged into the {'dequantised NF4 ' if sft_cfg.qlora else ''}weights"))
    return model, result


def peft_method(argv):
    """full | lora | qlora | adapters: the method argv (None: the command line) asks for, read before the flags are
    parsed, for the defaults that depend on it. A bad value counts as full fine-tuning: the flags' parser refuses it."""
    try:
        lora = int(peek_flag(argv, "lora_rank", "0")) > 0
        adapters = int(peek_flag(argv, "adapter_dim", "0")) > 0
    except ValueError:
        return "full"
    if lora:
        return "qlora" if peek_flag(argv, "qlora", False) else "lora"
    return "adapters" if adapters else "full"


def sft_defaults(argv=()):
    """The configs of `python sft.py` (also what a later stage runs when out/sft.pt is missing), chosen by a seed
    sweep (RESULTS.md): the model learns addition in a sudden transition whose timing varies with the seed and the
    pretrained model. With batch 32 at lr 3e-3 it came after step 3000 in 4 of 10 runs; batch 64 at lr 2e-3 halves
    the gradient noise at a step size that stays stable, and the transition comes by step 1500 in most runs.
    With --lora_rank (LoRA, QLoRA) or --adapter_dim in argv the method has its own defaults (RESULTS.md): PEFT_STEPS,
    the rate decayed to 0, not to a tenth, so that the last steps settle instead of moving greedy accuracy by several
    points, and half the rate, 1e-3: at alpha / r = 8 LoRA's update B A already moves 8x faster (the adapters' at
    their scale 8 likewise), and at the full rate QLoRA stalled on 3 seeds of 10."""
    method = peft_method(argv)
    return TaskConfig(), SFTConfig(), train.TrainConfig(
        max_steps=PEFT_STEPS.get(method, 3000), batch_size=64, lr=2e-3 if method == "full" else 1e-3,
        min_lr=2e-4 if method == "full" else 0.0, warmup_steps=50, eval_interval=1000, weight_decay=0.0)


LEARNT = 0.85  # greedy held-out accuracy below which the model is short of its plateau (past it: 93-98%)


def train_sft(task, sft_cfg, train_cfg):
    """The whole stage: load (or pretrain) the base model, fine-tune, report: the table, the guard against a
    model that has not learnt the task, out_dir/sft_metrics.json. Returns (model, metrics)."""
    device = train.pick_device(train_cfg.device)
    train.claim_checkpoint(checkpoint_path(sft_cfg, train_cfg), train_cfg)
    if sft_cfg.init:
        model, ckpt = gpt.load_model(sft_cfg.init, device)
        train.check_finished(ckpt, sft_cfg.init, ckpt.get("stage", "gpt"), gpt.pretrain_defaults()
                             if ckpt.get("stage") == "gpt" else sft_defaults())
    else:
        model_cfg, defaults, data_cfg = gpt.pretrain_defaults()
        pretrain = lambda: gpt.pretrain_and_report(  # noqa: E731
            model_cfg, train.inherit(defaults, train_cfg), data_cfg)
        model, ckpt = train.load_stage(os.path.join(train_cfg.out_dir, "gpt.pt"), "gpt", pretrain,
                                       gpt.model_from_checkpoint, device, defaults=gpt.pretrain_defaults())
    before = evaluate_policy(model, task)
    model, m = finetune(model, task, sft_cfg, train_cfg, {ckpt.get("stage", "init"): train.provenance(ckpt)})
    m["before"] = before
    if train.rank() != 0:
        return model, m
    train.print_table("SFT on held-out prompts", [
        ("exact match, greedy, 95% CI", f"{percent_ci(m['before'], 'accuracy')} -> {percent_ci(m, 'accuracy')}"),
        ("exact match, sampled (T=1), 95% CI", f"{percent_ci(m['before'], 'sample_accuracy')} -> "
                                              f"{percent_ci(m, 'sample_accuracy')}"),
        ("true reward r*, sampled", f"{m['before']['true_reward']:.3f} -> {m['true_reward']:.3f}"),
        ("loss on the correct answers", m["loss"]), ("train seconds", m["train_seconds"]),
        ("method", m["method"]), ("trainable parameters", f"{m['trainable_params']:,}"),
        ("blocks' linear weights", f"{m['linear_weight_bytes']:,} bytes ({m['linear_weight_bits']:.3g} bits/weight; "
                                   f"fp32: {m['linear_weight_bytes_fp32']:,})"),
        *([("NF4 error: rel. Frobenius, mean abs", f"{m['nf4_relative_error']:.4f}, {m['nf4_mean_abs_error']:.2e}")]
          if "nf4_relative_error" in m else [])])
    p, = task.sample_prompts(1, random.Random(1), heldout=True)
    out = gpt.generate(model, [task.prompt_tokens(p)], task.max_response_tokens, temperature=0)[0]
    print(f"\nsample: {task.prompt_text(p)} -> {response_text(out)} (correct: {task.correct(p)})")
    if m["accuracy"] < LEARNT:  # the transition came late or not at all (RESULTS.md): a second run gets past it
        print(f"\nwarning: the fine-tuned model has not learnt the task fully ({m['accuracy']:.1%} greedy held-out "
              f"accuracy, below {LEARNT:.0%}); the alignment stages would start from it. Train it further: "
              f"python sft.py --init {m['checkpoint']} --overwrite --out_dir {train_cfg.out_dir}")
    train.write_metrics("sft", m, train_cfg.out_dir)
    return model, m


def load_sft_policy(task, train_cfg, device):
    """out_dir/sft.pt, the starting point of every alignment stage, checked to be finished and built for this
    task; fine-tuned first with this script's defaults (and the caller's task, seed, device, dtype) when
    missing. Returns (model, checkpoint dict)."""
    _, sft_cfg, defaults = sft_defaults()
    return train.load_stage(os.path.join(train_cfg.out_dir, "sft.pt"), "sft", lambda: train_sft(
        task, sft_cfg, train.inherit(defaults, train_cfg)), gpt.model_from_checkpoint, device,
        requires={"task": task.identity}, defaults=sft_defaults())


def seed_sweep(task, sft_cfg, train_cfg):
    """`python sft.py --seeds 0,1,2,3,4`: the stage once per seed (its batches and demonstrations), all from one
    pretrained model, each into out_dir/seed_<N>; then each run's held-out figures and their mean and range.
    Seeds stand in for another machine: where the float rounding of another CPU moves a run, so do they."""
    base = os.path.join(train_cfg.out_dir, "gpt.pt")
    model_cfg, defaults, data_cfg = gpt.pretrain_defaults()
    pretrain = lambda: gpt.pretrain_and_report(model_cfg, train.inherit(defaults, train_cfg), data_cfg)  # noqa: E731
    train.load_stage(base, "gpt", pretrain, gpt.model_from_checkpoint, defaults=gpt.pretrain_defaults())
    runs = {}
    for seed in sft_cfg.seed_list():
        _, runs[seed] = train_sft(task, dataclasses.replace(sft_cfg, init=base, seeds=""), dataclasses.replace(
            train_cfg, seed=seed, out_dir=os.path.join(train_cfg.out_dir, f"seed_{seed}")))
    keys = ("accuracy", "sample_accuracy", "true_reward", "train_seconds")
    spread = {k: {"mean": sum(m[k] for m in runs.values()) / len(runs), "min": min(m[k] for m in runs.values()),
                  "max": max(m[k] for m in runs.values())} for k in keys}
    rows = [(f"seed {seed}", f"greedy {m['accuracy']:.1%}, sampled {m['sample_accuracy']:.1%}, "
                             f"r* {m['true_reward']:.3f}, {m['train_seconds']:.0f} s") for seed, m in runs.items()]
    rows += [(f"{k}: mean [min, max]", f"{v['mean']:.4g} [{v['min']:.4g}, {v['max']:.4g}]") for k, v in spread.items()]
    train.print_table(f"SFT over {len(runs)} seeds from {base}, held-out ({task.n_heldout} prompts)", rows)
    train.write_metrics("sft_seeds", {"base": base, "runs": {str(s): {k: m[k] for k in keys} for s, m in runs.items()},
                                    **spread}, train_cfg.out_dir)


# ----------------------------------------------------------------------------------------------
# 4. Using a trained model: sampling from it, exporting it to the Hugging Face Llama format

@dataclass(frozen=True)
class UseConfig:
    """Using a trained model instead of training one: --sample from it, or --export_hf it."""
    sample: str = arg("", "instead of training: sample from this checkpoint of any stage (gpt, sft, dpo, gpro, ppo)")
    prompt: str = arg("", "the prompt for --sample, e.g. 123+456; empty = one prompt per line of stdin")
    n: int = arg(5, "continuations per prompt (--sample)")
    temperature: float = arg(1.0, "sampling temperature (--sample); 0 = greedy")
    top_k: int = arg(0, "sample among the k most probable tokens only (--sample); 0 = off")
    top_p: float = arg(1.0, "nucleus sampling: among the most probable tokens of mass p (--sample); 1 = off")
    max_new_tokens: int = arg(0, "tokens to generate (--sample); 0 = an answer's length for a prompt of the "
                                 "checkpoint's task, else what fits the context")
    export_hf: str = arg("", "instead of training: write this checkpoint in the Hugging Face Llama format")
    export_dir: str = arg("", "the directory --export_hf writes: config.json, model.safetensors, the tokenizer")

    def __post_init__(self):
        train.check(not (self.sample and self.export_hf), "choose one: --sample or --export_hf")
        for flag in ("sample", "export_hf"):
            path = getattr(self, flag)
            train.check(not path or os.path.isfile(path), f"--{flag} {path}: no such file")
        changed = [f.name for f in dataclasses.fields(self) if f.name not in ("sample", "export_hf", "export_dir")
                   and getattr(self, f.name) != f.default]  # the sampling settings
        train.check(self.sample or not changed, f"--{changed and changed[0]} is a setting of --sample CKPT")
        train.check(bool(self.export_hf) == bool(self.export_dir), "--export_hf CKPT and --export_dir DIR go together")
        train.check(not os.path.isfile(self.export_dir), f"--export_dir {self.export_dir} is a file: give a directory")
        train.check(self.n >= 1, f"n must be >= 1, got {self.n}")
        train.check(self.max_new_tokens >= 0, f"max_new_tokens must be >= 0 (0 = automatic), got {self.max_new_tokens}")
        gpt.check_sampling(self.temperature, self.top_k, self.top_p)


def load_trained(path, device="cpu"):
    """The language model of any stage's checkpoint (gpt, sft, dpo, gpro, ppo): a GPT, or with its adapters
    (sft_adapter.pt: they cannot be merged). An SFT run under LoRA or QLoRA stopped before its end holds the wrapped
    modules: they are rebuilt and merged. Returns (model, checkpoint dict)."""
    ckpt = train.load_checkpoint(path)
    train.check(ckpt.get("stage") != "reward", f"{path} is a reward model: it scores responses and generates none; "
                "give a checkpoint of gpt, sft, dpo, gpro or ppo")
    if not any(".base." in k or ".sublayer." in k for k in ckpt["model"]):
        return gpt.model_from_checkpoint(ckpt, path).to(device), ckpt
    try:  # a finished adapter run has its token rows merged (wte.delta gone), its adapters not
        rows = "template" if "wte.delta" in ckpt["model"] else "none"  # a whole table trained is a plain table
        peft = types.SimpleNamespace(**{**ckpt["sft"], "tokens": rows})
        model = wrap_peft(gpt.GPT(gpt.GPTConfig(**ckpt["config"])), peft)
        model.load_state_dict(ckpt["model"])
    except (KeyError, TypeError, AttributeError, RuntimeError, train.UserError) as e:
        raise train.UserError(f"checkpoint {path} does not match this version of sft.py: "
                              f"{str(e).splitlines()[0]}; delete it and train again") from None
    return merge_lora(model).to(device), ckpt  # LoRA, NF4 and the token rows merge exactly; adapters stay


def print_samples(model, task, use, text, generator):
    """use.n continuations of `text`, a line each (a string literal when it holds newlines or control bytes), for a
    prompt of the task (None for a pretrained model) with the correct answer and r*."""
    try:
        ids = gpt.encode(text)
    except UnicodeEncodeError:
        raise train.UserError(f"the prompt {text!r} is not valid UTF-8 text") from None
    parsed = task.parse_prompt(text) if task else None
    # a fine-tuned model reads the chat template <bos> prompt <sep> around any text, a pretrained one <bos> text
    prompt = task.prompt_tokens(parsed) if parsed is not None else [BOS] + ids + ([SEP] if task else [])
    room = model.cfg.block_size - len(prompt)
    new = use.max_new_tokens or (task.max_response_tokens if parsed is not None else room)
    context = f"the context block_size={model.cfg.block_size}"
    train.check(room >= 1, f"the prompt is {len(prompt)} tokens, {context} leaves no room for an answer: shorten it")
    train.check(new <= room, f"the prompt's {len(prompt)} tokens and max_new_tokens={new} exceed {context}: lower "
                "--max_new_tokens or shorten the prompt")
    for out in gpt.generate(model, [prompt] * use.n, new, use.temperature, use.top_k, use.top_p, generator=generator):
        y = response_text(out)
        shown = y if y.isprintable() else repr(y)  # one line each: newlines and control bytes escaped
        score = f"    correct: {task.correct(parsed)}    r* = {task.true_reward(parsed, y):.3f}" if parsed is not None \
            else ""
        print(f"{text} -> {shown}{score}", flush=True)


def sample_from(use, train_cfg):
    """`python sft.py --sample CKPT`: sample --prompt, or each line of stdin, where a bad line is one error line
    and the next line is read."""
    device = train.pick_device(train_cfg.device)
    model, ckpt = load_trained(use.sample, device)
    task = task_of(ckpt["task"]) if "task" in ckpt else None  # fine-tuned: it knows the task's template
    generator = torch.Generator(device=device).manual_seed(train_cfg.seed)
    if use.prompt:
        return print_samples(model, task, use, use.prompt, generator)
    if sys.stdin.isatty():
        print(f"{use.sample}: a prompt per line, Ctrl-D ends", file=sys.stderr)
    for line in sys.stdin.buffer:  # bytes that are not UTF-8 reach encode() as unencodable text
        text = line.decode("utf-8", errors="surrogateescape").rstrip("\r\n")
        try:
            if text:
                print_samples(model, task, use, text, generator)
        except train.UserError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)


def export(use, train_cfg):
    """`python sft.py --export_hf CKPT --export_dir DIR`: the model, LoRA merged, for transformers, vLLM, TRL."""
    train.check(not os.path.isdir(use.export_dir) or not os.listdir(use.export_dir) or train_cfg.overwrite,
                f"--export_dir {use.export_dir} is not empty: give a new directory, or --overwrite to write into it")
    model, _ = load_trained(use.export_hf)
    train.check(not any(isinstance(m, Adapter) for m in model.modules()), f"{use.export_hf} holds adapters "
                "(adapter_dim): the Llama format has no place for them and their nonlinear bottleneck cannot be "
                "merged into the weights; export a full or LoRA fine-tuned checkpoint")
    gpt.export_hf(model, use.export_dir)
    print(f"wrote {use.export_dir}: {use.export_hf} as a Hugging Face LlamaForCausalLM with its byte tokenizer")


def use_model(use, configs, defaults):
    """--sample or --export_hf: the checkpoint brings its own settings, so no other flag may be given."""
    keep = ("device", "seed") if use.sample else ("overwrite",)
    changed = [f.name for c, d in zip(configs, defaults) for f in dataclasses.fields(c)
               if f.name not in keep and getattr(c, f.name) != getattr(d, f.name)]
    what = "--sample" if use.sample else "--export_hf"
    train.check(not changed, f"--{changed and changed[0]} does not apply to {what}: the checkpoint brings its settings")
    (sample_from if use.sample else export)(use, configs[2])


def main(argv=None):
    defaults = [*sft_defaults(argv), UseConfig()]
    task_cfg, sft_cfg, train_cfg, use = parse_args(defaults, argv, description="prompt-masked SFT, full or with LoRA, "
                                                   "QLoRA or adapters; sampling from and exporting a model")
    if use.sample or use.export_hf:
        return use_model(use, [task_cfg, sft_cfg, train_cfg], defaults)
    (seed_sweep if sft_cfg.seeds else train_sft)(task_cfg.build(), sft_cfg, train_cfg)


if __name__ == "__main__":
    train.run_main(main)
