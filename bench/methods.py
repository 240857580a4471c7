"""Every method and LoRA variant on one model and task, side by side: trainable parameters, steps/s, peak
memory, and the held-out loss after training with its interval over seeds.

Model: SmolLM2-135M-Instruct (embedded default); task: the bundled classification sample (generative mode;
projection_head uses the head mode on the same batches). Entries (ENTRIES): the six methods, AdaLoRA, VeRA,
IA3, and LoRA with DoRA, rsLoRA, PiSSA, EVA and LoRA+. Each trains `--steps` AdamW steps (after `--warmup`
untimed ones; the run's own parameter groups and the method's training hooks, as in train.py) once per seed,
each in a child process of its own, so peak memory (resident, sampled every 5 ms, model included) is that
entry's. Then, in this process: svd_lora rank selection on the same accumulated gradients, randomized vs exact
SVD (time, share of layers with the same rank); svd_lora vs AdaLoRA at the same rank budget (target_r =
svd_lora's mean rank, init_r = 1.5 x target_r). "final loss" is the task loss on the held-out validation
examples after training: the mean over seeds with its t interval (95%; one seed: none).

    python bench/methods.py [--model smollm2_135m] [--steps 12] [--warmup 2] [--seeds 3]
    python bench/methods.py --quick      # tiny model, two steps, one seed: checks the script itself
Prints one line per entry and ends with:
    ratio peak_memory_<entry>_vs_full = <x> (goal <= 1.0)          for every entry but full
    ratio svd_rank_selection_exact_vs_randomized_time = <x> (goal >= 2.0)
    ratio svd_rank_agreement = <x> (goal >= 0.9)
    ratio svd_lora_vs_adalora_steps_per_second = <x> (goal >= 1.0)
    ratio adalora_vs_svd_lora_final_loss = <x> (goal >= 1.0)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from helpers import quick  # noqa: E402
from helpers.bench_config import bench_config  # noqa: E402
from helpers.memory import PeakMemory, resident_mib  # noqa: E402

# the task and data every entry trains on
TASK = ["task=classification", "task.source=bundled", "data.batch_size=4", "data.val_size=4"]
# entry -> its method overrides
ENTRIES = {
    "full": ["method=full"],
    "lora": ["method=lora"],
    "svd_lora": ["method=svd_lora", "method.rank_eval_steps=4"],
    "prompt_tuning": ["method=prompt_tuning"],
    "adapter": ["method=adapter"],
    "projection_head": ["method=projection_head"],
    "adalora": ["method=adalora"],
    "vera": ["method=vera"],
    "ia3": ["method=ia3"],
    "lora_dora": ["method=lora", "method.use_dora=true"],
    "lora_rslora": ["method=lora", "method.use_rslora=true"],
    "lora_pissa": ["method=lora", "method.init=pissa_niter_4"],
    "lora_eva": [
        "method=lora",
        "method.init=eva",
        "method.eva_label_mask=false",
    ],  # 1-2 label tokens per example
    "lora_plus": ["method=lora", "method.loraplus_lr_ratio=16"],
}


def setup(model_name: str, entry: list[str], steps: int, run_dir: str, seed: int = 42):
    """Seeded model + method (`entry`'s overrides) + module + the first `steps` training batches of the
    classification sample."""
    from lightning_modules.task_modules import task_module_class, task_module_name
    from runtime.training import build_trainable_model

    cfg = bench_config([f"model={model_name}", *TASK, *entry, "optim.lr=3e-4", f"seed={seed}"], run_dir)
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


def train(module, batches: list, held_out: list, warmup: int) -> dict[str, float]:
    """AdamW over the run's parameter groups (lr 3e-4, LoRA+'s ratio on B), the method's training hooks
    (AdaLoRA's penalty and budget); steps/s after `warmup`, peak memory, held-out loss after."""
    from lightning_modules.methods import training_hooks

    hooks = training_hooks(module.model)
    optimizer = torch.optim.AdamW(module.parameter_groups(), lr=3e-4)
    hooks.on_fit_start(len(batches))
    module.train()
    losses, before = [], resident_mib()
    with PeakMemory() as memory:
        for step, batch in enumerate(batches):
            if step == warmup:
                start = time.perf_counter()
            loss = loss_of(module, batch)
            penalty = hooks.regulariser()
            (loss if penalty is None else loss + penalty).backward()
            optimizer.step()
            hooks.after_optimizer_step(step)
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
    seconds = time.perf_counter() - start
    module.eval()
    with torch.no_grad():
        final = sum(loss_of(module, batch).item() for batch in held_out) / len(held_out)
    return {
        "steps_per_second": (len(batches) - warmup) / seconds,
        "peak_mib": memory.peak,
        "training_mib": memory.peak - before,
        "final_loss": final,
        "losses": losses,
    }


def one_entry(args: argparse.Namespace, name: str, seed: int, extra: list[str]) -> dict:
    """Train entry `name` (with `extra` overrides) for one seed in this process; its numbers."""
    with tempfile.TemporaryDirectory() as run_dir:
        entry = [*ENTRIES[name], *extra]
        _, module, batches, held_out = setup(args.model, entry, args.steps + args.warmup, run_dir, seed)
        trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
        total = sum(p.numel() for p in module.parameters())
        return {
            "entry": name,
            "trainable": trainable,
            "total": total,
            **train(module, batches, held_out, args.warmup),
        }


def entry_runs(args: argparse.Namespace, name: str, extra: list[str] = ()) -> list[dict]:
    """Entry `name` once per seed: each in a child process of its own (forked with --quick)."""
    runs = []
    for seed in range(42, 42 + args.seeds):
        command = [__file__, "--one", name, "--seed", str(seed), "--model", args.model]
        command += [
            "--steps",
            str(args.steps),
            "--warmup",
            str(args.warmup),
            *(f"--extra={e}" for e in extra),
        ]
        output = quick.run_python(command).stdout
        runs.append(json.loads(output.strip().splitlines()[-1]))
    return runs


def summary(runs: list[dict]) -> dict:
    """An entry's numbers over its seeds: medians of speed and memory, the held-out loss over seeds."""
    from stats.seed_statistics import over_seeds

    middle = len(runs) // 2
    return {
        "trainable": runs[0]["trainable"],
        "total": runs[0]["total"],
        "steps_per_second": sorted(r["steps_per_second"] for r in runs)[middle],
        "peak_mib": sorted(r["peak_mib"] for r in runs)[middle],
        "training_mib": sorted(r["training_mib"] for r in runs)[middle],
        "final_loss": over_seeds([r["final_loss"] for r in runs]),
    }


def loss_text(loss: dict) -> str:
    """The held-out loss over seeds, with its interval where there is one."""
    if loss["low"] is None:
        return f"{loss['mean']:.4f} (n={loss['seeds']}, {loss['method']})"
    interval = f"[{loss['low']:.4f}, {loss['high']:.4f}]"
    return f"{loss['mean']:.4f} {interval} (n={loss['seeds']} seeds, {loss['method']})"


def rank_selection(args: argparse.Namespace) -> dict[str, float]:
    """Randomized vs exact SVD rank selection on the same accumulated gradients."""
    import datamodules
    from lightning_modules.methods import svd_lora
    from lightning_modules.methods.lora import resolve_targets
    from modeling.models import build

    with tempfile.TemporaryDirectory() as run_dir:
        cfg = bench_config([f"model={args.model}", *TASK, "method=svd_lora"], run_dir)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2_135m")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--one", choices=sorted(ENTRIES), help="(internal) run one entry in this process")
    parser.add_argument("--seed", type=int, default=42, help="(internal) the seed of --one")
    parser.add_argument("--extra", action="append", default=[], help="(internal) overrides of --one")
    args = quick.parse(parser, model="tiny_llama", steps=2, warmup=1, seeds=1)
    if args.one:
        print(json.dumps(one_entry(args, args.one, args.seed, args.extra)))
        return

    results = {}
    for name in ENTRIES:
        results[name] = r = summary(entry_runs(args, name))
        print(
            f"{name:16s} trainable {r['trainable']:>12,} ({r['trainable'] / r['total']:8.4%})  "
            f"{r['steps_per_second']:.3f} steps/s  "
            f"peak {r['peak_mib']:7.0f} MiB (+{r['training_mib']:6.0f} in training)  final loss "
            f"{loss_text(r['final_loss'])}",
            flush=True,
        )

    selection = rank_selection(args)
    svd = results["svd_lora"]
    target_r = max(1, round(selection["mean_rank"]))
    budget = [f"method.target_r={target_r}", f"method.init_r={max(target_r + 1, round(1.5 * target_r))}"]
    ada = summary(entry_runs(args, "adalora", budget))
    for name, r in (("svd_lora", svd), (f"adalora (target_r {target_r})", ada)):
        print(
            f"{name}: {r['trainable']:,} trainable, {r['steps_per_second']:.3f} steps/s, final loss "
            f"{loss_text(r['final_loss'])}"
        )

    full_memory = results["full"]["peak_mib"]
    for name in list(ENTRIES)[1:]:
        print(
            f"ratio peak_memory_{name}_vs_full = {results[name]['peak_mib'] / full_memory:.3f} (goal <= 1.0)"
        )
    print(f"ratio svd_rank_selection_exact_vs_randomized_time = {selection['speedup']:.2f} (goal >= 2.0)")
    print(f"ratio svd_rank_agreement = {selection['agreement']:.3f} (goal >= 0.9)")
    print(
        "ratio svd_lora_vs_adalora_steps_per_second = "
        f"{svd['steps_per_second'] / ada['steps_per_second']:.3f} (goal >= 1.0)"
    )
    loss_ratio = ada["final_loss"]["mean"] / svd["final_loss"]["mean"]
    print(f"ratio adalora_vs_svd_lora_final_loss = {loss_ratio:.3f} (goal >= 1.0)")


if __name__ == "__main__":
    main()
