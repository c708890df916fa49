"""A prefill chunk's attention inputs, and the KV buffer update after it (spec 5, 7.1, 8), in two launches per layer.

rope_prefill: RoPE on the chunk's query heads; for a KV-producing layer also the chunk's key/value stash, the keys
    and values that the chunk's queries may see, in position order: the history rows gathered from the layer's KV
    buffer (meta tokens, then the recent positions a sliding window keeps, or all of them for a global layer),
    then the chunk's own keys (rotated) and values. engine/state.py's history_range says which positions.
store_kv: the chunk's keys and values into the layer's KV buffer: meta positions and, for a sliding layer, only the
    last `window` real positions (older ones would be overwritten within the same write); rows from `valid` on
    (a padded chunk's padding) are never written.

Both read their sizes from host ints that are fixed for a chunk's start and length, and `valid` from a 0-d device
tensor, so a CUDA graph captures them once per chunk shape. They replace some thirty small PyTorch ops per layer
(RoPE as elementwise ops, casts, index gathers, concatenations, index copies).

Slot arithmetic (ring_slots; _slot in the kernels): position p < num_meta, or any
position of a global layer, sits at slot p; a sliding layer's later positions sit in a ring, at
num_meta + (p - num_meta) % window.
RoPE is the GPT-NeoX "rotate half" form with fp32 tables, as in decode (kernels/attention.py).
Triton kernels + launchers for CUDA (and TRITON_INTERPRET=1); rope_prefill_ref and store_kv_ref are the twins.
"""

from __future__ import annotations

import torch

from kernels._triton import tl, triton

BLOCK_T = 32  # rows per program; a program owns one head


@triton.jit
def _slot(pos, num_meta, window, IS_SLIDING: tl.constexpr):
    if IS_SLIDING:
        return tl.where(pos < num_meta, pos, num_meta + (pos - num_meta) % window)
    return pos


@triton.jit
def _rotate_rows(
    proj_ptr, col, cos_ptr, sin_ptr, t, mask_t, stride_proj, stride_table,
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr,
):  # fmt: skip
    """One head of rows t of the in_proj output, starting at column `col`, rotated: (lo, hi) halves in fp32."""
    offs = tl.arange(0, BLOCK_HALF)
    mask = mask_t[:, None] & (offs < HALF)[None, :]
    row = proj_ptr + t[:, None] * stride_proj + col + offs[None, :]
    lo = tl.load(row, mask=mask, other=0.0).to(tl.float32)
    hi = tl.load(row + HALF, mask=mask, other=0.0).to(tl.float32)
    table = t[:, None] * stride_table + offs[None, :]
    cos_lo = tl.load(cos_ptr + table, mask=mask, other=0.0)
    cos_hi = tl.load(cos_ptr + table + HALF, mask=mask, other=0.0)
    sin_lo = tl.load(sin_ptr + table, mask=mask, other=0.0)
    sin_hi = tl.load(sin_ptr + table + HALF, mask=mask, other=0.0)
    return lo * cos_lo - hi * sin_lo, hi * cos_hi + lo * sin_hi


