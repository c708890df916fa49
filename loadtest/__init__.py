"""Load tests for any OpenAI-compatible server: TTFT, ITL, TPOT, E2EL and throughput under concurrency, with plots.

`python -m loadtest --help`; docs/LOADTEST.md explains the metrics and how to run it. Needs only httpx, plus
matplotlib for the PNGs.
"""
