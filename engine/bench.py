"""python -m engine.bench: prefill and decode timings of the real Hymba-1.5B shape with random weights (no download).

One run measures, on the current device: the copy bandwidth and matmul rate (the two ceilings); time to first token
for several prompt lengths and decode tokens/s at several contexts, for the Triton path and the PyTorch twins side by
side (each a median of runs with its min-max), and decode through the CUDA graph the server replays; weight, state
and peak memory bytes; the decode roofline (weight bytes / copy bandwidth); where a decode step's time goes (GEMVs,
attention, SSM, the rest); and each kernel at its real size against its bytes or FLOPs floor. --json writes every
number.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import kernels
from engine.config import HymbaConfig
from engine.graph import DecodeGraph, Prefill
from engine.model import HymbaForCausalLM
from engine.state import DecodeState
from engine.weights import _FP32_SUFFIXES, expected_shapes

# spec sections 2-3: Hymba-1.5B-Base
HYMBA_1_5B = {
    "model_type": "hymba", "vocab_size": 32001, "hidden_size": 1600, "intermediate_size": 5504,
    "num_hidden_layers": 32, "num_attention_heads": 25, "num_key_value_heads": 5, "attn_hidden_size": -1,
    "kq_head_dim": -1, "v_head_dim": 128, "kq_norm": "none", "rope": True, "rope_type": "ntk", "rope_theta": 10000.0,
    "max_position_embeddings": 8192, "orig_max_position_embeddings": 2048, "num_memory_tokens": 128,
    "memory_tokens_interspersed_every": 0, "sliding_window": 1024, "global_attn_idx": [0, 15, 31],
    "kv_reuse_group": [[1, 2], [3, 4], [5, 6], [7, 8], [9, 10], [11, 12], [13, 14], [16, 17, 18], [19, 20],
                       [21, 22], [23, 24], [25, 26], [27, 28], [29, 30]],
    "kv_reuse_every_i_layer": -1, "mamba_d_state": 16, "mamba_d_conv": 4, "mamba_expand": 2, "mamba_dt_rank": 100,
    "mamba_conv_bias": True, "mamba_proj_bias": False, "mamba_inner_layernorms": True, "hidden_act": "silu",
    "mlp_hidden_act": "silu", "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "num_experts": 1,
    "num_experts_per_tok": 1, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "torch_dtype": "bfloat16",
}  # fmt: skip
DECODE_STEPS = 16  # tokens per timed decode run (eager)
GRAPH_DECODE_STEPS = 128  # tokens per timed decode run through the CUDA graph


def random_weights(config: HymbaConfig, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Trained-looking magnitudes: norms ~1, A_log = log(1..N), softplus(dt bias) in [0.005, 0.3], 0.02 matrices."""
    g = torch.Generator(device=device).manual_seed(0)

    def randn(shape, std):
        return std * torch.randn(shape, generator=g, device=device)

    tensors = {}
    for name, shape in expected_shapes(config).items():
        if name.endswith("A_log.0"):
            t = torch.log(torch.arange(1, shape[1] + 1, device=device).float()).expand(shape).clone()
        elif name.endswith("D.0"):
            t = torch.ones(shape, device=device)
        elif name.endswith("dt_proj.0.bias"):
            t = torch.log(torch.expm1(0.005 + 0.295 * torch.rand(shape, generator=g, device=device)))
        elif name.endswith("conv1d.weight"):
            t = randn(shape, 0.5)
        elif len(shape) == 1 and not name.endswith("bias"):  # RMSNorm weights
            t = 1 + randn(shape, 0.02)
        else:
            t = randn(shape, 0.02)
        tensors[name] = t.float() if name.endswith(_FP32_SUFFIXES) else t.to(dtype)
    return tensors


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def device_seconds(fn, reps: int = 20) -> float:
    """Median device time of fn() between CUDA events, after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def graph_seconds(fn, reps: int = 20) -> float:
    """Device time of one fn() inside a CUDA graph of `reps` calls (launch latency gone, as in the decode graph):
    the median over 5 replays, divided by reps. fn must be capturable (no host syncs)."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    return device_seconds(graph.replay, reps=5) / reps


