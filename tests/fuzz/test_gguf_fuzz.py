"""spark_lab.gguf against hostile files: every failure is one GGUFError line, fast, with no big allocation;
every file it accepts has its tensors inside the file, apart, and the metadata gguf-py reads."""
from __future__ import annotations

import struct
import time
import tracemalloc

import numpy as np
import pytest
from hypothesis import given, strategies as st
from gguf import GGUFReader

from spark_lab.gguf import GGUFError, GGUFFile

from .budget import budget, case_dir
from .ggufgen import V, build, entry, string, tensor_info

ENTRIES = [
    ("general.architecture", V.STRING, "llama"),
    ("general.alignment", V.UINT32, 32),
    ("t.u8", V.UINT8, 200), ("t.i8", V.INT8, -5), ("t.u16", V.UINT16, 60000), ("t.i16", V.INT16, -300),
    ("t.i32", V.INT32, -70000), ("t.f32", V.FLOAT32, 0.5), ("t.bool", V.BOOL, True),
    ("t.u64", V.UINT64, 2**40), ("t.i64", V.INT64, -2**40), ("t.f64", V.FLOAT64, 1e-300),
    ("t.tokens", (V.ARRAY, V.STRING), [b"a", b"\xff\xfe not utf-8", b"", "\u00e9".encode()]),
    ("t.scores", (V.ARRAY, V.FLOAT32), [0.0, -1.5, 2.25]),
    ("t.nested", (V.ARRAY, (V.ARRAY, V.INT32)), [[1, 2], [], [3]]),
]
TENSORS = [("a.weight", np.arange(64, dtype=np.float32).reshape(2, 32)), ("b.weight", np.ones(32, np.float32))]
VALID = build(ENTRIES, TENSORS)


def parse(tmp_path, data: bytes, name: str = "f.gguf"):
    """-> GGUFFile, or the GGUFError's message; any other exception fails the test."""
    p = tmp_path / name
    p.write_bytes(data)
    t0 = time.process_time()   # CPU seconds: a busy machine descheduling the case is not a slow parser
    try:
        f = GGUFFile(p)
    except GGUFError as e:
        msg = str(e)
        assert msg and "\n" not in msg, repr(msg)
        assert time.process_time() - t0 < 1.0, f"slow failure: {msg}"
        return msg
    for t in f.tensors.values():       # what it accepts lies inside the file, each tensor on its own bytes
        assert 0 <= t.offset and t.offset + t.nbytes <= len(data)
        assert f.raw(t).nbytes == t.nbytes
    spans = sorted((t.offset, t.offset + t.nbytes) for t in f.tensors.values() if t.nbytes)
    assert all(b0 >= a1 for (_, a1), (b0, _) in zip(spans, spans[1:]))
    return f


def test_valid_file_matches_gguf_py(tmp_path):
    f = parse(tmp_path, VALID)
    assert isinstance(f, GGUFFile), f
    r = GGUFReader(str(tmp_path / "f.gguf"))
    for key, vt, v in ENTRIES:
        ours = f.metadata[key]
        if vt == (V.ARRAY, V.STRING):
            assert ours == [bytes(r.fields[key].parts[i]) for i in r.fields[key].data] == v
        elif isinstance(vt, tuple) and vt[1] == V.FLOAT32:
            np.testing.assert_array_equal(ours, np.asarray(r.fields[key].contents(), np.float32))
        elif isinstance(vt, tuple):
            assert [list(a) for a in ours] == v     # arrays of arrays: a list of NumPy arrays
        else:
            assert ours == r.fields[key].contents() or (vt == V.FLOAT32 and ours == np.float32(v))
    for t in r.tensors:
        np.testing.assert_array_equal(np.asarray(f.raw(t.name)).ravel(), np.asarray(t.data).ravel())


def test_every_truncation(tmp_path):
    """Each prefix of a valid file is refused with a message, except those that only drop end padding."""
    end = max(int(t.offset + t.nbytes) for t in parse(tmp_path, VALID).tensors.values())
    refused = 0
    for n in range(len(VALID)):
        out = parse(tmp_path, VALID[:n])
        if n < end:
            assert isinstance(out, str), f"a {n}-byte prefix was accepted"
            refused += 1
    assert refused == end


@budget(1000)
@given(st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 7)), min_size=1, max_size=8))
def test_bit_flips(tmp_path_factory, flips):
    data = bytearray(VALID)
    for pos, bit in flips:
        data[pos] ^= 1 << bit
    parse(case_dir(tmp_path_factory), bytes(data))


HUGE = st.sampled_from([0, 1, 31, 2**31, 2**32 - 1, 2**40, 2**62, 2**63, 2**64 - 1]) | st.integers(0, 2**64 - 1)


@budget(1000)
@given(st.integers(0, len(VALID) - 8), HUGE)
def test_forged_u64(tmp_path_factory, pos, value):
    """A count, length, dimension or offset replaced by a huge (or zero) number anywhere in the header."""
    data = bytearray(VALID)
    data[pos:pos + 8] = struct.pack("<Q", value)
    parse(case_dir(tmp_path_factory), bytes(data))


