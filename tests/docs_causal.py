"""What docs/causal.md promises of its commands (the four interventions, the study across models, MEMIT on
traced layers), and the fact file its second command reads (data/facts.jsonl)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

from analysis.traced_layers import best_window
from runtime.results import read_results
from tests.docs_workspace import Step, Workspace

Promise = Callable[[Workspace, subprocess.CompletedProcess], None]
FACTS = [
    {"prompt": "The Eiffel Tower is in the city of", "subject": "The Eiffel Tower", "answer": "Paris"},
    {"prompt": "Miles Davis played the", "subject": "Miles Davis", "answer": "trumpet"},
    {"prompt": "The mother tongue of Victor Hugo is", "subject": "Victor Hugo", "answer": "French"},
]


def write_inputs(root: Path) -> None:
    """data/facts.jsonl: three facts to trace."""
    (root / "data" / "facts.jsonl").write_text("".join(json.dumps(fact) + "\n" for fact in FACTS))


def _interval(entry: dict) -> None:
    assert (
        entry["n"] >= 2 and entry["low"] <= entry["mean"] <= entry["high"] and "paired t" in entry["method"]
    )
    assert entry["verdict"] in ("restores", "lowers", "recovers", "worsens") or entry["verdict"].startswith(
        "no detectable effect"
    )


def analysis_of(pattern: str, intervention: str, count: int) -> Promise:
    """An analysis.causal run of `intervention` under `pattern` over `count` facts or problems: its summary
    carries n, an interval, a method and a verdict per effect; its items file a row per fact or problem."""

    def check(workspace: Workspace, result: subprocess.CompletedProcess) -> None:
        run_dir = workspace.newest(pattern)
        found = json.loads((run_dir / "causal_analysis.json").read_text())
        rows = (run_dir / "causal_items.jsonl").read_text().splitlines()
        assert found["intervention"] == intervention and len(rows) == count
        summary = found["summary"]
        if intervention == "trace":
            assert set(summary["effect"]) == {"block", "attention", "mlp"}
            for entry in summary["effect"]["mlp"]["last_subject"].values():
                _interval(entry)
            assert (run_dir / "trace.png").stat().st_size > 5000
        elif intervention == "patch":
            _interval(summary["gap"])
            assert summary["pass@1"][0]["a"] == "clean" and summary["pass@1"][0]["test"] == "exact McNemar"
            for kind in ("block", "attention", "mlp"):
                assert all(
                    s["method"].startswith("percentile bootstrap")
                    for s in summary["recovered_share"][kind].values()
                )
        elif intervention == "lens":
            assert set(summary) == {"noisy", "clean"}
            assert all(entry["low"] <= entry["high"] for entry in summary["clean"]["probability"].values())
        assert read_results(run_dir)["intervention"] == intervention

    return check


def models_compared(workspace: Workspace, result: subprocess.CompletedProcess) -> None:
    sweep = workspace.newest("multirun/causal/*")
    jobs = [json.loads((sweep / str(i) / "causal_analysis.json").read_text()) for i in range(2)]
    assert [job["model"] for job in jobs] == ["tiny_diffllama", "tiny_llama"]
    for job in jobs:  # the knockout of the noise, its control and the two against each other, per metric
        assert {row["a"] for row in job["summary"]["log_prob"]} == {"knockout/all", "control/all"}
        assert {row["test"] for row in job["summary"]["correct"]} <= {"exact McNemar", "paired t"}
    rows = json.loads((sweep / "causal_comparison.json").read_text())
    assert {row["metric"] for row in rows} == {"log_prob", "correct"}
    for row in rows:
        assert row["n"] == 2 and row["method"].startswith("percentile bootstrap") and row["verdict"]


def traced_edit(workspace: Workspace, result: subprocess.CompletedProcess) -> None:
    run_dir = workspace.newest("outputs/memit/tiny_gpt2/*")
    traced = json.loads((run_dir / "traced_layers.json").read_text())
    reachable = traced["curve"][:-1], traced["curve_layers"][:-1]  # the last block has none after it
    assert traced["layers"] == best_window(*reachable, traced["num_layers"])
    assert json.loads((run_dir / "results.json").read_text())["layers"] == traced["layers"]


SCENARIOS: dict[str, list[Step]] = {
    "causal": [
        Step(
            "python -m analysis.causal model=gpt2 task=hotpotqa analysis.intervention=trace",
            analysis_of("outputs/causal/hotpotqa/tiny_gpt2/*", "trace", 2),
        ),
        Step(
            "python -m analysis.causal model=llama analysis.facts=data/facts.jsonl",
            analysis_of("outputs/causal/gsm8k_inf/tiny_llama/*", "trace", 3),
        ),
        Step(
            "python -m analysis.causal model=diffllama task=gsm8k_inf analysis.intervention=patch",
            analysis_of("outputs/causal/gsm8k_inf/tiny_diffllama/*", "patch", 2),
        ),
        Step(
            "python -m analysis.causal model=llama task=gsm8k_inf analysis.intervention=lens",
            analysis_of("outputs/causal/gsm8k_inf/tiny_llama/*", "lens", 2),
        ),
        Step(
            "python -m analysis.causal -m model=diffllama,llama task=gsm8k_inf "
            "analysis.intervention=knockout",
            models_compared,
        ),
        Step(
            "python -m analysis.memit model=gpt2 model.memit.layers=traced 'analysis.requests=[{prompt: \"{} "
            "plays the sport of\", subject: LeBron James, target: football}]'",
            traced_edit,
        ),
    ],
}
