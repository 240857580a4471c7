"""Causal tracing of N facts: lmlab's batched restorations (analysis/causal_trace.py) against the
TransformerLens loop of one patched forward per (layer, token) (transformer-lens 4.3 TransformerBridge over
the same HF model, bench/helpers/transformer_lens_trace.py), for the block, MLP and attention sites,
`--samples` noise draws per fact, ROME's window of 10 and noise scale 3.

Each side runs in its own fresh process, the sides in an order shuffled per round; a fact's trace is timed
from its clean run to its last restoration (the first fact of each process is an untimed warm-up). Printed per
model (a tiny GPT-2, then SmolLM2-135M): each side's median seconds per fact with quartiles and range, the
ratio of the medians per round, the largest difference between the two sides' effects (the same noise draws on
both), and lmlab's cost per fact as the model grows.

    ratio trace_vs_transformer_lens = <TransformerLens median s/fact / lmlab's, SmolLM2-135M> (goal >= 2.0)
    ratio trace_vs_transformer_lens_tiny = <the same on the tiny GPT-2> (goal >= 2.0)

    python bench/causal_trace.py [--facts 2] [--samples 3] [--rounds 2]
    python bench/causal_trace.py --quick   # tiny models only, two facts, one round: checks the script
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from helpers import quick  # noqa: E402
from helpers.sides import print_sides, report, run_rounds  # noqa: E402

SIDES = ["lmlab", "transformer_lens"]
KINDS = ("block", "mlp", "attention")
MODELS = {
    "tiny": ["model=tiny_gpt2", "model.architecture.n_layer=4", "+model.architecture.initializer_range=0.3"],
    "smollm2_135m": ["model=smollm2_135m"],
}
FACTS = [
    ("The Eiffel Tower is in the city of", "The Eiffel Tower", "Paris"),
    ("Miles Davis played the", "Miles Davis", "trumpet"),
    ("The mother tongue of Victor Hugo is", "Victor Hugo", "French"),
    ("Toyota was founded in the country of", "Toyota", "Japan"),
    ("The Beatles came from the city of", "The Beatles", "Liverpool"),
]


def side(args: argparse.Namespace) -> None:
    """One side's trace of every fact, timed per fact, with its effects."""
    import lightning as L
    import torch
    from helpers.bench_config import bench_config

    from analysis.causal_trace import encode_fact, noise_level, trace_fact
    from analysis.interventions import Interventions
    from modeling import models
    from modeling.architecture import decoder_blocks

    small = quick.on() and args.model != "tiny"  # quick mode: a tiny Llama stands in for SmolLM2
    cfg = bench_config(["model=tiny_llama"] if small else MODELS[args.model], "unused")
    L.seed_everything(0)
    model, tokenizer = models.build(cfg.model, cache_dir=cfg.paths.cache_dir)
    model.eval()
    facts = [
        encode_fact(tokenizer, {"prompt": p, "subject": s, "answer": a}, model)
        for p, s, a in (FACTS * 2)[: args.facts + 1]
    ]
    level = noise_level(model, facts, 3.0)
    generator = torch.Generator().manual_seed(0)
    if args.side == "lmlab":
        hooks = Interventions(model, KINDS)

        def trace(fact):
            with hooks.hooked():
                found = trace_fact(hooks, fact, level, args.samples, 10, 32, generator)
            return {kind: found["kinds"][kind]["effect"] for kind in KINDS}
    else:
        from helpers import transformer_lens_trace

        bridge = transformer_lens_trace.bridge_of(model, tokenizer)
        depth = len(decoder_blocks(model))

        def trace(fact):
            found = transformer_lens_trace.trace(
                bridge, fact, level, args.samples, 10, KINDS, generator, depth
            )
            return {kind: found[kind]["effect"] for kind in KINDS}

    times, effects = [], []
    for index, fact in enumerate(facts):
        start = time.perf_counter()
        effects.append(trace(fact))
        if index:  # the first fact warms up
            times.append(time.perf_counter() - start)
    report(args.out, step_times=times, effects=effects[1:], layers=len(decoder_blocks(model)))


def largest_difference(reports: dict[str, list]) -> float:
    """The largest |lmlab effect - TransformerLens effect| over every fact, kind, layer and token."""
    largest = 0.0
    for ours, theirs in zip(reports["lmlab"], reports["transformer_lens"], strict=True):
        for a, b in zip(ours["effects"], theirs["effects"], strict=True):
            for kind in KINDS:
                for row_a, row_b in zip(a[kind], b[kind], strict=True):
                    largest = max(largest, *(abs(x - y) for x, y in zip(row_a, row_b, strict=True)))
    return largest


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--facts", type=int, default=2)
    parser.add_argument("--samples", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", choices=list(MODELS), default="tiny")
    parser.add_argument("--side", choices=SIDES)
    parser.add_argument("--out")
    args = quick.parse(parser, facts=2, samples=2, rounds=1)
    if args.side:
        side(args)
        return
    ratios, per_fact = {}, {}
    for name in MODELS:
        shared = ["--facts", str(args.facts), "--samples", str(args.samples), "--model", name]
        reports = run_rounds(Path(__file__), SIDES, args.rounds, args.seed, shared)
        medians = print_sides(reports, f"trace {name} ({reports['lmlab'][0]['layers']} layers), s/fact:")
        rounds = [
            statistics.median(theirs["step_times"]) / statistics.median(ours["step_times"])
            for theirs, ours in zip(reports["transformer_lens"], reports["lmlab"], strict=True)
        ]
        per_round = ", ".join(f"{r:.3f}" for r in rounds)
        print(f"TransformerLens / lmlab on {name}, ratio of the medians per round: {per_round}")
        print(f"max |effect difference| on {name} = {largest_difference(reports):.2e}")
        ratios[name] = medians["transformer_lens"] / medians["lmlab"]
        per_fact[name] = medians["lmlab"]
    print(
        "lmlab's cost per fact as the model grows: "
        + ", ".join(f"{n} {s:.2f} s" for n, s in per_fact.items())
    )
    print(f"ratio trace_vs_transformer_lens = {ratios.get('smollm2_135m', math.nan):.3f} (goal >= 2.0)")
    print(f"ratio trace_vs_transformer_lens_tiny = {ratios['tiny']:.3f} (goal >= 2.0)")


if __name__ == "__main__":
    main()
