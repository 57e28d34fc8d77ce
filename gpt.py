"""
gpt.py: a decoder-only transformer language model, Llama-shaped by default, with its switches.

Read top to bottom:
  1. byte tokenizer                      ids 0..255 are bytes, then BOS, EOS, PAD, SEP
  2. GPTConfig                           frozen and validated: a model's config never changes
  3. the model                           attention (MHA/GQA/MQA, RoPE), FFN (SwiGLU), block, GPT
                                         (notes 4.1-4.4, 4.7, 5.2, 8.2, 8.6-8.7)
  4. KV cache, sampling, log-probs       (notes 4.3, 10.1, 10.5) used by every later stage
  5. the switches                        each its own module, chosen once when the model is built: post-norm
                                         and parallel blocks (4.7, 8.9), causal linear attention with its
                                         recurrent cache (4.10), mixture of experts (8.8), prefix-LM mask (8.4)
  6. a GPT from a checkpoint, FLOPs per token
  7. export to the Hugging Face Llama format (what transformers, vLLM, TRL load)
  8. pretraining on the Python standard library's source: `python gpt.py`

The run itself (flags, checkpoints, the training loop, DDP) is train.py's; the attention kernels are kernels.py's.
Run `python gpt.py --help` for the flags; `torchrun --nproc_per_node=N gpt.py` trains with DDP.
"""
import dataclasses
import json
import math
import os
import sysconfig
import time
import zlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels import attention, causal_mask
from train import (TrainConfig, UserError, arg, autocast, autocast_dtype, check, check_choice, claim_checkpoint,
                   load_checkpoint, parse_args, pick_device, print_table, rank, run_main, step_generator, train,
                   write_metrics)


# ----------------------------------------------------------------------------------------------
# 1. Tokenizer: bytes plus a few special tokens. No vocabulary file, any UTF-8 text round-trips.

BOS, EOS, PAD, SEP = 256, 257, 258, 259
N_TOKENS = 260  # real token ids; the model's vocabulary is padded up to a multiple of 64
SPECIAL_NAMES = {BOS: "<bos>", EOS: "<eos>", PAD: "<pad>", SEP: "<sep>"}


def encode(text, bos=False, eos=False):
    ids = list(text.encode("utf-8"))
    return ([BOS] if bos else []) + ids + ([EOS] if eos else [])


def decode(ids, special=False):
    """Bytes back to text; invalid UTF-8 becomes U+FFFD (never raises). Special tokens are dropped
    unless `special=True`, which shows them as <bos>, <eos>, ..."""
    out, buf = [], bytearray()
    for i in (int(t) for t in ids):
        if i < 256:
            buf.append(i)
            continue
        out.append(buf.decode("utf-8", errors="replace"))
        buf = bytearray()
        if special:
            out.append(SPECIAL_NAMES.get(i, f"<{i}>"))
    out.append(buf.decode("utf-8", errors="replace"))
    return "".join(out)


def padded_vocab_size(n=N_TOKENS, multiple=64):
    return (n + multiple - 1) // multiple * multiple


# ----------------------------------------------------------------------------------------------
# 2. The configuration

