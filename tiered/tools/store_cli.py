"""``tiered store ...``: inspect and repair a store on disk.

    tiered store ls DIR                 keys with size, dtype, shape, kind, version, ephemeral, tier
    tiered store check DIR [--repair]   verify every object; --repair deletes corrupt ones and
                                        gives back blocks no manifest entry names
    tiered store rm DIR KEY             delete a key (or --prefix P: every key starting with P)

DIR is a storage tier directory (the one holding ``manifest.json``); ``--config FILE``
opens the store a config describes instead. Errors print one line and exit 2
(:func:`tiered.tools.args.run_command`).
"""

from __future__ import annotations

import argparse
import json


def add_store_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="store_command", required=True)
    parsers = {}
    for name, fn, about in (("ls", _ls, "list the objects of a store"),
                            ("check", _check, "verify every object; --repair reclaims unnamed blocks"),
                            ("rm", _rm, "delete a key, or every key with a prefix")):
        p = parsers[name] = sub.add_parser(name, help=about)
        p.add_argument("dir", nargs="?", help="a storage tier directory of the store")
        p.add_argument("--config", help="open the store this config file describes instead of DIR")
        p.add_argument("--json", action="store_true", help="print JSON")
        p.set_defaults(func=fn)
    parsers["check"].add_argument("--repair", action="store_true",
                                  help="delete corrupt objects, give back blocks nothing names, start "
                                       "empty if the manifest is missing")
    parsers["rm"].add_argument("key", nargs="?", help="the key to delete")
    parsers["rm"].add_argument("--prefix", help="delete every key starting with this")


def _open(args: argparse.Namespace, start_empty: bool = False):
    from ..store import StoreError, TieredStore
    from ..store.check import config_for_directory

    if (args.dir is None) == (args.config is None):
        raise StoreError("give a storage tier directory or --config FILE (one of them)")
    cfg = args.config if args.config is not None else config_for_directory(args.dir)
    return TieredStore(cfg, hugepages=False).open(start_empty=start_empty)


def _ls(args: argparse.Namespace) -> int:
    with _open(args) as store:
        rows = [store.meta(k) for k in sorted(store.keys())]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for m in rows:
        shape = "x".join(map(str, m["shape"])) or "()"
        print(f"{m['key']}\t{m['nbytes']}\t{m['dtype']}\t{shape}\t{m['kind']}\tv{m['version']}\t"
              f"{'ephemeral' if m['ephemeral'] else 'durable'}\t{m['tier']}")
    return 0


def _check(args: argparse.Namespace) -> int:
    with _open(args, start_empty=args.repair) as store:
        report = store.check(repair=args.repair)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(_summary(report))
        for key, err in report["corrupt"].items():
            print(f"corrupt {key}: {err}")
        for key, err in report["unreadable"].items():
            print(f"unreadable {key} (kept): {err}")
    return 1 if report["unreadable"] or (report["corrupt"] and not args.repair) else 0


def _summary(r: dict) -> str:
    unnamed = sum(r["reclaimable_bytes"].values())
    good = r["objects"] - len(r["corrupt"]) - len(r["unreadable"])
    parts = [f"{r['root']}: {r['objects']} objects checked, {good} good ({r['bytes_verified']} bytes)",
             f"{len(r['corrupt'])} corrupt", f"{len(r['unreadable'])} unreadable"]
    if r["repaired"]:
        parts += [f"{len(r['removed'])} removed", f"{r['reclaimed_bytes']} bytes reclaimed"]
    else:
        parts.append(f"{unnamed} bytes reclaimable with --repair")
    if r.get("ephemeral_removed"):
        parts.append(f"{len(r['ephemeral_removed'])} ephemeral objects of a crashed process removed")
    if r.get("manifest_missing"):
        parts.append("manifest was missing: started empty")
    return ", ".join(parts)


def _rm(args: argparse.Namespace) -> int:
    from ..store import StoreError

    if args.config is not None and args.dir is not None and args.key is None and args.prefix is None:
        args.key, args.dir = args.dir, None  # `rm --config F KEY`
    if (args.key is None) == (args.prefix is None):
        raise StoreError("give a KEY or --prefix P (one of them)")
    with _open(args) as store:
        if args.key is not None:
            try:
                store.delete(args.key)
            except KeyError:
                raise StoreError(f"no object {args.key!r} in the store at {store.root}") from None
            removed = [args.key]
        else:
            removed = store.delete_prefix(args.prefix)
    print(json.dumps(removed) if args.json else f"removed {len(removed)} objects")
    return 0
