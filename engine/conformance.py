"""python -m engine.conformance DIR [DIR ...] [--device cpu|cuda] [--dtype float32|bfloat16]

Checks the engine against golden vectors in the format of shared/conformance/README.md: one prefill of each
prompt (every row), teacher-forced decode of the golden continuation, free-running greedy decoding, and a chunked
prefill of prompt + continuation where the folder has one. On CUDA the two decodes and the greedy run's prefill go
through what the server replays (engine/graph.py: the decode graph, the padded prefill graphs). Prints one row per
case; exits 0 only if all pass.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from engine.config import ConfigError
from engine.graph import DecodeGraph, Prefill
from engine.loader import load_model
from engine.model import HymbaForCausalLM
from engine.state import DecodeState
from engine.weights import CheckpointError


@dataclass(frozen=True)
class Tolerance:
    """The README's suggested limits. fp32: every row within max_abs. bf16: cosine and max_abs per row, argmax
    where the golden margin is clear, greedy ids up to the first row whose margin is below greedy_margin."""

    max_abs: float
    min_cosine: float
    argmax_margin: float | None
    greedy_margin: float  # greedy must match up to the first row whose golden margin is below this


TOLERANCES = {
    torch.float32: Tolerance(max_abs=1e-3, min_cosine=0.0, argmax_margin=None, greedy_margin=0.0),
    torch.bfloat16: Tolerance(max_abs=0.5, min_cosine=0.999, argmax_margin=0.5, greedy_margin=0.5),
}


@dataclass
class RowStats:
    max_abs: float = 0.0
    min_cosine: float = 1.0
    argmax_misses: int = 0

    def add(self, got: torch.Tensor, want: torch.Tensor, margins: torch.Tensor, tol: Tolerance) -> None:
        """got, want: (rows, V) fp32 logits; margins: (rows,) golden top-1 minus top-2."""
        got, want = got.float().cpu(), want.float()
        self.max_abs = max(self.max_abs, (got - want).abs().max().item())
        self.min_cosine = min(self.min_cosine, torch.cosine_similarity(got, want, dim=-1).min().item())
        if tol.argmax_margin is not None:
            clear = margins >= tol.argmax_margin
            self.argmax_misses += int((got.argmax(-1) != want.argmax(-1))[clear].sum())

    def ok(self, tol: Tolerance) -> bool:
        return self.max_abs <= tol.max_abs and self.min_cosine >= tol.min_cosine and self.argmax_misses == 0


def margins_of(logits: torch.Tensor) -> torch.Tensor:
    top2 = logits.float().topk(2, dim=-1).values
    return top2[..., 0] - top2[..., 1]


def check_case(
    model: HymbaForCausalLM,
    state: DecodeState,
    served_prefill: Prefill,
    step,
    vec: dict,
    key: str,
    tol: Tolerance,
    window: int | None,
):
    """step: the decode the server runs (a DecodeGraph's replay on CUDA, model.decode on the CPU)."""
    device = state.ssm.device
    prompt = vec[f"{key}.prompt_ids"].to(device)
    gen_ids, gen_logits, gen_margin = vec[f"{key}.gen_ids"], vec[f"{key}.gen_logits"], vec[f"{key}.gen_margin"]
    T = gen_ids.numel()

    prefill = RowStats()
    state.reset()
    logits = model.prefill(prompt, state, all_logits=True)
    want = vec[f"{key}.prefill_logits"]
    prefill.add(logits, want, margins_of(want), tol)

    decode = RowStats()  # teacher-forced: feed the golden ids whatever we would have picked
    rows = [logits[-1]]
    for t in range(1, T):
        rows.append(step(gen_ids[t - 1].to(device), state).clone())  # a graph's logits buffer is reused
    decode.add(torch.stack(rows), gen_logits, gen_margin, tol)

    logits, greedy = served_prefill(prompt), []  # free-running greedy, from a reset state
    for t in range(T):
        greedy.append(int(logits.argmax()))
        if t + 1 < T:
            logits = step(torch.tensor(greedy[-1], device=device), state)
    low = (gen_margin < tol.greedy_margin).nonzero()
    checked = int(low[0]) if len(low) else T  # rows before the first one whose golden margin is within noise
    greedy_ok = greedy[:checked] == gen_ids[:checked].tolist()
    num_matching = next((t for t in range(T) if greedy[t] != int(gen_ids[t])), T)

    chunked = None
    if f"{key}.tf_prefill_logits" in vec:  # chunked prefill of prompt + gen[:-1] must equal one prefill
        chunked = RowStats()
        state.reset()
        full = torch.cat([prompt, gen_ids[:-1].to(device)])
        chunk = max(1, (window or full.numel()) // 2 + 1)  # chunks that straddle the window edge
        got = model.prefill(full, state, all_logits=True, chunk_size=chunk)[prompt.numel() - 1 :]
        want = vec[f"{key}.tf_prefill_logits"]
        chunked.add(got, want, margins_of(want), tol)
    return prefill, decode, greedy_ok, num_matching, checked, chunked


def check_folder(folder: Path, device: str, dtype: str) -> bool:
    vec = load_file(str(folder / "vectors.safetensors"))
    cases = json.loads((folder / "cases.json").read_text())["cases"]
    keys = [c["key"] for c in cases]
    need = max(vec[f"{k}.prompt_ids"].numel() + vec[f"{k}.gen_ids"].numel() for k in keys)
    config, model, state = load_model(folder, device, dtype, max_model_len=need)
    tol = TOLERANCES[model.model.embed_tokens.weight.dtype]
    served_prefill = Prefill(model, state)  # padded CUDA graphs on CUDA, captured once per folder; CPU: model.prefill
    step = DecodeGraph(model, state).decode if state.pos.is_cuda else model.decode
    all_ok = True
    for case in cases:
        prefill, decode, greedy_ok, num_matching, checked, chunked = check_case(
            model, state, served_prefill, step, vec, case["key"], tol, config.sliding_window
        )
        ok = prefill.ok(tol) and decode.ok(tol) and greedy_ok and (chunked is None or chunked.ok(tol))
        all_ok &= ok
        print(
            f"{folder.name:<22} {case['key']:<6} {case['name']:<20} {case['prompt_len']:>4} "
            f"{prefill.max_abs:>9.2e} {decode.max_abs:>9.2e} {min(prefill.min_cosine, decode.min_cosine):>8.5f} "
            f"{prefill.argmax_misses + decode.argmax_misses:>5} {num_matching:>3}/{len(vec[case['key'] + '.gen_ids'])}"
            f"{'' if checked == len(vec[case['key'] + '.gen_ids']) else f' (first {checked})':<12} "
            f"{'-' if chunked is None else f'{chunked.max_abs:.2e}':>9}  {'PASS' if ok else 'FAIL'}"
        )
    return all_ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.conformance", description=__doc__.splitlines()[2])
    parser.add_argument("dirs", nargs="+", type=Path, help="folders in the conformance vectors format")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args(argv)
    print(f"device {args.device}, dtype {args.dtype}; max |dlogit| per row, min cosine, argmax misses on clear rows")
    print(
        f"{'config':<22} {'case':<6} {'name':<20} {'n':>4} {'prefill':>9} {'decode':>9} {'cosine':>8} "
        f"{'miss':>5} {'greedy':>6}{'':<12} {'chunked':>9}  result"
    )
    all_ok = True
    for folder in args.dirs:
        try:
            all_ok &= check_folder(folder, args.device, args.dtype)
        except (ConfigError, CheckpointError, ValueError, SafetensorError, OSError, KeyError) as e:
            print(f"error: {folder}: {e}", file=sys.stderr)
            return 2
    print("all cases pass" if all_ok else "SOME CASES FAIL")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
