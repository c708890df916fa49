"""`PYTHONPATH=. python tests/server/serve_fake.py [hymba-serve flags]`: the real serve() path (settings, signals,
drain) with FakeEngine in place of the model, for the subprocess tests. HYMBA_FAKE_TOKEN_DELAY sets its pace (s)."""

from __future__ import annotations

import logging
import os
import sys

from server.__main__ import serve
from server.settings import Settings
from tests.server.fake_engine import FakeEngine

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    settings = Settings.from_args(sys.argv[1:])
    serve(settings, [FakeEngine(token_delay=float(os.environ.get("HYMBA_FAKE_TOKEN_DELAY", "0")))])