@dataclass(frozen=True)
class GPTConfig:
    block_size: int = arg(128, "context length in tokens")
    vocab_size: int = arg(padded_vocab_size(), "vocabulary (bytes + specials, padded to a multiple of 64)")
    n_layer: int = arg(4, "transformer blocks")
    n_head: int = arg(4, "query heads")
    n_kv_head: int = arg(2, "key/value heads: = n_head is MHA, 1 is MQA, in between GQA (notes 4.1-4.4)")
    n_embd: int = arg(64, "model width d_model")
    dropout: float = arg(0.0, "dropout rate on attention weights and residual branches (notes 4.8)")
    bias: bool = arg(False, "biases in linear layers and LayerNorm")
    pos_emb: str = arg("rope", "position embedding: rope | learned")
    norm: str = arg("rmsnorm", "normalisation: rmsnorm | layernorm (notes 5.2, 4.7)")
    norm_placement: str = arg("pre", "pre | post normalisation (notes 4.7)")
    ffn: str = arg("swiglu", "feed-forward: swiglu | gelu | relu (notes 8.6-8.7)")
    ffn_hidden: int = arg(0, "FFN hidden width; 0 = 4*n_embd (gelu, relu) or 8/3*n_embd rounded to 32 (swiglu)")
    rope_theta: float = arg(10000.0, "RoPE base")
    tie_embeddings: bool = arg(True, "share the input embedding and the output head")
    logit_scale: bool = arg(False, "divide the output logits by sqrt(n_embd), so their variance does not grow "
                                   "with the width (notes 3.1; attention scores are always / sqrt(head_dim))")
    attention: str = arg("softmax", "softmax | linear: causal linear attention, phi = ELU + 1 (notes 4.10)")
    prefix_lm: bool = arg(False, "prefix-LM mask: the positions up to and including each row's first <sep> "
                                 "attend to each other bidirectionally, the rest causally (notes 8.4)")
    parallel_block: bool = arg(False, "x + (attn(norm(x)) + ffn(norm(x))) / sqrt(2), one norm (notes 8.9)")
    n_expert: int = arg(0, "mixture-of-experts FFN with this many experts; 0 = one dense FFN (notes 8.8)")
    expert_top_k: int = arg(2, "experts per token (MoE)")
    expert_capacity: float = arg(2.5, "MoE capacity factor alpha: in training an expert takes at most "
                                      "floor(alpha*B*T/n_expert) tokens, the rest are dropped (the mean load is "
                                      "top_k*B*T/n_expert); 0 = no limit")
    moe_aux_coef: float = arg(0.01, "lambda: weight of the load-balancing loss E sum_e f_e m_e per MoE layer")

    def __post_init__(self):
        for name, allowed in {"pos_emb": ("rope", "learned"), "norm": ("rmsnorm", "layernorm"),
                              "norm_placement": ("pre", "post"), "ffn": ("swiglu", "gelu", "relu"),
                              "attention": ("softmax", "linear")}.items():
            check_choice(self, name, allowed)
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd"):
            check(getattr(self, name) >= 1, f"{name} must be a positive integer, got {getattr(self, name)}")
        check(self.vocab_size >= N_TOKENS, f"vocab_size={self.vocab_size} is smaller than the {N_TOKENS} token ids")
        check(self.n_embd % self.n_head == 0, f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        check(self.n_head % self.n_kv_head == 0, f"n_head={self.n_head} must be divisible by n_kv_head="
              f"{self.n_kv_head} (each key/value head serves a whole group of query heads)")
        check(self.pos_emb != "rope" or self.head_dim % 2 == 0,
              f"rotary embeddings need an even head_dim, got n_embd/n_head = {self.head_dim}")
        check(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")
        check(self.ffn_hidden >= 0, f"ffn_hidden must be >= 0, got {self.ffn_hidden}")
        check(self.rope_theta > 0, f"rope_theta must be > 0, got {self.rope_theta}")
        check(not (self.parallel_block and self.norm_placement == "post"),
              "parallel_block normalises the block's input once: use it with norm_placement=pre")
        check(self.n_expert >= 0 and (not self.n_expert or 1 <= self.expert_top_k <= self.n_expert),
              f"need n_expert >= 0 and 1 <= expert_top_k <= n_expert, got n_expert={self.n_expert}, "
              f"expert_top_k={self.expert_top_k}")
        check(self.expert_capacity >= 0 and self.moe_aux_coef >= 0, f"expert_capacity and moe_aux_coef must be "
              f">= 0, got {self.expert_capacity} and {self.moe_aux_coef}")

    @property
    def head_dim(self):
        return self.n_embd // self.n_head

    @property
    def ffn_width(self):
        """The FFN's hidden width: SwiGLU takes 2/3 of 4*d, so that its three matrices cost what two did."""
        if self.ffn_hidden:
            return self.ffn_hidden
        return (8 * self.n_embd // 3 + 31) // 32 * 32 if self.ffn == "swiglu" else 4 * self.n_embd


# ----------------------------------------------------------------------------------------------
# 3. The model

class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * gamma (notes 5.2; Zhang & Sennrich 2019): no mean subtraction, no shift."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()  # the reduction in fp32 also under bf16 autocast (notes 7; Micikevicius et al. 2018)
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def make_norm(cfg):
    return RMSNorm(cfg.n_embd) if cfg.norm == "rmsnorm" else nn.LayerNorm(cfg.n_embd, bias=cfg.bias)


def rope_tables(head_dim, max_len, theta):
    """cos and sin of position * theta^(-2i/d) for i < d/2, each (max_len, head_dim/2) (RoPE, Su et al. 2021)."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.arange(max_len, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return angles.cos().float(), angles.sin().float()


def apply_rope(x, cos, sin):
    """Rotate each pair (x_i, x_{i+d/2}) by the angle of its position. x: (B, T, H, hd); cos, sin: (B, T, 1, hd/2)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


class Attention(nn.Module):
    """Self-attention with n_head query heads and n_kv_head key/value heads: MHA, GQA (Ainslie et al. 2023)
    or MQA (Shazeer 2019), notes 4.1-4.4. causal=False leaves causality to the mask (the prefix LM)."""

    def __init__(self, cfg, causal=True):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.causal, self.dropout = causal, cfg.dropout
        hd = cfg.head_dim
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_head * hd, bias=cfg.bias)     # W_q (eq. 5)
        self.k_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * hd, bias=cfg.bias)  # W_k: only n_kv_head heads
        self.v_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * hd, bias=cfg.bias)  # W_v
        self.o_proj = nn.Linear(cfg.n_head * hd, cfg.n_embd, bias=cfg.bias)     # W_O (eq. 8)
        self.o_proj.residual = True
        self.resid_drop = nn.Dropout(cfg.dropout)

    def project(self, x, rope):
        """q (B, n_head, T, hd) and k, v (B, n_kv_head, T, hd), q and k rotated when rope is given."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def output(self, y):
        """Concatenate the heads of y (B, n_head, T, hd) and mix them with W_O: (B, T, n_embd)."""
        B, _, T, _ = y.shape
        return self.resid_drop(self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)))

    def forward(self, x, rope, mask, cache):
        q, k, v = self.project(x, rope)
        if cache is not None:  # append this step's keys/values; attend over everything cached so far
            k, v = cache.update(k, v)                                                # (B, n_kv_head, Tk, hd)
        # per head h: A_h = softmax(Q_h K_g(h)^T / sqrt(hd) + M) V_g(h), M = -inf where a query may not look
        # (the future, padding); g(h) the key/value head of query head h (notes 4.1 eqs. 5-8, 4.4). kernels.py
        # computes it: reference_attention writes it out, flash attention (GPUs) never stores the T x T scores.
        y = attention(q, k, v, causal=self.causal, mask=mask, dropout_p=self.dropout if self.training else 0.0)
        return self.output(y)                                                        # y: (B, n_head, T, hd)

    def new_cache(self, kv, batch_size, max_len, device, dtype):
        shape = (batch_size, self.n_kv_head, max_len, self.head_dim)
        return LayerCache(kv, torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device,
                                                                                           dtype=dtype))


class FeedForward(nn.Module):
    """FFN(x) = W_2 act(W_1 x) (notes 8.6), or SwiGLU: W_2 (SiLU(W_g x) * W_v x) (notes 8.7; Shazeer 2020)."""

    def __init__(self, cfg):
        super().__init__()
        self.up = nn.Linear(cfg.n_embd, cfg.ffn_width, bias=cfg.bias)  # W_1, or W_v for SwiGLU
        self.gate = nn.Linear(cfg.n_embd, cfg.ffn_width, bias=cfg.bias) if cfg.ffn == "swiglu" else None  # W_g
        self.down = nn.Linear(cfg.ffn_width, cfg.n_embd, bias=cfg.bias)  # W_2
        self.down.residual = True
        self.act = {"swiglu": F.silu, "gelu": F.gelu, "relu": F.relu}[cfg.ffn]
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x):
        h = self.act(self.gate(x)) * self.up(x) if self.gate is not None else self.act(self.up(x))
        return self.drop(self.down(h))


class Block(nn.Module):
    """Pre-norm: x + attn(norm(x)), then + ffn(norm(.)) (notes 4.7; Xiong et al. 2020). The attention and FFN
    modules are the config's (softmax or linear attention, dense or mixture of experts)."""

    def __init__(self, cfg):
        super().__init__()
        self.norm1 = make_norm(cfg)
        self.attn = (LinearAttention if cfg.attention == "linear" else Attention)(cfg, causal=not cfg.prefix_lm)
        self.norm2 = make_norm(cfg)
        self.ffn = MoE(cfg) if cfg.n_expert else FeedForward(cfg)

    def forward(self, x, rope, mask, cache):
        x = x + self.attn(self.norm1(x), rope, mask, cache)
        return x + self.ffn(self.norm2(x))


