"""BodyDecoder / decode_body: codecs, stacking, incremental pieces, the output bound, bad input."""

from __future__ import annotations

import functools
import gzip
import random
import sys
import tracemalloc
import zlib

import brotli
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from r4u_mitm.pure.encoding import BodyDecoder, _Zlib, decode_body
from r4u_mitm.pure.sse import SSEDecoder
from tests.harness import STREAMS

if sys.version_info >= (3, 14):
    from compression import zstd
else:
    from backports import zstd

ALL_STREAMS = sorted(STREAMS.rglob("*.sse"))
MB = 1024 * 1024


def raw_deflate(data: bytes) -> bytes:
    c = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return c.compress(data) + c.flush()


# header value -> compress function (applied in header order)
CODECS = {
    "gzip": lambda b: gzip.compress(b, mtime=0),
    "x-gzip": lambda b: gzip.compress(b, mtime=0),
    "deflate": zlib.compress,
    "deflate (raw)": raw_deflate,
    "br": brotli.compress,
    "zstd": zstd.compress,
    "gzip, br": lambda b: brotli.compress(gzip.compress(b, mtime=0)),
    "zstd, deflate, gzip": lambda b: gzip.compress(zlib.compress(zstd.compress(b)), mtime=0),
}


def header(name: str) -> str:
    return name.removesuffix(" (raw)")


def run(content_encoding, pieces, limit=64 * MB) -> tuple[list[bytes], bool, str | None]:
    d = BodyDecoder(content_encoding, limit)
    out = [d.feed(p) for p in pieces]
    out.append(d.finish())
    return out, d.truncated, d.error


def split(data: bytes, cuts) -> list[bytes]:
    bounds = [0, *sorted(cuts), len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:])]


def sse(pieces) -> list:
    d = SSEDecoder()
    return [e for p in pieces for e in d.feed(p)] + d.finish()


