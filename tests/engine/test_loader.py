"""Pins engine/loader.py (resolve_device, resolve_dtype, load_model) and Engine.load in engine/generate.py: the
device and dtype names, the context limit, and generation_config.json's defaults and extra EOS ids."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import engine.generate
from engine.config import ConfigError, HymbaConfig
from engine.generate import Engine
from engine.loader import load_model, resolve_device, resolve_dtype
from engine.weights import CheckpointError

CONFORMANCE_DIR = Path(__file__).parents[1] / "data" / "conformance"
ODD_6L = "hymba-odd-6L"  # max_position_embeddings 64, 12 meta tokens, eos 2
SERVED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json")


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """A copy of hymba-odd-6L with the files Engine.load reads; tests may rewrite any of them."""
    copy = tmp_path / ODD_6L
    copy.mkdir()
    for file in SERVED_FILES:
        shutil.copy(CONFORMANCE_DIR / ODD_6L / file, copy / file)
    return copy


def edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.fixture(autouse=True)
def one_thread():
    """The models here are tiny: with every core busy (CI), OpenMP's spinning threads make a load 40x slower."""
    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(num_threads)


@pytest.fixture
def without_model(monkeypatch):
    """Engine.load reads generation_config.json after the model; its errors do not need the model built."""
    monkeypatch.setattr(
        engine.generate, "load_model", lambda d, *_: (HymbaConfig.from_json(d / "config.json"), None, None)
    )


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def one_cuda_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)


# --- resolve_device ---


def test_auto_device_without_cuda_is_cpu(no_cuda):
    assert resolve_device("auto") == torch.device("cpu")


def test_auto_device_with_cuda_is_cuda(one_cuda_device):
    assert resolve_device("auto") == torch.device("cuda")


@pytest.mark.parametrize("name", ["cpu", "cuda", "cuda:0"])
def test_named_device(one_cuda_device, name):
    assert resolve_device(name) == torch.device(name)


@pytest.mark.parametrize("name", ["cuda", "cuda:0"])
def test_cuda_device_without_cuda(no_cuda, name):
    with pytest.raises(ValueError, match=rf"^device '{name}' asked for, but CUDA is not available on this machine$"):
        resolve_device(name)


@pytest.mark.parametrize("name", ["tpu", "mps", "meta", "cuda:x", "CPU", ""], ids=repr)
def test_unknown_device(name):
    with pytest.raises(ValueError) as e:
        resolve_device(name)
    assert str(e.value) == f"device must be auto, cpu, cuda or cuda:N, got {name!r}"


def test_cuda_ordinal_past_the_last_device(one_cuda_device):
    with pytest.raises(ValueError, match=r"'cuda:3'.*1 CUDA device"):
        resolve_device("cuda:3")


# --- resolve_dtype ---


@pytest.mark.parametrize("name", [None, "auto"])
@pytest.mark.parametrize("device, dtype", [("cpu", torch.float32), ("cuda", torch.bfloat16)])
def test_auto_dtype_follows_the_device(name, device, dtype):
    assert resolve_dtype(name, torch.device(device)) == dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_named_dtype(dtype):
    assert resolve_dtype(str(dtype).removeprefix("torch."), torch.device("cpu")) == dtype


@pytest.mark.parametrize("name", ["bf16", "fp16", "float64", "half", "int8"])
def test_unknown_dtype(name):
    with pytest.raises(ValueError) as e:
        resolve_dtype(name, torch.device("cpu"))
    assert str(e.value) == f"dtype must be auto, float32, bfloat16, float16, got {name!r}"


# --- load_model ---


def test_load_model_default_context_leaves_room_for_meta_tokens(model_dir):
    config, _, state = load_model(model_dir, "cpu")
    assert state.max_positions == config.max_position_embeddings == 64  # 12 meta + 52 prompt/generated
    assert state.ssm.dtype == torch.float32 and state.ssm.device == torch.device("cpu")


def test_load_model_explicit_context(model_dir):
    _, _, state = load_model(model_dir, "cpu", "bfloat16", max_model_len=100)
    assert state.max_positions == 12 + 100


@pytest.mark.parametrize("max_model_len", [0, -1])
def test_load_model_rejects_context_below_one(model_dir, max_model_len):
    with pytest.raises(ValueError, match=rf"^max_model_len must be >= 1, got {max_model_len}$"):
        load_model(model_dir, "cpu", max_model_len=max_model_len)


