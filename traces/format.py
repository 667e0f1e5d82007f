"""The tiered trace format, version 2: raw little-endian numpy columns + a JSON header.

A trace is a directory::

    NAME.trace/
        header.json     {"format": "tiered-trace", "version": 2, "events": N,
                         "columns": {"time": "<f8", "key": "<i8", "size": "<i8",
                                     "op": "|u1", "kind": "|u1"},
                         "ops": [...], "kinds": [...], "timed": bool,
                         "keys": "keys.json" | null, "meta": {...},
                         "plans": null | {"count": P, "keys": M, "owners": [...],
                                          "columns": {"plan_at": "<i8", "plan_owner": "<i4",
                                                      "plan_start": "<i8", "plan_keys": "<i8"}}}
        time.bin        float64 seconds from the trace's start
        key.bin         int64 object id (an index into keys.json when present)
        size.bin        int64 bytes
        op.bin          uint8 index into "ops"   (read, write)
        kind.bin        uint8 index into "kinds" (weight, optim, kv, gnn, checkpoint, blob)
        keys.json       optional: the object names, a JSON list of strings
        plan_at.bin     int64 per plan: the index of the event the declaration precedes (N: after the last)
        plan_owner.bin  int32 per plan: index into the header's "owners"
        plan_start.bin  int64, P + 1 offsets: plan j's keys are plan_keys[start[j]:start[j + 1]]
        plan_keys.bin   int64 key ids (like key.bin), in the order the owner will read them

The plan files exist only when "plans" is not null: the declared futures
(``TieredStore.plan``, an empty plan withdraws the owner's previous one).
Version 1 (no "plans") still reads, as a trace without plans.
17-18 bytes per event, memory-mapped on read, no pickle anywhere. The
header is written last, inside a temporary directory that is then renamed
into place (each step fsynced), so a directory with a header is complete.
``timed`` is False for traces whose source has no timestamps (replay them
closed-loop). The text form (``write_text`` / ``read_text``) holds the same
events one per line, each plan as a ``plan OWNER KEY...`` line before the
event it precedes, and converts both ways losslessly.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Iterable, Iterator, NamedTuple

import numpy as np

from ..policies.base import KINDS, OPS

from .errors import TraceFormatError
from .events import AccessEvent, normalize_kind

__all__ = ["FORMAT", "VERSION", "PlanDecl", "Trace", "read_trace", "write_trace", "read_text", "write_text"]

FORMAT = "tiered-trace"
VERSION = 2  # 2: declared plans
READ_VERSIONS = (1, 2)
COLUMNS = {"time": "<f8", "key": "<i8", "size": "<i8", "op": "|u1", "kind": "|u1"}
PLAN_COLUMNS = {"plan_at": "<i8", "plan_owner": "<i4", "plan_start": "<i8", "plan_keys": "<i8"}
TEXT_MAGIC = f"# {FORMAT} {VERSION} text"
TEXT_MAGICS = tuple(f"# {FORMAT} {v} text" for v in READ_VERSIONS)


class PlanDecl(NamedTuple):
    """Before event ``at``, ``owner`` declared it reads ``keys`` (key ids) next, in order; empty: withdrawn."""

    at: int
    owner: str
    keys: tuple[int, ...]


@dataclass(frozen=True, eq=False)
class Trace:
    """Columns of one trace, equally long; ``key_names[i]`` names key id ``i`` when given."""

    time: np.ndarray
    key: np.ndarray
    size: np.ndarray
    op: np.ndarray
    kind: np.ndarray
    key_names: tuple[str, ...] | None = None
    timed: bool = True
    meta: dict[str, Any] = field(default_factory=dict)
    plans: tuple[PlanDecl, ...] = ()

    def __post_init__(self) -> None:
        n = np.asarray(self.time).shape[0]
        for name, dtype in COLUMNS.items():
            a = np.asarray(getattr(self, name))
            if a.ndim != 1 or a.shape[0] != n:
                raise ValueError(f"trace column {name!r}: expected shape ({n},), got {a.shape}")
            if a.dtype != np.dtype(dtype):
                a = a.astype(dtype)
            object.__setattr__(self, name, a)
        if n:
            if not np.all(np.isfinite(self.time)):
                raise ValueError("trace column 'time': expected finite seconds")
            if self.size.min() < 0:
                raise ValueError(f"trace column 'size': expected sizes >= 0, got {int(self.size.min())}")
            if self.op.max() >= len(OPS):
                raise ValueError(f"trace column 'op': expected indices < {len(OPS)} into {OPS}")
            if self.kind.max() >= len(KINDS):
                raise ValueError(f"trace column 'kind': expected indices < {len(KINDS)} into {KINDS}")
            if self.key_names is not None and (self.key.min() < 0 or self.key.max() >= len(self.key_names)):
                raise ValueError(f"trace column 'key': ids must index the {len(self.key_names)} key names")
        if self.key_names is not None:
            object.__setattr__(self, "key_names", tuple(self.key_names))
        object.__setattr__(self, "plans", _checked_plans(self.plans, n, self.key_names))

    def __len__(self) -> int:
        return int(self.time.shape[0])

    @property
    def footprint(self) -> int:
        """Bytes of all distinct objects (each at its largest size)."""
        if not len(self):
            return 0
        uniq, inv = np.unique(self.key, return_inverse=True)
        big = np.zeros(uniq.shape[0], dtype=np.int64)
        np.maximum.at(big, inv.reshape(-1), self.size)
        return int(big.sum())

    def key_name(self, key_id: int) -> str:
        return self.key_names[key_id] if self.key_names is not None else str(key_id)

    def events(self) -> Iterator[AccessEvent]:
        """The events one by one, plans (op "plan", at the time of the access they precede) included;
        for small traces and tests (replay uses the columns)."""
        times = self.time.tolist()
        plans = iter(self.plans)
        nxt = next(plans, None)
        for i, (t, k, s, o, d) in enumerate(zip(times, self.key.tolist(), self.size.tolist(),
                                                self.op.tolist(), self.kind.tolist())):
            while nxt is not None and nxt.at == i:
                yield self._plan_event(nxt, t)
                nxt = next(plans, None)
            yield AccessEvent(t, self.key_name(k), s, OPS[o], KINDS[d])
        while nxt is not None:
            yield self._plan_event(nxt, times[-1] if times else 0.0)
            nxt = next(plans, None)

    def _plan_event(self, p: PlanDecl, t: float) -> AccessEvent:
        return AccessEvent(t, p.owner, 0, "plan", "blob", None, tuple(self.key_name(k) for k in p.keys))

    @classmethod
    def from_events(cls, events: Iterable[AccessEvent], *, timed: bool = True, meta: dict | None = None) -> "Trace":
        """Columns from events: reads and writes, and plans (evict/delete are not accesses); times
        from the first access."""
        ids: dict[str, int] = {}
        t, k, s, o, d = [], [], [], [], []
        plans: list[PlanDecl] = []
        op_ix = {x: i for i, x in enumerate(OPS)}
        kind_ix = {x: i for i, x in enumerate(KINDS)}
        for ev in events:
            if ev.op == "plan":
                plans.append(PlanDecl(len(t), str(ev.key),
                                      tuple(ids.setdefault(str(x), len(ids)) for x in ev.keys or ())))
                continue
            if ev.op not in op_ix:
                continue
            kind = normalize_kind(ev.kind, KINDS)
            if kind is None:
                raise ValueError(f"event for key {ev.key!r}: unknown kind {ev.kind!r}; expected one of {KINDS}")
            t.append(ev.time)
            k.append(ids.setdefault(str(ev.key), len(ids)))
            s.append(ev.nbytes)
            o.append(op_ix[ev.op])
            d.append(kind_ix[kind])
        time = np.asarray(t, dtype=np.float64)
        if time.size:
            time = time - time[0]
        return cls(time, np.asarray(k, np.int64), np.asarray(s, np.int64), np.asarray(o, np.uint8),
                   np.asarray(d, np.uint8), tuple(ids), timed, dict(meta or {}), tuple(plans))

    def equals(self, other: "Trace") -> bool:
        """Bitwise-equal columns, plans and ``timed``; named keys compared by name (meta is not compared)."""
        if len(self) != len(other) or self.timed != other.timed or len(self.plans) != len(other.plans):
            return False
        if (self.key_names is None) != (other.key_names is None):
            return False
        if self.key_names is None:
            same_keys = np.array_equal(self.key, other.key)
        else:
            same_keys = [self.key_names[i] for i in self.key.tolist()] == [other.key_names[i] for i in other.key.tolist()]
        same_plans = all(a.at == b.at and a.owner == b.owner and
                         [self.key_name(x) for x in a.keys] == [other.key_name(x) for x in b.keys]
                         for a, b in zip(self.plans, other.plans))
        return same_keys and same_plans and all(
            np.array_equal(getattr(self, c), getattr(other, c)) for c in COLUMNS if c != "key")


def _checked_plans(plans: Iterable, n: int, key_names: tuple[str, ...] | None) -> tuple[PlanDecl, ...]:
    """``plans`` as PlanDecls, checking ``at`` (non-decreasing, ``0..n``) and key ids."""
    out = []
    last = 0
    for j, p in enumerate(plans):
        at, owner, keys = p
        at, keys = int(at), tuple(int(x) for x in keys)
        if not last <= at <= n:
            raise ValueError(f"trace plan {j} (owner {owner!r}): at = {at}; expected non-decreasing "
                             f"event indices in {last}..{n}")
        if not isinstance(owner, str):
            raise ValueError(f"trace plan {j}: owner {owner!r} is not a string")
        if keys and (min(keys) < 0 or (key_names is not None and max(keys) >= len(key_names))):
            raise ValueError(f"trace plan {j} (owner {owner!r}): key ids must be >= 0"
                             + (f" and index the {len(key_names)} key names" if key_names is not None else ""))
        last = at
        out.append(PlanDecl(at, owner, keys))
    return tuple(out)


def plan_columns(plans: Iterable[PlanDecl]) -> tuple[list[str], dict[str, np.ndarray]]:
    """The owners list and the raw plan columns (see the module docstring) of ``plans``."""
    owners: dict[str, int] = {}
    at, who, start, keys = [], [], [0], []
    for p in plans:
        at.append(p.at)
        who.append(owners.setdefault(p.owner, len(owners)))
        keys.extend(p.keys)
        start.append(len(keys))
    cols = {"plan_at": at, "plan_owner": who, "plan_start": start, "plan_keys": keys}
    return list(owners), {c: np.asarray(cols[c], dtype=dt) for c, dt in PLAN_COLUMNS.items()}


def plans_header(count: int, nkeys: int, owners: list[str]) -> dict[str, Any] | None:
    """The header's "plans" entry (None when there are none)."""
    if not count:
        return None
    return {"count": count, "keys": nkeys, "owners": list(owners), "columns": dict(PLAN_COLUMNS)}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def header(n: int, *, timed: bool, named: bool, meta: dict[str, Any],
           plans: dict[str, Any] | None = None) -> dict[str, Any]:
    """The header.json of a trace of ``n`` events (also used by the recorder); ``plans`` from
    :func:`plans_header`."""
    return {
        "format": FORMAT, "version": VERSION, "events": n, "columns": dict(COLUMNS),
        "ops": list(OPS), "kinds": list(KINDS), "timed": bool(timed),
        "keys": "keys.json" if named else None, "meta": meta, "plans": plans,
    }


