"""python -m tools.random_checkpoint OUT [--tokenizer-from DIR]: a Hymba-1.5B-shaped checkpoint with random weights.

For serving benchmarks where the real checkpoint cannot be downloaded: the real config.json keys and tensor names
(engine.bench's HYMBA_1_5B and random_weights), bf16 safetensors, and the tokenizer files of another checkpoint.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from engine.bench import HYMBA_1_5B, random_weights
from engine.config import HymbaConfig

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


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
    for name in TOKENIZER_FILES:
        shutil.copy(args.tokenizer_from / name, args.out / name)
    print(f"wrote {args.out}: {sum(t.numel() for t in tensors.values()):,} parameters")


if __name__ == "__main__":
    main()
