"""Learning placement/migration agents (Harmonia-style) for :mod:`policies`.

Loaded lazily by the registry through
:func:`make_policy` (registered as ``"rl"``).
"""

from __future__ import annotations

from .agents import AgentOptions, HarmoniaAgents
from .features import FEATURE_NAMES, N_FEATURES


def make_policy(**options) -> HarmoniaAgents:
    """The ``rl`` policy: ``load=PATH`` starts from saved agents (``PATH``.safetensors +
    ``PATH``.json), other keywords are :class:`AgentOptions` fields."""
    path = options.pop("load", None)
    if path is not None:
        return HarmoniaAgents.load(path, **options)
    return HarmoniaAgents(AgentOptions.from_dict(options))


__all__ = ["AgentOptions", "FEATURE_NAMES", "HarmoniaAgents", "N_FEATURES", "make_policy"]
