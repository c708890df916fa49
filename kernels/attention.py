"""Attention for one request: prefill over explicit key positions, and decode over a KV buffer.

Masks follow spec section 7, with positions indexed in the meta-prefixed sequence. Prefill: key j is visible to
query i iff j <= i, and for sliding-window layers also (j < num_meta or i - j <= window). Decode: the caller's
buffer holds exactly the visible keys (meta + rolling window, or a global layer's whole history), so the one query
attends to every valid slot. GQA: query head h reads KV head h // (H / Hk). Scale 1/sqrt(q/k head dim) (Q11).
"""

from __future__ import annotations

import math

import torch

# The prefill twin materialises (H, block, S) scores; this bounds their elements.
_MAX_SCORE_ELEMENTS = 1 << 25


def attention_prefill_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    window: int | None,
    num_meta: int,
) -> torch.Tensor:
    """Causal (window=None) or sliding-window + meta-token attention of T queries over S keys.

    q: (T, H, dq)   k: (Hk, S, dq)   v: (Hk, S, dv)   q_pos: (T,) int64   k_pos: (S,) int64, ascending
    returns out: (T, H, dv) in q.dtype
    """
    T, H, dq = q.shape
    Hk, S, dv = v.shape
    g = H // Hk
    qf = q.float().transpose(0, 1).reshape(Hk, g, T, dq)  # query head h = kv * g + j
    kf, vf = k.float(), v.float()
    out = torch.empty(Hk, g, T, dv, dtype=torch.float32, device=q.device)
    block = max(1, _MAX_SCORE_ELEMENTS // (H * S))
    for t0 in range(0, T, block):
        t1 = min(T, t0 + block)
        qp, kp = q_pos[t0:t1, None], k_pos[None, :]
        visible = kp <= qp  # (t, S)
        if window is not None:
            visible &= (kp < num_meta) | (qp - kp <= window)
        qb = qf[:, :, t0:t1]  # (Hk, g, t, dq)
        scores = torch.einsum("hgtd,hsd->hgts", qb, kf) / math.sqrt(dq)
        scores.masked_fill_(~visible, float("-inf"))
        out[:, :, t0:t1] = torch.einsum("hgts,hsd->hgtd", torch.softmax(scores, dim=-1), vf)
    return out.reshape(H, T, dv).transpose(0, 1).to(q.dtype)


def attention_decode_ref(
    q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, num_valid: torch.Tensor | int
) -> torch.Tensor:
    """One query over the first num_valid slots of a KV buffer (slot order does not matter: keys carry RoPE).

    q: (H, dq)   k_buf: (Hk, capacity, dq)   v_buf: (Hk, capacity, dv)   num_valid: int or 0-d int tensor
    returns out: (H, dv) in q.dtype
    """
    H, dq = q.shape
    Hk = k_buf.shape[0]
    n = int(num_valid)
    k, v = k_buf[:, :n].float(), v_buf[:, :n].float()  # (Hk, n, d)
    scores = torch.einsum("hgd,hsd->hgs", q.float().view(Hk, H // Hk, dq), k) / math.sqrt(dq)
    out = torch.einsum("hgs,hsd->hgd", torch.softmax(scores, dim=-1), v)  # (Hk, g, dv)
    return out.reshape(H, -1).to(q.dtype)