# --------------------------------------------------------------------- random headers

SCALARS = [V.UINT8, V.INT8, V.UINT16, V.INT16, V.UINT32, V.INT32, V.FLOAT32, V.BOOL, V.UINT64, V.INT64, V.FLOAT64]
key_text = st.text(max_size=12) | st.binary(max_size=12)


@st.composite
def raw_entry(draw):
    """One key/value: well formed, or with a forged type, count or length, or trailing garbage."""
    key = draw(key_text)
    kind = draw(st.sampled_from(["scalar", "string", "array", "nested", "unknown", "forged_len", "forged_count"]))
    if kind == "scalar":
        vt = draw(st.sampled_from(SCALARS))
        return string(key) + struct.pack("<I", vt) + draw(st.binary(min_size=struct.calcsize("<Q"), max_size=8))[
            :struct.calcsize({V.UINT8: "<B", V.INT8: "<b", V.BOOL: "<?", V.UINT16: "<H", V.INT16: "<h",
                              V.UINT32: "<I", V.INT32: "<i", V.FLOAT32: "<f"}.get(vt, "<Q"))]
    if kind == "string":
        return string(key) + struct.pack("<I", V.STRING) + string(draw(st.binary(max_size=20)))
    if kind == "array":
        items = draw(st.lists(st.binary(max_size=6), max_size=5))
        return entry(key, (V.ARRAY, V.STRING), items)
    if kind == "nested":
        depth = draw(st.integers(1, 8))
        body = struct.pack("<IQ", V.INT32, 1) + struct.pack("<i", 7)
        for _ in range(depth):
            body = struct.pack("<IQ", V.ARRAY, 1) + body
        return string(key) + struct.pack("<I", V.ARRAY) + body
    if kind == "unknown":
        code = draw(st.integers(13, 2**32 - 1))
        inner = draw(st.booleans())
        return string(key) + (struct.pack("<IIQ", V.ARRAY, code, draw(st.integers(0, 3))) if inner
                              else struct.pack("<I", code)) + draw(st.binary(max_size=8))
    if kind == "forged_len":
        return string(key) + struct.pack("<IQ", V.STRING, draw(HUGE)) + draw(st.binary(max_size=8))
    itype = draw(st.sampled_from(SCALARS + [V.STRING, V.ARRAY]))
    return string(key) + struct.pack("<IIQ", V.ARRAY, itype, draw(HUGE)) + draw(st.binary(max_size=16))


@st.composite
def raw_tensor(draw):
    dims = draw(st.lists(st.integers(0, 64) | HUGE, max_size=draw(st.sampled_from([0, 2, 4, 6]))))
    qtype = draw(st.sampled_from([0, 1, 2, 8, 12, 30, 4, 5, 39]) | st.integers(0, 2**32 - 1))
    offset = draw(st.sampled_from([0, 32, 64, 128, 256, 1]) | HUGE)
    name = draw(st.sampled_from(["a", "b", "a"]) | key_text)
    return tensor_info(name, list(reversed(dims)), qtype, offset)


@budget(300)
@given(st.lists(raw_entry(), max_size=6), st.lists(raw_tensor(), max_size=4), st.booleans(),
       st.integers(0, 3) | HUGE, st.integers(0, 3) | HUGE, st.sampled_from([2, 3, 1, 4, 2**32 - 1]),
       st.integers(0, 512))
