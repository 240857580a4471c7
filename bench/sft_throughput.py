"""Supervised fine-tuning throughput: lmlab padding-free vs lmlab padded vs HF Trainer + peft vs TRL's
padding-free SFTTrainer, on the same examples in the same order.

SmolLM2-135M-Instruct, LoRA r=8 on every linear map of the blocks, GSM8K train examples at their natural
lengths (prompt masked, loss on the solution), batch 8, AdamW; each side trains `--warmup` untimed then
`--steps` timed steps, in rounds that alternate the sides (best of the rounds). Every side sees the batches of
lmlab's seeded order. HF Trainer pads each batch with transformers' DataCollatorForSeq2Seq (its padding
collator for labelled examples); TRL gets the same tokens and labels, `padding_free=True`.
`data.group_by_length` (padded, batches of similar lengths: another batch order, hence other batches) runs
beside them. Prints the padding share of the padded batches, steps/s and supervised tokens/s per side, and

    ratio padding_free_vs_padded = <lmlab padding-free / lmlab padded> (goal >= 1.3)
    ratio padding_free_vs_hf_trainer = <x> (goal >= 1.3)
    ratio padding_free_vs_trl = <x> (goal >= 1.0)
    ratio padding_free_loss_match = <share of the batches whose loss, on the same weights, equals the padded
                                     batch's to 1e-5> (goal >= 1.0)

The two lmlab runs' per-step losses are printed as well: they start equal and drift apart by float32 rounding
that Adam's per-entry normalisation amplifies, as two padded runs with other batch shapes would.

    python bench/sft_throughput.py [--steps 10] [--warmup 2] [--rounds 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import Sampler
from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from helpers.batch_tokens import padding_share, supervised_per_timed_step  # noqa: E402
from helpers.timing import HFClock, LightningClock, StepClock, bench_config  # noqa: E402

from datamodules.padding_free import model_inputs  # noqa: E402
from runtime.training import build_trainable_model  # noqa: E402

SHARED_GSM8K = ROOT.parent / "shared" / "data" / "gsm8k" / "train.jsonl"
BATCH = 8


def config(args: argparse.Namespace, run_dir: str, padding_free: bool, group_by_length: bool = False):
    data = (
        [f"task.data_files={{train: {SHARED_GSM8K}, test: {SHARED_GSM8K}}}"] if SHARED_GSM8K.exists() else []
    )
    return bench_config(
        [
            "task.source=bundled",
            "model=smollm2_135m",
            "method=lora",
            *data,
            f"data.batch_size={BATCH}",
            "data.max_length=1024",
            f"data.max_train_samples={BATCH * (args.steps + args.warmup)}",
            "data.val_size=4",
            f"trainer.max_steps={args.steps + args.warmup}",
            "+trainer.limit_val_batches=0",
            "trainer.gradient_clip_val=0",
            f"data.padding_free={padding_free}",
            f"data.group_by_length={group_by_length}",
            "optim.warmup_ratio=0",
        ],
        run_dir,
    )


def setup(cfg):
    L.seed_everything(cfg.seed)
    model, tokenizer, datamodule, _ = build_trainable_model(cfg)
    datamodule.setup("fit")
    return model, tokenizer, datamodule


class LossClock(LightningClock):
    """The step clock, and the training loss of every step."""

    def __init__(self, clock: StepClock) -> None:
        super().__init__(clock)
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self.losses.append(float(outputs["loss"]))


def run_lmlab(
    args, run_dir: str, padding_free: bool, group_by_length: bool = False
) -> tuple[float, list[float]]:
    from lightning_modules.base import module_settings
    from lightning_modules.task_modules import task_module_class
    from runtime.session import build_loggers
    from runtime.training import build_trainer

    cfg = config(args, run_dir, padding_free, group_by_length)
    model, _, datamodule = setup(cfg)
    assert datamodule.padding_free is padding_free
    clock = StepClock(args.warmup)
    probe = LossClock(clock)
    trainer = build_trainer(cfg, model, build_loggers(cfg, "train", None))
    trainer.callbacks.append(probe)
    trainer.fit(task_module_class("causal_lm")(model, **module_settings(cfg)), datamodule=datamodule)
    return clock.rate(), probe.losses


class InOrder(Sampler[int]):
    """lmlab's seeded order of the first epoch, for the trainers that would shuffle their own way."""

    def __init__(self, order: list[int]) -> None:
        self.order = order

    def __iter__(self):
        return iter(self.order)

    def __len__(self) -> int:
        return len(self.order)


def lmlab_order(datamodule) -> list[int]:
    datamodule.train_dataloader()
    return list(datamodule.train_sampler)


def training_args(args, output_dir: str, cfg) -> dict:
    return {
        "output_dir": output_dir,
        "per_device_train_batch_size": BATCH,
        "max_steps": args.steps + args.warmup,
        "learning_rate": cfg.optim.lr,
        "lr_scheduler_type": "cosine",
        "warmup_steps": 0,
        "weight_decay": 0.0,
        "max_grad_norm": 0.0,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "use_cpu": True,
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
        "seed": cfg.seed,
    }


def run_hf_trainer(args, run_dir: str) -> float:
    cfg = config(args, run_dir, padding_free=False)
    model, tokenizer, datamodule = setup(cfg)
    order = lmlab_order(datamodule)

    class Ordered(Trainer):
        def _get_train_sampler(self, *unused):
            return InOrder(order)

    clock = StepClock(args.warmup)
    trainer = Ordered(
        model=model,
        args=TrainingArguments(**training_args(args, run_dir, cfg), remove_unused_columns=False),
        train_dataset=datamodule.datasets["train"],
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True),
        callbacks=[HFClock(clock)],
    )
    trainer.train()
    return clock.rate()


