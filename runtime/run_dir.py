"""Run directories that two runs never share.

`${unique_dir:<path>}` (used by every entrypoint's `hydra.run.dir` and `hydra.sweep.dir`) creates `<path>`
with an exclusive create and returns it; when another run created it first (two terminals, a job array
started in the same microsecond), it takes `<path>-1`, `<path>-2`, ... instead. The resolver's value is
cached per config, so one run resolves to one directory however often Hydra reads it.
"""

from __future__ import annotations

import os
from pathlib import Path


def create_unique_dir(path: str) -> str:
    """Create `path`, or the first free `path-<n>`, exclusively; return the directory created."""
    base = Path(path)
    base.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(10_000):
        candidate = base if attempt == 0 else base.with_name(f"{base.name}-{attempt}")
        try:
            os.mkdir(candidate)
        except FileExistsError:
            continue
        return str(candidate)
    raise FileExistsError(
        f"{base}: 10,000 run dirs of this name exist; clean up outputs/ or change hydra.run.dir"
    )
