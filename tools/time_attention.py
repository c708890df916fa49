"""Times attention_prefill on the device at the 1.5B's shapes: a 1024-token prompt (T=1024 queries at 128..1151 over
the 1152 meta + prompt keys, sliding and global) and an 8k prompt in four 2048-token chunks (sliding and global), each
replayed from a CUDA graph, median of the replays. Compares block configs of kernels/attention.py: a config is
BLOCK_M,BLOCK_N,num_warps,num_stages[,masked num_stages], or "default" for the file's own PREFILL_CONFIG.

python -m tools.time_attention [--configs BM,BN,W,S[,MS] ...] [--reps 15] [--budget 90] [--out file.jsonl]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from kernels import attention
from tools.sweep_gemv import replay_seconds

H, HK, DQ, DV, M, W = 25, 5, 64, 128, 128, 1024


def make_cases(device):
    act = dict(device=device, dtype=torch.bfloat16)
    cases = {}
    for window in (W, None):
        kind = "sliding" if window else "global"
        q_pos = torch.arange(M, M + 1024, device=device)
        k_pos = torch.arange(M + 1024, device=device)
        one_k = [
            (
                torch.randn(1024, H, DQ, **act),
                torch.randn(HK, M + 1024, DQ, **act),
                torch.randn(HK, M + 1024, DV, **act),
                q_pos,
                k_pos,
                window,
                M,
            )
        ]
        cases[f"1k {kind}"] = one_k
        calls = []
        for start in range(M, M + 8192, 2048):
            lo = M if window is None else max(M, start - window)
            k_pos = torch.cat([torch.arange(M), torch.arange(lo, start + 2048)]).to(device)
            S = k_pos.numel()
            calls.append(
                (
                    torch.randn(2048, H, DQ, **act),
                    torch.randn(HK, S, DQ, **act),
                    torch.randn(HK, S, DV, **act),
                    torch.arange(start, start + 2048, device=device),
                    k_pos,
                    window,
                    M,
                )
            )
        cases[f"8k {kind}"] = calls
    return cases


def flops(calls) -> int:
    total = 0
    for _, _, _, q_pos, k_pos, window, num_meta in calls:
        visible = k_pos[None, :] <= q_pos[:, None]
        if window is not None:
            visible &= (k_pos[None, :] < num_meta) | (q_pos[:, None] - k_pos[None, :] <= window)
        total += 2 * H * (DQ + DV) * int(visible.sum())
    return total


def time_graph(fn, inner: int, reps: int) -> list[float]:
    """µs per fn() call: fn captured `inner` times in one graph, each replay timed by events."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(inner):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    return [seconds * 1e6 / inner for seconds in replay_seconds(graph, reps)]


def rel_err(out, ref) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--configs", nargs="*", default=["default"], help='"default": the file\'s PREFILL_CONFIG')
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--budget", type=float, default=90.0, help="seconds; configs past it are skipped")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    t0 = time.perf_counter()
    device = torch.device("cuda")
    torch.manual_seed(0)
    cases = make_cases(device)
    refs = {name: [attention.attention_prefill_ref(*c) for c in calls] for name, calls in cases.items()}
    case_flops = {name: flops(calls) for name, calls in cases.items()}
    rows = []

    def record(label, fn_module):
        for name, calls in cases.items():
            outs = [fn_module.attention_prefill(*c) for c in calls]
            err = max(rel_err(o, r) for o, r in zip(outs, refs[name], strict=True))
            inner = 20 if name.startswith("1k") else 2
            times = time_graph(lambda calls=calls: [fn_module.attention_prefill(*c) for c in calls], inner, args.reps)
            med = statistics.median(times)
            row = {
                "config": label,
                "case": name,
                "median_us": med,
                "min_us": min(times),
                "max_us": max(times),
                "tflops": case_flops[name] / med / 1e6,
                "rel_err": err,
            }
            rows.append(row)
            print(
                f"{label:>14} {name:>11}: {med:8.1f} us (min {min(times):.1f}, max {max(times):.1f}) "
                f"{row['tflops']:6.1f} TFLOP/s err {err:.1e}  [{time.perf_counter() - t0:.0f} s]",
                flush=True,
            )
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")

    default_config = attention.PREFILL_CONFIG
    for config in args.configs:
        if time.perf_counter() - t0 > args.budget:
            print(f"budget spent: skipped {config}")
            continue
        if config == "default":
            attention.PREFILL_CONFIG = default_config
        else:
            values = tuple(map(int, config.split(",")))
            values += values[3:4] * (5 - len(values))  # the masked tiles' stages default to the others'
            attention.PREFILL_CONFIG = values
        try:
            record(config, attention)
        except Exception as e:  # a config that does not compile (shared memory, registers) is reported, not fatal
            print(f"{config}: {type(e).__name__}: {str(e)[:300]}")
    by_config = {}
    for row in rows:
        by_config.setdefault(row["config"], {})[row["case"]] = row["median_us"]
    print("\nconfig          1k(29s+3g)/32  8k sliding  8k global")
    for config, r in by_config.items():
        if len(r) == 4:
            print(
                f"{config:>14} {(29 * r['1k sliding'] + 3 * r['1k global']) / 32:12.1f} "
                f"{r['8k sliding']:11.1f} {r['8k global']:10.1f}"
            )


if __name__ == "__main__":
    main()
