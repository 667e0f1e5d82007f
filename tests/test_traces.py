"""traces: the format (columnar and text, both ways), importers on real and malformed input, the recorder."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tiered.policies import KINDS, OPS
from tiered.traces import (
    AccessEvent, MooncakeRequest, Trace, TraceFormatError, TraceRecorder, detect_format, import_arc,
    import_mooncake, import_msr, import_mqsim, load, read_requests, read_text, read_trace, write_text,
    write_trace,
)

import trace_samples  # tests/trace_samples.py (tests/ is on sys.path, as for killing.py)

ROOT = Path(__file__).resolve().parents[1]
PUBLIC = ROOT.parent / "shared" / "traces" / "public"
DATA = ROOT / "traces" / "data"
pytestmark = pytest.mark.timeout(120)
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def public(name: str) -> Path:
    p = PUBLIC / name
    if not p.exists():
        pytest.skip(f"{p} not present")
    return p


def sample_trace(n=50, named=True, seed=0) -> Trace:
    rng = np.random.default_rng(seed)
    names = tuple(f"obj {i} \"q\" é" if i % 3 == 0 else f"k{i}" for i in range(10)) if named else None
    return Trace(np.sort(rng.random(n)) * 10, rng.integers(0, 10, n), rng.integers(0, 1 << 40, n),
                 rng.integers(0, 2, n).astype(np.uint8), rng.integers(0, len(KINDS), n).astype(np.uint8),
                 names, True, {"note": "sample"})


# ---------------------------------------------------------------- format

@pytest.mark.parametrize("named", [True, False])
def test_columnar_round_trip_bitwise(tmp_path, named):
    tr = sample_trace(named=named)
    p = write_trace(tr, tmp_path / "x.trace")
    back = read_trace(p)
    assert back.equals(tr) and back.meta == {"note": "sample"}
    assert back.key_names == tr.key_names
    assert sorted(os.listdir(p)) == sorted(["header.json", "time.bin", "key.bin", "size.bin", "op.bin", "kind.bin"]
                                           + (["keys.json"] if named else []))
    assert (p / "time.bin").stat().st_size == 8 * len(tr)
    with pytest.raises(FileExistsError):
        write_trace(tr, p)
    write_trace(sample_trace(7, named), p, overwrite=True)
    assert len(read_trace(p)) == 7
    assert not [x for x in os.listdir(tmp_path) if x.startswith(".")], "temporary directories left behind"


@pytest.mark.parametrize("named", [True, False])
def test_text_round_trip_both_ways(tmp_path, named):
    tr = sample_trace(named=named)
    write_text(tr, tmp_path / "x.txt")
    back = read_text(tmp_path / "x.txt")
    assert back.equals(tr)
    write_trace(back, tmp_path / "y.trace")
    write_text(read_trace(tmp_path / "y.trace"), tmp_path / "y.txt")
    assert (tmp_path / "x.txt").read_text() == (tmp_path / "y.txt").read_text()
    assert load(tmp_path / "x.txt").equals(tr) and load(tmp_path / "y.trace").equals(tr)


@FUZZ
@given(events=st.lists(st.tuples(st.floats(-1e6, 1e6, allow_nan=False), st.text(max_size=12),
                                 st.integers(0, 2**62), st.sampled_from(OPS), st.sampled_from(KINDS)), max_size=40))
def test_text_round_trip_fuzz(tmp_path, events):
    tr = Trace.from_events(AccessEvent(t, k, s, o, d) for t, k, s, o, d in events)
    p = tmp_path / "f.txt"
    write_text(tr, p)
    assert read_text(p).equals(tr)


def test_empty_trace_round_trips(tmp_path):
    tr = Trace.from_events([])
    assert len(read_trace(write_trace(tr, tmp_path / "e.trace"))) == 0
    write_text(tr, tmp_path / "e.txt")
    assert len(read_text(tmp_path / "e.txt")) == 0


def test_read_trace_rejects_damage(tmp_path):
    p = write_trace(sample_trace(), tmp_path / "x.trace")
    with open(p / "size.bin", "r+b") as f:
        f.truncate(8 * 49)
    with pytest.raises(TraceFormatError, match=r"size.bin: 392 bytes \(expected 400 bytes"):
        read_trace(p)
    p = write_trace(sample_trace(), tmp_path / "v.trace")
    h = json.loads((p / "header.json").read_text())
    (p / "header.json").write_text(json.dumps(dict(h, version=99)))
    with pytest.raises(TraceFormatError, match="version 99 is not supported"):
        read_trace(p)
    (p / "header.json").write_text("{not json")
    with pytest.raises(TraceFormatError, match="header.json:1: invalid JSON"):
        read_trace(p)
    with pytest.raises(TraceFormatError, match="no header.json"):
        read_trace(tmp_path)
    p = write_trace(sample_trace(), tmp_path / "k.trace")
    kind = np.fromfile(p / "kind.bin", dtype=np.uint8)
    kind[3] = 200
    kind.tofile(p / "kind.bin")
    with pytest.raises(TraceFormatError, match="kind"):
        read_trace(p)


@pytest.mark.parametrize("line,match", [
    ("0.5 k 10 read", "'time key size op kind'"),
    ("0.5 k 10 peek weight", "op 'peek' .*expected read or write"),
    ("0.5 k 10 read tensor", "kind 'tensor'"),
    ("nan k 10 read weight", "finite"),
    ("x k 10 read weight", "decimal number"),
    ('0.5 "unterminated 10 read weight', "'time key size op kind'"),
])
def test_read_text_errors_name_line(tmp_path, line, match):
    p = tmp_path / "bad.txt"
    p.write_text("# tiered-trace 1 text\n0.1 a 1 read blob\n" + line + "\n")
    with pytest.raises(TraceFormatError, match=f"bad.txt:3: .*{match}"):
        read_text(p)
    p.write_text("hello\n")
    with pytest.raises(TraceFormatError, match="bad.txt:1: first line"):
        read_text(p)


# ---------------------------------------------------------------- importers: exact parsing of small files

def test_mqsim_exact(tmp_path):
    p = tmp_path / "a.trace"
    p.write_text("1000 3 8 16 0\n3000 3 7 2 1\n")
    tr = import_mqsim(p)
    dev = 3 << 40
    assert tr.key.tolist() == [dev | 1, dev | 2, dev | 0, dev | 1]  # sectors 8..23 -> 4K blocks 1,2; 7..8 -> 0,1
    assert tr.op.tolist() == [1, 1, 0, 0] and tr.size.tolist() == [4096] * 4
    assert tr.time.tolist() == pytest.approx([0, 0, 2e-6, 2e-6]) and tr.timed
    assert tr.meta["requests"] == 2


def test_arc_exact_and_zstd(tmp_path):
    zstd = pytest.importorskip("zstandard")
    text = b"5 2 0 1\n100 1 0 2\n5 1 0 3\n"
    (tmp_path / "a.lis").write_bytes(text)
    tr = import_arc(tmp_path / "a.lis")
    assert tr.key.tolist() == [5, 6, 100, 5] and tr.size.tolist() == [512] * 4 and not tr.timed
    blob = zstd.ZstdCompressor().compress(text * 200)
    (tmp_path / "a.lis.zst").write_bytes(blob)
    assert len(import_arc(tmp_path / "a.lis.zst")) == 800
    (tmp_path / "cut.lis.zst").write_bytes(blob[: len(blob) - 5])
    with pytest.raises(TraceFormatError, match="cut.lis.zst: truncated zstd stream"):
        import_arc(tmp_path / "cut.lis.zst")
    (tmp_path / "junk.lis.zst").write_bytes(blob[:4] + b"\x00" * 40)
    with pytest.raises(TraceFormatError, match="junk.lis.zst"):
        import_arc(tmp_path / "junk.lis.zst")


def test_truncated_arc_trace_is_an_error(tmp_path):
    trace_samples.arc(tmp_path / "full.lis.zst")
    data = (tmp_path / "full.lis.zst").read_bytes()
    cut = tmp_path / "OLTP.lis.zst"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(TraceFormatError, match="truncated zstd stream"):
        import_arc(cut)


def test_msr_exact(tmp_path):
    p = tmp_path / "m.csv"
    p.write_text("Timestamp,Hostname,DiskNumber,Type,Offset,Size,ResponseTime\n"
                 "128166372003061629,hm,1,Read,8192,4096,100\n"
                 "128166372013061629,hm,1,Write,4000,200,50\n"
                 "128166372013061630,web,0,Read,0,0,5\n")
    tr = import_msr(p)
    assert tr.key.tolist() == [(1 << 40) | 2, (1 << 40) | 0, (1 << 40) | 1, (1 << 50) | 0]
    assert tr.op.tolist() == [0, 1, 1, 0]
    assert tr.time.tolist() == pytest.approx([0.0, 1.0, 1.0, 1.0000001])
    assert tr.meta["hosts"] == ["hm", "web"]


def test_mooncake_requests_and_blocks(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text('{"timestamp": 0, "input_length": 700, "output_length": 5, "hash_ids": [0, 1]}\n\n'
                 '{"timestamp": 1500, "input_length": 600, "output_length": 9, "hash_ids": [0, 2], "extra": 1}\n')
    reqs = list(read_requests(p))
    assert reqs == [MooncakeRequest(0, 700, 5, (0, 1)), MooncakeRequest(1500, 600, 9, (0, 2))]
    with pytest.raises(Exception):
        reqs[0].timestamp_ms = 3  # frozen
    tr = import_mooncake(p, bytes_per_token=2)
    assert tr.key.tolist() == [0, 1, 0, 2] and tr.size.tolist() == [1024] * 4
    assert tr.op.tolist() == [1, 1, 0, 1]  # first touch of a block writes it, reuse reads
    assert tr.time.tolist() == [0.0, 0.0, 1.5, 1.5] and set(tr.kind.tolist()) == {KINDS.index("kv")}


@pytest.mark.parametrize("fmt,content,match", [
    ("mqsim", "1 2 3 4 1\n1 2 3 4\n", r":2: 4 fields .*expected 5 fields: arrival_time_ns"),
    ("mqsim", "1 2 3 4 1\n1 2 3 4 7\n", r":2: type '7' \(expected 0 \(write\) or 1 \(read\)\)"),
    ("mqsim", "1 2 -3 4 1\n", r":1: start_sector '-3' \(expected start_sector as a non-negative decimal integer\)"),
    ("mqsim", "1 2 1_0 4 1\n", r":1: start_sector '1_0'"),
    ("arc", "1 1 0 0\n2 x 0 0\n", r":2: num_blocks 'x'"),
    ("arc", "1 0 0 0\n", r":1: num_blocks 0 \(expected num_blocks >= 1\)"),
    ("arc", "1 1 0 0 9\n", r":1: 5 fields"),
    ("msr", "1,h,0,Read,0,1,1\n2,h,0,Trim,0,1,1\n", r":2: Type 'Trim' \(expected Read or Write\)"),
    ("msr", "1,h,0,Read,0,1\n", r":1: 6 fields .*7 fields: Timestamp,Hostname"),
    ("msr", "1,,0,Read,0,1,1\n", r":1: empty Hostname"),
    ("mooncake", '{"timestamp": 0, "input_length": 1, "output_length": 1, "hash_ids": [1]}\n{"timestamp": 0\n', r":2: invalid JSON"),
    ("mooncake", '{"timestamp": 0, "input_length": 1, "output_length": 1}\n', r":1: missing hash_ids"),
    ("mooncake", '{"timestamp": -1, "input_length": 1, "output_length": 1, "hash_ids": []}\n', r":1: timestamp = -1"),
    ("mooncake", '{"timestamp": true, "input_length": 1, "output_length": 1, "hash_ids": []}\n', r":1: timestamp = True"),
    ("mooncake", '{"timestamp": 0, "input_length": 1, "output_length": 1, "hash_ids": [1, "a"]}\n', r":1: hash_ids"),
    ("mooncake", '[1, 2]\n', r":1: a JSON list"),
])
def test_importers_reject_malformed_lines(tmp_path, fmt, content, match):
    p = tmp_path / "bad.input"
    p.write_text(content)
    with pytest.raises(TraceFormatError, match=match):
        load(p, fmt)


_IMPORTERS = {"mqsim": import_mqsim, "arc": import_arc, "msr": import_msr, "mooncake": import_mooncake,
              "text": read_text}
_VALID = {"mqsim": "5 1 8 8 1", "arc": "3 2 0 7", "msr": "10,h,0,Write,4096,512,3",
          "mooncake": '{"timestamp": 5, "input_length": 9, "output_length": 1, "hash_ids": [4, 5]}',
          "text": "0.25 key 17 write kv"}


@FUZZ
@given(fmt=st.sampled_from(sorted(_IMPORTERS)), data=st.data())
def test_parsers_fuzz_only_raise_trace_format_errors(tmp_path, fmt, data):
    """Random edits of valid lines: either a clean parse or a TraceFormatError naming the line."""
    lines = [_VALID[fmt]] * data.draw(st.integers(1, 4))
    i = data.draw(st.integers(0, len(lines) - 1))
    line = lines[i]
    if data.draw(st.booleans()):
        pos = data.draw(st.integers(0, len(line)))
        line = line[:pos] + data.draw(st.text(max_size=6)) + line[pos + data.draw(st.integers(0, 3)):]
    else:
        line = data.draw(st.text(max_size=40))
    lines[i] = line
    body = "\n".join(lines) + "\n"
    if fmt == "text":
        body = "# tiered-trace 1 text\n" + body
    p = tmp_path / "fuzz.input"
    p.write_bytes(body.encode("utf-8", "surrogatepass"))
    try:
        _IMPORTERS[fmt](p)
    except TraceFormatError as e:
        assert e.path == str(p) and (e.line is not None) and str(e).startswith(str(p))


@FUZZ
@given(raw=st.binary(max_size=200))
def test_parsers_fuzz_random_bytes(tmp_path, raw):
    p = tmp_path / "raw.input"
    p.write_bytes(raw)
    for fn in _IMPORTERS.values():
        try:
            fn(p)
        except TraceFormatError:
            pass


# ---------------------------------------------------------------- the public formats

def test_traces_in_the_public_formats_import(tmp_path):
    """Volumes like the public traces' (generated: those files may not be copied here)."""
    n_arc = trace_samples.arc(tmp_path / "OLTP.lis.zst")
    arc = load(tmp_path / "OLTP.lis.zst")
    assert len(arc) == n_arc["pages"] and not arc.timed
    n_mq = trace_samples.mqsim(tmp_path / "tpcc.trace")
    mq = load(tmp_path / "tpcc.trace")
    assert mq.meta["requests"] == n_mq["requests"] and mq.timed and len(mq) >= n_mq["requests"]
    n_mc = trace_samples.mooncake(tmp_path / "conversation.jsonl")
    reqs = list(read_requests(tmp_path / "conversation.jsonl"))
    mc = load(tmp_path / "conversation.jsonl")
    assert len(reqs) == n_mc["requests"] and len(mc) == n_mc["blocks"] == sum(len(r.hash_ids) for r in reqs)
    assert [detect_format(tmp_path / n) for n in ("OLTP.lis.zst", "tpcc.trace", "conversation.jsonl")] == \
        ["arc", "mqsim", "mooncake"]


