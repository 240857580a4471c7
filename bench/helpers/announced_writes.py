"""train.py whose checkpoint writes are slowed and announced on stdout, for bench/fault_tolerance.py.

Each write prints `WRITING <path>`, writes half the bytes, waits `LMLAB_BENCH_WRITE_SECONDS` (default 0.5),
writes the rest and prints `WROTE <path>` once the file is in place, so the bench can kill a run in the
middle of a write. Arguments are train.py's.
"""

from __future__ import annotations

import io
import os
import runpy
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import runtime.checkpointing as checkpointing  # noqa: E402

PAUSE = float(os.environ.get("LMLAB_BENCH_WRITE_SECONDS", "0.5"))
atomic_write = checkpointing.write_atomically


def announced_write(path, write) -> None:  # noqa: ANN001
    def slow(handle) -> None:  # noqa: ANN001
        buffer = io.BytesIO()
        write(buffer)
        data = buffer.getvalue()
        print(f"WRITING {path}", flush=True)
        handle.write(data[: len(data) // 2])
        handle.flush()
        time.sleep(PAUSE)
        handle.write(data[len(data) // 2 :])

    atomic_write(path, slow)
    print(f"WROTE {path}", flush=True)


checkpointing.write_atomically = announced_write

if __name__ == "__main__":
    sys.argv[0] = str(ROOT / "train.py")
    runpy.run_path(sys.argv[0], run_name="__main__")
