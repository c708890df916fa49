"""Which of a decode step's layers the persistent kernel takes (kernels/persistent_decode.py), and their tensors.

It takes every layer from the first KV producer on, in runs of at most 32 (Hymba-1.5B: all 32 layers in one launch),
when the model has the shapes compiled into it, bf16 weights on a Hopper GPU, and sliding buffers holding the whole
window (max_model_len >= the window). Anything else stays on the per-layer path (HymbaLayer.decode)."""

from __future__ import annotations

from typing import NamedTuple

import torch

from engine.config import HymbaConfig
from engine.state import DecodeState
from kernels.persistent_decode import MAXL, SHAPES, LayerTensors, PersistentDecode


class Persistent(NamedTuple):
    """The kernel bound to one model and one DecodeState, the runs of layers it takes, and a sliding and a global KV
    producer (whose rows of the step's decode indices it reads; either stands for the other when a model has only
    one kind)."""

    kernel: PersistentDecode
    state: DecodeState
    segments: list[tuple[int, int]]
    sliding: int
    glob: int


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
    try:
        segments(c)
    except ValueError as e:
        return str(e)
    if any(state.k[i].shape[1] != c.num_memory_tokens + c.sliding_window for i, w in state.window.items() if w):
        return "max_model_len is shorter than the sliding window (the kernel's buffers hold the whole window)"
    return None


def segments(config: HymbaConfig) -> list[tuple[int, int]]:
    """The runs [l0, l1) the kernel takes: every layer from the first KV producer on, at most MAXL a launch, each run
    starting at a producer (a consumer's K/V row of this step comes from its producer earlier in the same launch)."""
    L, producer = config.num_hidden_layers, config.kv_producer
    runs, l0 = [], next(i for i in range(L) if producer[i] == i)
    while l0 < L:
        end = min(l0 + MAXL, L)
        if end < L:  # the next run must start at a producer
            starts = [j for j in range(l0 + 1, end + 1) if producer[j] == j]
            if not starts:
                raise ValueError(f"layers {l0}-{end}: no KV producer to start a launch at within {MAXL} layers")
            end = starts[-1]
        runs.append((l0, end))
        l0 = end
    return runs


def build(model, state: DecodeState) -> Persistent:
    """The kernel bound to this model's layers and this state (check `unsupported` first)."""
    c, layers, runs = model.config, {}, segments(model.config)
    for l0, l1 in runs:
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
                writes_kv=m.is_producer, is_global=c.is_global[i],
            )  # fmt: skip
    kernel = PersistentDecode(layers, c.num_hidden_layers, state.pos)
    sliding = [i for i, w in state.window.items() if w is not None]
    glob = [i for i, w in state.window.items() if w is None]
    return Persistent(kernel, state, runs, (sliding or glob)[0], (glob or sliding)[0])
