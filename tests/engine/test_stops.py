"""engine/stops.py: stop strings found across deltas, never emitted, and only a possible stop's start held back."""

from __future__ import annotations

import random

import pytest

from engine.stops import StopMatcher


def _run(stops: tuple[str, ...], deltas: list[str]) -> list[tuple[str, bool]]:
    matcher = StopMatcher(stops)
    steps = []
    for delta in deltas:
        steps.append(matcher.push(delta))
        if steps[-1][1]:
            break
    else:
        steps.append((matcher.flush(), False))
    return steps


@pytest.mark.parametrize(
    "stops, deltas, expected",
    [
        (("STOP",), ["hello STOP world"], [("hello ", True)]),
        (("STOP",), ["hel", "lo ST", "OP more"], [("hel", False), ("lo ", False), ("", True)]),
        (("STOP",), ["S", "T", "O", "P"], [("", False)] * 3 + [("", True)]),
        (("STOP",), ["STOP"], [("", True)]),
        (("</s>",), ["a<", "/", "x", "</", "s>"], [("a", False), ("", False), ("</x", False), ("", False), ("", True)]),
        (("aab",), ["a", "a", "a", "b"], [("", False), ("", False), ("a", False), ("", True)]),
        (("abab",), ["aba", "bab"], [("", False), ("", True)]),
        (("world", "lo"), ["hello world"], [("hel", True)]),
        (("abcd", "c"), ["ab", "c", "d"], [("", False), ("ab", True)]),
        (("\n\nUser:",), ["a\n", "\nUs", "x"], [("a", False), ("", False), ("\n\nUsx", False), ("", False)]),
    ],
    ids=[
        "whole",
        "split",
        "char-by-char",
        "at-start",
        "false-start",
        "overlapping-prefix",
        "self-overlap",
        "earliest-wins",
        "first-complete-wins",
        "partial-released",
    ],
)
def test_stop_strings(stops: tuple[str, ...], deltas: list[str], expected: list[tuple[str, bool]]):
    assert _run(stops, deltas) == expected


def test_flush_releases_the_held_tail():
    matcher = StopMatcher(("STOP",))
    assert matcher.push("the ST") == ("the ", False)
    assert matcher.flush() == "ST"
    assert matcher.flush() == ""


@pytest.mark.parametrize("stops", [(), ("",), ("", "")], ids=["none", "empty", "empties"])
def test_no_stop_strings_pass_everything_through(stops: tuple[str, ...]):
    matcher = StopMatcher(stops)
    assert matcher.stops == ()
    assert matcher.push("") == ("", False)
    assert matcher.push("any text") == ("any text", False)
    assert matcher.flush() == ""


def test_empty_stop_is_ignored_beside_real_ones():
    assert _run(("", "x"), ["abxc"]) == [("ab", True)]


def test_after_a_stop_nothing_more_comes_out():
    matcher = StopMatcher(("x",))
    assert matcher.push("axb") == ("a", True)
    assert matcher.push("more") == ("", True)
    assert matcher.flush() == "" and matcher.is_stopped


def test_random_streams_match_a_whole_text_search():
    rng = random.Random(0)
    for _ in range(2000):
        text = "".join(rng.choices("ab\n<>", k=rng.randint(0, 40)))
        stops = tuple("".join(rng.choices("ab\n<>", k=rng.randint(0, 4))) for _ in range(rng.randint(1, 3)))
        cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randint(0, 8))))
        deltas = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        starts = [i for i in (text.find(s) for s in stops if s) if i >= 0]
        expected = text[: min(starts)] if starts else text

        matcher, emitted, is_stopped = StopMatcher(stops), "", False
        max_held = max((len(s) for s in stops), default=1) - 1
        for num_seen, delta in enumerate(deltas, 1):
            out, is_stopped = matcher.push(delta)
            emitted += out
            if is_stopped:
                break
            seen = "".join(deltas[:num_seen])
            held = seen[len(emitted) :]
            # Prompt: only a tail that some stop string starts with is held back, never more.
            assert seen.startswith(emitted) and len(held) <= max(max_held, 0)
            assert held == "" or any(s.startswith(held) for s in stops if s)
        if not is_stopped:
            emitted += matcher.flush()
        assert (emitted, is_stopped) == (expected, bool(starts)), (text, stops, deltas)
