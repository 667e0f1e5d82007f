"""The tooling around the library: the ``tiered`` command line (``cli``), its store
commands (``store_cli``), the demo, the machine probe, the engine benchmark's front end
(``bench_io``; the measuring is :mod:`io_engine.bench`) and the trace replay (``replay``); what
every command shares (``args``: errors as one line, argument types).

Tools are clients of the store like any workload: what they hold in one is charged to
owner ``tools`` (``replay`` for the replay).
"""

TOOLS_OWNER = "tools"
REPLAY_OWNER = "replay"
