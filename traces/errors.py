"""The one error type every trace reader raises: where the input is bad and what was expected."""

from __future__ import annotations

import os


class TraceFormatError(ValueError):
    """Malformed trace input. ``str()`` reads ``file:line: problem (expected ...)``."""

    def __init__(self, path: str | os.PathLike | None, line: int | None, problem: str, expected: str | None = None):
        self.path = None if path is None else os.fspath(path)
        self.line = line
        self.problem = problem
        self.expected = expected
        where = self.path or "<trace>"
        if line is not None:
            where += f":{line}"
        msg = f"{where}: {problem}"
        if expected:
            msg += f" (expected {expected})"
        super().__init__(msg)
