#!/usr/bin/env bash
# The H100 serving figures of docs/PERFORMANCE.md in one go, run on the device from the repo root with $OUT set and
# the server's wheels in .whl/: engine.bench, the engine's own streaming rate (scripts/engine_rate.py), then
# hymba-serve on a Hymba-1.5B-shaped random checkpoint under loadtest (one 512-token stream; a concurrency sweep).
set -x
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:.
python -m tools.random_checkpoint /tmp/h15 > "$OUT/ckpt.txt" 2>&1
if [ -z "$SKIP_BENCH" ]; then  # SKIP_BENCH=1: the serving runs only (e.g. DEVICES=cuda:0,cuda:1 SWEEP_REQUESTS=32 for two workers)
    timeout 280 python -m engine.bench --runs 5 --json "$OUT/bench.json" > "$OUT/bench.txt" 2>&1
    python scripts/engine_rate.py /tmp/h15 --max-tokens 512 > "$OUT/engine_rate.txt" 2>&1
fi
python -m server --model /tmp/h15 --device "${DEVICES:-cuda}" --port 8000 > "$OUT/server.log" 2>&1 &
for _ in $(seq 120); do curl -sf 127.0.0.1:8000/health > /dev/null && break; sleep 1; done
python -m loadtest --url http://127.0.0.1:8000 --model h15 --concurrency 1 --requests 5 --prompt-tokens 128 \
    --max-tokens 512 --out "$OUT/lt-stream512" > "$OUT/lt-stream512.txt" 2>&1
python -m loadtest --url http://127.0.0.1:8000 --model h15 --concurrency 1,2,4,8,16 --requests "${SWEEP_REQUESTS:-16}" \
    --prompt-tokens 256 --max-tokens 128 --out "$OUT/lt-sweep" > "$OUT/lt-sweep.txt" 2>&1
curl -s 127.0.0.1:8000/metrics > "$OUT/metrics.txt"  # the server's own TTFT and TPOT beside the client's
kill %1
wait
tar -C "$OUT" -czf "$OUT/loadtest.tgz" lt-stream512 lt-sweep && rm -r "$OUT/lt-stream512" "$OUT/lt-sweep"
tail -30 "$OUT/bench.txt"
cat "$OUT/engine_rate.txt"
grep -B2 -A12 "^run " "$OUT/lt-stream512.txt" | head -30
grep -A8 "^run " "$OUT/lt-sweep.txt" | head -12
