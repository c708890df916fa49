"""tools/random_checkpoint.py: the benchmark checkpoint's tokenizer covers the whole vocabulary, so every token a
random model samples streams as text (else most would decode to nothing and the client's TTFT would count them)."""

from __future__ import annotations

import shutil
from pathlib import Path

from engine.tokenizer import Tokenizer
from tools.random_checkpoint import full_vocab_tokenizer

TINY = Path(__file__).parents[2] / "engine" / "tiny"


def test_padded_tokenizer_streams_text_for_every_id_and_keeps_its_own(tmp_path: Path):
    full_vocab_tokenizer(TINY / "tokenizer.json", 4096 + 300).save(str(tmp_path / "tokenizer.json"))
    shutil.copy(TINY / "tokenizer_config.json", tmp_path / "tokenizer_config.json")
    padded, original = Tokenizer.from_dir(tmp_path), Tokenizer.from_dir(TINY)
    assert padded.vocab_size == 4096 + 300
    text = "To be, or not to be: that is the question."
    assert padded.encode(text) == original.encode(text)
    detokenizer = padded.detokenizer()
    pieces = [detokenizer.push(i) for i in (4096, 4200, 4395)]
    assert pieces == ["<r4096>", "<r4200>", "<r4395>"], "an id past the original vocabulary streamed no text"