def test_load_model_no_room_after_meta_tokens(model_dir):
    edit_json(model_dir / "config.json", max_position_embeddings=12)
    with pytest.raises(ConfigError) as e:
        load_model(model_dir, "cpu")
    assert str(e.value) == "config.json: max_position_embeddings (12) leaves no room after 12 meta tokens"
    assert load_model(model_dir, "cpu", max_model_len=8)[2].max_positions == 20  # an explicit limit still serves


def test_load_model_bad_device_before_weights(model_dir, no_cuda):
    (model_dir / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="CUDA is not available"):
        load_model(model_dir, "cuda")


def test_load_model_missing_config(model_dir):
    (model_dir / "config.json").unlink()
    with pytest.raises(ConfigError, match=r"config\.json: file not found$"):
        load_model(model_dir, "cpu")


# --- Engine.load ---


def test_engine_load(model_dir):
    engine = Engine.load(model_dir, device="cpu")
    assert (engine.model_name, engine.device, engine.max_model_len) == (ODD_6L, "cpu", 52)
    assert engine.defaults == {} and engine.eos_token_ids == (2,)


@pytest.mark.parametrize("make", [lambda d: d / "config.json", lambda d: d / "absent"], ids=["a-file", "absent"])
def test_engine_load_not_a_directory(model_dir, make):
    path = make(model_dir)
    with pytest.raises(CheckpointError) as e:
        Engine.load(path, device="cpu")
    assert str(e.value) == f"{path}: not a directory"


def test_generation_config_extra_eos_ids_are_merged(model_dir):
    edit_json(model_dir / "generation_config.json", eos_token_id=[7, 2, 9])
    assert Engine.load(model_dir, device="cpu").eos_token_ids == (2, 7, 9)  # config.json's first, no repeats


def test_generation_config_single_eos_id(model_dir):
    edit_json(model_dir / "generation_config.json", eos_token_id=5)
    assert Engine.load(model_dir, device="cpu").eos_token_ids == (2, 5)


def test_generation_config_sampling_defaults(model_dir):
    edit_json(model_dir / "generation_config.json", temperature=0.6, top_p=0.9, top_k=50, do_sample=True)
    defaults = Engine.load(model_dir, device="cpu").defaults
    assert defaults == {"temperature": 0.6, "top_p": 0.9, "top_k": 50}
    assert type(defaults["top_k"]) is int


def test_no_generation_config(model_dir):
    (model_dir / "generation_config.json").unlink()
    engine = Engine.load(model_dir, device="cpu")
    assert engine.defaults == {} and engine.eos_token_ids == (2,)


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("temperature", "hot", "a number >= 0"),
        ("top_k", "50", "an int >= 0"),
        ("repetition_penalty", True, "a number > 0"),
        ("min_p", None, "a number in [0, 1]"),
        ("eos_token_id", "2", "an int or a list of ints"),
        ("eos_token_id", [2, True], "an int or a list of ints"),
        ("eos_token_id", 2.0, "an int or a list of ints"),
    ],
    ids=["temperature-string", "top-k-string", "penalty-bool", "min-p-null", "eos-string", "eos-bool", "eos-float"],
)
def test_generation_config_bad_value(model_dir, without_model, key, value, expected):
    edit_json(model_dir / "generation_config.json", **{key: value})
    with pytest.raises(CheckpointError) as e:
        Engine.load(model_dir, device="cpu")
    assert str(e.value) == f"generation_config.json: {key} must be {expected}, got {value!r}"


@pytest.mark.parametrize("text", ["{", "[]", "7"], ids=["bad-json", "list", "number"])
def test_generation_config_not_an_object(model_dir, without_model, text):
    (model_dir / "generation_config.json").write_text(text)
    with pytest.raises(CheckpointError, match=r"^generation_config\.json: not a JSON object$"):
        Engine.load(model_dir, device="cpu")


@pytest.mark.parametrize(
    "key, value", [("temperature", -0.5), ("top_p", 0), ("top_p", 1.5)], ids=["temperature", "top-p-0", "top-p-1.5"]
)
def test_generation_config_out_of_range(model_dir, key, value):
    edit_json(model_dir / "generation_config.json", **{key: value})
    with pytest.raises(CheckpointError, match=rf"^generation_config\.json: {key} must be .*, got {value!r}$"):
        Engine.load(model_dir, device="cpu")
