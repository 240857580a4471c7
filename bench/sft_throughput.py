"""Supervised fine-tuning step time: lmlab (padding-free and padded) against HF Trainer, TRL's SFTTrainer
(with and without `padding_free`) and a hand-written PyTorch loop, on the same batches in the same order.

Two parts: LoRA (r=8 on every linear map of the blocks) on SmolLM2-135M-Instruct, and full fine-tuning of a
small from-scratch Llama (model=pretrain_small: 8 layers of 256, SmolLM tokenizer). GSM8K train examples at
their natural lengths (prompt masked, loss on the solution), AdamW, no clipping, cosine schedule. Every side
runs in its own fresh process (`--side`), the sides in an order shuffled per round, each `--warmup` untimed
steps then `--steps` timed ones (20 timed steps per side at the defaults); a step is timed from its start to
the end of its optimiser step. A ratio is the median of the paired per-step ratios (step k of one side against
step k of the other in the same round: the same batch), printed with their quartiles and the ratio of the two
sides' medians in each round; each side's median step, quartiles and range are printed too. HF Trainer pads
each batch (DataCollatorForSeq2Seq); TRL gets the same tokens and labels; the torch loop trains on lmlab's
packed rows with the model's own loss (full logits, the dense packed mask) and fused AdamW.

    ratio padding_free_vs_hf_trainer = <median of HF Trainer step / lmlab padding-free step> (goal >= 1.5)
    ratio padding_free_vs_trl = <the faster TRL side / lmlab padding-free, likewise> (goal >= 1.3)
    ratio padded_vs_hf_trainer = <HF Trainer / lmlab padded> (goal >= 1.05)
    ratio lmlab_vs_torch_loop = <torch loop / lmlab padding-free> (goal >= 1.0)
    ratio padding_free_loss_match = <share of the first 6 batches whose loss packed equals padded to 1e-5,
                                     same weights> (goal >= 1.0)
    ratio padded_vs_padding_free = <lmlab padded / lmlab padding-free> (goal >= 0.95 x the FLOP ceiling:
                                     the median over the timed steps of a step's padded FLOPs over its
                                     padding-free FLOPs)
    ratio padding_free_share_of_ceiling = <median over the paired steps of (padded / padding-free time) /
                                     (padded / padding-free FLOPs) of that step> (goal >= 0.95)

and the same with a `full_` prefix for full fine-tuning.

    python bench/sft_throughput.py [--steps 10] [--warmup 1] [--rounds 2] [--batch 2] [--parts lora,full]
                                   [--sides padding_free,padded]   # a subset of the sides (ratios of those)
    python bench/sft_throughput.py --quick   # tiny models, two steps, one round: checks the script
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from helpers import bench_data, quick  # noqa: E402
from helpers.sft_sides import SIDES  # noqa: E402
from helpers.sides import paired_ratio, paired_ratios, print_sides, run_rounds, summary  # noqa: E402

PARTS = {"lora": "", "full": "full_"}
TIMED = ["padding_free", "padded", "hf_trainer", "trl", "trl_padding_free", "torch_loop"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--parts", default=",".join(PARTS), help="which parts to run: lora, full or both")
    parser.add_argument("--sides", default=",".join(TIMED), help="which timed sides to run (default: all)")
    parser.add_argument("--part", choices=list(PARTS))
    parser.add_argument("--side", choices=[*TIMED, "loss_match"])
    parser.add_argument("--out")
    bench_data.add_option(parser)
    args = quick.parse(parser, steps=2, warmup=1, rounds=1)
    bench_data.announce("GSM8K")
    if args.side:  # one side, in this fresh process
        with tempfile.TemporaryDirectory() as run_dir:
            SIDES[args.side](args, run_dir)
        return
    shared = ["--steps", str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch)]
    ratios = []
    for part in args.parts.split(","):
        prefix = PARTS[part]
        part_args = [*shared, "--part", part]
        sides = args.sides.split(",")
        reports = run_rounds(Path(__file__), sides, args.rounds, args.seed, part_args)
        match = run_rounds(Path(__file__), ["loss_match"], 1, args.seed, part_args)["loss_match"][0]
        print_sides(reports, part)
        print(f"{part}: {match['description']}")
        vs_fast = {
            side: paired_ratio(reports, side, "padding_free")
            for side in ("hf_trainer", "padded", "torch_loop", "trl", "trl_padding_free")
            if side in reports and "padding_free" in reports
        }
        flops = match["flops"]  # per timed step, each side
        shares = ", ".join(
            f"{side} {sum(steps) / sum(flops['padding_free']):.3f}" for side, steps in flops.items()
        )
        print(f"{part}: FLOPs of the timed steps against lmlab padding-free's (the most that doing only")
        print(f"  the useful work can gain): {shares}")
        ceiling, share = flop_ceiling(reports, flops, part)
        trl_sides = [side for side in ("trl", "trl_padding_free") if side in vs_fast]
        # nan where the TRL sides ran but TRL is not installed (each said why above)
        trl = min((vs_fast[s] for s in trl_sides if vs_fast[s]), default=math.nan if trl_sides else None)
        wanted = [
            (f"{prefix}padding_free_vs_hf_trainer", vs_fast.get("hf_trainer"), ">=", 1.5),
            (f"{prefix}padding_free_vs_trl", trl, ">=", 1.3),
            (f"{prefix}lmlab_vs_torch_loop", vs_fast.get("torch_loop"), ">=", 1.0),
            (f"{prefix}padding_free_loss_match", match["share"], ">=", 1.0),
            (f"{prefix}padded_vs_padding_free", vs_fast.get("padded"), ">=", round(0.95 * ceiling, 3)),
            (f"{prefix}padding_free_share_of_ceiling", share, ">=", 0.95),
        ]
        if {"hf_trainer", "padded"} <= set(reports):
            wanted.append(
                (f"{prefix}padded_vs_hf_trainer", paired_ratio(reports, "hf_trainer", "padded"), ">=", 1.05)
            )
        ratios += [ratio for ratio in wanted if ratio[1] is not None]
    for name, value, direction, goal in ratios:
        print(f"ratio {name} = {value:.3f} (goal {direction} {goal})")


def flop_ceiling(
    reports: dict[str, list], flops: dict[str, list[int]], part: str
) -> tuple[float, float | None]:
    """(The median over the timed steps of padded / padding-free FLOPs, the median over the paired steps of
    each step's time ratio over its FLOP ratio: the share of its ceiling the padding-free step earns; None
    unless both lmlab sides ran). A step's ratio is set against its own batch's ceiling: batches differ in
    padding, and a median of per-step ratios is not the ratio of the summed FLOPs."""
    ceilings = [padded / free for padded, free in zip(flops["padded"], flops["padding_free"], strict=True)]
    median, first, third = summary(ceilings)
    summed = sum(flops["padded"]) / sum(flops["padding_free"])
    print(
        f"{part}: FLOP ceiling padded / padding-free per step: median {median:.3f} (quartiles "
        f"{first:.3f}..{third:.3f}; summed over the steps {summed:.3f})"
    )
    if "padded" not in reports or "padding_free" not in reports:
        return median, None
    times = paired_ratios(reports, "padded", "padding_free")  # rounds one after another, steps in order
    shares = [ratio / ceilings[step % len(ceilings)] for step, ratio in enumerate(times)]
    share, first, third = summary(shares)
    print(
        f"  padding-free's share of its ceiling, paired per step: median {share:.3f} (quartiles "
        f"{first:.3f}..{third:.3f})"
    )
    return median, share


if __name__ == "__main__":
    main()
