"""Pins engine/weights.py: expected_shapes against spec section 4 and the conformance files, every corrupt checkpoint
as a one-line CheckpointError naming the file and the tensor, sharded loading, and the cast to the serving dtype."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.config import HymbaConfig
from engine.weights import CheckpointError, expected_shapes, load_weights
from tests.engine.test_config import CONFORMANCE_DIR, CONFORMANCE_NAMES, config_with

TIED = "hymba-mirror-12L"  # bf16 file, tie_word_embeddings true, no lm_head.weight
UNTIED = "hymba-gqa-untied-7L"  # bf16 file, tie_word_embeddings false, carries lm_head.weight
FP32_FILE = "hymba-odd-6L"  # fp32 file, tied
FP32_KEPT = ("mamba.A_log.0", "mamba.D.0", "mamba.dt_proj.0.bias", "mamba.conv1d.weight", "mamba.conv1d.bias")


def copy_checkpoint(name: str, tmp_path: Path) -> Path:
    """config.json + model.safetensors of a conformance checkpoint, in a folder the test may corrupt."""
    model_dir = tmp_path / name
    model_dir.mkdir(parents=True)
    for file in ("config.json", "model.safetensors"):
        shutil.copy(CONFORMANCE_DIR / name / file, model_dir / file)
    return model_dir


def load(model_dir: Path, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    return load_weights(model_dir, HymbaConfig.from_json(model_dir / "config.json"), "cpu", dtype)


def rejection(model_dir: Path) -> str:
    with pytest.raises(CheckpointError) as e:
        load(model_dir)
    message = str(e.value)
    assert "\n" not in message, message
    return message


def rewrite(model_dir: Path, change) -> None:
    """Replace model.safetensors by change(tensors), saved with safetensors.torch.save_file."""
    path = model_dir / "model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)


def shard(model_dir: Path, names_in_first: int = 40) -> dict[str, str]:
    """Split model.safetensors into two shards plus model.safetensors.index.json, as HF's save_pretrained does."""
    tensors = load_file(model_dir / "model.safetensors")
    names = sorted(tensors)
    shards = {
        "model-00001-of-00002.safetensors": names[:names_in_first],
        "model-00002-of-00002.safetensors": names[names_in_first:],
    }
    for file, part in shards.items():
        save_file({n: tensors[n] for n in part}, model_dir / file)
    weight_map = {n: file for file, part in shards.items() for n in part}
    (model_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (model_dir / "model.safetensors").unlink()
    return weight_map


# --- expected_shapes ---


def test_1_5b_parameter_count():
    # spec section 4: 1,522,797,824 parameters if tied (the card's 1.52B), 1,573,999,424 if untied
    count = sum(math.prod(s) for s in expected_shapes(config_with()).values())
    assert count == 1_522_797_824
    assert sum(math.prod(s) for s in expected_shapes(config_with(tie_word_embeddings=False)).values()) == 1_573_999_424


def test_1_5b_shapes():
    shapes = expected_shapes(config_with())
    assert shapes["model.layers.1.mamba.in_proj.weight"] == (8960, 1600)  # producer: q | k | v | x | z
    assert shapes["model.layers.2.mamba.in_proj.weight"] == (8000, 1600)  # consumer: q | x | z
    assert shapes["model.layers.7.mamba.x_proj.0.weight"] == (132, 3200)
    assert shapes["model.layers.7.mamba.A_log.0"] == (3200, 16)
    assert shapes["model.layers.7.mamba.conv1d.weight"] == (3200, 1, 4)
    assert shapes["model.memory_tokens"] == (128, 1600)
    assert "lm_head.weight" not in shapes and not any("self_attn" in n for n in shapes)  # spec 4: no attn params


@pytest.mark.parametrize("name", CONFORMANCE_NAMES)
def test_expected_shapes_match_conformance_file(name):
    config = HymbaConfig.from_json(CONFORMANCE_DIR / name / "config.json")
    in_file = {n: tuple(t.shape) for n, t in load_file(CONFORMANCE_DIR / name / "model.safetensors").items()}
    assert expected_shapes(config) == in_file


# --- load_weights on intact checkpoints ---


@pytest.mark.parametrize("name", CONFORMANCE_NAMES)
def test_loads_exactly_the_expected_tensors(name, tmp_path):
    model_dir = copy_checkpoint(name, tmp_path)
    tensors = load(model_dir)
    in_file = load_file(model_dir / "model.safetensors")
    assert tensors.keys() == expected_shapes(HymbaConfig.from_json(model_dir / "config.json")).keys()
    assert all(torch.equal(t, in_file[n].float()) for n, t in tensors.items())


def test_tied_checkpoint_with_lm_head_is_accepted_and_ignored(tmp_path):
    model_dir = copy_checkpoint(TIED, tmp_path)
    rewrite(model_dir, lambda t: t.update({"lm_head.weight": torch.zeros(512, 40)}))  # spec 4: HF re-ties
    assert "lm_head.weight" not in load(model_dir)


def test_untied_checkpoint_keeps_its_lm_head(tmp_path):
    tensors = load(copy_checkpoint(UNTIED, tmp_path))
    assert not torch.equal(tensors["lm_head.weight"], tensors["model.embed_tokens.weight"])


# --- load_weights rejections: the file, the tensor, what was expected and what arrived ---


def test_missing_tensor(tmp_path):
    model_dir = copy_checkpoint(TIED, tmp_path)
    rewrite(model_dir, lambda t: t.pop("model.layers.3.mamba.A_log.0"))
    assert rejection(model_dir) == "model.safetensors: missing tensor model.layers.3.mamba.A_log.0 (1 missing in all)"


def test_untied_without_lm_head(tmp_path):
    model_dir = copy_checkpoint(UNTIED, tmp_path)
    rewrite(model_dir, lambda t: t.pop("lm_head.weight"))
    assert rejection(model_dir) == "model.safetensors: missing tensor lm_head.weight (1 missing in all)"


def test_extra_tensor(tmp_path):
    model_dir = copy_checkpoint(TIED, tmp_path)
    rewrite(model_dir, lambda t: t.update({"model.layers.3.mamba.self_attn.q_proj.weight": torch.zeros(40, 40)}))
    assert rejection(model_dir) == (
        "model.safetensors: unexpected tensor model.layers.3.mamba.self_attn.q_proj.weight (1 unexpected in all)"
    )


def test_misshaped_tensor_names_both_shapes(tmp_path):
    model_dir = copy_checkpoint(TIED, tmp_path)
    rewrite(model_dir, lambda t: t.update({"model.layers.3.mamba.A_log.0": torch.zeros(80, 8)}))
    assert (
        rejection(model_dir) == "model.safetensors: model.layers.3.mamba.A_log.0 has shape (80, 8), expected (80, 16)"
    )


def test_consumer_in_proj_with_kv_rows(tmp_path):
    model_dir = copy_checkpoint(TIED, tmp_path)  # layer 2 reuses layer 1's K/V: its in_proj has no k/v rows
    rewrite(model_dir, lambda t: t.update({"model.layers.2.mamba.in_proj.weight": torch.zeros(232, 40)}))
    assert "model.layers.2.mamba.in_proj.weight has shape (232, 40), expected (200, 40)" in rejection(model_dir)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int8, torch.bool], ids=str)
