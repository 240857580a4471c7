"""Every method on one model and task, side by side: trainable parameters, steps/s, peak memory, loss.

Model: SmolLM2-135M-Instruct (embedded default); task: the bundled classification sample (generative
mode; projection_head uses the head mode on the same batches). Each method trains `--steps` AdamW steps
(after `--warmup` untimed ones) in a child process of its own, so peak memory is that method's: the
peak resident memory of the process during training (model included), sampled every 5 ms; the growth over
the memory before the first step is printed too (it under-counts when the allocator already holds freed
memory, as after svd_lora's gradient pass), but the ratios use the peak.
Then, in this process:
- svd_lora rank selection on the same accumulated gradients: randomized vs exact SVD, time and the
  share of layers that get the same rank;
- svd_lora vs peft's AdaLoRA at the same rank budget (AdaLoRA target_r = svd_lora's mean rank, init_r
  = 1.5 x target_r, as AdaLoRA's defaults 12 -> 8): final loss and steps/s, same batches in the same order.
"final loss" everywhere is the task loss on the held-out validation examples after training.

    python bench/methods.py [--model smollm2_135m] [--steps 12] [--warmup 2]
Prints one line per method and ends with:
    ratio peak_memory_<method>_vs_full = <x> (goal <= 1.0)          for every method but full
    ratio svd_rank_selection_exact_vs_randomized_time = <x> (goal >= 2.0)
    ratio svd_rank_agreement = <x> (goal >= 0.9)
    ratio svd_lora_vs_adalora_steps_per_second = <x> (goal >= 1.0)
    ratio adalora_vs_svd_lora_final_loss = <x> (goal >= 1.0)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from helpers.bench_config import bench_config  # noqa: E402
from helpers.memory import PeakMemory, resident_mib  # noqa: E402

METHODS = ["full", "lora", "svd_lora", "prompt_tuning", "adapter", "projection_head"]


def setup(model_name: str, method: str, steps: int, run_dir: str):
    """Seeded model + method + module + the first `steps` training batches of the classification sample."""
    from lightning_modules.task_modules import task_module_class, task_module_name
    from runtime.training import build_trainable_model

    cfg = bench_config(
        [
            f"model={model_name}",
            "task=classification",
            "task.source=bundled",
            f"method={method}",
            "data.batch_size=4",
            "data.val_size=4",
            "method.rank_eval_steps=4" if method == "svd_lora" else "seed=42",
        ],
        run_dir,
    )
    L.seed_everything(cfg.seed)
    model, _, datamodule, _ = build_trainable_model(cfg)
    module = task_module_class(task_module_name(cfg)).from_config(model, cfg, datamodule.task)
    datamodule.setup("fit")
    batches = []
    while len(batches) < steps:
        batches += list(datamodule.train_dataloader())
    return cfg, module, batches[:steps], list(datamodule.val_dataloader())


def loss_of(module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The training loss of one batch for any lmlab module (causal LM / label LM / classifier)."""
    if hasattr(module, "classifier"):
        return torch.nn.functional.cross_entropy(module.predict_classes(batch), batch["class_index"])
    return module(batch["input_ids"], batch["attention_mask"], batch["labels"]).loss


def train(module, batches: list, held_out: list, warmup: int, after_step=None) -> dict[str, float]:
    """AdamW (lr 3e-4) over the trainable parameters; steps/s after `warmup`, peak memory, held-out loss
    after."""
    parameters = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=3e-4)
    module.train()
    losses, before = [], resident_mib()
    with PeakMemory() as memory:
        for step, batch in enumerate(batches):
            if step == warmup:
                start = time.perf_counter()
            loss = loss_of(module, batch)
            loss.backward()
            optimizer.step()
            if after_step is not None:
                after_step(step)
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
    seconds = time.perf_counter() - start
    module.eval()  # the task loss only (AdaLoRA adds its orthogonality penalty to the loss in train mode)
    with torch.no_grad():
        final = sum(loss_of(module, batch).item() for batch in held_out) / len(held_out)
    return {
        "steps_per_second": (len(batches) - warmup) / seconds,
        "peak_mib": memory.peak,
        "training_mib": memory.peak - before,
        "final_loss": final,
        "losses": losses,
    }


def one_method(args: argparse.Namespace) -> None:
    """Child process: train one method and print its numbers as JSON."""
    with tempfile.TemporaryDirectory() as run_dir:
        _, module, batches, held_out = setup(args.model, args.one, args.steps + args.warmup, run_dir)
        trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
        total = sum(p.numel() for p in module.parameters())
        print(
            json.dumps(
                {
                    "method": args.one,
                    "trainable": trainable,
                    "total": total,
                    **train(module, batches, held_out, args.warmup),
                }
            )
        )


