"""`python -m loadtest`: argv -> LoadTestConfig -> the runs -> tables on stdout, results.json, summary.txt, PNGs.

Exit status: 0 when some request completed, 1 when none did, 2 for a bad flag or a server that cannot be used
(one line on stderr), 130 on Ctrl-C.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence

from loadtest.config import LoadTestError, parse_args
from loadtest.report import format_report, write_json
from loadtest.runner import run_benchmark


def main(argv: Sequence[str] | None = None) -> int:
    try:
        cfg = parse_args(argv)
        cfg.out.mkdir(parents=True, exist_ok=True)
        bench = asyncio.run(run_benchmark(cfg))
    except LoadTestError as e:
        print(f"loadtest: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # --out cannot be made
        print(f"loadtest: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("loadtest: interrupted", file=sys.stderr)
        return 130
    report = format_report(bench)
    write_json(bench, cfg.out / "results.json")
    (cfg.out / "summary.txt").write_text(report + "\n", encoding="utf-8")
    written = ["results.json", "summary.txt"]
    try:
        from loadtest.plots import write_plots

        written += [p.name for p in write_plots(bench, cfg.out)]
    except ImportError:
        print("loadtest: matplotlib is not installed: no PNG plots (pip install matplotlib)", file=sys.stderr)
    print(f"{report}\n\nwrote {', '.join(written)} to {cfg.out}")
    return 0 if any(run.metrics.completed for run in bench.runs) else 1


if __name__ == "__main__":
    sys.exit(main())
