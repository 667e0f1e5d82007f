"""Access traces: one event type, one versioned file format, importers and a recorder.

The store emits one :class:`AccessEvent` per access (and per declared plan) to its
listeners; the recorder (:class:`TraceRecorder`) writes them in the trace format
(:mod:`traces.format`), and the importers turn public traces (MQSim, ARC,
MSR Cambridge, Mooncake) into the same columns, so policies learn from and
are replayed on one format. Never imports io_engine, tiered or allocators.
"""

from .errors import TraceFormatError
from .events import AccessEvent
from .format import PlanDecl, Trace, read_text, read_trace, write_text, write_trace
from .importers import FORMATS, detect_format, import_arc, import_msr, import_mqsim, load
from .mooncake import MooncakeRequest, import_mooncake, read_requests
from .recorder import TraceRecorder

__all__ = [
    "FORMATS", "AccessEvent", "MooncakeRequest", "PlanDecl", "Trace", "TraceFormatError", "TraceRecorder",
    "detect_format", "import_arc", "import_mooncake", "import_msr", "import_mqsim", "load",
    "read_requests", "read_text", "read_trace", "write_text", "write_trace",
]
