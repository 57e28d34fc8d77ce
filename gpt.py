"""
gpt.py: a decoder-only transformer language model and the machinery every other script shares.

Read top to bottom:
  1. byte tokenizer                      ids 0..255 are bytes, then BOS, EOS, PAD, SEP
  2. GPTConfig                           frozen and validated: a model's config never changes
  3. the model                           attention (MHA/GQA/MQA, RoPE), FFN (SwiGLU), block, GPT
                                         (notes 4.1-4.4, 4.7, 5.2, 8.2, 8.6-8.7)
  4. the switches                        each its own module, chosen once when the model is built: post-norm
                                         and parallel blocks (4.7, 8.9), causal linear attention with its
                                         recurrent cache (4.10), mixture of experts (8.8), prefix-LM mask (8.4)
  5. KV cache, sampling, log-probs       (notes 4.3, 10.1, 10.5) used by every later stage
  6. command line, metrics, checkpoints, per-step random streams
  7. the training loop                   AdamW, warmup + cosine, clipping, accumulation, bf16, DDP, resume
  8. pretraining on the Python standard library's source: `python gpt.py`

Run `python gpt.py --help` for the flags; `torchrun --nproc_per_node=N gpt.py` trains with DDP.
"""
import argparse
import atexit
import contextlib
import dataclasses
import json
import math
import os
import random
import shutil
import sys
import sysconfig
import time
import zlib
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

# the bottom layer also holds what every script's output needs: its table, its JSON line, atomic files
from kernels import atomic_write, attention, causal_mask, finite_or_none, print_table, remove_quietly, write_metrics


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
# 2. The configuration

def arg(default, help):
    """A dataclass field that is also a command-line flag with this help text."""
    return field(default=default, metadata={"help": help})


def check(ok, message):
    if not ok:
        raise UserError(message)


def check_choice(obj, name, allowed):
    value = getattr(obj, name)
    check(value in allowed, f"{name}={value!r} is not one of {', '.join(map(str, allowed))}")


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
        self.extra_mask = prefix_lm_mask if cfg.prefix_lm else no_extra_mask
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
        mask = both(mask, self.extra_mask(idx, start))
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


def both(a, b):
    """The conjunction of two attention masks, either of which may be None (no constraint)."""
    return a if b is None else b if a is None else a & b


def lm_loss(logits, targets, ignore_index=-1):
    """Mean cross-entropy of the next-token predictions (notes 10.1, eq. CLM); targets already shifted."""
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                           ignore_index=ignore_index)


# ----------------------------------------------------------------------------------------------
# 4. The switches, each chosen once in Block / GPT.__init__

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


def no_extra_mask(idx, start=0):
    """A causal model's mask beyond causality and padding: none."""
    return None


# ----------------------------------------------------------------------------------------------
# 5. KV cache, sampling, generation and sequence log-probabilities (notes 4.3, 10.1, 10.5)

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


def logprobs_from_logits(logits, temperature=1.0):
    """log softmax(z / T) over the real token ids only (notes 10.5, temperature sampling): the
    vocabulary's padding ids are dropped, so the result is (..., N_TOKENS). Sampling and sequence
    log-probs both use this one function, so they score exactly the distribution that is sampled."""
    return F.log_softmax(logits[..., :N_TOKENS].float() / temperature, dim=-1)


def check_sampling(temperature=1.0, top_k=0, top_p=1.0):
    check(temperature >= 0, f"temperature must be >= 0 (0 = greedy), got {temperature}")
    check(top_k >= 0, f"top_k must be >= 0 (0 = off), got {top_k}")
    check(0 < top_p <= 1, f"top_p must be in (0, 1] (1 = off), got {top_p}")


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
# 6. Command line, devices, metrics, checkpoints, per-step random streams

class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line from run_main (rank 0 only under torchrun), not usage on every rank
        raise UserError(f"{message} (see --help)")