def test_non_float_tensor(tmp_path, dtype):
    model_dir = copy_checkpoint(TIED, tmp_path)
    rewrite(model_dir, lambda t: t.update({"model.final_layernorm.weight": torch.ones(40, dtype=dtype)}))
    assert rejection(model_dir) == (
        f"model.safetensors: model.final_layernorm.weight has dtype {dtype}, expected a float dtype"
    )


def test_no_weights_file(tmp_path):
    model_dir = copy_checkpoint(TIED, tmp_path)
    (model_dir / "model.safetensors").unlink()
    assert rejection(model_dir) == f"{model_dir}: no model.safetensors or model.safetensors.index.json"


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda data: data[: len(data) // 2],
        lambda data: data[:5],
        lambda data: b"",
        lambda data: b"<html>404 Not Found</html>" * 4,
        lambda data: (2).to_bytes(8, "little") + b"[]",
    ],
    ids=["truncated-data", "truncated-header", "empty", "html", "header-not-an-object"],
)
def test_unreadable_safetensors(tmp_path, corrupt):
    model_dir = copy_checkpoint(TIED, tmp_path)
    path = model_dir / "model.safetensors"
    path.write_bytes(corrupt(path.read_bytes()))
    assert rejection(model_dir).startswith("model.safetensors: not a readable safetensors file (")


# --- sharded checkpoints (model.safetensors.index.json) ---


@pytest.mark.parametrize("name", [TIED, UNTIED])
def test_sharded_loads_the_same_tensors(name, tmp_path):
    whole = load(copy_checkpoint(name, tmp_path / "whole"), torch.bfloat16)
    model_dir = copy_checkpoint(name, tmp_path / "sharded")
    weight_map = shard(model_dir)
    assert len(set(weight_map.values())) == 2
    sharded = load(model_dir, torch.bfloat16)
    assert sharded.keys() == whole.keys()
    assert all(sharded[n].dtype == t.dtype and torch.equal(sharded[n], t) for n, t in whole.items())


