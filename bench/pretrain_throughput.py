"""Pre-training tokens/s through train.py vs a minimal hand-written loop, and the MFU estimate.

Same from-scratch model (experiment ablation/baseline by default: Llama 384/6/12, SmolLM tokenizer),
same packed blocks, same AdamW + warmup/cosine + clipping. Steady-state rates after `--warmup` steps,
rounds alternating the two sides; best of each. MFU = 6 * parameters * tokens/s / peak FLOP/s, with the
peak from Lightning's table on a known GPU, else a measured float32 matmul rate on this CPU.
    ratio lmlab_vs_torch_loop_tokens = <x> (goal >= 0.9)

    python bench/pretrain_throughput.py [--experiment ablation/baseline] [--steps 6] [--rounds 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.utilities.throughput import get_available_flops
from transformers import get_cosine_schedule_with_warmup

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from helpers.timing import StepClock, bench_config, lmlab_steps_per_second  # noqa: E402

from runtime.training import build_trainable_model  # noqa: E402

SHARED_TRAIN = ROOT.parent / "shared" / "data" / "gsm8k" / "train.jsonl"


def config(args: argparse.Namespace, run_dir: str):
    source = [f"task.data_files={SHARED_TRAIN}"] if SHARED_TRAIN.exists() else ["task.source=bundled"]
    return bench_config(
        [
            f"experiment={args.experiment}",
            *source,
            "task.text_fields=[question,answer]",
            "trainer=cpu",
            f"trainer.max_steps={args.steps + args.warmup}",
            "trainer.limit_val_batches=0",
            "trainer.precision=32-true",
        ],
        run_dir,
    )


def setup(cfg):
    L.seed_everything(cfg.seed)
    model, tokenizer, datamodule, _ = build_trainable_model(cfg)
    datamodule.setup("fit")
    return model, datamodule


def run_lmlab(cfg, args) -> float:
    model, datamodule = setup(cfg)
    return lmlab_steps_per_second(cfg, model, datamodule, args.warmup)


def run_torch_loop(cfg, args) -> float:
    model, datamodule = setup(cfg)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.optim.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=cfg.optim.lr,
        betas=tuple(cfg.optim.betas),
    )
    total = args.steps + args.warmup
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(cfg.optim.warmup_ratio * total), total)
    clock = StepClock(args.warmup)
    model.train()
    for step, batch in enumerate(datamodule.train_dataloader()):
        if step == total:
            break
        clock.step_begin(step)
        model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        clock.step_end(step)
    return clock.rate()


def peak_flops() -> tuple[float, str]:
    """Peak FLOP/s of this device: Lightning's table for a known GPU, else a measured CPU matmul rate."""
    if torch.cuda.is_available():
        flops = get_available_flops(torch.device("cuda"), torch.bfloat16)
        if flops:
            return float(flops), f"{torch.cuda.get_device_name()} bf16 (table)"
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    start, repeats = time.perf_counter(), 10
    for _ in range(repeats):
        a @ b
    return 2 * 2048**3 * repeats / (
        time.perf_counter() - start
    ), f"CPU fp32 matmul, measured, {torch.get_num_threads()} threads"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--experiment", default="ablation/baseline")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    best = {"lmlab": 0.0, "torch_loop": 0.0}
    with tempfile.TemporaryDirectory() as tmp:
        cfg = config(args, tmp)
        tokens_per_step = cfg.data.batch_size * cfg.data.max_length
        for round_number in range(args.rounds):
            rates = {"lmlab": run_lmlab(cfg, args), "torch_loop": run_torch_loop(cfg, args)}
            print(
                f"round {round_number}: "
                + ", ".join(f"{k} {v * tokens_per_step:.0f} tokens/s" for k, v in rates.items())
            )
            best = {k: max(best[k], rates[k]) for k in best}
        parameters = sum(p.numel() for p in setup(cfg)[0].parameters())
    peak, where = peak_flops()
    tokens = best["lmlab"] * tokens_per_step
    print(
        f"experiment={args.experiment} params={parameters / 1e6:.1f}M "
        f"batch={cfg.data.batch_size}x{cfg.data.max_length}"
    )
    print(f"lmlab: {tokens:.0f} tokens/s; torch loop: {best['torch_loop'] * tokens_per_step:.0f} tokens/s")
    print(f"MFU estimate: {6 * parameters * tokens / peak:.3f} of {peak / 1e12:.3f} TFLOP/s ({where})")
    print(f"ratio lmlab_vs_torch_loop_tokens = {best['lmlab'] / best['torch_loop']:.3f} (goal >= 0.9)")


if __name__ == "__main__":
    main()