class GPT(nn.Module):
    """The decoder-only transformer (notes 8.2; GPT, Radford et al. 2018): embeddings, n_layer blocks, the
    final norm, the LM head."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd) if cfg.pos_emb == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        block = ParallelBlock if cfg.parallel_block else PostNormBlock if cfg.norm_placement == "post" else Block
        self.blocks = nn.ModuleList(block(cfg) for _ in range(cfg.n_layer))
        self.norm_f = make_norm(cfg) if cfg.norm_placement == "pre" else nn.Identity()
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        if cfg.pos_emb == "rope":
            cos, sin = rope_tables(cfg.head_dim, cfg.block_size, cfg.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)  # (block_size, hd/2)
            self.register_buffer("rope_sin", sin, persistent=False)
        # notes 3.1: with RMS(x) = 1 and weights of variance s^2, Var(logit) ~ n_embd s^2; / sqrt(n_embd): s^2
        self.logit_divisor = math.sqrt(cfg.n_embd) if cfg.logit_scale else 1.0
        self.apply(self._init_weights)

    def _init_weights(self, m):
        # N(0, 0.02); projections that write into the residual stream get 0.02/sqrt(2*n_layer) so
        # the stream's variance does not grow with depth (GPT-2's scaled init, Radford et al. 2019).
        if isinstance(m, nn.Linear):
            std = 0.02 / math.sqrt(2 * self.cfg.n_layer) if getattr(m, "residual", False) else 0.02
            nn.init.normal_(m.weight, 0.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, 0.0, 0.02)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx, attn_mask=None, cache=None, last_only=False):
        """idx: (B, T) token ids. attn_mask: (B, T), 1 for real tokens and 0 for (left) padding.
        cache: a KVCache to append to (generation). Returns logits (B, T, vocab) or (B, 1, vocab)."""
        x = self.hidden_states(idx, attn_mask, cache)                                # (B, T, C)
        return self.lm_head(x[:, -1:] if last_only else x) / self.logit_divisor      # (B, T, vocab)

    def hidden_states(self, idx, attn_mask=None, cache=None):
        """The final hidden states (B, T, n_embd) that the LM head (or reward.py's scalar head) reads."""
        B, T = idx.shape
        start = 0 if cache is None else cache.length
        if start + T > self.cfg.block_size:
            raise UserError(f"sequence of {start + T} tokens is longer than the context "
                            f"block_size={self.cfg.block_size}: shorten the prompt or max_new_tokens")
        # Positions count real tokens only, so a left-padded prompt starts at position 0.
        if attn_mask is None and cache is None:
            pos = torch.arange(T, device=idx.device).expand(B, T)                    # (B, T)
        else:
            real = torch.ones_like(idx) if attn_mask is None else attn_mask.long()
            offset = 0 if cache is None else cache.next_pos[:, None]
            pos = (offset + real.cumsum(1) - 1).clamp(min=0)                         # (B, T)
        if cache is not None:
            mask = cache.advance(T, attn_mask)                                       # (B, 1, T, Tk) or None
        elif attn_mask is not None and not bool(attn_mask.all()):
            mask = padding_mask(attn_mask.bool(), T)
        else:
            mask = None
        if self.cfg.prefix_lm:  # the prefix attends both ways (notes 8.4)
            mask = intersect_masks(mask, prefix_lm_mask(idx, start))
        x = self.wte(idx)                                                            # (B, T, C)
        rope = None
        if self.wpe is not None:
            x = x + self.wpe(pos)
        else:
            rope = (self.rope_cos[pos][:, :, None], self.rope_sin[pos][:, :, None])  # (B, T, 1, hd/2)
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            x = block(x, rope, mask, None if cache is None else cache.layers[i])
        if cache is not None:
            cache.length += T
        return self.norm_f(x)


def padding_mask(key_valid, Tq):
    """(B, 1, Tq, Tk) bool from key_valid (B, Tk): a query may attend to real keys, and always to
    itself so that a padding query's softmax row is never empty (its output is never used)."""
    Tk = key_valid.shape[1]
    self_key = torch.zeros(Tq, Tk, dtype=torch.bool, device=key_valid.device)
    self_key[torch.arange(Tq), torch.arange(Tk - Tq, Tk)] = True
    return (key_valid[:, None, None, :] | self_key)  # causality is added by attention()


def intersect_masks(a, b):
    """Where both attention masks allow (True = may attend); either may be None, no constraint."""
    return a if b is None else b if a is None else a & b


def lm_loss(logits, targets, ignore_index=-1):
    """Mean cross-entropy of the next-token predictions (notes 10.1, eq. CLM); targets already shifted."""
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                           ignore_index=ignore_index)


# ----------------------------------------------------------------------------------------------
# 4. KV cache, sampling, generation and sequence log-probabilities (notes 4.3, 10.1, 10.5)

class LayerCache:
    """Preallocated keys and values of one layer, only the n_kv_head heads: (B, n_kv_head, max_len, hd)."""

    def __init__(self, kv, k, v):
        self.kv, self.k, self.v = kv, k, v

    def update(self, k, v):
        start, T = self.kv.length, k.shape[2]
        self.k[:, :, start:start + T] = k
        self.v[:, :, start:start + T] = v
        return self.k[:, :, :start + T], self.v[:, :, :start + T]  # views, no copy