def ceilings(device: torch.device) -> tuple[float, float]:
    """(copy bandwidth in bytes/s counting bytes read + written, bf16 matmul rate in FLOP/s), both measured."""
    src = torch.randn(256 << 20, device=device)  # 1 GiB, far past L2
    dst = torch.empty_like(src)
    bandwidth = 2 * src.numel() * 4 / device_seconds(lambda: dst.copy_(src), reps=10)
    a, b = torch.randn(2, 8192, 8192, device=device, dtype=torch.bfloat16)
    rate = 2 * 8192**3 / device_seconds(lambda: a @ b, reps=10)
    return bandwidth, rate


def time_prefill(prefill, model: HymbaForCausalLM, state: DecodeState, num_tokens: int, runs: int) -> list[float]:
    """Seconds from the prompt's submission to its first token on the host; the first run is a warm-up. prefill:
    ids -> logits, starting with state.reset() (a graph.Prefill, or model.prefill after a reset)."""
    ids = torch.randint(3, model.config.vocab_size, (num_tokens,), device=state.ssm.device)
    times = []
    for _ in range(runs + 1):
        sync(state.ssm.device)
        t0 = time.perf_counter()
        int(kernels.pick(prefill(ids)))
        times.append(time.perf_counter() - t0)
    return times[1:]


def eager_prefill(model: HymbaForCausalLM, state: DecodeState):
    def prefill(ids):
        state.reset()
        return model.prefill(ids, state)

    return prefill


def time_decode(model: HymbaForCausalLM, state: DecodeState, context: int, runs: int, graph=None) -> list[float]:
    """Tokens/s of runs of greedy steps after a prompt of `context` tokens (3 warm-up steps), the token staying on
    the device and picked as the engine picks it (kernels.pick, sampling.sample's greedy path): through
    model.decode (eager), or through a DecodeGraph's replays."""
    device, step = state.ssm.device, (graph or model).decode
    steps = GRAPH_DECODE_STEPS if graph else DECODE_STEPS
    state.reset()
    token = kernels.pick(model.prefill(torch.randint(3, model.config.vocab_size, (context,), device=device), state))
    for _ in range(3):
        token = kernels.pick(step(token, state))
    rates = []
    for _ in range(runs):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            token = kernels.pick(step(token, state))
        int(token)
        rates.append(steps / (time.perf_counter() - t0))
    return rates


# kernel name -> part of a decode step (the rest: embedding, index arithmetic, the greedy pick)
_DECODE_PARTS = {"_gemv_kernel": "gemv", "_attention_decode": "attention", "_ssm_update": "ssm",
                 "_causal_conv1d_update": "ssm", "persistent_decode": "persistent"}  # fmt: skip


def decode_split(
    model: HymbaForCausalLM, state: DecodeState, graph: DecodeGraph, context: int, runs: int, plain: DecodeGraph
) -> dict:
    """Where one decode step's time goes at `context`: each kernel's device time from the profiler over eager steps
    (the graph runs the same kernels), grouped into parts, and the graph's per-step time beside their sum (the
    difference is the gap between kernels). Also the GEMVs' achieved bandwidth, and the in-run peer: the same step
    with every layer on the Triton path (`plain`, a graph without the persistent kernel)."""
    from torch.profiler import ProfilerActivity, profile

    kernels.use_triton(True)
    steps, device = 8, state.ssm.device
    state.reset()
    token = kernels.pick(model.prefill(torch.randint(3, model.config.vocab_size, (context,), device=device), state))
    token = kernels.pick(model.decode(token, state))
    sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            token = kernels.pick(model.decode(token, state))
        sync(device)
    parts = dict.fromkeys(["persistent", "gemv", "attention", "ssm", "other"], 0.0)
    launches = 0
    for event in prof.key_averages():
        if event.self_device_time_total <= 0:
            continue
        part = next((p for prefix, p in _DECODE_PARTS.items() if event.key.startswith(prefix)), "other")
        parts[part] += event.self_device_time_total / 1e6 / steps
        launches += event.count
    graph_step = 1 / statistics.median(time_decode(model, state, context, runs, graph))
    plain_rate = summary(time_decode(model, state, context, runs, plain))
    return {"context": context, "parts_s": parts, "kernels_per_step": launches / steps, "graph_step_s": graph_step,
            "gaps_s": graph_step - sum(parts.values()), "plain_graph_tokens_per_s": plain_rate}  # fmt: skip


