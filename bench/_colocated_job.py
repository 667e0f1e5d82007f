"""One contender of ``bench/colocated.py``: one store (host, nvme, flash), an offloaded model that
generates with a ``TieredCache`` and is fine-tuned by ``OffloadedAdamW`` on the same weights.

Every contender builds the same seeded model and sees the same prompts and batches; only the
store's configuration differs (storage shares and ``[policy] migration``)."""

from __future__ import annotations

import os
import shutil
import time

import torch
import transformers

import tiered
from tiered.kv import KVStore, TieredCache
from tiered.optim import OffloadedAdamW
from tiered.store import TieredStore

MiB = 1 << 20
KV_ID = "gen"  # every round's TieredCache is the store owner kv/gen (one [owners.kv] share)
KV_OWNER = f"kv/{KV_ID}"


def build_model(spec: dict) -> transformers.LlamaForCausalLM:
    """A Llama built from its config with seeded weights (fp32)."""
    torch.manual_seed(spec["seed"])
    cfg = transformers.LlamaConfig(
        vocab_size=spec["vocab"], hidden_size=spec["hidden"], intermediate_size=spec["inter"],
        num_hidden_layers=spec["layers"], num_attention_heads=spec["heads"],
        num_key_value_heads=spec["heads"], max_position_embeddings=spec["prompt"] + spec["new_tokens"] + 8,
        bos_token_id=1, eos_token_id=None, pad_token_id=None)
    return transformers.LlamaForCausalLM(cfg)


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def store_config(name: str, spec: dict, root: str) -> dict:
    """The store of contender ``name``: the same tiers for all; ``fixed`` reserves each
    workload's part of nvme through ``[owners]`` shares and never migrates; ``bound`` is
    ``fixed`` with flash unthrottled; ``governed[-FALLBACK[-planned]]`` has no storage shares and
    lets the governor decide."""
    mib = spec["mib"]
    tiers = {
        "host": {"capacity": f"{mib['host']}MiB"},
        "nvme": {"path": os.path.join(root, "nvme"), "capacity": f"{mib['nvme']}MiB"},
        "flash": {"path": os.path.join(root, "flash"), "capacity": f"{mib['flash']}MiB"},
    }
    if name != "bound":  # the bound: fixed shares on a flash tier as fast as nvme (no placement beats it)
        tiers["flash"].update(read_bandwidth=spec["flash_bw"], write_bandwidth=spec["flash_bw"])
    cfg = {"tiers": tiers, "engine": {"workers": spec["workers"]},
           "owners": {"offload": {"host": f"{mib['offload_host']}MiB"},
                      "optim": {"host": f"{mib['optim_host']}MiB"}}}
    if name in ("fixed", "bound"):
        cfg["owners"]["offload"]["nvme"] = f"{mib['offload_nvme']}MiB"
        cfg["owners"]["kv"] = {"nvme": f"{mib['kv_nvme']}MiB"}
        cfg["owners"]["optim"]["nvme"] = f"{mib['nvme'] - mib['offload_nvme'] - mib['kv_nvme']}MiB"
        cfg["policy"] = {"migration": "none"}
    else:
        fallback = name.split("-")[1] if "-" in name else "lru"
        cfg["policy"] = {"migration": "auto", "fallback": fallback,
                         "migration_bandwidth": spec["migration_bandwidth"],
                         "migration_batch": spec["migration_batch"]}
    return cfg


class EventTally:
    """A store listener: bytes per (op, kind, tier) and plans declared per owner, since the last
    ``take()`` (what the governor is offered, and which workload's objects each tier serves)."""

    def __init__(self) -> None:
        self.bytes: dict[str, int] = {}
        self.plans: dict[str, int] = {}

    def __call__(self, ev) -> None:
        if ev.op == "plan":
            self.plans[ev.key] = self.plans.get(ev.key, 0) + 1
            return
        k = f"{ev.op}/{ev.kind}/{ev.tier}"
        self.bytes[k] = self.bytes.get(k, 0) + ev.nbytes

    def take(self) -> dict:
        out = {"bytes": dict(sorted(self.bytes.items())), "plans": dict(self.plans)}
        self.bytes, self.plans = {}, {}
        return out


