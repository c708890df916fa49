"""Settings: every `hymba-serve` flag, its `HYMBA_<FLAG>` environment twin, its default and its check.

This is the only module that reads os.environ. Precedence: command line, then environment, then default.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

ENV_PREFIX = "HYMBA_"
# The small Shakespeare Hymba shipped as package data of `engine` (found by path: importing engine means torch)
BUNDLED_MODEL = str(Path(__file__).resolve().parents[1] / "engine" / "tiny")
BUNDLED_MODEL_NAME = "hymba-tiny-shakespeare"
DTYPES = ("auto", "float32", "bfloat16", "float16")
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")
PROBE_ROUTES = ("/health", "/version", "/metrics")  # the routes --public-routes may leave open
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")


class SettingsError(ValueError):
    """A flag or environment value that cannot be used; the message is one line naming it."""


def _flag(help: str, metavar: str | None = None, **kw) -> dict:
    return {"metadata": {"help": help, "metavar": metavar}, **kw}


@dataclass(frozen=True, slots=True)
class Settings:
    model: str = field(
        default=BUNDLED_MODEL,
        **_flag("checkpoint folder (config.json, model.safetensors, tokenizer.json); default: the bundled demo", "DIR"),
    )
    served_model_name: str | None = field(default=None, **_flag("model id in the API (default: folder name)"))
    host: str = field(default="127.0.0.1", **_flag("address to listen on"))
    port: int = field(default=8000, **_flag("port to listen on (0: any free port)"))
    device: str = field(default="auto", **_flag("auto, cpu, cuda or a list like cuda:0,cuda:1 (one worker each)"))
    dtype: str = field(default="auto", **_flag("weights and activations dtype: " + ", ".join(DTYPES)))
    max_model_len: int | None = field(default=None, **_flag("prompt + generated tokens (default: from the config)"))
    max_queue: int = field(default=64, **_flag("requests allowed to wait for a worker; more get 429"))
    api_key: str | None = field(default=None, **_flag("Bearer key required on every route but --public-routes"))
    public_routes: tuple[str, ...] = field(
        default=PROBE_ROUTES, **_flag("routes open without the key, of " + ",".join(PROBE_ROUTES) + " ('': none)")
    )
    cors_origins: tuple[str, ...] = field(default=(), **_flag("comma-separated origins allowed by CORS, or *"))
    request_timeout: float = field(default=600.0, **_flag("seconds a request may take, queue wait included"))
    shutdown_timeout: float = field(default=30.0, **_flag("seconds to let in-flight requests finish on SIGTERM"))
    max_body_bytes: int = field(default=4 << 20, **_flag("largest request body accepted; larger gets 413"))
    log_level: str = field(default="info", **_flag("one of " + ", ".join(LOG_LEVELS)))

    def __post_init__(self) -> None:
        def fail(name: str, expected: str) -> None:
            raise SettingsError(f"--{name.replace('_', '-')} must be {expected}, got {getattr(self, name)!r}")

        if not 0 <= self.port <= 65535:
            fail("port", "between 0 and 65535")
        if not all(_DEVICE_RE.match(d) for d in self.devices):
            fail("device", "auto, cpu, cuda, cuda:N or a comma-separated list of cuda:N")
        if self.dtype not in DTYPES:
            fail("dtype", "one of " + ", ".join(DTYPES))
        if self.max_model_len is not None and self.max_model_len < 2:
            fail("max_model_len", "at least 2")
        if self.max_queue < 0:
            fail("max_queue", ">= 0")
        for name in ("request_timeout", "shutdown_timeout"):
            if not getattr(self, name) > 0:
                fail(name, "> 0 seconds")
        if self.max_body_bytes < 1024:
            fail("max_body_bytes", ">= 1024")
        if self.log_level not in LOG_LEVELS:
            fail("log_level", "one of " + ", ".join(LOG_LEVELS))
        if self.api_key == "":
            fail("api_key", "non-empty when set")
        if not set(self.public_routes) <= set(PROBE_ROUTES):
            fail("public_routes", "a comma-separated subset of " + ",".join(PROBE_ROUTES))

    @property
    def devices(self) -> tuple[str, ...]:
        return tuple(d.strip() for d in self.device.split(","))

    @classmethod
    def from_args(cls, argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
        """Parse argv over the HYMBA_* environment. Raises SettingsError (one line) on any bad value."""
        environ = os.environ if environ is None else environ
        args = vars(_parser().parse_args(argv))
        values = {}
        for f in fields(cls):
            raw, source = args[f.name], f"--{f.name.replace('_', '-')}"
            if raw is None and ENV_PREFIX + f.name.upper() in environ:
                raw, source = environ[ENV_PREFIX + f.name.upper()], ENV_PREFIX + f.name.upper()
            if raw is None:
                continue
            values[f.name] = _convert(f.name, raw, source)
        return cls(**values)


_INTS = {"port", "max_model_len", "max_queue", "max_body_bytes"}
_FLOATS = {"request_timeout", "shutdown_timeout"}


def _convert(name: str, raw: str, source: str) -> object:
    try:
        if name in _INTS:
            return int(raw)
        if name in _FLOATS:
            return float(raw)
    except ValueError:
        kind = "an integer" if name in _INTS else "a number"
        raise SettingsError(f"{source} must be {kind}, got {raw!r}") from None
    if name in ("cors_origins", "public_routes"):
        return tuple(o.strip() for o in raw.split(",") if o.strip())
    return raw


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse would print usage and exit; we want one line
        raise SettingsError(message)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="hymba-serve", description="OpenAI-compatible server for Hymba checkpoints.")
    for f in fields(Settings):
        env = ENV_PREFIX + f.name.upper()
        default = "" if f.default in (None, ()) else f" (default {_shown(f.default)})"
        parser.add_argument(
            f"--{f.name.replace('_', '-')}",
            dest=f.name,
            default=None,  # None: not given here, so the environment or the dataclass default applies
            metavar=f.metadata["metavar"] or f.name.split("_")[-1].upper(),
            help=f"{f.metadata['help']}{default}; env {env}",
        )
    return parser


def flag_table() -> str:
    """The flags as a Markdown table, for the README."""
    rows = ["| flag | environment | default | meaning |", "|---|---|---|---|"]
    for f in fields(Settings):
        default = "" if f.default in (None, ()) else f"`{_shown(f.default)}`"
        flag, env = f"--{f.name.replace('_', '-')}", ENV_PREFIX + f.name.upper()
        rows.append(f"| `{flag}` | `{env}` | {default} | {f.metadata['help']} |")
    return "\n".join(rows)


def _shown(default: object) -> str:
    """A default as it would be typed: a tuple as its comma-separated items, the bundled model by name."""
    if default == BUNDLED_MODEL:
        return "bundled engine/tiny"
    return ",".join(default) if isinstance(default, tuple) else str(default)
