"""pyproject.toml's package data: every file other than Python source inside a package ships in the wheel (the
kernels' CUDA sources, the bundled model), or the installed server would miss it at run time."""

from __future__ import annotations

import fnmatch
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+
ROOT = Path(__file__).parents[1]


def test_every_data_file_in_a_package_is_package_data():
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    missing = []
    for package in ("engine", "kernels", "server", "loadtest"):
        for path in (ROOT / package).rglob("*"):
            if path.is_dir() or path.suffix in (".py", ".pyc") or "__pycache__" in path.parts:
                continue
            name = path.relative_to(ROOT / package).as_posix()
            if not any(fnmatch.fnmatch(name, p) for p in patterns.get(package, [])):
                missing.append(f"{package}/{name}")
    assert not missing, f"not in [tool.setuptools.package-data]: {missing}"
    assert (ROOT / "kernels" / "persistent_decode.cu").is_file()
