"""Checkpoint tensors: read model.safetensors (or a sharded index) by the checkpoint's own names, check every name
and shape against the config (spec section 4), and cast once to the serving dtype.

The SSM's A_log, D, dt bias and conv weights stay fp32: the reference's kernels read them in fp32 (spec 6.5).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from engine.config import HymbaConfig

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_FP32_SUFFIXES = ("mamba.A_log.0", "mamba.D.0", "mamba.dt_proj.0.bias", "mamba.conv1d.weight", "mamba.conv1d.bias")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be served; the message is one line naming the file and the tensor."""


def expected_shapes(config: HymbaConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the model needs, by checkpoint name (lm_head only when untied)."""
    c = config
    D, I, N, R = c.hidden_size, c.d_inner, c.mamba_d_state, c.dt_rank
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (c.vocab_size, D),
        "model.final_layernorm.weight": (D,),
    }
    if c.num_memory_tokens:
        shapes["model.memory_tokens"] = (c.num_memory_tokens, D)
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, D)
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        m = p + "mamba."
        layer = {
            p + "input_layernorm.weight": (D,),
            m + "in_proj.weight": (c.in_proj_width(i), D),
            m + "conv1d.weight": (I, 1, c.mamba_d_conv),
            m + "x_proj.0.weight": (R + 2 * N, I),
            m + "dt_proj.0.weight": (I, R),
            m + "dt_proj.0.bias": (I,),
            m + "A_log.0": (I, N),
            m + "D.0": (I,),
            m + "pre_avg_layernorm1.weight": (I,),
            m + "pre_avg_layernorm2.weight": (I,),
            m + "out_proj.weight": (D, I),
            p + "pre_moe_layernorm.weight": (D,),
            p + "moe.experts.0.up_proj.weight": (c.intermediate_size, D),
            p + "moe.experts.0.down_proj.weight": (D, c.intermediate_size),
        }
        if c.mamba_conv_bias:
            layer[m + "conv1d.bias"] = (I,)
        if c.mamba_proj_bias:
            layer[m + "in_proj.bias"] = (c.in_proj_width(i),)
            layer[m + "out_proj.bias"] = (D,)
        if c.mamba_inner_layernorms:
            layer[m + "dt_layernorm.weight"] = (R,)
            layer[m + "B_layernorm.weight"] = (N,)
            layer[m + "C_layernorm.weight"] = (N,)
        if c.mlp_hidden_act == "silu":
            layer[p + "moe.experts.0.gate_proj.weight"] = (c.intermediate_size, D)
        shapes.update(layer)
    return shapes


def load_weights(
    model_dir: str | Path, config: HymbaConfig, device: torch.device | str, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """All tensors of expected_shapes(config), on `device`, in `dtype` (fp32 for the SSM's exact parameters)."""
    model_dir = Path(model_dir)
    files = _tensor_files(model_dir)  # tensor name -> file
    expected = expected_shapes(config)
    ignorable = {"lm_head.weight"} if config.tie_word_embeddings else set()  # HF re-ties after loading
    extra = sorted(set(files) - set(expected) - ignorable)
    if extra:
        raise CheckpointError(f"{files[extra[0]].name}: unexpected tensor {extra[0]} ({len(extra)} unexpected in all)")
    missing = sorted(set(expected) - set(files))
    if missing:
        where = SINGLE_FILE if (model_dir / SINGLE_FILE).exists() else INDEX_FILE
        raise CheckpointError(f"{where}: missing tensor {missing[0]} ({len(missing)} missing in all)")

    tensors: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[str]] = {}
    for name in expected:
        by_file.setdefault(files[name], []).append(name)
    for path, names in by_file.items():
        try:
            with safe_open(str(path), framework="pt") as f:  # memory-mapped: one tensor at a time in RAM
                for name in names:
                    shape = tuple(f.get_slice(name).get_shape())
                    if shape != expected[name]:
                        raise CheckpointError(f"{path.name}: {name} has shape {shape}, expected {expected[name]}")
                    t = f.get_tensor(name)
                    if not t.is_floating_point():
                        raise CheckpointError(f"{path.name}: {name} has dtype {t.dtype}, expected a float dtype")
                    keep_fp32 = name.endswith(_FP32_SUFFIXES)
                    tensors[name] = t.to(device=device, dtype=torch.float32 if keep_fp32 else dtype)
        except SafetensorError as e:
            raise CheckpointError(f"{path.name}: not a readable safetensors file ({e})") from None
    return tensors


def _tensor_files(model_dir: Path) -> dict[str, Path]:
    single, index = model_dir / SINGLE_FILE, model_dir / INDEX_FILE
    if single.exists():
        return {name: single for name in _names_in(single)}
    if not index.exists():
        raise CheckpointError(f"{model_dir}: no {SINGLE_FILE} or {INDEX_FILE}")
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        assert isinstance(weight_map, dict)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AssertionError):
        raise CheckpointError(f"{INDEX_FILE}: weight_map must be an object of tensor name -> shard file") from None
    files = {name: model_dir / str(shard) for name, shard in weight_map.items()}
    for shard in sorted(set(files.values())):
        if not shard.exists():
            raise CheckpointError(f"{INDEX_FILE}: shard {shard.name} does not exist")
        listed = {n for n, p in files.items() if p == shard}
        if missing := sorted(listed - set(_names_in(shard))):
            raise CheckpointError(f"{shard.name}: does not hold {missing[0]}, which {INDEX_FILE} places there")
    return files


def _names_in(path: Path) -> list[str]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path.name}: not a readable safetensors file ({e})") from None
