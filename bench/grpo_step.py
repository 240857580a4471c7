"""A GRPO step: lmlab (objective=grpo) against TRL's GRPOTrainer (trl 1.16), the same model, LoRA, group
size, prompts per step, completion length and sampling; and lmlab with its rollouts sampled by vLLM
(`objective.generation_backend=vllm`, the side `lmlab_vllm`, skipped where vLLM is not installed).

SmolLM2-135M-Instruct with LoRA (r=8 on every linear map of the blocks, dropout off as both disable it for
GRPO), GSM8K train problems as zero-shot prompts (`--prompts` per step, `--group` completions each, at most
`--length` new tokens at temperature 1, no stop strings on either side), the GSM8K scorer as the reward
(flexible exact match), TRL's default loss (dapo) with beta 0 and one iteration per generation batch, AdamW.
Every side runs in its own fresh process (`--side`), the sides in an order shuffled per round, `--warmup`
untimed steps then `--steps` timed ones; a step is timed from its start to the end of its optimiser step.
Each side's median step, quartiles and range are printed, with the split of its median step into generation
(sampling the completions; with vLLM also loading the policy's weights into the engine), scoring (the reward)
and the update (everything else: log-probs, loss, backward,
optimiser), and the completion tokens it generated per step (the two sides sample different tokens, so the
lengths differ a little; both stop at EOS or `--length`). The ratio is TRL's median step over lmlab's,
with the ratio of the medians in each round (the rounds are the independent repeats).

    ratio grpo_step_vs_trl = <TRL median step / lmlab median step> (goal >= 1.5)
    ratio grpo_generation_vs_trl = <TRL's median generation time per step / lmlab's> (goal >= 1.0)
    ratio grpo_step_vllm_vs_trl = <TRL median step / lmlab's with vLLM sampling> (goal >= 1.5)

    python bench/grpo_step.py [--steps 4] [--warmup 1] [--rounds 2] [--prompts 2] [--group 8] [--length 64]
    python bench/grpo_step.py --quick   # tiny_llama, two timed steps, one round: checks the script
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from helpers import bench_data, quick  # noqa: E402
from helpers.bench_config import bench_config, gsm8k_train  # noqa: E402
from helpers.sides import HFTimes, LightningTimes, StepTimes, print_sides, report, run_rounds  # noqa: E402

SIDES = ["lmlab", "trl", "lmlab_vllm"]
# the vLLM side's engine: no CUDA graphs or compilation to warm up, a KV cache sized for the bench's sequences
VLLM_ENGINE = (
    "+objective.vllm.engine_args={enforce_eager: true, max_model_len: 1024, "
    "kv_cache_memory_bytes: 2147483648}"
)
PHASES = ("generation", "scoring")


class PhaseTimes:
    """Seconds spent in each phase during each step (the first `warmup` steps dropped)."""

    def __init__(self, steps: StepTimes) -> None:
        self.steps, self.spent = steps, defaultdict(lambda: defaultdict(float))
        self.tokens: dict[int, int] = defaultdict(int)

    def timed(self, phase: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            result = function(*args, **kwargs)
            self.spent[self.steps.step][phase] += time.perf_counter() - start
            return result

        return wrapper

    def per_step(self) -> dict[str, list[float]]:
        kept = range(self.steps.warmup, self.steps.step)
        return {phase: [self.spent[step][phase] for step in kept] for phase in PHASES} | {
            "tokens": [self.tokens[step] for step in kept]
        }


def config(args: argparse.Namespace, run_dir: str, *extra: str):
    # quick: tiny_llama with heads of 64 dimensions (vLLM's CPU attention takes no smaller ones)
    tiny = [
        "model=tiny_llama",
        "model.architecture.hidden_size=128",
        "model.architecture.num_attention_heads=2",
    ]
    model = [*tiny, "model.architecture.num_key_value_heads=1"] if quick.on() else ["model=smollm2_135m"]
    return bench_config(
        [
            *model, *extra, "task=gsm8k", "task.source=bundled", *gsm8k_train(), "method=lora",
            "method.dropout=0",
            "objective=grpo", f"objective.num_generations={args.group}", "objective.num_iterations=1",
            f"objective.max_completion_length={args.length}", "objective.stop_strings=[]",
            f"objective.generation_batch_size={args.prompts * args.group}", "objective.loss_type=dapo",
            f"data.batch_size={args.prompts * args.group}", "data.val_size=4",
            f"trainer.max_steps={args.steps + args.warmup}", "+trainer.limit_val_batches=0",
            "trainer.gradient_clip_val=0", "optim.lr=1e-5", "optim.warmup_ratio=0",
        ],
        run_dir,
    )  # fmt: skip


def lmlab_side(args: argparse.Namespace, run_dir: str, vllm: bool = False) -> None:
    import lightning as L

    from lightning_modules import grpo
    from lightning_modules.rollouts import Reward
    from lightning_modules.task_modules import task_module_class
    from runtime.session import build_loggers
    from runtime.training import build_trainable_model, build_trainer

    cfg = config(args, run_dir, *(["objective.generation_backend=vllm", VLLM_ENGINE] if vllm else []))
    L.seed_everything(cfg.seed)
    model, _, datamodule, _ = build_trainable_model(cfg)
    steps = StepTimes(args.warmup)
    phases = PhaseTimes(steps)
    owner, name = (grpo.VLLMPolicySampler, "sample") if vllm else (grpo, "sample_token_ids")
    sample = phases.timed("generation", getattr(owner, name))

    def counted(*arguments: Any, **kwargs: Any) -> Any:
        completions = sample(*arguments, **kwargs)
        phases.tokens[steps.step] += sum(len(ids) for group in completions for ids in group)
        return completions

    setattr(owner, name, counted)
    grpo.VLLMPolicySampler.sync = phases.timed("generation", grpo.VLLMPolicySampler.sync)
    Reward.__call__ = phases.timed("scoring", Reward.__call__)
    trainer = build_trainer(cfg, model, build_loggers(cfg, "train", None))
    trainer.callbacks.append(LightningTimes(steps))
    trainer.fit(task_module_class("grpo").from_config(model, cfg, datamodule.task), datamodule=datamodule)
    report(args.out, step_times=steps.times, **phases.per_step())


def lmlab_vllm_side(args: argparse.Namespace, run_dir: str) -> None:
    """lmlab's step with the rollouts sampled by a vLLM engine in the process."""
    if importlib.util.find_spec("vllm") is None:
        report(args.out, skipped="vLLM is not installed (pip install 'lmlab[vllm]')", step_times=[])
        return
    lmlab_side(args, run_dir, vllm=True)


