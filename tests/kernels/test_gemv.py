"""kernels/gemv.py: the batch-1 matrix-vector launchers (gemv, norm_gemv, norm_average_gemv, mlp_gemv) against their
twins: two launch shapes (small row blocks, several per program; larger ones over more programs), N and K not
multiples of the tiles, strided weight rows, bias on and off, SwiGLU and relu2, the residual add into a separate
output and in place (out=residual). On the GPU: the real sizes, programs that own dozens of row blocks, and the
decode chain in a CUDA graph with programmatic dependent launch, bit for bit against plain launches.
"""

from __future__ import annotations

import contextlib
import importlib

import pytest
import torch

from kernels.gemv import (
    gemv,
    gemv_ref,
    mlp_gemv,
    mlp_gemv_ref,
    norm_average_gemv,
    norm_average_gemv_ref,
    norm_gemv,
    norm_gemv_ref,
)
from tests.conftest import assert_close, nan_empty

# the interpreter itself warns on loops with run-time bounds (numpy >= 1.25)
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")

EPS = 1e-6
GEMV_MODULE = importlib.import_module("kernels.gemv")  # `kernels.gemv` is the dispatching function


def make_weight(N: int, K: int, dtype: torch.dtype, device, pad: int = 0) -> torch.Tensor:
    """Modest magnitudes (W x stays O(1), far from fp16's range); pad > 0 gives rows strided by K + pad, as a slice
    of a fused weight has."""
    return (0.05 * torch.randn(N, K + pad, device=device)).to(dtype)[:, :K]


def make_vector(n: int, dtype: torch.dtype, device) -> torch.Tensor:
    return torch.randn(n, device=device).to(dtype)


def make_norm_weight(n: int, dtype: torch.dtype, device) -> torch.Tensor:
    return (1 + 0.1 * torch.randn(n, device=device)).to(dtype)


def check_with_residual(name, launcher, twin, args, N, residual_mode, bias, dtype, device) -> None:
    """Runs launcher(*args, bias, residual=..., out=...) against the twin, for residual_mode in
    none (NaN output), separate (residual into a NaN output) and inplace (out is the residual)."""
    if residual_mode == "none":
        out = launcher(*args, bias, out=nan_empty(N, dtype=torch.float32, device=device))
        assert_close(name, out, twin(*args, bias), dtype)
        return
    residual = torch.randn(N, device=device)
    expected = twin(*args, bias, residual=residual.clone())
    if residual_mode == "separate":
        kept = residual.clone()
        out = launcher(*args, bias, residual=residual, out=nan_empty(N, dtype=torch.float32, device=device))
        assert torch.equal(residual, kept), f"{name}: the residual was written"
    else:
        out = launcher(*args, bias, residual=residual, out=residual)
        assert out.data_ptr() == residual.data_ptr(), f"{name}: out is not the residual"
    assert_close(name, out, expected, dtype)


# (N, K, pad): K below one BLOCK_K; K past one BLOCK_K and not a multiple of it, N not a multiple of either row
# tile, rows strided; N and K exact multiples of the tiles (no masked tail)
SHAPES = [(7, 40, 0), (33, 128 + 44, 5), (16, 256, 0)]
# (BLOCK_N, programs per multiprocessor, num_warps): the launch shape is chosen on the host by launch_config(N, K);
# the tests force each of these at small sizes (the interpreter runs programs one by one, so real N costs seconds,
# and counts 2 multiprocessors): 2-row blocks over 2 programs (N = 33: 9 and 8 blocks each, the last one partial),
# 8-row blocks over up to 4 programs. test_default_config_matches_ref runs launch_config's own choice once per
# launcher.
PATHS = [(2, 1, 4), (8, 2, 4)]
DTYPES = [(torch.float32, torch.float32), (torch.float32, torch.float16), (torch.float16, torch.float16)]
DTYPE_IDS = ["x32-w32", "x32-w16", "x16-w16"]


def select_path(path: tuple[int, int, int, int], monkeypatch) -> None:
    monkeypatch.setattr(GEMV_MODULE, "launch_config", lambda N, K, two_weights=False: path)


