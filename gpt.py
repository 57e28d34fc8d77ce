"""
gpt.py: a decoder-only transformer language model and the machinery every other script shares.

Read top to bottom:
  1. byte tokenizer                      (ids 0..255 are bytes, then BOS, EOS, PAD, SEP)
  2. GPTConfig and the model             (MHA/GQA/MQA, RoPE, RMSNorm, SwiGLU; notes 4.1-4.4, 4.7, 5.2, 8.6-8.7;
                                          switches: logit scaling 3.1, linear attention 4.10, prefix LM 8.4,
                                          mixture of experts 8.8, parallel attention + FFN 8.9)
  3. KV cache, sampling, generate        (notes 4.3, 10.5 "Sampling")
  4. sequence log-probabilities          (log p(x_t | x_<t), notes 10.1; used by SFT, DPO, PPO, GPRO)
  5. command-line configs, metrics, checkpoints
  6. the training loop                   (AdamW, warmup + cosine, clipping, accumulation, bf16, DDP)
  7. pretraining on the Python standard library's source: `python gpt.py`

Run `python gpt.py --help` for the flags; `torchrun --nproc_per_node=N gpt.py` trains with DDP.
"""
import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import sysconfig
import time
import zlib
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from kernels import attention, causal_mask


class UserError(ValueError):
    """Bad input from the user (config, data, checkpoint): the scripts print the message, not a traceback."""


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
# 2. The model

def arg(default, help):
    """A dataclass field that is also a command-line flag with this help text."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: default, metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
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
        choices = {"pos_emb": ("rope", "learned"), "norm": ("rmsnorm", "layernorm"),
                   "norm_placement": ("pre", "post"), "ffn": ("swiglu", "gelu", "relu"),
                   "attention": ("softmax", "linear")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise UserError(f"{name}={getattr(self, name)!r} is not one of {allowed}")
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.vocab_size < N_TOKENS:
            raise UserError(f"vocab_size={self.vocab_size} is smaller than the {N_TOKENS} token ids")
        if self.n_embd % self.n_head:
            raise UserError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if self.n_head % self.n_kv_head:
            raise UserError(f"n_head={self.n_head} must be divisible by n_kv_head={self.n_kv_head} "
                            "(each key/value head serves a whole group of query heads)")
        if self.pos_emb == "rope" and self.head_dim % 2:
            raise UserError(f"rotary embeddings need an even head_dim, got n_embd/n_head = {self.head_dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.ffn_hidden < 0:
            raise UserError(f"ffn_hidden must be >= 0, got {self.ffn_hidden}")
        if self.parallel_block and self.norm_placement == "post":
            raise UserError("parallel_block normalises the block's input once: use it with norm_placement=pre")
        if self.n_expert < 0 or (self.n_expert and not 1 <= self.expert_top_k <= self.n_expert):
            raise UserError(f"need n_expert >= 0 and 1 <= expert_top_k <= n_expert, got n_expert={self.n_expert}, "
                            f"expert_top_k={self.expert_top_k}")
        if self.expert_capacity < 0 or self.moe_aux_coef < 0:
            raise UserError(f"expert_capacity and moe_aux_coef must be >= 0, got {self.expert_capacity} "
                            f"and {self.moe_aux_coef}")

    @property
    def head_dim(self):
        return self.n_embd // self.n_head

    @property
    def hidden(self):
        if self.ffn_hidden:
            return self.ffn_hidden
        if self.ffn == "swiglu":  # 2/3 of 4*d so that three matrices cost what two did
            return (8 * self.n_embd // 3 + 31) // 32 * 32
        return 4 * self.n_embd


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * gamma (notes 5.2): no mean subtraction, no shift."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()  # the reduction in fp32 also under bf16 autocast (notes 7)
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def make_norm(cfg):
    return RMSNorm(cfg.n_embd) if cfg.norm == "rmsnorm" else nn.LayerNorm(cfg.n_embd, bias=cfg.bias)


def rope_tables(head_dim, max_len, theta):
    """cos and sin of position * theta^(-2i/d) for i < d/2, each (max_len, head_dim/2)."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.arange(max_len, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return angles.cos().float(), angles.sin().float()


def apply_rope(x, cos, sin):
    """Rotate each pair (x_i, x_{i+d/2}) by the angle of its position. x: (B, T, H, hd); cos, sin: (B, T, 1, hd/2)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


def phi(x):
    """Linear attention's feature map ELU(x) + 1 > 0 (notes 4.10), in fp32."""
    return F.elu(x.float()) + 1


