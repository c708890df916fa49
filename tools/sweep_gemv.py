"""python -m tools.sweep_gemv: launch shapes of the decode kernels at the Hymba-1.5B sizes, timed as decode runs them.

Each candidate is captured in a CUDA graph of many calls that rotate over enough copies of the weights (> 2x the
H100's 50 MB L2) that every call reads its weight from HBM, as in a real decode step where each layer's weights
are read once. Each is timed with programmatic dependent launch off and on (MODES). Prints, per shape, every
config's µs and achieved TB/s, best first; the winners go into kernels/gemv.py CONFIG_* and kernels/ssm_update.py
BLOCK_D by hand, with the numbers in docs/PERFORMANCE.md.

--chain times a whole decode step's GEMVs as the model runs them (32 layers of in_proj, x_proj on a side stream,
out_proj and the MLP with the residual updated in place, then the LM head; a plain PyTorch kernel stands in for
each non-GEMV kernel between them) in one CUDA graph per mode, checks that every mode gives bit-identical logits on
every replay, and compares them with the twins. --apply times it again with each product's fastest config, and
--tune first looks for better ones in the chain itself.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import itertools
import json
import multiprocessing
import statistics
import sys

import torch

# the modules: kernels.gemv and kernels.ssm_update themselves are the dispatching functions
gemv, ssm_update = (importlib.import_module(f"kernels.{name}") for name in ("gemv", "ssm_update"))

L2_FLUSH_BYTES = 160 << 20  # weights cycled per graph: well past the 50 MB L2
EPS = 1e-6
MODES = {"plain": False, "pdl": True}  # mode -> kernels/gemv.py USE_PDL
PROGRAMS_PER_SM = (1, 2, 3, 4, 6, 8)
MAX_ELEMENTS_PER_THREAD = 64  # of one weight tile: more spills registers or leaves one program per multiprocessor


def set_mode(mode: str) -> None:
    gemv.USE_PDL = MODES[mode]


MODES["default"] = gemv.USE_PDL  # as shipped


def candidate_configs(K: int) -> list[tuple[int, int, int]]:
    """(BLOCK_N, programs per multiprocessor, num_warps) whose weight tile fits the registers."""
    return [
        (bn, pps, w)
        for bn, pps, w in itertools.product((1, 2, 4, 8), PROGRAMS_PER_SM, (4, 8))
        if bn * (1 << (K - 1).bit_length()) <= MAX_ELEMENTS_PER_THREAD * 32 * w  # BLOCK_K: K to a power of 2
    ]


def graph_time(calls, replays: int = 5) -> float:
    """Median seconds per call over `replays` replays of one graph holding every call in `calls` once."""
    for call in calls[:2]:
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    return statistics.median(replay_seconds(graph, replays)) / len(calls)


def replay_seconds(graph, replays: int, after=lambda: None) -> list[float]:
    """Seconds of each of `replays` replays of `graph`, by CUDA events; after() runs once each replay is done."""
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
        after()
    return times


def gemv_cases(device, dtype):
    """(name, CONFIG_* constant it sets, weight rows, cols, weights per call, fn(weight copy, config)) at the 1.5B
    decode sizes, with the model's operand dtypes (out_proj's attention branch in the KV dtype)."""
    f32 = dict(device=device, dtype=torch.float32)
    D, I, F, V, W_IN = 1600, 3200, 5504, 32001, 8960
    x_d, x_i, x_f, res = torch.randn(D, **f32), torch.randn(I, **f32), torch.randn(F, **f32), torch.randn(D, **f32)
    attn = torch.randn(I, device=device).to(dtype)
    nw_d, nw_i = torch.ones(D, device=device, dtype=dtype), torch.ones(I, device=device, dtype=dtype)
    return [
        ("in_proj norm_gemv", "CONFIG_WIDE", W_IN, D, 1, lambda w, c: gemv.norm_gemv(x_d, nw_d, EPS, w[0], config=c)),
        ("out_proj norm_average_gemv + residual", "CONFIG_MEDIUM", D, I, 1,
         lambda w, c: gemv.norm_average_gemv(attn, x_i, nw_i, nw_i, EPS, w[0], residual=res, config=c)),
        ("gate+up mlp_gemv SwiGLU", "CONFIG_TWO_WEIGHTS", F, D, 2,
         lambda w, c: gemv.mlp_gemv(x_d, nw_d, EPS, w[0], w[1], config=c)),
        ("down_proj gemv + residual", "CONFIG_LONG_ROWS", D, F, 1,
         lambda w, c: gemv.gemv(x_f, w[0], residual=res, config=c)),
        ("x_proj gemv", "CONFIG_FEW_ROWS", 132, I, 1, lambda w, c: gemv.gemv(x_i, w[0], config=c)),
        ("LM head norm_gemv", "CONFIG_VOCAB", V, D, 1, lambda w, c: gemv.norm_gemv(x_d, nw_d, EPS, w[0], config=c)),
    ]  # fmt: skip


def sweep_plan(modes) -> list[tuple[int, tuple, str]]:
    """(case index, config, mode): every candidate config of each product in each mode."""
    cases = gemv_cases("meta", torch.bfloat16)
    return [(i, c, m) for i, case in enumerate(cases) for m in modes for c in candidate_configs(case[3])]


def _compile_some(tasks) -> list[str]:
    """A worker of precompile: runs each (case, config, mode) once so that Triton's disk cache holds it."""
    device, dtype = torch.device("cuda"), torch.bfloat16
    cases, failed = gemv_cases(device, dtype), []
    weights = {}
    for i, config, mode in tasks:
        name, _, N, K, num_mats, fn = cases[i]
        if i not in weights:
            weights[i] = [0.02 * torch.randn(N, K, device=device, dtype=dtype) for _ in range(num_mats)]
        set_mode(mode)
        try:
            fn(weights[i], config)
        except Exception as e:  # a shape Triton cannot compile is reported and skipped by the sweep too
            failed.append(f"{name} {config} {mode}: {type(e).__name__}")
    torch.cuda.synchronize()
    return failed


