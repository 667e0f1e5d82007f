"""Peer snapshots (after REFT): every rank's snapshot also lives in the host memory of its peer.

With ``DistributedCheckpointer(..., peer=True)`` each rank keeps a copy of every piece it
snapshots (a host buffer of the store, charged to owner ``checkpoint/<name>``, from its
reserved share when it has one, outside the ``host_buffer`` budget of its own snapshots), and once its
step is durable sends the pieces, with their crc32 and the manifest's tree, to rank
``(rank + 1) % world`` over ``torch.distributed`` (gloo send/recv). The peer receives them
into host buffers of its own store (same owner) and holds them until the next global step
replaces them; a step that fails to commit globally leaves the previous one held. A rank that
restarts (its memory is gone, and maybe its disk) gets its state back from the rank that holds
it, without reading storage: :meth:`DistributedCheckpointer.load` asks every rank what it
holds and takes the peer's copy where the peer holds the step (each piece checked against the
manifest's crc32 of every segment it spans; a copy that fails is replaced by a storage read). A
held copy being sent stays allocated until its sends end, even when a newer step replaces it or
the checkpointer closes meanwhile.
"""

from __future__ import annotations

import threading

import torch
import torch.distributed as dist

from ._wire import recv_json, send_json, wait_all
from .format import CheckpointChecksumError, CheckpointError, segment_crcs
from .host import CheckpointHost


class Held:
    """A peer's snapshot of one step, held here: its header (tree, tensors, piece sizes and
    crc32) and one host buffer per piece."""

    def __init__(self, header: dict, bufs: list) -> None:
        self.header, self.bufs = header, bufs
        self.lent = 0  # sends in flight that read the buffers
        self.replaced = False  # no longer the held snapshot: freed when the last send is done

    @property
    def step(self) -> int:
        return self.header["step"]

    def pieces(self, t_index: int):
        """(buffer, nbytes, crc32 list) of each piece of tensor ``t_index``, in order."""
        first = sum(len(t["pieces"]) for t in self.header["tensors"][:t_index])
        for k, (nbytes, crcs) in enumerate(self.header["tensors"][t_index]["pieces"]):
            yield self.bufs[first + k], nbytes, crcs


class PeerCopies:
    """This rank's side of peer snapshots: the outgoing copies of its own pieces, and the held
    snapshot of the previous rank. Memory is the store's host tier (owner ``owner``)."""

    def __init__(self, host: CheckpointHost, wait: float) -> None:
        self.store, self.owner, self.res = host.store, host.owner, host.res  # the checkpointer's share, if any
        self.wait = wait
        self._lock = threading.Lock()
        self.held: Held | None = None

    # -- saving ----------------------------------------------------------------------
    def keep(self, h, p) -> None:
        """Copy thread: keep a copy of piece ``p`` (in its host buffer now) to send to the peer."""
        out = self._alloc(p.length)
        out.array[:p.length] = p.buf.array[:p.length]
        h.__dict__.setdefault("peer_out", {})[p.index] = out

    def drop_outgoing(self, h) -> None:
        for buf in h.__dict__.pop("peer_out", {}).values():
            buf.release()

    def exchange(self, h, rank: int, world: int, group) -> Held:
        """Send this rank's committed snapshot ``h`` to the next rank; receive (and return) the
        previous rank's. Every rank calls it for the same step."""
        header = _header(h, rank, world)
        outs = h.__dict__.get("peer_out", {})
        count = sum(len(t["pieces"]) for t in header["tensors"])
        if sorted(outs) != list(range(count)):
            raise CheckpointError(f"checkpoint step {h.step}: {len(outs)} peer copies kept for {count} pieces")
        works = self._send(header, [outs[i] for i in range(count)], (rank + 1) % world, group)
        try:
            held = self._recv((rank - 1) % world, group)
        except BaseException as e:
            _wait_noting(works, e)
            raise
        try:
            wait_all(works)
        except BaseException:
            self.free(held)
            raise
        return held

    def hold(self, held: Held) -> None:
        """``held`` replaces the snapshot held so far (its step is now globally committed)."""
        with self._lock:
            old, self.held = self.held, held
        if old is not None:
            self._let_go(old)

    def _let_go(self, held: Held) -> None:
        """``held`` is held no more: freed now, or by the last send still reading it."""
        with self._lock:
            held.replaced = True
            idle = held.lent == 0
        if idle:
            self.free(held)

    def _returned(self, held: Held) -> None:
        with self._lock:
            held.lent -= 1
            idle = held.lent == 0 and held.replaced
        if idle:
            self.free(held)

    # -- restoring -------------------------------------------------------------------
    def held_step(self, source: int, world: int) -> int:
        """The step of ``source``'s snapshot held here for a world of ``world`` ranks, else -1."""
        with self._lock:
            h = self.held
        if h is None or h.header["rank"] != source or h.header["world"] != world:
            return -1
        return h.step

    def send_held(self, dst: int, group) -> list:
        """Start sending the held snapshot to ``dst``; returns the works to wait for (``wait_all``).
        Its buffers stay allocated until then, even if a newer step replaces it meanwhile."""
        with self._lock:
            h = self.held
            if h is None:
                raise CheckpointError(f"no peer snapshot is held here to send to rank {dst}")
            h.lent += 1
        try:
            works = self._send(h.header, h.bufs, dst, group)
        except BaseException:
            self._returned(h)
            raise
        return works + [_Lent(self, h)]

    def receive(self, src: int, group) -> Held:
        return self._recv(src, group)

    def _alloc(self, nbytes: int):
        """A host-tier buffer charged to the checkpointer: from its reserved share when it has one
        (which must then hold the peer's snapshot besides its own saves), else from free memory."""
        if self.res is not None:
            return self.res.alloc(nbytes, wait=self.wait)
        return self.store.alloc_host(nbytes, self.wait, owner=self.owner)

    # -- wire --------------------------------------------------------------------------
    def _send(self, header: dict, bufs: list, dst: int, group) -> list:
        works = send_json(header, dst, group)
        for (nbytes, _crc), buf in zip((p for t in header["tensors"] for p in t["pieces"]), bufs):
            data = torch.from_numpy(buf.array[:nbytes])
            works += [dist.isend(data, dst, group=group), data]
        return works

    def _recv(self, src: int, group) -> Held:
        header = recv_json(src, group)
        bufs: list = []
        try:
            for t in header["tensors"]:
                for nbytes, _crcs in t["pieces"]:
                    buf = self._alloc(nbytes)
                    bufs.append(buf)
                    dist.recv(torch.from_numpy(buf.array[:nbytes]), src, group=group)
        except BaseException:
            for buf in bufs:
                buf.release()
            raise
        return Held(header, bufs)

    def free(self, held: Held) -> None:
        bufs, held.bufs = held.bufs, []
        for buf in bufs:
            buf.release()

    def close(self) -> None:
        with self._lock:
            held, self.held = self.held, None
        if held is not None:
            self._let_go(held)


