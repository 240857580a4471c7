"""What resumable evaluation costs: appending every finished item to the run dir (evaluation/journal.py: a
JSON line, flushed and fsynced) against the evaluation it protects.

Two sides, each in a fresh process per round, in a shuffled order: `journal` (evaluate.py as it runs, each
append timed) and `no_journal` (the same evaluation with appends that do nothing). `--model`
(SmolLM2-135M-Instruct), greedy, GSM8K (the bundled sample's `--problems` test problems, or `--data DIR`'s
DIR/gsm8k), `--max-new-tokens`. Prints per round the summed append time, the evaluation's wall time and both
sides' wall times, then (medians over rounds, with the range)

    ratio resume_bookkeeping_vs_eval = <append seconds / evaluation seconds> (goal <= 0.01)

and, for scale, the journal side's wall time over the no-journal side's (rounds differ by more than the
appends cost on a shared machine, so that figure bounds the cost loosely).

    python bench/eval_resume.py [--problems 8] [--max-new-tokens 128] [--rounds 3] [--data DIR]
    python bench/eval_resume.py --quick   # tiny_llama, two problems, one round: checks the script
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from helpers import bench_data, quick  # noqa: E402
from helpers.sides import report, run_rounds  # noqa: E402

SIDES = ["journal", "no_journal"]


def side(name: str, out: str, args: argparse.Namespace) -> None:
    """Run one evaluation in this process and report its wall time and its appends' time."""
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from evaluation import evaluate, journal

    appends: list[float] = []
    record = journal.Journal.__call__

    def timed(self, item, output) -> None:
        start = time.perf_counter()
        if name == "journal":
            record(self, item, output)
        appends.append(time.perf_counter() - start)

    journal.Journal.__call__ = timed  # the class every evaluation process records with
    data = bench_data.gsm8k_overrides()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "evaluate",
            overrides=[
                f"model={args.model}",
                *data,
                f"limit={args.problems}",
                f"generation.max_new_tokens={args.max_new_tokens}",
                "print_config=false",
                "resume=null",
            ],
        )
    with tempfile.TemporaryDirectory() as run_dir, open_dict(cfg):
        cfg.paths.output_dir = run_dir
        start = time.perf_counter()
        evaluate.run(cfg)
        wall = time.perf_counter() - start
    report(out, wall=wall, appends=appends, step_times=[wall])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2_135m")
    parser.add_argument("--problems", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    bench_data.add_option(parser)
    parser.add_argument("--side", choices=SIDES)
    parser.add_argument("--out")
    args = quick.parse(parser, model="tiny_llama", problems=2, max_new_tokens=4, rounds=1)
    if args.side:
        side(args.side, args.out, args)
        return
    bench_data.announce("GSM8K")
    passed = [
        "--model",
        args.model,
        "--problems",
        str(args.problems),
        "--max-new-tokens",
        str(args.max_new_tokens),
    ]
    reports = run_rounds(Path(__file__), SIDES, args.rounds, seed=0, args=passed)
    bookkeeping, walls = [], []
    for number, (kept, skipped) in enumerate(zip(reports["journal"], reports["no_journal"], strict=True)):
        spent = sum(kept["appends"])
        bookkeeping.append(spent / kept["wall"])
        walls.append(kept["wall"] / skipped["wall"])
        print(
            f"round {number}: {len(kept['appends'])} appends {spent * 1000:.2f} ms in all (median "
            f"{statistics.median(kept['appends']) * 1000:.3f} ms); evaluation {kept['wall']:.1f} s with the "
            f"journal, {skipped['wall']:.1f} s without"
        )
    for name, values in (
        ("bookkeeping / evaluation", bookkeeping),
        ("journal wall / no-journal wall", walls),
    ):
        print(f"{name}: median {statistics.median(values):.5f}, range {min(values):.5f}..{max(values):.5f}")
    print(f"ratio resume_bookkeeping_vs_eval = {statistics.median(bookkeeping):.5f} (goal <= 0.01)")


if __name__ == "__main__":
    main()
