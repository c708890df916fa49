"""Decode's attention input in one launch: RoPE on the new token's query and key heads, and the key and value
written into the layer's KV buffer at the token's slot (spec 5, 7.2).

The position and the slot are 0-d device tensors read inside the kernel, never host values, so a CUDA graph can
capture the launch once and replay it at every position. RoPE is the GPT-NeoX "rotate half" form with fp32
tables: out[:h] = x[:h] cos[:h] - x[h:] sin[:h],  out[h:] = x[h:] cos[h:] + x[:h] sin[h:]  (h = dq / 2).
Triton kernel + launcher rope_decode for CUDA (and TRITON_INTERPRET=1); rope_decode_ref is the PyTorch twin.
"""

from __future__ import annotations

import torch

from kernels._triton import tl, triton


@triton.jit
def _rope_decode_kernel(
    qkv_ptr, pos_ptr, cos_ptr, sin_ptr, q_out_ptr, k_buf_ptr, v_buf_ptr, slot_ptr,  # pointers
    stride_table, stride_k_h, stride_k_s, stride_v_h, stride_v_s,  # strides, in elements
    H: tl.constexpr, HK: tl.constexpr, DQ: tl.constexpr, DV: tl.constexpr, HALF: tl.constexpr,  # meta
    BLOCK_HALF: tl.constexpr, BLOCK_DV: tl.constexpr,
):  # fmt: skip
    """Program p < H rotates query head p; program H + j rotates key head j and stores key and value head j."""
    p = tl.program_id(0)
    offs = tl.arange(0, BLOCK_HALF)
    mask = offs < HALF
    pos = tl.load(pos_ptr)
    cos_lo = tl.load(cos_ptr + pos * stride_table + offs, mask=mask)
    cos_hi = tl.load(cos_ptr + pos * stride_table + HALF + offs, mask=mask)
    sin_lo = tl.load(sin_ptr + pos * stride_table + offs, mask=mask)
    sin_hi = tl.load(sin_ptr + pos * stride_table + HALF + offs, mask=mask)
    is_query = p < H
    src = tl.where(is_query, p * DQ, H * DQ + (p - H) * DQ)  # q heads, then k heads, in the in_proj output
    lo = tl.load(qkv_ptr + src + offs, mask=mask).to(tl.float32)
    hi = tl.load(qkv_ptr + src + HALF + offs, mask=mask).to(tl.float32)
    rot_lo = lo * cos_lo - hi * sin_lo
    rot_hi = hi * cos_hi + lo * sin_hi
    if is_query:
        tl.store(q_out_ptr + p * DQ + offs, rot_lo.to(q_out_ptr.dtype.element_ty), mask=mask)
        tl.store(q_out_ptr + p * DQ + HALF + offs, rot_hi.to(q_out_ptr.dtype.element_ty), mask=mask)
    else:
        j = p - H
        slot = tl.load(slot_ptr)
        k_dst = k_buf_ptr + j * stride_k_h + slot * stride_k_s
        tl.store(k_dst + offs, rot_lo.to(k_buf_ptr.dtype.element_ty), mask=mask)
        tl.store(k_dst + HALF + offs, rot_hi.to(k_buf_ptr.dtype.element_ty), mask=mask)
        offs_v = tl.arange(0, BLOCK_DV)
        v = tl.load(qkv_ptr + H * DQ + HK * DQ + j * DV + offs_v, mask=offs_v < DV)
        tl.store(v_buf_ptr + j * stride_v_h + slot * stride_v_s + offs_v, v.to(v_buf_ptr.dtype.element_ty),
                 mask=offs_v < DV)  # fmt: skip


def _check(qkv, pos, cos, q_out, k_buf, v_buf, slot):
    H, dq = q_out.shape
    assert q_out.is_contiguous() and qkv.is_contiguous() and cos.stride(1) == 1, "contiguous rows expected"
    assert pos.numel() == 1 and pos.dtype == torch.int64, "pos: one int64 on the device"
    has_kv = k_buf is not None
    if has_kv:
        Hk, _, dv = v_buf.shape
        assert k_buf.shape[0] == Hk and k_buf.shape[2] == dq and slot.numel() == 1 and slot.dtype == torch.int64
        assert qkv.numel() >= H * dq + Hk * (dq + dv), f"qkv {tuple(qkv.shape)} too short for q, k, v"
    else:
        assert qkv.numel() >= H * dq and slot is None and v_buf is None
    return H, dq, has_kv


def rope_decode(
    qkv: torch.Tensor,
    pos: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    q_out: torch.Tensor,
    k_buf: torch.Tensor | None = None,
    v_buf: torch.Tensor | None = None,
    slot: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rotate one token's heads at position `pos`; store its K (rotated) and V at `slot` when a buffer is given.

    qkv: the in_proj output (H*dq + Hk*dq + Hk*dv + ...,) fp32, laid out q | k | v | ...     pos, slot: (1,) int64
    cos, sin: (P, dq) fp32     q_out: (H, dq) written in its dtype     k_buf: (Hk, cap, dq)    v_buf: (Hk, cap, dv)
    returns q_out
    """
    H, dq, has_kv = _check(qkv, pos, cos, q_out, k_buf, v_buf, slot)
    Hk, dv = (v_buf.shape[0], v_buf.shape[2]) if has_kv else (0, 0)
    _rope_decode_kernel[(H + Hk,)](
        qkv, pos, cos, sin, q_out, k_buf if has_kv else q_out, v_buf if has_kv else q_out, slot if has_kv else pos,
        cos.stride(0), k_buf.stride(0) if has_kv else 0, k_buf.stride(1) if has_kv else 0,
        v_buf.stride(0) if has_kv else 0, v_buf.stride(1) if has_kv else 0,
        H=H, HK=Hk, DQ=dq, DV=dv, HALF=dq // 2, BLOCK_HALF=triton.next_power_of_2(dq // 2),
        BLOCK_DV=triton.next_power_of_2(max(dv, 1)),
    )  # fmt: skip
    return q_out


def rope_decode_ref(
    qkv: torch.Tensor,
    pos: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    q_out: torch.Tensor,
    k_buf: torch.Tensor | None = None,
    v_buf: torch.Tensor | None = None,
    slot: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same contract as rope_decode, in PyTorch ops on the device tensors (no host sync)."""
    H, dq, has_kv = _check(qkv, pos, cos, q_out, k_buf, v_buf, slot)
    half = dq // 2
    c, s = cos.index_select(0, pos.view(1)), sin.index_select(0, pos.view(1))  # (1, dq)

    def rotate(x):  # (heads, dq) fp32
        return x * c + torch.cat([-x[:, half:], x[:, :half]], dim=1) * s

    q_out.copy_(rotate(qkv[: H * dq].float().view(H, dq)))
    if has_kv:
        Hk, dv = v_buf.shape[0], v_buf.shape[2]
        k = rotate(qkv[H * dq : (H + Hk) * dq].float().view(Hk, dq))
        v = qkv[(H + Hk) * dq : (H + Hk) * dq + Hk * dv].view(Hk, dv)
        k_buf.index_copy_(1, slot.view(1), k.unsqueeze(1).to(k_buf.dtype))
        v_buf.index_copy_(1, slot.view(1), v.unsqueeze(1).to(v_buf.dtype))
    return q_out
