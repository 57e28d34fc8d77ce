"""
Attention for gpt.py: one public function, `attention(q, k, v, ...)`, and the paths behind it.

    q: (B, n_head,    Tq, head_dim)   queries
    k: (B, n_kv_head, Tk, head_dim)   keys    (n_head % n_kv_head == 0: MHA, GQA or MQA, notes 4.1-4.4)
    v: (B, n_kv_head, Tk, head_dim)   values
    -> (B, n_head, Tq, head_dim)

Query head h reads key/value head g(h) = h // (n_head // n_kv_head) (notes 4.4).
`causal=True` masks the future with the mask aligned to the bottom right: query i sits at
absolute position Tk - Tq + i, so the same call serves training (Tq == Tk), prefill into a
KV cache and one-token decoding (Tq == 1). `mask` (bool, broadcastable to (B, n_head, Tq, Tk),
True = may attend) is combined with the causal mask; gpt.py uses it for left padding.

Paths (environment variable ATTN_IMPL = auto | triton | sdpa | reference; the choice is printed once):
  triton     FlashAttention-2 in Triton (below): the L x L score matrix is never stored, so memory is
             O(B L d_model) instead of O(B H L^2) at the same O(B H L^2 d_head) time (notes 4.10, Table 2)
  sdpa       torch.nn.functional.scaled_dot_product_attention (flash / memory-efficient / math)
  reference  explicit softmax in float64, for tests
`auto` takes the Triton kernel on CUDA GPUs of compute capability >= 8.0 for the calls it supports
(see select_path), SDPA otherwise, and falls back to SDPA, saying why once, where the kernel fails to
compile or launch; `triton` forces the kernel (on CPU: only under TRITON_INTERPRET=1) and raises on
such a failure, except for what it cannot compute (an explicit mask, dropout), which still goes to SDPA.

`python kernels.py` checks the kernel's output and gradients against the float64 reference: on a GPU
in bf16 and fp16 (fp32 with --fp32), then benchmarks it against SDPA's backends and the naive
implementation and times the backward per kernel; without a GPU in Triton's CPU interpreter (fp32),
then runs compile_check(): every kernel and tile compiled for sm_90 and sm_80 with the ptxas in the
triton wheel, its registers, spills, shared memory and MMA instructions.

FP8 (notes 7): `to_fp8` / `from_fp8` cast to float8 e4m3 or e5m2 and back with a per-tensor or
per-channel scale S = fp8 max / amax, and `fp8_matmul` computes X W^T as FP8GEMM(X S_X, W S_W) / (S_X S_W),
on the FP8 tensor cores (torch._scaled_mm) where the GPU has them, emulated elsewhere.
`python kernels.py --fp8` prints the error of per-tensor against per-channel scaling on loud and quiet rows.
"""
import contextlib
import functools
import io
import itertools
import json
import math
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from train import UserError, arg, check, claim_out_dir, parse_args, print_table, run_main, write_metrics

if __name__ == "__main__" and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # no GPU: run the kernels in Triton's CPU interpreter
try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:  # a CPU-only install: attention() uses SDPA; the kernels below are defined, never run
    HAS_TRITON = False
    triton = SimpleNamespace(jit=lambda fn=None, **options: fn or (lambda f: f))
    tl = SimpleNamespace(constexpr=None)

INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true")
IMPLS = ("auto", "triton", "sdpa", "reference")
FLASH_HEAD_DIMS = (16, 32, 64, 128)
FLASH_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LOG2E = 1.4426950408889634  # the kernels use exp2: e^x = 2^(x log2 e)
DELTA_BLOCK_M = 64
_announced = set()


def causal_mask(Tq, Tk, device):
    """(Tq, Tk) bool, True where query i (absolute position Tk - Tq + i) may see key j <= its position."""
    return torch.ones(Tq, Tk, dtype=torch.bool, device=device).tril(diagonal=Tk - Tq)


def reference_attention(q, k, v, causal=True, mask=None, scale=None):
    """softmax(Q K^T / sqrt(d) + M) V written out in float64 (notes 4.1, eq. 6-7), GQA by index g(h)."""
    B, H, Tq, D = q.shape
    g = torch.arange(H, device=q.device) // (H // k.shape[1])  # g(h): the key/value head of query head h
    qd, kd, vd = q.double(), k.double()[:, g], v.double()[:, g]  # (B, H, T, D)
    s = qd @ kd.transpose(-2, -1) * (1.0 / math.sqrt(D) if scale is None else scale)  # (B, H, Tq, Tk)
    allowed = torch.ones_like(s, dtype=torch.bool)
    if causal:
        allowed = allowed & causal_mask(Tq, k.shape[2], q.device)
    if mask is not None:
        allowed = allowed & mask
    s = s.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s, dim=-1)  # numerically stable softmax, eq. 7
    return (p @ vd).to(q.dtype)


def sdpa_attention(q, k, v, causal=True, mask=None, scale=None, dropout_p=0.0):
    Tq, Tk = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if causal and Tq > 1 and (mask is not None or Tq != Tk):  # SDPA's is_causal is top-left aligned
        causal_part = causal_mask(Tq, Tk, q.device)
        mask = causal_part if mask is None else mask & causal_part
        causal = False
    is_causal = causal and Tq > 1  # one query at the end of the sequence sees every key
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                          is_causal=is_causal, scale=scale, enable_gqa=gqa)


# ----------------------------------------------------------------------------------------------
# Triton kernels (FlashAttention-2, Dao 2023). Every tensor is contiguous (B, heads, T, D), viewed as
# (B*heads, T, D): query head bh = b*H + h reads key/value head bh // GROUP = b*n_kv_head + g(h) in
# place (notes 4.4), so K and V are never repeated. A tile is BLOCK_M query rows or BLOCK_N key rows,
# all D columns. Scores are kept in log2 units (exp2 is the fast one): qk_scale = scale * log2(e),
# and the saved per-row log-sum-exp is LSE2 = LSE / ln 2.
#
# Programs are laid out (head, block) with the head on grid axis 0, which the GPU dispatches fastest:
# the first wave takes the same block of every head, and the blocks are ordered so that the ones with
# the most causal work start first (the longest-first rule; the short ones then fill the tail).
#
# The integer arguments are not specialised (do_not_specialize): every sequence length, and
# GROUP = 1 or not, runs the same compiled code, so a new shape never triggers a compile.

_INTS = ["Tq", "Tk", "GROUP", "tune_key"]


def _tiles_for(tiles, arch, head_dim):
    """The (BLOCK_M, BLOCK_N, num_warps, num_stages) tried for `head_dim` on a GPU of compute capability
    `arch` (major * 10 + minor): tiles[90] from Hopper on (wgmma), tiles[80] before (mma.sync, whose
    register layouts spill where wgmma's do not); head dims below 64 take the 64 list."""
    return tiles[90 if arch >= 90 else 80][max(64, head_dim)]


def _autotune(tiles, cpu_tile, **kwargs):
    """Autotune over the tiles _tiles_for lists for the call's GPU and head dim; the CPU interpreter
    gets one small tile, so that short test sequences span several tiles. tune_key is the next power
    of two of the sequence length: a new length re-tunes only when it falls in a new bucket."""
    if not HAS_TRITON:
        return lambda fn: fn
    if INTERPRET:
        tiles = {80: {64: [cpu_tile]}, 90: {64: [cpu_tile]}}
    union = list(dict.fromkeys(t for by_dim in tiles.values() for ts in by_dim.values() for t in ts))
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in union]

    def prune(configs, named_args, **kw):
        major, minor = torch.cuda.get_device_capability(named_args["Q"].device)
        keep = _tiles_for(tiles, 10 * major + minor, kw["HEAD_DIM"])
        return [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in keep]

    return triton.autotune(configs, key=["tune_key", "HEAD_DIM", "CAUSAL"],
                           prune_configs_by=None if INTERPRET else {"early_config_prune": prune}, **kwargs)


@triton.jit
def _dot(a, b):
    """a @ b with fp32 accumulation. input_precision="ieee": fp32 inputs multiply in fp32, not TF32
    (fp16 / bf16 inputs use the tensor cores either way)."""
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _load_rows(ptr, rows, n_rows, HEAD_DIM: tl.constexpr):
    """Rows `rows` of a contiguous (n_rows, HEAD_DIM) matrix, zeros past its end: (len(rows), HEAD_DIM)."""
    d = tl.arange(0, HEAD_DIM)
    return tl.load(ptr + rows[:, None] * HEAD_DIM + d[None, :], mask=rows[:, None] < n_rows, other=0.0)


