"""python -m tools.random_checkpoint OUT [--tokenizer-from DIR]: a Hymba-1.5B-shaped checkpoint with random weights.

For serving benchmarks where the real checkpoint cannot be downloaded: the real config.json keys and tensor names
(engine.bench's HYMBA_1_5B and random_weights), bf16 safetensors, and the tokenizer files of another checkpoint,
its vocabulary padded with plain tokens up to the model's. Without the padding most random tokens (ids past the
bundled tokenizer's 4,096) would decode to no text, so a streaming client would see its first text, and every
next one, several tokens late: a TTFT of 19 ms through HTTP against the engine's 4.2 at 128 tokens, all of it
that artefact.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer

from engine.bench import HYMBA_1_5B, random_weights
from engine.config import HymbaConfig


def full_vocab_tokenizer(path: Path, vocab_size: int) -> Tokenizer:
    """The tokenizer at path with plain tokens "<r{id}>" added for every id it lacks below vocab_size, so that every
    id the model can sample decodes to text. Ids it has keep their tokens."""
    tokenizer = Tokenizer.from_file(str(path))
    first = tokenizer.get_vocab_size(with_added_tokens=True)
    tokenizer.add_tokens([AddedToken(f"<r{i}>", normalized=False) for i in range(first, vocab_size)])
    assert tokenizer.get_vocab_size(with_added_tokens=True) >= vocab_size, f"{path}: padding the vocabulary failed"
    return tokenizer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.random_checkpoint", description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--tokenizer-from", type=Path, default=Path(__file__).parents[1] / "engine" / "tiny")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    config = HymbaConfig.from_dict(HYMBA_1_5B)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tensors = {name: t.contiguous().cpu() for name, t in random_weights(config, device, torch.bfloat16).items()}
    save_file(tensors, str(args.out / "model.safetensors"), metadata={"format": "pt"})
    (args.out / "config.json").write_text(json.dumps(HYMBA_1_5B, indent=2) + "\n")
    (args.out / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}) + "\n")
    tokenizer = full_vocab_tokenizer(args.tokenizer_from / "tokenizer.json", config.vocab_size)
    tokenizer.save(str(args.out / "tokenizer.json"))
    shutil.copy(args.tokenizer_from / "tokenizer_config.json", args.out / "tokenizer_config.json")
    print(f"wrote {args.out}: {sum(t.numel() for t in tensors.values()):,} parameters")


if __name__ == "__main__":
    main()