def linear_attention(q, k, v, mask=None, causal=True, sums=None, eps=1e-6):
    """Linear attention (notes 4.10), the parallel (masked) form over these T tokens:
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


class Attention(nn.Module):
    """Causal self-attention with n_head query heads and n_kv_head key/value heads (notes 4.1-4.4)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        hd = cfg.head_dim
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_head * hd, bias=cfg.bias)     # W_q (eq. 5)
        self.k_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * hd, bias=cfg.bias)  # W_k: only n_kv_head heads
        self.v_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * hd, bias=cfg.bias)  # W_v
        self.o_proj = nn.Linear(cfg.n_head * hd, cfg.n_embd, bias=cfg.bias)     # W_O (eq. 8)
        self.o_proj.residual = True
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x, rope, mask, cache):
        B, T, _ = x.shape
        cfg = self.cfg
        q = self.q_proj(x).view(B, T, cfg.n_head, cfg.head_dim)     # (B, T, n_head, hd)
        k = self.k_proj(x).view(B, T, cfg.n_kv_head, cfg.head_dim)  # (B, T, n_kv_head, hd)
        v = self.v_proj(x).view(B, T, cfg.n_kv_head, cfg.head_dim)  # (B, T, n_kv_head, hd)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)           # (B, heads, T, hd)
        causal = not cfg.prefix_lm  # a prefix-LM mask carries the causal part itself (notes 8.4)
        if cfg.attention == "linear":  # the cache holds the running sums S_V, S_K, not K and V
            y = linear_attention(q, k, v, mask, causal, None if cache is None else (cache.s_v, cache.s_k))
            if cache is not None:
                cache.update(k, v)
        else:
            if cache is not None:  # append this step's keys/values; attend over everything cached so far
                k, v = cache.update(k, v)                                           # (B, n_kv_head, Tk, hd)
            y = attention(q, k, v, causal=causal, mask=mask,
                          dropout_p=cfg.dropout if self.training else 0.0)          # (B, n_head, T, hd)
        y = y.transpose(1, 2).reshape(B, T, cfg.n_embd)                             # concat heads
        return self.resid_drop(self.o_proj(y))


class FeedForward(nn.Module):
    """FFN(x) = W_2 act(W_1 x) (notes 8.6), or SwiGLU: W_2 (SiLU(W_g x) * W_v x) (notes 8.7)."""

    def __init__(self, cfg):
        super().__init__()
        self.kind = cfg.ffn
        self.up = nn.Linear(cfg.n_embd, cfg.hidden, bias=cfg.bias)  # W_1, or W_v for SwiGLU
        self.gate = nn.Linear(cfg.n_embd, cfg.hidden, bias=cfg.bias) if cfg.ffn == "swiglu" else None  # W_g
        self.down = nn.Linear(cfg.hidden, cfg.n_embd, bias=cfg.bias)  # W_2
        self.down.residual = True
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x):
        if self.kind == "swiglu":
            h = F.silu(self.gate(x)) * self.up(x)
        elif self.kind == "gelu":
            h = F.gelu(self.up(x))
        else:
            h = F.relu(self.up(x))
        return self.drop(self.down(h))


class MoE(nn.Module):
    """Mixture-of-experts FFN (notes 8.8): a router sends each token to top_k of n_expert FeedForwards."""

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


