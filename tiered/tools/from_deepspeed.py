"""``tiered config from-deepspeed ds_config.json [-o offload.toml]``: the offload TOML that
does what a DeepSpeed ZeRO-Offload / ZeRO-Infinity config asks of storage.

Mapped: ``zero_optimization.offload_param`` / ``offload_optimizer`` (``device``: ``nvme``
gives a storage tier at ``nvme_path``, ``cpu`` keeps the data in the host tier; ``pin_memory``),
and the ``aio`` block (``block_size`` -> ``[engine] chunk``, ``queue_depth`` ->
``[engine] queue_depth``, ``thread_count`` / ``intra_op_parallelism`` -> ``[engine] workers``,
Linux AIO -> ``backend = "aio"``, ``use_gds`` -> ``"kvikio"``). Capacities, which DeepSpeed
does not state, are half the free memory and half the free disk space at conversion time (as
the default config), unless given. ``aio`` values equal to DeepSpeed's own defaults
(``block_size`` 1 MiB, ``queue_depth`` 8, ``thread_count`` 1) are not mapped: tiered's defaults
are kept (the header says so). Every other key is named, with why it has no equivalent
here (most are the training loop's: ``OffloadedAdamW`` or ``TrainingArguments`` arguments),
in the file's header and on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import ConfigError, default_tier_home
from ..sizes import format_size, parse_size

_ALIGN = 4096
MiB = 1 << 20
GiB = 1 << 30
_DEVICES = ("none", "cpu", "nvme")

# zero_optimization.offload_* keys with no equivalent, and why
_OFFLOAD_KEYS_UNMAPPED = {
    "buffer_count": "tiered sizes its read-ahead from the compute budget ([offload] lookahead, "
                    "OffloadedAdamW(lookahead=)), not from a buffer count",
    "buffer_size": "units are read whole, one object each; there is no fixed staging buffer size",
    "max_in_cpu": "what stays in host memory follows the owners' shares ([owners.offload] host)",
    "fast_init": "the optimizer state is created by the first step in any case",
    "ratio": "the share of optimizer work kept on the GPU: OffloadedAdamW updates on the CPU",
    "pipeline": "OffloadedAdamW always pipelines reads, updates and writes",
    "pipeline_read": "OffloadedAdamW always pipelines reads, updates and writes",
    "pipeline_write": "OffloadedAdamW always pipelines reads, updates and writes",
}
# DeepSpeed's own aio defaults: a config that states them asks for nothing tiered's defaults
# (sized for its engine) do not already do better, so they are not mapped
_AIO_DEEPSPEED_DEFAULTS = {"block_size": 1048576, "queue_depth": 8, "thread_count": 1, "intra_op_parallelism": 1}
_AIO_UNMAPPED = {
    "single_submit": "the engine submits batches of requests; there is no one-at-a-time mode",
    "overlap_events": "the engine always overlaps submission and completion",
}
_ZERO_REASONS = {
    "stage": "ZeRO partitions state across ranks; tiered offloads one process's model and optimizer",
    "stage3_prefetch_bucket_size": "tiered prefetches whole units ([offload] lookahead), not a number of elements",
    "stage3_param_persistence_threshold": "tiered keeps whole units resident as the budget allows "
                                          "([offload] resident)",
    "stage3_max_live_parameters": "the live weights are bounded by the compute budget ([owners.offload])",
    "stage3_max_reuse_distance": "units kept for reuse follow the compute budget ([offload] resident)",
}
_TOP_REASONS = {
    "gradient_clipping": "pass max_grad_norm= to OffloadedAdamW (or TrainingArguments)",
    "optimizer": "pass lr=, betas=, eps=, weight_decay= to OffloadedAdamW",
    "scheduler": "a training-loop setting (torch.optim.lr_scheduler or TrainingArguments)",
    "fp16": "mixed precision belongs to the training loop (torch.amp, TrainingArguments(fp16=))",
    "bf16": "mixed precision belongs to the training loop (torch.amp, TrainingArguments(bf16=))",
}


@dataclass
class Conversion:
    """The TOML tables (``{table: {key: value}}``, in order) and the keys that were not mapped."""

    tables: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # "key: why"


def read_deepspeed(path: str | os.PathLike) -> dict:
    """The JSON object in ``path`` (DeepSpeed configs are JSON); one clear error otherwise."""
    text = Path(path).read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object (a DeepSpeed config), got {type(data).__name__}")
    return data


def convert(ds: Mapping[str, Any], source: str = "<dict>", *, host_capacity: int | None = None,
            storage_capacity: int | None = None) -> Conversion:
    """The offload config equivalent to DeepSpeed config ``ds`` (see the module docstring)."""
    conv = Conversion()
    zero = _table(ds.get("zero_optimization", {}), "zero_optimization", source)
    param = _offload(zero, "offload_param", source, conv)
    optim = _offload(zero, "offload_optimizer", source, conv)
    for key in zero:
        if key not in ("offload_param", "offload_optimizer"):
            conv.notes.append(f"zero_optimization.{key}: " + _ZERO_REASONS.get(
                key, "a ZeRO partitioning or communication setting; tiered has no ranks to partition across"))
    conv.tables["tiers.host"] = {"capacity": host_capacity if host_capacity is not None else _half_ram()}
    _storage_tiers(param, optim, storage_capacity, conv)
    _aio(ds, source, bool(param.get("path") or optim.get("path")), conv)
    for who, spec, owner in (("offload_param", param, "offload"), ("offload_optimizer", optim, "optim")):
        if spec["device"] == "cpu":
            conv.notes.append(f"zero_optimization.{who}.device = 'cpu': the data stays in host memory when "
                              f"[owners.{owner}] host reserves room for it; its size (from the model's) is not in "
                              "the DeepSpeed config, so no share is set")
    _activations(ds, source, conv)
    for key in ds:
        if key not in ("zero_optimization", "aio", "activation_checkpointing"):
            conv.notes.append(f"{key}: " + _TOP_REASONS.get(key, "a training-loop setting, not a storage one"))
    return conv


def _activations(ds: Mapping[str, Any], source: str, conv: Conversion) -> None:
    """``activation_checkpointing.cpu_checkpointing``: the saved activations in host memory, which
    is ``[offload] activations = "host"``; checkpointing itself is switched on in the model."""
    table = _table(ds.get("activation_checkpointing", {}), "activation_checkpointing", source)
    for key, value in table.items():
        where = f"activation_checkpointing.{key}"
        if key != "cpu_checkpointing":
            conv.notes.append(f"{where}: checkpointing is the model's (model.gradient_checkpointing_enable() "
                              "or torch.utils.checkpoint around a unit); tiered keeps no partitions of its own")
        elif not isinstance(value, bool):
            raise ConfigError(f"{where} = {value!r} in {source}: expected true or false")
        elif value:
            conv.tables["offload"] = {"activations": "host"}
            conv.notes.append(_cpu_checkpointing_note(table.get("partition_activations") is True))


def _cpu_checkpointing_note(partitioned: bool) -> str:
    """DeepSpeed moves checkpointed activations to the CPU only when it also partitions them."""
    note = ("activation_checkpointing.cpu_checkpointing: DeepSpeed applies cpu_checkpointing only together with "
            "partition_activations; [offload] activations = 'host' (set below) moves every large tensor the forward "
            "saves, with or without checkpointing")
    if not partitioned:
        note += " (partition_activations is off here: under DeepSpeed the activations stayed on the GPU)"
    return note


def _table(value: object, key: str, source: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{key} in {source}: expected an object, got {value!r}")
    return value


def _offload(zero: Mapping[str, Any], which: str, source: str, conv: Conversion) -> dict[str, Any]:
    """``device`` and ``path`` of one offload section; notes for what has no equivalent."""
    sec = _table(zero.get(which) or {}, f"zero_optimization.{which}", source)
    device = sec.get("device", "none") or "none"
    if device not in _DEVICES:
        raise ConfigError(f"zero_optimization.{which}.device = {device!r} in {source}: expected one of "
                          f"{', '.join(map(repr, _DEVICES))}")
    out: dict[str, Any] = {"device": device}
    if device == "nvme":
        path = sec.get("nvme_path")
        if not isinstance(path, str) or not path:
            raise ConfigError(f"zero_optimization.{which}.nvme_path in {source}: required (a directory) when "
                              f"device is 'nvme', got {path!r}")
        out["path"] = path
    for key, value in sec.items():
        where = f"zero_optimization.{which}.{key}"
        if key in ("device", "nvme_path"):
            continue
        if key == "pin_memory":
            if value is False:
                conv.notes.append(f"{where} = false: tiered's host tier is one arena, pinned for the GPU when "
                                  "CUDA is present; it cannot be left unpinned")
            continue
        conv.notes.append(f"{where}: " + _OFFLOAD_KEYS_UNMAPPED.get(key, "not a DeepSpeed key this converter knows"))
    return out


def _storage_tiers(param: dict, optim: dict, capacity: int | None, conv: Conversion) -> None:
    """One storage tier per distinct ``nvme_path`` (the parameters' first); the default
    directory when nothing goes to NVMe (tiered needs a storage tier)."""
    paths = list(dict.fromkeys(p for p in (param.get("path"), optim.get("path")) if p))
    if not paths:
        paths = [str(default_tier_home())]
        conv.notes.append("no offload to nvme: tiered needs a storage tier; the default directory "
                          f"{paths[0]} is used (objects go there only when the host tier has no room)")
    for i, path in enumerate(paths):
        name = "nvme" if i == 0 else f"nvme{i + 1}"
        conv.tables[f"tiers.{name}"] = {"path": path,
                                        "capacity": capacity if capacity is not None else _half_disk(path)}
    if len(paths) > 1:
        conv.notes.append(f"zero_optimization.offload_optimizer.nvme_path: a second storage tier ({paths[1]}); "
                          "objects go to the first storage tier with room, tiered cannot pin the optimizer "
                          "state to this one")


def _aio(ds: Mapping[str, Any], source: str, nvme: bool, conv: Conversion) -> None:
    """The ``[engine]`` table from the ``aio`` block (DeepSpeed's NVMe I/O is Linux AIO)."""
    aio = _table(ds.get("aio") or {}, "aio", source)
    engine: dict[str, Any] = {}
    if nvme or aio:
        engine["backend"] = "kvikio" if aio.get("use_gds") is True else "aio"
    for key, value in aio.items():
        where = f"aio.{key}"
        if value == "auto":
            conv.notes.append(f"{where} = 'auto': tiered's default is used")
        elif key in _AIO_DEEPSPEED_DEFAULTS and value == _AIO_DEEPSPEED_DEFAULTS[key] and not isinstance(value, bool):
            conv.notes.append(f"{where} = {value!r}: DeepSpeed's default, so tiered's own default is kept")
        elif key == "block_size":
            engine["chunk"] = _chunk(value, where, source, conv)
        elif key == "queue_depth":
            engine["queue_depth"] = _integer(value, where, source, 1, 65536)
        elif key in ("thread_count", "intra_op_parallelism"):
            engine["workers"] = _integer(value, where, source, 1, 256)
        elif key == "use_gds":
            if not isinstance(value, bool):
                raise ConfigError(f"{where} = {value!r} in {source}: expected true or false")
        else:
            conv.notes.append(f"{where}: " + _AIO_UNMAPPED.get(key, "not a DeepSpeed key this converter knows"))
    if engine:
        conv.tables["engine"] = engine


def _integer(value: object, where: str, source: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ConfigError(f"{where} = {value!r} in {source}: expected a whole number from {lo} to {hi}")
    return value


def _chunk(value: object, where: str, source: str, conv: Conversion) -> int:
    """``block_size`` in bytes as ``[engine] chunk`` (a multiple of 4096, at most 1 GiB)."""
    try:
        n = parse_size(value, where=f"{where} in {source}")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if n <= 0:
        raise ConfigError(f"{where} = {value!r} in {source}: expected a size > 0")
    chunk = min(-(-n // _ALIGN) * _ALIGN, GiB)
    if chunk != n:
        conv.notes.append(f"{where} = {value!r}: [engine] chunk must be a multiple of 4096 bytes, at most 1GiB; "
                          f"{chunk} is used")
    return chunk


def _half_ram() -> int:
    import psutil

    return max(MiB, psutil.virtual_memory().available // 2 // MiB * MiB)


def _half_disk(path: str) -> int:
    p = Path(path).expanduser()
    for q in (p, *p.parents):
        if q.exists():
            return max(MiB, shutil.disk_usage(q).free // 2 // MiB * MiB)
    return MiB


def to_toml(conv: Conversion, source: str) -> str:
    """The TOML text: a header naming what was not mapped, then the tables."""
    lines = [f"# offload config converted from {_comment(source)} by `tiered config from-deepspeed`",
             "# capacities: half the free memory / disk space when it was converted (edit to taste)",
             "# aio values equal to DeepSpeed's defaults are not mapped: tiered's defaults are kept"]
    if conv.notes:
        lines.append("# DeepSpeed settings not mapped:")
        lines += [f"#   {_comment(n)}" for n in conv.notes]
    for table, body in conv.tables.items():
        lines += ["", f"[{table}]"]
        for key, value in body.items():
            comment = f"  # {format_size(value)}" if key in ("capacity", "chunk") else ""
            lines.append(f"{key} = {_toml_value(value)}{comment}")
    return "\n".join(lines) + "\n"


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return toml_string(str(value))


_SHORT_ESCAPES = {"\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r", '"': '\\"', "\\": "\\\\"}


def toml_string(text: str) -> str:
    """``text`` as a TOML basic string: quotes, backslashes and control characters escaped,
    everything else (any Unicode scalar value, non-BMP included) as is, since TOML is UTF-8;
    a lone surrogate (an undecodable file name) has no TOML form and is an error."""
    out = ['"']
    for ch in text:
        o = ord(ch)
        if ch in _SHORT_ESCAPES:
            out.append(_SHORT_ESCAPES[ch])
        elif o < 0x20 or o == 0x7F:
            out.append(f"\\u{o:04X}")
        elif 0xD800 <= o <= 0xDFFF:
            raise ConfigError(f"{text!r}: holds a lone surrogate (U+{o:04X}), which TOML cannot represent")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _comment(text: str) -> str:
    """``text`` fit for a TOML comment: control characters and lone surrogates escaped."""
    return "".join(ch if (0x20 <= ord(ch) != 0x7F and not 0xD800 <= ord(ch) <= 0xDFFF) or ch == "\t"
                   else ascii(ch)[1:-1] for ch in text)


def _write_text_atomic(path: Path, text: str) -> None:
    """Temp file in the same directory, fsync, rename: the old file or the new one, never half.
    An error names ``path`` (not the temp file)."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    except OSError as e:
        raise OSError(e.errno, f"{e.strerror} (cannot create a file in {path.parent})", str(path)) from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def add_from_deepspeed_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="the DeepSpeed config (JSON)")
    p.add_argument("-o", "--output", default=None, help="write the TOML here (default: stdout)")
    p.add_argument("--host-capacity", default=None, help="[tiers.host] capacity (default: half the free RAM)")
    p.add_argument("--storage-capacity", default=None,
                   help="capacity of each storage tier (default: half the free disk space at its path)")


def from_deepspeed_main(args: argparse.Namespace) -> int:
    host = parse_size(args.host_capacity, where="--host-capacity") if args.host_capacity else None
    storage = parse_size(args.storage_capacity, where="--storage-capacity") if args.storage_capacity else None
    conv = convert(read_deepspeed(args.file), str(args.file), host_capacity=host, storage_capacity=storage)
    text = to_toml(conv, str(args.file))
    if args.output is None:
        sys.stdout.write(text)
    else:
        _write_text_atomic(Path(args.output), text)
    for note in conv.notes:
        print(f"note: not mapped: {note}", file=sys.stderr)
    if args.output is not None:
        print(f"{args.output}: written; check it with `tiered config check {args.output}`", file=sys.stderr)
    return 0
