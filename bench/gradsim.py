"""GradSim: batched per-example gradients vs a per-example backward loop; MEMIT edit cost and quality.

Part 1, on SmolLM2-135M-Instruct and 64 knowledge pieces (HotpotQA pieces of `--data DIR`/hotpotqa
and the bundled sample, cycled to 64): lmlab's batched hook computation (batch 8) vs one backward per
piece, same layers (the model's MEMIT layers), same exact gradients; prints both times and the largest
difference between the two GradSim matrices.
Part 2: 20 single MEMIT edits of real HotpotQA pieces (each to another piece's answer): seconds per
edit, edit success (greedy exact match of every token of the new answer), efficacy (MEMIT's efficacy score:
P(new answer) > P(old answer) after the edit) and neighbourhood specificity (share of the other pieces
whose own answer stays more likely than the edit's new answer). MEMIT is the reference algorithm with the
model config's settings; covariance statistics come from the first --stats-samples (200) `--data DIR`/gsm8k
train texts, an offline stand-in for Wikipedia (the reference's 100,000 texts take hours on 2 CPU cores),
cached under ~/.cache/lmlab; the corpus, text and token counts and the generated templates are printed.
    ratio gradsim_batched_vs_loop = <x> (goal >= 3.0)

    python bench/gradsim.py [--pieces 64] [--edits 20]
    python bench/gradsim.py --quick   # tiny_llama, 4 pieces, 2 edits: checks the script
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from helpers import bench_data, quick  # noqa: E402

import datamodules  # noqa: E402
from analysis import gradsim, memit, memit_inputs, ripple  # noqa: E402
from datamodules.sources import SAMPLES_DIR, read_file  # noqa: E402
from modeling import architecture, models  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2_135m")
    parser.add_argument("--pieces", type=int, default=64)
    parser.add_argument("--edits", type=int, default=20)
    parser.add_argument(
        "--stats-samples", type=int, default=200, help="texts for the covariance (a CPU-sized stand-in)"
    )
    bench_data.add_option(parser)
    args = quick.parse(parser, model="tiny_llama", pieces=4, edits=2, stats_samples=8)
    bench_data.announce("HotpotQA and GSM8K")

    hotpot = bench_data.path("hotpotqa")
    hotpot = next(hotpot.glob("hotpot_dev_distractor*.json"), None) if hotpot else None
    data = [f"task.data_files={{test: {hotpot}}}"] if hotpot else ["task.source=bundled"]
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("ripple", overrides=[f"model={args.model}", *data])
    model, tokenizer = models.build(cfg.model, cache_dir=cfg.paths.cache_dir)
    model.eval()
    task = datamodules.build_task(cfg, tokenizer)
    real = task.records("test")
    bundled = datamodules.build_task(cfg, tokenizer)
    bundled.source = {"kind": "bundled", "bundled": "hotpotqa"}
    pool = real + bundled.records("test")
    pieces = [pool[i % len(pool)] for i in range(args.pieces)]
    examples = [task.answer_example(p["prompt"], p["answer"]) for p in pieces]
    layers = list(cfg.analysis.gradsim.layers)

    start = time.perf_counter()
    batched = gradsim.PerExampleGradients(model, layers)
    vectors = torch.cat([batched(task.collate(examples[i : i + 8])) for i in range(0, len(examples), 8)])
    batched_seconds = time.perf_counter() - start

    start = time.perf_counter()
    targets = [module for _, module, _ in architecture.mlp_output_modules(model, layers)]
    model.requires_grad_(False)
    for module in targets:
        module.weight.requires_grad_(True)
    loop = []
    for example in examples:
        for module in targets:
            module.weight.grad = None
        gradsim.answer_log_probs(model, task.collate([example])).sum().backward()
        loop.append(torch.cat([m.weight.grad.flatten() for m in targets]))
    loop_seconds = time.perf_counter() - start
    model.requires_grad_(False)
    difference = np.abs(gradsim.cosine_matrix(vectors) - gradsim.cosine_matrix(torch.stack(loop))).max()

    stats_path = bench_data.path("gsm8k", "train.jsonl") or SAMPLES_DIR / "gsm8k" / "train.jsonl"
    texts = [r["question"] + " " + r["answer"] for r in read_file(stats_path)]
    hparams = cfg.analysis.memit
    with open_dict(hparams):
        hparams.mom2_n_samples = args.stats_samples
    cache = Path(cfg.paths.cache_dir) / "memit_stats" / cfg.model.name
    moments, statistics = memit_inputs.second_moments(
        model, tokenizer, hparams, texts, cache, f"files:{stats_path}:question+answer"
    )
    templates = memit_inputs.context_templates(model, tokenizer, hparams, cache)
    edit_pieces = real[: args.edits]
    seconds, successes, efficacious, specific, neighbours = [], 0, 0, 0, 0
    for index, piece in enumerate(edit_pieces):
        new_answer = ripple.counterfactual(edit_pieces, index)
        request = {"prompt": piece["prompt"], "subject": piece["subject"], "target_new": new_answer}
        others = [p for p in edit_pieces if p["id"] != piece["id"]]
        start = time.perf_counter()
        with memit.edited(model, tokenizer, [request], hparams, moments, templates):
            seconds.append(time.perf_counter() - start)
            edit = ripple.score_pieces(model, task, [piece], [new_answer])
            successes += int(edit["exact_match"][0])
            efficacious += int(edit["log_prob"][0] > ripple.score_pieces(model, task, [piece])["log_prob"][0])
            own = ripple.score_pieces(model, task, others)["log_prob"]
            new = ripple.score_pieces(model, task, others, [new_answer] * len(others))["log_prob"]
            specific += int((own > new).sum())
            neighbours += len(others)

    print(f"model={args.model} pieces={len(pieces)} layers={layers} threads={torch.get_num_threads()}")
    print(f"memit statistics: {statistics}; context templates: {templates}")
    print(
        f"gradsim batched: {batched_seconds:.1f} s; per-example loop: {loop_seconds:.1f} s; "
        f"max |GradSim difference| = {difference:.2e}"
    )
    print(
        f"memit (lambda {hparams.mom2_update_weight}, layers {list(hparams.layers)}): {np.mean(seconds):.1f} "
        "s per edit over "
        f"{len(seconds)} edits; success {successes}/{len(seconds)}; efficacy {efficacious}/{len(seconds)}; "
        f"neighbourhood specificity {specific / max(1, neighbours):.3f}"
    )
    print(f"ratio gradsim_batched_vs_loop = {loop_seconds / batched_seconds:.2f} (goal >= 3.0)")


if __name__ == "__main__":
    main()
