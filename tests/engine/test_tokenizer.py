"""engine/tokenizer.py: loading and its errors, BOS rules, the chat template and its sandbox, streaming decode."""

from __future__ import annotations

import json
import random
from datetime import datetime
from pathlib import Path

import pytest

from engine.tokenizer import ChatTemplateError, Tokenizer, TokenizerError

CONFORMANCE_DIRS = sorted(p for p in (Path(__file__).parents[1] / "data" / "conformance").iterdir() if p.is_dir())
TEXTS = {
    "ascii": "Hello world! The server streams text to the client.",
    "accents": "café naïve résumé, déjà vu",
    "cjk": "日本語のテキストと中文",
    "emoji": "ok 🙂🚀 done 👍🏽",
    "spaces": "  two  spaces and\na newline\t",
}
CONVERSATION = [
    {"role": "system", "content": "  Be brief.  "},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!\n"},
    {"role": "tool", "content": " 42 "},
    {"role": "user", "content": "Again"},
]


def _edit_config(model_dir: Path, **changes: object) -> Path:
    """Rewrite tokenizer_config.json: a value of None deletes the key."""
    path = model_dir / "tokenizer_config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        config.pop(key, None) if value is None else config.__setitem__(key, value)
    path.write_text(json.dumps(config))
    return model_dir


def _stream(tok: Tokenizer, ids: list[int], prompt_ids: list[int] = ()) -> list[str]:
    detok = tok.detokenizer(prompt_ids)
    return [detok.push(i) for i in ids] + [detok.flush()]


# --- loading -----------------------------------------------------------------------------------------------------


def test_loads_special_tokens(tiny_tokenizer_dir: Path):
    tok = Tokenizer.from_dir(tiny_tokenizer_dir)
    assert (tok.bos_token_id, tok.eos_token_id, tok.eos_token) == (1, 2, "</s>")
    assert tok.vocab_size == 3 + 256 + 241 and tok.has_chat_template
    assert [tok.id_to_token(i) for i in (0, 1, 2, 13)] == ["<unk>", "<s>", "</s>", "<0x0A>"]
    assert tok.id_to_token(10**6) is None


@pytest.mark.parametrize("model_dir", CONFORMANCE_DIRS, ids=lambda p: p.name)
def test_conformance_tokenizers_load(model_dir: Path):
    tok = Tokenizer.from_dir(model_dir)
    vocab_size = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    assert tok.vocab_size == vocab_size and (tok.bos_token_id, tok.eos_token_id) == (1, 2)
    assert all(tok.id_to_token(i) == f"t{i}" for i in range(3, vocab_size))
    assert tok.encode("t3 t7 t100") == [1, 3, 7, 100]
    assert tok.decode([1, 3, 7, 100, 2]) == "t3 t7 t100"
    assert tok.apply_chat_template([{"role": "user", "content": "t5"}]).startswith("<extra_id_0>System\n\n")


def test_sentencepiece_only_folder_says_how_to_convert(tmp_path: Path):
    (tmp_path / "tokenizer.model").write_bytes(b"\x0a\x0b")
    with pytest.raises(TokenizerError, match=r"tokenizer\.json: not found; .*required.*save_pretrained"):
        Tokenizer.from_dir(tmp_path)


def test_missing_tokenizer_json(tmp_path: Path):
    with pytest.raises(TokenizerError, match=r"tokenizer\.json: not found$"):
        Tokenizer.from_dir(tmp_path)


@pytest.mark.parametrize("content", ["{not json", "{}", ""], ids=["bad-json", "not-a-tokenizer", "empty"])
def test_corrupt_tokenizer_json(tmp_path: Path, content: str):
    (tmp_path / "tokenizer.json").write_text(content)
    with pytest.raises(TokenizerError, match=r"tokenizer\.json: cannot be loaded: "):
        Tokenizer.from_dir(tmp_path)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"chat_template": 3}, r"tokenizer_config\.json: chat_template: expected a string or a list"),
        ({"chat_template": [{"name": "default"}]}, r"chat_template: expected a string or a list"),
        ({"bos_token": ["<s>"]}, r"tokenizer_config\.json: bos_token must be a string or an object"),
        ({"eos_token": "<eos>"}, r"tokenizer_config\.json: eos_token: '<eos>' is not in tokenizer\.json's vocab"),
        ({"add_bos_token": "yes"}, r"tokenizer_config\.json: add_bos_token must be true or false, got 'yes'"),
        ({"bos_token": None}, r"tokenizer_config\.json: add_bos_token is true but bos_token is not set"),
    ],
    ids=["template-int", "template-list-bad", "bos-list", "eos-unknown", "flag-str", "bos-unset"],
)
def test_bad_config_fields_are_named(tiny_tokenizer_dir: Path, changes: dict, message: str):
    with pytest.raises(TokenizerError, match=message):
        Tokenizer.from_dir(_edit_config(tiny_tokenizer_dir, **changes))