def finite_float(text):
    """A float flag's value, finite: no setting has a meaning at inf or nan (a limit is switched off with 0)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def parse_args(defaults, argv=None, description=None):
    """Expose every field of the given dataclass instances as --flags (the instances give the defaults).
    Returns new instances, every value validated by its dataclass: a bad one is a UserError naming it."""
    parser = ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for obj in defaults:
        group = parser.add_argument_group(type(obj).__name__)
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            kind = dict(action=argparse.BooleanOptionalAction) if isinstance(value, bool) else dict(
                type=finite_float if isinstance(value, float) else type(value))
            group.add_argument(f"--{f.name}", default=value, help=f.metadata.get("help", ""), **kind)
    ns = vars(parser.parse_args(argv))
    return [dataclasses.replace(obj, **{f.name: ns[f.name] for f in dataclasses.fields(obj)}) for obj in defaults]


def rank():
    """This process's rank under torchrun (0 without it): only rank 0 logs, evaluates and saves."""
    return int(os.environ.get("RANK", 0))


def run_main(main):
    """Run a script's main: a UserError becomes one line 'error: ...' and exit status 2, Ctrl-C one line
    saying what is kept and exit status 130 (under torchrun only rank 0 prints those), running out of memory
    one line with what to lower and what is kept, and exit status 1."""
    try:
        main()
    except UserError as e:
        if rank() == 0:
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Finished as done:
        if rank() == 0:
            print(done)
    except KeyboardInterrupt:
        if rank() == 0:
            print(f"\ninterrupted: {Trainer.active.interrupted() if Trainer.active else 'nothing was trained'}",
                  file=sys.stderr)
        sys.exit(130)
    except (MemoryError, RuntimeError) as e:  # a GPU's is a torch.OutOfMemoryError, the CPU allocator's a RuntimeError
        if not isinstance(e, (MemoryError, torch.OutOfMemoryError)) and "can't allocate memory" not in str(e):
            raise
        where = "GPU" if isinstance(e, torch.OutOfMemoryError) else "CPU"
        print(f"error: out of {where} memory: lower --batch_size (or the model's size); "
              f"{Trainer.active.kept() if Trainer.active else 'nothing was trained'}", file=sys.stderr)
        sys.exit(1)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_device(name):
    """A device that exists on this machine: auto, cpu, cuda or cuda:N (N < the number of GPUs)."""
    if name in ("auto", "cpu"):
        return
    kind, _, index = name.partition(":")
    check(kind == "cuda" and (index == "" or index.isdigit()), f"device={name!r} is not one of auto, cpu, cuda, "
          "cuda:N")
    check(torch.cuda.is_available(), f"--device {name} was asked for but no CUDA GPU is available; use --device cpu")
    check(int(index or 0) < torch.cuda.device_count(), f"--device {name}: this machine has "
          f"{torch.cuda.device_count()} GPU(s)")


def pick_device(name="auto"):
    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


def autocast_dtype(device, dtype="auto"):
    """The compute dtype: bf16 on GPUs that support it, fp16 on older GPUs (with a GradScaler),
    fp32 on CPU unless asked for (notes 7; mixed precision, Micikevicius et al. 2018: fp32 master weights
    either way)."""
    if dtype != "auto":
        return DTYPES[dtype]
    if torch.device(device).type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def autocast(device, dtype="auto"):
    dt = autocast_dtype(device, dtype)
    return contextlib.nullcontext() if dt == torch.float32 else torch.autocast(torch.device(device).type, dtype=dt)


def step_seed(seed, step):
    """The seed of the random stream of (seed, this process's rank, step). Every batch, rollout and sample
    draws from its own stream: runs are reproducible, resume exactly, and DDP processes see different data."""
    return (seed + 7919 * rank()) * 1_000_003 + step


def step_rng(seed, step):
    return random.Random(step_seed(seed, step))


def step_generator(seed, step, device="cpu"):
    return torch.Generator(device=device).manual_seed(step_seed(seed, step))


class Progress:
    """The progress of a long loop: a bar on a terminal; when stderr is a log (a file, CI, nohup), a plain
    line every `every` seconds instead of redrawn frames."""

    def __init__(self, total, desc, initial=0, enabled=True, every=10.0):
        self.tty, self.enabled, self.every, self.desc = sys.stderr.isatty(), enabled, every, desc
        self.n, self.total, self.last, self.postfix = initial, total, time.perf_counter(), {}
        self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True,
                        disable=not (enabled and self.tty))

    def update(self, n=1, **postfix):
        self.n, self.postfix = self.n + n, postfix
        if self.tty:
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(n)
        elif self.enabled and (time.perf_counter() - self.last >= self.every or self.n == self.total):
            self.last = time.perf_counter()
            print(f"{self.desc}: {self.n}/{self.total} " + " ".join(f"{k} {v}" for k, v in postfix.items()),
                  file=sys.stderr, flush=True)

    def write(self, line):
        if self.enabled:
            self.bar.write(line) if self.tty else print(line, flush=True)

    def close(self):
        self.bar.close()


