"""The judge's plain-data reader: exact on every plain value, safe on hostile bytes."""

from __future__ import annotations

import marshal
import random

import pytest

from eval.execution import judge
from eval.execution.judge import MalformedOutput, parse_plain

PLAIN = [None, True, False, 0, -1, 2**31, -2**31 - 1, 10**100, -(10**5000), 1.5, float("inf"), -0.0, complex(1, -2), "",
         "héllo\ud800", b"\x00ab", [], (), {}, set(), frozenset(), [1, [2, [3, (4, 5)]]], {"a": [1, 2], (1, 2): {3: 4}},
         {1, 2, (3, 4)}, frozenset({"x"}), [[]] * 3, ([{}],), {"k": {}}, bytearray(b"xy"), list(range(1000))]


@pytest.mark.parametrize("value", PLAIN, ids=lambda v: type(v).__name__)
def test_every_plain_value_reads_back_to_the_same_bytes(value):
    data = marshal.dumps(value, 2)
    assert marshal.dumps(parse_plain(data), 2) == data


def test_deep_nesting_is_read_without_recursion_and_refused_past_the_limit():
    deep: list = []
    inner = deep
    for _ in range(900):
        inner.append([])
        inner = inner[0]
    assert marshal.dumps(parse_plain(marshal.dumps(deep, 2)), 2) == marshal.dumps(deep, 2)
    with pytest.raises(MalformedOutput, match="nested too deeply"):
        parse_plain(b"[\x01\x00\x00\x00" * (judge.MAX_DEPTH + 1) + b"N")


@pytest.mark.parametrize("data", [
    b"", b"c", b"r\x00\x00\x00\x00", b"N N", marshal.dumps([1, 2], 2)[:-1], b"[\xff\xff\xff\x7f",
    b"\xe9\x01\x00\x00\x00", b"{i\x01\x00\x00\x000", marshal.dumps(compile("1", "", "eval")), marshal.dumps("x", 4),
    b"<\x01\x00\x00\x00[\x00\x00\x00\x00", b"u\x02\x00\x00\x00\xff\xfe", b"l\x01\x00\x00\x00\x00\x00",
], ids=range(13))
def test_what_is_not_plain_data_is_refused(data):
    with pytest.raises(MalformedOutput):
        parse_plain(data)


def test_random_corruptions_are_refused_or_read_never_crash():
    rng = random.Random(0)
    for _ in range(20000):
        data = bytearray(marshal.dumps(rng.choice(PLAIN), 2))
        for _ in range(rng.randint(1, 3)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        try:
            parse_plain(bytes(data))
        except MalformedOutput:
            pass


def test_judge_is_exact_on_digests_tolerant_on_values_and_fails_unreadable_bytes():
    expected = marshal.dumps([0.5, 1.0], 2)
    blob = lambda: __import__("zlib").compress(expected)  # noqa: E731
    assert judge.judge(expected, judge.digest(expected), blob, None, None, 0.0, None) is None
    assert judge.judge(marshal.dumps([0.5, 1.0 + 1e-9], 2), judge.digest(expected), blob, None, None, 0.0, None) is None
    assert "expected" in judge.judge(marshal.dumps([0.5, 2.0], 2), judge.digest(expected), blob, None, None, 0.0, None)
    assert "could not be read" in judge.judge(b"c\x00", judge.digest(expected), blob, None, None, 0.0, None)
