"""A decode step's runs of sliding-window layers, each as one persistent launch (CUDA C++, Hopper; Hymba-1.5B's shapes).

kernels/persistent_decode.cu holds the kernel and says how it works (PERFORMANCE.md versions 13-19 say why it is
built so). This module decides whether a model and its decode state fit it (`unsupported`), lays out what it reads
(the chains' weights repacked once at load; the products' weights, the norms' and the state used in place), compiles
it with NVRTC through torch and launches it. Its plain twin is the Triton path, HymbaLayer.decode layer by layer;
tests/engine/test_persistent.py compares the two on the GPU.

What it does not cover runs on the Triton path: the three global layers (their keys grow with the context), and any
model or state of other shapes. The kernel spins on flags written by other blocks, so all its blocks must be resident
at once: it takes whole multiprocessors, one block each, and nothing else may run beside it (the decode step is one
stream, so nothing does). A wait that lasts 200 ms gives up and sets a bit of `err` instead of hanging the GPU.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from engine.config import HymbaConfig
from engine.state import DecodeState

SRC = Path(__file__).with_suffix(".cu")
# the shapes compiled into the kernel (config attribute -> value)
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
LAYER_WORDS = 18  # sizeof(Layer) / 8: 17 pointers, then n_in and kv as two int32
HEAD = 1024 + PARTB + 2 * SHAPES["intermediate_size"] + XCHB + MAXL * LAYER_WORDS * 8 + 384
XWP, RDTP = 136, 104  # padded x_proj and dt_proj rows


def unsupported(model, state: DecodeState) -> str | None:
    """Why the persistent kernel cannot run this model on this state, or None when it can."""
    c: HymbaConfig = model.config
    device = state.pos.device
    if device.type != "cuda" or torch.cuda.get_device_capability(device) != (9, 0):
        return "needs a Hopper GPU (sm_90)"
    for name, value in SHAPES.items():
        if getattr(c, name) != value:
            return f"built for Hymba-1.5B's shapes: {name} is {getattr(c, name)}, not {value}"
    if model.model.embed_tokens.weight.dtype != torch.bfloat16:
        return "built for bf16 weights"
    if c.mlp_hidden_act != "silu" or c.mamba_proj_bias or not c.mamba_conv_bias or not c.mamba_inner_layernorms:
        return "built for a SwiGLU MLP, no projection biases, a conv bias and the SSM's inner norms"
    if not c.rope:
        return "built for RoPE"
    sliding = [i for i, w in state.window.items() if w is not None]
    if any(state.k[i].shape[1] != c.num_memory_tokens + c.sliding_window for i in sliding):
        return "a context shorter than the sliding window (the buffers are smaller than the kernel's)"
    if state.conv.stride(1) != c.mamba_d_conv:
        return "the conv state is not padded to d_conv columns"
    return None


def segments(config: HymbaConfig) -> list[tuple[int, int]]:
    """The runs [l0, l1) of consecutive sliding layers that the kernel takes, each starting at a KV producer (a
    consumer's K/V row of this step comes from its producer earlier in the same launch)."""
    runs, l0 = [], None
    for i in range(config.num_hidden_layers + 1):
        sliding = i < config.num_hidden_layers and not config.is_global[i]
        if sliding and l0 is None and config.kv_producer[i] == i:
            l0 = i
        elif not sliding and l0 is not None:
            runs.extend((a, min(a + MAXL, i)) for a in range(l0, i, MAXL))
            l0 = None
    return runs


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


class PersistentDecode:
    """The kernel bound to one model and one DecodeState: call it for each run of `segments` in a decode step."""

    def __init__(self, model, state: DecodeState):
        reason = unsupported(model, state)
        assert reason is None, reason
        c = model.config
        self.state, self.segments = state, segments(c)
        self.kernel, self.smem = _compile()
        self.grid = _grid(self.kernel, self.smem)
        if self.grid < NKV * CLN + NSSM:
            raise RuntimeError(f"{self.grid} blocks resident: the kernel needs {NKV * CLN + NSSM}")
        dev, bf = state.pos.device, torch.bfloat16
        L, D, H = c.num_hidden_layers, c.d_inner, c.hidden_size
        self._keep = []  # the repacked tensors, alive as long as the table that points at them
        table = torch.zeros(L, LAYER_WORDS, dtype=torch.int64)
        for l0, l1 in self.segments:
            for i in range(l0, l1):
                table[i] = self._layer_words(model.model.layers[i], state, i, dev, bf)
        self.table = table.to(dev)
        # scratch: every word carries its step's and layer's tag, so zeros (tag 0) never match a poll
        self.gen = torch.zeros(1, dtype=torch.int32, device=dev)  # the step's number
        self.hw = torch.zeros(H, dtype=torch.int64, device=dev)
        width = max(c.in_proj_width(i) for l0, l1 in self.segments for i in range(l0, l1))
        self.buf0 = torch.zeros(width, dtype=torch.int32, device=dev)
        self.buf2 = torch.zeros(c.intermediate_size, dtype=torch.int32, device=dev)
        self.bufm = torch.zeros(2 * D, dtype=torch.int32, device=dev)
        self.xg = torch.zeros(2 * (NSSM // CLN) * 132, dtype=torch.int64, device=dev)
        self.err = torch.zeros(1, dtype=torch.int32, device=dev)  # bits set by a wait that gave up

    def _layer_words(self, layer, state: DecodeState, i: int, dev, bf) -> torch.Tensor:
        m, mlp = layer.mamba, layer.moe.experts[0]
        D, R = m.conv_weight.shape[0], m.dt_proj[0].weight.shape[1]

        def keep(t: torch.Tensor) -> int:
            t = t.contiguous()
            self._keep.append(t)
            return t.data_ptr()

        wxT = torch.zeros(D, XWP, dtype=bf, device=dev)
        wxT[:, : m.x_proj[0].weight.shape[0]] = m.x_proj[0].weight.t()
        dtp = torch.zeros(D, RDTP, dtype=bf, device=dev)
        dtp[:, :R] = m.dt_proj[0].weight
        cpar = torch.zeros(D, 4, dtype=torch.float32, device=dev)
        cpar[:, 0], cpar[:, 1], cpar[:, 2] = m.conv1d.bias.float(), m.dt_proj[0].bias.float(), m.D[0].float()
        norms = (m.dt_layernorm.weight, m.B_layernorm.weight, m.C_layernorm.weight)
        p = m.producer
        words = [
            m.in_proj.weight.data_ptr(),
            m.out_proj.weight.data_ptr(),
            mlp.gate_proj.weight.data_ptr(),
            mlp.up_proj.weight.data_ptr(),
            mlp.down_proj.weight.data_ptr(),
            keep(torch.cat([layer.input_layernorm.weight, layer.pre_moe_layernorm.weight]).float()),
            keep(torch.cat([m.pre_avg_layernorm1.weight, m.pre_avg_layernorm2.weight]).to(bf)),
            keep(wxT),
            keep(dtp),
            keep(m.A.float()),
            keep(cpar),
            keep(m.conv_weight.float()),
            keep(torch.cat(norms).float()),
            state.conv[i].data_ptr(),
            state.ssm[i].data_ptr(),
            state.k[p].data_ptr(),
            state.v[p].data_ptr(),
            m.in_proj.weight.shape[0] | (int(m.is_producer) << 32),
        ]
        for t in (m.in_proj.weight, m.out_proj.weight, mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight):
            assert t.is_contiguous() and t.dtype == bf, "the products' weights are read in place, row-major bf16"
        return torch.tensor(words, dtype=torch.int64)

    def begin_step(self) -> None:
        """A new step's number (device work, captured with the step)."""
        self.gen.add_(1)

    def __call__(self, h: torch.Tensor, l0: int, l1: int, slot: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Layers [l0, l1) of this step on h ((D,) fp32, updated in place) at position state.pos. slot: the sliding
        buffers' (1,) int64 view from DecodeState.decode_indices; the kernel reads the filled-slot count that
        follows it in the same row."""
        assert slot.dtype == torch.int64 and slot.stride(0) == 1
        args = [self.table, l0, l1, h, h, self.hw, self.buf0, self.buf2, self.bufm, self.xg, self.gen, self.state.pos,
                slot, cos, sin, self.err]  # fmt: skip
        self.kernel(grid=(self.grid, 1, 1), block=(THREADS, 1, 1), args=args, shared_mem=self.smem)