def install_dir(tmp: Path, path: Path) -> None:
    """Rename a finished temporary trace directory to ``path`` (replacing it) and fsync the parent."""
    _fsync_dir(tmp)
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.rename(path, old)
        os.rename(tmp, path)
        shutil.rmtree(old)
    else:
        os.rename(tmp, path)
    _fsync_dir(path.parent)


def write_trace(trace: Trace, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write ``trace`` as a directory at ``path``: columns, then header, then rename (fsynced)."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path}: exists (pass overwrite=True to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        for name, dtype in COLUMNS.items():
            _write_file(tmp / f"{name}.bin", np.ascontiguousarray(getattr(trace, name), dtype=dtype).tobytes())
        if trace.key_names is not None:
            _write_file(tmp / "keys.json", json.dumps(list(trace.key_names)).encode())
        owners, pcols = plan_columns(trace.plans)
        if trace.plans:
            for name, a in pcols.items():
                _write_file(tmp / f"{name}.bin", a.tobytes())
        hdr = header(len(trace), timed=trace.timed, named=trace.key_names is not None, meta=trace.meta,
                     plans=plans_header(len(trace.plans), int(pcols["plan_keys"].shape[0]), owners))
        _write_file(tmp / "header.json", json.dumps(hdr, indent=1).encode())
        install_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def read_trace(path: str | os.PathLike, *, mmap: bool = True) -> Trace:
    """Read a trace directory, checking header, dtypes and every column's length."""
    path = Path(path)
    hp = path / "header.json"
    try:
        raw = hp.read_text()
    except FileNotFoundError:
        raise TraceFormatError(path, None, "no header.json", f"a {FORMAT} directory written by write_trace") from None
    try:
        h = json.loads(raw)
    except json.JSONDecodeError as e:
        raise TraceFormatError(hp, e.lineno, f"invalid JSON: {e.msg}", "a JSON object") from None
    if not isinstance(h, dict) or h.get("format") != FORMAT:
        raise TraceFormatError(hp, None, f"format is {h.get('format') if isinstance(h, dict) else h!r}", f"{FORMAT!r}")
    if h.get("version") not in READ_VERSIONS:
        raise TraceFormatError(hp, None, f"version {h.get('version')!r} is not supported",
                               "version " + " or ".join(map(str, READ_VERSIONS)))
    n = h.get("events")
    if type(n) is not int or n < 0:
        raise TraceFormatError(hp, None, f"events = {n!r}", "a non-negative integer")
    if h.get("columns") != COLUMNS:
        raise TraceFormatError(hp, None, f"columns = {h.get('columns')!r}", f"{COLUMNS}")
    if h.get("ops") != list(OPS) or h.get("kinds") != list(KINDS):
        raise TraceFormatError(hp, None, f"ops/kinds {h.get('ops')!r}/{h.get('kinds')!r}", f"{list(OPS)} and {list(KINDS)}")
    cols = {name: _column(path / f"{name}.bin", dtype, n, mmap) for name, dtype in COLUMNS.items()}
    names = None
    if h.get("keys") is not None:
        kp = path / str(h["keys"])
        try:
            names = json.loads(kp.read_text())
        except (FileNotFoundError, json.JSONDecodeError) as e:
            raise TraceFormatError(kp, None, f"unreadable key names ({e})", "a JSON list of strings") from None
        if not isinstance(names, list) or not all(isinstance(x, str) for x in names):
            raise TraceFormatError(kp, None, "not a list of strings", "a JSON list of strings")
    plans = _read_plans(path, hp, h.get("plans")) if h["version"] >= 2 else ()
    try:
        return Trace(cols["time"], cols["key"], cols["size"], cols["op"], cols["kind"],
                     tuple(names) if names is not None else None, bool(h.get("timed", True)),
                     h.get("meta") or {}, plans)
    except ValueError as e:
        raise TraceFormatError(path, None, str(e)) from None


def _column(cp: Path, dtype: str, n: int, mmap: bool) -> np.ndarray:
    """One raw column file of ``n`` values, its length checked."""
    want = n * np.dtype(dtype).itemsize
    try:
        got = cp.stat().st_size
    except FileNotFoundError:
        raise TraceFormatError(cp, None, "missing column file", f"{n} values of {dtype}") from None
    if got != want:
        raise TraceFormatError(cp, None, f"{got} bytes", f"{want} bytes = {n} values of {dtype}")
    if n == 0:
        return np.zeros(0, dtype=dtype)
    if mmap:
        return np.memmap(cp, dtype=dtype, mode="r", shape=(n,))
    return np.fromfile(cp, dtype=dtype, count=n)


def _read_plans(path: Path, hp: Path, ph: Any) -> tuple[PlanDecl, ...]:
    """The plans a version-2 header describes (none when its "plans" is null)."""
    if ph is None:
        return ()
    count, nkeys, owners = (ph.get("count"), ph.get("keys"), ph.get("owners")) if isinstance(ph, dict) else (None,) * 3
    if (type(count) is not int or count < 0 or type(nkeys) is not int or nkeys < 0
            or not isinstance(owners, list) or not all(isinstance(x, str) for x in owners)
            or ph.get("columns") != PLAN_COLUMNS):
        raise TraceFormatError(hp, None, f"plans = {ph!r}",
                               f'null or {{"count": int, "keys": int, "owners": [str], "columns": {PLAN_COLUMNS}}}')
    sizes = {"plan_at": count, "plan_owner": count, "plan_start": count + 1, "plan_keys": nkeys}
    c = {name: _column(path / f"{name}.bin", dt, sizes[name], False).tolist() for name, dt in PLAN_COLUMNS.items()}
    start = c["plan_start"]
    if start[0] != 0 or start[-1] != nkeys or any(b < a for a, b in zip(start, start[1:])):
        raise TraceFormatError(path / "plan_start.bin", None, "offsets out of order",
                               f"non-decreasing offsets from 0 to {nkeys}")
    if c["plan_owner"] and not 0 <= min(c["plan_owner"]) <= max(c["plan_owner"]) < len(owners):
        raise TraceFormatError(path / "plan_owner.bin", None, "an owner index out of range",
                               f"indices into the header's {len(owners)} owners")
    keys = c["plan_keys"]
    return tuple(PlanDecl(at, owners[o], tuple(keys[start[j]:start[j + 1]]))
                 for j, (at, o) in enumerate(zip(c["plan_at"], c["plan_owner"])))


_PLAIN_KEY = re.compile(r"[^\s\"#]+")


def _text_key(name: str) -> str:
    return name if _PLAIN_KEY.fullmatch(name) else json.dumps(name)


def write_text(trace: Trace, out: str | os.PathLike | IO[str]) -> None:
    """The readable form: a header comment, then ``time key size op kind`` per line, and
    ``plan OWNER KEY...`` before the access a plan declaration precedes.

    Times are written with ``repr`` so reading back gives the same float64
    bits; keys (and owners) with spaces/quotes are JSON-quoted.
    """
    if isinstance(out, (str, os.PathLike)):
        with open(out, "w", encoding="utf-8") as f:
            write_text(trace, f)
        return
    out.write(f"{TEXT_MAGIC}\n")
    out.write(f"# timed {'yes' if trace.timed else 'no'}; keys {'named' if trace.key_names is not None else 'ids'}\n")
    out.write("# time_s key size op kind\n")
    names = [_text_key(x) for x in trace.key_names] if trace.key_names is not None else None
    plans = list(trace.plans)
    j = 0

    def plan_lines(upto: int) -> None:
        nonlocal j
        while j < len(plans) and plans[j].at <= upto:
            keys = "".join(f" {names[x] if names is not None else x}" for x in plans[j].keys)
            out.write(f"plan {_text_key(plans[j].owner)}{keys}\n")
            j += 1

    for i, (t, k, s, o, d) in enumerate(zip(trace.time.tolist(), trace.key.tolist(), trace.size.tolist(),
                                            trace.op.tolist(), trace.kind.tolist())):
        plan_lines(i)
        out.write(f"{t!r} {names[k] if names is not None else k} {s} {OPS[o]} {KINDS[d]}\n")
    plan_lines(len(trace))


_TEXT_LINE = re.compile(r'^(\S+) ("(?:[^"\\]|\\.)*"|[^\s"#]+) (\d+) (\S+) (\S+)$')
_TOKEN = r'"(?:[^"\\]|\\.)*"|[^\s"#]+'
_PLAN_LINE = re.compile(rf'^plan(?: (?:{_TOKEN}))+$')


def read_text(path: str | os.PathLike) -> Trace:
    """Parse the text form; every malformed line is an error naming file and line."""
    path = Path(path)
    op_ix = {x: i for i, x in enumerate(OPS)}
    kind_ix = {x: i for i, x in enumerate(KINDS)}
    t, k, s, o, d = [], [], [], [], []
    plans: list[PlanDecl] = []
    ids: dict[str, int] = {}
    timed, named = True, True
    from ._lines import iter_lines

    lines = iter_lines(path)
    first = next(lines, (1, ""))[1]
    if first not in TEXT_MAGICS:
        raise TraceFormatError(path, 1, f"first line is {first[:60]!r}", " or ".join(map(repr, TEXT_MAGICS)))
    if True:
        for no, line in lines:
            if line.startswith("#"):
                m = re.fullmatch(r"# timed (yes|no); keys (named|ids)", line)
                if m:
                    timed, named = m.group(1) == "yes", m.group(2) == "named"
                continue
            if not line.strip():
                continue
            if line.startswith("plan ") or line == "plan":
                owner, *keys = _plan_tokens(path, no, line)
                plans.append(PlanDecl(len(t), owner, tuple(_text_key_id(path, no, x, named, ids) for x in keys)))
                continue
            m = _TEXT_LINE.match(line)
            if not m:
                raise TraceFormatError(path, no, f"cannot parse {line[:80]!r}", "'time key size op kind' separated by single spaces")
            ts, key, size, op, kind = m.groups()
            try:
                tv = float(ts)
            except ValueError:
                raise TraceFormatError(path, no, f"time {ts!r}", "seconds as a decimal number") from None
            if not math.isfinite(tv):
                raise TraceFormatError(path, no, f"time {ts!r}", "a finite number of seconds")
            if op not in op_ix:
                raise TraceFormatError(path, no, f"op {op!r}", " or ".join(OPS))
            if kind not in kind_ix:
                raise TraceFormatError(path, no, f"kind {kind!r}", "one of " + ", ".join(KINDS))
            kid = _text_key_id(path, no, key, named, ids)
            sv = int(size)
            if sv >= 1 << 63:
                raise TraceFormatError(path, no, f"size {size!r}", "bytes below 2**63")
            t.append(tv); k.append(kid); s.append(sv); o.append(op_ix[op]); d.append(kind_ix[kind])
    names = tuple(ids) if named else None
    return Trace(np.asarray(t, np.float64), np.asarray(k, np.int64), np.asarray(s, np.int64),
                 np.asarray(o, np.uint8), np.asarray(d, np.uint8), names, timed, {}, tuple(plans))


def _unquote(path: Path, no: int, tok: str, what: str) -> str:
    if not tok.startswith('"'):
        return tok
    try:
        return json.loads(tok)
    except json.JSONDecodeError:
        raise TraceFormatError(path, no, f"{what} {tok!r}", "a JSON string") from None


def _plan_tokens(path: Path, no: int, line: str) -> list[str]:
    """Owner and keys of a ``plan OWNER KEY...`` line (unquoted)."""
    if not _PLAN_LINE.match(line):
        raise TraceFormatError(path, no, f"cannot parse {line[:80]!r}", "'plan OWNER KEY...' separated by single spaces")
    toks = re.findall(_TOKEN, line[len("plan "):])
    return [_unquote(path, no, toks[0], "owner")] + toks[1:]


def _text_key_id(path: Path, no: int, key: str, named: bool, ids: dict[str, int]) -> int:
    """The id of a key token: its name's id (assigned in order of appearance), or the id itself."""
    key = _unquote(path, no, key, "key")
    if named:
        return ids.setdefault(key, len(ids))
    if not (key.isascii() and key.isdigit()):
        raise TraceFormatError(path, no, f"key {key!r}", "a non-negative integer id (keys ids)")
    kid = int(key)
    if kid >= 1 << 63:
        raise TraceFormatError(path, no, f"key {key!r}", "an id below 2**63")
    return kid
