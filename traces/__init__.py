"""Access traces: the event type every workload's accesses are expressed in.

The store emits one :class:`AccessEvent` per access to its listeners; the
recorder and the importers of public trace formats produce the same events,
so policies learn from and are replayed on one format.
"""

from .events import AccessEvent

__all__ = ["AccessEvent"]