@triton.jit
def _rope_prefill_kernel(
    proj_ptr, cos_ptr, sin_ptr, q_ptr, keys_ptr, values_ptr, k_buf_ptr, v_buf_ptr,  # pointers
    T, hist_meta, hist_lo, num_hist, num_meta, window,  # sizes
    stride_proj, stride_table, stride_q_t, stride_q_h, stride_keys_h, stride_keys_s, stride_values_h,
    stride_values_s, stride_kb_h, stride_kb_s, stride_vb_h, stride_vb_s,  # strides, in elements
    H: tl.constexpr, HK: tl.constexpr, DQ: tl.constexpr, DV: tl.constexpr, HALF: tl.constexpr,  # meta
    IS_SLIDING: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_DV: tl.constexpr,
):  # fmt: skip
    """Program (i, p): rows i*BLOCK_T.. of query head p < H, or of the stash of KV head p - H (history rows, then
    the chunk's rows)."""
    i, p = tl.program_id(0), tl.program_id(1)
    rows = i * BLOCK_T + tl.arange(0, BLOCK_T)
    offs = tl.arange(0, BLOCK_HALF)
    mask_half = (offs < HALF)[None, :]
    if p < H:
        mask_t = rows < T
        lo, hi = _rotate_rows(proj_ptr, p * DQ, cos_ptr, sin_ptr, rows, mask_t, stride_proj, stride_table, HALF,
                              BLOCK_HALF)  # fmt: skip
        dst = q_ptr + rows[:, None] * stride_q_t + p * stride_q_h + offs[None, :]
        mask = mask_t[:, None] & mask_half
        tl.store(dst, lo.to(q_ptr.dtype.element_ty), mask=mask)
        tl.store(dst + HALF, hi.to(q_ptr.dtype.element_ty), mask=mask)
    else:
        j = p - H
        in_stash = rows < num_hist + T
        is_new = rows >= num_hist
        t = rows - num_hist  # the chunk's row, for new rows
        pos = tl.where(rows < hist_meta, rows, hist_lo + rows - hist_meta)  # a history row's position
        slot = _slot(pos, num_meta, window, IS_SLIDING)
        mask_hist = (in_stash & ~is_new)[:, None]
        mask_new = in_stash & is_new
        # keys: history rows copied from the buffer, new rows rotated from the in_proj output
        k_src = k_buf_ptr + j * stride_kb_h + slot[:, None] * stride_kb_s + offs[None, :]
        old_lo = tl.load(k_src, mask=mask_hist & mask_half, other=0.0).to(tl.float32)
        old_hi = tl.load(k_src + HALF, mask=mask_hist & mask_half, other=0.0).to(tl.float32)
        lo, hi = _rotate_rows(proj_ptr, H * DQ + j * DQ, cos_ptr, sin_ptr, t, mask_new, stride_proj, stride_table,
                              HALF, BLOCK_HALF)  # fmt: skip
        lo = tl.where(is_new[:, None], lo, old_lo)
        hi = tl.where(is_new[:, None], hi, old_hi)
        k_dst = keys_ptr + j * stride_keys_h + rows[:, None] * stride_keys_s + offs[None, :]
        mask = in_stash[:, None] & mask_half
        tl.store(k_dst, lo.to(keys_ptr.dtype.element_ty), mask=mask)
        tl.store(k_dst + HALF, hi.to(keys_ptr.dtype.element_ty), mask=mask)
        # values: the same rows, no rotation
        offs_v = tl.arange(0, BLOCK_DV)
        mask_dv = (offs_v < DV)[None, :]
        old = tl.load(v_buf_ptr + j * stride_vb_h + slot[:, None] * stride_vb_s + offs_v[None, :],
                      mask=mask_hist & mask_dv, other=0.0)  # fmt: skip
        new = tl.load(proj_ptr + t[:, None] * stride_proj + H * DQ + HK * DQ + j * DV + offs_v[None, :],
                      mask=mask_new[:, None] & mask_dv, other=0.0)  # fmt: skip
        v = tl.where(is_new[:, None], new.to(tl.float32), old.to(tl.float32))
        tl.store(values_ptr + j * stride_values_h + rows[:, None] * stride_values_s + offs_v[None, :],
                 v.to(values_ptr.dtype.element_ty), mask=in_stash[:, None] & mask_dv)  # fmt: skip


@triton.jit
def _store_kv_kernel(
    keys_ptr, values_ptr, k_buf_ptr, v_buf_ptr, valid_ptr,  # pointers
    T, start, num_meta, window,  # sizes
    stride_keys_h, stride_keys_s, stride_values_h, stride_values_s, stride_kb_h, stride_kb_s, stride_vb_h,
    stride_vb_s,  # strides, in elements
    DQ: tl.constexpr, DV: tl.constexpr, IS_SLIDING: tl.constexpr, HAS_VALID: tl.constexpr,  # meta
    BLOCK_T: tl.constexpr, BLOCK_DQ: tl.constexpr, BLOCK_DV: tl.constexpr,
):  # fmt: skip
    i, j = tl.program_id(0), tl.program_id(1)
    t = i * BLOCK_T + tl.arange(0, BLOCK_T)
    valid = T
    if HAS_VALID:
        valid = tl.load(valid_ptr).to(tl.int32)
    pos = start + t
    keep = t < valid
    if IS_SLIDING:  # distinct kept positions land in distinct slots: no two rows race for one
        keep &= (pos < num_meta) | (pos >= start + valid - window)
    slot = _slot(pos, num_meta, window, IS_SLIDING)
    offs_q = tl.arange(0, BLOCK_DQ)
    mask = keep[:, None] & (offs_q < DQ)[None, :]
    k = tl.load(keys_ptr + j * stride_keys_h + t[:, None] * stride_keys_s + offs_q[None, :], mask=mask)
    tl.store(k_buf_ptr + j * stride_kb_h + slot[:, None] * stride_kb_s + offs_q[None, :], k, mask=mask)
    offs_v = tl.arange(0, BLOCK_DV)
    mask = keep[:, None] & (offs_v < DV)[None, :]
    v = tl.load(values_ptr + j * stride_values_h + t[:, None] * stride_values_s + offs_v[None, :], mask=mask)
    tl.store(v_buf_ptr + j * stride_vb_h + slot[:, None] * stride_vb_s + offs_v[None, :], v, mask=mask)


