"""`hymba-serve` / `python -m server`: argv and env -> Settings -> small-file checks -> build_app -> uvicorn, which
listens at once while one engine per device loads in the background (/health answers 503 until they are serving).

A bad flag, config.json or tokenizer ends with one line on stderr and exit status 2 before the port opens; weights
that cannot be loaded end the same way once found, after it opened. SIGTERM drains: new requests get 503, admitted
ones get up to --shutdown-timeout to finish, then the rest are cancelled; exit 0. A second SIGTERM cancels the rest
at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

import uvicorn

from server.app import build_app, serve_engines
from server.queue import RequestQueue
from server.settings import Settings, SettingsError

if TYPE_CHECKING:
    from engine.generate import Engine

log = logging.getLogger("hymba.main")


class DrainingServer(uvicorn.Server):
    """uvicorn, except that the engines load in a thread once the port is open; that the first SIGTERM drains the
    queue before the usual shutdown begins; and that a second one cuts the drain short: what still runs is cancelled
    at once (each stream ends with an error event and [DONE])."""

    def __init__(self, config: uvicorn.Config, settings: Settings) -> None:
        super().__init__(config)
        self.settings = settings
        self.exit_code = 0
        self._drain_task: asyncio.Task | None = None
        self._cancel_task: asyncio.Task | None = None

    @property
    def _queue(self) -> RequestQueue:
        return self.config.app.state.ctx.queue

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        loop = asyncio.get_running_loop()
        threading.Thread(target=self._load, args=(loop,), name="load", daemon=True).start()

    def _load(self, loop: asyncio.AbstractEventLoop) -> None:
        """The load thread: daemon, so a SIGTERM while loading exits without waiting for the weights."""
        try:
            engines = load_engines(self.settings)
        except Exception as e:
            outcome, arg = self._load_failed, e
        else:
            outcome, arg = self._loaded, engines
        with contextlib.suppress(RuntimeError):  # the loop has closed: the server stopped while loading
            loop.call_soon_threadsafe(outcome, arg)

    def _loaded(self, engines: Sequence[Engine]) -> None:
        serve_engines(self.config.app, engines)

    def _load_failed(self, e: Exception) -> None:
        if isinstance(e, (ValueError, OSError)):  # ConfigError, CheckpointError, TokenizerError: one line
            print(f"hymba-serve: error: cannot load {self.settings.model}: {e}", file=sys.stderr, flush=True)
            self.exit_code = 2
        else:
            log.error("loading %s failed", self.settings.model, exc_info=e)
            self.exit_code = 1
        self.should_exit = True

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig == signal.SIGTERM and self.started:
            # Runs in the main thread between bytecodes of the loop: schedule, don't await. Not passed on to
            # uvicorn, which would re-raise the signal at exit and so end the process with -15 instead of 0.
            next_step = self._start_drain if self._drain_task is None else self._cut_drain_short
            asyncio.get_running_loop().call_soon_threadsafe(next_step)
            return
        super().handle_exit(sig, frame)

    def _cut_drain_short(self) -> None:
        log.info("second SIGTERM: cancelling what is still running")
        self._cancel_task = asyncio.ensure_future(self._queue.stop())  # the drain then finds the queue idle

    def _start_drain(self) -> None:
        async def drain_then_exit() -> None:
            await self._queue.drain(self.settings.shutdown_timeout)
            self.should_exit = True

        self._drain_task = asyncio.ensure_future(drain_then_exit())


class NoQueryStrings(logging.Filter):
    """uvicorn's log lines without query strings: the API takes none, and a client that puts its key in the URL must
    not find it in our logs. (The Authorization header is never logged: uvicorn's trace level hides headers.)"""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(_without_query(arg) for arg in record.args)
        return True


def _without_query(arg: object) -> object:
    if isinstance(arg, dict) and "query_string" in arg:  # an ASGI scope, as --log-level trace prints it
        return {**arg, "query_string": b"<...>"}
    if isinstance(arg, str) and arg.startswith("/") and "?" in arg:  # the path an access-log line prints
        return arg.split("?", 1)[0]
    return arg


def check_checkpoint(settings: Settings) -> None:
    """The small files, read before the port opens so that a bad config or tokenizer never listens: raises
    ConfigError or TokenizerError. generation_config.json waits for Engine.load, which reads it first: its reader
    lives beside torch, and importing torch here would keep the port shut for seconds."""
    from engine.config import HymbaConfig  # neither brings in torch
    from engine.tokenizer import Tokenizer

    HymbaConfig.from_json(Path(settings.model) / "config.json")
    Tokenizer.from_dir(settings.model)


def load_engines(settings: Settings) -> list[Engine]:
    from engine.generate import Engine  # torch comes in here, and only here

    engines = [Engine.load(settings.model, d, settings.dtype, settings.max_model_len) for d in settings.devices]
    for engine in engines:
        log.info(
            "loaded %s on %s in %.2f s; decode state %.1f MiB (%d bytes) per worker; max_model_len %d; decode: %s",
            engine.model_name,
            engine.device,
            engine.load_seconds,
            engine.state_nbytes / 2**20,
            engine.state_nbytes,
            engine.max_model_len,
            engine.decode_path,
        )
    return engines


def serve(settings: Settings) -> int:
    """Listen, load in the background, serve until SIGTERM. Returns the exit status: 2 if the weights would not load."""
    app = build_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=5,  # the drain already waited; this only bounds closing the connections
    )
    for name in ("uvicorn.access", "uvicorn.asgi"):  # after Config, which sets up uvicorn's logging
        logging.getLogger(name).addFilter(NoQueryStrings())
    server = DrainingServer(config, settings)
    sock = config.bind_socket()
    host, port = sock.getsockname()[:2]
    log.info("listening on http://%s:%d (model %s, loading)", host, port, app.state.ctx.model_name)
    server.run(sockets=[sock])
    return server.exit_code


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings = Settings.from_args(argv)
        if not (Path(settings.model) / "config.json").is_file():
            raise SettingsError(f"--model {settings.model}: no config.json there; expected a Hymba checkpoint folder")
    except SettingsError as e:
        print(f"hymba-serve: error: {e}", file=sys.stderr)
        return 2
    try:
        check_checkpoint(settings)
    except (ValueError, OSError) as e:  # ConfigError, TokenizerError: one line naming the file
        print(f"hymba-serve: error: cannot load {settings.model}: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper() if settings.log_level != "trace" else logging.DEBUG,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return serve(settings)


if __name__ == "__main__":
    sys.exit(main())