class Block(nn.Module):
    """Pre-norm: x + f(norm(x)); post-norm: norm(x + f(x)) (notes 4.7); parallel:
    x + (attn(norm(x)) + ffn(norm(x))) / sqrt(2), one norm (notes 8.9, the 1/sqrt(2) keeps the variance
    of the sum of the two branches that of one)."""

    def __init__(self, cfg):
        super().__init__()
        self.pre, self.parallel = cfg.norm_placement == "pre", cfg.parallel_block
        self.norm1, self.attn = make_norm(cfg), Attention(cfg)
        self.norm2 = None if cfg.parallel_block else make_norm(cfg)
        self.ffn = MoE(cfg) if cfg.n_expert else FeedForward(cfg)

    def forward(self, x, rope, mask, cache):
        if self.parallel:
            h = self.norm1(x)
            return x + (self.attn(h, rope, mask, cache) + self.ffn(h)) / math.sqrt(2)
        if self.pre:
            x = x + self.attn(self.norm1(x), rope, mask, cache)
            return x + self.ffn(self.norm2(x))
        x = self.norm1(x + self.attn(x, rope, mask, cache))
        return self.norm2(x + self.ffn(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd) if cfg.pos_emb == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm_f = make_norm(cfg) if cfg.norm_placement == "pre" else nn.Identity()
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        if cfg.pos_emb == "rope":
            cos, sin = rope_tables(cfg.head_dim, cfg.block_size, cfg.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)  # (block_size, hd/2)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)

    def _init_weights(self, m):
        # N(0, 0.02); projections that write into the residual stream get 0.02/sqrt(2*n_layer) so
        # the stream's variance does not grow with depth (GPT-2's scaled init).
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
        x = self.hidden(idx, attn_mask, cache)                                       # (B, T, C)
        logits = self.lm_head(x[:, -1:] if last_only else x)                         # (B, T, vocab)
        # notes 3.1: with RMS(x) = 1 and weights of variance s^2, Var(logit) ~ n_embd s^2; / sqrt(n_embd): s^2
        return logits / math.sqrt(self.cfg.n_embd) if self.cfg.logit_scale else logits

    def hidden(self, idx, attn_mask=None, cache=None):
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
        mask = None
        if cache is not None:
            mask = cache.advance(T, attn_mask)  # (B, 1, T, Tk) or None
        elif attn_mask is not None and not bool(attn_mask.all()):
            mask = padding_mask(attn_mask.bool(), T)
        if self.cfg.prefix_lm:
            mask = prefix_lm_mask(idx, start) if mask is None else mask & prefix_lm_mask(idx, start)
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


def prefix_lm_mask(idx, start=0):
    """(B, 1, T, start + T) bool, True = may attend, for the prefix LM (notes 8.4): the prefix is every
    position up to and including the row's first SEP (none: no prefix). Prefix queries see the whole
    prefix and nothing after it, the others see the prefix and their own past: query i sees key j iff
    j <= max(i, m), m the SEP's position. With a KV cache the prefix must lie in the first call (the
    prefill, start = 0); later calls are causal (a SEP generated while decoding does not open a prefix)."""
    B, T = idx.shape
    sep = (idx == SEP) & (start == 0)
    m = torch.where(sep.any(1), sep.long().argmax(1), -1)                          # (B,) first SEP or -1
    i = torch.arange(start, start + T, device=idx.device)                          # query positions
    j = torch.arange(start + T, device=idx.device)                                 # key positions
    return (j <= torch.maximum(i[:, None], m[:, None, None]))[:, None]             # (B, 1, T, Tk)


def lm_loss(logits, targets, ignore_index=-1):
    """Mean cross-entropy of the next-token predictions (notes 10.1, eq. CLM); targets already shifted."""
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                           ignore_index=ignore_index)


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


def add_moe_loss(model, loss, stats):
    """L_total = L_task + lambda sum_layers L_aux (notes 8.8) over the MoE layers anywhere in `model` (their
    last forward), and moe_stats added to stats; unchanged if dense. train() applies it after every
    loss_fn, so every stage (SFT, reward model, PPO's critic, ...) keeps its experts balanced."""
    moe = [m for m in model.modules() if isinstance(m, MoE)]
    if not moe:
        return loss, stats
    return loss + sum(m.aux_coef * m.aux_loss for m in moe), {**stats, **moe_stats(model)}


# ----------------------------------------------------------------------------------------------
# 3. KV cache and generation (notes 4.3)

class LayerCache:
    """Preallocated keys and values of one layer, only the n_kv_head heads: (B, n_kv_head, max_len, hd)."""

    def __init__(self, cache, k, v):
        self.cache, self.k, self.v = cache, k, v

    def update(self, k, v):
        start, T = self.cache.length, k.shape[2]
        self.k[:, :, start:start + T] = k
        self.v[:, :, start:start + T] = v
        return self.k[:, :, :start + T], self.v[:, :, :start + T]  # views, no copy


class LinearCache:
    """Linear attention's cache of one layer (notes 4.10): instead of the keys and values, the running sums
    S_V = sum_j v_j phi(k_j)^T (B, n_kv_head, hd, hd) and S_K = sum_j phi(k_j) (B, n_kv_head, 1, hd) over the
    real tokens so far, in fp32: constant memory and O(1) work per new token, the point of linear attention.
    Decoding with them computes the same sums as the full forward (the recurrent form of linear_attention)."""

    def __init__(self, cache, batch_size, cfg, device):
        self.cache = cache
        self.s_v = torch.zeros(batch_size, cfg.n_kv_head, cfg.head_dim, cfg.head_dim, device=device)
        self.s_k = torch.zeros(batch_size, cfg.n_kv_head, 1, cfg.head_dim, device=device)

    def update(self, k, v):
        """Add this call's tokens, padding excluded: S_V += sum_j v_j phi(k_j)^T, S_K += sum_j phi(k_j)."""
        start = self.cache.length
        fk = phi(k) * self.cache.key_valid[:, None, start:start + k.shape[2], None]    # (B, n_kv_head, T, hd)
        self.s_v += v.float().transpose(-2, -1) @ fk
        self.s_k += fk.sum(2, keepdim=True)