@pytest.mark.skipif(not PUBLIC.exists(), reason="the public traces are not beside this checkout")
def test_public_traces_import():
    arc = load(public("arc-OLTP.lis.zst"))
    assert len(arc) == 914145 and not arc.timed  # 914,145 page references (the README's count)
    mq = load(public("mqsim-tpcc-small.trace"))
    assert mq.meta["requests"] == 6999 and mq.timed and len(mq) >= 6999
    reqs = list(read_requests(public("mooncake-conversation.jsonl")))
    mc = load(public("mooncake-conversation.jsonl"))
    assert len(reqs) == 12031 and len(mc) == sum(len(r.hash_ids) for r in reqs)


def test_detect_format_by_content(tmp_path):
    for fmt, line in _VALID.items():
        p = tmp_path / f"{fmt}.data"
        p.write_text(("# tiered-trace 1 text\n" if fmt == "text" else "") + line + "\n")
        assert detect_format(p) == ("tiered" if fmt == "text" else fmt)
    (tmp_path / "odd.data").write_text("a b\n")
    with pytest.raises(TraceFormatError, match="cannot tell the trace format"):
        detect_format(tmp_path / "odd.data")
    with pytest.raises(ValueError, match="unknown trace format 'nope'"):
        load(tmp_path / "odd.data", "nope")