def run_trl(args, run_dir: str) -> float | str:
    try:
        from datasets import Dataset
        from trl import SFTConfig, SFTTrainer
    except ImportError as error:
        return f"TRL is not installed ({error}); pip install -e '.[bench]'"
    cfg = config(args, run_dir, padding_free=False)
    model, tokenizer, datamodule = setup(cfg)
    order = lmlab_order(datamodule)
    rows = [
        {"input_ids": e["input_ids"], "labels": e["labels"]} for e in datamodule.datasets["train"]
    ]  # same tokens

    class Ordered(SFTTrainer):
        def _get_train_sampler(self, *unused):
            return InOrder(order)

    clock = StepClock(args.warmup)
    settings = SFTConfig(**training_args(args, run_dir, cfg), padding_free=True, max_length=None)
    trainer = Ordered(
        model=model,
        args=settings,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        callbacks=[HFClock(clock)],
    )
    trainer.train()
    return clock.rate()


def batch_figures(args, run_dir: str) -> tuple[float, float, dict[str, float], float]:
    """(share of the padded batches' tokens that are padding, the same grouped by length, supervised tokens
    per timed step of each side, share of the batches whose loss packed equals their loss padded to 1e-5 on
    the same weights: the seeded LoRA model, dropout off). Every side but the grouped one trains on the same
    batches; the grouped batches are others (sorted longest first), so only their tokens/s compare."""
    _, _, grouped = setup(config(args, run_dir, padding_free=False, group_by_length=True))
    grouped_batches = list(grouped.train_dataloader())
    model, _, datamodule = setup(config(args, run_dir, padding_free=False))
    batches = list(datamodule.train_dataloader())
    supervised = supervised_per_timed_step(batches, args.warmup)
    per_side = {name: supervised for name in ("padding_free", "padded", "hf_trainer", "trl_padding_free")}
    per_side["padded_grouped_by_length"] = supervised_per_timed_step(grouped_batches, args.warmup)
    datamodule.padding_free = True
    packed = list(datamodule.train_dataloader())
    model.eval()
    with torch.no_grad():
        matched = sum(
            abs(float(model(**model_inputs(a)).loss) - float(model(**model_inputs(b)).loss)) <= 1e-5
            for a, b in zip(batches, packed, strict=True)
        )
    return padding_share(batches), padding_share(grouped_batches), per_side, matched / len(batches)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    best: dict[str, float] = {}
    losses: dict[str, list[float]] = {}
    trl_reason = None
    sides = {
        "padding_free": lambda tmp: run_lmlab(args, tmp, padding_free=True),
        "padded": lambda tmp: run_lmlab(args, tmp, padding_free=False),
        "padded_grouped_by_length": lambda tmp: run_lmlab(
            args, tmp, padding_free=False, group_by_length=True
        ),
        "hf_trainer": lambda tmp: (run_hf_trainer(args, tmp), None),
        "trl_padding_free": lambda tmp: (run_trl(args, tmp), None),
    }
    with tempfile.TemporaryDirectory() as tmp:
        padding, grouped_padding, supervised, same_weights = batch_figures(args, tmp)
        for round_number in range(args.rounds):
            # rotate the order
            names = list(sides)[round_number % len(sides) :] + list(sides)[: round_number % len(sides)]
            rates = {}
            for name in names:
                rate, trajectory = sides[name](tmp)
                if isinstance(rate, str):
                    trl_reason = rate
                    continue
                rates[name] = rate
                if trajectory is not None:
                    losses[name] = trajectory
            print(f"round {round_number}: " + ", ".join(f"{k} {v:.3f} steps/s" for k, v in rates.items()))
            best = {k: max(best.get(k, 0.0), v) for k, v in rates.items()}
    print(
        f"SmolLM2-135M-Instruct LoRA, batch {BATCH}, {args.steps} timed steps, "
        f"threads={torch.get_num_threads()}"
    )
    print(
        f"padding share of the padded batches: {padding:.1%} ({grouped_padding:.1%} grouped by length, "
        f"another batch order); supervised tokens per timed step: {supervised['padded']:.0f} "
        f"({supervised['padded_grouped_by_length']:.0f} grouped by length)"
    )
    for name, rate in best.items():
        print(f"{name}: {rate:.3f} steps/s, {rate * supervised[name]:.0f} supervised tokens/s")
    if trl_reason:
        print(f"TRL: not run: {trl_reason}")
    drift = max(abs(a - b) for a, b in zip(losses["padding_free"], losses["padded"], strict=True))
    print(
        "per-step losses of the two lmlab runs (padding-free/padded): "
        + ", ".join(f"{a:.6f}/{b:.6f}" for a, b in zip(losses["padding_free"], losses["padded"], strict=True))
        + f"; largest gap {drift:.1e}"
    )
    print(f"ratio padding_free_vs_padded = {best['padding_free'] / best['padded']:.3f} (goal >= 1.3)")
    print(f"ratio padding_free_vs_hf_trainer = {best['padding_free'] / best['hf_trainer']:.3f} (goal >= 1.3)")
    if "trl_padding_free" in best:
        print(
            f"ratio padding_free_vs_trl = {best['padding_free'] / best['trl_padding_free']:.3f} (goal >= 1.0)"
        )
    print(f"ratio padding_free_loss_match = {same_weights:.3f} (goal >= 1.0)")


if __name__ == "__main__":
    main()
