"""Batch-1 matrix-vector products for decode, with the ops around them fused in (issue 5).

At batch 1 every decode matmul reads its whole weight once, so its time is bytes / bandwidth, and what surrounds
it (a norm before, an activation or a residual add after) is a separate launch costing more than its bytes. One
kernel does all of it:

    y = epilogue(W @ prologue(x))
    prologue:  x                                              NORM = 0
               rms_norm(x, nw)                                NORM = 1   (input_layernorm, final norm, ...)
               (rms_norm(x, nw) + rms_norm(x2, nw2)) / 2      NORM = 2   (the mixer's two branches, spec 6.2)
    epilogue:  (+ bias)  then  silu(W x) * (W2 x)             ACT = 1    (SwiGLU: W gate, W2 up)
                               relu(W x)^2                    ACT = 2    (relu2)
               (+ residual)

Roundings follow engine/model.py exactly: the prologue is fp32, the operand is rounded once to the weight's
dtype, products accumulate in fp32, the result is fp32.

A program holds the whole prologue output in registers (BLOCK_K >= K: the sums of squares take one load of x, K
floats from L2, recomputed by every program) and walks its row blocks of BLOCK_N rows, a grid's worth of rows
apart. The grid is a few programs per multiprocessor, sized so that programs own the same number of row blocks give
or take one (no last partial wave). While a program sums one row block, the next one's weights are loading: each
keeps a weight tile in flight from its start to its end.

Overlap with the kernel before (CUDA, compute capability >= 9.0): only x, x2 and the residual depend on earlier
kernels, never the weights. Each kernel is launched with programmatic dependent launch; a program issues its first
row block's weight loads, lets the next kernel launch (once every program has done so) and then waits at gdc_wait
for the previous grid to finish with its writes visible. Nothing is read from x or written before that wait (out
may be the residual the previous kernel read). Kernels launched without PDL after one of these wait as usual.
The decode chain's small kernels (kernels/attention.py's decode, causal_conv1d_update, ssm_update) follow the same
rule, with launch_facts deciding PDL: every PDL kernel waits before it reads or writes activations, so each wait
also covers every kernel before the previous one. Before its wait a kernel reads only what no kernel of the same
step writes ahead of it: weights, and (the attention and SSM updates) the step's indices and the KV slots and SSM
state rows earlier steps wrote.
Launchers gemv / norm_gemv / norm_average_gemv / mlp_gemv for CUDA (and TRITON_INTERPRET=1); *_ref twins.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from kernels._triton import tl, triton
from kernels.rms_norm import _normalize_row, rms_norm_average_ref, rms_norm_ref

# Launch shape (BLOCK_N, programs per multiprocessor, num_warps) by weight shape: the fastest on the H100 for each of
# the 1.5B model's decode products (tools/sweep_gemv.py: every shape whose weight tile fits the registers, timed with
# PDL in a CUDA graph with the weights read from HBM). Microseconds there: in_proj 11.6, out_proj 5.8, gate+up 14.4,
# down 8.0, x_proj 1.4, LM head 37.2; the K-stepping kernel before this one took 14.6 / 8.0 / 19.2 / 9.3 / 2.7 /
# 43.0. In the whole decode graph this set gave 579 tokens/s, a set tuned on tools/sweep_gemv.py --tune's chain 574.
CONFIG_TWO_WEIGHTS = (1, 6, 8)  # gate + up: 5504 x 1600 twice
CONFIG_FEW_ROWS = (2, 2, 8)  # x_proj: 132 x 3200; one row block per program
CONFIG_LONG_ROWS = (2, 2, 8)  # down_proj: 1600 x 5504
CONFIG_MEDIUM = (4, 3, 8)  # out_proj: 1600 x 3200
CONFIG_VOCAB = (4, 8, 8)  # the LM head: 32001 x 1600
CONFIG_WIDE = (2, 8, 4)  # in_proj: 8960 x 1600
MAX_K = 16384  # a program holds K operand values and two BLOCK_N x K weight tiles in registers
USE_PDL = True  # where the device has it; off in the sweep's baseline


@functools.cache
def _device_facts(device_index: int) -> tuple[int, bool]:
    """(multiprocessor count, has programmatic dependent launch)."""
    props = torch.cuda.get_device_properties(device_index)
    return props.multi_processor_count, (props.major, props.minor) >= (9, 0)


def launch_facts(x: torch.Tensor) -> tuple[int, bool]:
    """(multiprocessors, launch with PDL) on x's device. The interpreter runs programs one by one and has no PDL:
    two 'multiprocessors' there, so that small test shapes still give programs several row blocks."""
    if not x.is_cuda or triton.knobs.runtime.interpret:
        return 2, False
    num_sms, has_pdl = _device_facts(x.device.index)
    return num_sms, has_pdl and USE_PDL


def launch_config(N: int, K: int, two_weights: bool = False) -> tuple[int, int, int]:
    if two_weights:
        return CONFIG_TWO_WEIGHTS
    if N < 512:
        return CONFIG_FEW_ROWS
    if K >= 4096:
        return CONFIG_LONG_ROWS
    if N < 4096:
        return CONFIG_MEDIUM
    return CONFIG_VOCAB if N >= 16384 else CONFIG_WIDE


def grid_size(N: int, block_n: int, programs_per_sm: int, num_sms: int) -> int:
    """Programs of a launch: each owns the same number of row blocks, give or take one (no partial last wave)."""
    num_blocks = triton.cdiv(N, block_n)
    blocks_per_program = triton.cdiv(num_blocks, num_sms * programs_per_sm)
    return triton.cdiv(num_blocks, blocks_per_program)


@triton.jit
def _load_tile(w_ptr, rows, N, stride_w, offs_k, mask_k):
    mask = (rows < N)[:, None] & mask_k[None, :]
    return tl.load(w_ptr + rows[:, None] * stride_w + offs_k[None, :], mask=mask, other=0.0)


@triton.jit
def _gemv_kernel(
    x_ptr, x2_ptr, nw_ptr, nw2_ptr, w_ptr, w2_ptr, bias_ptr, res_ptr, out_ptr,  # pointers
    N, K, eps, stride_w, stride_w2,  # sizes, strides in elements
    NORM: tl.constexpr, ACT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,  # what to fuse
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,  # tile: BLOCK_N rows of all K (BLOCK_K >= K)
    USE_PDL: tl.constexpr,  # launched with programmatic dependent launch
):  # fmt: skip
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    first_row = tl.program_id(0) * BLOCK_N
    step = tl.num_programs(0) * BLOCK_N  # rows from one of this program's row blocks to its next
    w = _load_tile(w_ptr, first_row + offs_n, N, stride_w, offs_k, mask_k)  # depends on no earlier kernel
    w2 = w
    if ACT == 1:
        w2 = _load_tile(w2_ptr, first_row + offs_n, N, stride_w2, offs_k, mask_k)
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()  # from here on the previous kernel is done and its writes are visible
    if NORM == 0:
        x = tl.load(x_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)
    else:
        x = _normalize_row(x_ptr, nw_ptr, offs_k, mask_k, K, eps)  # the whole row: the prefill norm's own code
    if NORM == 2:
        x = (x + _normalize_row(x2_ptr, nw2_ptr, offs_k, mask_k, K, eps)) * 0.5
    x = x.to(w_ptr.dtype.element_ty).to(tl.float32)[None, :]  # the one rounding to the operand dtype
    for row0 in range(first_row, N, step):
        rows = row0 + offs_n
        mask_n = rows < N
        w_next = _load_tile(w_ptr, rows + step, N, stride_w, offs_k, mask_k)  # in flight while this block sums
        w2_next = w_next
        if ACT == 1:
            w2_next = _load_tile(w2_ptr, rows + step, N, stride_w2, offs_k, mask_k)
        y = tl.sum(w.to(tl.float32) * x, axis=1)
        if HAS_BIAS:
            y += tl.load(bias_ptr + rows, mask=mask_n, other=0.0).to(tl.float32)
        if ACT == 1:
            y = y * tl.sigmoid(y) * tl.sum(w2.to(tl.float32) * x, axis=1)
        if ACT == 2:
            y = tl.maximum(y, 0.0)
            y = y * y
        if HAS_RES:
            y += tl.load(res_ptr + rows, mask=mask_n, other=0.0)
        tl.store(out_ptr + rows, y, mask=mask_n)
        w, w2 = w_next, w2_next


def _launch(
    x, weight, *, x2=None, nw=None, nw2=None, eps=0.0, w2=None, act=0, bias=None, residual=None, out=None, config=None
):
    N, K = weight.shape
    assert x.shape == (K,) and x.is_contiguous(), f"x {tuple(x.shape)} for weight {tuple(weight.shape)}"
    assert weight.stride(1) == 1 and (w2 is None or (w2.shape == weight.shape and w2.stride(1) == 1))
    assert residual is None or (residual.shape == (N,) and residual.dtype == torch.float32)
    out = torch.empty(N, dtype=torch.float32, device=x.device) if out is None else out
    assert out.shape == (N,) and out.dtype == torch.float32 and out.is_contiguous()
    assert K <= MAX_K, f"gemv holds a whole row of K = {K} in registers; at most {MAX_K}"
    block_n, programs_per_sm, num_warps = config or launch_config(N, K, w2 is not None)
    num_sms, use_pdl = launch_facts(x)
    _gemv_kernel[(grid_size(N, block_n, programs_per_sm, num_sms),)](
        x, x if x2 is None else x2, x if nw is None else nw, x if nw2 is None else nw2,
        weight, weight if w2 is None else w2, x if bias is None else bias, x if residual is None else residual, out,
        N, K, eps, weight.stride(0), weight.stride(0) if w2 is None else w2.stride(0),
        NORM=0 if nw is None else (1 if x2 is None else 2), ACT=act, HAS_BIAS=bias is not None,
        HAS_RES=residual is not None, BLOCK_N=block_n, BLOCK_K=triton.next_power_of_2(K), USE_PDL=use_pdl,
        num_warps=num_warps, num_stages=1, launch_pdl=use_pdl,
    )  # fmt: skip
    return out


def gemv(x, weight, bias=None, *, residual=None, out=None, config=None) -> torch.Tensor:
    """weight @ x (+ bias) (+ residual).   x: (K,) any float   weight: (N, K)   bias: (N,)   residual: (N,) fp32
    returns (N,) fp32 (written into `out` if given; out may be `residual`, updated in place).
    config: (BLOCK_N, programs per multiprocessor, num_warps) instead of launch_config's (for sweeps)."""
    return _launch(x, weight, bias=bias, residual=residual, out=out, config=config)


