"""kernels/pick.py: the one-launch pick against its twin (sampling's PyTorch pipeline) on the same noise: greedy and
drawn, every filter and penalty alone and together, ties at the top_k / top_p cuts (the lower ids stay), rows whose
race needs many rounds, and the rows that must give -1."""

from __future__ import annotations

import importlib

import pytest
import torch

PICK = importlib.import_module("kernels.pick")

pytestmark = [
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning"),
    # the interpreter computes both arms of a where(), the one not taken too
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
]

V = 300  # with BLOCK 64: 5 chunks, the last one partial


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(PICK, "BLOCK", 64)


def rows(n: int, device) -> dict[str, torch.Tensor]:
    base = 2.5 * torch.randn(n, device=device)
    tie_across = base.clone()
    tie_across[[n - 3, 5, 70]] = 9.0  # the same maximum in different chunks: id 5 wins a greedy pick
    tie_inside = base.clone()
    tie_inside[[41, 40]] = 9.0
    nan = base.clone()
    nan[n // 2] = float("nan")
    pos_inf = base.clone()
    pos_inf[7] = float("inf")
    neg_inf = base.clone()
    neg_inf[: n - 1] = float("-inf")  # only the last id is finite: still valid
    return {
        "random": base,
        "tie across chunks": tie_across,
        "tie inside a chunk": tie_inside,
        "max in the last partial chunk": torch.where(torch.arange(n, device=device) == n - 1, 50.0, base),
        "one finite logit": neg_inf,
        "NaN": nan,
        "+inf": pos_inf,
        "all -inf": torch.full((n,), float("-inf"), device=device),
    }


INVALID = ("NaN", "+inf", "all -inf")
FILTERS = {
    "plain": {},
    "T0.7": {"temperature": 0.7},
    "top_k5": {"top_k": 5},
    "top_k above V": {"top_k": 100_000},
    "top_p0.9": {"top_p": 0.9},
    "top_p0.3 T1.6": {"top_p": 0.3, "temperature": 1.6},
    "min_p0.1": {"min_p": 0.1},
    "top_k40 top_p0.9 min_p0.05": {"top_k": 40, "top_p": 0.9, "min_p": 0.05},
}


def penalties(n: int, device) -> dict:
    counts = torch.randint(0, 3, (n,), dtype=torch.int32, device=device) * (torch.rand(n, device=device) < 0.1)
    return {
        "bias": torch.randn(n, device=device),
        "banned": torch.rand(n, device=device) < 0.05,
        "prompt_mask": torch.rand(n, device=device) < 0.1,
        "counts": counts.to(torch.int32),
        "repetition": 1.3,
        "presence": 0.5,
        "frequency": 0.2,
    }


def same(row: torch.Tensor, noise: torch.Tensor | None, **options) -> tuple[int, int]:
    return int(PICK.pick(row, noise, **options)), int(PICK.pick_ref(row, noise, **options))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_greedy_matches_ref(dtype, device, seed, small_chunks):
    extra = penalties(V, device)
    for name, row in rows(V, device).items():
        row = row.to(dtype)
        got = PICK.pick(row, temperature=0.0)  # greedy requests come with temperature 0: it does not apply
        assert got.shape == () and got.dtype == torch.int64, name
        assert int(got) == int(PICK.pick_ref(row)), name
        got, expected = same(row, None, **extra)
        assert got == expected, f"{name}, penalized"
    assert int(PICK.pick(rows(V, device)["NaN"])) == -1


@pytest.mark.parametrize("filters", FILTERS.values(), ids=FILTERS.keys())
def test_draws_match_ref(filters, device, seed, small_chunks):
    """The same noise gives the same token: 3 draws on each valid row, one on each invalid row (-1)."""
    for name, row in rows(V, device).items():
        for _ in range(1 if name in INVALID else 3):
            noise = torch.empty(V, device=device).exponential_()
            got, expected = same(row, noise, **filters)
            assert got == expected, f"{name}: {got}, expected {expected}"
        if name in INVALID:
            assert got == -1, name


@pytest.mark.parametrize("filters", [{}, {"top_p": 0.8, "temperature": 0.7}, {"top_k": 3, "top_p": 0.5}], ids=str)
def test_penalized_draws_match_ref(filters, device, seed, small_chunks):
    row = rows(V, device)["random"]
    for _ in range(4):
        extra = penalties(V, device)
        noise = torch.empty(V, device=device).exponential_()
        got, expected = same(row, noise, **filters, **extra)
        assert got == expected
        assert not bool(extra["banned"][got])


def test_ties_at_the_cuts_keep_the_lower_ids(device, seed, small_chunks):
    """A flat row: every token ties, so top_k keeps ids 0..k-1 and top_p the fewest lowest ids reaching the mass.
    The race then needs several rounds, each dropping the winner and every later id. The masses are kept off the
    cut (30 / 300 against 0.105, 25 / 50 against 0.51), where rounding would decide."""
    flat = torch.zeros(V, device=device)
    for filters, kept in [({"top_k": 7}, 7), ({"top_p": 0.105}, 32), ({"top_k": 50, "top_p": 0.51}, 26)]:
        for _ in range(3):
            noise = torch.empty(V, device=device).exponential_()
            got, expected = same(flat, noise, **filters)
            assert got == expected and got < kept, (filters, got, expected)


def test_a_tiny_top_p_keeps_the_top_token(device, seed, small_chunks):
    row = rows(V, device)["random"]
    for _ in range(3):
        noise = torch.empty(V, device=device).exponential_()
        assert same(row, noise, top_p=1e-6) == (int(row.argmax()),) * 2


def test_bans_that_leave_nothing_give_minus_one(device, small_chunks):
    row = torch.randn(V, device=device)
    banned = torch.ones(V, dtype=torch.bool, device=device)
    noise = torch.empty(V, device=device).exponential_()
    assert same(row, None, banned=banned) == (-1, -1)
    assert same(row, noise, banned=banned, top_p=0.5) == (-1, -1)
    nan_under_ban = row.clone()
    nan_under_ban[3] = float("nan")
    one_ban = torch.zeros(V, dtype=torch.bool, device=device)
    one_ban[3] = True
    assert same(nan_under_ban, noise, banned=one_ban) == (-1, -1)


@pytest.mark.gpu
@pytest.mark.parametrize("filters", FILTERS.values(), ids=FILTERS.keys())
def test_draws_match_ref_at_the_vocabulary_size(filters, device, seed):
    row = 3 * torch.randn(32001, device=device)
    extra = penalties(32001, device)
    for options in (filters, {**filters, **extra}):
        for _ in range(25):
            noise = torch.empty_like(row).exponential_()
            got, expected = same(row, noise, **options)
            assert got == expected, options.keys()
    for name, row in rows(32001, device).items():
        got, expected = same(row, None)
        assert got == expected, name
