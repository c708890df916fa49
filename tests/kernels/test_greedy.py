"""kernels/greedy.py: the one-launch greedy pick against its twin (torch.argmax under sampling.sample's validity
rule): ties inside a chunk and across chunks (the lowest id wins), and the rows that must give -1."""

from __future__ import annotations

import importlib

import pytest
import torch

GREEDY = importlib.import_module("kernels.greedy")

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")


def rows(V: int, device) -> dict[str, torch.Tensor]:
    base = torch.randn(V, device=device)
    tie_across = base.clone()
    tie_across[[V - 3, 5, 70]] = 9.0  # the same maximum in different chunks: id 5 wins
    tie_inside = base.clone()
    tie_inside[[41, 40]] = 9.0
    nan = base.clone()
    nan[V // 2] = float("nan")
    pos_inf = base.clone()
    pos_inf[7] = float("inf")
    neg_inf = base.clone()
    neg_inf[: V - 1] = float("-inf")  # only the last id is finite: still valid
    return {
        "random": base,
        "tie across chunks": tie_across,
        "tie inside a chunk": tie_inside,
        "max in the last partial chunk": torch.where(torch.arange(V, device=device) == V - 1, 50.0, base),
        "one finite logit": neg_inf,
        "NaN": nan,
        "+inf": pos_inf,
        "all -inf": torch.full((V,), float("-inf"), device=device),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_greedy_pick_matches_ref(dtype, device, seed, monkeypatch):
    monkeypatch.setattr(GREEDY, "BLOCK", 64)  # 5 chunks over 300 ids, the last one partial
    for name, row in rows(300, device).items():
        row = row.to(dtype)
        got, expected = GREEDY.greedy_pick(row), GREEDY.greedy_pick_ref(row)
        assert got.shape == () and got.dtype == torch.int64, name
        assert int(got) == int(expected), f"{name}: {int(got)}, expected {int(expected)}"
    assert int(GREEDY.greedy_pick(rows(300, device)["NaN"])) == -1


@pytest.mark.gpu
def test_greedy_pick_matches_ref_at_the_vocabulary_size(device, seed):
    for name, row in rows(32001, device).items():
        assert int(GREEDY.greedy_pick(row)) == int(GREEDY.greedy_pick_ref(row)), name
