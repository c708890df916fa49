"""python -m engine.conformance: the golden vectors pass in fp32 on CPU, and the tool catches what is wrong."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file, save_file

FOLDERS = sorted(str(p) for p in Path("tests/data/conformance").iterdir())


def conformance(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engine.conformance", *args], capture_output=True, text=True)


def test_public_vectors_pass_in_fp32_on_cpu():
    result = conformance(*FOLDERS)
    print(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("hymba-")]
    assert len(rows) == 15 and all(line.endswith("PASS") for line in rows)


def test_a_doctored_golden_fails(tmp_path):
    folder = tmp_path / "doctored"
    shutil.copytree(FOLDERS[0], folder)
    vec = load_file(folder / "vectors.safetensors")
    vec["case2.gen_logits"][7, 3] += 0.01  # one logit of one decode row, ten times the fp32 tolerance
    save_file(vec, folder / "vectors.safetensors")
    result = conformance(str(folder))
    assert result.returncode == 1
    failing = [line.split()[1] for line in result.stdout.splitlines() if line.startswith("doctored") and "FAIL" in line]
    assert failing == ["case2"]


def test_a_folder_without_vectors_is_a_one_line_error(tmp_path):
    result = conformance(str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and str(tmp_path) in result.stderr and "Traceback" not in result.stderr
