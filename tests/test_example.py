"""Answer extraction and normalisation on embedded-task and GSM8K-format strings."""

from __future__ import annotations

import pytest

from clpd_ray.data.example import answers_match, extract_answer, normalise_answer


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("7+3=0;0*2=0;0-4=6;#6", "6"),
        ("#0", "0"),
        ("Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 72", "72"),
        ("#### 1,234", "1234"),
        ("#### 72.0", "72"),
        ("#### $5", "5"),
        ("#### -3", "-3"),
        ("#### 0.5", "0.5"),
        ("#### 7\nand then some text", "7"),  # the answer ends at the line end
        ("#6<eos><pad>", "6"),  # ... and before special tokens left in the text
        ("####   12  ", "12"),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize("text", ["", "72.0", "the answer is 5", "####", "#  \n"])
def test_extract_answer_without_marker_or_value_is_none(text):
    assert extract_answer(text) is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("#### 3\n#### 4", "4"),
        ("1+1=2;#2;#5", "5"),
        ("#### 5\n####", "5"),  # a trailing empty marker does not hide the last real answer
        ("#1 #2 #3", "3"),
    ],
)
def test_extract_answer_takes_the_last_marker(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("72.0", "72"),
        ("72.", "72"),
        ("72", "72"),
        (" 72 ", "72"),
        ("$5", "5"),
        ("1,234", "1234"),
        ("1 000", "1000"),
        ("$1,234.50", "1234.5"),
        ("-0", "0"),
        ("0.25", "0.25"),
        ("Yes", "yes"),
        ("B", "b"),
    ],
)
def test_normalise_answer(raw, expected):
    assert normalise_answer(raw) == expected


@pytest.mark.parametrize(
    ("generated", "reference", "match"),
    [
        ("7+3=0;#0", "0", True),
        ("7+3=0;#0", "1", False),
        ("so she has\n#### 1,234", "1234", True),
        ("#### 72.0", "72", True),
        ("#### $5", "5.00", True),
        ("#### 5", "$5", True),
        ("the answer is 5", "5", False),  # no marker: never a match
        ("", "", False),
        ("#### 3\n#### 4", "3", False),  # only the last marker counts
    ],
)
def test_answers_match(generated, reference, match):
    assert answers_match(generated, reference) is match


def test_large_distinct_integers_do_not_match():
    assert not answers_match("#### 12345678901234567891", "12345678901234567890")