@pytest.mark.parametrize("content", ["{oops", "[1, 2]"], ids=["bad-json", "not-an-object"])
def test_unreadable_tokenizer_config(tiny_tokenizer_dir: Path, content: str):
    (tiny_tokenizer_dir / "tokenizer_config.json").write_text(content)
    with pytest.raises(TokenizerError, match=r"tokenizer_config\.json: (cannot be read as JSON|expected a JSON obj)"):
        Tokenizer.from_dir(tiny_tokenizer_dir)


# --- encode / decode ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS.values(), ids=TEXTS.keys())
def test_round_trip(tiny_tokenizer_dir: Path, text: str):
    tok = Tokenizer.from_dir(tiny_tokenizer_dir)
    ids = tok.encode(text)
    assert ids[0] == 1 and tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=False).startswith("<s>")


def test_byte_fallback_is_used_for_unseen_characters(tiny_tokenizer_dir: Path):
    tok = Tokenizer.from_dir(tiny_tokenizer_dir)
    pieces = [tok.id_to_token(i) for i in tok.encode("🙂", add_special_tokens=False)]
    assert pieces == ["▁", "<0xF0>", "<0x9F>", "<0x99>", "<0x82>"]


@pytest.mark.parametrize(
    "changes, starts_with_bos, ends_with_eos",
    [
        ({"add_bos_token": True, "add_eos_token": False}, True, False),
        ({"add_bos_token": False, "add_eos_token": False}, False, False),
        ({"add_bos_token": True, "add_eos_token": True}, True, True),
        ({"add_bos_token": None, "add_eos_token": True}, True, True),  # one key present: Llama's default for the other
        ({"add_bos_token": None, "add_eos_token": None}, True, False),  # no keys: tokenizer.json's post-processor
    ],
    ids=["bos", "no-bos", "bos-eos", "eos-only-key", "keys-absent"],
)
def test_bos_eos_rules(tiny_tokenizer_dir: Path, changes: dict, starts_with_bos: bool, ends_with_eos: bool):
    tok = Tokenizer.from_dir(_edit_config(tiny_tokenizer_dir, **changes))
    body = tok.encode("Hello world", add_special_tokens=False)
    assert body[0] not in (1, 2) and body[-1] not in (1, 2)
    assert tok.encode("Hello world") == [1] * starts_with_bos + body + [2] * ends_with_eos


def test_keys_absent_and_no_post_processor_adds_nothing(tiny_tokenizer_dir: Path):
    spec = json.loads((tiny_tokenizer_dir / "tokenizer.json").read_text())
    spec["post_processor"] = None
    (tiny_tokenizer_dir / "tokenizer.json").write_text(json.dumps(spec))
    tok = Tokenizer.from_dir(_edit_config(tiny_tokenizer_dir, add_bos_token=None, add_eos_token=None))
    ids = tok.encode("Hello")
    assert ids == tok.encode("Hello", add_special_tokens=False) and ids[0] != 1


# --- chat template -----------------------------------------------------------------------------------------------

EXPECTED_CHAT = (
    "<extra_id_0>System\nBe brief.\n\n"
    "<extra_id_1>User\nHi\n<extra_id_1>Assistant\nHello!\n<extra_id_1>Tool\n42\n<extra_id_1>User\nAgain\n"
)


def test_chat_template_renders_every_role(tiny_tokenizer_dir: Path):
    tok = Tokenizer.from_dir(tiny_tokenizer_dir)
    assert tok.apply_chat_template(CONVERSATION) == EXPECTED_CHAT + "<extra_id_1>Assistant\n"
    assert tok.apply_chat_template(CONVERSATION, add_generation_prompt=False) == EXPECTED_CHAT


def test_chat_template_without_system_message(tiny_tokenizer_dir: Path):
    tok = Tokenizer.from_dir(tiny_tokenizer_dir)
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert text == "<extra_id_0>System\n\n<extra_id_1>User\nHi\n<extra_id_1>Assistant\n"


def test_encode_chat_adds_no_bos(tiny_tokenizer_dir: Path):
    tok = Tokenizer.from_dir(tiny_tokenizer_dir)
    ids = tok.encode_chat(CONVERSATION)
    assert ids == tok.encode(tok.apply_chat_template(CONVERSATION), add_special_tokens=False) and 1 not in ids
    assert tok.decode(ids) == EXPECTED_CHAT + "<extra_id_1>Assistant\n"