def save_checkpoint(path, **state):
    """torch.save, atomically."""
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path):
    check(os.path.isfile(path), f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"checkpoint {path} is corrupt or not a checkpoint of this project "
                        f"({type(e).__name__}); delete it and train again") from None
    check(isinstance(ckpt, dict) and "model" in ckpt, f"checkpoint {path} holds no model; delete it and train again")
    return ckpt


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


class Finished(Exception):
    """--resume on a run that already finished: run_main prints its metrics and exits 0."""


_claimed = set()


def claim_out_dir(out_dir):
    """Before any work: out_dir is a writable directory with room for checkpoints, and no other run uses
    it (a lock file holding the process id, removed at exit; only rank 0 takes it)."""
    if out_dir in _claimed or rank() != 0:
        return
    check(not os.path.exists(out_dir) or os.path.isdir(out_dir), f"--out_dir {out_dir} is a file: give a directory")
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out_dir {out_dir} cannot be created ({e.strerror}): give another --out_dir") from None
    lock = os.path.join(out_dir, ".lock")
    busy = f"another run is using --out_dir {out_dir}: wait for it to finish or give another --out_dir"
    for _ in range(2):
        try:  # creating the lock is also the test that the directory is writable
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            pid = int(open(lock).read().strip() or 0)
            check(pid, busy)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 0)  # raises if there is no such process: the lock is stale
                raise UserError(busy.replace("another run", f"another run (process {pid})"))
            remove_quietly(lock)
        except OSError as e:
            raise UserError(f"--out_dir {out_dir} is not writable ({e.strerror}): give another --out_dir") from None
    else:
        raise UserError(busy)
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    atexit.register(remove_quietly, lock)
    free = shutil.disk_usage(out_dir).free
    check(free >= 64 * 2**20, f"--out_dir {out_dir} has {free / 2**20:.0f} MiB free, too little for checkpoints: "
          "free some space or give another --out_dir")
    _claimed.add(out_dir)


def first_difference(want, have, prefix=""):
    """The first field (dotted name, wanted, found) where the nested dict `have` differs from `want`, or None.
    Only the keys of `want` are compared."""
    for key, value in want.items():
        found = have.get(key, "missing") if isinstance(have, dict) else "missing"
        if isinstance(value, dict) and isinstance(found, dict):
            diff = first_difference(value, found, f"{prefix}{key}.")
            if diff:
                return diff
        elif found != value:
            return f"{prefix}{key}", value, found
    return None


# what a resumed run may change: where it runs and how often it validates, not what it computes
RESUME_MAY_CHANGE = ("device", "compile", "out_dir", "resume", "overwrite", "eval_interval", "eval_batches")


def claim_checkpoint(path, cfg, meta=None):
    """Before a stage trains into `path`: out_dir checked and locked; an existing checkpoint is never lost
    silently (--resume continues it, or prints its metrics when it finished; --overwrite replaces it); a
    resumed one must have been built with the same `meta` (the model's config and the stage's settings) and
    trained with the same TrainConfig but for RESUME_MAY_CHANGE, so that it continues exactly."""
    claim_out_dir(os.path.dirname(path) or ".")
    if not os.path.exists(path) or cfg.overwrite:
        return
    ckpt = load_checkpoint(path)
    stopped = f"stopped at step {ckpt.get('step')} of {ckpt.get('max_steps')}"
    if not cfg.resume:
        raise UserError(f"{path} holds a run {'that finished' if ckpt.get('finished') else stopped}: --resume "
                        f"{'prints its metrics' if ckpt.get('finished') else 'continues it'}, --overwrite trains "
                        "from scratch over it")
    if ckpt.get("finished"):
        raise Finished(f"{path} finished at step {ckpt.get('step')}; its metrics: "
                       f"{json.dumps(finite_or_none(ckpt.get('metrics', {})))}")
    want = {k: v for k, v in (meta or {}).items() if k != "built_from"}
    want["train_config"] = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RESUME_MAY_CHANGE}
    diff = first_difference(want, ckpt)
    check(not diff, diff and f"cannot resume {path}: it was built with {diff[0].replace('train_config.', '--')}="
          f"{diff[2]!r}, this run asks for {diff[1]!r}; resume with the same settings, or start again with --overwrite")