class KVCache:
    """The static cache of all layers (each attention module makes its own: keys and values, or linear
    attention's running sums), plus which cached positions are real tokens (left padding)."""

    def __init__(self, model, batch_size, max_len, device, dtype):
        if max_len > model.cfg.block_size:
            raise UserError(f"{max_len} tokens do not fit the context block_size={model.cfg.block_size}")
        self.length = 0                                                                   # filled positions
        self.key_valid = torch.ones(batch_size, max_len, dtype=torch.bool, device=device)
        self.next_pos = torch.zeros(batch_size, dtype=torch.long, device=device)          # next position id
        self.padded = False
        self.layers = [m.new_cache(self, batch_size, max_len, device, dtype)
                       for m in model.modules() if isinstance(m, Attention)]

    def advance(self, T, attn_mask):
        """Record T new positions (attn_mask: (B, T) or None = all real); return the attention mask."""
        end = self.length + T
        if attn_mask is not None:
            self.key_valid[:, self.length:end] = attn_mask.bool()
            self.padded = self.padded or not bool(attn_mask.all())
            self.next_pos += attn_mask.long().sum(1)
        else:
            self.next_pos += T
        return padding_mask(self.key_valid[:, :end], T) if self.padded else None

    def nbytes(self):
        return sum(t.numel() * t.element_size() for c in self.layers for t in vars(c).values() if torch.is_tensor(t))


LOGP_FLOOR = -1e30  # log 0, finite: exp() of it is 0, and 0 * it is 0 in entropies and KLs


def logprobs_from_logits(logits, temperature=1.0):
    """log softmax(z / T) over the ids a sequence may hold (notes 10.5, temperature sampling): the vocabulary's
    padding ids are dropped, so the result is (..., N_TOKENS), and PAD gets probability 0 (log-prob LOGP_FLOOR).
    Sampling and sequence log-probs both use this one function, so they score exactly the distribution that is
    sampled. Off T = 1 the max is subtracted first: z / T cannot overflow, and a tiny T is greedy."""
    check(temperature > 0, f"temperature must be > 0 to give log-probs (0 is greedy decoding), got {temperature}")
    z = logits[..., :N_TOKENS].float().clone()
    # generate() fills finished rows with PAD and drops it, so a drawn PAD would condition what follows yet be
    # missing from the response; BOS and SEP are kept in a response when drawn, so they are scored as sampled
    z[..., PAD] = float("-inf")
    if temperature != 1:
        z = (z - z.amax(-1, keepdim=True)) / temperature
    return F.log_softmax(z, dim=-1).clamp(min=LOGP_FLOOR)


def check_sampling(temperature=1.0, top_k=0, top_p=1.0):
    check(isinstance(temperature, (int, float)) and 0 <= temperature < math.inf, f"temperature must be a number "
          f">= 0 (0 = greedy), got {temperature!r}")
    check(isinstance(top_k, int) and not isinstance(top_k, bool) and top_k >= 0, f"top_k must be an integer >= 0 "
          f"(0 = off), got {top_k!r}")
    check(isinstance(top_p, (int, float)) and 0 < top_p <= 1, f"top_p must be in (0, 1] (1 = off), got {top_p!r}")