def _check_stash(proj, q_out, keys, values, k_buf, v_buf, num_hist):
    T, H, dq = q_out.shape
    assert proj.shape[0] == T and proj.stride(1) == 1, f"proj {tuple(proj.shape)}: rows of contiguous columns"
    assert q_out.stride(2) == 1
    if keys is None:
        assert proj.shape[1] >= H * dq
        return 0, 0
    Hk, S, dv = values.shape
    assert keys.shape == (Hk, S, dq) and S == num_hist + T, f"keys {tuple(keys.shape)}, {num_hist} history rows"
    assert k_buf.shape[0] == Hk and k_buf.shape[2] == dq and v_buf.shape[0] == Hk and v_buf.shape[2] == dv
    assert keys.stride(2) == 1 and values.stride(2) == 1 and k_buf.stride(2) == 1 and v_buf.stride(2) == 1
    assert proj.shape[1] >= H * dq + Hk * (dq + dv), f"proj {tuple(proj.shape)} too narrow for q, k, v"
    return Hk, dv


def rope_prefill(
    proj: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    q_out: torch.Tensor,
    keys: torch.Tensor | None = None,
    values: torch.Tensor | None = None,
    k_buf: torch.Tensor | None = None,
    v_buf: torch.Tensor | None = None,
    history: tuple[int, int, int] = (0, 0, 0),
    num_meta: int = 0,
    window: int | None = None,
) -> torch.Tensor:
    """A chunk's rotated queries, and for a KV-producing layer its stash (module docstring).

    proj: (T, W) the in_proj output, q | k | v | ... in columns, fp32 (rows may be strided)
    cos, sin: (T, dq) fp32, the tables' rows for the chunk's positions     q_out: (T, H, dq), written in its dtype
    keys: (Hk, S, dq), values: (Hk, S, dv), S = num_hist + T, written     k_buf, v_buf: the layer's KV buffer, read
    history: (hist_meta, hist_lo, num_hist): history rows are positions [0, hist_meta) then [hist_lo, ...)
    returns q_out
    """
    T, H, dq = q_out.shape
    hist_meta, hist_lo, num_hist = history
    Hk, dv = _check_stash(proj, q_out, keys, values, k_buf, v_buf, num_hist)
    if T == 0:
        return q_out
    has_kv = keys is not None
    kv = (keys, values, k_buf, v_buf) if has_kv else (q_out,) * 4
    kv_strides = (keys.stride(0), keys.stride(1), values.stride(0), values.stride(1), k_buf.stride(0),
                  k_buf.stride(1), v_buf.stride(0), v_buf.stride(1)) if has_kv else (0,) * 8  # fmt: skip
    _rope_prefill_kernel[(triton.cdiv(num_hist + T, BLOCK_T), H + Hk)](
        proj, cos, sin, q_out, *kv,
        T, hist_meta, hist_lo, num_hist, num_meta, window or 1,
        proj.stride(0), cos.stride(0), q_out.stride(0), q_out.stride(1), *kv_strides,
        H=H, HK=Hk, DQ=dq, DV=dv, HALF=dq // 2, IS_SLIDING=window is not None, BLOCK_T=BLOCK_T,
        BLOCK_HALF=triton.next_power_of_2(dq // 2), BLOCK_DV=triton.next_power_of_2(max(dv, 1)),
    )  # fmt: skip
    return q_out


def store_kv(
    keys: torch.Tensor,
    values: torch.Tensor,
    k_buf: torch.Tensor,
    v_buf: torch.Tensor,
    start: int,
    num_meta: int,
    window: int | None,
    valid: torch.Tensor | None = None,
) -> None:
    """The chunk's keys (Hk, T, dq) and values (Hk, T, dv), positions start.., into the layer's KV buffer (module
    docstring). valid: None (every row is real) or a 0-d int64 device tensor, the number of real rows."""
    Hk, T, dq = keys.shape
    dv = values.shape[2]
    assert values.shape[:2] == (Hk, T) and keys.stride(2) == 1 and values.stride(2) == 1
    assert valid is None or (valid.dtype == torch.int64 and valid.dim() == 0), "valid: a 0-d int64 tensor"
    assert window is not None or start + T <= k_buf.shape[1], "a global layer's buffer ends before the chunk"
    if T == 0:
        return
    _store_kv_kernel[(triton.cdiv(T, BLOCK_T), Hk)](
        keys, values, k_buf, v_buf, keys if valid is None else valid,
        T, start, num_meta, window or 1,
        keys.stride(0), keys.stride(1), values.stride(0), values.stride(1), k_buf.stride(0), k_buf.stride(1),
        v_buf.stride(0), v_buf.stride(1),
        DQ=dq, DV=dv, IS_SLIDING=window is not None, HAS_VALID=valid is not None, BLOCK_T=BLOCK_T,
        BLOCK_DQ=triton.next_power_of_2(dq), BLOCK_DV=triton.next_power_of_2(dv),
    )  # fmt: skip


# --- twins ---


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (T, heads, dq) fp32; cos, sin: (T, dq) fp32. GPT-NeoX 'rotate half' form."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.unsqueeze(1) + rotated * sin.unsqueeze(1)


def ring_slots(positions: torch.Tensor, num_meta: int, window: int | torch.Tensor | None) -> torch.Tensor:
    """The slot rule of the module docstring in PyTorch ops (the kernels' _slot applies it on the device)."""
    if window is None:
        return positions
    return torch.where(positions < num_meta, positions, num_meta + (positions - num_meta) % window)


def rope_prefill_ref(
    proj, cos, sin, q_out, keys=None, values=None, k_buf=None, v_buf=None, history=(0, 0, 0), num_meta=0, window=None
) -> torch.Tensor:
    """Same contract as rope_prefill, in PyTorch ops."""
    T, H, dq = q_out.shape
    hist_meta, hist_lo, num_hist = history
    Hk, dv = _check_stash(proj, q_out, keys, values, k_buf, v_buf, num_hist)
    proj = proj.float()
    q_out.copy_(apply_rope(proj[:, : H * dq].reshape(T, H, dq), cos, sin))
    if keys is not None:
        device = proj.device
        positions = torch.cat([torch.arange(hist_meta), torch.arange(hist_lo, hist_lo + num_hist - hist_meta)])
        slots = ring_slots(positions.to(device), num_meta, window)
        keys[:, :num_hist] = k_buf[:, slots]
        values[:, :num_hist] = v_buf[:, slots]
        k = apply_rope(proj[:, H * dq : (H + Hk) * dq].reshape(T, Hk, dq), cos, sin)  # post-RoPE keys (Q4)
        keys[:, num_hist:] = k.transpose(0, 1)
        values[:, num_hist:] = proj[:, (H + Hk) * dq : (H + Hk) * dq + Hk * dv].reshape(T, Hk, dv).transpose(0, 1)
    return q_out


def store_kv_ref(keys, values, k_buf, v_buf, start, num_meta, window, valid=None) -> None:
    """Same contract as store_kv, in PyTorch ops."""
    T = keys.shape[1]
    t = torch.arange(T, device=keys.device)
    n = T if valid is None else valid
    keep = t < n
    if window is not None:
        keep &= (start + t < num_meta) | (start + t >= start + n - window)
    slots = ring_slots(start + t[keep], num_meta, window)
    k_buf[:, slots] = keys[:, keep].to(k_buf.dtype)
    v_buf[:, slots] = values[:, keep].to(v_buf.dtype)
