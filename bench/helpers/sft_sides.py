"""Not a benchmark: the sides of bench/sft_throughput.py, each run alone in a fresh process."""

from __future__ import annotations

import argparse
from collections.abc import Callable

import lightning as L
import torch
from helpers import quick
from helpers.batch_tokens import padding_share, side_flops
from helpers.bench_config import bench_config, gsm8k_train
from helpers.sides import HFTimes, StepTimes, lmlab_fit, report
from torch.utils.data import Sampler
from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

from datamodules.padding_free import model_inputs
from modeling.supervised import supervised_logits, token_loss
from runtime.training import build_trainable_model

LOSS_MATCH_BATCHES = 6
PART_MODELS = {"lora": ["model=smollm2_135m", "method=lora"], "full": ["model=pretrain_small", "method=full"]}
QUICK_MODELS = {
    "lora": ["model=tiny_llama", "method=lora"],
    "full": ["model=tiny_pretrain_small", "method=full"],
}


def config(args: argparse.Namespace, run_dir: str, padding_free: bool):
    steps = args.steps + args.warmup
    return bench_config(
        [
            "task.source=bundled",
            *(QUICK_MODELS if quick.on() else PART_MODELS)[args.part],
            *gsm8k_train(),
            f"data.batch_size={args.batch}",
            "data.max_length=1024",
            f"data.max_train_samples={args.batch * steps}",
            "data.val_size=4",
            f"trainer.max_steps={steps}",
            "+trainer.limit_val_batches=0",
            "trainer.gradient_clip_val=0",
            f"data.padding_free={padding_free}",
            "optim.warmup_ratio=0",
        ],
        run_dir,
    )


def setup(args: argparse.Namespace, run_dir: str, padding_free: bool):
    cfg = config(args, run_dir, padding_free)
    L.seed_everything(cfg.seed)
    model, tokenizer, datamodule, _ = build_trainable_model(cfg)
    datamodule.setup("fit")
    assert datamodule.task.padding_free is padding_free
    return cfg, model, tokenizer, datamodule


def describe(args: argparse.Namespace, cfg, batches: list) -> str:
    return (
        f"{cfg.model.name} method={cfg.method.name}, batch {args.batch}, {args.steps} timed steps per round, "
        f"padding share of the padded batches {padding_share(batches):.1%}, threads {torch.get_num_threads()}"
    )


def lmlab(padding_free: bool) -> Callable[[argparse.Namespace, str], None]:
    def side(args: argparse.Namespace, run_dir: str) -> None:
        cfg, model, _, datamodule = setup(args, run_dir, padding_free)
        report(args.out, step_times=lmlab_fit(cfg, model, datamodule, args.warmup))

    return side


class InOrder(Sampler[int]):
    """lmlab's seeded order of the first epoch, for the trainers that would shuffle their own way."""

    def __init__(self, order: list[int]) -> None:
        self.order = order

    def __iter__(self):
        return iter(self.order)

    def __len__(self) -> int:
        return len(self.order)


def training_args(args: argparse.Namespace, run_dir: str, cfg) -> dict:
    return {
        "output_dir": run_dir,
        "per_device_train_batch_size": args.batch,
        "max_steps": args.steps + args.warmup,
        "learning_rate": cfg.optim.lr,
        "lr_scheduler_type": "cosine",
        "warmup_steps": 0,
        "weight_decay": 0.0,
        "max_grad_norm": 0.0,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "use_cpu": not torch.cuda.is_available(),
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
        "seed": cfg.seed,
    }


def hf_trainer(args: argparse.Namespace, run_dir: str) -> None:
    cfg, model, tokenizer, datamodule = setup(args, run_dir, padding_free=False)
    datamodule.train_dataloader()
    order = list(datamodule.train_sampler)

    class Ordered(Trainer):
        def _get_train_sampler(self, *unused):
            return InOrder(order)

    times = StepTimes(args.warmup)
    Ordered(
        model=model,
        args=TrainingArguments(**training_args(args, run_dir, cfg), remove_unused_columns=False),
        train_dataset=datamodule.datasets["train"],
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True),
        callbacks=[HFTimes(times)],
    ).train()
    report(args.out, step_times=times.times)


def trl(padding_free: bool) -> Callable[[argparse.Namespace, str], None]:
    def side(args: argparse.Namespace, run_dir: str) -> None:
        try:
            from datasets import Dataset
            from trl import SFTConfig, SFTTrainer
        except ImportError as error:
            report(args.out, skipped=f"TRL is not installed ({error}); pip install -e '.[bench]'")
            return
        cfg, model, tokenizer, datamodule = setup(args, run_dir, padding_free=False)
        datamodule.train_dataloader()
        order = list(datamodule.train_sampler)
        rows = [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in datamodule.datasets["train"]]

        class Ordered(SFTTrainer):
            def _get_train_sampler(self, *unused):
                return InOrder(order)

        times = StepTimes(args.warmup)
        settings = SFTConfig(**training_args(args, run_dir, cfg), padding_free=padding_free, max_length=None)
        Ordered(
            model=model,
            args=settings,
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
            callbacks=[HFTimes(times)],
        ).train()
        report(args.out, step_times=times.times)

    return side


def torch_loop(args: argparse.Namespace, run_dir: str) -> None:
    """The floor: lmlab's packed rows, the model's own loss, fused AdamW and the schedule, nothing else."""
    from transformers import get_cosine_schedule_with_warmup

    cfg, model, _, datamodule = setup(args, run_dir, padding_free=True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in trainable if p.ndim >= 2], "weight_decay": cfg.optim.weight_decay},
        {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), fused=True
    )
    scheduler = get_cosine_schedule_with_warmup(optimizer, 0, args.steps + args.warmup)
    times = StepTimes(args.warmup)
    for batch in datamodule.train_dataloader():
        times.begin()
        model(**model_inputs(batch)).loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        times.end()
    report(args.out, step_times=times.times)


@torch.no_grad()
def loss_match(args: argparse.Namespace, run_dir: str) -> None:
    """Share of the first LOSS_MATCH_BATCHES batches whose loss packed (lmlab's step) equals the model's own
    padded loss to 1e-5, on the same weights (dropout off); and the FLOPs each side spends on the timed
    steps."""
    cfg, model, _, datamodule = setup(args, run_dir, padding_free=False)
    padded = list(datamodule.train_dataloader())
    datamodule.task.padding_free = True
    packed = list(datamodule.train_dataloader())
    model.eval()
    compared = list(zip(packed[:LOSS_MATCH_BATCHES], padded[:LOSS_MATCH_BATCHES], strict=True))
    matched = sum(
        abs(float(token_loss(*supervised_logits(model, a))) - float(model(**model_inputs(b)).loss)) <= 1e-5
        for a, b in compared
    )
    report(
        args.out,
        share=matched / len(compared),
        description=describe(args, cfg, padded),
        flops=side_flops(model, padded[args.warmup :], packed[args.warmup :]),
    )


SIDES = {
    "padding_free": lmlab(padding_free=True),
    "padded": lmlab(padding_free=False),
    "hf_trainer": hf_trainer,
    "trl": trl(padding_free=False),
    "trl_padding_free": trl(padding_free=True),
    "torch_loop": torch_loop,
    "loss_match": loss_match,
}
