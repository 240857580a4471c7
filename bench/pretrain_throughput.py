"""Pre-training step time through train.py against a minimal hand-written loop, and the MFU estimate.

Same from-scratch model (experiment ablation/baseline by default: Llama 384/6/12, SmolLM tokenizer), same
packed blocks in the same order, same AdamW + warmup/cosine + clipping. Each side runs in its own fresh
process (`--side`), the two in an order shuffled per round, `--warmup` untimed then `--steps` timed steps
each. The ratio is the median of the paired per-step ratios (step k of one side against step k of the other in
the same round: the same block), printed with their quartiles and the ratio of the sides' medians in each
round; each side's median step, quartiles and range are printed too. MFU is the FLOPs of a batch
(modeling/flops.py: the count the ThroughputMonitor logs) per median step over the device's peak: Lightning's
table on a known GPU, else the float32 matmul rate measured here.

    ratio lmlab_vs_torch_loop = <median of torch loop step / train.py step, paired> (goal >= 1.0)

python bench/pretrain_throughput.py [--experiment ablation/baseline] [--steps 10] [--rounds 2] [--batch 2]
python bench/pretrain_throughput.py --quick   # ablation_tiny, two steps, one round: checks the script"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.utilities.throughput import get_available_flops
from transformers import get_cosine_schedule_with_warmup

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from helpers import bench_data, quick  # noqa: E402
from helpers.bench_config import bench_config  # noqa: E402
from helpers.sides import StepTimes, lmlab_fit, paired_ratio, print_sides, report, run_rounds  # noqa: E402

from modeling.flops import batch_flops, flop_counts, measured_peak_flops  # noqa: E402
from runtime.training import build_trainable_model  # noqa: E402


def config(args: argparse.Namespace, run_dir: str):
    source = (
        [f"task.data_files={train}"]
        if (train := bench_data.path("gsm8k", "train.jsonl"))
        else ["task.source=bundled"]
    )
    return bench_config(
        [
            f"experiment={args.experiment}",
            *source,
            "task.text_fields=[question,answer]",
            "trainer=cpu" if not torch.cuda.is_available() else "trainer=default",
            f"data.batch_size={args.batch}",
            f"trainer.max_steps={args.steps + args.warmup}",
            "trainer.limit_val_batches=0",
            "trainer.precision=32-true",
        ],
        run_dir,
    )


def setup(args: argparse.Namespace, run_dir: str):
    cfg = config(args, run_dir)
    L.seed_everything(cfg.seed)
    model, _, datamodule, _ = build_trainable_model(cfg)
    datamodule.setup("fit")
    return cfg, model, datamodule


def lmlab(args: argparse.Namespace, run_dir: str) -> None:
    cfg, model, datamodule = setup(args, run_dir)
    counts = flop_counts(model)
    step_times = lmlab_fit(cfg, model, datamodule, args.warmup)
    block = cfg.data.max_length
    flops = batch_flops(counts, [block] * args.batch, args.batch * (block - 1), backward=True)
    report(
        args.out, step_times=step_times, flops=flops, parameters=sum(p.numel() for p in model.parameters())
    )


def torch_loop(args: argparse.Namespace, run_dir: str) -> None:
    cfg, model, datamodule = setup(args, run_dir)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.optim.weight_decay},
        {"params": no_decay, "weight_decay": 0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), fused=True)
    total = args.steps + args.warmup
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(cfg.optim.warmup_ratio * total), total)
    times = StepTimes(args.warmup)
    model.train()
    for step, batch in enumerate(datamodule.train_dataloader()):
        if step == total:
            break
        times.begin()
        model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.trainer.gradient_clip_val)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        times.end()
    report(args.out, step_times=times.times)


def peak_flops() -> tuple[float, str]:
    """Peak FLOP/s of this device: Lightning's table for a known GPU, else a measured float32 matmul rate."""
    if torch.cuda.is_available():
        flops = get_available_flops(torch.device("cuda"), torch.float32)
        if flops:
            return float(flops), f"{torch.cuda.get_device_name()} fp32 (table)"
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    size = 256 if quick.on() else 2048
    return measured_peak_flops(device, size, 10), f"{device.type} fp32 matmul, measured"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--experiment", default="ablation/baseline")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--side", choices=["lmlab", "torch_loop"])
    parser.add_argument("--out")
    bench_data.add_option(parser)
    args = quick.parse(parser, experiment="ablation_tiny/baseline", steps=2, warmup=1, rounds=1)
    bench_data.announce("GSM8K")
    if args.side:
        with tempfile.TemporaryDirectory() as run_dir:
            {"lmlab": lmlab, "torch_loop": torch_loop}[args.side](args, run_dir)
        return
    sides = ["lmlab", "torch_loop"]
    shared = ["--experiment", args.experiment, "--steps", str(args.steps), "--warmup", str(args.warmup)]
    reports = run_rounds(Path(__file__), sides, args.rounds, args.seed, [*shared, "--batch", str(args.batch)])
    medians = print_sides(reports, "pre-training")
    ratio = paired_ratio(reports, "torch_loop", "lmlab")
    first = reports["lmlab"][0]
    peak, where = peak_flops()
    print(
        f"experiment={args.experiment} params={first['parameters'] / 1e6:.1f}M batch={args.batch}, "
        f"threads {torch.get_num_threads()}"
    )
    mfu = first["flops"] / medians["lmlab"] / peak
    print(f"MFU estimate: {mfu:.3f} of {peak / 1e12:.3f} TFLOP/s ({where})")
    print(f"ratio lmlab_vs_torch_loop = {ratio:.3f} (goal >= 1.0)")


if __name__ == "__main__":
    main()