def test_sharded_missing_tensor_names_the_index(tmp_path):
    model_dir = copy_checkpoint(TIED, tmp_path)
    weight_map = shard(model_dir)
    weight_map.pop("model.final_layernorm.weight")
    (model_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert rejection(model_dir) == (
        "model.safetensors.index.json: missing tensor model.final_layernorm.weight (1 missing in all)"
    )


def test_sharded_misshaped_tensor_names_the_shard(tmp_path):
    model_dir = copy_checkpoint(TIED, tmp_path)
    rewrite(model_dir, lambda t: t.update({"model.final_layernorm.weight": torch.ones(41)}))
    weight_map = shard(model_dir)
    assert rejection(model_dir) == (
        f"{weight_map['model.final_layernorm.weight']}: model.final_layernorm.weight has shape (41,), expected (40,)"
    )


def test_index_names_a_missing_shard(tmp_path):
    model_dir = copy_checkpoint(TIED, tmp_path)
    shard(model_dir)
    (model_dir / "model-00002-of-00002.safetensors").unlink()
    assert rejection(model_dir) == "model.safetensors.index.json: shard model-00002-of-00002.safetensors does not exist"


def test_index_claims_a_tensor_its_shard_lacks(tmp_path):
    model_dir = copy_checkpoint(TIED, tmp_path)
    weight_map = shard(model_dir)
    name = next(n for n, f in weight_map.items() if f == "model-00002-of-00002.safetensors")
    weight_map[name] = "model-00001-of-00002.safetensors"
    (model_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert rejection(model_dir) == (
        f"model-00001-of-00002.safetensors: does not hold {name}, which model.safetensors.index.json places there"
    )


@pytest.mark.parametrize(
    "text",
    ["{", "[]", '{"metadata": {}}', '{"weight_map": ["model.safetensors"]}', '{"weight_map": null}'],
    ids=["bad-json", "list", "no-weight-map", "weight-map-list", "weight-map-null"],
)
def test_bad_index(tmp_path, text):
    model_dir = copy_checkpoint(TIED, tmp_path)
    shard(model_dir)
    (model_dir / "model.safetensors.index.json").write_text(text)
    assert rejection(model_dir) == (
        "model.safetensors.index.json: weight_map must be an object of tensor name -> shard file"
    )


def test_garbage_shard(tmp_path):
    model_dir = copy_checkpoint(TIED, tmp_path)
    shard(model_dir)
    (model_dir / "model-00001-of-00002.safetensors").write_bytes(b"\x00" * 100)
    assert rejection(model_dir).startswith("model-00001-of-00002.safetensors: not a readable safetensors file (")


# --- the serving dtype (spec 6.5: A_log, D, dt bias stay fp32; we keep the conv fp32 too) ---


@pytest.mark.parametrize("name", [FP32_FILE, TIED], ids=["fp32-file", "bf16-file"])
def test_bf16_serving_keeps_ssm_parameters_fp32(name, tmp_path):
    model_dir = copy_checkpoint(name, tmp_path)
    tensors = load(model_dir, torch.bfloat16)
    in_file = load_file(model_dir / "model.safetensors")
    num_layers = HymbaConfig.from_json(model_dir / "config.json").num_hidden_layers
    fp32_names = {f"model.layers.{i}.{suffix}" for i in range(num_layers) for suffix in FP32_KEPT}
    assert {n for n, t in tensors.items() if t.dtype == torch.float32} == fp32_names
    assert {t.dtype for n, t in tensors.items() if n not in fp32_names} == {torch.bfloat16}
    for n, t in tensors.items():  # values equal the file's, rounded once to bf16 where the dtype says so
        assert torch.equal(t, in_file[n].to(t.dtype)), n


def test_fp32_file_in_bf16_is_rounded_once(tmp_path):
    model_dir = copy_checkpoint(FP32_FILE, tmp_path)
    name = "model.layers.0.mamba.out_proj.weight"
    file_value = load_file(model_dir / "model.safetensors")[name]
    assert not torch.equal(file_value, file_value.bfloat16().float())  # the file really holds fp32-only bits
    assert torch.equal(load(model_dir, torch.bfloat16)[name], file_value.bfloat16())


def test_bf16_file_in_fp32_is_exact(tmp_path):
    model_dir = copy_checkpoint(TIED, tmp_path)
    in_file = load_file(model_dir / "model.safetensors")
    tensors = load(model_dir, torch.float32)
    assert all(t.dtype == torch.float32 and torch.equal(t, in_file[n].float()) for n, t in tensors.items())
