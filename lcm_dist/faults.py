"""Fault injection at named points, for the crash-consistency tests.

Production code marks the moments where a crash or a failing disk matters (between writing a
checkpoint's files and committing it, between two chunk writes of a flush, ...). Tests set

    LCM_DIST_CRASH_AT=name:n   the process kills itself with SIGKILL the n-th time it reaches
                               point ``name`` (like a power cut: no cleanup, no flush)
    LCM_DIST_FAIL_AT=name:n    the n-th time, an OSError "No space left on device" is raised

Either may end in ``@r`` (``name@r`` or ``name:n@r``): only the process of rank ``r``
(``RANK``) acts on it.

Unset (always, outside tests), a point costs one dictionary lookup.
"""

from __future__ import annotations

import errno
import os
import signal
from collections import Counter

_hits: Counter = Counter()


def _due(variable: str, name: str) -> bool:
    spec = os.environ.get(variable)
    if not spec:
        return False
    spec, _, only = spec.partition("@")
    target, _, count = spec.partition(":")
    if target != name or (only and int(only) != int(os.environ.get("RANK", "0"))):
        return False
    _hits[(variable, name)] += 1
    return _hits[(variable, name)] == int(count or 1)


def crash_point(name: str) -> None:
    """Die here, without any cleanup, if the environment asks for it."""
    if _due("LCM_DIST_CRASH_AT", name):
        os.kill(os.getpid(), signal.SIGKILL)


def fail_point(name: str) -> None:
    """Raise a full-disk error here if the environment asks for it."""
    if _due("LCM_DIST_FAIL_AT", name):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), name)
