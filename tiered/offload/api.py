"""``offload``, ``detach``, ``offload_stats``: attaching the runtime to a model and taking it off."""

from __future__ import annotations

import torch
from torch import nn

from ..config import load_config
from .. import offload_life
from ..store import TieredStore
from .activations import ActivationOffload
from .common import OffloadError
from .layout import _model_prefix
from .runtime import OffloadedModule


def offload(model: nn.Module, config=None, *, units=None, layout: str | None = None,
            store: TieredStore | None = None, share: int | str | None = None,
            device: str | torch.device | None = None, _external: dict[int, str] | None = None,
            _owns_store: bool = False) -> nn.Module:
    """Move ``model``'s weights into the tiered store and stream them through its forward.

    ``config``: path of an offload TOML, a ``Config`` or None (embedded default).
    ``units``: None (automatic), a list of submodule names, or ``fn(name, module) -> bool``.
    ``layout``: "packed" (each tensor whole) or "bundled" (each FFN neuron's up/gate rows and
    down column stored together, so one neuron is one contiguous read, as in "LLM in a
    flash"); default from ``[offload] layout``.
    ``store``: an open store to use (else one is opened from ``config`` and closed by ``detach``).
    ``share``: bytes of the compute tier guaranteed to this model (an int, "2GiB" or "25%" of
    the tier); default the config's ``[owners.offload]`` share, else elastic (see
    :mod:`tiered.offload.budget`).
    ``device``: the compute device (default: where the parameters are).
    Returns ``model`` itself, changed in place.
    """
    if getattr(model, "_tiered", None) is not None:
        raise OffloadError(f"{type(model).__name__} is already offloaded; call tiered.detach(model) first")
    offload_life.collect()
    cfg = store.config if store is not None else load_config(config)
    if device is None:
        p = next((p for p in model.parameters() if p.device.type != "meta"), None)
        device = p.device if p is not None else torch.device("cpu")
    owns = store is None or _owns_store
    opened = store is None  # closed here if offload fails; a store handed in is the caller's to close
    if opened:  # shared with this process's other users of the directories
        store = TieredStore.shared(cfg)
    rt = OffloadedModule(model, store, owns, cfg, torch.device(device))
    try:
        _attach(rt, units, _external, layout or cfg.offload.layout, share)
    except BaseException:
        _undo_attach(rt, opened)
        raise
    model._tiered = rt
    offload_life.watch(rt)
    return model


def _attach(rt: OffloadedModule, units, external: dict[int, str] | None, layout: str, share) -> None:
    """Build and write the units, reserve the budget, hold the residents, install the hooks."""
    # the same model keeps its prefix (objects kept by detach(keep=True) are overwritten)
    rt.prefix = getattr(rt.model, "_tiered_prefix", None) or _model_prefix(rt.model)
    rt.model._tiered_prefix = rt.prefix
    if layout not in ("packed", "bundled"):
        raise OffloadError(f"layout must be 'packed' or 'bundled', got {layout!r}")
    rt.build_banks(rt.config.offload.experts, external, layout)
    rt.build_units(units, external, layout)
    if not rt.units:
        raise OffloadError(f"{type(rt.model).__name__} has no parameters to offload")
    rt.note_durable()
    rt.open_reservations(share)
    rt.plan_budget()
    rt.open_device_cache()
    rt.write_units()
    rt.write_banks()
    rt.unbind_all()
    rt._weights_out = True  # from here a failure reads the weights back (see _undo_attach)
    for u in rt.units:  # drop the copies cached by the writes: residents then pack together
        if u.packed_key is not None:
            rt.store.evict(u.packed_key)
    if rt.config.offload.resident:
        # and next to what is pinned already, so that the room left for streaming stays one free range
        rt._make_room()
    rt.pin_residents()
    rt.hold_residents()
    rt.hold_expert_room()
    rt.reserve_working_set()
    rt._forward_budget = rt._budget()
    if rt.config.offload.activations == "host":
        rt.activations = ActivationOffload(rt.store, rt.owner, rt.prefix, rt.host_res.alloc, rt._wrapper_memory)
    rt.install_hooks()


def _undo_attach(rt: OffloadedModule, opened: bool) -> None:
    """After a failed ``offload``: give back everything it took (the store too, if it opened it)."""
    rt._finished = True
    try:
        rt.remove_hooks()
        rt.release_all()
        _restore_weights(rt)
    finally:
        try:
            rt.close_device_cache()
            rt.close_pools()
            rt.close_reservations()
            rt.delete_scratch()
        finally:
            if opened:
                rt.store.close()


def _restore_weights(rt: OffloadedModule) -> None:
    """After a failed ``offload``: the parameters already replaced by placeholders (every unit's
    once all were written, each bank's once written) get their values back from the store."""
    if getattr(rt, "_weights_out", False):
        for u in rt.units:
            rt._unbind(u)
        rt.materialize()  # the banks too
        return
    written, rt.banks = rt.banks, [b for b in rt.banks if b.slabs]
    try:
        rt.materialize_banks()
    finally:
        rt.banks = written


def detach(model: nn.Module, *, keep: bool = False) -> nn.Module:
    """Undo :func:`offload`: ordinary in-memory parameters, no hooks, store closed if owned.

    The model's objects are deleted from the store unless ``keep`` is true; kept, they are
    made durable (offload writes them as ephemeral: deleted when the store closes). A failure
    to delete the activations of live graphs is raised once the model is detached.
    """
    rt: OffloadedModule | None = getattr(model, "_tiered", None)
    if rt is None:
        raise OffloadError(f"{type(model).__name__} is not offloaded")
    offload_life.collect()
    closing = _close_activations(rt)
    try:
        _detach_runtime(rt, keep)
    except BaseException as e:
        if closing is not None:
            e.add_note(f"deleting the offloaded activations failed too: {closing}")
        raise
    model._tiered = None
    if closing is not None:
        raise closing
    return model


def _close_activations(rt: OffloadedModule) -> BaseException | None:
    """Delete the saved tensors of graphs still alive; what went wrong, raised by ``detach`` at
    its end (raised here, it would leave a model half detached)."""
    if rt.activations is None:
        return None
    try:
        rt.activations.close()
    except BaseException as e:  # noqa: BLE001 - raised by detach once the model is detached
        return e
    return None


def _detach_runtime(rt: OffloadedModule, keep: bool) -> None:
    rt.mark_busy()  # from here other models of the store leave this model's units alone
    rt.remove_hooks()
    try:
        for u in rt.units:
            rt._unbind(u)
        for b in rt.banks:
            rt.unbind_bank(b)
        rt.release_all()
        rt.materialize()
    finally:
        try:
            rt.close_device_cache()
            rt.close_pools()
            rt.close_reservations()
        except BaseException:
            rt._finished = True
            if rt.owns_store:
                rt.store.close()
            raise
    rt._finished = True  # from here on the store handle is closed below, whatever happens
    offload_life.forget(rt)
    try:
        if keep:
            rt.keep_objects()
        else:
            rt.delete_objects()
    finally:
        if rt.owns_store:
            rt.store.close()


def offload_stats(model: nn.Module) -> dict:
    """Bytes read per tier, prefetch hit rate, stall time, peak host bytes of an offloaded model;
    with expert banks, ``experts``: hits per tier, loads per token, prediction accuracy, per expert."""
    rt: OffloadedModule | None = getattr(model, "_tiered", None)
    if rt is None:
        raise OffloadError(f"{type(model).__name__} is not offloaded")
    out = rt.report()
    if rt.activations is not None:
        out["activations"] = rt.activations.report()
    return out
