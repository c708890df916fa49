"""`python -m loadtest` end to end against a live hymba-serve (real engine, tiny checkpoint, queue of 2): counts,
token counts against the server's usage and /metrics, 429s counted apart, the files; and its one-line errors."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from loadtest.__main__ import main
from loadtest.config import parse_args
from loadtest.report import to_json
from loadtest.runner import run_benchmark
from tests.loadtest.conftest import MODEL, ROOT, free_port

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
COMPLETIONS = {"endpoint": "/v1/completions"}


def argv(live_server, out: Path, *args: str) -> list[str]:
    return ["--url", live_server.url, "--model", MODEL, "--warmup", "0", "--out", str(out), *args]


def run(live_server, out: Path, *args: str) -> dict:
    """results.json as the runs would write it, without drawing the plots (test_closed_loop... checks those)."""
    bench = asyncio.run(run_benchmark(parse_args(argv(live_server, out, *args))))
    return json.loads(json.dumps(to_json(bench)))


def server_counts(live_server) -> dict[str, float]:
    return {
        "generated": live_server.metric("hymba_generated_tokens_total"),
        "prompt": live_server.metric("hymba_prompt_tokens_total"),
        "ok": live_server.metric("hymba_requests_total", **COMPLETIONS, status="200"),
        "429": live_server.metric("hymba_requests_total", **COMPLETIONS, status="429"),
    }


def test_closed_loop_counts_match_the_server(live_server, tmp_path: Path, capsys):
    before = server_counts(live_server)
    args = ["--concurrency", "1,2", "--requests", "6", "--prompt-tokens", "12", "--max-tokens", "8"]
    assert main(argv(live_server, tmp_path, *args)) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    after = server_counts(live_server)

    runs = results["runs"]
    assert [r["label"] for r in runs] == ["c=1", "c=2"]
    for r in runs:
        assert (r["completed"], r["failed"], r["rejected_429"], r["errors_by_status"]) == (6, 0, 0, {})
        assert (r["total_input_tokens"], r["total_output_tokens"]) == (6 * 12, 6 * 8)
        assert r["token_check"]["requests_with_usage"] == 6
        for req in r["requests"]:
            assert (req["status"], req["prompt_tokens"], req["output_tokens"]) == (200, 12, 8)
            assert 1 <= req["num_chunks"] <= 8 and len(req["itl_ms"]) == req["num_chunks"] - 1
            assert 0 < req["ttft_ms"] <= req["e2el_ms"]
        assert r["mean_ttft_ms"] > 0 and r["p99_e2el_ms"] >= r["median_e2el_ms"] > 0
        assert r["output_throughput"] == pytest.approx(48 / r["duration"])
    assert after["ok"] - before["ok"] == 12
    assert after["generated"] - before["generated"] == sum(r["total_output_tokens"] for r in runs)
    assert after["prompt"] - before["prompt"] == sum(r["total_input_tokens"] for r in runs)
    assert results["prompts"] == {"source": "tokenize", "num": 6, "mean_tokens_by_tokenize": 12.0}

    printed = capsys.readouterr().out
    assert "req/s" in printed and "TTFT" in printed and "E2EL" in printed
    assert (tmp_path / "summary.txt").read_text().strip() in printed
    for name in ("latency.png", "sweep.png", "queue.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC, name


def test_queue_full_429s_are_counted_apart(live_server, tmp_path: Path):
    before = server_counts(live_server)
    args = ["--concurrency", "8", "--requests", "16", "--prompt-tokens", "8", "--max-tokens", "16"]
    run_ = run(live_server, tmp_path, *args)["runs"][0]
    after = server_counts(live_server)

    rejected = run_["rejected_429"]
    assert rejected >= 1 and run_["errors_by_status"] == {"429": rejected} and run_["failed"] == rejected
    assert run_["completed"] + rejected == 16
    assert after["429"] - before["429"] == rejected
    assert after["ok"] - before["ok"] == run_["completed"]
    assert all(r["retry_after"] for r in run_["requests"] if r["status"] == 429)
    assert run_["queue"]["gauge"] == "hymba_requests_waiting" and run_["queue"]["max_waiting"] >= 1


def test_open_loop_chat_prompt_length_is_exact(live_server, tmp_path: Path):
    args = ["--endpoint", "chat", "--rate", "40", "--concurrency", "1", "--requests", "4"]
    run_ = run(live_server, tmp_path, *args, "--prompt-tokens", "20", "--max-tokens", "6")["runs"][0]
    assert (run_["mode"], run_["request_rate"], run_["concurrency"], run_["completed"]) == ("open", 40.0, 1, 4)
    assert [(r["prompt_tokens"], r["output_tokens"]) for r in run_["requests"]] == [(20, 6)] * 4


def test_dataset_prompts(live_server, tmp_path: Path):
    data = tmp_path / "prompts.jsonl"
    data.write_text('{"prompt": "The quick brown fox", "max_tokens": 3}\n{"prompt": "Hello world"}\n')
    run_ = run(live_server, tmp_path, "--dataset", str(data), "--requests", "4", "--max-tokens", "5")["runs"][0]
    tokenize = live_server.url + "/tokenize"
    counts = [httpx.post(tokenize, json={"prompt": p}).json()["count"] for p in ("The quick brown fox", "Hello world")]
    assert [(r["prompt_tokens"], r["output_tokens"]) for r in run_["requests"]] == [
        (counts[0], 3), (counts[1], 5), (counts[0], 3), (counts[1], 5)
    ]  # fmt: skip


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "nope", "--prompt-tokens", "8"], "--model 'nope' is not served at "),
        (["--model", MODEL, "--prompt-tokens", "40", "--max-tokens", "20"], "exceeds the server's max_model_len 52"),
        (["--model", MODEL, "--prompt-tokens", "1", "--max-tokens", "4"], "--prompt-tokens 1 is too few"),
    ],
    ids=["unknown-model", "too-long", "too-short"],
)
def test_unusable_settings_stop_with_one_line(live_server, tmp_path: Path, capsys, args, message):
    assert main(["--url", live_server.url, "--out", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("loadtest: error: ") and message in err and err.count("\n") == 1


def test_unreachable_url_is_one_line_without_traceback(tmp_path: Path):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there once the probe socket is closed
    argv = ["--url", url, "--model", "m", "--prompt-tokens", "8", "--out", str(tmp_path)]
    done = subprocess.run(
        [sys.executable, "-m", "loadtest", *argv], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith(f"loadtest: error: cannot reach {url}/v1/models") and done.stderr.count("\n") == 1