class KVCache:
    """The static cache of all layers, plus which cached positions are real tokens (left padding)."""

    def __init__(self, cfg, batch_size, max_len, device, dtype):
        if max_len > cfg.block_size:
            raise UserError(f"{max_len} tokens do not fit the context block_size={cfg.block_size}")
        shape = (batch_size, cfg.n_kv_head, max_len, cfg.head_dim)
        self.layers = [LinearCache(self, batch_size, cfg, device) if cfg.attention == "linear" else
                       LayerCache(self, torch.zeros(shape, device=device, dtype=dtype),
                                  torch.zeros(shape, device=device, dtype=dtype)) for _ in range(cfg.n_layer)]
        self.length = 0                                                                   # filled positions
        self.key_valid = torch.ones(batch_size, max_len, dtype=torch.bool, device=device)
        self.next_pos = torch.zeros(batch_size, dtype=torch.long, device=device)          # next position id
        self.padded = False

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


def logprobs_from_logits(logits, temperature=1.0):
    """log softmax(z / T) over the real token ids only (notes 10.5, temperature sampling): the
    vocabulary's padding ids are dropped, so the result is (..., N_TOKENS). Sampling and sequence
    log-probs both use this one function, so they score exactly the distribution that is sampled."""
    return F.log_softmax(logits[..., :N_TOKENS].float() / temperature, dim=-1)


def sample_next(logits, temperature=1.0, top_k=0, top_p=1.0, generator=None):
    """One token per row from logits (B, V): greedy if temperature == 0, else temperature, top-k and
    top-p (nucleus: the smallest set of most probable tokens whose mass reaches p) sampling."""
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
    probs = logp.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


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
def generate(model, prompts, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, eos=EOS,
             generator=None, use_cache=True):
    """Continue each prompt (a list of token-id lists, any lengths) for up to max_new_tokens.
    Prefill all prompts in one forward (left padded), then decode one token per step through the KV
    cache; a sequence stops at its first EOS. Returns the new tokens of each prompt (EOS included).
    use_cache=False recomputes the whole sequence every step (what the tests compare the cache with)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise UserError("every prompt needs at least one token (start it with BOS)")
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
    cache = KVCache(model.cfg, B, longest + max_new_tokens, device, autocast_dtype(device)) if use_cache else None
    for t in range(max_new_tokens):
        with autocast(device):
            if cache is not None:
                logits = model(ids if t == 0 else out[:, t - 1:t], attn_mask=mask if t == 0 else None,
                               cache=cache, last_only=True)
            else:
                full = torch.cat([ids, out[:, :t]], 1)
                full_mask = torch.cat([mask, torch.ones_like(out[:, :t])], 1)
                logits = model(full, attn_mask=full_mask, last_only=True)
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


# ----------------------------------------------------------------------------------------------
# 4. Sequence log-probabilities

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
# 5. Command-line configs, devices, metrics, checkpoints

def parse_args(defaults, argv=None, description=None):
    """Expose every field of the given dataclass instances as --flags (the instances give the
    defaults). Returns new instances; a bad value becomes a clear error, not a traceback."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for obj in defaults:
        group = parser.add_argument_group(type(obj).__name__)
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            help_text = f.metadata.get("help", "")
            if isinstance(value, bool):
                group.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=value,
                                   help=help_text)
            else:
                group.add_argument(f"--{f.name}", type=type(value) if value is not None else str,
                                   default=value, help=help_text)
    ns = vars(parser.parse_args(argv))
    try:
        return [dataclasses.replace(obj, **{f.name: ns[f.name] for f in dataclasses.fields(obj)})
                for obj in defaults]
    except UserError as e:
        parser.error(str(e))


def run_main(main):
    """Run a script's main: a UserError becomes 'error: ...' and exit status 2."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def pick_device(name="auto"):
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    return name


def autocast_dtype(device, dtype="auto"):
    """The compute dtype: bf16 on GPUs that support it, fp16 on older GPUs (with a GradScaler),
    fp32 on CPU unless asked for (notes 7: fp32 master weights either way)."""
    device = torch.device(device).type
    if dtype == "auto":
        if device == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def autocast(device, dtype="auto"):
    dt = autocast_dtype(device, dtype)
    if dt == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dt)


def print_table(title, rows):
    """rows: list of (name, value) pairs."""
    width = max(len(k) for k, _ in rows)
    print(f"\n{title}")
    for k, v in rows:
        v = f"{v:.4g}" if isinstance(v, float) else v
        print(f"  {k:<{width}}  {v}")


def write_metrics(stage, metrics, out_dir):
    """One JSON line on stdout and out_dir/<stage>_metrics.json (written atomically)."""
    line = json.dumps({"stage": stage, **metrics})
    print(line)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{stage}_metrics.json")
    with open(path + ".tmp", "w") as f:
        f.write(line + "\n")
    os.replace(path + ".tmp", path)


def save_checkpoint(path, **state):
    """torch.save to a temporary file, then rename: a crash never leaves a half-written checkpoint."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path):
    if not os.path.exists(path):
        raise UserError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"checkpoint {path} is corrupt or not a checkpoint of this project "
                        f"({type(e).__name__}); delete it and train again") from None


