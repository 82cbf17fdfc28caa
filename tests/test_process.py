"""Children started by runner.process.Child: their pipes are read without keeping the
event loop from everything else."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

from runner.process import Child, leader_exit, pipe_chunks

CHATTY = (
    "import os, time\n"
    "end = time.monotonic() + 1.5\n"
    "while time.monotonic() < end:\n"
    "    os.write(1, b'x\\n')\n"
)


async def test_a_child_writing_without_a_pause_does_not_stall_the_loop(tmp_path: Path) -> None:
    # Many small writes keep the pipe readable but never fill a chunk: the reader must
    # still let the loop run between reads (the loop serves requests, leases, timeouts).
    child = Child.start([sys.executable, "-c", CHATTY], {}, str(tmp_path))
    gaps: list[float] = []
    done = asyncio.Event()

    async def ticker() -> None:
        last = time.monotonic()
        while not done.is_set():
            await asyncio.sleep(0.001)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    ticking = asyncio.create_task(ticker())
    received = 0
    async for chunk in pipe_chunks(child.stdout, 64 * 1024):
        received += len(chunk)
        sum(range(5_000))  # what a reader does with a chunk (split, redact ...) takes time
    done.set()
    await ticking
    child.stderr.close()
    assert await leader_exit(child) == 0
    assert received > 10_000
    assert len(gaps) > 100
    assert max(gaps) < 0.5  # without a turn between reads: the whole 1.5 s at once
