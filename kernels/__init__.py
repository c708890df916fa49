"""Kernel entry points used by the engine. For each op, one visible choice: Triton on CUDA, else the twin.

The choice follows the tensors' device, never an environment variable: under TRITON_INTERPRET=1 (the CPU test run)
the engine still runs the twins on CPU tensors, while tests/kernels call the launchers directly. use_triton(False)
forces the twins on CUDA too (engine.bench measures both paths in one run).
"""

from __future__ import annotations

from torch import Tensor

from kernels import attention as _attention
from kernels import causal_conv1d as _conv
from kernels import gemv as _gemv
from kernels import pick as _pick
from kernels import prefill_kv as _prefill_kv
from kernels import rms_norm as _norm
from kernels import selective_scan as _scan
from kernels import ssm_update as _update
from kernels import step_inputs as _step
from kernels import swiglu as _swiglu
from kernels._triton import HAS_TRITON

_use_triton = HAS_TRITON


def use_triton(enabled: bool) -> None:
    """Send CUDA tensors to the Triton launchers (the default where triton is installed) or to the twins."""
    global _use_triton
    _use_triton = enabled and HAS_TRITON


def on_triton(x: Tensor) -> bool:
    """Whether ops on x run the GPU kernels rather than the twins (the persistent decode kernel follows this too)."""
    return _use_triton and x.is_cuda


def selective_scan(
    u: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, z: Tensor, dt_bias: Tensor, ssm_state: Tensor,
    valid: Tensor | None = None,
) -> Tensor:  # fmt: skip
    if on_triton(u):
        return _scan.selective_scan(u, dt, A, B, C, D, z, dt_bias, ssm_state, valid=valid)
    return _scan.selective_scan_ref(u, dt, A, B, C, D, z, dt_bias, ssm_state, valid=valid)


def ssm_update(
    state: Tensor,
    x: Tensor,
    dbc: Tensor,
    dt_weight: Tensor,
    dt_bias: Tensor,
    A: Tensor,
    D: Tensor,
    z: Tensor,
    norm_weights: tuple[Tensor, Tensor, Tensor] | None,
    eps: float,
) -> Tensor:
    if on_triton(x):
        return _update.ssm_update(state, x, dbc, dt_weight, dt_bias, A, D, z, norm_weights, eps)
    return _update.ssm_update_ref(state, x, dbc, dt_weight, dt_bias, A, D, z, norm_weights, eps)


def causal_conv1d(
    x: Tensor, weight: Tensor, bias: Tensor | None, conv_state: Tensor, valid: Tensor | None = None
) -> Tensor:
    if on_triton(x):
        return _conv.causal_conv1d(x, weight, bias, conv_state, valid=valid)
    return _conv.causal_conv1d_ref(x, weight, bias, conv_state, valid=valid)


def causal_conv1d_update(x: Tensor, weight: Tensor, bias: Tensor | None, conv_state: Tensor) -> Tensor:
    if on_triton(x):
        return _conv.causal_conv1d_update(x, weight, bias, conv_state)
    return _conv.causal_conv1d_update_ref(x, weight, bias, conv_state)


def attention_prefill(
    q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor, window: int | None, num_meta: int
) -> Tensor:
    if on_triton(q):
        return _attention.attention_prefill(q, k, v, q_pos, k_pos, window, num_meta)
    return _attention.attention_prefill_ref(q, k, v, q_pos, k_pos, window, num_meta)


def rope_attention_decode(
    qkv: Tensor, num_heads: int, pos: Tensor, cos: Tensor, sin: Tensor, k_buf: Tensor, v_buf: Tensor,
    num_valid: Tensor | int, slot: Tensor | None = None, *, write_kv: bool = True,
) -> Tensor:  # fmt: skip
    fn = _attention.rope_attention_decode if on_triton(qkv) else _attention.rope_attention_decode_ref
    return fn(qkv, num_heads, pos, cos, sin, k_buf, v_buf, num_valid, slot, write_kv=write_kv)


def pick(logits: Tensor, noise: Tensor | None = None, **options) -> Tensor:
    """The next token from one logits row: greedy without noise, else a draw (kernels/pick.py has the options)."""
    if on_triton(logits):
        return _pick.pick(logits, noise, **options)
    return _pick.pick_ref(logits, noise, **options)


