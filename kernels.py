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

Paths (environment variable ATTN_IMPL = auto | sdpa | reference; the choice is printed once):
  sdpa       torch.nn.functional.scaled_dot_product_attention (flash / memory-efficient / math)
  reference  explicit softmax in float64, for tests
"""
import math
import os

import torch
import torch.nn.functional as F

IMPLS = ("auto", "sdpa", "reference")
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


def _announce(name):
    if name not in _announced:
        _announced.add(name)
        print(f"[kernels] attention path: {name}")


def attention(q, k, v, causal=True, mask=None, scale=None, dropout_p=0.0):
    """The attention gpt.py calls. See the module docstring for shapes and the causal convention."""
    impl = os.environ.get("ATTN_IMPL", "auto")
    if impl not in IMPLS:
        raise ValueError(f"ATTN_IMPL={impl!r} is not one of {IMPLS}")
    if impl == "reference":
        _announce("reference")
        return reference_attention(q, k, v, causal, mask, scale)
    _announce("sdpa")
    return sdpa_attention(q, k, v, causal, mask, scale, dropout_p)