def sample_next(logits, temperature=1.0, top_k=0, top_p=1.0, generator=None):
    """One token per row from logits (B, V): greedy if temperature == 0, else temperature, top-k and
    top-p (nucleus, Holtzman et al. 2019: the smallest set of most probable tokens whose mass reaches p)."""
    if temperature == 0:
        return logprobs_from_logits(logits).argmax(-1)
    logp = logprobs_from_logits(logits, temperature)                  # (B, V)
    if top_k:
        kth = logp.topk(min(top_k, logp.size(-1)), dim=-1).values[:, -1:]
        logp = logp.masked_fill(logp < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logp, order = logp.sort(dim=-1, descending=True)
        mass_before = sorted_logp.softmax(-1).cumsum(-1) - sorted_logp.softmax(-1)
        drop = mass_before >= top_p                                    # already reached p without it
        logp = logp.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(logp.softmax(-1), 1, generator=generator).squeeze(-1)


def left_pad(sequences, pad=PAD, device="cpu"):
    """Token lists of different lengths -> ids (B, T) padded on the left, attn_mask (B, T)."""
    T = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), T), pad, dtype=torch.long)
    mask = torch.zeros(len(sequences), T, dtype=torch.long)
    for i, s in enumerate(sequences):
        if s:
            ids[i, T - len(s):] = torch.as_tensor(s)
            mask[i, T - len(s):] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def generate(model, prompts, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, eos=EOS, generator=None):
    """Continue each prompt (a list of token-id lists, any lengths) for up to max_new_tokens.
    Prefill all prompts in one forward (left padded), then decode one token per step through the KV
    cache; a sequence stops at its first EOS. Returns the new tokens of each prompt (EOS included)."""
    check(prompts and all(len(p) for p in prompts), "every prompt needs at least one token (start it with BOS)")
    check(isinstance(max_new_tokens, int) and max_new_tokens >= 0, f"max_new_tokens must be an integer >= 0, "
          f"got {max_new_tokens}")
    check(all(0 <= t < N_TOKENS for p in prompts for t in p), f"prompt token ids must be in 0..{N_TOKENS - 1}")
    check_sampling(temperature, top_k, top_p)
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > model.cfg.block_size:
        raise UserError(f"a prompt of {longest} tokens plus max_new_tokens={max_new_tokens} exceeds the "
                        f"context block_size={model.cfg.block_size}: shorten the prompt or generate less")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    ids, mask = left_pad(prompts, device=device)                                   # (B, T)
    B = ids.shape[0]
    out = torch.full((B, max_new_tokens), PAD, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    cache = KVCache(model, B, longest + max_new_tokens, device, autocast_dtype(device))
    for t in range(max_new_tokens):
        with autocast(device):  # the prefill is the whole prompt, then each step feeds the last new token
            logits = model(ids if t == 0 else out[:, t - 1:t], attn_mask=mask if t == 0 else None, cache=cache,
                           last_only=True)
        nxt = sample_next(logits[:, -1], temperature, top_k, top_p, generator)
        out[:, t] = torch.where(done, PAD, nxt)
        done |= nxt == eos
        if bool(done.all()):
            break
    model.train(was_training)
    result = []
    for row in out.tolist():
        new = [t for t in row if t != PAD]
        result.append(new[:new.index(eos) + 1] if eos in new else new)
    return result


def sequence_logprobs(model, idx, target_mask, attn_mask=None, temperature=1.0):
    """Per-token log p(x_t | x_<t) at the positions where target_mask is 1, and their sum.

    idx, target_mask, attn_mask: (B, T). Logits at position t-1 predict token t (the shift of
    notes 10.1), so position 0 is never a target. Returns (per_token (B, T), zero where not a
    target; total (B,)). SFT, DPO, PPO and GPRO all score responses with this function."""
    tok, _ = shifted_logprobs(model(idx, attn_mask=attn_mask), idx, target_mask, temperature)
    return tok, tok.sum(-1)


def shifted_logprobs(logits, idx, target_mask, temperature=1.0):
    """From logits (B, T, V): the per-token log p(x_t | x_<t) (B, T), zero where target_mask is 0, and
    the whole distribution each position is drawn from, log pi(. | x_<t) (B, T, N_TOKENS), row 0 zeros
    (nothing predicts position 0). PPO takes its entropy and exact per-token KL from the latter."""
    logp = logprobs_from_logits(logits[:, :-1], temperature)                       # (B, T-1, N)
    logp = torch.cat([torch.zeros_like(logp[:, :1]), logp], 1)                     # (B, T, N), aligned with idx
    return logp.gather(-1, idx[..., None]).squeeze(-1).masked_fill(target_mask == 0, 0.0), logp


# ----------------------------------------------------------------------------------------------
# 5. The switches, each chosen once in Block / GPT.__init__ (the prefix-LM mask in GPT.hidden_states)

class PostNormBlock(Block):
    """Post-norm: norm(x + f(x)), as in the original transformer (Vaswani et al. 2017; notes 4.7)."""

    def forward(self, x, rope, mask, cache):
        x = self.norm1(x + self.attn(x, rope, mask, cache))
        return self.norm2(x + self.ffn(x))


class ParallelBlock(Block):
    """x + (attn(norm(x)) + ffn(norm(x))) / sqrt(2) with one norm (notes 8.9; GPT-J, PaLM): the 1/sqrt(2)
    keeps the variance of the sum of the two branches that of one."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.norm2 = None

    def forward(self, x, rope, mask, cache):
        h = self.norm1(x)
        return x + (self.attn(h, rope, mask, cache) + self.ffn(h)) / math.sqrt(2)


def phi(x):
    """Linear attention's feature map ELU(x) + 1 > 0 (notes 4.10), in fp32."""
    return F.elu(x.float()) + 1


def linear_attention(q, k, v, mask=None, causal=True, sums=None, eps=1e-6):
    """Linear attention (notes 4.10; Katharopoulos et al. 2020), the parallel (masked) form over these T tokens:
        attn_i = sum_j a_ij v_j / (sum_j a_ij + eps),  a_ij = phi(q_i)^T phi(k_j), over the keys j that i may see.
    sums = (S_V, S_K), the running sums S_V = sum_j v_j phi(k_j)^T (B, n_kv_head, hd, hd) and
    S_K = sum_j phi(k_j) (B, n_kv_head, 1, hd) over earlier tokens (a LinearCache), which every query sees:
        attn_i = (S_V phi(q_i) + sum_j a_ij v_j) / (S_K phi(q_i) + sum_j a_ij + eps),  the recurrent form.
    q: (B, n_head, T, hd); k, v: (B, n_kv_head, T, hd); mask: bool (B, 1, T, Tk) whose last T columns are
    these keys. Returns (B, n_head, T, hd). Costs O(T^2) like softmax attention; decoding with sums is O(1)."""
    H, T = q.shape[1], q.shape[2]
    g = torch.arange(H, device=q.device) // (H // k.shape[1])       # key/value head of query head h (notes 4.4)
    fq, fk, v = phi(q), phi(k)[:, g], v.float()[:, g]                # (B, H, T, hd)
    a = fq @ fk.transpose(-2, -1)                                    # (B, H, T, T)
    if causal:
        a = a * causal_mask(T, T, q.device)
    if mask is not None:
        a = a * mask[..., -T:]
    num, den = a @ v, a.sum(-1, keepdim=True)                        # (B, H, T, hd), (B, H, T, 1)
    if sums is not None:
        s_v, s_k = sums[0][:, g], sums[1][:, g]                      # (B, H, hd, hd), (B, H, 1, hd)
        num = num + fq @ s_v.transpose(-2, -1)                       # S_V phi(q_i), every i
        den = den + fq @ s_k.transpose(-2, -1)                       # S_K phi(q_i)
    return (num / (den + eps)).type_as(q)


class LinearAttention(Attention):
    """Causal linear attention (notes 4.10) with the projections of Attention; its cache holds the running
    sums S_V, S_K instead of the keys and values."""

    def forward(self, x, rope, mask, cache):
        q, k, v = self.project(x, rope)
        y = linear_attention(q, k, v, mask, self.causal, None if cache is None else (cache.s_v, cache.s_k))
        if cache is not None:
            cache.update(k, v)
        return self.output(y)

    def new_cache(self, kv, batch_size, max_len, device, dtype):
        return LinearCache(kv, batch_size, self.n_kv_head, self.head_dim, device)


class LinearCache:
    """Linear attention's cache of one layer (notes 4.10): instead of the keys and values, the running sums
    S_V = sum_j v_j phi(k_j)^T (B, n_kv_head, hd, hd) and S_K = sum_j phi(k_j) (B, n_kv_head, 1, hd) over the
    real tokens so far, in fp32: constant memory and O(1) work per new token, the point of linear attention.
    Decoding with them computes the same sums as the full forward (the recurrent form of linear_attention)."""

    def __init__(self, kv, batch_size, n_kv_head, head_dim, device):
        self.kv = kv
        self.s_v = torch.zeros(batch_size, n_kv_head, head_dim, head_dim, device=device)
        self.s_k = torch.zeros(batch_size, n_kv_head, 1, head_dim, device=device)

    def update(self, k, v):
        """Add this call's tokens, padding excluded: S_V += sum_j v_j phi(k_j)^T, S_K += sum_j phi(k_j)."""
        start = self.kv.length
        fk = phi(k) * self.kv.key_valid[:, None, start:start + k.shape[2], None]     # (B, n_kv_head, T, hd)
        self.s_v += v.float().transpose(-2, -1) @ fk
        self.s_k += fk.sum(2, keepdim=True)


class MoE(nn.Module):
    """Mixture-of-experts FFN (notes 8.8; Shazeer et al. 2017, Switch Transformer, Fedus et al. 2021): a
    router sends each token to top_k of n_expert FeedForwards. Its load-balancing loss of the last forward
    is `aux_loss`; the stages add lambda * aux_loss with gpt.aux_loss(model)."""

    def __init__(self, cfg):
        super().__init__()
        self.router = nn.Linear(cfg.n_embd, cfg.n_expert, bias=cfg.bias)              # W_r, b_r
        self.experts = nn.ModuleList(FeedForward(cfg) for _ in range(cfg.n_expert))
        self.top_k, self.alpha, self.aux_coef = cfg.expert_top_k, cfg.expert_capacity, cfg.moe_aux_coef

    def forward(self, x):
        B, T, C = x.shape
        E, N = len(self.experts), B * T
        x = x.reshape(N, C)
        probs = F.softmax(self.router(x).float(), dim=-1)             # P = softmax(R): (N, E), steps (i)-(ii)
        top_p, top_e = probs.topk(self.top_k, dim=-1)                 # the top-k experts T_k: (N, k), (iii)
        gate = top_p / top_p.sum(-1, keepdim=True)                    # renormalised P~ on them
        # Capacity C_e = floor(alpha B L / E), in training only: at inference every token reaches its
        # experts, so its output does not depend on the rest of the batch or on how it is fed (KV cache).
        cap = math.floor(self.alpha * N / E) if self.training and self.alpha else N
        out, kept = torch.zeros_like(x), 0
        for e, expert in enumerate(self.experts):
            tok, slot = (top_e == e).nonzero(as_tuple=True)           # dispatch: X_e, in token order (iv)
            tok, slot = tok[:cap], slot[:cap]                         # tokens past C_e are dropped: zero output
            y = gate[tok, slot, None] * expert(x[tok])                # diag(g_e) FFN_e(X_e), (v)-(vi)
            out.index_add_(0, tok, y.to(out.dtype))                   # combine: back to token order
            kept += len(tok)
        f = F.one_hot(top_e, E).sum(1).float().mean(0)                # f_e = N_e / BL (sums to k)
        self.aux_loss = E * (f * probs.mean(0)).sum()                 # L_aux = E sum_e f_e m_e (Switch)
        self.load, self.dropped = f, 1 - kept / (N * self.top_k)
        return out.view(B, T, C)


def aux_loss(model):
    """lambda sum_layers L_aux over the MoE layers anywhere in `model` (their last forward), 0 when dense: every
    stage's loss adds it (L_total = L_task + lambda sum L_aux, notes 8.8), so any MoE model stays balanced."""
    return sum((m.aux_coef * m.aux_loss for m in model.modules() if isinstance(m, MoE)), 0.0)


def moe_stats(model):
    """The routing of the last forward of a MoE model ({} for a dense one), as floats (notes 8.8): moe_aux,
    L_aux per layer (= k at a uniform router); expert_load, the busiest expert's share f_e of the tokens
    (mean over layers; balanced = k / n_expert); in training expert_dropped, the share of the token-expert
    assignments dropped by the capacity."""
    moe = [m for m in model.modules() if isinstance(m, MoE)]
    if not moe:
        return {}
    stats = {"moe_aux": sum(m.aux_loss.item() for m in moe) / len(moe),
             "expert_load": sum(m.load.max().item() for m in moe) / len(moe)}
    if model.training:
        stats["expert_dropped"] = sum(m.dropped for m in moe) / len(moe)
    return stats


def prefix_lm_mask(idx, start=0):
    """(B, 1, T, start + T) bool, True = may attend, for the prefix LM (notes 8.4; as in T5's prefix LM,
    Raffel et al. 2020): the prefix is every position up to and including the row's first SEP (none: no
    prefix). Prefix queries see the whole prefix and nothing after it, the others see the prefix and their
    own past: query i sees key j iff j <= max(i, m), m the SEP's position. With a KV cache the prefix must
    lie in the first call (the prefill, start = 0); later calls are causal (a SEP generated while decoding
    does not open a prefix)."""
    B, T = idx.shape
    sep = (idx == SEP) & (start == 0)
    m = torch.where(sep.any(1), sep.long().argmax(1), -1)                          # (B,) first SEP or -1
    i = torch.arange(start, start + T, device=idx.device)                          # query positions
    j = torch.arange(start + T, device=idx.device)                                 # key positions
    return (j <= torch.maximum(i[:, None], m[:, None, None]))[:, None]             # (B, 1, T, Tk)


# ----------------------------------------------------------------------------------------------
# 6. A GPT from a checkpoint of any stage; its FLOPs per token

def build_model(config, state, path):
    """A GPT of this config holding these weights; a mismatch is a clear error, not a traceback."""
    check(config is not None, f"checkpoint {path} holds no model config; delete it and train again")
    try:
        model = GPT(GPTConfig(**config))
        model.load_state_dict(state)
    except (TypeError, RuntimeError, UserError) as e:
        raise UserError(f"checkpoint {path} does not match this version of gpt.py: "
                        f"{str(e).splitlines()[0]}; delete it and train again") from None
    return model


def model_from_checkpoint(ckpt, path):
    """The GPT a loaded checkpoint dict holds (train.load_stage's `build` for every stage with a GPT)."""
    return build_model(ckpt.get("config"), ckpt["model"], path)


def load_model(path, device="cpu"):
    """A GPT from any stage's checkpoint: returns (model, checkpoint dict)."""
    ckpt = load_checkpoint(path)
    return model_from_checkpoint(ckpt, path).to(device), ckpt


def flops_per_token(model, T):
    """6 N (forward + backward through every weight; the tied embedding is the output head's matmul)
    plus 12 n_layer n_embd T for attention's scores and mixing (PaLM's estimate, Chowdhery et al. 2022).
    With MoE, N counts the top_k experts a token runs through, not all n_expert. Linear attention's
    parallel form costs the same."""
    cfg = model.cfg
    n = sum(p.numel() for p in model.parameters())
    if cfg.n_expert:
        n -= cfg.n_layer * (cfg.n_expert - cfg.expert_top_k) * sum(
            p.numel() for p in model.blocks[0].ffn.experts[0].parameters())
    return 6 * n + 12 * cfg.n_layer * cfg.n_embd * T


# ----------------------------------------------------------------------------------------------
# 7. Export to the Hugging Face Llama format: the default model is Llama's architecture (Touvron et al. 2023)

# Each switch Llama has no place for: its name -> (Llama's value, what another value would need)
LLAMA_HAS = {"n_expert": (0, "mixture of experts"), "attention": ("softmax", "linear attention"),
             "parallel_block": (False, "parallel blocks"), "norm_placement": ("pre", "post-norm blocks"),
             "pos_emb": ("rope", "learned positions"), "prefix_lm": (False, "a prefix-LM mask"),
             "logit_scale": (False, "scaled logits"), "norm": ("rmsnorm", "LayerNorm"), "bias": (False, "biases"),
             "ffn": ("swiglu", "an FFN without a gate")}
# Our parameter names -> Llama's. apply_rope rotates the pairs (x_i, x_{i+d/2}), as Llama's rotate_half does,
# so q_proj and k_proj need no permutation (the export test compares the logits).
HF_NAMES = (("wte.", "model.embed_tokens."), ("blocks.", "model.layers."), ("norm1", "input_layernorm"),
            ("norm2", "post_attention_layernorm"), ("attn.", "self_attn."), ("ffn.gate", "mlp.gate_proj"),
            ("ffn.up", "mlp.up_proj"), ("ffn.down", "mlp.down_proj"), ("norm_f", "model.norm"))


def export_hf(model, directory):
    """Write a GPT as a Hugging Face LlamaForCausalLM checkpoint: config.json, model.safetensors (fp32) and the
    byte tokenizer (tokenizer.json, tokenizer_config.json). The vocabulary is the N_TOKENS real ids, without the
    padding rows, so it samples what generate() samples. A switch Llama has no place for is a UserError naming it."""
    cfg = model.cfg
    for name, (llama, what) in LLAMA_HAS.items():
        check(getattr(cfg, name) == llama, f"{name}={getattr(cfg, name)!r} ({what}) has no equivalent in the Llama "
              f"format: only models with {name}={llama!r} export")
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise UserError("the export writes safetensors: pip install safetensors") from None
    tensors = {}
    for name, w in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue  # the embedding, which Llama's tie_word_embeddings shares
        for ours, theirs in HF_NAMES:
            name = name.replace(ours, theirs)
        tensors[name] = (w[:N_TOKENS] if name.endswith(("embed_tokens.weight", "lm_head.weight")) else w).float()
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": N_TOKENS,
              "hidden_size": cfg.n_embd, "intermediate_size": cfg.ffn_width, "num_hidden_layers": cfg.n_layer,
              "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.n_kv_head, "head_dim": cfg.head_dim,
              "hidden_act": "silu", "rms_norm_eps": model.norm_f.eps, "max_position_embeddings": cfg.block_size,
              "rope_theta": cfg.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
              "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": False, "mlp_bias": False,
              "bos_token_id": BOS, "eos_token_id": EOS, "pad_token_id": PAD, "torch_dtype": "float32"}
    # The tokenizer: no merges, every character falls back to its UTF-8 bytes <0x00>..<0xFF> = ids 0..255; the
    # special tokens' names in text ("<bos>", ...) become their ids, as a chat template written as text needs.
    specials = [{"id": i, "content": s, "special": True, "single_word": False, "lstrip": False, "rstrip": False,
                 "normalized": False} for i, s in SPECIAL_NAMES.items()]
    tokenizer = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": specials, "normalizer": None,
                 "pre_tokenizer": None, "post_processor": None,
                 "decoder": {"type": "Sequence", "decoders": [{"type": "ByteFallback"}, {"type": "Fuse"}]},
                 "model": {"type": "BPE", "vocab": {f"<0x{b:02X}>": b for b in range(256)}, "merges": [],
                           "byte_fallback": True, "dropout": None, "unk_token": None, "fuse_unk": False}}
    tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg.block_size,
                        **{f"{s[1:-1]}_token": s for s in SPECIAL_NAMES.values()}}
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    for name, content in (("config", config), ("tokenizer", tokenizer), ("tokenizer_config", tokenizer_config)):
        with open(os.path.join(directory, f"{name}.json"), "w") as f:
            json.dump(content, f, indent=1)


