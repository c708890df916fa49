"""DecodeState: buffer layout, ring-slot arithmetic, history and byte counts."""

from __future__ import annotations

import pytest
import torch

from engine.config import HymbaConfig
from engine.state import DecodeState
from kernels.prefill_kv import ring_slots

HYMBA_1_5B = {
    "vocab_size": 32001, "hidden_size": 1600, "intermediate_size": 5504, "num_hidden_layers": 32,
    "num_attention_heads": 25, "num_key_value_heads": 5, "num_memory_tokens": 128, "sliding_window": 1024,
    "global_attn_idx": [0, 15, 31],
    "kv_reuse_group": [[1, 2], [3, 4], [5, 6], [7, 8], [9, 10], [11, 12], [13, 14], [16, 17, 18], [19, 20],
                       [21, 22], [23, 24], [25, 26], [27, 28], [29, 30]],
    "mamba_d_state": 16, "mamba_d_conv": 4, "mamba_expand": 2, "mamba_dt_rank": "auto", "rope": True,
    "rope_type": "ntk", "max_position_embeddings": 8192, "orig_max_position_embeddings": 2048,
}  # fmt: skip


def small_state(window: int = 4, num_meta: int = 3, max_model_len: int = 20) -> DecodeState:
    config = HymbaConfig.from_dict({
        "vocab_size": 16, "hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 3,
        "num_attention_heads": 2, "num_key_value_heads": 1, "num_memory_tokens": num_meta,
        "sliding_window": window, "global_attn_idx": [0], "kv_reuse_group": [[1, 2]], "mamba_d_state": 2,
        "mamba_d_conv": 4, "mamba_expand": 2, "rope": True, "max_position_embeddings": 64,
    })  # fmt: skip
    return DecodeState(config, max_model_len, torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("context, expected_kv_bytes", [(1024, 37_601_280), (8192, 78_888_960)])
def test_1_5b_state_bytes_match_the_spec_table(context, expected_kv_bytes):
    """Spec section 8: bf16 KV for 3 global + 14 SWA producers, fp32 SSM state and 3-column conv state, stored with a
    fourth column of padding (409,600 bytes: kernels/persistent_decode.cu copies 16-byte rows)."""
    config = HymbaConfig.from_dict(HYMBA_1_5B)
    state = DecodeState(config, context, torch.device("meta"), torch.bfloat16)
    kv = sum(t.numel() * t.element_size() for t in [*state.k.values(), *state.v.values()])
    assert kv == expected_kv_bytes
    assert state.nbytes == expected_kv_bytes + 6_553_600 + 1_228_800 + 409_600
    assert sorted(state.k) == [0, 1, 3, 5, 7, 9, 11, 13, 15, 16, 19, 21, 23, 25, 27, 29, 31]


def test_slots_keep_meta_fixed_and_ring_the_rest():
    state = small_state(window=4, num_meta=3)
    positions = torch.arange(12)
    slots = [ring_slots(positions, state.num_meta, state.window[i]) for i in (0, 1)]
    assert slots[0].tolist() == list(range(12))  # global: in order
    assert slots[1].tolist() == [0, 1, 2, 3, 4, 5, 6, 3, 4, 5, 6, 3]  # SWA: meta + ring of 4


def test_history_range_is_meta_then_the_window_or_everything():
    state = small_state(window=4, num_meta=3)
    assert state.history_range(1, 10) == (3, 6, 7)  # a chunk at position 10 sees meta 0..2 and 6..9
    assert state.history_range(1, 5) == (3, 3, 5)  # 3..4: fewer than a window so far
    assert state.history_range(0, 10) == (3, 3, 10)  # global: every position
    assert state.history_range(1, 2) == (2, 2, 2)  # inside the meta tokens' own prefill
    assert state.history_range(0, 0) == (0, 0, 0)


def test_num_valid_caps_at_capacity():
    state = small_state(window=4, num_meta=3, max_model_len=20)
    assert state.num_valid(1, 5) == 5
    assert state.num_valid(1, 50) == 7  # meta + window
    assert state.num_valid(0, 50) == 23  # meta + max_model_len
