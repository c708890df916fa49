"""kernels/pick.py: the one-launch greedy pick and exponential race against their twins (sampling.sample's torch
ops): ties inside a chunk and across chunks (the lowest id wins), the rows that must give -1, and races at several
temperatures on the same noise."""

from __future__ import annotations

import importlib

import pytest
import torch

PICK = importlib.import_module("kernels.pick")

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
    monkeypatch.setattr(PICK, "BLOCK", 64)  # 5 chunks over 300 ids, the last one partial
    for name, row in rows(300, device).items():
        row = row.to(dtype)
        got, expected = PICK.greedy_pick(row), PICK.greedy_pick_ref(row)
        assert got.shape == () and got.dtype == torch.int64, name
        assert int(got) == int(expected), f"{name}: {int(got)}, expected {int(expected)}"
    assert int(PICK.greedy_pick(rows(300, device)["NaN"])) == -1


@pytest.mark.gpu
def test_greedy_pick_matches_ref_at_the_vocabulary_size(device, seed):
    for name, row in rows(32001, device).items():
        assert int(PICK.greedy_pick(row)) == int(PICK.greedy_pick_ref(row)), name


INVALID = ("NaN", "+inf", "all -inf")


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.6], ids=str)
def test_race_pick_matches_ref(temperature, device, seed, monkeypatch):
    """The same noise gives the same draw; each row is drawn 20 times (the kernel skips softmax's division by the
    sum, so only a tie to within rounding could part them: not with random rows)."""
    monkeypatch.setattr(PICK, "BLOCK", 64)
    for name, row in rows(300, device).items():
        for _ in range(20 if name not in INVALID else 1):
            noise = torch.empty(300, device=device).exponential_()
            got, expected = PICK.race_pick(row, noise, temperature), PICK.race_pick_ref(row, noise, temperature)
            assert int(got) == int(expected), f"{name}: {int(got)}, expected {int(expected)}"
        if name in INVALID:
            assert int(got) == -1, name


@pytest.mark.gpu
def test_race_pick_matches_ref_at_the_vocabulary_size(device, seed):
    row = 3 * torch.randn(32001, device=device)
    for temperature in (1.0, 0.5):
        for _ in range(50):
            noise = torch.empty_like(row).exponential_()
            assert int(PICK.race_pick(row, noise, temperature)) == int(PICK.race_pick_ref(row, noise, temperature))