def test_named_templates_pick_tool_use_when_tools_given(tiny_tokenizer_dir: Path):
    templates = [
        {"name": "default", "template": "plain:{{ messages[0].content }}"},
        {"name": "tool_use", "template": "tools:{{ tools | tojson }}|{{ tools[0] | tojson(indent=1) }}"},
    ]
    tok = Tokenizer.from_dir(_edit_config(tiny_tokenizer_dir, chat_template=templates))
    messages = [{"role": "user", "content": "héllo"}]
    assert tok.apply_chat_template(messages) == "plain:héllo"
    assert (
        tok.apply_chat_template(messages, tools=[{"name": "météo"}])
        == 'tools:[{"name": "météo"}]|{\n "name": "météo"\n}'
    )


def test_named_templates_without_default(tiny_tokenizer_dir: Path):
    tok = Tokenizer.from_dir(_edit_config(tiny_tokenizer_dir, chat_template=[{"name": "rag", "template": "x"}]))
    with pytest.raises(ChatTemplateError, match=r"chat_template: no template named 'default' among \['rag'\]"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_chat_template_jinja_file_takes_precedence(tiny_tokenizer_dir: Path):
    (tiny_tokenizer_dir / "chat_template.jinja").write_text("from file: {{ messages | length }}")
    tok = Tokenizer.from_dir(tiny_tokenizer_dir)
    assert tok.apply_chat_template(CONVERSATION) == "from file: 5"


def test_template_variables_and_helpers(tiny_tokenizer_dir: Path):
    template = (
        "{{ bos_token }}{{ eos_token }}{{ unk_token }}{{ pad_token }}|{{ custom }}|{{ strftime_now('%Y') }}|\n"
        "{% for m in messages %}\n"
        "    {% if loop.index > 2 %}{% break %}{% endif %}\n"
        "{{ m.role }};\n"
        "{% endfor %}"
    )
    tok = Tokenizer.from_dir(_edit_config(tiny_tokenizer_dir, chat_template=template))
    # trim_blocks and lstrip_blocks: block tags leave no newline or indentation behind.
    expected = f"<s></s><unk><unk>|yes|{datetime.now().year}|\nsystem;\nuser;\n"
    assert tok.apply_chat_template(CONVERSATION, custom="yes") == expected


def test_raise_exception_reaches_the_caller(tiny_tokenizer_dir: Path):
    template = (
        "{% if messages[0].role != 'user' %}{{ raise_exception('Conversation must start with user') }}{% endif %}"
    )
    tok = Tokenizer.from_dir(_edit_config(tiny_tokenizer_dir, chat_template=template))
    with pytest.raises(ChatTemplateError, match=r"^tokenizer_config\.json: chat_template: .*must start with user$"):
        tok.apply_chat_template(CONVERSATION)


def test_missing_chat_template(tiny_tokenizer_dir: Path):
    tok = Tokenizer.from_dir(_edit_config(tiny_tokenizer_dir, chat_template=None))
    assert not tok.has_chat_template
    with pytest.raises(ChatTemplateError, match="no chat template"):
        tok.encode_chat(CONVERSATION)


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ ''.__class__ }}",
        "{{ cycler.__init__.__globals__.os.system('echo pwned') }}",
        "{{ raise_exception.__globals__ }}",
        "{{ '{0.__class__.__mro__}'.format(messages) }}",
        "{% set _ = messages.append({'role': 'user'}) %}{{ messages | length }}",
        "{{ messages[0].update(role='x') }}",
    ],
    ids=["mro", "class", "cycler-globals", "function-globals", "str-format", "list-append", "dict-update"],
)
def test_sandbox_refuses_python_internals(tiny_tokenizer_dir: Path, template: str):
    tok = Tokenizer.from_dir(_edit_config(tiny_tokenizer_dir, chat_template=template))
    messages = [dict(m) for m in CONVERSATION]
    with pytest.raises(ChatTemplateError, match=r"^tokenizer_config\.json: chat_template: unsafe operation"):
        tok.apply_chat_template(messages)
    assert messages == CONVERSATION


