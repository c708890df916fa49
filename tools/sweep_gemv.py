"""python -m tools.sweep_gemv: launch shapes of the decode kernels at the Hymba-1.5B sizes, timed as decode runs them.

Each candidate is captured in a CUDA graph of many calls that rotate over enough copies of the weights (> 2x the
H100's 50 MB L2) that every call reads its weight from HBM, as in a real decode step where each layer's weights
are read once. Prints, per shape, every config's µs and achieved TB/s, best first; the winners go into
kernels/gemv.py CONFIGS and kernels/ssm_update.py BLOCK_D by hand, with the numbers in docs/PERFORMANCE.md.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import statistics
import sys

import torch

# the modules: kernels.gemv and kernels.ssm_update themselves are the dispatching functions
gemv, ssm_update = (importlib.import_module(f"kernels.{name}") for name in ("gemv", "ssm_update"))

L2_FLUSH_BYTES = 160 << 20  # weights cycled per graph: well past the 50 MB L2


def graph_time(calls) -> float:
    """Median seconds per call over 5 replays of one graph holding every call in `calls` once."""
    for call in calls[:2]:
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / len(calls))
    return statistics.median(times)


def gemv_cases(device, dtype):
    """(name, weight rows, cols, fn(weight copy, config)) at the 1.5B decode sizes."""
    f32 = dict(device=device, dtype=torch.float32)
    D, I, F, V, W_IN = 1600, 3200, 5504, 32001, 8960
    x_d, x_i, x_f, res = torch.randn(D, **f32), torch.randn(I, **f32), torch.randn(F, **f32), torch.randn(D, **f32)
    nw_d, nw_i = torch.ones(D, device=device, dtype=dtype), torch.ones(I, device=device, dtype=dtype)
    return [
        ("in_proj norm_gemv", W_IN, D, 1, lambda w, c: gemv.norm_gemv(x_d, nw_d, 1e-6, w[0], config=c)),
        ("out_proj norm_average_gemv + residual", D, I, 1,
         lambda w, c: gemv.norm_average_gemv(x_i, x_i, nw_i, nw_i, 1e-6, w[0], residual=res, config=c)),
        ("gate+up mlp_gemv SwiGLU", F, D, 2, lambda w, c: gemv.mlp_gemv(x_d, nw_d, 1e-6, w[0], w[1], config=c)),
        ("down_proj gemv + residual", D, F, 1, lambda w, c: gemv.gemv(x_f, w[0], residual=res, config=c)),
        ("x_proj gemv", 132, I, 1, lambda w, c: gemv.gemv(x_i, w[0], config=c)),
        ("LM head norm_gemv", V, D, 1, lambda w, c: gemv.norm_gemv(x_d, nw_d, 1e-6, w[0], config=c)),
    ]  # fmt: skip


def sweep_gemv(device, dtype, configs) -> list[dict]:
    rows = []
    for name, N, K, num_mats, fn in gemv_cases(device, dtype):
        nbytes = num_mats * N * K * dtype.itemsize
        copies = max(2, -(-L2_FLUSH_BYTES // nbytes))
        weights = [
            [0.02 * torch.randn(N, K, device=device, dtype=dtype) for _ in range(num_mats)] for _ in range(copies)
        ]
        results = []
        for config in configs:
            try:
                t = graph_time([lambda w=w, c=config, f=fn: f(w, c) for w in weights])
            except Exception as e:  # a shape Triton cannot compile (e.g. out of shared memory) is just skipped
                print(f"  {name} {config}: {type(e).__name__}", file=sys.stderr)
                continue
            results.append({"config": config, "us": t * 1e6, "tb_per_s": nbytes / t / 1e12})
        results.sort(key=lambda r: r["us"])
        rows.append({"case": name, "N": N, "K": K, "bytes": nbytes, "results": results})
        print(f"\n{name} ({N}x{K}{' x2' if num_mats == 2 else ''}, {nbytes / 1e6:.1f} MB):")
        for r in results[:6]:
            print(f"  {r['config']}: {r['us']:.1f} us, {r['tb_per_s']:.2f} TB/s")
        current = next((r for r in results if r["config"] == gemv.launch_config(N, K)), None)
        if current:
            print(f"  current {current['config']}: {current['us']:.1f} us, {current['tb_per_s']:.2f} TB/s")
        del weights
    return rows


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
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("tools.sweep_gemv needs a CUDA device", file=sys.stderr)
        return 2
    device, dtype = torch.device("cuda"), torch.bfloat16
    configs = [
        (bn, bk, w, s)
        for bn, bk, w, s in itertools.product((1, 2, 4, 8, 16), (256, 512, 1024, 2048), (4, 8), (1, 3))
        if bn * bk <= 16384 and bn * bk >= 512
    ]
    result = {"gemv": sweep_gemv(device, dtype, configs), "ssm_update": sweep_ssm(device, dtype, (8, 16, 32, 64, 128))}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