# ----------------------------------------------------------------------------------------------
# 8. Pretraining on a built-in corpus: the Python standard library's own source files

@dataclass(frozen=True)
class DataConfig:
    data: str = arg("", "a text file to train on; empty = the Python standard library's .py files")
    val_fraction: float = arg(0.05, "share of whole files (or of the text, for --data) held out")
    sample_tokens: int = arg(200, "tokens to generate for the sample at the end")
    bench: bool = arg(False, "instead of training, benchmark KV-cache decoding against recomputation")

    def __post_init__(self):
        check(0 < self.val_fraction < 1, f"val_fraction must be in (0, 1), got {self.val_fraction}")
        check(self.sample_tokens >= 0, f"sample_tokens must be >= 0, got {self.sample_tokens}")
        check(not self.data or os.path.isfile(self.data), f"--data {self.data}: "
              f"{'is a directory, give a text file' if os.path.isdir(self.data) else 'no such file'}")


def stdlib_files():
    """The .py files of the interpreter running this script (no download; site-packages excluded)."""
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for d, subdirs, names in os.walk(root):
        subdirs[:] = sorted(s for s in subdirs if s not in ("site-packages", "dist-packages", "__pycache__"))
        files += [os.path.join(d, n) for n in sorted(names) if n.endswith(".py")]
    return root, files