# ---------------------------------------------------------------- recorder

def test_recorder_buffers_flushes_and_installs_atomically(tmp_path):
    p = tmp_path / "r.trace"
    rec = TraceRecorder(p, buffer_events=7)
    with pytest.raises(RuntimeError, match="not open"):
        rec(AccessEvent(0.0, "a", 1, "read"))
    rec.open()
    evs = [AccessEvent(100.0 + i, f"k{i % 5}", 10 * i, OPS[i % 2], KINDS[i % len(KINDS)]) for i in range(30)]
    for e in evs[:20]:
        rec(e)
    rec(AccessEvent(120.5, "k1", 0, "evict"))
    rec(AccessEvent(120.6, "k9", 8, "write", "optimizer"))  # an alias: recorded as optim
    rec(AccessEvent(120.7, "k9", 8, "read", "mystery"))  # unknown: recorded as blob, counted
    assert not p.exists() and (tmp_path.iterdir().__next__().name.startswith(".r.trace.rec-"))
    for e in evs[20:]:
        rec(e)
    assert rec.close() == p and rec.close() == p
    tr = read_trace(p)
    extra = [AccessEvent(120.6, "k9", 8, "write", "optim"), AccessEvent(120.7, "k9", 8, "read", "blob")]
    assert tr.equals(Trace.from_events(evs[:20] + extra + evs[20:]))
    assert tr.meta["skipped_events"] == {"evict": 1} and tr.meta["unknown_kinds_as_blob"] == {"mystery": 1}
    assert [x.name for x in tmp_path.iterdir()] == ["r.trace"]
    with pytest.raises(RuntimeError):
        rec(evs[0])