@pytest.mark.parametrize("N, K, pad", SHAPES, ids=str)
@pytest.mark.parametrize("path", PATHS, ids=str)
@pytest.mark.parametrize("x_dtype, dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("has_bias, residual_mode", [(False, "none"), (True, "none"), (False, "separate"),
                                                     (False, "inplace"), (True, "inplace")], ids=str)  # fmt: skip
def test_gemv_matches_ref(N, K, pad, path, x_dtype, dtype, has_bias, residual_mode, device, seed, monkeypatch):
    select_path(path, monkeypatch)
    x = make_vector(K, x_dtype, device)
    weight = make_weight(N, K, dtype, device, pad)
    bias = make_vector(N, dtype, device) if has_bias else None
    check_with_residual("gemv", gemv, gemv_ref, (x, weight), N, residual_mode, bias, dtype, device)


@pytest.mark.parametrize("N, K, pad", SHAPES, ids=str)
@pytest.mark.parametrize("path", PATHS, ids=str)
@pytest.mark.parametrize("x_dtype, dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("has_bias", [False, True], ids=["nobias", "bias"])
def test_norm_gemv_matches_ref(N, K, pad, path, x_dtype, dtype, has_bias, device, seed, monkeypatch):
    select_path(path, monkeypatch)
    x = 3 * make_vector(K, x_dtype, device)  # the residual stream, not unit RMS
    norm_weight = make_norm_weight(K, dtype, device)
    weight = make_weight(N, K, dtype, device, pad)
    bias = make_vector(N, dtype, device) if has_bias else None
    out = norm_gemv(x, norm_weight, EPS, weight, bias, out=nan_empty(N, dtype=torch.float32, device=device))
    assert_close("norm_gemv", out, norm_gemv_ref(x, norm_weight, EPS, weight, bias), dtype)


@pytest.mark.parametrize("N, K, pad", SHAPES, ids=str)
@pytest.mark.parametrize("path", PATHS, ids=str)
@pytest.mark.parametrize("x_dtype, dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("has_bias, residual_mode", [(True, "none"), (False, "separate"), (False, "inplace"),
                                                     (True, "inplace")], ids=str)  # fmt: skip
def test_norm_average_gemv_matches_ref(
    N, K, pad, path, x_dtype, dtype, has_bias, residual_mode, device, seed, monkeypatch
):
    """a: the attention output (the KV dtype), b: the SSM output (fp32), at different scales."""
    select_path(path, monkeypatch)
    a = make_vector(K, x_dtype, device)
    b = 5 * make_vector(K, torch.float32, device)
    weight_a, weight_b = make_norm_weight(K, dtype, device), make_norm_weight(K, dtype, device)
    weight = make_weight(N, K, dtype, device, pad)
    bias = make_vector(N, dtype, device) if has_bias else None
    args = (a, b, weight_a, weight_b, EPS, weight)
    check_with_residual(
        "norm_average_gemv", norm_average_gemv, norm_average_gemv_ref, args, N, residual_mode, bias, dtype, device
    )