@pytest.mark.parametrize(
    "template, message",
    [
        ("{% for m in messages %}", r"syntax error on line 1: "),
        ("{{ messages[0].nope.deeper }}", r"UndefinedError: "),
        ("{{ range(10**9) | list }}", r"OverflowError: "),
        ("{{ messages[0].content + 1 }}", r"TypeError: "),
    ],
    ids=["syntax", "undefined", "huge-range", "type"],
)
def test_template_errors_become_chat_template_errors(tiny_tokenizer_dir: Path, template: str, message: str):
    tok = Tokenizer.from_dir(_edit_config(tiny_tokenizer_dir, chat_template=template))
    with pytest.raises(ChatTemplateError, match=r"^tokenizer_config\.json: chat_template: " + message) as info:
        tok.apply_chat_template(CONVERSATION)
    assert "\n" not in str(info.value)


# --- incremental detokenizer -------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS.values(), ids=TEXTS.keys())
def test_stream_of_valid_text_never_shows_half_a_character(tiny_tokenizer_dir: Path, text: str):
    tok = Tokenizer.from_dir(tiny_tokenizer_dir)
    ids = tok.encode(text, add_special_tokens=False)
    deltas = _stream(tok, ids)
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == tok.decode(ids) == text


@pytest.mark.parametrize(
    "prompt, completion", [("Hello", " world"), ("日本", "語です"), ("ok 🙂", "🚀 go")], ids=["ascii", "cjk", "emoji"]
)
def test_first_token_after_prompt_keeps_its_space(tiny_tokenizer_dir: Path, prompt: str, completion: str):
    tok = Tokenizer.from_dir(tiny_tokenizer_dir)
    prompt_ids = tok.encode(prompt)
    full_ids = tok.encode(prompt + completion)
    assert full_ids[: len(prompt_ids)] == prompt_ids  # the split point is a token boundary
    deltas = _stream(tok, full_ids[len(prompt_ids) :], prompt_ids)
    assert all("\ufffd" not in d for d in deltas) and "".join(deltas) == completion
    assert deltas[-1] == ""  # streamed as it came: nothing was left for flush()


def test_special_tokens_are_skipped(tiny_tokenizer_dir: Path):
    tok = Tokenizer.from_dir(tiny_tokenizer_dir)
    hello, world = tok.encode("Hello world!", add_special_tokens=False)
    assert _stream(tok, [1, hello, 2, world, 2]) == ["", "Hello", "", " world!", "", ""]


def test_dangling_bytes_are_held_then_flushed_as_replacement(tiny_tokenizer_dir: Path):
    tok = Tokenizer.from_dir(tiny_tokenizer_dir)
    euro = [3 + 0xE2, 3 + 0x82, 3 + 0xAC]  # "€" as three byte-fallback pieces
    detok = tok.detokenizer()
    assert [detok.push(i) for i in euro] == ["", "", "€"]
    assert [detok.push(i) for i in euro[:2]] == ["", ""]
    # decode(all) would say "\ufffd" * 5: the invalid run rewrites the € already sent. Only the new bytes come out.
    assert detok.flush() == "\ufffd\ufffd" == tok.decode(euro[:2])
    assert detok.flush() == ""


def test_invalid_bytes_mid_stream_do_not_rewrite_sent_text(tiny_tokenizer_dir: Path):
    tok = Tokenizer.from_dir(tiny_tokenizer_dir)
    euro, (a,) = [3 + 0xE2, 3 + 0x82, 3 + 0xAC], tok.encode("a", add_special_tokens=False)
    assert _stream(tok, [*euro, euro[0], a]) == ["", "", "€", "", "\ufffd a", ""]


def test_stream_equals_decode_on_random_ids(tiny_tokenizer_dir: Path):
    tok = Tokenizer.from_dir(tiny_tokenizer_dir)
    rng = random.Random(0)
    pieces = range(3 + 256, tok.vocab_size)  # learned pieces: always whole characters
    alphabet = "abc xyz.,!\né€日本語🙂👍🏽"
    num_checked_raw = 0
    for _ in range(300):
        from_pieces = rng.choices(pieces, k=rng.randint(1, 30))
        from_text = tok.encode("".join(rng.choices(alphabet, k=rng.randint(1, 30))), add_special_tokens=False)
        mixed = [*from_pieces[:5], rng.choice([1, 2]), *from_text, *from_pieces[5:]]
        for ids in (from_pieces, from_text, mixed):
            deltas = _stream(tok, ids)
            assert "".join(deltas) == tok.decode(ids) and all("\ufffd" not in d for d in deltas), ids
        # Any ids at all (stray bytes included): whenever the full text is valid, the stream must equal it.
        raw = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(1, 20))]
        if "\ufffd" not in tok.decode(raw):
            num_checked_raw += 1
            assert "".join(_stream(tok, raw)) == tok.decode(raw), raw
    assert num_checked_raw > 10
