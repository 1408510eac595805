"""Our stateless HPACK encoder and fast decoder against the `hpack` package (RFC 7541)."""

from __future__ import annotations

from typing import cast

import hpack
from hypothesis import given
from hypothesis import strategies as st

from meshcore.hbone.headers import decode_simple, encode

names = st.sampled_from([":authority", ":method", ":status", "forwarded", "baggage", "x-long"])
values = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=300)
blocks = st.lists(st.tuples(names, values), max_size=12)


@given(blocks)
def test_encode_is_understood_by_hpack_and_leaves_its_table_empty(
    headers: list[tuple[str, str]],
) -> None:
    decoder = hpack.Decoder()
    # raw=False decodes to str; hpack annotates bytes.
    decoded = cast("list[tuple[str, str]]", decoder.decode(encode(headers), raw=False))
    assert [(k, v) for k, v in decoded] == headers
    assert len(decoder.header_table.dynamic_entries) == 0


@given(blocks)
def test_fast_decoder_reads_our_blocks(headers: list[tuple[str, str]]) -> None:
    assert decode_simple(encode(headers)) == headers


def test_fast_decoder_declines_indexing_and_huffman() -> None:
    stateful = hpack.Encoder()
    block = stateful.encode([(":method", "CONNECT"), (":authority", "10.0.0.1:80")])
    assert decode_simple(block) is None  # incremental indexing + Huffman: full decoder's job
    # Second use would reference the dynamic table: also declined.
    assert decode_simple(stateful.encode([(":method", "CONNECT")])) is None


def test_static_full_match_is_one_octet() -> None:
    assert encode([(":status", "200")]) == b"\x88"
    assert decode_simple(b"\x88") == [(":status", "200")]


def test_truncated_or_out_of_range_is_declined() -> None:
    assert decode_simple(b"\x02\x05CONN") is None  # value longer than the block
    assert decode_simple(b"\xff\x80\x01") is None  # index beyond the static table
    assert decode_simple(b"\x20") is None  # dynamic table size update
