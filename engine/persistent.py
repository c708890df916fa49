"""Which of a decode step's layers the persistent kernel takes (kernels/persistent_decode.py), and their tensors.

It takes each run of consecutive sliding-window layers that starts with a KV producer (in Hymba-1.5B: 1-14 and
16-30), when the model has the shapes compiled into it, bf16 weights on a Hopper GPU, and sliding buffers holding
the whole window (max_model_len >= the window). The global layers, and everything else, stay on the per-layer
path (HymbaLayer.decode)."""

from __future__ import annotations

from typing import NamedTuple

import torch

from engine.config import HymbaConfig
from engine.state import DecodeState
from kernels.persistent_decode import MAXL, SHAPES, LayerTensors, PersistentDecode


class Persistent(NamedTuple):
    """The kernel bound to one model and one DecodeState, and the runs of layers it takes."""

    kernel: PersistentDecode
    state: DecodeState
    segments: list[tuple[int, int]]


def unsupported(model, state: DecodeState) -> str | None:
    """Why the persistent kernel cannot decode this model on this state, or None when it can."""
    c: HymbaConfig = model.config
    device = state.pos.device
    if device.type != "cuda" or torch.cuda.get_device_capability(device) != (9, 0):
        return "the persistent kernel needs a Hopper GPU (sm_90)"
    for name, value in SHAPES.items():
        if getattr(c, name) != value:
            return f"the persistent kernel is built for Hymba-1.5B's shapes: {name} is {getattr(c, name)}, not {value}"
    if model.model.embed_tokens.weight.dtype != torch.bfloat16:
        return "the persistent kernel is built for bf16 weights"
    if c.mlp_hidden_act != "silu" or c.mamba_proj_bias or not c.mamba_conv_bias or not c.mamba_inner_layernorms:
        return "the persistent kernel is built for a SwiGLU MLP, a conv bias, the SSM's inner norms, no proj biases"
    if not c.rope:
        return "the persistent kernel is built for RoPE"
    if not segments(c):
        return "no run of sliding-window layers"
    if any(state.k[i].shape[1] != c.num_memory_tokens + c.sliding_window for i, w in state.window.items() if w):
        return "max_model_len is shorter than the sliding window (the kernel's buffers hold the whole window)"
    return None


def segments(config: HymbaConfig) -> list[tuple[int, int]]:
    """The runs [l0, l1) the kernel takes: consecutive sliding layers, each run starting at a KV producer (a
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


def build(model, state: DecodeState) -> Persistent:
    """The kernel bound to this model's layers and this state (check `unsupported` first)."""
    layers = {}
    for l0, l1 in segments(model.config):
        for i in range(l0, l1):
            layer = model.model.layers[i]
            m, mlp = layer.mamba, layer.moe.experts[0]
            layers[i] = LayerTensors(
                in_proj=m.in_proj.weight, out_proj=m.out_proj.weight, gate_proj=mlp.gate_proj.weight,
                up_proj=mlp.up_proj.weight, down_proj=mlp.down_proj.weight, input_norm=layer.input_layernorm.weight,
                mlp_norm=layer.pre_moe_layernorm.weight,
                avg_norms=(m.pre_avg_layernorm1.weight, m.pre_avg_layernorm2.weight), x_proj=m.x_proj[0].weight,
                dt_proj=m.dt_proj[0].weight, dt_bias=m.dt_proj[0].bias, A=m.A, D=m.D[0], conv_weight=m.conv_weight,
                conv_bias=m.conv1d.bias,
                inner_norms=(m.dt_layernorm.weight, m.B_layernorm.weight, m.C_layernorm.weight),
                conv_state=state.conv[i], ssm_state=state.ssm[i], k=state.k[m.producer], v=state.v[m.producer],
                writes_kv=m.is_producer,
            )  # fmt: skip
    kernel = PersistentDecode(layers, model.config.num_hidden_layers, state.pos)
    return Persistent(kernel, state, segments(model.config))
