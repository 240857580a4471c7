"""Not a benchmark: which data a bench script reads. `--data DIR` names a folder of the real data sets as
`python -m datamodules.download <name> --out DIR` writes them (DIR/gsm8k/train.jsonl and test.jsonl,
DIR/hotpotqa/...); without it a script reads the bundled sample, and says so, since its figures are then not
comparable with those bench/README.md records. The choice is passed to the processes a script starts
(LMLAB_BENCH_DATA)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ENV = "LMLAB_BENCH_DATA"


class _Remember(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None) -> None:
        if not Path(values).is_dir():
            parser.error(
                f"--data {values}: no such folder (python -m datamodules.download gsm8k --out {values})"
            )
        os.environ[ENV] = str(Path(values).resolve())
        setattr(namespace, self.dest, values)


def add_option(parser: argparse.ArgumentParser) -> None:
    """`--data DIR`: the folder of real data sets (default: the bundled samples)."""
    parser.add_argument(
        "--data",
        action=_Remember,
        default=None,
        help="folder of the real data sets, as `python -m datamodules.download gsm8k --out DIR` writes them "
        "(default: the bundled sample, not comparable with bench/README.md's figures)",
    )


def path(*parts: str) -> Path | None:
    """DIR/<parts> of `--data DIR` (an error naming it where it is missing), or None without `--data`."""
    root = os.environ.get(ENV)
    if not root:
        return None
    found = Path(root, *parts)
    if not found.exists():
        sys.exit(
            f"--data {root}: {found} is missing (python -m datamodules.download {parts[0]} --out {root})"
        )
    return found


def announce(what: str) -> None:
    """Print which data the figures come from."""
    root = os.environ.get(ENV)
    if root:
        print(f"data: {what} from {root}")
    else:
        print(f"data: the bundled {what} sample (datamodules/samples): pass --data DIR for the real data set")


def gsm8k_overrides() -> list[str]:
    """evaluate.py's overrides for GSM8K: the train and test files of `--data`, else the bundled sample."""
    gsm8k = path("gsm8k")
    if gsm8k is None:
        return ["task.source=bundled"]
    return [f"task.data_files={{train: {gsm8k / 'train.jsonl'}, test: {gsm8k / 'test.jsonl'}}}"]