def text(n: int, seed: int = 1) -> bytes:
    """Compressible but not trivial text (~5x with gzip)."""
    rnd = random.Random(seed)
    words = [bytes(rnd.choices(b"abcdefghijklmnopqrstuvwxyz", k=rnd.randint(2, 9))) for _ in range(5000)]
    out = b" ".join(rnd.choices(words, k=n // 5))
    return out[:n]


BODY = text(300_000)


# -- round trips ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CODECS)
def test_round_trip_whole(name):
    assert decode_body(header(name), CODECS[name](BODY), 64 * MB) == (BODY, False, None)


@pytest.mark.parametrize("name", CODECS)
def test_round_trip_one_byte_pieces(name):
    body = BODY[:20_000]
    data = CODECS[name](body)
    out, truncated, error = run(header(name), [data[i : i + 1] for i in range(len(data))])
    assert (b"".join(out), truncated, error) == (body, False, None)


@pytest.mark.parametrize("name", ["gzip", "deflate", "br", "zstd"])
def test_output_is_incremental(name):
    """Decoded bytes come out while the body is still arriving, not only at finish()."""
    data = CODECS[name](BODY)
    d = BodyDecoder(name, 64 * MB)
    first_half = b"".join(d.feed(p) for p in split(data, range(0, len(data) // 2, 1000)))
    assert len(first_half) > len(BODY) // 4
    assert BODY.startswith(first_half)


@pytest.mark.parametrize(
    "value",
    ["GZIP", " gzip ", "Gzip", "x-gzip", "identity, gzip", "gzip, identity", "gzip,", ",gzip"],
)
def test_header_is_case_insensitive_and_tolerant(value):
    assert decode_body(value, gzip.compress(BODY), 64 * MB) == (BODY, False, None)


@pytest.mark.parametrize("value", [None, "", "identity", "IDENTITY", "none", " , "])
def test_identity(value):
    assert decode_body(value, BODY, 64 * MB) == (BODY, False, None)
    out, truncated, error = run(value, split(BODY, [1, 2, 1000]))
    assert (b"".join(out), truncated, error) == (BODY, False, None)


def test_stacked_order_matters():
    data = brotli.compress(gzip.compress(BODY))
    assert decode_body("gzip, br", data, 64 * MB) == (BODY, False, None)
    out, truncated, error = decode_body("br, gzip", data, 64 * MB)  # wrong order: gzip first fails
    assert out == data and not truncated and "did not decode" in error


def test_concatenated_gzip_members_and_zstd_frames():
    a, b = BODY[:1000], BODY[1000:3000]
    assert decode_body("gzip", gzip.compress(a) + gzip.compress(b), MB) == (a + b, False, None)
    assert decode_body("zstd", zstd.compress(a) + zstd.compress(b), MB) == (a + b, False, None)
    both = zstd.compress(a) + zstd.compress(b)
    out, truncated, error = run("zstd", [both[i : i + 1] for i in range(len(both))])
    assert (b"".join(out), truncated, error) == (a + b, False, None)


def test_empty_body_with_an_encoding():
    for name in ["gzip", "deflate", "br", "zstd", "gzip, br"]:
        assert decode_body(name, b"", MB) == (b"", False, None)


# -- compressed SSE: any split, same events ----------------------------------------------------------


@pytest.mark.parametrize("name", CODECS)
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_compressed_streams_any_split_same_events(name, data):
    path = data.draw(st.sampled_from(ALL_STREAMS))
    raw = path.read_bytes()
    compressed = CODECS[name](raw)
    cuts = data.draw(st.lists(st.integers(0, len(compressed)), max_size=40))
    decoded, truncated, error = run(header(name), split(compressed, cuts))
    assert (truncated, error) == (False, None)
    assert b"".join(decoded) == raw
    assert sse(decoded) == sse([raw])


@pytest.mark.parametrize("name", ["gzip", "deflate", "br", "zstd", "gzip, br"])
def test_compressed_streams_one_byte_pieces(name):
    for path in ALL_STREAMS:
        raw = path.read_bytes()
        compressed = CODECS[name](raw)
        decoded, truncated, error = run(name, [compressed[i : i + 1] for i in range(len(compressed))])
        assert (truncated, error) == (False, None), path
        assert sse(decoded) == sse([raw]), path


# -- the bound -----------------------------------------------------------------------------------


def bomb(name: str, size: int = 50 * MB) -> bytes:
    zeros = bytes(MB)
    if name == "gzip":
        c = zlib.compressobj(9, zlib.DEFLATED, zlib.MAX_WBITS | 16)
        return b"".join(c.compress(zeros) for _ in range(size // MB)) + c.flush()
    if name == "br":
        c = brotli.Compressor(quality=5)
        return b"".join(c.process(zeros) for _ in range(size // MB)) + c.finish()
    if name == "zstd":
        c = zstd.ZstdCompressor()
        return b"".join(c.compress(zeros) for _ in range(size // MB)) + c.flush()
    if name == "gzip, br":
        return brotli.compress(bomb("gzip", size), quality=5)
    raise ValueError(name)


@pytest.mark.parametrize("name", ["gzip", "br", "zstd", "gzip, br"])
@pytest.mark.parametrize("piece", [None, 4096])
def test_bomb_is_cut_at_limit_with_bounded_memory(name, piece):
    data = bomb(name)
    assert len(data) < MB  # it is a bomb: 50 MB from this
    pieces = [data] if piece is None else split(data, range(piece, len(data), piece))
    tracemalloc.start()
    try:
        d = BodyDecoder(name, MB)
        total = sum(len(d.feed(p)) for p in pieces) + len(d.finish())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert total == MB
    assert d.truncated is True and d.error is None
    assert peak < 10 * MB, peak


def test_decode_body_bomb():
    out, truncated, error = decode_body("gzip", bomb("gzip"), MB)
    assert (out, truncated, error) == (bytes(MB), True, None)


@pytest.mark.parametrize("name", ["identity", "gzip", "br", "zstd"])
def test_limit_exact(name):
    body = BODY[:10_000]
    data = body if name == "identity" else CODECS[name](body)
    assert decode_body(name, data, len(body)) == (body, False, None)  # exactly fits: not truncated
    assert decode_body(name, data, len(body) - 1) == (body[:-1], True, None)
    assert decode_body(name, data, 0) == (b"", True, None)
    out, truncated, error = run(name, [data[i : i + 7] for i in range(0, len(data), 7)], limit=len(body) - 1)
    assert (b"".join(out), truncated, error) == (body[:-1], True, None)


def test_nothing_after_truncation():
    d = BodyDecoder("gzip", 10)
    assert d.feed(gzip.compress(BODY)) == BODY[:10]
    assert d.truncated
    assert d.feed(b"more") == b"" and d.finish() == b""


# -- bad input -------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["compress", "foo", "gzip, foo", "foo, gzip", "exi"])
def test_unknown_encoding_passes_raw_through(value):
    out, truncated, error = decode_body(value, BODY, 64 * MB)
    assert out == BODY and truncated is False
    assert error.startswith("unsupported content-encoding: ")
    assert decode_body("compress", BODY, 100) == (BODY[:100], True, "unsupported content-encoding: compress")


@pytest.mark.parametrize("name", ["gzip", "x-gzip", "deflate", "br", "zstd", "gzip, br"])
@pytest.mark.parametrize("stream", ["openai_chat/basic.sse", "anthropic/text.sse", "framing/bom.sse"])
def test_lying_header_falls_back_to_raw(name, stream):
    raw = (STREAMS / stream).read_bytes()
    out, truncated, error = decode_body(name, raw, 64 * MB)
    assert out == raw and truncated is False
    assert "did not decode" in error and "raw" in error
    pieces, truncated1, error1 = run(name, [raw[i : i + 1] for i in range(len(raw))])
    assert (b"".join(pieces), truncated1, error1) == (raw, False, error)


def test_lying_header_short_body_that_never_errors():
    # "ok" is a valid-so-far brotli prefix: the stream just ends; nothing decoded, so raw.
    out, truncated, error = decode_body("br", b"ok", MB)
    assert (out, truncated) == (b"ok", False) and "did not decode" in error


def test_lying_header_fallback_is_bounded():
    out, truncated, error = decode_body("gzip", BODY, 1000)
    assert (out, truncated) == (BODY[:1000], True) and "did not decode" in error
    out, truncated, error = run("gzip", split(BODY, range(100, len(BODY), 100)), limit=1000)
    assert (b"".join(out), truncated) == (BODY[:1000], True) and "did not decode" in error


def test_errors_carry_no_body_bytes():
    secret = b"SECRET-TOKEN-" * 100
    for name in ["gzip", "deflate", "br", "zstd", "nope"]:
        _, _, error = decode_body(name, secret, MB)
        assert error and "SECRET" not in error and len(error) < 300


@pytest.mark.parametrize("name", ["gzip", "deflate", "deflate (raw)", "br", "zstd", "gzip, br"])
def test_truncated_stream_keeps_output(name):
    data = CODECS[name](BODY)
    for pieces in ([data[: len(data) * 3 // 4]], split(data[: len(data) * 3 // 4], range(0, len(data), 333))):
        out, truncated, error = run(header(name), pieces)
        out = b"".join(out)
        assert 0 < len(out) < len(BODY) and BODY.startswith(out)
        assert truncated is False
        assert error == f"truncated {header(name).split(',')[-1].strip()} stream"


def test_truncated_gzip_message():
    assert decode_body("gzip", gzip.compress(BODY)[:-4], 64 * MB)[1:] == (False, "truncated gzip stream")


def test_truncated_before_any_output_falls_back_to_raw():
    data = gzip.compress(BODY)[:10]  # the gzip header only
    out, truncated, error = decode_body("gzip", data, MB)
    assert out == data and "did not decode" in error and "ended early" in error


def _corrupt_middle(data: bytes) -> bytes:
    b = bytearray(data)
    m = len(b) * 6 // 10
    for i in range(m, m + 64):
        b[i] ^= 0x5A
    return bytes(b)


CORRUPT_BODY = text(1_000_000)


@functools.cache
def corrupt(name: str) -> bytes:
    if name == "zstd":
        return _corrupt_middle(zstd.compress(CORRUPT_BODY, options={zstd.CompressionParameter.checksum_flag: 1}))
    return _corrupt_middle(CODECS[name](CORRUPT_BODY))


@pytest.mark.parametrize("name", ["zstd", "br", "gzip"])
@pytest.mark.parametrize("piece", [1, 1000, None])
def test_corrupt_after_output_keeps_output(name, piece):
    # Whether and where damage is detected depends on the codec: deflate has only the trailing
    # CRC, brotli may decode some garbage first; zstd with a checksum stops at the damaged block.
    data = corrupt(name)
    pieces = [data] if piece is None else [data[i : i + piece] for i in range(0, len(data), piece)]
    d = BodyDecoder(name, 64 * MB)
    out = b"".join(d.feed(p) for p in pieces)
    out += d.finish()
    assert d.error is not None and d.error.startswith(f"corrupt {name} stream: ")
    assert d.truncated is False
    assert 50_000 <= len(out) < len(CORRUPT_BODY) + 100_000
    assert out[:50_000] == CORRUPT_BODY[:50_000]  # what decoded before the damage is kept
    assert d.feed(b"more") == b"" and d.finish() == b""  # and nothing comes out after


def test_corrupt_zstd_is_a_prefix():
    out, truncated, error = decode_body("zstd", corrupt("zstd"), 64 * MB)
    assert CORRUPT_BODY.startswith(out) and 0 < len(out) < len(CORRUPT_BODY)
    assert error.startswith("corrupt zstd stream")


def _zlib_byte_by_byte(data: bytes, wbits: int) -> bytes:
    """The oracle: all zlib can decode before the first byte it rejects (one byte per call, so
    a failing call loses nothing)."""
    d, out = zlib.decompressobj(wbits), []
    for i in range(len(data)):
        try:
            out.append(d.decompress(data[i:i + 1]))
        except zlib.error:
            break
    return b"".join(out)


@settings(max_examples=40, deadline=None)
@given(size=st.integers(1, 200_000), at=st.floats(0.0, 1.0), codec=st.sampled_from(["gzip", "deflate"]),
       piece=st.sampled_from([None, 1000, 100_000]))
def test_zlib_garbage_keeps_all_that_decoded_before_it(size, at, codec, piece):
    """zlib drops the whole output of a call that meets corrupt input; most LLM answers fit in
    one call (64 KiB of input): the decoder replays such a call to keep what came before it."""
    good = CODECS[codec](BODY[:size])
    data = good[:int(len(good) * at)] + b"\xff\x00 this is not deflate data \x13\x37" * 20
    expected = _zlib_byte_by_byte(data, 31 if codec == "gzip" else zlib.MAX_WBITS)
    pieces = [data] if piece is None else [data[i:i + piece] for i in range(0, len(data), piece)]
    d = BodyDecoder(codec, 64 * MB)
    out = b"".join(d.feed(p) for p in pieces) + d.finish()
    if expected:  # (deflate may turn some garbage into output before it notices: the oracle too)
        assert out == expected
        assert d.error.startswith((f"corrupt {codec} stream: ", f"truncated {codec} stream"))
    else:  # nothing decoded: it lied, the raw bytes pass
        assert out == data and "did not decode" in d.error


def test_a_bad_checksum_keeps_the_body_and_the_output_limit_of_each_call():
    """5 MB of output from one call's input, then a wrong CRC: the replay hands the output out
    in pulls of at most 64 KiB (the decoder's bound), and the error comes after all of it."""
    good = gzip.compress(b"x" * (5 * MB), mtime=0)
    data = good[:-8] + bytes([good[-8] ^ 0xFF]) + good[-7:]
    out, _, error = decode_body("gzip", data, 64 * MB)
    assert out == b"x" * (5 * MB) and error == "corrupt gzip stream: Error -3 while decompressing data: incorrect data check"
    stage, pulls = _Zlib("gzip"), []
    stage.push(data)
    with pytest.raises(zlib.error, match="incorrect data check"):
        while chunk := stage.pull(64 * 1024):
            pulls.append(chunk)
    assert b"".join(pulls) == b"x" * (5 * MB) and max(map(len, pulls)) == 64 * 1024


@pytest.mark.parametrize("name", ["deflate", "deflate (raw)", "br"])
def test_trailing_bytes_after_a_single_stream(name):
    data = CODECS[name](BODY[:5000])
    out, truncated, error = run(header(name), [data, b"trailing"])
    assert (b"".join(out), truncated) == (BODY[:5000], False)
    assert error == f"corrupt {header(name)} stream: data after the end of the {header(name)} stream"


def test_trailing_bytes_in_the_same_piece():
    out, truncated, error = decode_body("deflate", zlib.compress(BODY[:5000]) + b"trailing", MB)
    assert out == BODY[:5000] and error.startswith("corrupt deflate stream")
    # brotli rejects the whole call, so its output is lost with it: nothing decoded, raw passes.
    data = brotli.compress(BODY[:5000]) + b"trailing"
    out, truncated, error = decode_body("br", data, MB)
    assert out == data and "did not decode" in error


def test_decode_body_matches_body_decoder():
    for name in CODECS:
        data = CODECS[name](BODY)
        d = BodyDecoder(header(name), MB)
        out = d.feed(data) + d.finish()
        assert decode_body(header(name), data, MB) == (out, d.truncated, d.error)
