"""Text <-> token ids for one checkpoint folder: tokenizer.json through Hugging Face `tokenizers`, the chat template
of tokenizer_config.json rendered with jinja2 the way HF renders it, and incremental detokenization for streaming.
No torch here (the server imports this). Stop strings are stops.py's job.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import tokenizers
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

REPLACEMENT_CHAR = "\ufffd"  # what decoding yields for an incomplete or invalid UTF-8 byte sequence
_PROMPT_WINDOW = 5  # prompt tokens decoded before the first generated token, so its leading ▁ becomes a space
_CONTINUATION_BYTE = re.compile(r"<0x[89AB][0-9A-F]>")  # byte-fallback pieces 0x80-0xBF: never start a character


class TokenizerError(ValueError):
    """A tokenizer file is missing, unreadable or holds a bad field."""


class ChatTemplateError(ValueError):
    """The chat template is missing, does not compile, or failed (or refused) to render these messages."""


class Tokenizer:
    """One checkpoint's tokenizer: encode/decode, its special tokens, and its chat template."""

    def __init__(
        self,
        tok: tokenizers.Tokenizer,
        special_tokens: Mapping[str, str | None],
        add_bos_token: bool | None,
        add_eos_token: bool | None,
        chat_templates: Mapping[str, str],
        template_origin: str,
    ) -> None:
        self._tok = tok
        self.special_tokens = dict(special_tokens)  # bos_token/eos_token/unk_token/pad_token -> text or None
        self.add_bos_token = add_bos_token  # None: tokenizer.json's post-processor decides
        self.add_eos_token = add_eos_token
        self.chat_templates = dict(chat_templates)  # name -> jinja source; a single template is named "default"
        self.template_origin = template_origin  # where the template came from, for error messages
        self.bos_token_id = self._special_id("bos_token")
        self.eos_token_id = self._special_id("eos_token")
        for key, token_id, is_added in (
            ("bos_token", self.bos_token_id, add_bos_token),
            ("eos_token", self.eos_token_id, add_eos_token),
        ):
            if is_added and token_id is None:
                raise TokenizerError(f"tokenizer_config.json: add_{key} is true but {key} is not set")

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> Tokenizer:
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            if (model_dir / "tokenizer.model").is_file():
                raise TokenizerError(
                    f"{path}: not found; only a SentencePiece tokenizer.model is present and tokenizer.json is "
                    "required. Produce it once with transformers' fast tokenizer: "
                    "AutoTokenizer.from_pretrained(dir, use_fast=True).save_pretrained(dir)"
                )
            raise TokenizerError(f"{path}: not found")
        try:
            tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # `tokenizers` raises a bare Exception for unreadable, bad JSON or a bad schema
            raise TokenizerError(f"{path}: cannot be loaded: {_first_line(e)}") from None
        config_path = model_dir / "tokenizer_config.json"
        config = _read_json_object(config_path) if config_path.is_file() else {}
        special_tokens = {key: _token_text(config, key) for key in ("bos_token", "eos_token", "unk_token", "pad_token")}
        # LlamaTokenizer(Fast) semantics: either key present means the flags decide, with Llama's defaults.
        has_flags = "add_bos_token" in config or "add_eos_token" in config
        add_bos = _bool_field(config, "add_bos_token", True) if has_flags else None
        add_eos = _bool_field(config, "add_eos_token", False) if has_flags else None
        templates, origin = _read_chat_templates(model_dir, config)
        return cls(tok, special_tokens, add_bos, add_eos, templates, origin)

    def _special_id(self, key: str) -> int | None:
        text = self.special_tokens[key]
        if text is None:
            return None
        token_id = self._tok.token_to_id(text)
        if token_id is None:
            raise TokenizerError(f"tokenizer_config.json: {key}: {text!r} is not in tokenizer.json's vocabulary")
        return token_id

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens["eos_token"]

    @property
    def has_chat_template(self) -> bool:
        return bool(self.chat_templates)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not add_special_tokens or self.add_bos_token is None:
            return self._ids(text, add_special_tokens)
        # HF's LlamaTokenizerFast rebuilds the post-processor from these flags; same ids, built by hand.
        ids = self._ids(text, add_special_tokens=False)
        bos = [self.bos_token_id] if self.add_bos_token else []
        eos = [self.eos_token_id] if self.add_eos_token else []
        return bos + ids + eos

    def _ids(self, text: str, add_special_tokens: bool) -> list[int]:
        # encode_batch releases the GIL (encode does not): a megabyte prompt must not stall the server's threads
        return self._tok.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def detokenizer(self, prompt_ids: Sequence[int] = ()) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self, prompt_ids)

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        **extra: Any,
    ) -> str:
        source = self._pick_template(tools)
        variables = {**self.special_tokens, **extra}
        variables.update(messages=messages, add_generation_prompt=add_generation_prompt, tools=tools)
        try:
            return _compile(source).render(**variables)
        except _TemplateRaised as e:
            raise ChatTemplateError(f"{self.template_origin}: the template rejected the messages: {e}") from None
        except SecurityError as e:
            raise ChatTemplateError(f"{self.template_origin}: unsafe operation refused by the sandbox: {e}") from None
        except jinja2.TemplateSyntaxError as e:
            raise ChatTemplateError(f"{self.template_origin}: syntax error on line {e.lineno}: {e.message}") from None
        except Exception as e:  # the template is code from the checkpoint: any failure is its failure, not ours
            raise ChatTemplateError(f"{self.template_origin}: {type(e).__name__}: {_first_line(e)}") from None

    def encode_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> list[int]:
        # Like HF apply_chat_template(tokenize=True): no BOS added, templates that want one write it themselves.
        text = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tools=tools)
        return self.encode(text, add_special_tokens=False)

    def _pick_template(self, tools: Sequence[Mapping[str, Any]] | None) -> str:
        if not self.chat_templates:
            raise ChatTemplateError(
                f"{self.template_origin}: this checkpoint has no chat template (no chat_template in "
                "tokenizer_config.json and no chat_template.jinja); use the completions endpoint"
            )
        if tools and "tool_use" in self.chat_templates:
            return self.chat_templates["tool_use"]
        if "default" not in self.chat_templates:
            names = sorted(self.chat_templates)
            raise ChatTemplateError(f"{self.template_origin}: no template named 'default' among {names}")
        return self.chat_templates["default"]