def _gaps(gaps_s: float) -> str:
    """The step's time beyond its kernels' summed time. Negative when kernels overlap: a PDL kernel starts early and
    waits for the one before inside its own time, and the SSM chain runs beside attention on its own stream."""
    if gaps_s >= 0:
        return f"+ gaps between kernels {gaps_s * 1e6:.0f} us"
    return f"- {-gaps_s * 1e6:.0f} us of overlap (PDL waits inside kernels, the SSM chain beside attention)"


_PREFILL_PARTS = {"_selective_scan": "scan", "_attention_prefill": "attention", "_causal_conv1d": "conv",
                  "_rms_norm": "norm", "gemm": "matmul", "sm90_": "matmul", "cutlass": "matmul", "ampere": "matmul",
                  "nvjet": "matmul"}  # fmt: skip


def prefill_split(model: HymbaForCausalLM, state: DecodeState, num_tokens: int) -> dict:
    """Where a prefill's device time goes: the profiler's kernel times of one prefill as served (a graph replays the
    same kernels, so this profiles them run eagerly: the same padded chunks), grouped into parts, with the ten
    costliest kernels and the number of kernels."""
    from torch.profiler import ProfilerActivity, profile

    kernels.use_triton(True)
    device = state.ssm.device
    ids = torch.randint(3, model.config.vocab_size, (num_tokens,), device=device)
    padded = Prefill(model, state, cuda_graphs=False)  # the served chunks, without graphs
    padded(ids)
    sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        padded(ids)
        sync(device)
    parts = dict.fromkeys(["matmul", "scan", "attention", "conv", "norm", "other"], 0.0)
    rows, launches = [], 0
    for event in prof.key_averages():
        if event.self_device_time_total <= 0:
            continue
        part = next((p for key, p in _PREFILL_PARTS.items() if key in event.key), "other")
        parts[part] += event.self_device_time_total / 1e6
        launches += event.count
        rows.append((event.self_device_time_total / 1e6, event.count, event.key[:90]))
    top = [{"s": t, "count": c, "kernel": k} for t, c, k in sorted(rows, reverse=True)[:10]]
    return {"tokens": num_tokens, "parts_s": parts, "kernels": launches, "top": top}


COLD_BYTES = 128 << 20  # weights cycled through per GEMV row: more than twice the H100's 50 MB L2


def _cycling(fn, calls: list[tuple], kwargs: dict):
    """A callable that calls fn on the next of `calls` each time, round and round; .cycle is their number."""
    position = itertools.count()

    def call():
        return fn(*calls[next(position) % len(calls)], **kwargs)

    call.cycle = len(calls)
    return call