def provenance(ckpt):
    """What a checkpoint records of itself, for the checkpoints built from it: its identity (the stage, the
    model's config, the stage's settings), its training config and what it was built from."""
    return {k: v for k, v in ckpt.items() if k not in ("model", "critic", "optimizer", "scaler", "rng", "state")}


def load_stage(path, stage, train_missing, device="cpu", requires=None, build=None):
    """The model of an earlier stage's checkpoint, checked before use: the run must have finished, and match
    `requires` (e.g. {"task": {"digits": 3}}). When it is missing, train_missing() trains it first, so any
    script works on a fresh clone. build(ckpt, path) -> model, default a GPT. Returns (model, ckpt)."""
    if not os.path.exists(path):
        print(f"{path} not found: training that stage first")
        train_missing()
    ckpt = load_checkpoint(path)
    where = f"--out_dir {os.path.dirname(path) or '.'}"
    check("finished" in ckpt, f"{path} records nothing of how it was built (an earlier version of this project "
          "wrote it): delete it and run again")
    check(ckpt["finished"], f"{path} stopped at step {ckpt.get('step')} of {ckpt.get('max_steps')}: finish it "
          f"with `python {stage}.py --resume {where}`, or delete it")
    diff = first_difference(requires or {}, ckpt)
    check(not diff, diff and f"{path} was built with {diff[0]}={diff[2]!r}, this run asks for {diff[1]!r}: delete "
          f"it (or give another --out_dir) and run again, or run `python {stage}.py {where}` with that setting")
    model = build(ckpt, path) if build else build_model(ckpt.get("config"), ckpt["model"], path)
    return model.to(device), ckpt


def inherit(defaults, cfg):
    """An earlier stage's TrainConfig `defaults` with the settings of this run that must carry over to it."""
    return dataclasses.replace(defaults, **{k: getattr(cfg, k) for k in ("out_dir", "device", "dtype", "seed",
                                                                          "compile")})


def load_model(path, device="cpu"):
    """A GPT from any stage's checkpoint: returns (model, checkpoint dict)."""
    ckpt = load_checkpoint(path)
    return build_model(ckpt.get("config"), ckpt["model"], path).to(device), ckpt


# ----------------------------------------------------------------------------------------------
# 7. The training loop: its pieces in Trainer, the plain loop over batches in train()

