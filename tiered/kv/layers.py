"""Which decoder layers a TieredCache holds KV for, and how each one attends.

transformers describes a decoder's cache layout with ``layer_types`` (or a
per-layer ``sliding_window``) and, for models that share KV across layers
(Gemma3n, Gemma4: ``num_kv_shared_layers``), ``kv_sharing_modes``: a "reuse"
layer never calls ``Cache.update`` (it reads the K/V an earlier "store" layer
returned). :func:`transformers.cache_utils.get_layer_types_and_kwargs` turns
both into one list, the one ``DynamicCache(config=...)`` is built from; this
module reads the same list, so the two caches agree layer by layer.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers.cache_utils import get_layer_types_and_kwargs

# attention layers whose KV this cache holds; "dummy" layers (KV shared, or no attention) hold none
_KV_TYPES = ("full_attention", "sliding_attention")


@dataclass(frozen=True)
class LayerPlan:
    types: list[str]  # per model layer: "full_attention", "sliding_attention" or "dummy"
    windows: list[int | None]  # per model layer: its sliding window, None for full attention
    rows: list[int]  # model layers that hold KV, in order (a block stores one row per such layer)
    shared: frozenset[int]  # model layers whose returned K/V later layers read ("store" in kv_sharing_modes)
    kv_heads: int
    head_dim: int


def _text_config(config):
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def _layer_geometry(lc) -> tuple[int, int]:
    """(kv_heads, head_dim) of one layer's config."""
    heads = lc.num_attention_heads
    kv_heads = getattr(lc, "num_key_value_heads", None) or heads
    return kv_heads, getattr(lc, "head_dim", None) or lc.hidden_size // heads


def plan_layers(config) -> LayerPlan:
    """The layer plan of a decoder config; unsupported layouts raise ValueError naming the setting."""
    cfg = _text_config(config)
    types, kwargs = get_layer_types_and_kwargs(cfg)
    bad = sorted({t for t in types if t not in _KV_TYPES and t != "dummy"})
    if bad:
        raise ValueError(f"TieredCache: {type(cfg).__name__} has layer_types {bad}; only "
                         f"{list(_KV_TYPES)} (and KV-shared layers) are supported")
    rows = [i for i, t in enumerate(types) if t in _KV_TYPES]
    layer_cfgs = getattr(cfg, "per_layer_config", None) or [cfg] * len(types)
    geometry = {_layer_geometry(layer_cfgs[i]) for i in rows} or {_layer_geometry(layer_cfgs[0])}
    if len(geometry) > 1:
        raise ValueError(f"TieredCache: {type(cfg).__name__} has a per-layer KV geometry ((kv heads, head_dim) "
                         f"per layer: {sorted(geometry)}, e.g. a head_dim per layer from global_head_dim); "
                         "a block holds one geometry for all layers")
    (kv_heads, head_dim), = geometry
    windows = [kw.get("sliding_window") if t == "sliding_attention" else None for t, kw in zip(types, kwargs)]
    modes = getattr(cfg, "kv_sharing_modes", None) or [None] * len(types)
    shared = frozenset(i for i, mode in enumerate(modes) if mode == "store")
    return LayerPlan(list(types), windows, rows, shared, kv_heads, head_dim)