class Contender:
    """The colocated job on one store; ``round()`` runs one generation and one fine-tuning step."""

    def __init__(self, name: str, spec: dict, root: str) -> None:
        self.name = name
        self.spec = spec
        self.root = os.path.join(root, name)
        shutil.rmtree(self.root, ignore_errors=True)
        self.store = TieredStore(store_config(name, spec, self.root)).open()
        self.tally = EventTally()
        self.store.add_listener(self.tally)
        self.reservations = []
        try:
            self.model = tiered.offload(build_model(spec), store=self.store)
            self.model.train()  # no dropout in Llama: generation computes the same as in eval mode
            self.opt = OffloadedAdamW(self.model.parameters(), lr=spec["lr"], store=self.store,
                                      model=self.model).open()
            if name in ("fixed", "bound"):  # each workload's nvme share from [owners]: the rest goes to flash
                for owner in (self.model._tiered.owner, KV_OWNER, self.opt.owner):
                    self.reservations.append(self.store.reserve("nvme", owner=owner))
        except BaseException:
            self.close()
            raise

    def round(self, r: int) -> dict:
        """Generation then one training step; times, tokens, loss and the store's figures."""
        self.tally.take()
        before = self.store.stats()
        c0, t0 = time.process_time(), time.perf_counter()
        tokens = self._generate(r)
        c1, t1 = time.process_time(), time.perf_counter()
        between = self.store.stats()
        gen_events = self.tally.take()
        loss = self._train(r)
        c2, t2 = time.process_time(), time.perf_counter()
        synced = self.store.sync_governor(self.spec["sync_timeout_s"])  # its moves decided this round: not into the next
        t3 = time.perf_counter()
        after = self.store.stats()
        return {"gen_s": t1 - t0, "train_s": t2 - t1, "drain_s": t3 - t2, "e2e_s": t3 - t0,
                "gen_cpu_s": c1 - c0, "train_cpu_s": c2 - c1, "nvme": self._room("nvme"),
                "gen_events": gen_events, "train_events": self.tally.take(),
                "synced": synced, "tokens": tokens, "loss": loss, "load1": os.getloadavg()[0],
                **_io_delta(before, after), "gen_io": _io_delta(before, between),
                "train_io": _io_delta(between, after)}

    def _generate(self, r: int) -> list:
        s = self.spec
        g = torch.Generator().manual_seed(1000 + r)
        prompts = torch.randint(0, s["vocab"], (s["gen_batch"], s["prompt"]), generator=g)
        with torch.no_grad(), TieredCache(self.model.config, KVStore(self.store, block_size=s["kv_block"]),
                                          device_budget=f"{s['kv_device_kib']}KiB", cache_id=KV_ID) as cache:
            out = self.model.generate(prompts, max_new_tokens=s["new_tokens"], do_sample=False, cache=cache)
        return out[:, s["prompt"]:].tolist()

    def _train(self, r: int) -> float:
        s = self.spec
        g = torch.Generator().manual_seed(2000 + r)
        batch = torch.randint(0, s["vocab"], (s["train_batch"], s["seq"]), generator=g)
        loss = self.model(input_ids=batch, labels=batch).loss
        loss.backward()
        self.opt.step()
        self.opt.zero_grad()
        if self.name.endswith("-planned"):
            self._plan_next_step(r + 1)
        return loss.item()

    def _plan_next_step(self, step: int) -> None:
        """Declare the state chunks the next step reads, in backward order (the last unit's
        first), as a plan of owner ``optim/<name>-next``: what ``OffloadedAdamW(model=...)`` does
        not declare itself (its ``step()`` withdraws its plan), so that the governor may stage
        them while the generation leaves flash idle. Keys are the optimizer's
        ``NAME/cINDEX/PARITY`` objects written by ``step``."""
        suffix = f"/{step % 2}"
        keys = sorted((k for k in self.store.keys() if k.startswith(f"{self.opt.name}/c") and k.endswith(suffix)),
                      reverse=True)
        self.store.plan(keys, owner=f"{self.opt.owner}-next")

    def _room(self, tier: str) -> dict:
        """Used and free bytes of a storage tier, and its largest free piece (a move or put needs
        one piece: diagnostic, read from the store's private tier table)."""
        t = self.store._tiers[tier]
        out = {"used": t.used, "free": t.space.free_bytes, "largest_free": t.space.largest()}
        gov = self.store._governor
        if gov is not None and getattr(gov.policy, "free", None):
            with gov._policy_lock:  # what the policy believes is free on its tier 0 (this tier)
                out["policy_free"] = int(gov.policy.free[0])
        return out

    def placement(self) -> dict:
        """Bytes of each workload's objects per storage tier, by key prefix (``offload``: weights,
        the optimizer's name: its state)."""
        out: dict = {}
        for key in self.store.keys():
            m = self.store.meta(key)
            who = key.split("/", 1)[0]
            cell = out.setdefault(who, {})
            cell[m["tier"]] = cell.get(m["tier"], 0) + m["nbytes"]
        return out

    def close(self) -> None:
        opt, model = getattr(self, "opt", None), getattr(self, "model", None)
        try:
            if opt is not None:
                opt.close()
            if model is not None:
                tiered.detach(model)
            for res in self.reservations:
                res.close()
        finally:
            self.store.close()
            shutil.rmtree(self.root, ignore_errors=True)


def _io_delta(before: dict, after: dict) -> dict:
    """Bytes read and written per storage tier, and moved by the governor per tier pair."""
    read, written = {}, {}
    for n, t in after["tiers"].items():
        if t is None or t.get("kind") != "storage":
            continue
        read[n] = t["bytes_read"] - before["tiers"][n]["bytes_read"]
        written[n] = t["bytes_written"] - before["tiers"][n]["bytes_written"]
    ga, gb = after["governor"] or {}, before["governor"] or {}
    moved = {p: b - (gb.get("bytes_migrated") or {}).get(p, 0) for p, b in (ga.get("bytes_migrated") or {}).items()}
    counts = {k: ga[k] - gb.get(k, 0) for k in ("decisions", "migrations", "refused_overfull", "refused_host",
                                                "refused_gone", "superseded") if k in ga}
    return {"bytes_read": read, "bytes_written": written, "bytes_migrated": {p: b for p, b in moved.items() if b},
            "governor": counts}
