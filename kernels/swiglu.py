"""SwiGLU for prefill: silu(gate) * up in fp32, rounded once to the down projection's operand dtype (spec 6.5).

In eager PyTorch this is three passes over (T, intermediate) fp32 tensors (silu, multiply, the cast for the next
matrix product); at 1k tokens that was about 1 ms of a 1.5B prefill. One kernel reads gate and up once and writes
the product in the operand dtype: the same roundings, a third of the bytes. Triton kernel + launcher for CUDA (and
TRITON_INTERPRET=1); swiglu_ref is the twin.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels._triton import tl, triton

BLOCK = 2048  # elements per program


@triton.jit
def _swiglu_kernel(gate_ptr, up_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, (g * tl.sigmoid(g) * u).to(out_ptr.dtype.element_ty), mask=mask)


def swiglu(gate: torch.Tensor, up: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """gate, up: (..., n) contiguous, any float dtype; returns silu(gate) * up in out_dtype (computed in fp32)."""
    assert gate.shape == up.shape and gate.is_contiguous() and up.is_contiguous(), f"{gate.shape} vs {up.shape}"
    out = torch.empty(gate.shape, dtype=out_dtype, device=gate.device)
    _swiglu_kernel[(triton.cdiv(gate.numel(), BLOCK),)](gate, up, out, gate.numel(), BLOCK=BLOCK, num_warps=8)
    return out


def swiglu_ref(gate: torch.Tensor, up: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """Same contract as swiglu."""
    return (F.silu(gate.float()) * up.float()).to(out_dtype)