@triton.jit
def _store_rows(ptr, x, rows, n_rows, HEAD_DIM: tl.constexpr):
    d = tl.arange(0, HEAD_DIM)
    tl.store(ptr + rows[:, None] * HEAD_DIM + d[None, :], x.to(ptr.dtype.element_ty), mask=rows[:, None] < n_rows)


@triton.jit
def _allowed(rows, cols, Tk, off, CAUSAL: tl.constexpr):
    """(BLOCK_M, BLOCK_N) bool: the key exists and, if causal, key j <= the query's position i + off."""
    ok = cols[None, :] < Tk
    if CAUSAL:
        ok = ok & (cols[None, :] <= rows[:, None] + off)
    return ok


@triton.jit
def _key_range(m0, Tk, off, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """For the query rows m0..m0+BLOCK_M: every row sees keys [0, n_full) (no mask needed), keys
    [n_full, n_end) need the causal / tail mask, and no row sees a key >= n_end."""
    if CAUSAL:
        n_full = (m0 + off + 1) // BLOCK_N * BLOCK_N  # row m0 sees keys 0..m0+off
        n_end = tl.minimum(m0 + BLOCK_M + off, Tk)    # the last row sees keys up to m0+BLOCK_M-1+off
    else:
        n_full = Tk // BLOCK_N * BLOCK_N
        n_end = Tk
    return n_full, n_end


@triton.jit
def _query_block(n_blocks, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr):
    """m0 of this program's query block: with a causal mask the last block sees the most keys, so the
    blocks run last to first (longest first)."""
    i = tl.program_id(1)
    if CAUSAL:
        i = n_blocks - 1 - i
    return i * BLOCK_M


@triton.jit
def _fwd_block(acc, m_i, l_i, q, K, V, rows, n0, Tk, off, qk_scale, MASKED: tl.constexpr,
               CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Online softmax: fold keys n0..n0+BLOCK_N into the running max m, running sum l and unnormalised
    output acc. With m_new = max(m, rowmax S), what was summed under the old max is rescaled by
    exp(m - m_new), so in the end acc / l = softmax(S) V, the stable softmax of notes 4.1 eq. 7."""
    cols = n0 + tl.arange(0, BLOCK_N)
    k = _load_rows(K, cols, Tk, HEAD_DIM)                               # (BLOCK_N, D)
    v = _load_rows(V, cols, Tk, HEAD_DIM)                               # (BLOCK_N, D)
    s = _dot(q, tl.trans(k)) * qk_scale                                 # (BLOCK_M, BLOCK_N) S, log2 units
    if MASKED:
        s = tl.where(_allowed(rows, cols, Tk, off, CAUSAL), s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))                               # (BLOCK_M,)
    alpha = tl.math.exp2(m_i - m_new)                                   # exp(m_old - m_new)
    p = tl.math.exp2(s - m_new[:, None])                                # (BLOCK_M, BLOCK_N)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v)                 # (BLOCK_M, D)
    return acc, m_new, l_i


# Kept by the compile check (triton 3.6 and 3.9, bf16 and fp16, causal or not, MHA or GQA): no spills,
# wgmma on sm_90, shared memory within the limit (sm_80: 163 KB; one entry of every list also within
# the 99 KB of consumer Ampere/Ada GPUs). Dropped on sm_90 at head dim 128: (64, 128, 4, 3) spills and needs
# 208 KB, (128, 128, 8, 3) needs 224 KB and spilled; on sm_80 at head dim 128, (128, 128, 8, 2), the
# 4-warp tiles and, with triton 3.9's ptxas, (128, 64, 8, 2) spill 8-44 bytes.
FWD_TILES = {90: {64: [(128, 64, 4, 3), (128, 128, 8, 3)],
                  128: [(128, 64, 8, 3), (128, 128, 8, 2), (128, 64, 8, 2)]},
             80: {64: [(128, 64, 8, 3), (128, 128, 8, 3)],
                  128: [(128, 64, 8, 3)]}}


@_autotune(FWD_TILES, (16, 32, 1, 1))
@triton.jit(do_not_specialize=_INTS)
def _fwd_kernel(Q, K, V, O, LSE2, Tq, Tk, GROUP, qk_scale, tune_key, CAUSAL: tl.constexpr,
                HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Program (bh, i): O and LSE2 for one block of BLOCK_M query rows of query head bh."""
    bh = tl.program_id(0).to(tl.int64)
    m0 = _query_block(tl.cdiv(Tq, BLOCK_M), CAUSAL, BLOCK_M)
    off = Tk - Tq                                   # query row i sits at absolute position i + off
    K += bh // GROUP * Tk * HEAD_DIM                # the group's key/value head, read in place
    V += bh // GROUP * Tk * HEAD_DIM
    rows = m0 + tl.arange(0, BLOCK_M)
    q = _load_rows(Q + bh * Tq * HEAD_DIM, rows, Tq, HEAD_DIM)          # (BLOCK_M, D)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)                 # running max of S
    l_i = tl.zeros([BLOCK_M], tl.float32)                               # running sum of exp(S - m)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)                     # running sum of exp(S - m) V
    n_full, n_end = _key_range(m0, Tk, off, CAUSAL, BLOCK_M, BLOCK_N)
    for n0 in range(0, n_full, BLOCK_N):
        acc, m_i, l_i = _fwd_block(acc, m_i, l_i, q, K, V, rows, n0, Tk, off, qk_scale,
                                   False, CAUSAL, BLOCK_N, HEAD_DIM)
    for n0 in range(n_full, n_end, BLOCK_N):       # the diagonal and the tail, masked
        acc, m_i, l_i = _fwd_block(acc, m_i, l_i, q, K, V, rows, n0, Tk, off, qk_scale,
                                   True, CAUSAL, BLOCK_N, HEAD_DIM)
    _store_rows(O + bh * Tq * HEAD_DIM, acc / l_i[:, None], rows, Tq, HEAD_DIM)
    tl.store(LSE2 + bh * Tq + rows, m_i + tl.math.log2(l_i), mask=rows < Tq)  # log2 sum_j 2^S_ij


@triton.jit(do_not_specialize=["Tq"])
def _delta_kernel(O, DO, Delta, Tq, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """Backward preprocessing: delta_i = rowsum(dO * O)_i (= sum_j P_ij dP_ij), used in dS below."""
    bh = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    o = _load_rows(O + bh * Tq * HEAD_DIM, rows, Tq, HEAD_DIM).to(tl.float32)
    do = _load_rows(DO + bh * Tq * HEAD_DIM, rows, Tq, HEAD_DIM).to(tl.float32)
    tl.store(Delta + bh * Tq + rows, tl.sum(o * do, 1), mask=rows < Tq)


@triton.jit
def _dq_block(dq, q, do, lse2, delta, K, V, rows, n0, Tk, off, qk_scale, MASKED: tl.constexpr,
              CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr):
    """dQ += dS K over keys n0..n0+BLOCK_N, with P recomputed from the saved log-sum-exp. Keys past Tk
    are masked: they load as zeros, but exp(0 - LSE) can overflow, and inf * 0 is NaN."""
    cols = n0 + tl.arange(0, BLOCK_N)
    k = _load_rows(K, cols, Tk, HEAD_DIM)                               # (BLOCK_N, D)
    v = _load_rows(V, cols, Tk, HEAD_DIM)                               # (BLOCK_N, D)
    p = tl.math.exp2(_dot(q, tl.trans(k)) * qk_scale - lse2[:, None])   # (BLOCK_M, BLOCK_N) P = exp(S - LSE)
    if MASKED:
        p = tl.where(_allowed(rows, cols, Tk, off, CAUSAL), p, 0.0)
    dp = _dot(do, tl.trans(v))                                          # dP = dO V^T
    ds = p * (dp - delta[:, None])                                      # dS = P * (dP - delta)
    return dq + _dot(ds.to(k.dtype), k)                                 # (BLOCK_M, D)


# Dropped: 4-warp tiles of 128 query rows spill (a 128 x D fp32 dQ accumulator over 128 threads is D
# registers per thread before anything else), and so do (128, 64, 8, 2) and (64, 64, 4, 3) on sm_80
# at head dim 128.
DQ_TILES = {90: {64: [(128, 64, 8, 3), (128, 32, 4, 3)],
                 128: [(128, 64, 8, 3), (128, 32, 8, 3), (64, 32, 4, 4)]},
            80: {64: [(128, 64, 8, 3), (64, 64, 4, 3)],
                 128: [(128, 32, 8, 3), (64, 64, 8, 3)]}}


@_autotune(DQ_TILES, (16, 32, 1, 1))
@triton.jit(do_not_specialize=_INTS)
def _dq_kernel(Q, K, V, DO, DQ, LSE2, Delta, Tq, Tk, GROUP, qk_scale, scale, tune_key, CAUSAL: tl.constexpr,
               HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Program (bh, i): dQ = scale * dS K for one block of query rows, over the keys the forward visited."""
    bh = tl.program_id(0).to(tl.int64)
    m0 = _query_block(tl.cdiv(Tq, BLOCK_M), CAUSAL, BLOCK_M)
    off = Tk - Tq
    K += bh // GROUP * Tk * HEAD_DIM
    V += bh // GROUP * Tk * HEAD_DIM
    rows = m0 + tl.arange(0, BLOCK_M)
    q = _load_rows(Q + bh * Tq * HEAD_DIM, rows, Tq, HEAD_DIM)          # (BLOCK_M, D)
    do = _load_rows(DO + bh * Tq * HEAD_DIM, rows, Tq, HEAD_DIM)        # (BLOCK_M, D)
    lse2 = tl.load(LSE2 + bh * Tq + rows, mask=rows < Tq, other=0.0)    # (BLOCK_M,)
    delta = tl.load(Delta + bh * Tq + rows, mask=rows < Tq, other=0.0)  # (BLOCK_M,)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    n_full, n_end = _key_range(m0, Tk, off, CAUSAL, BLOCK_M, BLOCK_N)
    for n0 in range(0, n_full, BLOCK_N):
        dq = _dq_block(dq, q, do, lse2, delta, K, V, rows, n0, Tk, off, qk_scale, False, CAUSAL, BLOCK_N, HEAD_DIM)
    for n0 in range(n_full, n_end, BLOCK_N):
        dq = _dq_block(dq, q, do, lse2, delta, K, V, rows, n0, Tk, off, qk_scale, True, CAUSAL, BLOCK_N, HEAD_DIM)
    _store_rows(DQ + bh * Tq * HEAD_DIM, dq * scale, rows, Tq, HEAD_DIM)


@triton.jit
def _dkdv_block(dk, dv, k, v, Q, DO, LSE2, Delta, cols, m0, Tq, off, qk_scale, MASKED: tl.constexpr,
                BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Key-major: over query rows m0..m0+BLOCK_M, with S^T = K Q^T computed directly,
    P^T = exp(S^T - LSE), dV += P^T dO, dP^T = V dO^T, dS^T = P^T * (dP^T - delta), dK += dS^T Q.
    P^T and dS^T come out of their dots as the (BLOCK_N, BLOCK_M) left operands of the next ones, so
    they stay in registers; only the loaded Q and dO tiles are read transposed. Query rows past Tq
    load as zeros (LSE = delta = 0) and add exactly nothing; keys past Tk only reach their own rows of
    dK and dV, which are not stored."""
    rows = m0 + tl.arange(0, BLOCK_M)
    q = _load_rows(Q, rows, Tq, HEAD_DIM)                               # (BLOCK_M, D)
    do = _load_rows(DO, rows, Tq, HEAD_DIM)                             # (BLOCK_M, D)
    lse2 = tl.load(LSE2 + rows, mask=rows < Tq, other=0.0)              # (BLOCK_M,)
    delta = tl.load(Delta + rows, mask=rows < Tq, other=0.0)            # (BLOCK_M,)
    pt = tl.math.exp2(_dot(k, tl.trans(q)) * qk_scale - lse2[None, :])  # (BLOCK_N, BLOCK_M) P^T
    if MASKED:  # causal: key j is seen by query i when j <= i + off
        pt = tl.where(cols[:, None] <= rows[None, :] + off, pt, 0.0)
    dv += _dot(pt.to(do.dtype), do)                                     # dV += P^T dO   (BLOCK_N, D)
    dpt = _dot(v, tl.trans(do))                                         # dP^T = V dO^T  (BLOCK_N, BLOCK_M)
    dst = pt * (dpt - delta[None, :])                                   # dS^T = P^T * (dP^T - delta)
    dk += _dot(dst.to(q.dtype), q)                                      # dK += dS^T Q   (BLOCK_N, D)
    return dk, dv


# BLOCK_N key rows are the rows of every dot here, so on sm_90 every tile is wgmma with BLOCK_N >= 64,
# whatever BLOCK_M is. dK and dV are two BLOCK_N x D fp32 accumulators: at D = 128, BLOCK_N = 128 over
# 8 warps they take 128 registers per thread, and only BLOCK_M = 32 query rows leave room for S^T,
# dP^T and their operands without spilling ((64, 128, 8, 2|3) spill 20-84 bytes, (32, 128, 4, 3)
# 2 KB). BLOCK_N = 128 rather than 64 halves the Q and dO bytes read from L2 per flop. With mma.sync
# (sm_80) the same tiles spill 12-44 bytes at head dim 128; (64, 64, 8, 3) and (16, 128, 8, 3) do not.
DKDV_TILES = {90: {64: [(64, 128, 8, 3), (32, 128, 8, 3)],
                   128: [(32, 128, 8, 3), (32, 128, 8, 2)]},
              80: {64: [(32, 128, 8, 3), (32, 64, 4, 3)],
                   128: [(64, 64, 8, 3), (16, 128, 8, 3)]}}


@_autotune(DKDV_TILES, (32, 16, 1, 1), reset_to_zero=["DK", "DV"])
@triton.jit(do_not_specialize=_INTS)
def _dkdv_kernel(Q, K, V, DO, DK, DV, LSE2, Delta, Tq, Tk, GROUP, qk_scale, scale, tune_key,
                 CAUSAL: tl.constexpr, ATOMIC: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr):
    """Program (bh, j): query head bh's share of dK = scale * dS^T Q and dV = P^T dO for keys
    j*BLOCK_N.. of its key/value head, over every query tile that sees them.

    GQA: the GROUP query heads of a key/value head run as separate programs (GROUP times the
    parallelism of walking the group in one program) and add their shares into fp32 dK, dV with one
    atomic add per element at the end (ATOMIC); without GQA each program owns its rows and stores."""
    bh = tl.program_id(0).to(tl.int64)
    n0 = tl.program_id(1) * BLOCK_N                 # key block 0 has the most causal work and runs first
    bhk = bh // GROUP
    off = Tk - Tq
    cols = n0 + tl.arange(0, BLOCK_N)
    k = _load_rows(K + bhk * Tk * HEAD_DIM, cols, Tk, HEAD_DIM)         # (BLOCK_N, D)
    v = _load_rows(V + bhk * Tk * HEAD_DIM, cols, Tk, HEAD_DIM)         # (BLOCK_N, D)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    if CAUSAL:  # query rows < m_lo see none of these keys, rows >= m_full see all of them
        m_lo = tl.maximum(n0 - off, 0) // BLOCK_M * BLOCK_M
        m_full = tl.minimum(tl.cdiv(tl.maximum(n0 + BLOCK_N - 1 - off, 0), BLOCK_M) * BLOCK_M, Tq)
    else:  # every query sees every key; the tail tile's padded rows add nothing, so no mask at all
        m_lo = 0
        m_full = 0
    Q, DO, LSE2, Delta = Q + bh * Tq * HEAD_DIM, DO + bh * Tq * HEAD_DIM, LSE2 + bh * Tq, Delta + bh * Tq
    for m0 in range(m_lo, m_full, BLOCK_M):         # the diagonal, masked
        dk, dv = _dkdv_block(dk, dv, k, v, Q, DO, LSE2, Delta, cols, m0, Tq, off, qk_scale, True, BLOCK_M, HEAD_DIM)
    for m0 in range(m_full, Tq, BLOCK_M):
        dk, dv = _dkdv_block(dk, dv, k, v, Q, DO, LSE2, Delta, cols, m0, Tq, off, qk_scale, False, BLOCK_M, HEAD_DIM)
    DK += bhk * Tk * HEAD_DIM
    DV += bhk * Tk * HEAD_DIM
    if ATOMIC:
        d = tl.arange(0, HEAD_DIM)
        at = cols[:, None] * HEAD_DIM + d[None, :]                      # (BLOCK_N, D) offsets
        ok = (cols[:, None] < Tk) & (d[None, :] < HEAD_DIM)
        tl.atomic_add(DK + at, dk * scale, mask=ok, sem="relaxed")
        tl.atomic_add(DV + at, dv, mask=ok, sem="relaxed")
    else:
        _store_rows(DK, dk * scale, cols, Tk, HEAD_DIM)
        _store_rows(DV, dv, cols, Tk, HEAD_DIM)


def _shape_args(q, k, causal):
    Tq, Tk = q.shape[2], k.shape[2]
    return dict(Tq=Tq, Tk=Tk, GROUP=q.shape[1] // k.shape[1], tune_key=triton.next_power_of_2(max(Tq, Tk)),
                CAUSAL=causal, HEAD_DIM=q.shape[3], enable_fp_fusion=True)


def _flash_forward(q, k, v, causal, scale):
    """(O, LSE2) for contiguous q, k, v."""
    B, H, Tq, D = q.shape
    o = torch.empty_like(q)
    lse2 = torch.empty(B, H, Tq, device=q.device, dtype=torch.float32)
    _fwd_kernel[lambda meta: (B * H, triton.cdiv(Tq, meta["BLOCK_M"]))](
        q, k, v, o, lse2, qk_scale=scale * LOG2E, **_shape_args(q, k, causal))
    return o, lse2


def _bwd_delta(o, do):
    B, H, Tq, D = o.shape
    delta = torch.empty(B, H, Tq, device=o.device, dtype=torch.float32)
    _delta_kernel[(B * H, triton.cdiv(Tq, DELTA_BLOCK_M))](o, do, delta, Tq, HEAD_DIM=D, BLOCK_M=DELTA_BLOCK_M,
                                                           enable_fp_fusion=True)
    return delta


def _bwd_dq(q, k, v, do, lse2, delta, causal, scale):
    B, H, Tq, D = q.shape
    dq = torch.empty_like(q)
    _dq_kernel[lambda meta: (B * H, triton.cdiv(Tq, meta["BLOCK_M"]))](
        q, k, v, do, dq, lse2, delta, qk_scale=scale * LOG2E, scale=scale, **_shape_args(q, k, causal))
    return dq


def _bwd_dkdv(q, k, v, do, lse2, delta, causal, scale):
    """dK, dV; with GQA summed in fp32 buffers (zeroed: the programs of a group add into them)."""
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    atomic = H != k.shape[1]
    dk, dv = (torch.zeros_like(k, dtype=torch.float32) if atomic else torch.empty_like(k) for _ in range(2))
    _dkdv_kernel[lambda meta: (B * H, triton.cdiv(Tk, meta["BLOCK_N"]))](
        q, k, v, do, dk, dv, lse2, delta, qk_scale=scale * LOG2E, scale=scale, ATOMIC=atomic,
        **_shape_args(q, k, causal))
    return dk.to(k.dtype), dv.to(v.dtype)


def _flash_backward(q, k, v, o, lse2, do, causal, scale):
    """dQ, dK, dV (FlashAttention-2's backward, Dao 2023, Alg. 2): delta = rowsum(dO * O), then dQ
    query-major and dK, dV key-major, each recomputing P = exp(S - LSE) tile by tile.

    dQ is its own pass rather than fused into the dK/dV pass with atomic adds (as FlashAttention-2's
    CUDA kernel does). Fusing would save recomputing S and dP (5 tile matmuls per (query, key) tile
    pair instead of 7), but at head dim 128 the dK/dV registers leave room for BLOCK_M = 32 query rows
    only, so the fused pass would add a 32 x D fp32 tile into dQ atomically for every 128 x 32 tile
    pair: as many bytes of L2 read-modify-write as the pass reads of Q and dO, and a dQ whose
    summation order changes from run to run, with or without GQA. Compiled for sm_90 at those tiles,
    the fused variant (dQ^T = K^T dS^T, wgmma) sits at 255 registers and spills 8-20 bytes with
    triton 3.9's ptxas, and stages dS^T through 16 KB more shared memory. Separate, dQ runs 128-row
    query tiles with no atomics, and MHA's backward is deterministic."""
    delta = _bwd_delta(o, do)
    dq = _bwd_dq(q, k, v, do, lse2, delta, causal, scale)
    dk, dv = _bwd_dkdv(q, k, v, do, lse2, delta, causal, scale)
    return dq, dk, dv


class FlashAttention(torch.autograd.Function):
    """FlashAttention-2: the forward saves O and the per-row log-sum-exp; the backward recomputes
    P = exp(S - LSE) tile by tile, so no Tq x Tk matrix is ever stored."""

    @staticmethod
    def forward(ctx, q, k, v, causal, scale, fall_back):
        # contiguous (B, heads, T, D): copying a transposed view costs O(T D), beside O(T^2 D) attention
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        o, lse2 = _flash_forward(q, k, v, causal, scale)
        ctx.save_for_backward(q, k, v, o, lse2)
        ctx.causal, ctx.scale, ctx.fall_back = causal, scale, fall_back
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse2 = ctx.saved_tensors
        try:
            grads = _flash_backward(q, k, v, o, lse2, do.contiguous(), ctx.causal, ctx.scale)
        except torch.OutOfMemoryError:
            raise
        except Exception as e:
            if not ctx.fall_back:
                raise
            _fall_back(q, k, ctx.causal, e)  # the gradients of the same attention, by SDPA
            with torch.enable_grad():
                xs = [x.detach().requires_grad_() for x in (q, k, v)]
                grads = torch.autograd.grad(sdpa_attention(*xs, ctx.causal, scale=ctx.scale), xs, do)
        return *grads, None, None, None


@torch.compiler.disable  # torch.compile (on by default on CUDA) calls the kernel as it is, untraced
def flash_attention(q, k, v, causal=True, scale=None, fall_back=False):
    """The Triton kernel with autograd; shapes and the causal convention as in attention(). With
    fall_back, a backward that fails to compile or launch computes the gradients with SDPA instead."""
    return FlashAttention.apply(q, k, v, causal, 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale,
                                fall_back)


# ----------------------------------------------------------------------------------------------
# Dispatch

def flash_unsupported(q, k, v, causal=True, mask=None, dropout_p=0.0):
    """Why the Triton kernel cannot compute this call ("" when it can)."""
    if mask is not None:
        return "an explicit mask"
    if dropout_p > 0:
        return "dropout"
    if q.shape[-1] not in FLASH_HEAD_DIMS:
        return f"head_dim {q.shape[-1]} (supported: {FLASH_HEAD_DIMS})"
    if q.dtype not in FLASH_DTYPES or not q.dtype == k.dtype == v.dtype:
        return f"dtypes {q.dtype}, {k.dtype}, {v.dtype}"
    if causal and q.shape[2] > k.shape[2]:
        return "causal with more queries than keys (rows that see no key)"
    return ""


def gpu_unsupported(device):
    """Why the kernel is not tried on this CUDA device ("" when it is): its tiles are written for the
    bf16/fp16 tensor cores of compute capability 8.0 (Ampere) and later."""
    major, minor = torch.cuda.get_device_capability(device)
    return f"compute capability {major}.{minor} < 8.0" if major < 8 else ""


def _device_unsupported(q):
    """Why auto does not take the kernel for tensors where q is ("" when it does)."""
    if not HAS_TRITON:
        return "triton is not installed"
    if not q.is_cuda:
        return "no CUDA tensor"
    # fp32 tiles (--dtype float32 on a GPU) spill registers heavily at head dim 128 and need more shared memory
    # than sm_90 has for one tile: SDPA, unless ATTN_IMPL=triton asks for the kernel (python kernels.py --fp32)
    return gpu_unsupported(q.device) or ("float32 (the kernel's tiles are sized for bf16 and fp16)"
                                         if q.dtype == torch.float32 else "")


def _kernel_class(q, k, causal):
    """Calls that compile to the same kernels: a failure to compile or launch one holds for all."""
    return (str(q.device), q.dtype, q.shape[-1], causal, q.shape[1] != k.shape[1])


_failed = {}  # _kernel_class -> why the kernel failed there; those calls go to SDPA from then on


def select_path(q, k, v, causal=True, mask=None, dropout_p=0.0):
    """(path, reason) for this call under ATTN_IMPL."""
    impl = os.environ.get("ATTN_IMPL", "auto")
    if impl not in IMPLS:
        raise UserError(f"ATTN_IMPL={impl!r} is not one of {IMPLS}")
    if impl in ("sdpa", "reference"):
        return impl, "ATTN_IMPL"
    why_not = flash_unsupported(q, k, v, causal, mask, dropout_p)
    if impl == "triton":
        if why_not:
            return "sdpa", f"ATTN_IMPL=triton, but the kernel does not take {why_not}"
        if not HAS_TRITON or not (q.is_cuda or INTERPRET):
            raise RuntimeError("ATTN_IMPL=triton needs triton and a CUDA tensor, or TRITON_INTERPRET=1 on CPU")
        return "triton", "ATTN_IMPL"
    if not why_not:
        why_not = _device_unsupported(q) or _failed.get(_kernel_class(q, k, causal), "")
    # One-query decoding is bound by reading the KV cache, not by arithmetic: a BLOCK_M-row query
    # tile would use 1 row, and B*H programs each walking the whole cache leave most of the GPU idle.
    # What pays there is splitting the keys across programs (flash-decoding) and packing a group's
    # query heads into one tile (FlashAttention-2 does this for Tq == 1); this kernel does neither,
    # so decoding goes to SDPA. On a GPU, `python kernels.py` times both (bench_decode).
    if not why_not and q.shape[2] == 1:
        why_not = "one-query decode step"
    return ("sdpa", why_not) if why_not else ("triton", "auto")


def _announce(name, reason, what="attention"):
    if (what, name) not in _announced:
        _announced.add((what, name))
        print(f"[kernels] {what} path: {name} ({reason})", file=sys.stderr)  # not in piped output


def _first_line(error, limit=300):
    """`Type: first line of the message`, for one-line reports of an exception."""
    return f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0]}"[:limit]


def _fall_back(q, k, causal, error):
    """Record that the kernel failed for this class of calls, and say so once, on one line."""
    what = f"{str(q.dtype).removeprefix('torch.')}, head_dim {q.shape[-1]}, {'causal' if causal else 'full'}"
    why = f"the Triton kernel failed ({what}): {_first_line(error)}"
    _failed[_kernel_class(q, k, causal)] = why
    _announced.add(("attention", "sdpa"))  # this line is the SDPA path's announcement
    print(f"[kernels] attention path: sdpa ({why})", file=sys.stderr)


def attention(q, k, v, causal=True, mask=None, scale=None, dropout_p=0.0):
    """The attention gpt.py calls. See the module docstring for shapes and the causal convention.

    Under ATTN_IMPL=auto, a kernel that fails to compile or launch (say, a GPU whose shared memory no
    tile fits) sends this call and every later one of its class to SDPA, with one line that says why;
    a failure in the backward recomputes the gradients with SDPA. ATTN_IMPL=triton raises instead."""
    path, reason = select_path(q, k, v, causal, mask, dropout_p)
    if path == "triton" and reason == "auto":
        try:
            out = flash_attention(q, k, v, causal, scale, fall_back=True)
            _announce(path, reason)
            return out
        except torch.OutOfMemoryError:
            raise  # SDPA would not fit either
        except Exception as e:
            _fall_back(q, k, causal, e)
            return sdpa_attention(q, k, v, causal, mask, scale, dropout_p)
    _announce(path, reason)
    if path == "reference":
        return reference_attention(q, k, v, causal, mask, scale)
    if path == "triton":
        return flash_attention(q, k, v, causal, scale)
    return sdpa_attention(q, k, v, causal, mask, scale, dropout_p)


# ----------------------------------------------------------------------------------------------
# Compile check: every kernel, for every configuration its autotuner can select, compiled ahead of
# time for a GPU that need not be present (triton.compile on the kernel's source for a GPUTarget;
# the ptxas in the triton wheel does the rest). Per configuration it reports registers and spills
# per thread (the ptxas log), shared memory per block against the target's limit, and the MMA
# instructions the dots became: wgmma.mma_async is Hopper's asynchronous warpgroup MMA, mma.sync the
# Ampere one, which on sm_90 reaches only a fraction of the tensor cores' rate.

SMEM_LIMITS = {90: 227 * 1024, 80: 163 * 1024}  # bytes per block with the opt-in the launcher requests
CHECK_DTYPES = ("bf16", "fp16")
_FP32_ARGS = ("LSE2", "Delta")
_CHECK_INTS = dict(Tq=1000, Tk=1000, tune_key=1024)  # a sequence length that is not a multiple of 16


def _launches(head_dim, causal, group):
    """What one FlashAttention forward + backward compiles: (name, kernel, tiles, constexprs, dot_rows),
    where tiles is the kernel's autotune table (None: one launch with 4 warps and 3 stages) and
    dot_rows(config) the number of rows of the tiles its dots produce (wgmma needs >= 64)."""
    shape = dict(CAUSAL=causal, HEAD_DIM=head_dim)
    return [("fwd", _fwd_kernel, FWD_TILES, shape, lambda c: c["BLOCK_M"]),
            ("delta", _delta_kernel, None, dict(HEAD_DIM=head_dim, BLOCK_M=DELTA_BLOCK_M), lambda c: 0),
            ("dq", _dq_kernel, DQ_TILES, shape, lambda c: c["BLOCK_M"]),
            ("dkdv", _dkdv_kernel, DKDV_TILES, {**shape, "ATOMIC": group > 1}, lambda c: c["BLOCK_N"])]


def _signature(fn, dtype, constexprs, ints):
    """The signature, constants and attributes the JIT gives such a call: tensors `*dtype` (`*fp32`
    for the fp32 buffers), aligned to 16 bytes as torch allocates them; an int equal to 1 becomes a
    constant and a multiple of 16 gets a divisibility hint, unless the kernel says do_not_specialize."""
    sig, consts, attrs = {}, dict(constexprs), {}
    for i, p in enumerate(fn.params):
        if p.is_constexpr:
            sig[p.name] = "constexpr"
        elif p.name in ints:
            value = ints[p.name]
            if value == 1 and not p.do_not_specialize:
                sig[p.name], consts[p.name] = "constexpr", 1
                continue
            sig[p.name] = "i32"
            if value % 16 == 0 and not p.do_not_specialize:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif p.name in ("qk_scale", "scale"):
            sig[p.name] = "fp32"
        else:  # a tensor
            fp32 = p.name in _FP32_ARGS or (p.name in ("DK", "DV") and consts.get("ATOMIC"))
            sig[p.name] = "*fp32" if fp32 else f"*{dtype}"
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, consts, attrs


def _frozen(d):
    return tuple(sorted((k, tuple(map(tuple, v)) if isinstance(v, list) else v) for k, v in d.items()))


@functools.lru_cache(maxsize=None)
def _compile(fn_name, target, sig, consts, attrs, num_warps, num_stages):
    """Compile one kernel for sm_<target>: a dict of what the compiled object and the ptxas log show."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    kernel = globals()[fn_name]
    fn = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
    attrs = {k: [list(a) for a in v] for k, v in attrs}
    log = io.StringIO()
    start = time.perf_counter()
    # Triton prints the ptxas log (registers, spill bytes) when asked, and only when ptxas runs, so the
    # on-disk cache is bypassed; both are knobs in triton 3.6 and 3.9, and scope() restores them.
    with knobs.nvidia.scope(), knobs.compilation.scope(), contextlib.redirect_stdout(log):
        knobs.nvidia.dump_ptxas_log = True
        knobs.compilation.always_compile = True
        try:
            compiled = triton.compile(ASTSource(fn, dict(sig), dict(consts), attrs),
                                      target=GPUTarget("cuda", target, 32),
                                      options=dict(num_warps=num_warps, num_stages=num_stages, enable_fp_fusion=True))
        except Exception as e:  # a configuration that does not compile is a finding, reported in its row
            return dict(error=_first_line(e, 200))
    regs = re.findall(r"Used (\d+) registers", log.getvalue())
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log.getvalue())
    ptx = compiled.asm["ptx"]
    return dict(regs=int(regs[-1]) if regs else None,
                spill_stores=int(spills[-1][0]) if spills else None,
                spill_loads=int(spills[-1][1]) if spills else None,
                smem=compiled.metadata.shared,
                wgmma=len(re.findall(r"\bwgmma\.mma_async", ptx)),
                mma_sync=len(re.findall(r"\bmma\.sync", ptx)),
                atomics=len(re.findall(r"\b(?:red|atom)\.", ptx)),
                compile_s=round(time.perf_counter() - start, 2))


def compile_check(targets=(90, 80), dtypes=CHECK_DTYPES, head_dims=(64, 128), causals=(True, False), groups=(1, 4)):
    """One row per kernel, configuration, target, dtype, head dim, causal flag and group size that
    compiles to its own code (a group size that changes nothing is not listed again). `ok`: it
    compiled, ptxas reported no spill, its shared memory fits the target's limit, and on sm_90 the
    dots of tiles with >= 64 rows are wgmma, with no mma.sync left.

    Needs the kernels compiled, not interpreted: when this process runs them in Triton's interpreter
    (TRITON_INTERPRET=1), the check runs in a child process without it and returns the child's rows."""
    args = dict(targets=list(targets), dtypes=list(dtypes), head_dims=list(head_dims), causals=list(causals),
                groups=list(groups))
    if INTERPRET:
        code = (f"import json, sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); "
                f"import kernels; print(json.dumps(kernels.compile_check(**{args!r})))")
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        child = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        if child.returncode:
            raise RuntimeError(f"the compile check failed in its child process:\n{child.stderr[-3000:]}")
        return json.loads(child.stdout.strip().splitlines()[-1])
    rows, seen = [], set()
    for target, dtype, head_dim, causal, group in itertools.product(targets, dtypes, head_dims, causals, groups):
        for name, kernel, tiles, constexprs, dot_rows in _launches(head_dim, causal, group):
            fn = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
            candidates = [({"BLOCK_M": m, "BLOCK_N": n}, w, s) for m, n, w, s in _tiles_for(tiles, target, head_dim)
                          ] if tiles else [({}, 4, 3)]
            for meta, num_warps, num_stages in candidates:
                sig, consts, attrs = _signature(fn, dtype, {**constexprs, **meta}, {**_CHECK_INTS, "GROUP": group})
                key = (fn.__name__, target, _frozen(sig), _frozen(consts), _frozen(attrs), num_warps, num_stages)
                if key in seen:
                    continue
                seen.add(key)
                res = _compile(*key)
                fits = res.get("smem") is not None and res["smem"] <= SMEM_LIMITS[target]
                wgmma = res.get("wgmma", 0) > 0 and res.get("mma_sync", 1) == 0
                needs_wgmma = target >= 90 and dot_rows({**constexprs, **meta}) >= 64
                row = dict(kernel=name, BLOCK_M=meta.get("BLOCK_M", constexprs.get("BLOCK_M")),
                           BLOCK_N=meta.get("BLOCK_N"), num_warps=num_warps, num_stages=num_stages,
                           target=f"sm_{target}", dtype=dtype, head_dim=head_dim, causal=causal, group=group,
                           **res, smem_limit=SMEM_LIMITS[target], needs_wgmma=needs_wgmma)
                row["ok"] = ("error" not in res and res["regs"] is not None and res["spill_stores"] == 0
                             and fits and (wgmma or not needs_wgmma))
                rows.append(row)
    return rows


def print_compile_check(rows):
    """The compile check as a table, one line per row of compile_check()."""
    print(f"\n{'kernel':<6} {'BM':>4} {'BN':>4} {'warps':>5} {'stages':>6} {'target':>6} {'dtype':>5} {'D':>4} "
          f"{'causal':>6} {'group':>5} {'regs':>4} {'spill st/ld B':>13} {'smem KB':>7} {'wgmma':>5} {'mma.sync':>8} "
          f"{'atomics':>7} {'secs':>5}  ok")
    for r in rows:
        head = (f"{r['kernel']:<6} {r['BLOCK_M'] or '':>4} {r['BLOCK_N'] or '':>4} {r['num_warps']:>5} "
                f"{r['num_stages']:>6} {r['target']:>6} {r['dtype']:>5} {r['head_dim']:>4} {str(r['causal']):>6} "
                f"{r['group']:>5}")
        if "error" in r:
            print(f"{head}  {r['error']}")
            continue
        spills = f"{r['spill_stores']}/{r['spill_loads']}"
        print(f"{head} {r['regs']:>4} {spills:>13} {r['smem'] / 1024:>7.1f} "
              f"{r['wgmma']:>5} {r['mma_sync']:>8} {r['atomics']:>7} {r['compile_s']:>5.1f}  "
              f"{'yes' if r['ok'] else 'NO'}")


# ----------------------------------------------------------------------------------------------
# FP8 scaled casts and the scaled matmul (notes 7, "FP8-E4M3, FP8-E5M2" and the fully connected example).
# FP8's range is so narrow that a tensor is first multiplied by S = fp8 max / amax, so its largest
# magnitude lands on the format's largest finite value, and S (fp32) is kept beside it to undo the
# scaling afterwards: x_scaled = x S, y = y_scaled S^-1. Per tensor: one S. Per channel: one S per row
# (the last dimension reduced): per output channel of a weight W (d_out, d_in), per token of X (n, d_in).
# Within the normal range, rounding to the nearest of 1 + m mantissa bits errs by at most 2^-(m+1)
# relatively: 2^-4 for e4m3, 2^-3 for e5m2 (half the ULP@1 of notes Table 4).

FP8_DTYPES = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
FP8_SCALINGS = ("none", "tensor", "channel")


def fp8_scale(x, fmt="e4m3", scaling="tensor"):
    """S = fp8 max / amax in fp32: shape () per tensor, (..., 1) per channel (one per row). S = 1 for
    scaling "none", and where amax = 0 (an all-zero tensor or row stays zero instead of 0 * inf = NaN)."""
    if scaling not in FP8_SCALINGS:
        raise ValueError(f"scaling={scaling!r} is not one of {FP8_SCALINGS}")
    if scaling == "none":
        return torch.ones((), device=x.device)
    amax = (x.abs().amax(-1, keepdim=True) if scaling == "channel" else x.abs().amax()).float()
    return torch.where(amax > 0, torch.finfo(FP8_DTYPES[fmt]).max / amax, torch.ones_like(amax))


def to_fp8(x, fmt="e4m3", scaling="tensor"):
    """(x_fp8, S): x S rounded to the nearest float8 value. x S is clamped to the finite range first:
    beyond it a cast gives NaN or inf, depending on the device (and S = 1 would overflow at 448 in e4m3)."""
    dtype = FP8_DTYPES[fmt]
    fmax = torch.finfo(dtype).max
    s = fp8_scale(x, fmt, scaling)
    return (x.float() * s).clamp(-fmax, fmax).to(dtype), s


def from_fp8(x8, s):
    """Back to fp32: x = x_fp8 S^-1."""
    return x8.float() / s


def fp8_gemm_unsupported(x, w):
    """Why torch._scaled_mm cannot compute X W^T here ("" when it can)."""
    if not (x.is_cuda and w.is_cuda):
        return "no CUDA tensor"
    if torch.cuda.get_device_capability(x.device) < (8, 9):
        return "no FP8 tensor cores (compute capability < 8.9)"
    if any(n % 16 for n in (*x.shape, w.shape[0])):
        return f"sizes {tuple(x.shape)} x {tuple(w.shape)} are not all multiples of 16"
    return ""


def _scaled_mm(x8, sx, w8, sw):
    """torch._scaled_mm with its conventions: it multiplies the product by the scales it is given, so it
    takes the inverse scales S^-1; its second operand must be column-major (the transpose of a row-major
    W is); per-tensor scales are fp32 scalars, row-wise ones (n, 1) and (1, d_out), and row-wise scaling
    only promises a bf16 output (fp32 is refused on many builds)."""
    rowwise = sx.dim() > 0
    out = torch._scaled_mm(x8.contiguous(), w8.contiguous().t(), scale_a=(1.0 / sx).float(),
                           scale_b=(1.0 / sw).float().t().contiguous(),
                           out_dtype=torch.bfloat16 if rowwise else torch.float32)
    return out.float()


def fp8_matmul(x, w, fmt="e4m3", scaling="tensor"):
    """O = X W^T through an FP8 GEMM, in fp32 (notes 7): O = FP8GEMM(X S_X, W S_W) / (S_X S_W).
    x: (n, d_in) tokens, w: (d_out, d_in) -> (n, d_out). Per channel, S_X is (n, 1) and S_W (d_out, 1), and
    O_ij is divided by S_X,i S_W,j: the outer product S_X S_W^T. On GPUs with FP8 tensor cores
    (compute capability >= 8.9) the product is torch._scaled_mm; elsewhere, or when it refuses the call
    (e5m2 x e5m2, for one), it is emulated: the same float8 values, multiplied in fp32."""
    x8, sx = to_fp8(x, fmt, scaling)                               # (n, d_in) float8, S_X () or (n, 1)
    w8, sw = to_fp8(w, fmt, scaling)                               # (d_out, d_in) float8, S_W () or (d_out, 1)
    why_not = fp8_gemm_unsupported(x, w)
    if not why_not:
        try:
            out = _scaled_mm(x8, sx, w8, sw)
            _announce("torch._scaled_mm", "FP8 tensor cores", "FP8 matmul")
            return out
        except RuntimeError as e:
            why_not = f"torch._scaled_mm refused it: {str(e).splitlines()[0]}"
    _announce("emulated", why_not, "FP8 matmul")
    return (x8.float() @ w8.float().t()) / (sx * sw.t())           # (n, d_out) / (n, d_out) scales


def fp8_report(device, n=64, d_in=256, d_out=64, n_loud=4, ratios=(1e2, 1e3, 1e5, 1e9), seed=0):
    """fp8_matmul against the fp32 X W^T when the first n_loud token rows of X are `ratio` times louder
    than the others: the max relative error over all rows and over the quiet rows, per format and scaling."""
    g = torch.Generator(device=device).manual_seed(seed)
    w = torch.randn(d_out, d_in, device=device, generator=g) / math.sqrt(d_in)
    quiet = torch.randn(n, d_in, device=device, generator=g)
    rows = []
    for fmt in FP8_DTYPES:
        for ratio in ratios:
            x = quiet.clone()
            x[:n_loud] *= ratio
            ref = x @ w.t()                                         # (n, d_out) fp32
            for scaling in FP8_SCALINGS:
                o = fp8_matmul(x, w, fmt, scaling)
                rows.append(dict(format=fmt, ratio=ratio, scaling=scaling, rel_err=rel_err(o, ref),
                                 quiet_rel_err=rel_err(o[n_loud:], ref[n_loud:])))
    return rows

# ----------------------------------------------------------------------------------------------
# python kernels.py: the correctness check everywhere; on a GPU the benchmark, without one the compile check

@dataclass
class KernelsConfig:
    batch_tokens: int = arg(16384, "benchmark batch: B = batch_tokens // T")
    n_head: int = arg(16, "benchmark query heads")
    kv_heads: str = arg("16,4", "benchmark key/value head counts (n_head: MHA, fewer: GQA)")
    seq_lens: str = arg("1024,2048,4096,8192", "benchmark sequence lengths")
    head_dims: str = arg("64,128", "benchmark head dims")
    fp32: bool = arg(False, "on a GPU, check the kernel in fp32 too (IEEE fp32 dots without tensor cores: minutes "
                            "of compiling)")
    compile_check: bool = arg(False, "only the compile check: every kernel and tile for sm_90 and sm_80, no GPU "
                                     "needed")
    out_dir: str = arg("out", "where kernels_metrics.json goes")
    fp8: bool = arg(False, "instead: the FP8 report (notes 7), per-tensor vs per-channel scaled matmul error, to "
                           "kernels_fp8_metrics.json")

    def __post_init__(self):
        for name in ("kv_heads", "seq_lens", "head_dims"):
            try:
                values = [int(x) for x in getattr(self, name).split(",")]
            except ValueError:
                raise UserError(f"--{name} {getattr(self, name)!r} is not a comma-separated list of "
                                "integers") from None
            check(min(values) >= 1, f"--{name} must be positive, got {getattr(self, name)!r}")
        bad = [d for d in self.dims() if d not in FLASH_HEAD_DIMS]
        check(not bad, f"--head_dims {bad} not supported by the kernel (supported: {FLASH_HEAD_DIMS})")
        check(self.batch_tokens >= 1 and self.n_head >= 1, "--batch_tokens and --n_head must be positive")
        bad = [h for h in self.kvs() if self.n_head % h]
        check(not bad, f"--kv_heads {bad} do not divide --n_head {self.n_head}")

    def dims(self):
        return [int(x) for x in self.head_dims.split(",")]

    def lens(self):
        return [int(x) for x in self.seq_lens.split(",")]

    def kvs(self):
        return [int(x) for x in self.kv_heads.split(",")]


def rel_err(a, b):
    """max|a - b| / max|b|."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def check_kernel(device, dtype, cases, seed=0):
    """Relative errors of the kernel's O, dQ, dK, dV against the float64 reference computed from the
    same (rounded) inputs, per case (B, H, Hkv, Tq, Tk, D, causal)."""
    rows = []
    for B, H, Hkv, Tq, Tk, D, causal in cases:
        g = torch.Generator(device=device).manual_seed(seed)
        q, k, v, do = (torch.randn(B, h, T, D, device=device, generator=g).to(dtype)
                       for h, T in ((H, Tq), (Hkv, Tk), (Hkv, Tk), (H, Tq)))
        results = []
        for fn, xs in ((flash_attention, (q, k, v)), (reference_attention, (q.double(), k.double(), v.double()))):
            xs = [x.detach().requires_grad_() for x in xs]
            o = fn(*xs, causal)
            results.append([o, *torch.autograd.grad(o, xs, do.to(o.dtype))])
        rows.append((f"B={B} H={H} Hkv={Hkv} Tq={Tq} Tk={Tk} D={D} {'causal' if causal else 'full'}",
                     [rel_err(a, b) for a, b in zip(*results)]))
    return rows


# Shapes of the check: T not a multiple of any tile, GQA, prefill (Tq < Tk) and decode (Tq = 1). On a
# GPU they fall into two compile classes per dtype (head dim 128 causal GQA, head dim 64 full MHA),
# the first shared with the benchmark; in the interpreter the sizes stay small.
GPU_CASES = [(2, 8, 2, 1000, 1000, 128, True), (1, 4, 2, 300, 1100, 128, True), (2, 8, 2, 1, 700, 128, True),
             (1, 8, 8, 777, 777, 64, False)]
CPU_CASES = [(1, 4, 2, 130, 130, 64, True), (2, 4, 1, 17, 17, 16, False), (1, 4, 4, 33, 33, 32, True),
             (1, 4, 2, 9, 40, 16, True), (2, 4, 2, 1, 50, 64, True), (1, 4, 1, 130, 130, 128, False)]
TOLERANCES = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}  # max relative error


def _bench_impls():
    """The benchmark's implementations, name -> fn(q, k, v) (causal), SDPA's flash backend first: the
    others are reported as ratios to it."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def sdpa(backend):
        def fn(q, k, v):
            with contextlib.nullcontext() if backend is None else sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])
        return fn

    def naive(q, k, v):  # the whole (B, H, T, T) score matrix, K and V repeated per query head
        k, v = (x.repeat_interleave(q.shape[1] // k.shape[1], 1) for x in (k, v))
        s = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).masked_fill(
            ~causal_mask(q.shape[2], k.shape[2], q.device), float("-inf"))
        return torch.softmax(s.float(), dim=-1).to(q.dtype) @ v

    return {"sdpa_flash": sdpa(SDPBackend.FLASH_ATTENTION), "triton": flash_attention,
            "sdpa_cudnn": sdpa(SDPBackend.CUDNN_ATTENTION), "sdpa_efficient": sdpa(SDPBackend.EFFICIENT_ATTENTION),
            "sdpa_default": sdpa(None), "naive": naive}


def _bench_inputs(cfg, T, D, Hkv, device):
    B = max(1, cfg.batch_tokens // T)
    q, k, v = (torch.randn(B, h, T, D, device=device, dtype=torch.bfloat16, requires_grad=True)
               for h in (cfg.n_head, Hkv, Hkv))
    return B, q, k, v, torch.randn_like(q)


def _time_impl(fn, q, k, v, do, flops):
    """Peak memory and forward / forward+backward TFLOP/s of one implementation, or why it could not run."""
    def fwd_bwd():
        return torch.autograd.grad(fn(q, k, v), (q, k, v), do)
    try:
        fwd_bwd()  # compile and autotune outside the measurements
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fwd_bwd()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        return dict(peak_mib=peak, fwd_tflops=flops / triton.testing.do_bench(lambda: fn(q, k, v)) / 1e9,
                    fwd_bwd_tflops=3.5 * flops / triton.testing.do_bench(fwd_bwd) / 1e9)  # backward = 2.5 fwd
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return dict(error="out of memory")
    except Exception as e:  # a backend that refuses the shape, or a kernel that fails to compile: a row that says so
        return dict(error=_first_line(e))


def bench(cfg, device):
    """Causal bf16 attention: forward and forward+backward TFLOP/s and peak memory per implementation,
    per head dim, sequence length and key/value head count. A backend that refuses a shape (SDPA's
    cuDNN or efficient kernels with GQA, on some builds) gets a row that says why."""
    rows = []
    for D, T, Hkv in itertools.product(cfg.dims(), cfg.lens(), cfg.kvs()):
        B, q, k, v, do = _bench_inputs(cfg, T, D, Hkv, device)
        flops = 4 * B * cfg.n_head * T * T * D / 2  # QK^T and PV, 2 flops per multiply-add, half masked
        flash = {}
        for name, fn in _bench_impls().items():
            row = dict(D=D, T=T, B=B, Hkv=Hkv, impl=name, **_time_impl(fn, q, k, v, do, flops))
            flash = row if name == "sdpa_flash" else flash
            for key in ("fwd_tflops", "fwd_bwd_tflops"):
                if key in row:
                    row[key.replace("tflops", "vs_flash")] = row[key] / flash.get(key, float("nan"))
            rows.append(row)
    return rows


def bench_backward_split(cfg, device):
    """The backward's time per kernel (delta, dQ, dK/dV) for causal bf16 at the longest benchmarked
    T <= 4096, per head dim and key/value head count, with the TFLOP/s of the dQ pass (3 tile matmuls)
    and the dK/dV pass (4)."""
    T = max([t for t in cfg.lens() if t <= 4096] or [min(cfg.lens())])
    rows = []
    for D, Hkv in itertools.product(cfg.dims(), cfg.kvs()):
        B, q, k, v, do = _bench_inputs(cfg, T, D, Hkv, device)
        q, k, v = (x.detach() for x in (q, k, v))
        scale = 1 / math.sqrt(D)
        o, lse2 = _flash_forward(q, k, v, True, scale)
        delta = _bwd_delta(o, do)
        ms = {"delta": triton.testing.do_bench(lambda: _bwd_delta(o, do)),
              "dq": triton.testing.do_bench(lambda: _bwd_dq(q, k, v, do, lse2, delta, True, scale)),
              "dkdv": triton.testing.do_bench(lambda: _bwd_dkdv(q, k, v, do, lse2, delta, True, scale))}
        matmul = 2 * B * cfg.n_head * T * T * D / 2  # flops of one causal T x T x D tile matmul sweep
        rows.append(dict(D=D, T=T, B=B, Hkv=Hkv, **{f"{n}_ms": t for n, t in ms.items()},
                         dq_tflops=3 * matmul / ms["dq"] / 1e9, dkdv_tflops=4 * matmul / ms["dkdv"] / 1e9))
    return rows


def bench_decode(cfg, device, D=128, contexts=(1024, 4096, 16384)):
    """One query per sequence against a KV cache, bf16 forward: microseconds of the Triton kernel and of
    SDPA, the measurement behind select_path sending this case to SDPA."""
    rows = []
    for Tk in contexts:
        B = max(1, cfg.batch_tokens // Tk)
        q = torch.randn(B, cfg.n_head, 1, D, device=device, dtype=torch.bfloat16)
        k, v = (torch.randn(B, min(cfg.kvs()), Tk, D, device=device, dtype=torch.bfloat16) for _ in range(2))
        rows.append(dict(Tk=Tk, B=B, triton_us=1e3 * triton.testing.do_bench(lambda: flash_attention(q, k, v)),
                         sdpa_us=1e3 * triton.testing.do_bench(lambda: sdpa_attention(q, k, v))))
    return rows


def _print_bench(cfg, metrics, name):
    print(f"\ncausal bf16 attention, n_head={cfg.n_head}, B*T={cfg.batch_tokens}, {name}; TFLOP/s counts the "
          f"backward as 2.5 forwards")
    print(f"{'D':>4} {'T':>5} {'Hkv':>4} {'impl':>15} {'fwd TFLOP/s':>12} {'fwd+bwd TFLOP/s':>16} {'peak MiB':>9} "
          f"{'fwd/flash':>9} {'f+b/flash':>9}")
    for r in metrics["bench"]:
        head = f"{r['D']:>4} {r['T']:>5} {r['Hkv']:>4} {r['impl']:>15} "
        print(head + (f"  {r['error']}" if "error" in r else
                      f"{r['fwd_tflops']:>12.1f} {r['fwd_bwd_tflops']:>16.1f} {r['peak_mib']:>9.0f} "
                      f"{r['fwd_vs_flash']:>9.2f} {r['fwd_bwd_vs_flash']:>9.2f}"))
    print(f"\nthe backward by kernel, causal bf16 (ms)\n{'D':>4} {'T':>5} {'Hkv':>4} {'delta':>7} {'dQ':>7} "
          f"{'dK/dV':>7} {'dQ TFLOP/s':>11} {'dK/dV TFLOP/s':>14}")
    for r in metrics["backward"]:
        print(f"{r['D']:>4} {r['T']:>5} {r['Hkv']:>4} {r['delta_ms']:>7.2f} {r['dq_ms']:>7.2f} {r['dkdv_ms']:>7.2f} "
              f"{r['dq_tflops']:>11.1f} {r['dkdv_tflops']:>14.1f}")
    print(f"\none-query decode, bf16, D=128, n_kv_head={min(cfg.kvs())}\n{'Tk':>6} {'B':>4} {'triton us':>10} "
          f"{'sdpa us':>8}")
    for r in metrics["decode"]:
        print(f"{r['Tk']:>6} {r['B']:>4} {r['triton_us']:>10.1f} {r['sdpa_us']:>8.1f}")


def _compile_summary(rows):
    bad = [f"{r['kernel']} {r['BLOCK_M']}x{r['BLOCK_N']} w{r['num_warps']} s{r['num_stages']} {r['target']} "
           f"{r['dtype']} D={r['head_dim']} {'causal' if r['causal'] else 'full'} group {r['group']}"
           for r in rows if not r["ok"]]
    return {"rows": len(rows), "all_ok": not bad, "not_ok": bad,
            "max_spill_stores": max((r.get("spill_stores") or 0) for r in rows),
            "compile_seconds": round(sum(r.get("compile_s", 0) for r in rows), 1)}


def main(argv=None):
    cfg, = parse_args([KernelsConfig()], argv, description="Triton flash attention: check and benchmark")
    claim_out_dir(cfg.out_dir)
    if cfg.fp8:
        return fp8_main(cfg)
    check(HAS_TRITON, "triton is not installed: there is no kernel to check (pip install triton)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = (torch.cuda.get_device_name() if device == "cuda" else
            "CPU" + ", Triton interpreter" * (not cfg.compile_check))
    metrics = {"device": name, "triton": triton.__version__, "torch": torch.__version__, "all_ok": True}
    if not cfg.compile_check:
        dtypes = ([torch.bfloat16, torch.float16] + [torch.float32] * cfg.fp32) if device == "cuda" else [torch.float32]
        for dtype in dtypes:
            start = time.perf_counter()
            try:
                rows = check_kernel(device, dtype, GPU_CASES if device == "cuda" else CPU_CASES)
            except Exception as e:  # reported, and the benchmark still runs: it shows what else fails
                print(f"\nthe {dtype} check failed: {_first_line(e)}")
                metrics[f"error_{str(dtype).removeprefix('torch.')}"] = _first_line(e)
                metrics["all_ok"] = False
                continue
            print_table(f"max relative error vs the float64 reference, {dtype}, {name} "
                        f"({time.perf_counter() - start:.0f} s, compiles included)",
                        [(case, "  ".join(f"{n} {e:.1e}" for n, e in zip(("O", "dQ", "dK", "dV"), errs)))
                         for case, errs in rows])
            metrics[f"max_rel_err_{str(dtype).removeprefix('torch.')}"] = worst = max(max(e) for _, e in rows)
            metrics["all_ok"] &= worst < TOLERANCES[dtype]
    if device == "cpu" or cfg.compile_check:
        if device == "cpu" and not cfg.compile_check:
            print("\nno CUDA GPU: the kernels ran in Triton's CPU interpreter; timings need a GPU. The compile "
                  "check instead (sm_90 and sm_80, every kernel and tile):")
        rows = compile_check()
        print_compile_check(rows)
        metrics["compile_check"] = _compile_summary(rows)
        metrics["all_ok"] &= metrics["compile_check"]["all_ok"]
    else:
        metrics["bench"] = bench(cfg, device)
        metrics["backward"] = bench_backward_split(cfg, device)
        metrics["decode"] = bench_decode(cfg, device)
        _print_bench(cfg, metrics, name)
    write_metrics("kernels", metrics, cfg.out_dir)


def fp8_main(cfg):
    """python kernels.py --fp8: fp8_report's table, then out_dir/kernels_fp8_metrics.json."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = fp8_report(device)
    table = {}
    for r in rows:
        table.setdefault(f"{r['format']}, loud rows x{r['ratio']:.0e}", []).append(
            f"{r['scaling']:>7} {r['rel_err']:.1e} / {r['quiet_rel_err']:.1e}")
    print_table("FP8 matmul X W^T vs fp32, 4 of 64 token rows of X louder by a ratio: max relative error, "
                "all rows / quiet rows (scaling none: S = 1, saturating)",
                [(k, "   ".join(v)) for k, v in table.items()])
    ranges = {fmt: torch.finfo(d).max / torch.finfo(d).tiny for fmt, d in FP8_DTYPES.items()}
    print("\nper-tensor scaling loses the quiet rows once the ratio nears the format's normal range, max / smallest "
          "normal: " + ", ".join(f"{fmt} {r:.1e}" for fmt, r in ranges.items()))
    write_metrics("kernels_fp8", {"device": torch.cuda.get_device_name() if device == "cuda" else "CPU",
                                  "rows": rows, "normal_range": ranges}, cfg.out_dir)


if __name__ == "__main__":
    run_main(main)