class _Lent:
    """The last of a send's works: waiting for it (after the sends) gives the held copy back."""

    def __init__(self, peers: PeerCopies, held: Held) -> None:
        self._peers, self._held = peers, held

    def wait(self) -> None:
        held, self._held = self._held, None
        if held is not None:
            self._peers._returned(held)


def read_held(held: Held, t_index: int, put, where: str) -> None:
    """Hand tensor ``t_index``'s bytes to ``put(start, bytes)``, each piece checked against its crc32."""
    lo = 0
    for buf, nbytes, crcs in held.pieces(t_index):
        data = buf.array[:nbytes]
        got = segment_crcs(data)  # a piece of a non-contiguous tensor spans several segments
        if got != crcs:
            k = next((i for i, (a, b) in enumerate(zip(got, crcs)) if a != b), min(len(got), len(crcs)))
            raise CheckpointChecksumError(f"{where}: bytes {lo}..{lo + nbytes} held for the peer: segment {k} has "
                                          f"crc32 {got[k] if k < len(got) else None}, recorded "
                                          f"{crcs[k] if k < len(crcs) else None} ({len(crcs)} recorded)")
        put(lo, data)
        lo += nbytes


def _header(h, rank: int, world: int) -> dict:
    """What a peer needs to hold and give back a committed snapshot (from its manifest)."""
    tensors = []
    for t in h.doc["tensors"]:
        if t.get("ref"):
            raise CheckpointError(f"checkpoint step {h.step}: tensor {t['name']!r} is a StoreRef; peer snapshots "
                                  "hold copied tensors only")
        tensors.append({k: t[k] for k in ("name", "dtype", "shape", "nbytes")}
                       | {"pieces": [[p["nbytes"], p["crc32"]] for p in t["parts"]]})
    return {"step": h.step, "rank": rank, "world": world, "tree": h.doc["tree"], "tensors": tensors}


def _wait_noting(works: list, error: BaseException) -> None:
    """Wait for the sends after a failed receive; their own failure is noted on ``error``."""
    try:
        wait_all(works)
    except BaseException as e2:  # noqa: BLE001 - reported with the receive's error, which is raised
        error.add_note(f"sending to the peer failed too: {e2!r}")