def load_corpus(cfg: DataConfig):
    """Returns (train, val, source): arrays of token ids and a description of where they came from. Each
    file starts with BOS; whole files are held out, chosen by a hash of the path (so the split does not
    depend on the file order); a --data file is split at 1 - val_fraction of its bytes."""
    def tokens_of(texts):
        parts = [np.array([BOS] + list(t), dtype=np.uint16) for t in texts]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint16)

    if cfg.data:
        raw = open(cfg.data, "rb").read()
        cut = int(len(raw) * (1 - cfg.val_fraction))
        return tokens_of([raw[:cut]]), tokens_of([raw[cut:]]), cfg.data
    root, files = stdlib_files()
    held = lambda p: zlib.crc32(os.path.relpath(p, root).encode()) % 10_000 < cfg.val_fraction * 10_000
    read = lambda ps: [open(p, "rb").read() for p in ps]
    return (tokens_of(read([p for p in files if not held(p)])), tokens_of(read([p for p in files if held(p)])),
            f"{len(files)} .py files under {root}")


def corpus_batches(data, batch_size, block_size, seed):
    """get_batch(i): batch_size random windows of block_size + 1 tokens from step i's random stream."""
    def get_batch(i):
        starts = torch.randint(len(data) - block_size - 1, (batch_size,), generator=step_generator(seed, i)).numpy()
        w = torch.from_numpy(np.stack([data[s:s + block_size + 1] for s in starts]).astype(np.int64))
        return w[:, :-1], w[:, 1:]                                               # inputs, targets (B, T)
    return get_batch


