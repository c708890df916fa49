"""python scripts/engine_rate.py MODEL_DIR: the engine's own streaming rate, the figure HTTP delivery is judged against.

Runs Engine.generate in-process exactly as a server worker does (sampling, detokenizing, stop checks included, no
HTTP), for one prompt of --prompt-tokens and --max-tokens generated tokens, and prints the rate between the first
and the last token (what a streaming client sees after TTFT) as a median with its min-max over --runs runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from engine.api import GenerationRequest, SamplingParams
from engine.generate import Engine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--temperature", type=float, default=1.0)
    args = parser.parse_args()
    engine = Engine.load(args.model, device=args.device)
    prompt = tuple(range(3, 3 + args.prompt_tokens))
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, ignore_eos=True, seed=0)
    rates = []
    for _ in range(args.runs + 1):  # the first run warms up
        times = [time.perf_counter() for _ in engine.generate(GenerationRequest(prompt, params))]
        rates.append((len(times) - 1) / (times[-1] - times[0]))
    rates = rates[1:]
    result = {
        "tokens_per_s": {"median": statistics.median(rates), "min": min(rates), "max": max(rates)},
        "max_tokens": args.max_tokens,
        "prompt_tokens": args.prompt_tokens,
        "temperature": args.temperature,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