def test_random_headers(tmp_path_factory, entries, tensors, true_counts, n_kv, n_t, version, data_len):
    head = b"GGUF" + struct.pack("<IQQ", version, len(tensors) if true_counts else n_t,
                                 len(entries) if true_counts else n_kv)
    data = head + b"".join(entries) + b"".join(tensors)
    data += b"\0" * (-len(data) % 32) + bytes(range(256)) * (data_len // 256) + bytes(data_len % 256)
    parse(case_dir(tmp_path_factory), data)


# --------------------------------------------------------------------- named hostile files

def _fast_and_small(tmp_path, data: bytes, match: str):
    (tmp_path / "h.gguf").write_bytes(data)
    tracemalloc.start()
    t0 = time.perf_counter()
    with pytest.raises(GGUFError, match=match):
        GGUFFile(tmp_path / "h.gguf")
    dt = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert dt < 0.1, f"{dt * 1e3:.0f} ms"
    assert peak < 50 << 20, f"{peak >> 20} MB"


def test_claimed_2_40_tensors_fails_fast(tmp_path):
    _fast_and_small(tmp_path, build(ENTRIES, TENSORS, n_tensors=2**40), "claims 1099511627776 tensors")


def test_claimed_2_40_keys_fails_fast(tmp_path):
    _fast_and_small(tmp_path, build(ENTRIES, TENSORS, n_kv=2**40), "more than a .*-byte file can hold")


def test_10_gb_string_fails_fast(tmp_path):
    data = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + string("k") + struct.pack("<IQ", V.STRING, 10 * 2**30) + b"x" * 64
    _fast_and_small(tmp_path, data, "truncated GGUF .*the string 'k' runs past the end")


def test_2_60_strings_in_an_array_fail_fast(tmp_path):
    data = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + string("tok") + struct.pack("<IIQ", V.ARRAY, V.STRING, 2**60)
    _fast_and_small(tmp_path, data + string("a") * 100, "claims 1152921504606846976 entries")


def test_huge_numeric_array_fails_fast(tmp_path):
    data = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + string("s") + struct.pack("<IIQ", V.ARRAY, V.FLOAT64, 2**61)
    _fast_and_small(tmp_path, data + bytes(64), "claims")


def test_deeply_nested_arrays(tmp_path):
    body = struct.pack("<IQ", V.INT32, 0)
    for _ in range(5000):            # old reader: RecursionError after ~1000 levels
        body = struct.pack("<IQ", V.ARRAY, 1) + body
    data = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + string("deep") + struct.pack("<I", V.ARRAY) + body
    _fast_and_small(tmp_path, data, "nested more than 4 deep")


@pytest.mark.parametrize("change, match", [
    (lambda e, t: (e + [e[2]], t), "key 't.u8' appears twice"),
    (lambda e, t: (e, t + [t[0]]), "tensor 'a.weight' appears twice"),
    (lambda e, t: ([x if x[0] != "general.alignment" else (x[0], V.UINT32, 0) for x in e], t), "alignment = 0"),
    (lambda e, t: ([x if x[0] != "general.alignment" else (x[0], V.UINT32, 48) for x in e], t), "alignment = 48"),
    (lambda e, t: ([x if x[0] != "general.alignment" else (x[0], V.STRING, "32") for x in e], t), "alignment"),
])
def test_bad_structure(tmp_path, change, match):
    e, t = change(list(ENTRIES), list(TENSORS))
    with pytest.raises(GGUFError, match=match):
        GGUFFile(_write(tmp_path, build(e, t)))


def _write(tmp_path, data):
    (tmp_path / "x.gguf").write_bytes(data)
    return tmp_path / "x.gguf"


def _with_infos(infos, blob=bytes(512)):
    head = b"GGUF" + struct.pack("<IQQ", 3, len(infos), 0) + b"".join(infos)
    return head + b"\0" * (-len(head) % 32) + blob


def test_overlapping_tensors(tmp_path):
    data = _with_infos([tensor_info("x", [2, 32], 0, 0), tensor_info("y", [32], 0, 128)])
    with pytest.raises(GGUFError, match="tensors 'x' and 'y' overlap"):
        GGUFFile(_write(tmp_path, data))


def test_misaligned_offset(tmp_path):
    with pytest.raises(GGUFError, match="offset 4 is not a multiple of the alignment"):
        GGUFFile(_write(tmp_path, _with_infos([tensor_info("x", [32], 0, 4)])))


def test_dimension_product_past_2_63(tmp_path):
    """Old reader: np.prod in int64 wrapped 2^32 * 2^32 to 0 bytes and accepted the tensor."""
    with pytest.raises(GGUFError, match="needs bytes up to"):
        GGUFFile(_write(tmp_path, _with_infos([tensor_info("x", [2**32, 2**32], 0, 0)])))


def test_too_many_dims(tmp_path):
    data = b"GGUF" + struct.pack("<IQQ", 3, 1, 0) + string("x") + struct.pack("<I", 2**32 - 1) + bytes(64)
    with pytest.raises(GGUFError, match="4294967295 dimensions"):
        GGUFFile(_write(tmp_path, data))


def test_unknown_types(tmp_path):
    with pytest.raises(GGUFError, match="unknown quant type 4"):      # Q4_2, long removed from ggml
        GGUFFile(_write(tmp_path, _with_infos([tensor_info("x", [32], 4, 0)])))
    data = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + string("k") + struct.pack("<IIQ", V.ARRAY, 99, 1) + bytes(16)
    with pytest.raises(GGUFError, match="unknown value type 99 in the array 'k'"):
        GGUFFile(_write(tmp_path, data))


def test_non_utf8_strings_are_read_with_replacement(tmp_path):
    """Like llama.cpp, a key or string value that is not UTF-8 is not fatal: U+FFFD stands in for the bad bytes."""
    data = build([(b"k\xff", V.STRING, "v"), ("s", V.STRING, b"\xc3(ok")], [])
    f = GGUFFile(_write(tmp_path, data))
    assert f.metadata == {"k\ufffd": "v", "s": "\ufffd(ok"}


def test_nested_numeric_arrays_own_their_memory(tmp_path):
    """Old reader: arrays of numeric arrays stayed views of the header map, whose close() then failed
    (BufferError on any file with one)."""
    f = GGUFFile(_write(tmp_path, VALID))
    assert all(a.base is None or not isinstance(a.base, memoryview) for a in f.metadata["t.nested"])
    assert [a.flags.owndata for a in f.metadata["t.nested"]] == [True, True, True]