def rms_norm(x: Tensor, weight: Tensor, eps: float, *, out: Tensor | None = None) -> Tensor:
    if on_triton(x):
        return _norm.rms_norm(x, weight, eps, out=out)
    return _norm.rms_norm_ref(x, weight, eps, out=out)


def rms_norm_average(
    a: Tensor, b: Tensor, weight_a: Tensor, weight_b: Tensor, eps: float, *, out: Tensor | None = None
) -> Tensor:
    if on_triton(a):
        return _norm.rms_norm_average(a, b, weight_a, weight_b, eps, out=out)
    return _norm.rms_norm_average_ref(a, b, weight_a, weight_b, eps, out=out)


def step_inputs(
    token: Tensor, embed_weight: Tensor, pos: Tensor, groups: Tensor, num_meta: int
) -> tuple[Tensor, Tensor]:
    fn = _step.step_inputs if on_triton(embed_weight) else _step.step_inputs_ref
    return fn(token, embed_weight, pos, groups, num_meta)


def swiglu(gate: Tensor, up: Tensor, out_dtype) -> Tensor:
    if on_triton(gate):
        return _swiglu.swiglu(gate, up, out_dtype)
    return _swiglu.swiglu_ref(gate, up, out_dtype)


def rope_prefill(
    proj: Tensor, cos: Tensor, sin: Tensor, q_out: Tensor, keys: Tensor | None = None, values: Tensor | None = None,
    k_buf: Tensor | None = None, v_buf: Tensor | None = None, history: tuple[int, int, int] = (0, 0, 0),
    num_meta: int = 0, window: int | None = None,
) -> Tensor:  # fmt: skip
    fn = _prefill_kv.rope_prefill if on_triton(proj) else _prefill_kv.rope_prefill_ref
    return fn(proj, cos, sin, q_out, keys, values, k_buf, v_buf, history, num_meta, window)


def store_kv(
    keys: Tensor, values: Tensor, k_buf: Tensor, v_buf: Tensor, start: int, num_meta: int, window: int | None,
    valid: Tensor | None = None,
) -> None:  # fmt: skip
    fn = _prefill_kv.store_kv if on_triton(keys) else _prefill_kv.store_kv_ref
    fn(keys, values, k_buf, v_buf, start, num_meta, window, valid)


def gemv(x: Tensor, weight: Tensor, bias: Tensor | None = None, *, residual: Tensor | None = None,
         out: Tensor | None = None) -> Tensor:  # fmt: skip
    if on_triton(x):
        return _gemv.gemv(x, weight, bias, residual=residual, out=out)
    return _gemv.gemv_ref(x, weight, bias, residual=residual, out=out)


def norm_gemv(x: Tensor, norm_weight: Tensor, eps: float, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    if on_triton(x):
        return _gemv.norm_gemv(x, norm_weight, eps, weight, bias)
    return _gemv.norm_gemv_ref(x, norm_weight, eps, weight, bias)


def norm_average_gemv(
    a: Tensor, b: Tensor, weight_a: Tensor, weight_b: Tensor, eps: float, weight: Tensor, bias: Tensor | None,
    *, residual: Tensor | None = None, out: Tensor | None = None,
) -> Tensor:  # fmt: skip
    if on_triton(a):
        return _gemv.norm_average_gemv(a, b, weight_a, weight_b, eps, weight, bias, residual=residual, out=out)
    return _gemv.norm_average_gemv_ref(a, b, weight_a, weight_b, eps, weight, bias, residual=residual, out=out)


def mlp_gemv(x: Tensor, norm_weight: Tensor, eps: float, gate_weight: Tensor | None, up_weight: Tensor) -> Tensor:
    if on_triton(x):
        return _gemv.mlp_gemv(x, norm_weight, eps, gate_weight, up_weight)
    return _gemv.mlp_gemv_ref(x, norm_weight, eps, gate_weight, up_weight)


__all__ = [
    "attention_prefill",
    "causal_conv1d",
    "causal_conv1d_update",
    "gemv",
    "mlp_gemv",
    "norm_average_gemv",
    "norm_gemv",
    "on_triton",
    "pick",
    "rms_norm",
    "rms_norm_average",
    "rope_attention_decode",
    "rope_prefill",
    "selective_scan",
    "ssm_update",
    "step_inputs",
    "store_kv",
    "swiglu",
    "use_triton",
]
