"""kernels/step_inputs.py: the decode step's embedding row and index rows against the twin, and the twin against
engine/state.py's slot rule (kernels/prefill_kv.py ring_slots) and count, at positions around the meta tokens and
a ring's wrap; tokens outside the vocabulary are clamped."""

from __future__ import annotations

import pytest
import torch

from kernels.prefill_kv import ring_slots
from kernels.step_inputs import step_inputs, step_inputs_ref

M = 4  # meta tokens
GROUPS = [(5, M + 5), (0, M + 40)]  # a sliding window of 5, and a global buffer of 40 positions


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_step_inputs_match_ref_and_the_slot_rule(dtype, device, seed):
    V, D = 11, 24
    embed = torch.randn(V, D, device=device).to(dtype)
    groups = torch.tensor(GROUPS, dtype=torch.int64, device=device)
    for token in (0, 7, V - 1, -1, V + 3):
        for p in (0, M - 1, M, M + 4, M + 5, M + 13, M + 39):
            t, pos = torch.tensor([token], device=device), torch.tensor([p], device=device)
            h, idx = step_inputs(t, embed, pos, groups, M)
            h_ref, idx_ref = step_inputs_ref(t, embed, pos, groups, M)
            assert torch.equal(h, h_ref) and h.dtype == torch.float32, (token, p)
            assert torch.equal(idx, idx_ref), (token, p, idx.tolist(), idx_ref.tolist())
            for g, (window, capacity) in enumerate(GROUPS):
                slot = ring_slots(pos, M, window or None)
                assert idx_ref[g].tolist() == [int(slot), min(p + 1, capacity)], (g, p)
            assert torch.equal(h_ref, embed[min(max(token, 0), V - 1)].float())
