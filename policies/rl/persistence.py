"""Saving and loading trained agents: both networks in ``PATH``.safetensors, options, feature
names, horizons and training state in ``PATH``.json (no pickle)."""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING

from .features import FEATURE_NAMES
from .options import AgentOptions
from .predictor import HORIZONS
from .qnet import load_safetensors_json, save_safetensors_json

if TYPE_CHECKING:
    from .agents import HarmoniaAgents

FORMAT = "tiered-rl-agents"
FORMAT_VERSION = 2
AGENT_NAMES = ("placement", "migration")


class Persistence:
    """Mixin of :class:`~.agents.HarmoniaAgents`: :meth:`save` and :meth:`load`."""

    def save(self, path) -> None:
        """``path``.safetensors (both networks) + ``path``.json (options, features, format)."""
        tensors = {}
        for a, name in enumerate(AGENT_NAMES):
            tensors.update(self.agents[a].tensors(name))
        meta = {
            "format": FORMAT, "version": FORMAT_VERSION, "options": asdict(self.opt),
            "features": list(FEATURE_NAMES), "horizons": list(HORIZONS), "ready": list(self.ready),
            "train_steps": [ag.steps for ag in self.agents],
        }
        save_safetensors_json(path, tensors, meta)

    @classmethod
    def load(cls, path, **overrides) -> "HarmoniaAgents":
        """Agents saved by :meth:`save`; ``overrides`` replace saved options (e.g. ``learn=False``)."""
        tensors, meta = load_safetensors_json(path)
        src = str(path)
        if meta.get("format") != FORMAT:
            raise ValueError(f"{src}.json: format is {meta.get('format')!r}, expected {FORMAT!r}")
        if meta.get("version") != FORMAT_VERSION:
            raise ValueError(f"{src}.json: version {meta.get('version')!r}, this code reads {FORMAT_VERSION}")
        if meta.get("features") != list(FEATURE_NAMES):
            raise ValueError(f"{src}.json: features {meta.get('features')!r} differ from {list(FEATURE_NAMES)}")
        if meta.get("horizons") != list(HORIZONS):
            raise ValueError(f"{src}.json: horizons {meta.get('horizons')!r} differ from {list(HORIZONS)}")
        opts = dict(meta.get("options", {}))
        opts.update(overrides)
        self = cls(AgentOptions.from_dict(opts, f"{src}.json options"))
        for a, name in enumerate(AGENT_NAMES):
            self.agents[a].load_tensors(tensors, name, f"{src}.safetensors")
        ready = meta.get("ready", [True, True])
        self.ready = [bool(r) for r in ready]
        for ag, steps in zip(self.agents, meta.get("train_steps", [0, 0])):
            ag.steps = int(steps)  # (the Adam moments are not saved: training resumes with fresh ones)
        return self
