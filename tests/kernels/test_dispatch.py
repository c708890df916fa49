"""kernels/__init__.py: each op picks the Triton launcher by the tensors' device (and use_triton), never by the
TRITON_INTERPRET environment variable, so the engine runs the twins on CPU even in the interpreter test run."""

from __future__ import annotations

import importlib

import pytest
import torch

import kernels

FAMILIES = {
    "selective_scan": "selective_scan",
    "ssm_update": "ssm_update",
    "causal_conv1d": "causal_conv1d",
    "causal_conv1d_update": "causal_conv1d",
    "attention_prefill": "attention",
    "rms_norm": "rms_norm",
    "rms_norm_average": "rms_norm",
    "gemv": "gemv",
    "norm_gemv": "gemv",
    "norm_average_gemv": "gemv",
    "mlp_gemv": "gemv",
    "swiglu": "swiglu",
    "rope_attention_decode": "attention",
    "rope_prefill": "prefill_kv",
    "store_kv": "prefill_kv",
}


def record_calls(monkeypatch) -> list[str]:
    """Replaces every launcher and twin with a stub that records its name."""
    calls: list[str] = []
    for op, family in FAMILIES.items():
        module = importlib.import_module(f"kernels.{family}")
        for name in (op, f"{op}_ref"):
            monkeypatch.setattr(module, name, lambda *args, _name=name, **kwargs: calls.append(_name))
    return calls


def call_every_op(device) -> None:
    x = torch.zeros(2, 4, device=device)
    kernels.selective_scan(x, x, x, x, x, x, x, x, x)
    kernels.ssm_update(x, x[0], x[0], x, x[0], x, x[0], x[0], None, 1e-6)
    kernels.causal_conv1d(x, x, None, x)
    kernels.causal_conv1d_update(x[0], x, None, x)
    kernels.attention_prefill(x[None], x[None], x[None], x[0], x[0], None, 0)
    kernels.rms_norm(x, x[0], 1e-6)
    kernels.rms_norm_average(x, x, x[0], x[0], 1e-6)
    pos = torch.zeros(1, dtype=torch.int64, device=device)
    kernels.gemv(x[0], x)
    kernels.norm_gemv(x[0], x[0], 1e-6, x)
    kernels.norm_average_gemv(x[0], x[0], x[0], x[0], 1e-6, x, None)
    kernels.mlp_gemv(x[0], x[0], 1e-6, x, x)
    kernels.swiglu(x, x, torch.float16)
    kernels.rope_attention_decode(x[0], 2, pos, x, x, x[None], x[None], 1, pos)
    kernels.rope_prefill(x, x, x, x[None])
    kernels.store_kv(x[None], x[None], x[None], x[None], 0, 0, None)


def test_cpu_tensors_get_the_twins_whatever_the_environment(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    calls = record_calls(monkeypatch)
    call_every_op("cpu")
    assert calls == [f"{op}_ref" for op in FAMILIES]


@pytest.mark.gpu
@pytest.mark.parametrize("enabled", [True, False], ids=["triton", "twins"])
def test_cuda_tensors_get_the_launchers_unless_disabled(enabled, device, monkeypatch):
    calls = record_calls(monkeypatch)
    kernels.use_triton(enabled)
    try:
        call_every_op(device)
    finally:
        kernels.use_triton(True)
    assert calls == [op if enabled else f"{op}_ref" for op in FAMILIES]
