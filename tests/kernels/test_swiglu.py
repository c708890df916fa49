"""kernels/swiglu.py: the prefill SwiGLU against its twin, including sizes that are not block multiples."""

from __future__ import annotations

import pytest
import torch

from kernels.swiglu import BLOCK, swiglu, swiglu_ref
from tests.conftest import assert_close


@pytest.mark.parametrize("shape", [(1, 7), (3, BLOCK + 5), (5, 640)], ids=str)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16], ids=str)
def test_swiglu_matches_ref(shape, out_dtype, device, seed):
    gate, up = 3 * torch.randn(2, *shape, device=device)
    assert_close("swiglu", swiglu(gate, up, out_dtype), swiglu_ref(gate, up, out_dtype), out_dtype)


@pytest.mark.gpu
def test_swiglu_matches_ref_at_real_size(device, seed):
    gate, up = 3 * torch.randn(2, 2048, 5504, device=device)
    out = swiglu(gate, up, torch.bfloat16)
    assert out.dtype == torch.bfloat16
    assert_close("swiglu", out, swiglu_ref(gate, up, torch.bfloat16), torch.bfloat16)
