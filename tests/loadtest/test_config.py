"""loadtest/config.py: flags -> LoadTestConfig and RunSpecs, and the one-line errors for bad ones."""

from __future__ import annotations

from pathlib import Path

import pytest

from loadtest.config import LoadTestError, RunSpec, parse_args

BASE = ["--url", "http://127.0.0.1:8000", "--model", "m", "--out", "out"]


def test_defaults_are_one_closed_loop_run():
    cfg = parse_args([*BASE, "--prompt-tokens", "32"])
    assert cfg.runs == (RunSpec(1),)
    assert (cfg.num_requests, cfg.max_tokens, cfg.endpoint, cfg.warmup, cfg.seed) == (100, 128, "completions", 1, 0)
    assert cfg.ignore_eos and cfg.path == "/v1/completions"


def test_concurrency_list_is_one_run_each():
    cfg = parse_args([*BASE, "--prompt-tokens", "8", "--concurrency", "1,2,4,8"])
    assert [r.label for r in cfg.runs] == ["c=1", "c=2", "c=4", "c=8"]
    assert not any(r.is_open_loop for r in cfg.runs)


def test_rate_is_open_loop_with_an_optional_cap():
    assert parse_args([*BASE, "--prompt-tokens", "8", "--rate", "2,0.5"]).runs == (
        RunSpec(None, 2.0),
        RunSpec(None, 0.5),
    )
    capped = parse_args([*BASE, "--prompt-tokens", "8", "--rate", "4", "--concurrency", "3"]).runs
    assert capped == (RunSpec(3, 4.0),) and capped[0].label == "rate=4/s c<=3"


@pytest.mark.parametrize("url", ["http://h:1/", "http://h:1/v1", "http://h:1/v1/"])
def test_url_loses_v1_and_slash(url):
    assert parse_args(["--url", url, "--model", "m", "--out", "o", "--prompt-tokens", "8"]).url == "http://h:1"


def test_chat_and_dataset(tmp_path: Path):
    data = tmp_path / "p.jsonl"
    data.write_text('{"prompt": "hi"}\n')
    cfg = parse_args([*BASE, "--dataset", str(data), "--endpoint", "chat", "--no-ignore-eos"])
    assert (cfg.dataset, cfg.prompt_tokens, cfg.path, cfg.ignore_eos) == (data, None, "/v1/chat/completions", False)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "m", "--out", "o"], "the following arguments are required: --url"),
        ([*BASE], "give one of --prompt-tokens N"),
        ([*BASE, "--prompt-tokens", "8", "--dataset", "x.jsonl"], "give one of --prompt-tokens N"),
        ([*BASE, "--prompt-tokens", "eight"], "--prompt-tokens must be an integer, got 'eight'"),
        ([*BASE, "--prompt-tokens", "0"], "--prompt-tokens must be >= 1, got 0"),
        ([*BASE, "--prompt-tokens", "8", "--requests", "0"], "--requests must be >= 1, got 0"),
        ([*BASE, "--prompt-tokens", "8", "--max-tokens", "-1"], "--max-tokens must be >= 1, got -1"),
        ([*BASE, "--prompt-tokens", "8", "--concurrency", "1,x"], "--concurrency must be comma-separated positive"),
        ([*BASE, "--prompt-tokens", "8", "--concurrency", "0"], "--concurrency must be comma-separated positive"),
        ([*BASE, "--prompt-tokens", "8", "--rate", "inf"], "--rate must be comma-separated positive numbers"),
        ([*BASE, "--prompt-tokens", "8", "--rate", "1", "--concurrency", "1,2"], "--concurrency is the most"),
        ([*BASE, "--prompt-tokens", "8", "--endpoint", "embeddings"], "--endpoint must be completions or chat"),
        ([*BASE, "--dataset", "/no/such.jsonl"], "--dataset /no/such.jsonl: no such file"),
        ([*BASE, "--prompt-tokens", "8", "--api-key", ""], "--api-key must not be empty"),
        ([*BASE, "--prompt-tokens", "8", "--bogus"], "unrecognized arguments: --bogus"),
        (["--url", "localhost:8000", "--model", "m", "--out", "o", "--prompt-tokens", "8"], "--url must be an http"),
        (["--url", "http://", "--model", "m", "--out", "o", "--prompt-tokens", "8"], "--url must be an http"),
    ],
    ids=lambda x: None if isinstance(x, list) else x.split()[0],
)
def test_bad_flags_raise_one_line(argv, message):
    with pytest.raises(LoadTestError) as e:
        parse_args(argv)
    assert message in str(e.value) and "\n" not in str(e.value)