def load_model(path, device="cpu"):
    """A GPT from a checkpoint written by train(): returns (model, checkpoint dict)."""
    ckpt = load_checkpoint(path)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise UserError(f"checkpoint {path} holds no model and config; delete it and train again")
    try:
        model = GPT(GPTConfig(**ckpt["config"]))
        model.load_state_dict(ckpt["model"])
    except (TypeError, RuntimeError) as e:
        raise UserError(f"checkpoint {path} does not match this version of gpt.py: "
                        f"{str(e).splitlines()[0]}; delete it and train again") from None
    return model.to(device), ckpt


def load_stage(path, train_stage, device="cpu", load=None):
    """The model of an earlier stage from its checkpoint (read by `load`, default load_model); when the
    checkpoint is missing, first run that stage's own training with its defaults (so any script works
    on a fresh clone)."""
    if not os.path.exists(path):
        print(f"{path} not found: training that stage first, with its defaults")
        train_stage()
    return (load or load_model)(path, device)


# ----------------------------------------------------------------------------------------------
# 6. The training loop, shared by every stage

@dataclass
class TrainConfig:
    max_steps: int = arg(1600, "optimizer steps")
    batch_size: int = arg(16, "sequences per micro-batch (per process)")
    grad_accum: int = arg(1, "micro-batches per optimizer step")
    lr: float = arg(3e-3, "peak learning rate")
    min_lr: float = arg(3e-4, "learning rate at the end of the cosine decay")
    warmup_steps: int = arg(50, "linear warmup steps")
    weight_decay: float = arg(0.1, "AdamW weight decay, on matrices only")
    beta1: float = arg(0.9, "AdamW beta1")
    beta2: float = arg(0.95, "AdamW beta2")
    grad_clip: float = arg(1.0, "clip the gradient norm to this (0 = off)")
    eval_interval: int = arg(400, "validate and checkpoint every this many steps")
    eval_batches: int = arg(64, "batches per validation")
    dtype: str = arg("auto", "auto | float32 | bfloat16 | float16 (auto: bf16 on GPU, fp32 on CPU)")
    device: str = arg("auto", "auto | cpu | cuda")
    compile: str = arg("auto", "torch.compile: auto (on for CUDA) | on | off")
    seed: int = arg(1337, "random seed")
    out_dir: str = arg("out", "where checkpoints and metrics go")
    resume: bool = arg(False, "continue from the stage's checkpoint in out_dir")

    def __post_init__(self):
        for name in ("max_steps", "batch_size", "grad_accum", "eval_interval", "eval_batches"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise UserError(f"need 0 <= min_lr <= lr and lr > 0, got lr={self.lr}, min_lr={self.min_lr}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise UserError(f"dtype={self.dtype!r} is not one of auto, float32, bfloat16, float16")
        if self.compile not in ("auto", "on", "off"):
            raise UserError(f"compile={self.compile!r} is not one of auto, on, off")


def lr_at(step, cfg):
    """Linear warmup to lr, then cosine decay to min_lr at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * min(1.0, progress))) * (cfg.lr - cfg.min_lr)


def make_optimizer(model, cfg, device):
    """AdamW; weight decay on matrices (dim >= 2) only, never on norms, biases or gains. A parameter
    with an `lr_scale` attribute learns at that multiple of the schedule (ppo.py's critic)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = []
    for scale in sorted({getattr(p, "lr_scale", 1.0) for p in params}):
        mine = [p for p in params if getattr(p, "lr_scale", 1.0) == scale]
        groups += [{"params": [p for p in mine if p.dim() >= 2], "weight_decay": cfg.weight_decay, "lr_scale": scale},
                   {"params": [p for p in mine if p.dim() < 2], "weight_decay": 0.0, "lr_scale": scale}]
    fused = torch.device(device).type == "cuda"
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)


def rank():
    """This process's rank under torchrun (0 without it): only rank 0 logs, evaluates and saves."""
    return int(os.environ.get("RANK", 0))


class Dist:
    """torchrun's environment: rank, world size, and the process group (NCCL on GPUs, gloo on CPU)."""

    def __init__(self, device):
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.rank = rank()
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.device = device
        if self.world > 1:
            import torch.distributed as dist
            if not dist.is_initialized():
                dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
            if device.startswith("cuda"):
                self.device = f"cuda:{self.local_rank}"
                torch.cuda.set_device(self.device)

    @property
    def master(self):
        return self.rank == 0


# dense bf16 TFLOP/s by device name, the first key found in the name wins ("NVIDIA H100 80GB HBM3" is the SXM)
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 989.0,
                    "GH200": 989.0, "B200": 2250.0, "A100": 312.0, "A10G": 125.0, "A10": 125.0, "L40S": 362.0,
                    "L4": 121.0, "RTX 4090": 165.0, "RTX 3090": 71.0, "V100": 125.0, "T4": 65.0}


def device_peak_flops(device):
    """Dense bf16 (fp16 on pre-Ampere) peak of this GPU from its name; if unknown, a measured matmul."""
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in name:
            return tflops * 1e12, name
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    torch.cuda.synchronize(device)
    t = time.perf_counter()
    for _ in range(10):
        a @ a
    torch.cuda.synchronize(device)
    return 10 * 2 * 8192 ** 3 / (time.perf_counter() - t), name + " (measured matmul peak)"


def flops_per_token(model, T):
    """6 N (forward + backward through every weight; the tied embedding is the output head's matmul)
    plus 12 n_layer n_embd T for attention's scores and mixing (PaLM's estimate). With MoE, N counts the
    top_k experts a token runs through, not all n_expert. Linear attention's parallel form costs the same."""
    cfg = model.cfg
    n = sum(p.numel() for p in model.parameters())
    if cfg.n_expert:
        n -= cfg.n_layer * (cfg.n_expert - cfg.expert_top_k) * sum(
            p.numel() for p in model.blocks[0].ffn.experts[0].parameters())
    return 6 * n + 12 * cfg.n_layer * cfg.n_embd * T


def train(model, cfg, get_batch, loss_fn, evaluate=None, ckpt_path=None, ckpt_extra=None, desc="train"):
    """The loop every stage uses.

    get_batch(i) -> batch: the i-th micro-batch of this process (a pure function of i, so a resumed
    run sees exactly the data it would have seen). loss_fn(model, batch) -> (loss, stats) where
    stats is a dict of floats ("tokens" counts the tokens processed; the others are shown on the
    progress bar and at every validation, averaged over the micro-batches). evaluate(model) -> dict of
    metrics, run on rank 0 every eval_interval steps and at the end. Checkpoints go to ckpt_path.
    Returns a dict of final metrics."""
    device = pick_device(cfg.device)
    dist = Dist(device)
    device = dist.device
    torch.manual_seed(cfg.seed + dist.rank)
    model.to(device)
    optimizer = make_optimizer(model, cfg, device)
    compute_dtype = autocast_dtype(device, cfg.dtype)
    scaler = torch.amp.GradScaler(enabled=compute_dtype == torch.float16)
    start = 0
    if cfg.resume and ckpt_path and os.path.exists(ckpt_path):
        ckpt = load_checkpoint(ckpt_path)
        try:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
        except (KeyError, ValueError, RuntimeError) as e:
            raise UserError(f"cannot resume from {ckpt_path}: it does not match this model/optimizer "
                            f"({str(e).splitlines()[0]}); start without --resume") from None
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        torch.set_rng_state(ckpt["rng"])
        start = ckpt["step"]
        if dist.master:
            print(f"resuming {ckpt_path} at step {start}")
    if dist.master:
        print(f"{desc}: {sum(p.numel() for p in model.parameters()):,} parameters, device {device}, compute dtype "
              f"{str(compute_dtype).replace('torch.', '')}, {dist.world} process(es)")
    net = model
    if dist.world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[dist.local_rank] if "cuda" in device else None)
    if cfg.compile == "on" or (cfg.compile == "auto" and device.startswith("cuda")):
        net = torch.compile(net)
    peak = device_peak_flops(device) if device.startswith("cuda") else None

    def checkpoint(step, metrics):
        if ckpt_path and dist.master:
            save_checkpoint(ckpt_path, model=model.state_dict(), config=dataclasses.asdict(model.cfg),
                            optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), step=step,
                            rng=torch.get_rng_state(), metrics=metrics, **(ckpt_extra or {}))

    metrics, history = {}, []
    tokens_seen, t0, train_time = 0, time.perf_counter(), 0.0
    bar = tqdm(range(start, cfg.max_steps), desc=desc, disable=not dist.master, dynamic_ncols=True)
    model.train()
    for step in bar:
        t_step = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg) * group.get("lr_scale", 1.0)
        loss_sum, stats_sum = 0.0, {}
        for micro in range(cfg.grad_accum):
            batch = get_batch(step * cfg.grad_accum + micro)
            sync = dist.world == 1 or micro == cfg.grad_accum - 1  # DDP all-reduces on the last micro-batch
            with (contextlib.nullcontext() if sync else net.no_sync()), autocast(device, cfg.dtype):
                loss, stats = add_moe_loss(model, *loss_fn(net, batch))
            scaler.scale(loss / cfg.grad_accum).backward()
            loss_sum += loss.item() / cfg.grad_accum
            for k, v in stats.items():
                stats_sum[k] = stats_sum.get(k, 0.0) + v
        if not math.isfinite(loss_sum):
            raise UserError(f"the loss became {loss_sum} at step {step}: lower --lr (now {cfg.lr}) or "
                            "use --dtype float32; the last good checkpoint is kept")
        if cfg.grad_clip > 0:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        train_time += time.perf_counter() - t_step
        tokens_seen += stats_sum.get("tokens", 0) * dist.world
        history.append(loss_sum)
        postfix = {"loss": f"{loss_sum:.4f}", "tok/s": f"{tokens_seen / train_time:,.0f}"}
        postfix.update({k: f"{v / cfg.grad_accum:.3g}" for k, v in stats_sum.items() if k != "tokens"})
        if peak:
            postfix["mfu"] = f"{tokens_seen / train_time * flops_per_token(model, model.cfg.block_size) / peak[0]:.1%}"
        bar.set_postfix(postfix)
        last = step == cfg.max_steps - 1
        if (step + 1) % cfg.eval_interval == 0 or last:
            if evaluate and dist.master:
                model.eval()
                with torch.no_grad(), autocast(device, cfg.dtype):
                    metrics = evaluate(model)
                model.train()
                bar.write(f"step {step + 1}: train loss {loss_sum:.4f} " + " ".join(
                    f"{k} {v:.4f}" for k, v in {**metrics, **{k: v / cfg.grad_accum for k, v in stats_sum.items()
                                                              if k != "tokens"}}.items()))
            checkpoint(step + 1, metrics)
    bar.close()
    recent = history[-max(1, len(history) // 10):]
    result = {"train_loss": sum(recent) / len(recent) if recent else float("nan"), **metrics,
              "tokens_per_sec": tokens_seen / train_time if train_time else 0.0,
              "train_seconds": train_time, "wall_seconds": time.perf_counter() - t0, "steps": cfg.max_steps}
    if peak:
        result["mfu"] = result["tokens_per_sec"] * flops_per_token(model, model.cfg.block_size) / peak[0]
        result["device_name"] = peak[1]
    if dist.world > 1:
        import torch.distributed as tdist
        tdist.barrier()
    return result


# ----------------------------------------------------------------------------------------------
# 7. Pretraining on a built-in corpus: the Python standard library's own source files

@dataclass
class DataConfig:
    data: str = arg("", "a text file to train on; empty = the Python standard library's .py files")
    val_fraction: float = arg(0.05, "share of whole files (or of the text, for --data) held out")
    sample_tokens: int = arg(200, "tokens to generate for the sample at the end")
    bench: bool = arg(False, "instead of training, benchmark KV-cache decoding against recomputation")


def stdlib_files():
    """The .py files of the interpreter running this script (no download; site-packages excluded)."""
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for d, subdirs, names in os.walk(root):
        subdirs[:] = sorted(s for s in subdirs if s not in ("site-packages", "dist-packages", "__pycache__"))
        files += [os.path.join(d, n) for n in sorted(names) if n.endswith(".py")]
    return root, files


def load_corpus(cfg: DataConfig):
    """Returns (train, val) arrays of token ids. Each file starts with BOS; whole files are held out
    (chosen by a hash of the path, so the split does not depend on the file order)."""
    def tokens_of(texts):
        parts = [np.array([BOS] + list(t), dtype=np.uint16) for t in texts]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint16)

    if cfg.data:
        if not os.path.isfile(cfg.data):
            raise UserError(f"--data {cfg.data}: no such file")
        raw = open(cfg.data, "rb").read()
        cut = int(len(raw) * (1 - cfg.val_fraction))
        train, val = tokens_of([raw[:cut]]), tokens_of([raw[cut:]])
        source = cfg.data
    else:
        root, files = stdlib_files()
        held = lambda p: zlib.crc32(os.path.relpath(p, root).encode()) % 10_000 < cfg.val_fraction * 10_000
        read = lambda ps: [open(p, "rb").read() for p in ps]
        train = tokens_of(read([p for p in files if not held(p)]))
        val = tokens_of(read([p for p in files if held(p)]))
        source = f"{len(files)} .py files under {root}"
    return train, val, source


def corpus_batches(data, batch_size, block_size, seed):
    """get_batch(i): batch_size random windows of block_size + 1 tokens, a pure function of (seed, i)."""
    def get_batch(i):
        g = torch.Generator().manual_seed(seed * 1_000_003 + i)
        starts = torch.randint(len(data) - block_size - 1, (batch_size,), generator=g).numpy()
        w = torch.from_numpy(np.stack([data[s:s + block_size + 1] for s in starts]).astype(np.int64))
        return w[:, :-1], w[:, 1:]                                               # inputs, targets (B, T)
    return get_batch


def pretrain(model_cfg, train_cfg, data_cfg):
    """Train a GPT on the corpus; saves out_dir/gpt.pt and returns the metrics."""
    train_data, val_data, source = load_corpus(data_cfg)
    need = model_cfg.block_size + 2
    if len(train_data) < need or len(val_data) < need:
        raise UserError(f"the data ({len(train_data)} training and {len(val_data)} validation tokens from {source}) "
                        f"is too small for block_size={model_cfg.block_size}: use a larger --data file, "
                        "a larger --val_fraction or a smaller --block_size")
    dist_rank = rank()
    if dist_rank == 0:
        print(f"corpus: {source}: {len(train_data):,} training and {len(val_data):,} validation tokens")
    torch.manual_seed(train_cfg.seed)
    model = GPT(model_cfg)
    get_train = corpus_batches(train_data, train_cfg.batch_size, model_cfg.block_size, train_cfg.seed + 7919 * dist_rank)
    get_val = corpus_batches(val_data, train_cfg.batch_size, model_cfg.block_size, seed=0)

    def loss_fn(net, batch):
        x, y = (t.to(next(model.parameters()).device) for t in batch)
        return lm_loss(net(x), y), {"tokens": x.numel()}

    def evaluate(m):
        losses, routing = [], {}
        for i in range(train_cfg.eval_batches):
            x, y = (t.to(next(m.parameters()).device) for t in get_val(i))
            losses.append(lm_loss(m(x), y).item())
            for k, v in moe_stats(m).items():
                routing[k] = routing.get(k, 0.0) + v / train_cfg.eval_batches
        val_loss = sum(losses) / len(losses)
        return {"val_loss": val_loss, "val_bpb": val_loss / math.log(2), **routing}  # one token = one byte

    ckpt = os.path.join(train_cfg.out_dir, "gpt.pt")
    result = train(model, train_cfg, get_train, loss_fn, evaluate, ckpt, desc="pretrain")
    result["params"] = model.num_params()
    return model, result


@torch.no_grad()
def bench_decoding(model_cfg, device, contexts=(128, 256, 512, 1024), steps=16):
    """Per-token decode time with the KV cache vs recomputing the full forward, at growing context.
    Each step feeds one token after `context` tokens; best of three runs of `steps` steps."""
    cfg = dataclasses.replace(model_cfg, block_size=max(contexts) + steps)
    model = GPT(cfg).to(device).eval()
    ids = torch.randint(0, 256, (1, cfg.block_size), device=device)

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def per_token(ctx, use_cache):
        best = float("inf")
        for _ in range(3):
            cache = KVCache(cfg, 1, ctx + steps, device, torch.float32) if use_cache else None
            if use_cache:
                model(ids[:, :ctx], cache=cache)  # prefill, not timed
            sync()
            t = time.perf_counter()
            for i in range(ctx, ctx + steps):
                if use_cache:
                    model(ids[:, i:i + 1], cache=cache, last_only=True)
                else:
                    model(ids[:, :i + 1], last_only=True)
            sync()
            best = min(best, (time.perf_counter() - t) / steps)
        return best

    print(f"\nKV-cache decoding, {model.num_params():,} parameters, batch 1, device {device}")
    print(f"{'context':>8} {'cache ms/token':>15} {'recompute ms/token':>19} {'speedup':>8}")
    rows = []
    for ctx in contexts:
        cached, full = per_token(ctx, True), per_token(ctx, False)
        rows.append({"context": ctx, "cache_ms": cached * 1e3, "recompute_ms": full * 1e3, "speedup": full / cached})
        print(f"{ctx:>8} {cached * 1e3:>15.2f} {full * 1e3:>19.2f} {full / cached:>7.1f}x")
    return rows


def main(argv=None):
    model_cfg, train_cfg, data_cfg = parse_args([GPTConfig(), TrainConfig(), DataConfig()], argv,
                                                description=__doc__.split("\n")[1])
    if data_cfg.bench:
        bench_decoding(model_cfg, pick_device(train_cfg.device))
        return
    model, m = pretrain(model_cfg, train_cfg, data_cfg)
    if rank() != 0:
        return
    rows = [("train loss", m["train_loss"]), ("val loss", m["val_loss"]), ("val bits/byte", m["val_bpb"]),
            ("tokens/s", round(m["tokens_per_sec"])), ("parameters", f"{m['params']:,}"),
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
    sample = generate(model, [prompt], n, temperature=0.8, top_k=50)[0]
    print("\nsample:\n" + decode(prompt + sample))
    write_metrics("gpt", m, train_cfg.out_dir)


if __name__ == "__main__":
    run_main(main)
