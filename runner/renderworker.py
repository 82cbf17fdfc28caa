"""A template render worker: `python -m runner.renderworker MEMORY_BYTES PARENT_PID`.

It reads one JSON request per line on stdin (`{"source": ..., "context": ...}`) and answers
one JSON line on stdout (`{"argv": [...]}` or `{"error": "..."}`). Its address space is
capped at MEMORY_BYTES, and it dies with its parent; the parent kills it when a render
takes too long (runner/renderpool.py). Answers are JSON, never pickle: a template that
got out of the sandbox could forge one, and JSON cannot carry code into the server.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import os
import resource
import signal
import sys
from typing import Any

from runner.compose import render_argv
from runner.template_env import CompositionError

PR_SET_PDEATHSIG = 1  # linux/prctl.h
ERROR_SHOWN = 1000


def _die_with_parent(parent_pid: int) -> None:
    """Linux kills this process when the server goes, even by SIGKILL (no orphan renders)."""
    # Not Linux: no prctl, and stdin's EOF still ends the loop in `main`.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent went before prctl took effect
        sys.exit(0)


def answer(request: Any, memory_bytes: int) -> dict[str, Any]:
    """Render one request; every failure is an `error` answer, never an exception."""
    if not isinstance(request, dict) or not isinstance(request.get("source"), str):
        return {"error": "malformed render request"}
    context = request.get("context")
    if not isinstance(context, dict):
        return {"error": "malformed render request"}
    try:
        return {"argv": render_argv(request["source"], context)}
    except CompositionError as exc:
        return {"error": str(exc)[:ERROR_SHOWN]}
    except MemoryError:
        gc.collect()
        return {
            "error": f"the template used more than {memory_bytes // (1024 * 1024)} MiB to render"
        }
    except RecursionError:
        return {"error": "the template nests too deeply to render"}
    except Exception as exc:  # a filter's own error: the template's problem, not the server's
        return {"error": f"template failed to render: {exc}"[:ERROR_SHOWN]}


def main() -> None:
    """Serve render requests on stdin until it closes."""
    memory_bytes, parent_pid = int(sys.argv[1]), int(sys.argv[2])
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server decides when workers stop
    _die_with_parent(parent_pid)
    # After the imports (done above): the limit is for what a template allocates.
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    out = sys.stdout.buffer
    out.write(b'{"ready": true}\n')
    out.flush()
    for line in sys.stdin.buffer:
        try:
            request = json.loads(line)
        except ValueError:
            request = None
        # ASCII JSON: a lone surrogate in a value travels as an escape, not as bad UTF-8.
        out.write(json.dumps(answer(request, memory_bytes)).encode("ascii") + b"\n")
        out.flush()


if __name__ == "__main__":
    main()