def norm_gemv(x, norm_weight, eps, weight, bias=None, *, out=None, config=None) -> torch.Tensor:
    """weight @ rms_norm(x, norm_weight) (+ bias).   returns (N,) fp32"""
    return _launch(x, weight, nw=norm_weight, eps=eps, bias=bias, out=out, config=config)


def norm_average_gemv(
    a, b, weight_a, weight_b, eps, weight, bias=None, *, residual=None, out=None, config=None
) -> torch.Tensor:
    """weight @ ((rms_norm(a, weight_a) + rms_norm(b, weight_b)) / 2) (+ bias) (+ residual).   returns (N,) fp32"""
    assert b.shape == a.shape and b.is_contiguous()
    return _launch(
        a, weight, x2=b, nw=weight_a, nw2=weight_b, eps=eps, bias=bias, residual=residual, out=out, config=config
    )


def mlp_gemv(x, norm_weight, eps, gate_weight, up_weight, *, out=None, config=None) -> torch.Tensor:
    """The MLP's first half on rms_norm(x): silu(gate @ n) * (up @ n), or relu(up @ n)^2 when gate_weight is None.
    returns (intermediate,) fp32"""
    if gate_weight is None:
        return _launch(x, up_weight, nw=norm_weight, eps=eps, act=2, out=out, config=config)
    return _launch(x, gate_weight, nw=norm_weight, eps=eps, w2=up_weight, act=1, out=out, config=config)


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, residual: torch.Tensor | None = None
) -> torch.Tensor:
    """x @ weight.T (+ bias) (+ residual): operands in the weight's dtype, fp32 accumulation, fp32 result. The matrix
    product of engine/model.py's prefill and of the twins below.
    x: (..., K)   weight: (N, K)   residual: (..., N) fp32   returns (..., N) fp32"""
    x = x.to(weight.dtype)
    rows = x.reshape(-1, x.shape[-1])
    if x.is_cuda and weight.dtype != torch.float32:  # cuBLAS writes the fp32 accumulator without rounding
        if residual is not None and bias is None:  # the add in the product's epilogue: one pass over the rows less
            return torch.addmm(residual.view(rows.shape[0], -1), rows, weight.t(), out_dtype=torch.float32).view(
                *x.shape[:-1], -1
            )
        y = torch.mm(rows, weight.t(), out_dtype=torch.float32).view(*x.shape[:-1], -1)
    else:
        y = F.linear(x, weight).float()  # CPU torch has no bf16-in / fp32-out product: the output is rounded
    y = y if bias is None else y + bias.float()
    return y if residual is None else y + residual


# --- twins: the same contracts, composed from the ops engine/model.py's prefill uses ---


def _finish(y, residual, out):
    if residual is not None:
        y = y + residual
    return y if out is None else out.copy_(y)


def gemv_ref(x, weight, bias=None, *, residual=None, out=None) -> torch.Tensor:
    return _finish(linear(x.float(), weight, bias), residual, out)


def norm_gemv_ref(x, norm_weight, eps, weight, bias=None, *, out=None) -> torch.Tensor:
    return _finish(linear(rms_norm_ref(x, norm_weight, eps), weight, bias), None, out)


def norm_average_gemv_ref(a, b, weight_a, weight_b, eps, weight, bias=None, *, residual=None, out=None):
    mixed = rms_norm_average_ref(a, b, weight_a, weight_b, eps)
    return _finish(linear(mixed, weight, bias), residual, out)


def mlp_gemv_ref(x, norm_weight, eps, gate_weight, up_weight, *, out=None) -> torch.Tensor:
    n = rms_norm_ref(x, norm_weight, eps)
    if gate_weight is None:
        y = F.relu(linear(n, up_weight)).square()
    else:
        y = F.silu(linear(n, gate_weight)) * linear(n, up_weight)
    return _finish(y, None, out)
