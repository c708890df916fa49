"""Shared test fixtures. Each block below is self-contained; add new fixtures as new blocks."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest

# --- tiny_tokenizer_dir: a Llama-2-family tokenizer (BPE + byte fallback, ▁ spaces) small enough to train here ---

CONFORMANCE_DIR = Path(__file__).parent / "data" / "conformance"
_TINY_TOKENIZER_TEXT = (
    "The quick brown fox jumps over the lazy dog. A model reads the prompt and writes an answer, one token at a "
    "time. Hello world! The server streams text to the client as soon as it is ready. Numbers like 42 and 2024 "
    "appear too. We had coffee at the café and talked about the weather, the sea, and the stars. System User "
    "Assistant Tool: be brief, be kind, and stop when you are done."
)


@functools.cache
def _tiny_tokenizer_json() -> str:
    """Trains once per session. Layout as in Llama-2: <unk>/<s>/</s> at 0/1/2, the 256 byte pieces <0x00>..<0xFF>
    at 3..258 (so "\\n" is <0x0A> = 13), then the learned pieces. No newline in the text: it goes through bytes."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    # Train with a Metaspace split so merges never cross words, as SentencePiece's do not.
    trainee = Tokenizer(models.BPE(unk_token="<unk>"))
    trainee.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    trainee.train_from_iterator([_TINY_TOKENIZER_TEXT], trainer)
    trained = json.loads(trainee.to_str())["model"]

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"<0x{b:02X}>": 3 + b for b in range(256)}
    for piece, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m) for m in trained["merges"]]
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    # The Llama-2 tokenizer.json pipeline: ▁ prepended and spaces replaced by the normalizer, no pre-tokenizer.
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in ("<unk>", "<s>", "</s>")])
    return tok.to_str()


@pytest.fixture
def tiny_tokenizer_dir(tmp_path: Path) -> Path:
    """A folder with tokenizer.json and a Hymba-Instruct-style tokenizer_config.json (add_bos_token true, the chat
    template of the conformance checkpoints). Tests may rewrite either file."""
    template = json.loads((CONFORMANCE_DIR / "hymba-mirror-12L" / "tokenizer_config.json").read_text())["chat_template"]
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": {"content": "<s>", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False},
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<unk>",
        "chat_template": template,
        "tokenizer_class": "LlamaTokenizer",
    }
    model_dir = tmp_path / "tiny-tokenizer"
    model_dir.mkdir()
    (model_dir / "tokenizer.json").write_text(_tiny_tokenizer_json(), encoding="utf-8")
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return model_dir


# --- kernels: a device fixture, fresh seeds, NaN-filled outputs, one assert_close with its tolerance table ---

# Largest relative RMS error ||actual - expected|| / ||expected|| allowed, by the dtype of the kernel's inputs. The
# twins compute in fp32 from the same inputs, so what is left is rounding the output (and, in bf16/fp16 attention,
# the probabilities fed to the second matmul).
TOLERANCES = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1.2e-2}


def assert_close(name: str, actual, expected, dtype) -> None:
    """Fails on a shape mismatch, on any NaN the expected tensor lacks, or past TOLERANCES[dtype]."""
    import torch

    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}"
    unexpected_nan = torch.isnan(actual) & ~torch.isnan(expected)
    assert not unexpected_nan.any(), f"{name}: {int(unexpected_nan.sum())} NaN elements (unwritten or invalid)"
    a, e = actual.double(), expected.double()
    err = ((a - e).norm() / e.norm().clamp_min(1e-30)).item()
    tol = TOLERANCES[str(dtype).removeprefix("torch.")]
    assert err <= tol, (
        f"{name}: relative RMS error {err:.2e} > {tol:.0e} ({dtype}), max |diff| {(a - e).abs().max():.2e}"
    )


def nan_empty(*shape: int, dtype, device):
    """An output buffer of NaN: an element a kernel forgets to write stays NaN and fails assert_close."""
    import torch

    return torch.full(shape, float("nan"), dtype=dtype, device=device)


@pytest.fixture
def device(request):
    """cuda where there is one; else cpu, where the Triton launchers need TRITON_INTERPRET=1 (the CI command sets it).
    Tests marked gpu (real sizes, bf16) are skipped without CUDA."""
    import os

    import torch

    if torch.cuda.is_available():
        return torch.device("cuda")
    if request.node.get_closest_marker("gpu"):
        pytest.skip("real-size kernel test: needs a CUDA device")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton launchers on CPU need TRITON_INTERPRET=1 set before triton is imported")
    return torch.device("cpu")


@pytest.fixture
def seed() -> int:
    """Fresh random inputs every run; the seed is printed so a failure can be replayed with torch.manual_seed."""
    import random

    import torch

    value = random.randrange(2**31)
    print(f"seed {value}")
    torch.manual_seed(value)
    return value