def kernel_rows(device: torch.device, dtype: torch.dtype, bandwidth: float, matmul_rate: float) -> list[dict]:
    """Each kernel at the real size of one 2048-token prefill chunk or one decode step, in the model's dtypes
    (fp32 activations, bf16 q/k/v and B/C), Triton against its twin, with its floor: bytes / copy bandwidth or
    matmul FLOPs / matmul rate, whichever is larger."""
    attention, causal_conv1d, gemv, rms_norm, selective_scan, ssm_update = (
        importlib.import_module(f"kernels.{name}")  # the modules: kernels.<name> itself is the dispatching op
        for name in ("attention", "causal_conv1d", "gemv", "rms_norm", "selective_scan", "ssm_update")
    )

    T, d, N, K, H, Hk, dq, dv, M, W = 2048, 3200, 16, 4, 25, 5, 64, 128, 128, 1024
    size = torch.finfo(dtype).bits // 8
    f32 = dict(device=device, dtype=torch.float32)
    act = dict(device=device, dtype=dtype)
    A = -torch.arange(1, N + 1, **f32).expand(d, N).contiguous()
    dt_bias = torch.full((d,), -2.0, **f32)
    scan_args = (torch.randn(T, d, **f32), torch.randn(T, d, **f32), A, torch.randn(T, N, **act),
                 torch.randn(T, N, **act), torch.ones(d, **f32), torch.randn(T, d, **f32), dt_bias)  # fmt: skip
    state = torch.zeros(d, N, **f32)
    conv = (torch.randn(T, d, **f32), torch.randn(d, K, **f32), torch.randn(d, **f32), torch.zeros(d, K - 1, **f32))
    R, D, F, V = 100, 1600, 5504, 32001
    u, dbc, z = torch.randn(d, **f32), torch.randn(R + 2 * N, **f32), torch.randn(d, **f32)
    dt_w = 0.02 * torch.randn(d, R, **act)
    norms = (torch.ones(R, **act), torch.ones(N, **act), torch.ones(N, **act))
    step = (state, u, dbc, dt_w, dt_bias, A, torch.ones(d, **f32), z, norms, 1e-6)
    ssm_bytes = 2 * d * N * 4 + d * N * 4 + d * R * size + 4 * d * 4  # state in/out, A, dt_proj, vectors
    x_norm, y_norm, w_norm = torch.randn(T, d, **f32), torch.randn(T, d, **f32), torch.ones(d, **act)

    def attention_8k(window):  # the four 2048-token chunks of an 8192-token prompt after the meta tokens
        calls = []
        for start in range(M, M + 8192, T):
            lo = M if window is None else max(M, start - window)
            k_pos = torch.cat([torch.arange(M), torch.arange(lo, start + T)]).to(device)
            q, S = torch.randn(T, H, dq, **act), k_pos.numel()
            pairs = sum(min(s + 1, M + min(s - M, window) + 1) if window else s + 1 for s in range(start, start + T))
            calls.append(((q, torch.randn(Hk, S, dq, **act), torch.randn(Hk, S, dv, **act),
                           torch.arange(start, start + T, device=device), k_pos, window, M), pairs))  # fmt: skip
        flops = sum(2 * H * (dq + dv) * pairs for _, pairs in calls)
        return calls, flops

    def run_all(fn, calls):
        return lambda: [fn(*args) for args, _ in calls]

    global_calls, global_flops = attention_8k(None)
    swa_calls, swa_flops = attention_8k(W)
    kv = {cap: (torch.randn(Hk, cap, dq, **act), torch.randn(Hk, cap, dv, **act), torch.tensor(cap, device=device))
          for cap in (M + W, M + 8192)}  # fmt: skip
    scan_bytes = (4 * T * d + 2 * d * N) * 4 + 2 * T * N * size  # u, dt, z, out + state in/out, fp32; B, C
    # (name, triton call, twin call, floor bytes, floor matmul FLOPs)
    cases = [
        ("selective_scan T=2048", lambda: selective_scan.selective_scan(*scan_args, state),
         lambda: selective_scan.selective_scan_ref(*scan_args, state), scan_bytes, 0),
        ("causal_conv1d T=2048", lambda: causal_conv1d.causal_conv1d(*conv),
         lambda: causal_conv1d.causal_conv1d_ref(*conv), 2 * T * d * 4, 0),
        ("rms_norm 2048x3200", lambda: rms_norm.rms_norm(x_norm, w_norm, 1e-6),
         lambda: rms_norm.rms_norm_ref(x_norm, w_norm, 1e-6), T * d * (4 + size), 0),
        ("rms_norm_average 2048x3200", lambda: rms_norm.rms_norm_average(x_norm, y_norm, w_norm, w_norm, 1e-6),
         lambda: rms_norm.rms_norm_average_ref(x_norm, y_norm, w_norm, w_norm, 1e-6), 3 * T * d * 4, 0),
        ("attention_prefill global, 8k prompt", run_all(attention.attention_prefill, global_calls),
         run_all(attention.attention_prefill_ref, global_calls), 0, global_flops),
        ("attention_prefill sliding, 8k prompt", run_all(attention.attention_prefill, swa_calls),
         run_all(attention.attention_prefill_ref, swa_calls), 0, swa_flops),
    ]  # fmt: skip
    # decode-size kernels: timed inside a CUDA graph, as the decode step runs them (event timing would measure
    # the Python launch); the twin too where it is capturable (the GEMV twins are cuBLAS calls)
    graphed = [
        ("ssm_update (fused dt_proj, norms), one token", lambda: ssm_update.ssm_update(*step),
         lambda: ssm_update.ssm_update_ref(*step), ssm_bytes, 0),
        ("causal_conv1d_update, one token", lambda: causal_conv1d.causal_conv1d_update(conv[0][0], *conv[1:]),
         lambda: causal_conv1d.causal_conv1d_update_ref(conv[0][0], *conv[1:]), (2 * (K - 1) + K) * d * 4, 0),
    ]  # fmt: skip
    qkv, pos, slot = (
        torch.randn(D + Hk * (dq + dv), **f32),
        torch.tensor([M + 5], device=device),
        torch.tensor([7], device=device),
    )
    cos, sin = torch.randn(M + 8192, dq, **f32), torch.randn(M + 8192, dq, **f32)
    # a KV-producing layer's whole attention chain, one launch (its twin reads num_valid on the host: not capturable)
    for cap, (k_buf, v_buf, n) in kv.items():
        args = (qkv, H, pos, cos, sin, k_buf, v_buf, n, slot)
        graphed.append((f"rope_attention_decode {cap} slots", lambda a=args: attention.rope_attention_decode(*a),
                        None, qkv.numel() * 4 + Hk * cap * (dq + dv) * size, 0))  # fmt: skip
    x_d, x_i, x_f, res = torch.randn(D, **f32), torch.randn(d, **f32), torch.randn(F, **f32), torch.randn(D, **f32)
    nw_d, nw_i = torch.ones(D, **act), torch.ones(d, **act)

    def weight(n, k):
        return 0.02 * torch.randn(n, k, **act)

    shapes = {"in": (D + Hk * (dq + dv) + 2 * d, D), "out": (D, d), "gate": (F, D), "up": (F, D), "down": (D, F),
              "x": (R + 2 * N, d), "lm": (V, D)}  # fmt: skip
    for name, fn, args, kwargs in [
        ("norm_gemv in_proj 8960x1600", "norm_gemv", (x_d, nw_d, 1e-6, "in"), {}),
        ("norm_average_gemv out_proj 1600x3200 + residual", "norm_average_gemv",
         (x_i, x_i, nw_i, nw_i, 1e-6, "out", None), {"residual": res}),
        ("mlp_gemv gate+up 2x5504x1600 SwiGLU", "mlp_gemv", (x_d, nw_d, 1e-6, "gate", "up"), {}),
        ("gemv down_proj 1600x5504 + residual", "gemv", (x_f, "down"), {"residual": res}),
        ("gemv x_proj 132x3200", "gemv", (x_i, "x"), {}),
        ("norm_gemv LM head 32001x1600", "norm_gemv", (x_d, nw_d, 1e-6, "lm"), {}),
    ]:  # fmt: skip
        # As in the decode step, each call reads its weights from HBM: the graph's calls cycle through enough copies
        # of them that a copy has left the L2 before its next call. A weight stands in args as its name in shapes.
        names = [a for a in args if isinstance(a, str)]
        w_bytes = sum(shapes[n][0] * shapes[n][1] for n in names) * size
        copies = [{n: weight(*shapes[n]) for n in names} for _ in range(-(-COLD_BYTES // w_bytes))]
        calls = [tuple(c[a] if isinstance(a, str) else a for a in args) for c in copies]
        tri, ref = getattr(gemv, fn), getattr(gemv, fn + "_ref")
        graphed.append((name, _cycling(tri, calls, kwargs), _cycling(ref, calls, kwargs), w_bytes, 0))
    rows = []
    for (name, tri, ref, num_bytes, flops), in_graph in [(c, False) for c in cases] + [(g, True) for g in graphed]:
        floor = max(num_bytes / bandwidth, flops / matmul_rate)
        reps = max(20, getattr(tri, "cycle", 1))  # a graph of cycling calls holds each copy at least once
        triton_s = graph_seconds(tri, reps) if in_graph else device_seconds(tri)
        twin_s = None
        if ref is not None:
            twin_s = graph_seconds(ref, reps) if in_graph else device_seconds(ref, reps=5)
        rows.append({"kernel": name, "bytes": num_bytes, "flops": flops, "floor_s": floor, "triton_s": triton_s,
                     "twin_s": twin_s, "fraction_of_floor": floor / triton_s, "in_cuda_graph": in_graph})  # fmt: skip
    return rows


def bench_path(model, state, args, use_triton: bool, graph: DecodeGraph | None = None, served=None) -> dict:
    """Every prefill and decode measure through one path (and decode through the graph and prefill as served, if
    given); each is printed as soon as it is taken."""
    kernels.use_triton(use_triton)
    torch.cuda.reset_peak_memory_stats()
    name, runs = ("triton", args.runs) if use_triton else ("twins", max(3, args.runs // 2))
    prefill, served_prefill, decode, graph_decode = {}, {}, {}, {}
    for n in args.prompt_lengths:
        if served is not None:
            served_prefill[n] = summary(time_prefill(served, model, state, n, runs))
            print(f"{name}: TTFT {n} tokens as served {served_prefill[n]['median'] * 1e3:.1f} ms", flush=True)
        prefill[n] = summary(time_prefill(eager_prefill(model, state), model, state, n, runs))
        print(f"{name}: TTFT {n} tokens eager {prefill[n]['median'] * 1e3:.1f} ms", flush=True)
    for c in args.contexts:
        if graph is not None:
            graph_decode[c] = summary(time_decode(model, state, c, runs, graph))
            print(f"{name}: decode at {c} tokens, CUDA graph {graph_decode[c]['median']:.1f} tokens/s", flush=True)
        decode[c] = summary(time_decode(model, state, c, runs))
        print(f"{name}: decode at {c} tokens, eager {decode[c]['median']:.1f} tokens/s", flush=True)
    return {"prefill_s": prefill, "served_prefill_s": served_prefill, "decode_tokens_per_s": decode,
            "graph_decode_tokens_per_s": graph_decode,
            "peak_memory_bytes": torch.cuda.max_memory_allocated()}  # fmt: skip


def print_report(result: dict) -> None:
    paths = result["paths"]

    def cell(s, scale, fmt):
        return f"{fmt.format(s['median'] * scale)} ({fmt.format(s['min'] * scale)}-{fmt.format(s['max'] * scale)})"

    print(f"\n{result['device']}, {result['dtype']}; copy {result['copy_bandwidth_bytes_per_s'] / 1e12:.2f} TB/s "
          f"(read + written), bf16 matmul {result['matmul_flops_per_s'] / 1e12:.0f} TFLOP/s")  # fmt: skip
    print(f"decode through the graph: {result['decode_path']}")

    def row(label, cells):
        print(f"| {label} | " + " | ".join(cells) + " |")

    row("measure", paths)
    row("---", ["---"] * len(paths))
    for n in result["prompt_lengths"]:
        row(f"TTFT, {n}-token prompt, as served (ms)",
            [cell(p["served_prefill_s"][n], 1e3, "{:.1f}") if p["served_prefill_s"] else "-"
             for p in paths.values()])  # fmt: skip
    for n in result["prompt_lengths"]:
        row(f"TTFT, {n}-token prompt, eager (ms)", [cell(p["prefill_s"][n], 1e3, "{:.1f}") for p in paths.values()])
    for c in result["contexts"]:
        row(f"decode at {c} tokens, CUDA graph (tokens/s)",
            [cell(p["graph_decode_tokens_per_s"][c], 1, "{:.0f}") if p["graph_decode_tokens_per_s"] else "-"
             for p in paths.values()])  # fmt: skip
    for c in result["contexts"]:
        row(
            f"decode at {c} tokens, eager (tokens/s)",
            [cell(p["decode_tokens_per_s"][c], 1, "{:.0f}") for p in paths.values()],
        )
    row("peak GPU memory (GB)", [f"{p['peak_memory_bytes'] / 1e9:.2f}" for p in paths.values()])
    roofline = result["decode_roofline_tokens_per_s"]
    print(f"\nweights {result['weight_bytes'] / 1e9:.3f} GB; state {result['state_bytes'] / 1e6:.1f} MB "
          f"(meta + {result['max_model_len']} tokens); decode roofline {roofline:.0f} tokens/s "
          f"(weight bytes / copy bandwidth)")  # fmt: skip
    for name, p in paths.items():
        for mode, key in (("CUDA graph", "graph_decode_tokens_per_s"), ("eager", "decode_tokens_per_s")):
            if p[key]:
                fractions = ", ".join(f"{c}: {p[key][c]['median'] / roofline:.1%}" for c in result["contexts"])
                print(f"  {name}, {mode}: fraction of the decode roofline reached {fractions}")
    for split in result["decode_split"]:
        parts = ", ".join(f"{k} {v * 1e6:.0f}" for k, v in split["parts_s"].items())
        gemv_bw = result["weight_bytes"] / split["parts_s"]["gemv"] / 1e12
        print(
            f"\ndecode step at {split['context']} tokens through the graph: {split['graph_step_s'] * 1e6:.0f} us = "
            f"kernels ({parts} us) {_gaps(split['gaps_s'])}; "
            f"{split['kernels_per_step']:.0f} kernels per step"
            + (f"; the GEMVs move the weights at {gemv_bw:.2f} TB/s" if split["parts_s"]["persistent"] == 0 else "")
        )
        plain = split["plain_graph_tokens_per_s"]
        print(f"  the in-run peer, every layer on the Triton path (a graph without the persistent kernel): "
              f"{cell(plain, 1, '{:.0f}')} tokens/s, {plain['median'] / roofline:.1%} of the roofline")  # fmt: skip
    for split in result["prefill_split"]:
        parts = ", ".join(f"{k} {v * 1e3:.2f}" for k, v in split["parts_s"].items())
        print(f"\nprefill of {split['tokens']} tokens as served, device time by part (ms): {parts}; "
              f"{split['kernels']} kernels; the costliest:")  # fmt: skip
        for row in split["top"]:
            print(f"  {row['s'] * 1e3:7.2f} ms  {row['count']:5d}x  {row['kernel']}")
    if result["kernels"]:
        print("\n| kernel | floor (us) | Triton (us) | fraction of floor | twin (us) |\n|---|---|---|---|---|")
        for r in result["kernels"]:
            twin = "-" if r["twin_s"] is None else f"{r['twin_s'] * 1e6:.1f}"
            print(f"| {r['kernel']}{' (in a graph)' if r['in_cuda_graph'] else ''} | {r['floor_s'] * 1e6:.1f} | "
                  f"{r['triton_s'] * 1e6:.1f} | {r['fraction_of_floor']:.1%} | {twin} |")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, help="a config.json to build instead of Hymba-1.5B")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ints = lambda s: [int(v) for v in s.split(",")]  # noqa: E731
    parser.add_argument("--prompt-lengths", type=ints, default=[128, 1024, 4096, 8192])
    parser.add_argument("--contexts", type=ints, default=[128, 1024, 8192])
    parser.add_argument("--runs", type=int, default=5, help="timed runs per measure (the twins get half, at least 3)")
    parser.add_argument("--no-kernels", action="store_true", help="skip the per-kernel table")
    parser.add_argument("--no-twins", action="store_true", help="skip the PyTorch twins (a quick Triton-only run)")
    parser.add_argument("--json", type=Path, help="write every number here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("engine.bench needs a CUDA device (it times the Triton path against the twins)", file=sys.stderr)
        return 2

    device, dtype = torch.device("cuda"), getattr(torch, args.dtype)
    config = HymbaConfig.from_json(args.config) if args.config else HymbaConfig.from_dict(HYMBA_1_5B, "Hymba-1.5B")
    bandwidth, matmul_rate = ceilings(device)
    tensors = random_weights(config, device, dtype)
    weight_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    max_model_len = max(*args.prompt_lengths, *(c + 4 + GRAPH_DECODE_STEPS * args.runs for c in args.contexts))
    model = HymbaForCausalLM.from_tensors(config, tensors, config.num_memory_tokens + max_model_len)
    state = DecodeState(config, max_model_len, device, dtype)
    model.prefill_meta_tokens(state)
    plain = DecodeGraph(model, state, persistent=False)  # the in-run peer: every layer on the Triton path
    graph = DecodeGraph(model, state)  # as served: the layers through the persistent kernel where it fits
    served = Prefill(model, state)  # the prompt's chunks replayed from CUDA graphs

    result = {
        "device": torch.cuda.get_device_name(device), "dtype": args.dtype, "config": str(args.config or "Hymba-1.5B"),
        "copy_bandwidth_bytes_per_s": bandwidth, "matmul_flops_per_s": matmul_rate, "weight_bytes": weight_bytes,
        "state_bytes": state.nbytes, "max_model_len": max_model_len, "prompt_lengths": args.prompt_lengths,
        "contexts": args.contexts, "decode_roofline_tokens_per_s": bandwidth / weight_bytes, "decode_path": graph.path,
        "paths": {"triton": bench_path(model, state, args, True, graph, served)},
        "decode_split": [decode_split(model, state, graph, c, args.runs, plain) for c in args.contexts],
        "prefill_split": [prefill_split(model, state, n) for n in args.prompt_lengths],
        "kernels": [] if args.no_kernels else kernel_rows(device, dtype, bandwidth, matmul_rate),
    }  # fmt: skip
    if not args.no_twins:
        result["paths"]["twins"] = bench_path(model, state, args, False)
    kernels.use_triton(True)
    print_report(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