def precompile(plan, jobs: int) -> None:
    """Compiles the plan's kernels in `jobs` processes at once (compiling, not timing, is most of a sweep's time).
    Programs per multiprocessor only sets the grid: one compile serves all of them."""
    kernels = list({(i, c[0], c[2], m): (i, c, m) for i, c, m in plan}.values())
    chunks = [kernels[j::jobs] for j in range(jobs)]
    with multiprocessing.get_context("spawn").Pool(jobs) as pool:
        for failed in pool.map(_compile_some, chunks):
            for line in failed:
                print(f"  compile: {line}", file=sys.stderr)


def sweep_gemv(device, dtype, plan) -> list[dict]:
    rows = []
    for i, (name, const, N, K, num_mats, fn) in enumerate(gemv_cases(device, dtype)):
        nbytes = num_mats * N * K * dtype.itemsize
        copies = max(2, -(-L2_FLUSH_BYTES // nbytes))
        weights = [
            [0.02 * torch.randn(N, K, device=device, dtype=dtype) for _ in range(num_mats)] for _ in range(copies)
        ]
        results = []
        for _, config, mode in (p for p in plan if p[0] == i):
            set_mode(mode)
            try:
                t = graph_time([lambda w=w, c=config, f=fn: f(w, c) for w in weights])
            except Exception as e:  # a shape Triton cannot compile (e.g. out of shared memory) is just skipped
                print(f"  {name} {config} {mode}: {type(e).__name__}", file=sys.stderr)
                continue
            results.append({"config": config, "mode": mode, "us": t * 1e6, "tb_per_s": nbytes / t / 1e12})
        results.sort(key=lambda r: r["us"])
        rows.append({"case": name, "constant": const, "N": N, "K": K, "bytes": nbytes, "results": results})
        print(f"\n{name} ({N}x{K}{' x2' if num_mats == 2 else ''}, {nbytes / 1e6:.1f} MB):")
        for r in results[:6]:
            print(f"  {r['config']} {r['mode']}: {r['us']:.1f} us, {r['tb_per_s']:.2f} TB/s")
        for r in results:
            if r["config"] == getattr(gemv, const):
                print(f"  current {r['config']} {r['mode']}: {r['us']:.1f} us, {r['tb_per_s']:.2f} TB/s")
        del weights
    set_mode("default")
    return rows


def best_configs(rows: list[dict], mode: str) -> dict[str, tuple]:
    """CONFIG_* constant -> the fastest config of its product in `mode`."""
    best = {}
    for row in rows:
        timed = [r for r in row["results"] if r["mode"] == mode]
        if timed:
            best[row["constant"]] = tuple(min(timed, key=lambda r: r["us"])["config"])
    return best


# --- a decode step's GEMVs in the model's order ---


def chain_weights(device, dtype, num_layers: int) -> tuple[list[dict], dict]:
    D, I, F, V, W_IN, XP = 1600, 3200, 5504, 32001, 8960, 132

    def w(n, k):
        return (0.02 * torch.randn(n, k, device=device)).to(dtype)

    def nw(n):
        return (1 + 0.1 * torch.randn(n, device=device)).to(dtype)

    layers = [
        dict(nw_in=nw(D), w_in=w(W_IN, D), w_x=w(XP, I), na=nw(I), nb=nw(I), w_out=w(D, I), nw_mlp=nw(D),
             w_gate=w(F, D), w_up=w(F, D), w_down=w(D, F))
        for _ in range(num_layers)
    ]  # fmt: skip
    return layers, dict(nw=nw(D), w=w(V, D))


def chain_step(h, layers, head, ops, side=None) -> torch.Tensor:
    """h: (D,) fp32, updated in place; returns the logits. ops: kernels.gemv or a namespace of its twins. The
    PyTorch ops stand in for the conv, SSM, RoPE and attention kernels (launched without PDL, as those are)."""
    norm_gemv, gemv_, norm_average_gemv, mlp_gemv = ops
    for L in layers:
        proj = norm_gemv(h, L["nw_in"], EPS, L["w_in"])  # (8960,) fp32: q | k v | x | z
        if side is not None:
            main = torch.cuda.current_stream()
            side.wait_stream(main)
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            u = proj[2560:5760] * 0.5  # the conv update
            dbc = gemv_(u, L["w_x"])
            y = proj[5760:] * dbc[:1]  # the SSM update
        attn = proj[:3200].to(L["w_out"].dtype)  # RoPE + attention, in the KV dtype
        if side is not None:
            main.wait_stream(side)
        norm_average_gemv(attn, y, L["na"], L["nb"], EPS, L["w_out"], residual=h, out=h)
        act = mlp_gemv(h, L["nw_mlp"], EPS, L["w_gate"], L["w_up"])
        gemv_(act, L["w_down"], residual=h, out=h)
    return norm_gemv(h, head["nw"], EPS, head["w"])


def chain_time(layers, head, h0, side, replays: int = 20) -> tuple[float, list[torch.Tensor]]:
    """Median µs per step of the chain in one CUDA graph, and each replay's logits."""
    ops = (gemv.norm_gemv, gemv.gemv, gemv.norm_average_gemv, gemv.mlp_gemv)
    h = h0.clone()
    for _ in range(2):  # compile outside the capture
        h.copy_(h0)
        chain_step(h, layers, head, ops, side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        h.copy_(h0)
        logits = chain_step(h, layers, head, ops, side)
    outputs = []
    times = replay_seconds(graph, replays, after=lambda: outputs.append(logits.clone()))
    return statistics.median(times) * 1e6, outputs


def chain(device, dtype, modes, num_layers: int = 32) -> list[dict]:
    """Per mode: µs per step of the chain and whether every replay's logits equal the first mode's bit for bit; and
    each mode's relative RMS error against the twins, run eagerly."""
    layers, head = chain_weights(device, dtype, num_layers)
    h0 = torch.randn(1600, device=device)
    twin_ops = (gemv.norm_gemv_ref, gemv.gemv_ref, gemv.norm_average_gemv_ref, gemv.mlp_gemv_ref)
    expected = chain_step(h0.clone(), layers, head, twin_ops)
    side, rows, first = torch.cuda.Stream(device), [], None
    for mode in modes:
        set_mode(mode)
        us, outputs = chain_time(layers, head, h0, side)
        first = outputs[0] if first is None else first
        identical = all(torch.equal(o, first) for o in outputs)
        err = ((outputs[0].double() - expected.double()).norm() / expected.double().norm()).item()
        rows.append({"mode": mode, "us_per_step": us, "bitwise_equal": identical, "rel_rms_vs_twins": err})
        print(f"chain {mode}: {us:.1f} us per step ({num_layers} layers + LM head), "
              f"replays bit-identical to the first mode: {identical}, rel. RMS vs twins {err:.2e}")  # fmt: skip
    set_mode("default")
    return rows


def tune_in_chain(device, dtype, rows: list[dict], mode: str, top: int = 6, passes: int = 2) -> dict[str, tuple]:
    """From each product's fastest config alone, one product at a time: its `top` fastest alone, kept where the whole
    chain is faster (> 0.3 %). Neighbours in the chain share the GPU (PDL runs the next kernel's first loads beside
    this one's last), so the chain's best can differ from each product's. Sets and returns the CONFIG_* values."""
    set_mode(mode)
    layers, head = chain_weights(device, dtype, 32)
    h0, side = torch.randn(1600, device=device), torch.cuda.Stream(device)
    best = best_configs(rows, mode)
    for name, config in best.items():
        setattr(gemv, name, config)
    best_us = chain_time(layers, head, h0, side)[0]
    print(f"\ntuning in the chain ({mode}), from each product's own best: {best_us:.1f} us")
    for _ in range(passes):
        for row in rows:
            timed = sorted((r for r in row["results"] if r["mode"] == mode), key=lambda r: r["us"])
            for candidate in [tuple(r["config"]) for r in timed[:top]]:
                if candidate == best[row["constant"]]:
                    continue
                setattr(gemv, row["constant"], candidate)
                us = chain_time(layers, head, h0, side)[0]
                if us < best_us * 0.997:
                    best[row["constant"]], best_us = candidate, us
                    print(f"  {row['constant']} = {candidate}: {us:.1f} us")
                setattr(gemv, row["constant"], best[row["constant"]])
    print(f"tuned: {best_us:.1f} us per step, {best}")
    set_mode("default")
    return best


def sweep_ssm(device, dtype, block_ds) -> list[dict]:
    f32 = dict(device=device, dtype=torch.float32)
    d, N, R = 3200, 16, 100
    copies = 64  # states, A and dt_proj per layer-like copy, so the inputs are not all in L2 either
    args = [
        (torch.zeros(d, N, **f32), torch.randn(d, **f32), torch.randn(R + 2 * N, **f32),
         0.02 * torch.randn(d, R, device=device, dtype=dtype), torch.full((d,), -2.0, **f32),
         -torch.rand(d, N, **f32), torch.ones(d, **f32), torch.randn(d, **f32),
         (torch.ones(R, device=device, dtype=dtype), torch.ones(N, device=device, dtype=dtype),
          torch.ones(N, device=device, dtype=dtype)), 1e-6)
        for _ in range(copies)
    ]  # fmt: skip
    rows = []
    for block_d in block_ds:
        ssm_update.BLOCK_D = block_d
        t = graph_time([lambda a=a: ssm_update.ssm_update(*a) for a in args])
        rows.append({"BLOCK_D": block_d, "us": t * 1e6})
        print(f"ssm_update BLOCK_D {block_d}: {t * 1e6:.2f} us")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.sweep_gemv", description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write every measurement here")
    parser.add_argument("--modes", default="plain,pdl", help="every config is timed in each of these")
    parser.add_argument("--jobs", type=int, default=1, help="compile the kernels in this many processes first")
    parser.add_argument("--chain", default="", help="modes to time the whole decode chain in, e.g. plain,pdl")
    parser.add_argument("--apply", action="store_true", help="time the chain again with the sweep's winners")
    parser.add_argument("--tune", action="store_true", help="with --apply: tune the winners in the chain first")
    parser.add_argument("--ssm", action="store_true", help="also sweep ssm_update's BLOCK_D")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("tools.sweep_gemv needs a CUDA device", file=sys.stderr)
        return 2
    device, dtype = torch.device("cuda"), torch.bfloat16
    plan = sweep_plan([m for m in args.modes.split(",") if m])
    if args.jobs > 1:
        precompile(plan, args.jobs)
    result = {"gemv": sweep_gemv(device, dtype, plan)}
    chain_modes = [m for m in args.chain.split(",") if m]
    if chain_modes:
        result["chain"] = chain(device, dtype, chain_modes)
    if args.apply and chain_modes:
        result["winners"] = best_configs(result["gemv"], chain_modes[-1])
        print(f"\nthe sweep's winners in {chain_modes[-1]}: {result['winners']}")
        if args.tune:
            result["winners"] = tune_in_chain(device, dtype, result["gemv"], chain_modes[-1])
        for name, config in result["winners"].items():
            setattr(gemv, name, config)
        result["chain_winners"] = chain(device, dtype, chain_modes)
    if args.ssm:
        result["ssm_update"] = sweep_ssm(device, dtype, (8, 16, 32, 64, 128))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