@pytest.mark.parametrize("N, K, pad", SHAPES, ids=str)
@pytest.mark.parametrize("path", PATHS, ids=str)
@pytest.mark.parametrize("x_dtype, dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("gated", [True, False], ids=["swiglu", "relu2"])
def test_mlp_gemv_matches_ref(N, K, pad, path, x_dtype, dtype, gated, device, seed, monkeypatch):
    select_path(path, monkeypatch)
    x = 3 * make_vector(K, x_dtype, device)
    norm_weight = make_norm_weight(K, dtype, device)
    gate = make_weight(N, K, dtype, device, pad) if gated else None
    up = make_weight(N, K, dtype, device)  # contiguous while the gate is strided: each has its own stride
    out = mlp_gemv(x, norm_weight, EPS, gate, up, out=nan_empty(N, dtype=torch.float32, device=device))
    assert_close("mlp_gemv", out, mlp_gemv_ref(x, norm_weight, EPS, gate, up), dtype)


@pytest.mark.parametrize("launcher", ["gemv", "norm_gemv", "norm_average_gemv", "swiglu", "relu2"])
def test_default_config_matches_ref(launcher, device, seed):
    """launch_config's own choice at N = 517 (a partial last row tile); fp16 weights, each launcher with its full
    epilogue."""
    N, K, dtype = 517, 40, torch.float16
    x, b = make_vector(K, torch.float32, device), make_vector(K, torch.float32, device)
    nw, nw2 = make_norm_weight(K, dtype, device), make_norm_weight(K, dtype, device)
    weight, weight2 = make_weight(N, K, dtype, device, 3), make_weight(N, K, dtype, device)
    bias = make_vector(N, dtype, device)
    out = nan_empty(N, dtype=torch.float32, device=device)
    if launcher == "gemv":
        check_with_residual("gemv", gemv, gemv_ref, (x, weight), N, "inplace", bias, dtype, device)
    elif launcher == "norm_average_gemv":
        args = (x, b, nw, nw2, EPS, weight)
        check_with_residual(launcher, norm_average_gemv, norm_average_gemv_ref, args, N, "inplace", bias, dtype,
                            device)  # fmt: skip
    elif launcher == "norm_gemv":
        norm_gemv(x, nw, EPS, weight, bias, out=out)
        assert_close(launcher, out, norm_gemv_ref(x, nw, EPS, weight, bias), dtype)
    else:
        gate = weight2 if launcher == "swiglu" else None
        mlp_gemv(x, nw, EPS, gate, weight, out=out)
        assert_close(launcher, out, mlp_gemv_ref(x, nw, EPS, gate, weight), dtype)


def test_launchers_without_out_allocate_fp32(device, seed):
    """With no `out`, each launcher returns a new (N,) fp32 tensor, whatever the weights' dtype."""
    x, norm_weight = make_vector(40, torch.float16, device), make_norm_weight(40, torch.float16, device)
    weight = make_weight(9, 40, torch.float16, device)
    results = {
        "gemv": (gemv(x, weight), gemv_ref(x, weight)),
        "norm_gemv": (norm_gemv(x, norm_weight, EPS, weight), norm_gemv_ref(x, norm_weight, EPS, weight)),
        "norm_average_gemv": (
            norm_average_gemv(x, x, norm_weight, norm_weight, EPS, weight),
            norm_average_gemv_ref(x, x, norm_weight, norm_weight, EPS, weight),
        ),
        "mlp_gemv": (mlp_gemv(x, norm_weight, EPS, weight, weight), mlp_gemv_ref(x, norm_weight, EPS, weight, weight)),
    }
    for name, (out, expected) in results.items():
        assert out.dtype == torch.float32 and out.shape == (9,), f"{name}: {out.dtype} {tuple(out.shape)}"
        assert_close(name, out, expected, torch.float16)


# --- the 1.5B model's decode matrix-vector products ---

D, D_INNER, INTERMEDIATE, VOCAB = 1600, 3200, 5504, 32001
IN_PROJ_N = 25 * 64 + 5 * (64 + 128) + 2 * D_INNER  # q | k v | x | z = 8960
X_PROJ_N = 100 + 2 * 16  # dt | B | C = 132

REAL_DTYPES = [torch.bfloat16, torch.float32]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", REAL_DTYPES, ids=str)
@pytest.mark.parametrize("N, has_bias", [(IN_PROJ_N, True), (IN_PROJ_N, False), (VOCAB, False)], ids=str)
def test_norm_gemv_matches_ref_at_real_size(N, has_bias, dtype, device, seed):
    """in_proj on the input layernorm; the LM head on the final norm."""
    x = 3 * make_vector(D, torch.float32, device)
    norm_weight = make_norm_weight(D, dtype, device)
    weight = make_weight(N, D, dtype, device)
    bias = make_vector(N, dtype, device) if has_bias else None
    out = norm_gemv(x, norm_weight, EPS, weight, bias, out=nan_empty(N, dtype=torch.float32, device=device))
    assert_close("norm_gemv", out, norm_gemv_ref(x, norm_weight, EPS, weight, bias), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", REAL_DTYPES, ids=str)
@pytest.mark.parametrize("has_bias", [False, True], ids=["nobias", "bias"])
def test_norm_average_gemv_matches_ref_at_real_size(has_bias, dtype, device, seed):
    """out_proj on the average of the two branches, added in place into the residual stream."""
    a, b = make_vector(D_INNER, dtype, device), make_vector(D_INNER, torch.float32, device)
    weight_a, weight_b = make_norm_weight(D_INNER, dtype, device), make_norm_weight(D_INNER, dtype, device)
    weight = make_weight(D, D_INNER, dtype, device)
    bias = make_vector(D, dtype, device) if has_bias else None
    args = (a, b, weight_a, weight_b, EPS, weight)
    check_with_residual("out_proj", norm_average_gemv, norm_average_gemv_ref, args, D, "inplace", bias, dtype, device)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", REAL_DTYPES, ids=str)
@pytest.mark.parametrize("gated", [True, False], ids=["swiglu", "relu2"])
def test_mlp_gemv_matches_ref_at_real_size(gated, dtype, device, seed):
    x = 3 * make_vector(D, torch.float32, device)
    norm_weight = make_norm_weight(D, dtype, device)
    gate = make_weight(INTERMEDIATE, D, dtype, device) if gated else None
    up = make_weight(INTERMEDIATE, D, dtype, device)
    out = mlp_gemv(x, norm_weight, EPS, gate, up, out=nan_empty(INTERMEDIATE, dtype=torch.float32, device=device))
    assert_close("mlp_gemv", out, mlp_gemv_ref(x, norm_weight, EPS, gate, up), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", REAL_DTYPES, ids=str)
@pytest.mark.parametrize("N, K, residual_mode", [(D, INTERMEDIATE, "inplace"), (X_PROJ_N, D_INNER, "none")], ids=str)
def test_gemv_matches_ref_at_real_size(N, K, residual_mode, dtype, device, seed):
    """down_proj added in place into the residual stream; x_proj (the small-N path) on the conv output."""
    x = make_vector(K, torch.float32, device)
    weight = make_weight(N, K, dtype, device)
    check_with_residual("gemv", gemv, gemv_ref, (x, weight), N, residual_mode, None, dtype, device)


# --- a persistent grid, and the overlap with the previous kernel (programmatic dependent launch) ---


def test_launch_facts(device):
    """The interpreter and CPU tensors get no PDL (inline PTX) and two 'multiprocessors'; a compute capability
    >= 9.0 device gets PDL (unless the module turns it off) and its own multiprocessor count."""
    num_sms, use_pdl = GEMV_MODULE.launch_facts(torch.empty(1, device=device))
    if device.type == "cpu":
        assert (num_sms, use_pdl) == (2, False)
    else:
        props = torch.cuda.get_device_properties(device)
        assert num_sms == props.multi_processor_count
        assert use_pdl == (GEMV_MODULE.USE_PDL and (props.major, props.minor) >= (9, 0))


def test_k_past_the_register_row_is_refused(device):
    K = GEMV_MODULE.MAX_K + 1
    with pytest.raises(AssertionError, match="at most"):
        gemv(torch.zeros(K, device=device), torch.zeros(1, K, device=device))


@pytest.mark.gpu
@pytest.mark.parametrize("config", [(1, 1, 4), (2, 4, 4), (4, 8, 8)], ids=str)
def test_programs_with_many_row_blocks_match_ref(config, device, seed, monkeypatch):
    """Programs over many rows (from 1 per multiprocessor, dozens of row blocks each, the next one loading while
    one sums, to 8 per multiprocessor), rows not 16-byte aligned and a partial last block, with PDL as in decode."""
    select_path(config, monkeypatch)
    N, K = 5000 + 3, 1000 + 3
    x, nw = 3 * make_vector(K, torch.float32, device), make_norm_weight(K, torch.bfloat16, device)
    gate, up = make_weight(N, K, torch.bfloat16, device, 7), make_weight(N, K, torch.bfloat16, device)
    out = mlp_gemv(x, nw, EPS, gate, up, out=nan_empty(N, dtype=torch.float32, device=device))
    assert_close("mlp_gemv", out, mlp_gemv_ref(x, nw, EPS, gate, up), torch.bfloat16)


def decode_chain(h, layers, ops, side=None) -> torch.Tensor:
    """The model's decode order of GEMVs over `layers`, h (D,) fp32 updated in place; returns the last layer's MLP
    activation. PyTorch ops (launched without PDL) stand in for conv, SSM, RoPE and attention, x_proj runs on the
    side stream as in HymbaLayer.decode, and out_proj and down_proj add into h in place."""
    norm_gemv_, gemv_, norm_average_gemv_, mlp_gemv_ = ops
    for w in layers:
        proj = norm_gemv_(h, w["norm_in"], EPS, w["in_proj"])  # q | k v | x | z
        if side is not None:
            side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            dbc = gemv_(proj[2560:5760] * 0.5, w["x_proj"])
            y = proj[5760:] * dbc[:1]
        attn = proj[:D_INNER].to(w["out_proj"].dtype)
        if side is not None:
            torch.cuda.current_stream().wait_stream(side)
        norm_average_gemv_(attn, y, w["norm_a"], w["norm_b"], EPS, w["out_proj"], residual=h, out=h)
        act = mlp_gemv_(h, w["norm_mlp"], EPS, w["gate"], w["up"])
        gemv_(act, w["down"], residual=h, out=h)
    return act


@pytest.mark.gpu
def test_decode_chain_in_cuda_graph_with_pdl(device, seed, monkeypatch):
    """Three layers of the 1.5B decode GEMVs captured in one CUDA graph with PDL: every replay equals a graph of
    plain launches bit for bit (same kernels, same sums: a difference is a race on h, which out_proj and down_proj
    rewrite while their predecessors may still run), and both match the twins."""
    dtype = torch.bfloat16
    layers = [
        {"norm_in": make_norm_weight(D, dtype, device), "in_proj": make_weight(IN_PROJ_N, D, dtype, device),
         "x_proj": make_weight(X_PROJ_N, D_INNER, dtype, device), "norm_a": make_norm_weight(D_INNER, dtype, device),
         "norm_b": make_norm_weight(D_INNER, dtype, device), "out_proj": make_weight(D, D_INNER, dtype, device),
         "norm_mlp": make_norm_weight(D, dtype, device), "gate": make_weight(INTERMEDIATE, D, dtype, device),
         "up": make_weight(INTERMEDIATE, D, dtype, device), "down": make_weight(D, INTERMEDIATE, dtype, device)}
        for _ in range(3)
    ]  # fmt: skip
    h0 = 3 * make_vector(D, torch.float32, device)
    h_ref = h0.clone()
    decode_chain(h_ref, layers, (norm_gemv_ref, gemv_ref, norm_average_gemv_ref, mlp_gemv_ref))
    side = torch.cuda.Stream(device)
    results = {}
    for use_pdl in (False, True):
        monkeypatch.setattr(GEMV_MODULE, "USE_PDL", use_pdl)
        h = h0.clone()
        decode_chain(h, layers, (norm_gemv, gemv, norm_average_gemv, mlp_gemv), side)  # compiles
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            h.copy_(h0)
            act = decode_chain(h, layers, (norm_gemv, gemv, norm_average_gemv, mlp_gemv), side)
        replays = []
        for _ in range(10):
            graph.replay()
            replays.append((h.clone(), act.clone()))
        torch.cuda.synchronize()
        results[use_pdl] = replays
    plain_h, plain_act = results[False][0]
    for i, (h, act) in enumerate(results[True] + results[False]):
        assert torch.equal(h, plain_h) and torch.equal(act, plain_act), f"replay {i} differs from the plain graph"
    assert_close("h after 3 layers", plain_h, h_ref, dtype)
