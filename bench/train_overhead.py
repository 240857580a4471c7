"""Per-step time of lmlab's train.py stack vs a hand-written PyTorch loop vs HF Trainer + peft, on identical
padded work: what the stack itself (LightningModule, Trainer, callbacks, logger) costs per step.

Same model (SmolLM2-135M-Instruct by default), same LoRA config, the same GSM8K batches padded to one fixed
width (padded batches on every side, so padding-free rows and kept positions save nothing here; see
sft_throughput.py for those), same AdamW + warmup/cosine + clipping. Each side runs in its own fresh process
(`--side`), the three in an order shuffled per round, `--warmup` untimed then `--steps` timed steps each. A
ratio is the median of the paired per-step ratios (step k of one side against step k of the other in the same
round), printed with their quartiles and the ratio of the two sides' medians in each round; each side's median
step, quartiles and range are printed too.

    ratio lmlab_vs_torch_loop = <median of torch loop step / lmlab step, paired> (goal >= 0.9)
    ratio lmlab_vs_hf_trainer = <median of HF Trainer step / lmlab step, paired> (goal >= 1.0)

    python bench/train_overhead.py [--model smollm2_135m] [--steps 10] [--rounds 2]
    python bench/train_overhead.py --quick   # tiny_llama, two steps, one round: checks the script
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import lightning as L
import torch
from transformers import Trainer, TrainingArguments, get_cosine_schedule_with_warmup

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from helpers import bench_data, quick  # noqa: E402
from helpers.bench_config import bench_config, gsm8k_train  # noqa: E402
from helpers.sides import (  # noqa: E402
    HFTimes,
    StepTimes,
    lmlab_fit,
    paired_ratio,
    print_sides,
    report,
    run_rounds,
)

from datamodules import IGNORE_INDEX  # noqa: E402
from runtime.training import build_trainable_model  # noqa: E402

SIDES = ["lmlab", "torch_loop", "hf_trainer"]


def setup(args: argparse.Namespace, run_dir: str):
    """The config, a fresh seeded LoRA model and its datamodule, batches padded to `--max-length` tokens."""
    cfg = bench_config(
        [
            "task.source=bundled",
            f"model={args.model}",
            "method=lora",
            *gsm8k_train(),
            f"data.batch_size={args.batch_size}",
            f"data.max_length={args.max_length}",
            # twice the batches the steps take: examples longer than the width are left out
            f"data.max_train_samples={2 * args.batch_size * (args.steps + args.warmup)}",
            "data.val_size=4",
            "data.padding_free=false",
            f"trainer.max_steps={args.steps + args.warmup}",
            "+trainer.limit_val_batches=0",
        ],
        run_dir,
    )
    L.seed_everything(cfg.seed)
    model, tokenizer, datamodule, _ = build_trainable_model(cfg)
    collate = datamodule.task.collate

    padding, width = {"input_ids": tokenizer.pad_token_id, "labels": IGNORE_INDEX}, args.max_length

    def fixed_width(examples):
        return collate([{k: v + [padding[k]] * (width - len(v)) for k, v in e.items()} for e in examples])

    datamodule.task.collate = fixed_width
    datamodule.setup("fit")
    return cfg, model, datamodule


def lmlab(args: argparse.Namespace, run_dir: str) -> None:
    cfg, model, datamodule = setup(args, run_dir)
    report(args.out, step_times=lmlab_fit(cfg, model, datamodule, args.warmup))


def torch_loop(args: argparse.Namespace, run_dir: str) -> None:
    cfg, model, datamodule = setup(args, run_dir)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=cfg.optim.lr, weight_decay=0.0, fused=True)
    total = args.steps + args.warmup
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(cfg.optim.warmup_ratio * total), total)
    times = StepTimes(args.warmup)
    model.train()
    for step, batch in enumerate(datamodule.train_dataloader()):
        if step == total:
            break
        times.begin()
        model(**batch, use_cache=False).loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, cfg.trainer.gradient_clip_val)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        times.end()
    report(args.out, step_times=times.times)


def hf_trainer(args: argparse.Namespace, run_dir: str) -> None:
    cfg, model, datamodule = setup(args, run_dir)
    times = StepTimes(args.warmup)
    total = args.steps + args.warmup
    training_args = TrainingArguments(
        output_dir=run_dir,
        per_device_train_batch_size=args.batch_size,
        max_steps=total,
        learning_rate=cfg.optim.lr,
        lr_scheduler_type="cosine",
        warmup_steps=int(cfg.optim.warmup_ratio * total),
        weight_decay=0.0,
        max_grad_norm=cfg.trainer.gradient_clip_val,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=True,
        seed=cfg.seed,
    )
    Trainer(
        model=model,
        args=training_args,
        train_dataset=datamodule.datasets["train"],
        data_collator=datamodule.task.collate,
        callbacks=[HFTimes(times)],
    ).train()
    report(args.out, step_times=times.times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2_135m")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--side", choices=SIDES)
    parser.add_argument("--out")
    bench_data.add_option(parser)
    args = quick.parse(parser, model="tiny_llama", steps=2, warmup=1, rounds=1, batch_size=2, max_length=512)
    bench_data.announce("GSM8K")
    if args.side:  # one side, in this fresh process
        with tempfile.TemporaryDirectory() as run_dir:
            {"lmlab": lmlab, "torch_loop": torch_loop, "hf_trainer": hf_trainer}[args.side](args, run_dir)
        return
    shared = [
        *("--model", args.model, "--steps", str(args.steps), "--warmup", str(args.warmup)),
        *("--batch-size", str(args.batch_size), "--max-length", str(args.max_length)),
    ]
    reports = run_rounds(Path(__file__), SIDES, args.rounds, args.seed, shared)
    print_sides(reports, "overhead")
    vs_lmlab = {side: paired_ratio(reports, side, "lmlab") for side in ("torch_loop", "hf_trainer")}
    print(
        f"model={args.model} batch={args.batch_size}x{args.max_length} timed steps per round={args.steps} "
        f"threads={torch.get_num_threads()}"
    )
    print(f"ratio lmlab_vs_torch_loop = {vs_lmlab['torch_loop']:.3f} (goal >= 0.9)")
    print(f"ratio lmlab_vs_hf_trainer = {vs_lmlab['hf_trainer']:.3f} (goal >= 1.0)")


if __name__ == "__main__":
    main()
