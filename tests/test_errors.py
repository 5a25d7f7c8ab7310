"""first_line: the one line of an exception's text that a one-line error quotes."""

import random

import pytest

from ray_pipeline.errors import first_line

pytestmark = pytest.mark.fast


@pytest.mark.parametrize(
    ("message", "want"),
    [
        ("disk full", "disk full"),
        ("", "ValueError"),
        ("   \n\t \n", "ValueError"),
        ("first\nsecond", "first"),
        ("\n\n  first  \nsecond", "first"),
        ("first\r\nsecond", "first"),
        ("x" * 500, "x" * 200),
    ],
)
def test_first_line_of_a_message(message, want):
    assert first_line(ValueError(message)) == want


def test_limit_and_default():
    assert first_line(KeyError(), 3) == "Key"
    assert first_line(RuntimeError(""), default="") == ""
    assert first_line(RuntimeError(" \n "), default="no message") == "no message"
    assert first_line(RuntimeError("abcdef\nghi"), 4, default="none") == "abcd"


def test_generated_messages_give_their_first_non_blank_line():
    rng = random.Random(13)
    pieces = ["", " ", "\t", "\n", "\r\n", "word", "  two words ", "é", "x" * 90]
    for _ in range(2000):
        message = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 8)))
        limit = rng.randint(1, 120)
        got = first_line(OSError(message), limit)
        assert "\n" not in got and "\r" not in got
        assert 0 < len(got) <= limit
        lines = [line.strip() for line in message.splitlines() if line.strip()]
        assert got == (lines[0] if lines else "OSError")[:limit]
