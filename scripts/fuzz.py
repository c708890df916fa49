"""Fuzz every operation of the server's OpenAPI document at length (tests/hardening/test_fuzz.py is the CI-sized run).

    python -m scripts.fuzz [--cases 1000] [--seed 0] [--out fuzz.json]

Serves the tiny conformance checkpoint in-process on 127.0.0.1 (CPU, one thread) and runs --cases Hypothesis cases
per operation from tests/hardening/fuzzing.py: no 5xx, every error in OpenAI's shape, the server healthy after each
operation. Prints, and with --out writes, the cases run per operation, by kind and by status, and any failure with
the case Hypothesis shrank it to. Exits 1 on any failure.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

import httpx
import torch
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from server.settings import Settings
from tests.hardening import fuzzing
from tests.server.conftest import ODD_6L, LiveServer, load_engine, start_server


def fuzz_operation(live: LiveServer, schema: dict, op: fuzzing.Operation, num_cases: int, seed_value: int) -> dict:
    kinds: collections.Counter[str] = collections.Counter()
    statuses: collections.Counter[int] = collections.Counter()
    client = httpx.Client(base_url=live.url, timeout=120)

    @seed(seed_value)
    @settings(
        max_examples=num_cases,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(st.data())
    def run(data):
        case = data.draw(fuzzing.cases(op, schema, live.ctx.model_name))
        r = case.send(client)
        kinds[case.kind] += 1
        statuses[r.status_code] += 1
        fuzzing.check_response(case, r)

    started = time.monotonic()
    failure = None
    try:
        run()
    except Exception as e:  # Hypothesis re-raises the shrunk failure; report it and go on to the next operation
        failure = f"{type(e).__name__}: {e}"[:2000]
    finally:
        client.close()
    health = httpx.get(live.url + "/health").status_code
    return {
        "cases": sum(kinds.values()),
        "seconds": round(time.monotonic() - started, 1),
        "by_kind": dict(sorted(kinds.items())),
        "by_status": {str(k): v for k, v in sorted(statuses.items())},
        "healthy_after": health == 200,
        "failure": failure,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=1000, help="cases per operation")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    torch.set_num_threads(1)  # see one_torch_thread in tests/server/conftest.py
    live = start_server(Settings(model=str(ODD_6L)), [load_engine(max_model_len=40)])
    try:
        schema = httpx.get(live.url + "/openapi.json").json()
        report = {}
        for op in fuzzing.operations(schema):
            report[op.name] = fuzz_operation(live, schema, op, args.cases, args.seed)
            print(op.name, json.dumps(report[op.name], ensure_ascii=False), flush=True)
        server_errors = live.metric("hymba_errors_total", type="server_error")
    finally:
        live.stop()
    total = sum(r["cases"] for r in report.values())
    ok = server_errors == 0 and all(r["failure"] is None and r["healthy_after"] for r in report.values())
    summary = {"operations": report, "total_cases": total, "server_errors": server_errors, "ok": ok}
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    print(f"{total} cases over {len(report)} operations; server errors {server_errors:g}; {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
