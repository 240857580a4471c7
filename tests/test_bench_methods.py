"""bench/methods.py's quick mode (tiny model, two steps, one seed, each entry forked) runs the script's own
code path for every entry and prints its table and every ratio line; what it prints is checked against what
each method trains."""

from __future__ import annotations

import math
import re

from tests.conftest import launch

ENTRY = re.compile(r"^(\w+)\s+trainable\s+([\d,]+) \(\s*([\d.]+)%\).*final loss ([\d.]+)", re.M)
RATIO = re.compile(r"^ratio (\w+) = ([\d.]+) \(goal (>=|<=) ([\d.]+)\)$", re.M)


def test_the_methods_bench_quick_mode_compares_every_entry_and_ends_with_its_ratios() -> None:
    output = launch("bench/methods.py", "--quick", timeout=600).stdout
    rows = {
        name: (int(count.replace(",", "")), float(share)) for name, count, share, _ in ENTRY.findall(output)
    }
    assert set(rows) == {
        "full", "lora", "svd_lora", "prompt_tuning", "adapter", "projection_head", "adalora", "vera", "ia3",
        "lora_dora", "lora_rslora", "lora_pissa", "lora_eva", "lora_plus",
    }  # fmt: skip
    assert rows["full"][1] == 100.0 and all(
        share < 100 for name, (_, share) in rows.items() if name != "full"
    )
    trainable = {name: count for name, (count, _) in rows.items()}
    assert trainable["ia3"] < trainable["vera"] < trainable["lora"] < trainable["lora_dora"]  # + magnitudes
    assert trainable["lora"] == trainable["lora_rslora"] == trainable["lora_pissa"] == trainable["lora_plus"]
    assert all(math.isfinite(float(loss)) for *_, loss in ENTRY.findall(output))
    ratios = {name: float(value) for name, value, _, _ in RATIO.findall(output)}
    expected = {f"peak_memory_{name}_vs_full" for name in rows if name != "full"} | {
        "svd_rank_selection_exact_vs_randomized_time",
        "svd_rank_agreement",
        "svd_lora_vs_adalora_steps_per_second",
        "adalora_vs_svd_lora_final_loss",
    }
    assert set(ratios) == expected and all(value > 0 for value in ratios.values())
    assert output.rstrip().splitlines()[-1].startswith("ratio ")  # the ratio lines end it
