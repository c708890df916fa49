"""hymba-serve's OpenAI-compatible HTTP server. Torch-free: it sees the engine only through engine/api.py."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("hymba-serve")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
