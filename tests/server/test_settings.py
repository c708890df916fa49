"""Settings: flags, their HYMBA_* environment twins, precedence and one-line errors."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest

from server.settings import Settings, SettingsError, flag_table


def test_defaults():
    s = Settings.from_args(["--model", "m"], environ={})
    assert (s.host, s.port, s.device, s.max_queue) == ("127.0.0.1", 8000, "auto", 64)
    assert s.api_key is None and s.log_level == "info"
    assert s.devices == ("auto",) and s.cors_origins == ()


def test_every_flag_has_an_environment_twin():
    environ = {
        "HYMBA_MODEL": "m",
        "HYMBA_SERVED_MODEL_NAME": "hymba",
        "HYMBA_HOST": "0.0.0.0",
        "HYMBA_PORT": "9000",
        "HYMBA_DEVICE": "cuda:0,cuda:1",
        "HYMBA_DTYPE": "bfloat16",
        "HYMBA_MAX_MODEL_LEN": "4096",
        "HYMBA_MAX_QUEUE": "8",
        "HYMBA_API_KEY": "k",
        "HYMBA_PUBLIC_ROUTES": "/health",
        "HYMBA_CORS_ORIGINS": "http://a, http://b",
        "HYMBA_REQUEST_TIMEOUT": "30",
        "HYMBA_SHUTDOWN_TIMEOUT": "5",
        "HYMBA_MAX_BODY_BYTES": "65536",
        "HYMBA_LOG_LEVEL": "debug",
    }
    assert {f"HYMBA_{f.name.upper()}" for f in fields(Settings)} == set(environ)
    s = Settings.from_args([], environ=environ)
    assert s.devices == ("cuda:0", "cuda:1") and s.cors_origins == ("http://a", "http://b")
    assert s.public_routes == ("/health",)
    assert (s.port, s.max_model_len, s.max_queue, s.request_timeout, s.max_body_bytes) == (9000, 4096, 8, 30.0, 65536)


def test_command_line_beats_environment():
    s = Settings.from_args(["--model", "m", "--port", "1234"], environ={"HYMBA_PORT": "9000", "HYMBA_MAX_QUEUE": "3"})
    assert (s.port, s.max_queue) == (1234, 3)


@pytest.mark.parametrize(
    "argv, environ, message",
    [
        (["--port", "x"], {}, "--port must be an integer, got 'x'"),
        ([], {"HYMBA_PORT": "x"}, "HYMBA_PORT must be an integer, got 'x'"),
        (["--port", "70000"], {}, "--port must be between 0 and 65535"),
        (["--device", "cuda:0,tpu"], {}, "--device must be"),
        (["--dtype", "int4"], {}, "--dtype must be one of"),
        (["--max-queue", "-1"], {}, "--max-queue must be >= 0"),
        (["--request-timeout", "0"], {}, "--request-timeout must be > 0 seconds"),
        (["--log-level", "loud"], {}, "--log-level must be one of"),
    ],
)
def test_bad_values_are_one_line_errors(argv, environ, message):
    with pytest.raises(SettingsError) as e:
        Settings.from_args(["--model", "m", *argv], environ=environ)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_flag_table_lists_every_flag_and_the_docs_carry_it():
    table = flag_table()
    assert all(f"`--{f.name.replace('_', '-')}`" in table for f in fields(Settings))
    assert table in (Path(__file__).parents[2] / "docs" / "API.md").read_text()
