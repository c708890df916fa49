"""kernels/causal_conv1d.py: prefill and one-token update against their twins (outputs and the in-place conv state),
prefill against repeated updates, and chunked prefill against one call."""

from __future__ import annotations

import pytest
import torch

from kernels.causal_conv1d import causal_conv1d, causal_conv1d_ref, causal_conv1d_update, causal_conv1d_update_ref
from tests.conftest import assert_close, nan_empty


def make_conv_inputs(T: int, d: int, K: int, dtype: torch.dtype, device, has_bias: bool = True):
    """x as the model hands it over: a column slice of in_proj's output, so its rows are strided."""
    x = torch.randn(T, 3 * d, device=device, dtype=dtype)[:, d : 2 * d]
    weight = torch.randn(d, K, device=device) / K
    bias = torch.randn(d, device=device) if has_bias else None
    return x, weight, bias, torch.randn(d, K - 1, device=device)


# T = 1, 2: shorter than K-1, so the new state keeps columns of the old one; 37, 130: not block multiples
@pytest.mark.parametrize("T, d, K", [(1, 20, 4), (2, 20, 4), (37, 20, 4), (37, 130, 3), (5, 9, 2)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_causal_conv1d_matches_ref(T, d, K, dtype, device, seed):
    x, weight, bias, state = make_conv_inputs(T, d, K, dtype, device)
    ref_state = state.clone()
    out = causal_conv1d(x, weight, bias, state, out=nan_empty(T, d, dtype=dtype, device=device))
    assert_close("out", out, causal_conv1d_ref(x, weight, bias, ref_state), dtype)
    assert_close("conv_state", state, ref_state, torch.float32)


@pytest.mark.parametrize("d, K, has_bias", [(20, 4, True), (300, 3, False)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_causal_conv1d_update_matches_ref(d, K, has_bias, dtype, device, seed):
    x, weight, bias, state = make_conv_inputs(1, d, K, dtype, device, has_bias)
    ref_state = state.clone()
    out = causal_conv1d_update(x[0], weight, bias, state, out=nan_empty(d, dtype=dtype, device=device))
    assert_close("out", out, causal_conv1d_update_ref(x[0], weight, bias, ref_state), dtype)
    assert_close("conv_state", state, ref_state, torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("T", [2048, 1000, 2])
def test_causal_conv1d_matches_ref_at_real_size(T, device, seed):
    x, weight, bias, state = make_conv_inputs(T, 3200, 4, torch.bfloat16, device)
    ref_state = state.clone()
    out = causal_conv1d(x, weight, bias, state, out=nan_empty(T, 3200, dtype=torch.bfloat16, device=device))
    assert_close("out", out, causal_conv1d_ref(x, weight, bias, ref_state), torch.bfloat16)
    assert_close("conv_state", state, ref_state, torch.float32)
    ref_state = state.clone()
    out = causal_conv1d_update(x[0], weight, bias, state)
    assert_close("update out", out, causal_conv1d_update_ref(x[0], weight, bias, ref_state), torch.bfloat16)
    assert_close("update conv_state", state, ref_state, torch.float32)


def test_prefill_equals_repeated_updates(device, seed):
    T, d, K = 9, 20, 4
    x, weight, bias, state = make_conv_inputs(T, d, K, torch.float32, device)
    step_state = state.clone()
    out = causal_conv1d(x, weight, bias, state)
    steps = torch.stack([causal_conv1d_update(x[t], weight, bias, step_state) for t in range(T)])
    assert_close("out", out, steps, torch.float32)
    assert_close("conv_state", state, step_state, torch.float32)


def test_chunked_prefill_equals_one_call(device, seed):
    """Chunks of 1, 2 and 6 tokens (two of them shorter than K-1) continue exactly where the last one stopped."""
    T, d, K = 9, 20, 4
    x, weight, bias, state = make_conv_inputs(T, d, K, torch.float32, device)
    chunk_state = state.clone()
    out = causal_conv1d(x, weight, bias, state)
    chunks = [causal_conv1d(x[t0:t1], weight, bias, chunk_state) for t0, t1 in ((0, 1), (1, 3), (3, 9))]
    assert_close("out", torch.cat(chunks), out, torch.float32)
    assert_close("conv_state", chunk_state, state, torch.float32)


@pytest.mark.parametrize("n", [1, 2, 7, 9])
@pytest.mark.parametrize("conv", [causal_conv1d, causal_conv1d_ref], ids=lambda f: f.__name__)
def test_a_padded_chunk_leaves_the_state_of_its_real_rows(conv, n, device, seed):
    """valid = n (a device tensor, as a CUDA graph's padded prompt has it): the state and the first n outputs are
    those of the unpadded call on x[:n], whatever the padding rows hold. n = 1, 2 are shorter than K-1."""
    T, d, K = 9, 20, 4
    x, weight, bias, state = make_conv_inputs(T, d, K, torch.float32, device)
    want_state = state.clone()
    want = causal_conv1d_ref(x[:n], weight, bias, want_state)
    x[n:] = 1e4  # padding must not reach the state
    out = conv(x, weight, bias, state, valid=torch.tensor(n, device=device))
    assert_close("out", out[:n], want, torch.float32)
    assert_close("conv_state", state, want_state, torch.float32)