def rank_selection(args: argparse.Namespace) -> dict[str, float]:
    """Randomized vs exact SVD rank selection on the same accumulated gradients."""
    import datamodules
    from lightning_modules.methods import svd_lora
    from lightning_modules.methods.lora import resolve_targets
    from modeling.models import build

    with tempfile.TemporaryDirectory() as run_dir:
        cfg = bench_config(
            [
                f"model={args.model}",
                "task=classification",
                "task.source=bundled",
                "method=svd_lora",
                "data.batch_size=4",
                "data.val_size=4",
            ],
            run_dir,
        )
        L.seed_everything(cfg.seed)
        model, tokenizer = build(cfg.model, cache_dir=cfg.paths.cache_dir)

        datamodule = datamodules.build(cfg, tokenizer)
        datamodule.setup("fit")
        batches = list(datamodule.train_dataloader())[:4]
        gradients = svd_lora.accumulated_gradients(
            model,
            svd_lora.target_weights(model, resolve_targets(cfg.method.target_modules, cfg.model, model)),
            batches,
        )
    knobs = cfg.method
    selection = svd_lora.RankSelection(
        knobs.tau, knobs.min_rank, knobs.max_rank, knobs.oversample, knobs.power_iters, knobs.exact_below
    )
    timings, ranks = {}, {}
    for mode in ("randomized", "exact"):
        generator = torch.Generator().manual_seed(0)
        start = time.perf_counter()
        ranks[mode] = {
            n: svd_lora.select_rank(g, selection, exact=mode == "exact", generator=generator)
            for n, g in gradients.items()
        }
        timings[mode] = time.perf_counter() - start
    agreement = sum(ranks["exact"][n] == ranks["randomized"][n] for n in gradients) / len(gradients)
    mean_rank = sum(ranks["randomized"].values()) / len(gradients)
    print(
        f"rank selection over {len(gradients)} layers: randomized {timings['randomized']:.2f} s, exact "
        f"{timings['exact']:.2f} s, same rank on {agreement:.1%} of layers, mean rank {mean_rank:.2f} "
        f"(min {min(ranks['exact'].values())}, max {max(ranks['exact'].values())})"
    )
    return {
        "speedup": timings["exact"] / timings["randomized"],
        "agreement": agreement,
        "mean_rank": mean_rank,
    }


def adalora(args: argparse.Namespace, target_r: int) -> dict[str, float]:
    """peft AdaLoRA on the same model, task and batches, with rank budget `target_r` per layer."""
    from peft import AdaLoraConfig, get_peft_model

    from lightning_modules.methods.lora import resolve_targets

    with tempfile.TemporaryDirectory() as run_dir:
        cfg, module, batches, held_out = setup(args.model, "full", args.steps + args.warmup, run_dir)
        total_steps = len(batches)
        config = AdaLoraConfig(
            init_r=max(target_r + 1, round(1.5 * target_r)),
            target_r=target_r,
            lora_alpha=16,
            lora_dropout=0.05,
            target_modules=resolve_targets(cfg.method.get("target_modules"), cfg.model, module.model),
            task_type="CAUSAL_LM",
            tinit=args.warmup,
            tfinal=2,
            deltaT=1,
            total_step=total_steps,
        )
        module.model = get_peft_model(module.model.requires_grad_(False), config)
        trainable = sum(p.numel() for p in module.model.parameters() if p.requires_grad)
        numbers = train(
            module, batches, held_out, args.warmup, after_step=module.model.base_model.update_and_allocate
        )
    return {"trainable": trainable, **numbers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2_135m")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--one", choices=METHODS, help="(internal) run one method in this process")
    args = parser.parse_args()
    if args.one:
        one_method(args)
        return

    results = {}
    for method in METHODS:
        command = [
            sys.executable,
            __file__,
            "--one",
            method,
            "--model",
            args.model,
            "--steps",
            str(args.steps),
            "--warmup",
            str(args.warmup),
        ]
        output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        results[method] = json.loads(output.strip().splitlines()[-1])
        r = results[method]
        print(
            f"{method:16s} trainable {r['trainable']:>12,} ({r['trainable'] / r['total']:8.4%})  "
            f"{r['steps_per_second']:.3f} steps/s  "
            f"peak {r['peak_mib']:7.0f} MiB (+{r['training_mib']:6.0f} in training)  final loss "
            f"{r['final_loss']:.4f}",
            flush=True,
        )

    selection = rank_selection(args)
    svd = results["svd_lora"]
    ada = adalora(args, target_r=max(1, round(selection["mean_rank"])))
    print(
        f"svd_lora: {svd['trainable']:,} trainable, {svd['steps_per_second']:.3f} steps/s, final loss "
        f"{svd['final_loss']:.4f}"
    )
    print(
        f"adalora : {ada['trainable']:,} trainable, {ada['steps_per_second']:.3f} steps/s, final loss "
        f"{ada['final_loss']:.4f}"
    )

    full_memory = results["full"]["peak_mib"]
    for method in METHODS[1:]:
        peak = results[method]["peak_mib"] / full_memory
        print(f"ratio peak_memory_{method}_vs_full = {peak:.3f} (goal <= 1.0)")
    print(f"ratio svd_rank_selection_exact_vs_randomized_time = {selection['speedup']:.2f} (goal >= 2.0)")
    print(f"ratio svd_rank_agreement = {selection['agreement']:.3f} (goal >= 0.9)")
    print(
        "ratio svd_lora_vs_adalora_steps_per_second = "
        f"{svd['steps_per_second'] / ada['steps_per_second']:.3f} (goal >= 1.0)"
    )
    print(f"ratio adalora_vs_svd_lora_final_loss = {ada['final_loss'] / svd['final_loss']:.3f} (goal >= 1.0)")


if __name__ == "__main__":
    main()
