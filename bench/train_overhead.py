"""Optimizer steps/s of lmlab's train.py stack vs a hand-written PyTorch loop vs HF Trainer + peft.

Same model (SmolLM2-135M-Instruct by default), same LoRA config, same tokenized GSM8K batches padded to
one fixed width, same AdamW + warmup/cosine + clipping; each side trains `--steps` steps after
`--warmup` untimed ones, in rounds that alternate the three sides. Prints the best steps/s of each and:
    ratio lmlab_vs_torch_loop = <x> (goal >= 0.9)
    ratio lmlab_vs_hf_trainer = <x> (goal >= 1.0)

    python bench/train_overhead.py [--model smollm2_135m] [--steps 12] [--rounds 2]
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

from helpers.timing import HFClock, StepClock, bench_config, lmlab_steps_per_second  # noqa: E402

from datamodules import IGNORE_INDEX  # noqa: E402
from runtime.training import build_trainable_model  # noqa: E402

SHARED_GSM8K = ROOT.parent / "shared" / "data" / "gsm8k" / "train.jsonl"


def config(args: argparse.Namespace, run_dir: str):
    data = (
        [f"task.data_files={{train: {SHARED_GSM8K}, test: {SHARED_GSM8K}}}"] if SHARED_GSM8K.exists() else []
    )
    return bench_config(
        [
            "task.source=bundled",
            f"model={args.model}",
            "method=lora",
            *data,
            f"data.batch_size={args.batch_size}",
            f"data.max_length={args.max_length}",
            f"data.max_train_samples={args.batch_size * (args.steps + args.warmup)}",
            "data.val_size=4",
            f"trainer.max_steps={args.steps + args.warmup}",
            "+trainer.limit_val_batches=0",
        ],
        run_dir,
    )


def setup(cfg, width: int):
    """Fresh seeded LoRA model and its datamodule, batches padded to `width` tokens."""
    L.seed_everything(cfg.seed)
    model, tokenizer, datamodule, _ = build_trainable_model(cfg)
    collate = datamodule.collate

    def fixed_width(examples):
        padding = {"input_ids": tokenizer.pad_token_id, "labels": IGNORE_INDEX}
        return collate([{k: v + [padding[k]] * (width - len(v)) for k, v in e.items()} for e in examples])

    datamodule.collate = fixed_width
    datamodule.setup("fit")
    return model, datamodule


def run_lmlab(cfg, args) -> float:
    model, datamodule = setup(cfg, args.max_length)
    return lmlab_steps_per_second(cfg, model, datamodule, args.warmup)


def run_torch_loop(cfg, args) -> float:
    model, datamodule = setup(cfg, args.max_length)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=cfg.optim.lr, weight_decay=0.0)
    total = args.steps + args.warmup
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(cfg.optim.warmup_ratio * total), total)
    clock = StepClock(args.warmup)
    model.train()
    for step, batch in enumerate(datamodule.train_dataloader()):
        clock.step_begin(step)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        clock.step_end(step)
    return clock.rate()


def run_hf_trainer(cfg, args, output_dir: str) -> float:
    model, datamodule = setup(cfg, args.max_length)
    clock = StepClock(args.warmup)
    training_args = TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=args.batch_size,
        max_steps=args.steps + args.warmup,
        learning_rate=cfg.optim.lr,
        lr_scheduler_type="cosine",
        warmup_steps=int(cfg.optim.warmup_ratio * (args.steps + args.warmup)),
        weight_decay=0.0,
        max_grad_norm=1.0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=True,
        seed=cfg.seed,
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=datamodule.datasets["train"],
        data_collator=datamodule.collate,
        callbacks=[HFClock(clock)],
    )
    trainer.train()
    return clock.rate()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2_135m")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=256)
    args = parser.parse_args()
    best = {"lmlab": 0.0, "torch_loop": 0.0, "hf_trainer": 0.0}
    with tempfile.TemporaryDirectory() as tmp:
        cfg = config(args, tmp)
        for round_number in range(args.rounds):
            rates = {
                "lmlab": run_lmlab(cfg, args),
                "torch_loop": run_torch_loop(cfg, args),
                "hf_trainer": run_hf_trainer(cfg, args, tmp),
            }
            print(f"round {round_number}: " + ", ".join(f"{k} {v:.3f} steps/s" for k, v in rates.items()))
            best = {k: max(best[k], rates[k]) for k in best}
    print(
        f"model={args.model} batch={args.batch_size}x{args.max_length} steps={args.steps} "
        f"threads={torch.get_num_threads()}"
    )
    for name, rate in best.items():
        print(f"{name}: {rate:.3f} steps/s")
    print(f"ratio lmlab_vs_torch_loop = {best['lmlab'] / best['torch_loop']:.3f} (goal >= 0.9)")
    print(f"ratio lmlab_vs_hf_trainer = {best['lmlab'] / best['hf_trainer']:.3f} (goal >= 1.0)")


if __name__ == "__main__":
    main()
