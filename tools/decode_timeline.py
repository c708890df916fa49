"""Where a decode step's time goes inside its CUDA graph, kernel by kernel (issue 5).

python -m tools.decode_timeline [--context 1024] [--replays 6] [--json FILE]

engine.bench splits a step by profiling eager steps; inside the graph kernels overlap (PDL, the SSM chain's side
stream), so a sum of kernel times says little about the critical path. CUPTI records every kernel of a graph replay
too: this replays the Hymba-1.5B decode graph (random weights, bf16) after a prompt of --context tokens under
torch.profiler, assigns each kernel to its layer and product, and prints, per layer kind (sliding / global), the
median time at which each kernel's first program starts and its last one ends, counted from the end of the layer's
in_proj, and the critical path through the layer with each product's floor (its weights at the copy bandwidth).

Kernels are told apart by name, and the GEMVs by their grid (kernels/gemv.py grid_size for each weight's shape);
out_proj and down_proj share a grid at this size, so the first after in_proj is out_proj and the one after gate/up
is down_proj.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import statistics
import tempfile
from pathlib import Path

import torch

GEMV = importlib.import_module("kernels.gemv")  # `kernels.gemv` is the dispatching function
PARTS = ("attention", "conv", "x_proj", "ssm_update", "out_proj", "gate_up", "down")


def gemv_grids(config, num_sms: int) -> dict[int, str]:
    """grid -> product, for the decode GEMVs of config (in_proj of producer and consumer layers differ in width)."""
    D, I = config.hidden_size, config.d_inner
    shapes = {"in_proj": [(config.in_proj_width(i), D, False) for i in range(config.num_hidden_layers)],
              "x_proj": [(config.dt_rank + 2 * config.mamba_d_state, I, False)],
              "gate_up": [(config.intermediate_size, D, True)], "lm_head": [(config.vocab_size, D, False)]}  # fmt: skip
    grids = {}
    for name, entries in shapes.items():
        for N, K, two in entries:
            block_n, per_sm, _ = GEMV.launch_config(N, K, two)
            grids[GEMV.grid_size(N, block_n, per_sm, num_sms)] = name
    return grids


def assign(kernels: list[dict], grids: dict[int, str]) -> list[dict]:
    """kernels: {"name", "grid", "start", "end"} (µs), any order -> one dict per complete layer: part -> kernel,
    plus "global" (its attention has more splits than the sliding layers')."""
    layers, layer = [], None
    for k in sorted(kernels, key=lambda k: k["start"]):
        name, grid = k["name"], k["grid"]
        part = None
        if "_gemv_kernel" in name:
            part = grids.get(grid[0], "out_or_down")
            if part == "out_or_down":
                part = "down" if layer is not None and "gate_up" in layer else "out_proj"
        elif "_attention_decode" in name:
            part = "attention"
        elif "_causal_conv1d_update" in name:
            part = "conv"
        elif "_ssm_update" in name:
            part = "ssm_update"
        if part == "in_proj":
            layer = {"in_proj": k}
            layers.append(layer)
        elif part is not None and part != "lm_head" and layer is not None:
            layer[part] = k
    complete = [layer for layer in layers if all(p in layer for p in PARTS)]
    splits = [layer["attention"]["grid"][1] for layer in complete]
    for layer in complete:
        layer["global"] = layer["attention"]["grid"][1] > min(splits)
    return complete


def summarize(layers: list[dict]) -> dict[str, dict[str, float]]:
    """Per layer kind, medians (µs after the layer's in_proj ends) of each part's first start and last end, and the
    critical path: the chains (the later of attention and ssm_update), then each product from the end of the one
    before it (in_proj: the next layer's, from this one's down_proj)."""
    out = {}
    following = {id(a): b for a, b in itertools.pairwise(layers) if b["in_proj"]["start"] > a["down"]["start"]}
    for kind in ("sliding", "global"):
        members = [x for x in layers if x["global"] == (kind == "global")]
        if not members:
            continue
        row = {"layers": len(members)}
        for part in PARTS:
            row[f"{part} start"] = statistics.median(x[part]["start"] - x["in_proj"]["end"] for x in members)
            row[f"{part} end"] = statistics.median(x[part]["end"] - x["in_proj"]["end"] for x in members)
        chains = [max(x["attention"]["end"], x["ssm_update"]["end"]) for x in members]
        row["path chains"] = statistics.median(c - x["in_proj"]["end"] for c, x in zip(chains, members, strict=True))
        row["path out_proj"] = statistics.median(x["out_proj"]["end"] - c for c, x in zip(chains, members, strict=True))
        row["path gate_up"] = statistics.median(x["gate_up"]["end"] - x["out_proj"]["end"] for x in members)
        row["path down"] = statistics.median(x["down"]["end"] - x["gate_up"]["end"] for x in members)
        nexts = [following[id(x)]["in_proj"]["end"] - x["down"]["end"] for x in members if id(x) in following]
        if nexts:
            row["path in_proj"] = statistics.median(nexts)
        out[kind] = row
    return out


def floors(config, bandwidth: float) -> dict[str, float]:
    """µs to read each product's weights (bf16) at `bandwidth` bytes/s (in_proj: a producer layer's, the widest)."""
    D, I, F = config.hidden_size, config.d_inner, config.intermediate_size
    width = max(config.in_proj_width(i) for i in range(config.num_hidden_layers))
    sizes = {"out_proj": D * I, "gate_up": 2 * F * D, "down": D * F, "in_proj": width * D}
    return {part: 2 * n / bandwidth * 1e6 for part, n in sizes.items()}


def trace(context: int, replays: int) -> tuple[list[dict], object]:
    from torch.profiler import ProfilerActivity, profile

    from engine.bench import HYMBA_1_5B, random_weights
    from engine.config import HymbaConfig
    from engine.graph import DecodeGraph
    from engine.model import HymbaForCausalLM
    from engine.state import DecodeState

    device, dtype = torch.device("cuda"), torch.bfloat16
    config = HymbaConfig.from_dict(HYMBA_1_5B, "Hymba-1.5B")
    max_len = context + 64
    model = HymbaForCausalLM.from_tensors(
        config, random_weights(config, device, dtype), config.num_memory_tokens + max_len
    )
    state = DecodeState(config, max_len, device, dtype)
    model.prefill_meta_tokens(state)
    graph = DecodeGraph(model, state)
    state.reset()
    token = model.prefill(torch.randint(3, config.vocab_size, (context,), device=device), state).argmax()
    for _ in range(3):
        token = graph.decode(token, state).argmax()
    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            token = graph.decode(token, state).argmax()
        torch.cuda.synchronize(device)
    with tempfile.TemporaryDirectory() as tmp:  # the Chrome trace is where each kernel's grid is kept
        prof.export_chrome_trace(f"{tmp}/trace.json")
        events = json.loads(Path(f"{tmp}/trace.json").read_text())["traceEvents"]
    kernels = [{"name": e["name"], "grid": tuple(e.get("args", {}).get("grid", ())), "start": e["ts"],
                "end": e["ts"] + e["dur"]} for e in events if e.get("cat") == "kernel"]  # fmt: skip
    return kernels, config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.decode_timeline", description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--replays", type=int, default=6)
    parser.add_argument("--json", type=Path, help="also write the kernel records and the summary here")
    args = parser.parse_args(argv)
    from engine.bench import ceilings

    kernels, config = trace(args.context, args.replays)
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    bandwidth = ceilings(torch.device("cuda"))[0]
    summary = summarize(assign(kernels, gemv_grids(config, num_sms)))
    floor = floors(config, bandwidth)
    print(f"{torch.cuda.get_device_name(0)}: decode graph after {args.context} tokens, {args.replays} replays; "
          f"µs after the layer's in_proj ends (medians over layers); copy {bandwidth / 1e12:.2f} TB/s")  # fmt: skip
    for kind, row in summary.items():
        print(f"\n{kind} layers ({row['layers']})")
        for part in PARTS:
            print(f"  {part:12s} first program {row[f'{part} start']:7.2f}   last ends {row[f'{part} end']:7.2f}")
        print("  critical path:", ", ".join(
            f"{part} {row[f'path {part}']:.2f}" + (f" (floor {floor[part]:.2f})" if part in floor else "")
            for part in ("chains", "out_proj", "gate_up", "down", "in_proj") if f"path {part}" in row))  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"kernels": kernels, "summary": summary}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