@dataclass(frozen=True)
class TrainConfig:
    max_steps: int = arg(1600, "optimizer steps")
    max_seconds: float = arg(0.0, "stop after this many seconds of training, the schedule compressed to fit "
                                  "(0 = no limit): for comparisons at equal wall time")
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
    device: str = arg("auto", "auto | cpu | cuda | cuda:N")
    compile: str = arg("auto", "torch.compile: auto (on for CUDA) | on | off")
    seed: int = arg(1337, "random seed")
    out_dir: str = arg("out", "where checkpoints and metrics go")
    resume: bool = arg(False, "continue from the stage's checkpoint in out_dir (a finished one: print its metrics)")
    overwrite: bool = arg(False, "train from scratch over the stage's existing checkpoint in out_dir")

    def __post_init__(self):
        for name in ("max_steps", "batch_size", "grad_accum", "eval_interval", "eval_batches"):
            check(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_seconds", "warmup_steps", "weight_decay", "grad_clip"):
            check(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        check(self.lr > 0 and 0 <= self.min_lr <= self.lr,
              f"need lr > 0 and 0 <= min_lr <= lr, got lr={self.lr}, min_lr={self.min_lr}")
        check(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, f"beta1 and beta2 must be in [0, 1), got {self.beta1}, "
              f"{self.beta2}")
        check_choice(self, "dtype", ("auto", *DTYPES))
        check_choice(self, "compile", ("auto", "on", "off"))
        check_device(self.device)
        check(not (self.resume and self.overwrite), "--resume continues the checkpoint, --overwrite replaces it: "
              "choose one")


def lr_at(step, cfg, seconds=0.0):
    """Linear warmup to lr, then cosine decay to min_lr at the end of the budget: max_steps, or
    max_seconds of training when that comes first."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    if cfg.max_seconds:
        progress = max(progress, seconds / cfg.max_seconds)
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * min(1.0, progress))) * (cfg.lr - cfg.min_lr)


def make_optimizer(groups, cfg, device):
    """AdamW (Loshchilov & Hutter 2019) over groups [(module, lr_scale), ...]: a module's trainable parameters
    learn at lr_scale times the schedule; weight decay on matrices (dim >= 2) only, never on norms, biases
    or gains."""
    param_groups = []
    for module, scale in groups:
        params = [p for p in module.parameters() if p.requires_grad]
        param_groups += [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay,
                          "lr_scale": scale},
                         {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0, "lr_scale": scale}]
    return torch.optim.AdamW(param_groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             fused=torch.device(device).type == "cuda")


class Processes:
    """torchrun's environment: rank, world size, and the process group (NCCL on GPUs, gloo on CPU)."""

    def __init__(self, device):
        self.world, self.rank = int(os.environ.get("WORLD_SIZE", 1)), rank()
        self.local_rank, self.device = int(os.environ.get("LOCAL_RANK", 0)), device
        if self.world > 1:
            if not dist.is_initialized():
                dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
            if device.startswith("cuda"):
                self.device = f"cuda:{self.local_rank}"
                torch.cuda.set_device(self.device)
        self.master = self.rank == 0


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
    plus 12 n_layer n_embd T for attention's scores and mixing (PaLM's estimate, Chowdhery et al. 2022).
    With MoE, N counts the top_k experts a token runs through, not all n_expert. Linear attention's
    parallel form costs the same."""
    cfg = model.cfg
    n = sum(p.numel() for p in model.parameters())
    if cfg.n_expert:
        n -= cfg.n_layer * (cfg.n_expert - cfg.expert_top_k) * sum(
            p.numel() for p in model.blocks[0].ffn.experts[0].parameters())
    return 6 * n + 12 * cfg.n_layer * cfg.n_embd * T


class Trainer:
    """The pieces of a training run that every stage shares: device and DDP, the optimizer and its schedule
    (param groups [(module, lr_scale)]), precision, exact resume, validation, checkpoints and the progress
    line. train() below is the plain loop over batches; ppo.py writes its rollout loop from the same pieces.

    The checkpoint at ckpt_path holds the state_dicts of `saved` ({"model": model} unless given), `meta`
    (the stage's identity: its config, the configs of what it was built from), the optimizer, the step,
    `state` (whatever else the stage's loop needs to resume) and whether the run finished. `unit` names
    what the loss functions count in their stats (tokens, samples): its rate is the throughput, measured
    after the first steps (compile and warm-up), and with flops_per_unit on a GPU the MFU. train_mode=False
    keeps the model in eval mode while it trains: no dropout and no MoE capacity, so the policy that is scored
    is the one that generate() sampled (the alignment stages, as TRL's disable_dropout)."""

    active = None  # the run in progress, for run_main's Ctrl-C line

    def __init__(self, model, cfg, ckpt_path=None, meta=None, groups=None, saved=None, unit="tokens",
                 flops_per_unit=0, desc="train", train_mode=True):
        self.cfg, self.desc, self.unit, self.flops_per_unit = cfg, desc, unit, flops_per_unit
        self.procs = Processes(pick_device(cfg.device))
        self.device = self.procs.device
        torch.manual_seed(cfg.seed + self.procs.rank)
        self.model = model.to(self.device)
        self.optimizer = make_optimizer(groups or [(model, 1.0)], cfg, self.device)
        self.dtype = autocast_dtype(self.device, cfg.dtype)
        # fp16 needs loss scaling (notes 7; Micikevicius et al. 2018), on whichever device it runs
        self.scaler = torch.amp.GradScaler(torch.device(self.device).type, enabled=self.dtype == torch.float16)
        self.ckpt_path, self.meta, self.saved = ckpt_path, meta or {}, saved or {"model": model}
        self.step, self.saved_step, self.train_seconds, self.state, self.metrics = 0, None, 0.0, {}, {}
        if ckpt_path:
            claim_checkpoint(ckpt_path, cfg, self.meta)
            if cfg.resume and os.path.exists(ckpt_path):
                self.resume()
        if self.procs.master:
            print(f"{desc}: {sum(p.numel() for p in model.parameters()):,} parameters, device {self.device}, compute "
                  f"dtype {str(self.dtype).replace('torch.', '')}, {self.procs.world} process(es)")
        self.net = model
        if self.procs.world > 1:
            self.net = nn.parallel.DistributedDataParallel(model, device_ids=[self.procs.local_rank]
                                                           if "cuda" in self.device else None)
        if cfg.compile == "on" or (cfg.compile == "auto" and self.device.startswith("cuda")):
            self.net = torch.compile(self.net)
        self.peak = device_peak_flops(self.device) if self.device.startswith("cuda") and flops_per_unit else None
        self.history, self.warm, self.units, self.unit_seconds = [], 0, 0, 0.0
        self.t0 = time.perf_counter()
        self.bar = Progress(cfg.max_steps, desc, initial=self.step, enabled=self.procs.master)
        self.train_mode = train_mode
        model.train(train_mode)
        Trainer.active = self

    def resume(self):
        ckpt = load_checkpoint(self.ckpt_path)
        try:
            for name, module in self.saved.items():
                module.load_state_dict(ckpt[name])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scaler.load_state_dict(ckpt["scaler"])
            torch.set_rng_state(ckpt["rng"])
            self.step, self.train_seconds, self.state = ckpt["step"], ckpt["train_seconds"], ckpt["state"]
        except (KeyError, ValueError, RuntimeError) as e:
            raise UserError(f"cannot resume from {self.ckpt_path}: it lacks or mismatches what resuming needs "
                            f"({str(e).splitlines()[0][:120]}); start again with --overwrite") from None
        self.saved_step, self.metrics = self.step, ckpt.get("metrics", {})
        if self.procs.master:
            print(f"resuming {self.ckpt_path} at step {self.step}")

    @property
    def done(self):
        out_of_time = self.cfg.max_seconds and self.train_seconds >= self.cfg.max_seconds
        return self.step >= self.cfg.max_steps or bool(out_of_time)

    def optimizer_step(self, loss_of, extra=None):
        """One optimizer step: loss_of(micro) -> (loss, stats) for micro = 0..grad_accum-1, with the stats
        floats (averaged for the progress line) and stats[unit] the units that micro-batch processed; extra:
        figures of the batch as a whole (a rollout's) shown before them. The loss is scaled for accumulation
        and fp16, the gradient all-reduced (DDP) on the last micro-batch and clipped. Returns (loss, stats)."""
        cfg, t = self.cfg, time.perf_counter()
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.step, cfg, self.train_seconds) * group["lr_scale"]
        loss_sum, sums = 0.0, {}
        for micro in range(cfg.grad_accum):
            sync = self.procs.world == 1 or micro == cfg.grad_accum - 1  # DDP all-reduces on the last one
            with (contextlib.nullcontext() if sync else self.net.no_sync()), autocast(self.device, cfg.dtype):
                loss, stats = loss_of(micro)
            self.scaler.scale(loss / cfg.grad_accum).backward()
            loss_sum += loss.item() / cfg.grad_accum
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + v
        if not math.isfinite(loss_sum):
            raise UserError(f"the loss became {loss_sum} at step {self.step}: lower --lr (now {cfg.lr}) or use "
                            f"--dtype float32; {self.kept()}")
        if cfg.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        seconds = time.perf_counter() - t
        self.train_seconds += seconds
        n = sums.pop(self.unit, 0) * self.procs.world
        self.warm += 1
        if self.warm > min(20, cfg.max_steps // 5):  # steady state: after compile, autotuning and warm-up
            self.units, self.unit_seconds = self.units + n, self.unit_seconds + seconds
        stats = {**(extra or {}), **{k: v / cfg.grad_accum for k, v in sums.items()}}
        self.history.append(loss_sum)
        postfix = {"loss": f"{loss_sum:.4f}", f"{self.unit}/s": f"{self.rate():,.0f}",
                   **{k: f"{v:.3g}" for k, v in stats.items()}}
        if self.peak:
            postfix["mfu"] = f"{self.mfu():.1%}"
        self.bar.update(1, **postfix)
        self.last_stats = stats
        return loss_sum, stats

    def rate(self):
        return self.units / self.unit_seconds if self.unit_seconds else 0.0

    def mfu(self):
        """Model FLOPs utilisation: achieved FLOP/s over the peak of every process's GPU (PaLM's MFU)."""
        return self.rate() * self.flops_per_unit / (self.peak[0] * self.procs.world)

    def due(self, since=None):
        """Whether to validate now: a multiple of eval_interval was passed since step `since` (default: the
        step before this one), or the run is done."""
        since = self.step - 1 if since is None else since
        return self.step // self.cfg.eval_interval > since // self.cfg.eval_interval or self.done

    def validate(self, evaluate=None):
        """evaluate(model) -> metrics on rank 0 (no gradients, the training precision), printed with the
        latest training stats, then a checkpoint. A non-finite validation loss never reaches the checkpoint."""
        if evaluate and self.procs.master:
            self.model.eval()
            with torch.no_grad(), autocast(self.device, self.cfg.dtype):
                metrics = evaluate(self.model)
            self.model.train(self.train_mode)
            bad = [k for k, v in metrics.items() if k.endswith("loss") and not math.isfinite(v)]
            check(not bad, f"validation {bad and bad[0]} became {bad and metrics[bad[0]]} at step {self.step}: "
                  f"lower --lr (now {self.cfg.lr}) or use --dtype float32; {self.kept()}")
            self.metrics = metrics
            self.bar.write(f"step {self.step}: train loss {self.history[-1]:.4f} " + " ".join(
                f"{k} {v:.4f}" for k, v in {**metrics, **self.last_stats}.items() if isinstance(v, (int, float))))
        self.checkpoint()

    def checkpoint(self):
        if self.ckpt_path and self.procs.master:
            save_checkpoint(self.ckpt_path, **{k: m.state_dict() for k, m in self.saved.items()}, **self.meta,
                            optimizer=self.optimizer.state_dict(), scaler=self.scaler.state_dict(), step=self.step,
                            max_steps=self.cfg.max_steps, rng=torch.get_rng_state(), state=self.state,
                            metrics=self.metrics, train_seconds=self.train_seconds, finished=self.done,
                            train_config=dataclasses.asdict(self.cfg))
            self.saved_step = self.step

    def kept(self):
        if self.saved_step is None:
            return "no checkpoint was written" if self.ckpt_path else "nothing is saved"
        return f"{self.ckpt_path} from step {self.saved_step} is kept, `--resume` continues it"

    def interrupted(self):
        return f"{self.desc} stopped at step {self.step} of {self.cfg.max_steps}; {self.kept()}"

    def finish(self):
        """The run's figures: mean train loss of the last tenth of the steps, the last validation metrics,
        throughput and times."""
        self.bar.close()
        recent = self.history[-max(1, len(self.history) // 10):]
        result = {"train_loss": sum(recent) / len(recent) if recent else float("nan"), **self.metrics,
                  f"{self.unit}_per_sec": self.rate(), "train_seconds": self.train_seconds,
                  "wall_seconds": time.perf_counter() - self.t0, "steps": self.step}
        if self.peak:
            result.update(mfu=self.mfu(), device_name=self.peak[1])
        if self.procs.world > 1:
            dist.barrier()
        Trainer.active = None
        return result


def train(model, cfg, get_batch, loss_fn, evaluate=None, ckpt_path=None, meta=None, **trainer_kw):
    """The loop of every stage that is "batches -> loss": get_batch(i) -> the i-th micro-batch of this process
    (a pure function of i, so a resumed run sees exactly the data it would have seen); loss_fn(net, batch)
    -> (loss, stats); evaluate(model) -> metrics every eval_interval steps and at the end. Returns the
    Trainer's figures."""
    run = Trainer(model, cfg, ckpt_path, meta, **trainer_kw)
    while not run.done:
        run.optimizer_step(lambda micro: loss_fn(run.net, get_batch(run.step * cfg.grad_accum + micro)))
        if run.due():
            run.validate(evaluate)
    return run.finish()


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