def trl_side(args: argparse.Namespace, run_dir: str) -> None:
    try:
        import trl
    except ImportError:
        report(args.out, skipped="trl is not installed (pip install 'lmlab[bench]')", step_times=[])
        return
    import datasets
    import lightning as L
    from peft import LoraConfig

    import datamodules
    from modeling import models

    cfg = config(args, run_dir)
    L.seed_everything(cfg.seed)
    model, tokenizer = models.build(cfg.model, cache_dir=cfg.paths.cache_dir)
    task = datamodules.build_task(cfg, tokenizer)
    records = task.records("train")
    rows = {
        "prompt": [task.prompt_format.prompt(r, []) for r in records],
        "reference": [task.prompt_format.reference(r) for r in records],
    }

    def reward(completions: list[str], reference: list[str], **unused: Any) -> list[float]:
        return [task.score(c, r)["exact_match_flexible"] for c, r in zip(completions, reference, strict=True)]

    settings = trl.GRPOConfig(
        output_dir=run_dir, report_to=[], use_cpu=True, bf16=False, max_steps=args.steps + args.warmup,
        per_device_train_batch_size=args.prompts * args.group, num_generations=args.group,
        max_completion_length=args.length, temperature=1.0, learning_rate=1e-5, lr_scheduler_type="cosine",
        loss_type="dapo", beta=0.0, logging_steps=1, save_strategy="no", seed=cfg.seed,
    )  # fmt: skip
    trainer = trl.GRPOTrainer(
        model=model,
        reward_funcs=reward,
        args=settings,
        train_dataset=datasets.Dataset.from_dict(rows),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear"),
    )
    steps = StepTimes(args.warmup)
    phases = PhaseTimes(steps)
    generate = phases.timed("generation", trainer._generate)

    def counted(prompts: list) -> Any:
        result = generate(prompts)
        phases.tokens[steps.step] += sum(len(ids) for ids in result[1])  # (prompt ids, completion ids, ...)
        return result

    trainer._generate = counted
    trainer._calculate_rewards = phases.timed("scoring", trainer._calculate_rewards)
    trainer.add_callback(HFTimes(steps))
    trainer.train()
    report(args.out, step_times=steps.times, **phases.per_step())