def pretrain(model_cfg, train_cfg, data_cfg):
    """Train a GPT on the corpus into out_dir/gpt.pt. Returns (model, metrics)."""
    ckpt = os.path.join(train_cfg.out_dir, "gpt.pt")
    meta = {"stage": "gpt", "config": dataclasses.asdict(model_cfg),
            "data": {"data": data_cfg.data, "val_fraction": data_cfg.val_fraction}}
    claim_checkpoint(ckpt, train_cfg, meta)
    train_data, val_data, source = load_corpus(data_cfg)
    need = model_cfg.block_size + 2
    check(len(train_data) >= need and len(val_data) >= need, f"the data ({len(train_data)} training and "
          f"{len(val_data)} validation tokens from {source}) is too small for block_size={model_cfg.block_size}: "
          "use a larger --data file, a larger --val_fraction or a smaller --block_size")
    if rank() == 0:
        print(f"corpus: {source}: {len(train_data):,} training and {len(val_data):,} validation tokens")
    torch.manual_seed(train_cfg.seed)
    model = GPT(model_cfg)
    get_train = corpus_batches(train_data, train_cfg.batch_size, model_cfg.block_size, train_cfg.seed)
    get_val = corpus_batches(val_data, train_cfg.batch_size, model_cfg.block_size, seed=0)

    def loss_fn(net, batch):
        x, y = (t.to(next(model.parameters()).device) for t in batch)
        return lm_loss(net(x), y) + aux_loss(model), {"tokens": x.numel(), **moe_stats(model)}

    def evaluate(m):
        losses, routing = [], {}
        for i in range(train_cfg.eval_batches):
            x, y = (t.to(next(m.parameters()).device) for t in get_val(i))
            losses.append(lm_loss(m(x), y).item())
            for k, v in moe_stats(m).items():
                routing[k] = routing.get(k, 0.0) + v / train_cfg.eval_batches
        val_loss = sum(losses) / len(losses)
        return {"val_loss": val_loss, "val_bpb": val_loss / math.log(2), **routing}  # one token = one byte

    result = train(model, train_cfg, get_train, loss_fn, evaluate, ckpt, meta, desc="pretrain",
                   flops_per_unit=flops_per_token(model, model_cfg.block_size))
    return model, {**result, "params": model.num_params()}


def pretrain_and_report(model_cfg, train_cfg, data_cfg):
    """`python gpt.py`: pretrain, print the table and a sample, write out_dir/gpt_metrics.json (also what a
    later stage runs when out/gpt.pt is missing)."""
    model, m = pretrain(model_cfg, train_cfg, data_cfg)
    if rank() != 0:
        return model, m
    rows = [("train loss", m["train_loss"]), ("val loss", m["val_loss"]), ("val bits/byte", m["val_bpb"]),
            ("tokens/s (steady state)", round(m["tokens_per_sec"])), ("parameters", f"{m['params']:,}"),
            ("train seconds", m["train_seconds"]), ("wall seconds", m["wall_seconds"])]
    if "mfu" in m:
        rows.append(("MFU", f"{m['mfu']:.1%} of {m['device_name']}"))
    if model_cfg.n_expert:
        rows += [("busiest expert's share", f"{m['expert_load']:.3f} (balanced: "
                  f"{model_cfg.expert_top_k / model_cfg.n_expert:.3f})"), ("load-balancing loss", m["moe_aux"])]
    print_table("pretraining", rows)
    torch.manual_seed(train_cfg.seed)
    prompt = encode("def ", bos=True)
    n = min(data_cfg.sample_tokens, model_cfg.block_size - len(prompt))
    print("\nsample:\n" + decode(prompt + generate(model, [prompt], n, temperature=0.8, top_k=50)[0]))
    write_metrics("gpt", m, train_cfg.out_dir)
    return model, m


@torch.no_grad()
def bench_decoding(model_cfg, device, contexts=(128, 256, 512, 1024), steps=16):
    """Per-token decode time with the KV cache vs recomputing the full forward, at growing context.
    Each step feeds one token after `context` tokens; best of three runs of `steps` steps."""
    model = GPT(dataclasses.replace(model_cfg, block_size=max(contexts) + steps)).to(device).eval()
    ids = torch.randint(0, 256, (1, model.cfg.block_size), device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else lambda: None

    def per_token(ctx, use_cache):
        best = float("inf")
        for _ in range(3):
            cache = KVCache(model, 1, ctx + steps, device, torch.float32) if use_cache else None
            if use_cache:
                model(ids[:, :ctx], cache=cache)  # prefill, not timed
            sync()
            t = time.perf_counter()
            for i in range(ctx, ctx + steps):
                model(ids[:, i:i + 1], cache=cache, last_only=True) if use_cache else model(ids[:, :i + 1],
                                                                                            last_only=True)
            sync()
            best = min(best, (time.perf_counter() - t) / steps)
        return best

    print(f"\nKV-cache decoding, {model.num_params():,} parameters, batch 1, device {device}")
    print(f"{'context':>8} {'cache ms/token':>15} {'recompute ms/token':>19} {'speedup':>8}")
    for ctx in contexts:
        cached, full = per_token(ctx, True), per_token(ctx, False)
        print(f"{ctx:>8} {cached * 1e3:>15.2f} {full * 1e3:>19.2f} {full / cached:>7.1f}x")


def pretrain_defaults():
    """The configs of `python gpt.py` (also what a later stage runs when out/gpt.pt is missing)."""
    return GPTConfig(), TrainConfig(), DataConfig()


def main(argv=None):
    model_cfg, train_cfg, data_cfg = parse_args(list(pretrain_defaults()), argv, description=__doc__.split("\n")[1])
    if data_cfg.bench:
        return bench_decoding(model_cfg, pick_device(train_cfg.device))
    pretrain_and_report(model_cfg, train_cfg, data_cfg)


if __name__ == "__main__":
    run_main(main)
