"""DecodeState: buffer layout, ring-slot arithmetic, history and byte counts."""

from __future__ import annotations

import pytest
import torch

from engine.config import HymbaConfig
from engine.state import DecodeState

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
    """Spec section 8: bf16 KV for 3 global + 14 SWA producers, fp32 SSM state and 3-column conv state."""
    config = HymbaConfig.from_dict(HYMBA_1_5B)
    state = DecodeState(config, context, torch.device("meta"), torch.bfloat16)
    kv = sum(t.numel() * t.element_size() for t in [*state.k.values(), *state.v.values()])
    assert kv == expected_kv_bytes
    assert state.nbytes == expected_kv_bytes + 6_553_600 + 1_228_800
    assert sorted(state.k) == [0, 1, 3, 5, 7, 9, 11, 13, 15, 16, 19, 21, 23, 25, 27, 29, 31]


def test_slots_keep_meta_fixed_and_ring_the_rest():
    state = small_state(window=4, num_meta=3)
    positions = torch.arange(12)
    assert state.slots(0, positions).tolist() == list(range(12))  # global: in order
    assert state.slots(1, positions).tolist() == [0, 1, 2, 3, 4, 5, 6, 3, 4, 5, 6, 3]  # SWA: meta + ring of 4


def test_write_keeps_only_the_last_window_of_a_long_chunk():
    state = small_state(window=4, num_meta=3)
    T = 10  # positions 0..9: meta 0..2 and 7 tokens, of which the ring can hold the last 4 (6..9)
    k = torch.arange(T, dtype=torch.float32).view(1, T, 1).expand(1, T, state.k[1].shape[2]).contiguous()
    v = torch.arange(T, dtype=torch.float32).view(1, T, 1).expand(1, T, state.v[1].shape[2]).contiguous()
    state.write_kv(1, 0, k, v)
    stored = state.k[1][0, :, 0].tolist()
    assert stored[:3] == [0, 1, 2]  # meta slots
    assert sorted(stored[3:]) == [6, 7, 8, 9]
    hk, _, positions = state.history(1, T, window=4)  # a prefill query at position 10 sees meta + 6..9
    assert positions.tolist() == [0, 1, 2, 6, 7, 8, 9]
    assert hk[0, :, 0].tolist() == [0, 1, 2, 6, 7, 8, 9]


def test_history_before_the_meta_tokens_end_is_only_meta():
    state = small_state(window=4, num_meta=3)
    assert state.history(1, 2, window=4)[2].tolist() == [0, 1]
    assert state.history(0, 5, window=None)[2].tolist() == [0, 1, 2, 3, 4]


def test_num_valid_caps_at_capacity():
    state = small_state(window=4, num_meta=3, max_model_len=20)
    assert state.num_valid(1, 5) == 5
    assert state.num_valid(1, 50) == 7  # meta + window
    assert state.num_valid(0, 50) == 23  # meta + max_model_len