class IncrementalDetokenizer:
    """Turns generated ids into text deltas one token at a time.

    Decoding a token alone loses context: a leading ▁ is stripped as if it began the text, and a byte-fallback
    piece such as <0xE2> is half a character. So each push decodes a short window of earlier tokens with and
    without the new token and emits the difference, holding back while the result ends in U+FFFD. The window
    then moves forward to the tokens just emitted.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = ()) -> None:
        self._tokenizer = tokenizer
        self._ids = list(prompt_ids[-_PROMPT_WINDOW:])
        start = 0
        # A window that began inside a multi-byte character would decode to U+FFFD forever: start on a boundary.
        while start < len(self._ids) and _CONTINUATION_BYTE.fullmatch(tokenizer.id_to_token(self._ids[start]) or ""):
            start += 1
        self._prefix_offset = start  # the window of already-emitted tokens starts here ...
        self._read_offset = len(self._ids)  # ... and ends here; later ids are not emitted yet

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        return self._emit(final=False)

    def flush(self) -> str:
        """What is still held back; a dangling incomplete character comes out as U+FFFD."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        if self._read_offset == len(self._ids):
            return ""
        prefix_text = self._tokenizer.decode(self._ids[self._prefix_offset : self._read_offset])
        text = self._tokenizer.decode(self._ids[self._prefix_offset :])
        if not final and (len(text) <= len(prefix_text) or text.endswith(REPLACEMENT_CHAR)):
            return ""  # nothing yet (a skipped special token), or half a character a later byte piece may complete
        if text.startswith(prefix_text):
            delta = text[len(prefix_text) :]
        else:
            # `tokenizers` turns a run of byte pieces that is not valid UTF-8 into one U+FFFD per byte, so trailing
            # bytes already emitted were regrouped with new ones. The new tokens then start with a byte piece,
            # which carries no ▁, so decoding them alone is exact.
            delta = self._tokenizer.decode(self._ids[self._read_offset :])
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return delta


class _TemplateRaised(Exception):
    """raise_exception() was called by the template; carries the template's own message."""


def _raise_exception(message: str) -> None:
    raise _TemplateRaised(message)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def _tojson(value: Any, indent: int | None = None, separators: Any = None, sort_keys: bool = False) -> str:
    # jinja's own tojson escapes HTML and non-ASCII; chat templates want the text the model was trained on.
    return json.dumps(value, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)


class _StrictSandbox(ImmutableSandboxedEnvironment):
    """The sandbox HF uses, except that touching an unsafe attribute fails at once. The stock sandbox returns an
    Undefined that fails only when used further, so `{{ ''.__class__ }}` would render as empty text."""

    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")


@functools.lru_cache(maxsize=16)
def _compile(source: str) -> jinja2.Template:
    env = _StrictSandbox(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
    return env.from_string(source)


def _read_chat_templates(model_dir: Path, config: Mapping[str, Any]) -> tuple[dict[str, str], str]:
    jinja_path = model_dir / "chat_template.jinja"
    if jinja_path.is_file():  # recent HF saves the template beside the config, and prefers it
        try:
            return {"default": jinja_path.read_text(encoding="utf-8")}, str(jinja_path.name)
        except (OSError, UnicodeDecodeError) as e:
            raise TokenizerError(f"{jinja_path}: cannot be read: {_first_line(e)}") from None
    origin = "tokenizer_config.json: chat_template"
    template = config.get("chat_template")
    if template is None:
        return {}, origin
    if isinstance(template, str):
        return {"default": template}, origin
    is_named_list = isinstance(template, list) and all(
        isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str) for t in template
    )
    if not is_named_list:
        raise TokenizerError(
            f"{origin}: expected a string or a list of {{'name', 'template'}} objects, got {type(template).__name__}"
        )
    return {t["name"]: t["template"] for t in template}, origin


def _read_json_object(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{path}: cannot be read as JSON: {_first_line(e)}") from None
    if not isinstance(value, dict):
        raise TokenizerError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def _token_text(config: Mapping[str, Any], key: str) -> str | None:
    """A special token is a string or an AddedToken-style object {"content": ..., ...}."""
    value = config.get(key)
    if isinstance(value, dict):
        value = value.get("content")
    if value is not None and not isinstance(value, str):
        raise TokenizerError(f"tokenizer_config.json: {key} must be a string or an object with a 'content' string")
    return value


def _bool_field(config: Mapping[str, Any], key: str, default: bool) -> bool:
    value = config.get(key, default)
    if not isinstance(value, bool):
        raise TokenizerError(f"tokenizer_config.json: {key} must be true or false, got {value!r}")
    return value


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__
