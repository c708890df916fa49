"""A decode step's layers as one persistent launch (CUDA C++, Hopper; Hymba-1.5B's shapes).

kernels/persistent_decode.cu holds the kernel and says how it works (PERFORMANCE.md versions 13-19 say why it is
built so). This module lays out what it reads (the chains' small weights repacked once; the products' weights, and
the decode state, used in place), compiles it with NVRTC through torch, and launches it. Its plain twin is the
per-layer path (HymbaLayer.decode: Triton kernels, or their twins); tests/engine/test_persistent.py compares the two
on the GPU. engine/persistent.py decides which layers it takes and hands it their tensors.

The kernel spins on flags written by other blocks, so all its blocks must be resident at once: it takes whole
multiprocessors, one block each, and nothing else may run beside it (the decode step is one stream, so nothing
does). A wait that lasts 200 ms gives up and sets a bit of `err` instead of hanging the GPU.
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

SRC = Path(__file__).with_suffix(".cu")
# the sizes compiled into the kernel, by HymbaConfig's names for them
SHAPES = {
    "hidden_size": 1600,
    "d_inner": 3200,
    "intermediate_size": 5504,
    "num_attention_heads": 25,
    "num_key_value_heads": 5,
    "head_dim": 64,
    "v_head_dim": 128,
    "dt_rank": 100,
    "mamba_d_state": 16,
    "mamba_d_conv": 4,
    "num_memory_tokens": 128,
    "sliding_window": 1024,
}
CLN, NSSM, NKV, GQ, DV = 8, 64, 5, 5, 128  # as in the .cu
MAXL = 32  # layers a launch at most
THREADS = 12 * 32  # 11 consumer warps and the producer warp
SMEM_MAX = 232448  # 227 KB a block on the H100
PARTB = 64 * 16 * 4
XCHB = (2 * CLN * (12 + GQ * DV // CLN) * 4 + 127) // 128 * 128
LAYER_WORDS = 19  # sizeof(Layer) / 8: 17 pointers, then n_in, kv, kv_rows and glob as int32
HEAD = 1024 + PARTB + 2 * SHAPES["intermediate_size"] + XCHB + MAXL * LAYER_WORDS * 8 + 384
XWP, RDTP = 136, 104  # padded x_proj and dt_proj rows


def _compile():
    from torch.cuda._utils import _cuda_load_module, _nvrtc_compile

    ring = (SMEM_MAX - HEAD) // 128 * 128
    opts = ["--std=c++17", f"-DRING_BYTES={ring}", f"-DPARTB={PARTB}", f"-DXCHB={XCHB}", "-DEPS=1e-6f"]
    cubin, name = _nvrtc_compile(SRC.read_text(), "persistent_decode", "90", nvcc_options=opts)
    kernel = _cuda_load_module(cubin, [name])[name]
    kernel.set_shared_memory_config(HEAD + ring)
    return kernel, HEAD + ring


class _LaunchConfig(ctypes.Structure):  # CUlaunchConfig, for cuOccupancyMaxActiveClusters
    _fields_ = [("gx", ctypes.c_uint), ("gy", ctypes.c_uint), ("gz", ctypes.c_uint), ("bx", ctypes.c_uint),
                ("by", ctypes.c_uint), ("bz", ctypes.c_uint), ("smem", ctypes.c_uint), ("stream", ctypes.c_void_p),
                ("attrs", ctypes.c_void_p), ("nattrs", ctypes.c_uint)]  # fmt: skip


def _grid(kernel, smem: int) -> int:
    """As many whole clusters as can be resident at once (15 of 8 on an H100 SXM: 120 blocks)."""
    from torch.cuda._utils import _get_gpu_runtime_library

    cfg = _LaunchConfig(CLN, 1, 1, THREADS, 1, 1, smem, None, None, 0)
    n = ctypes.c_int(0)
    rc = _get_gpu_runtime_library().cuOccupancyMaxActiveClusters(ctypes.byref(n), kernel.func, ctypes.byref(cfg))
    if rc != 0:
        raise RuntimeError(f"cuOccupancyMaxActiveClusters failed ({rc})")
    return n.value * CLN


class LayerTensors(NamedTuple):
    """One layer as the kernel reads it: the model's tensors (bf16 weights, row-major) and the state's, as they are."""

    in_proj: Tensor  # (q | k v if writes_kv | x | z, H)
    out_proj: Tensor  # (H, D)
    gate_proj: Tensor  # (I, H)
    up_proj: Tensor  # (I, H)
    down_proj: Tensor  # (H, I)
    input_norm: Tensor  # (H,) input_layernorm
    mlp_norm: Tensor  # (H,) pre_moe_layernorm
    avg_norms: tuple[Tensor, Tensor]  # (D,) pre_avg_layernorm1 (attention), 2 (SSM)
    x_proj: Tensor  # (dt_rank + 2 N, D)
    dt_proj: Tensor  # (D, dt_rank)
    dt_bias: Tensor  # (D,)
    A: Tensor  # (D, N) fp32: -exp(A_log)
    D: Tensor  # (D,) the skip
    conv_weight: Tensor  # (D, K) fp32
    conv_bias: Tensor  # (D,)
    inner_norms: tuple[Tensor, Tensor, Tensor]  # dt (dt_rank,), B (N,), C (N,)
    conv_state: Tensor  # (D, K-1) fp32, rows K floats apart
    ssm_state: Tensor  # (D, N) fp32
    k: Tensor  # (Hk, rows, dq) the KV producer's buffer: meta + window rows (sliding), meta + max_model_len (global)
    v: Tensor  # (Hk, rows, dv)
    writes_kv: bool  # a KV producer (else it reads its producer's buffer, this step's row included)
    is_global: bool  # global attention: k, v hold meta + max_model_len rows, read in tiles of meta + window


class PersistentDecode:
    """The kernel bound to the layers it runs (layer index -> tensors) and the step's position (a (1,) int64 device
    tensor). Call it once for each run [l0, l1) of consecutive layers, after begin_step(); a run must start with a
    layer that writes K/V and hold at most MAXL layers."""

    def __init__(self, layers: dict[int, LayerTensors], num_layers: int, pos: Tensor):
        self.kernel, self.smem = _compile()
        self.grid = _grid(self.kernel, self.smem)
        if self.grid < NKV * CLN + NSSM:
            raise RuntimeError(f"{self.grid} blocks resident at once: the persistent kernel needs {NKV * CLN + NSSM}")
        self.layers, self.pos, dev = layers, pos, pos.device
        self._keep: list[Tensor] = []  # the repacked tensors, alive as long as the table that points at them
        table = torch.zeros(num_layers, LAYER_WORDS, dtype=torch.int64)
        for i, t in layers.items():
            table[i] = self._words(t, dev)
        self.table = table.to(dev)
        H, D, I = SHAPES["hidden_size"], SHAPES["d_inner"], SHAPES["intermediate_size"]
        # scratch: every word carries its step's and layer's tag, so zeros (tag 0) never match a poll
        self.gen = torch.zeros(1, dtype=torch.int32, device=dev)  # the step's number
        self.hw = torch.zeros(H, dtype=torch.int64, device=dev)
        self.buf0 = torch.zeros(max(t.in_proj.shape[0] for t in layers.values()), dtype=torch.int32, device=dev)
        self.buf2 = torch.zeros(I, dtype=torch.int32, device=dev)
        self.bufm = torch.zeros(2 * D, dtype=torch.int32, device=dev)
        self.xg = torch.zeros(2 * (NSSM // CLN) * 132, dtype=torch.int64, device=dev)
        self.err = torch.zeros(1, dtype=torch.int32, device=dev)  # bits set by a wait that gave up

    def _words(self, t: LayerTensors, dev) -> Tensor:
        """The layer's row of the kernel's Layer table (pointers, then n_in, kv, kv_rows and glob)."""
        bf, f32 = torch.bfloat16, torch.float32
        D, R = t.conv_weight.shape[0], t.dt_proj.shape[1]
        H, N, dq, dv = SHAPES["hidden_size"], SHAPES["mamba_d_state"], SHAPES["head_dim"], SHAPES["v_head_dim"]
        keys = SHAPES["num_memory_tokens"] + SHAPES["sliding_window"]
        products = (t.in_proj, t.out_proj, t.gate_proj, t.up_proj, t.down_proj)
        assert all(w.dtype == bf and w.is_contiguous() for w in products), "product weights: row-major bf16"
        assert t.in_proj.shape == (SHAPES["hidden_size"] + (5 * (dq + dv) if t.writes_kv else 0) + 2 * D, H)
        assert t.conv_state.shape == (D, 3) and t.conv_state.stride() == (4, 1) and t.conv_state.dtype == f32
        assert t.ssm_state.shape == (D, N) and t.ssm_state.is_contiguous() and t.ssm_state.dtype == f32
        rows = t.k.shape[1]
        assert t.k.shape == (NKV, rows, dq) and t.v.shape == (NKV, rows, dv) and t.k.dtype == t.v.dtype == bf
        assert t.is_global or rows == keys, f"a sliding layer's buffer holds {keys} rows, not {rows}"
        assert t.k.is_contiguous() and t.v.is_contiguous()

        def keep(x: Tensor) -> int:
            x = x.contiguous()
            self._keep.append(x)
            return x.data_ptr()

        wxT = torch.zeros(D, XWP, dtype=bf, device=dev)  # a channel's x_proj weights contiguous, 16-byte rows
        wxT[:, : t.x_proj.shape[0]] = t.x_proj.t()
        dtp = torch.zeros(D, RDTP, dtype=bf, device=dev)
        dtp[:, :R] = t.dt_proj
        cpar = torch.zeros(D, 4, dtype=f32, device=dev)
        cpar[:, 0], cpar[:, 1], cpar[:, 2] = t.conv_bias.float(), t.dt_bias.float(), t.D.float()
        words = [*(w.data_ptr() for w in products),
                 keep(torch.cat([t.input_norm, t.mlp_norm]).float()), keep(torch.cat(t.avg_norms).to(bf)),
                 keep(wxT), keep(dtp), keep(t.A.float()), keep(cpar), keep(t.conv_weight.float()),
                 keep(torch.cat(t.inner_norms).float()), t.conv_state.data_ptr(), t.ssm_state.data_ptr(),
                 t.k.data_ptr(), t.v.data_ptr(), t.in_proj.shape[0] | (int(t.writes_kv) << 32),
                 rows | (int(t.is_global) << 32)]  # fmt: skip
        return torch.tensor(words, dtype=torch.int64)

    def begin_step(self) -> None:
        """A new step's number (device work, captured with the step)."""
        self.gen.add_(1)

    def __call__(self, h: Tensor, l0: int, l1: int, slot_s: Tensor, slot_g: Tensor, cos: Tensor, sin: Tensor):
        """Layers [l0, l1) on h ((H,) fp32, updated in place) at position pos. slot_s, slot_g: (1,) int64 views of
        this step's slot in the sliding and in the global layers' buffers; the kernel reads the filled-slot count
        that follows each (the row layout of DecodeState.decode_indices). cos, sin: (positions, dq) fp32 RoPE
        tables."""
        args = self.arguments(h, l0, l1, slot_s, slot_g, cos, sin, self.grid)
        self.kernel(grid=(self.grid, 1, 1), block=(THREADS, 1, 1), args=args, shared_mem=self.smem)

    def arguments(self, h: Tensor, l0: int, l1: int, slot_s: Tensor, slot_g: Tensor, cos: Tensor, sin: Tensor, G: int):
        """The launch's arguments: __call__'s, and G, the blocks that share the products (the launch's own; a test
        names more, as blocks that never run)."""
        assert slot_s.dtype == slot_g.dtype == torch.int64 and 0 < l1 - l0 <= MAXL
        assert all(i in self.layers for i in range(l0, l1))
        return [self.table, l0, l1, h, h, self.hw, self.buf0, self.buf2, self.bufm, self.xg, self.gen, self.pos,
                slot_s, slot_g, cos, sin, self.err, G]  # fmt: skip
