"""JsonFramer: splitting a QMP byte stream into messages without parsing it."""

from __future__ import annotations

import itertools
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vsmmu.qmp import QmpFramingError
from vsmmu.qmp.transport import JsonFramer


def drain(framer: JsonFramer) -> list[bytes]:
    out = []
    while (message := framer.pop()) is not None:
        out.append(message)
    return out


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4)
    ),
    max_leaves=20,
)


@given(
    objects=st.lists(st.dictionaries(st.text(), json_values, max_size=4), max_size=6),
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=20),
    separator=st.sampled_from([b"", b"\n", b"\r\n", b" \t "]),
    ensure_ascii=st.booleans(),
)
def test_any_chunking_yields_the_objects_sent(
    objects: list[dict[str, object]], cuts: list[int], separator: bytes, ensure_ascii: bool
) -> None:
    stream = separator.join(json.dumps(obj, ensure_ascii=ensure_ascii).encode() for obj in objects)
    framer = JsonFramer()
    bounds = sorted({0, len(stream), *(c % (len(stream) + 1) for c in cuts)})
    for lo, hi in itertools.pairwise(bounds):
        framer.feed(stream[lo:hi])
    assert [json.loads(m) for m in drain(framer)] == objects
    assert framer.finish() is None


def test_top_level_scalars_and_stray_closers_are_separate_messages() -> None:
    framer = JsonFramer()
    framer.feed(b'42 "s{" ] {"a": 1}')
    assert drain(framer) == [b"42", b'"s{"', b"]", b'{"a": 1}']


def test_reset_byte_ends_the_message_even_inside_a_string() -> None:
    framer = JsonFramer()
    framer.feed(b'{"execute": "x\x01{"execute": "y"}')
    first, second = drain(framer)
    assert first.endswith(b"\x01")
    assert json.loads(second) == {"execute": "y"}


def test_unfinished_input_is_returned_at_end_of_stream() -> None:
    framer = JsonFramer()
    framer.feed(b'{"execute": "x"')
    assert drain(framer) == []
    assert framer.finish() == b'{"execute": "x"'


def test_limits() -> None:
    framer = JsonFramer(max_message=16)
    with pytest.raises(QmpFramingError, match="16 bytes"):
        framer.feed(b'{"k": "' + b"v" * 20)
    framer = JsonFramer(max_message=16)
    with pytest.raises(QmpFramingError, match="16 bytes"):
        framer.feed(b'{"k": "' + b"v" * 20 + b'"}')
    framer = JsonFramer(max_nesting=3)
    framer.feed(b"[[[]]]")
    assert drain(framer) == [b"[[[]]]"]
    with pytest.raises(QmpFramingError, match="nesting"):
        framer.feed(b"[[[[")
