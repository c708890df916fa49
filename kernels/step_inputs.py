"""A decode step's inputs from its token and position, in one launch: the token's embedding row (fp32, the residual
stream's start) and, for each group of KV buffers of one shape, the slot this step writes and the count of filled
slots (engine/state.py: kernels/prefill_kv.py's ring_slots rule, and the capacity bound).

Why a kernel: as PyTorch ops these were twelve launches of one element or one row each (the clamp, the gather, the
cast, and per group the ring arithmetic and the count), about 14 µs of a captured decode step on the H100.
Triton kernel + launcher step_inputs for CUDA (and TRITON_INTERPRET=1); step_inputs_ref is the twin.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels._triton import tl, triton
from kernels.prefill_kv import _slot, ring_slots


@triton.jit
def _step_inputs_kernel(
    token_ptr, embed_ptr, pos_ptr, groups_ptr, h_ptr, idx_ptr,  # pointers
    V, D, stride_embed, num_meta, G,  # sizes
    BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr,
):  # fmt: skip
    token = tl.minimum(tl.maximum(tl.load(token_ptr), 0), V - 1)  # the sampler's -1 stays in range (model.py)
    offs = tl.arange(0, BLOCK_D)
    row = tl.load(embed_ptr + token * stride_embed + offs, mask=offs < D, other=0.0)
    tl.store(h_ptr + offs, row.to(tl.float32), mask=offs < D)

    offs_g = tl.arange(0, BLOCK_G)
    pos = tl.load(pos_ptr) + tl.zeros((BLOCK_G,), dtype=tl.int64)  # one per group, the shape _slot returns
    mask_g = offs_g < G
    window = tl.load(groups_ptr + 2 * offs_g, mask=mask_g, other=1)  # 0: a global layer's buffer
    capacity = tl.load(groups_ptr + 2 * offs_g + 1, mask=mask_g, other=1)
    slot = tl.where(window == 0, pos, _slot(pos, num_meta, tl.maximum(window, 1), True))
    tl.store(idx_ptr + 2 * offs_g, slot, mask=mask_g)
    tl.store(idx_ptr + 2 * offs_g + 1, tl.minimum(pos + 1, capacity), mask=mask_g)


def step_inputs(
    token: torch.Tensor, embed_weight: torch.Tensor, pos: torch.Tensor, groups: torch.Tensor, num_meta: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """token, pos: one int64 each on the device (a token past the vocabulary, as the sampler's -1, is clamped).
    embed_weight: (V, D)   groups: (G, 2) int64 rows (window, capacity), window 0 for a global buffer.
    Returns h: (D,) fp32 and idx: (G, 2) int64 rows (slot, filled slots once this position is written).
    The slot rule is prefill_kv's (_slot on the device, ring_slots in the twin), per group: window 0 keeps order."""
    V, D = embed_weight.shape
    G = groups.shape[0]
    assert token.numel() == 1 and pos.numel() == 1 and token.dtype == pos.dtype == torch.int64, "int64 scalars"
    assert embed_weight.stride(1) == 1 and groups.shape == (G, 2) and groups.is_contiguous(), f"groups {groups.shape}"
    h = torch.empty(D, dtype=torch.float32, device=embed_weight.device)
    idx = torch.empty(G, 2, dtype=torch.int64, device=embed_weight.device)
    _step_inputs_kernel[(1,)](
        token, embed_weight, pos, groups, h, idx, V, D, embed_weight.stride(0), num_meta, G,
        BLOCK_D=triton.next_power_of_2(D), BLOCK_G=triton.next_power_of_2(max(G, 1)),
    )  # fmt: skip
    return h, idx


def step_inputs_ref(
    token: torch.Tensor, embed_weight: torch.Tensor, pos: torch.Tensor, groups: torch.Tensor, num_meta: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract, in PyTorch ops."""
    ids = token.view(1).clamp(0, embed_weight.shape[0] - 1)
    h = F.embedding(ids, embed_weight)[0].float()
    pos = pos.view(1)
    window, capacity = groups[:, 0], groups[:, 1]
    slot = torch.where(window == 0, pos, ring_slots(pos, num_meta, window.clamp_min(1)))
    return h, torch.stack([slot, torch.minimum(pos + 1, capacity)], dim=1)
