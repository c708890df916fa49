"""load_model: a checkpoint folder -> config, model and a DecodeState holding the meta-token snapshot.

Also the one place device and dtype names are resolved. The tokenizer is not needed here (engine.generate adds it).
"""

from __future__ import annotations

from pathlib import Path

import torch

from engine.config import ConfigError, HymbaConfig
from engine.model import HymbaForCausalLM
from engine.state import DecodeState
from engine.weights import CheckpointError, load_weights

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but CUDA is not available on this machine")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if device.type == "cuda" and device.index is not None and device.index >= (n := torch.cuda.device_count()):
        raise ValueError(f"device {name!r} asked for, but this machine has {n} CUDA device(s)")
    return device


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    if name in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"dtype must be auto, {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


def load_model(
    model_dir: str | Path, device: str = "auto", dtype: str | None = None, max_model_len: int | None = None
) -> tuple[HymbaConfig, HymbaForCausalLM, DecodeState]:
    """Config, weights and a state whose meta-token snapshot is taken; the tokenizer is not needed for this."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir}: not a directory")
    config = HymbaConfig.from_json(model_dir / "config.json")
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    M = config.num_memory_tokens
    if max_model_len is None:  # spec 8: the NTK base is tuned for meta + prompt + generated <= max positions
        max_model_len = config.max_position_embeddings - M
        if max_model_len < 1:
            raise ConfigError(
                f"config.json: max_position_embeddings ({config.max_position_embeddings}) "
                f"leaves no room after {M} meta tokens"
            )
    elif max_model_len < 1:
        raise ValueError(f"max_model_len must be >= 1, got {max_model_len}")
    if dev.type == "cuda":
        # Triton launches into the thread's current CUDA context: cuda:1 must be current while its meta tokens run.
        # set_device switches the context at once; `with torch.cuda.device(...)` may only note the index lazily.
        dev = torch.device("cuda", torch.cuda.current_device() if dev.index is None else dev.index)
        torch.cuda.set_device(dev)
    tensors = load_weights(model_dir, config, dev, dt)
    model = HymbaForCausalLM.from_tensors(config, tensors, M + max_model_len)
    state = DecodeState(config, max_model_len, dev, dt)
    model.prefill_meta_tokens(state)
    return config, model, state
