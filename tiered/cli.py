"""Moved to :mod:`tiered.tools.cli`; this name stays for the callers that import it from here
(it is that very module, so patching it patches the tool)."""

import sys

from .tools import cli as _moved

sys.modules[__name__] = _moved