def test_recorder_concurrent_listeners(tmp_path):
    p = tmp_path / "c.trace"
    with TraceRecorder(p, buffer_events=64) as rec:
        def work(t):
            for i in range(500):
                rec(AccessEvent(float(i), f"t{t}-{i % 7}", i, "read", "kv"))
        threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
    tr = read_trace(p)
    assert len(tr) == 2000 and len(tr.key_names) == 28
    assert sorted(tr.size.tolist()) == sorted(list(range(500)) * 4)


def test_recorder_on_a_real_store(tmp_path):
    torch = pytest.importorskip("torch")
    from tiered.store import TieredStore

    cfg = {"tiers": {"host": {"capacity": "4MiB"}, "nvme": {"path": str(tmp_path / "nvme"), "capacity": "64MiB"}},
           "engine": {"workers": 2, "chunk": "1MiB"}}
    p = tmp_path / "store.trace"
    with TieredStore(cfg) as store, TraceRecorder(p) as rec:
        store.add_listener(rec)
        a, b = torch.arange(1024, dtype=torch.float32), torch.ones(4096)
        store.put("a", a, kind="weight").result(timeout=30)
        store.put("b", b, kind="kv").result(timeout=30)
        assert torch.equal(store.get("a").result(timeout=30), a)
        store.get("b").result(timeout=30)
    tr = read_trace(p)
    got = [(e.key, e.nbytes, e.op, e.kind) for e in tr.events()]
    assert got[:2] == [("a", 4096, "write", "weight"), ("b", 16384, "write", "kv")]
    assert ("a", 4096, "read", "weight") in got[2:] and ("b", 16384, "read", "kv") in got[2:]
    assert np.all(np.diff(tr.time) >= 0) and tr.time[0] == 0.0


def test_shipped_recorded_traces():
    names = sorted(x.name for x in DATA.iterdir() if x.is_dir())
    assert "offload-llama-generate.trace" in names and "store-roundtrip.trace" in names
    for n in names:
        tr = read_trace(DATA / n)
        assert len(tr) > 50 and tr.key_names and tr.meta.get("workload")
        assert sum(f.stat().st_size for f in (DATA / n).iterdir()) < 4 << 20
    gen = read_trace(DATA / "offload-llama-generate.trace")
    assert set(gen.kind.tolist()) == {KINDS.index("weight")} and gen.op.tolist().count(1) >= 9
    adam = read_trace(DATA / "adamw-steps.trace")  # the optimizer emits kind "optimizer": an alias of optim
    assert set(adam.kind.tolist()) == {KINDS.index("optim")} and "unknown_kinds_as_blob" not in adam.meta


def test_layering_traces_imports_no_runtime():
    from test_packaging import imports_outside

    assert imports_outside("traces") <= {"policies"}