def print_split(reports: dict[str, list]) -> dict[str, float]:
    """Print each side's median step split into generation, scoring and the update, and its tokens per step;
    return each side's median generation time."""
    generation = {}
    for side, runs in reports.items():
        if any("skipped" in run for run in runs):
            continue
        step = statistics.median(t for run in runs for t in run["step_times"])
        parts = {phase: statistics.median(t for run in runs for t in run[phase]) for phase in PHASES}
        update = step - sum(parts.values())
        shares = ", ".join(f"{p} {v:.2f} s ({v / step:.0%})" for p, v in [*parts.items(), ("update", update)])
        tokens = statistics.median(t for run in runs for t in run["tokens"])
        print(f"{side}: median step {step:.2f} s = {shares}; {tokens:.0f} completion tokens per step")
        generation[side] = parts["generation"]
    return generation


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--side", choices=SIDES)
    parser.add_argument("--out")
    bench_data.add_option(parser)
    args = quick.parse(parser, steps=2, warmup=1, rounds=1, prompts=2, group=2, length=4)
    bench_data.announce("GSM8K")
    if args.side:  # one side, in this fresh process
        with tempfile.TemporaryDirectory() as run_dir:
            {"lmlab": lmlab_side, "trl": trl_side, "lmlab_vllm": lmlab_vllm_side}[args.side](args, run_dir)
        return
    shared = ["--steps", str(args.steps), "--warmup", str(args.warmup), "--prompts", str(args.prompts)]
    shared += ["--group", str(args.group), "--length", str(args.length)]
    reports = run_rounds(Path(__file__), SIDES, args.rounds, args.seed, shared)
    medians = print_sides(reports, "grpo")
    generation = print_split(reports)
    rounds = [
        statistics.median(theirs["step_times"]) / statistics.median(ours["step_times"])
        for theirs, ours in zip(reports["trl"], reports["lmlab"], strict=True)
        if theirs["step_times"]
    ]
    print("TRL / lmlab, ratio of the medians per round: " + ", ".join(f"{r:.3f}" for r in rounds))
    ratio = medians["trl"] / medians["lmlab"] if "trl" in medians else math.nan
    print(f"ratio grpo_step_vs_trl = {ratio:.3f} (goal >= 1.5)")
    sampled = generation["trl"] / generation["lmlab"] if "trl" in generation else math.nan
    print(f"ratio grpo_generation_vs_trl = {sampled:.3f} (goal >= 1.0)")
    served = medians["trl"] / medians["lmlab_vllm"] if {"trl", "lmlab_vllm"} <= set(medians) else math.nan
    print(f"ratio grpo_step_vllm_vs_trl = {served:.3f} (goal >= 1.5)")


if __name__ == "__main__":
    main()
