"""The noise study's report: Pass@1 per stage and noise type with intervals, the robustness verdicts, and the
attention allocation, as one markdown page with its figures."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from analysis import allocation
from stats import tables


def report(
    study: DictConfig,
    rows: list[dict[str, Any]],
    comparisons: list[dict[str, Any]],
    allocations: list[dict[str, Any]],
    settings: DictConfig,
) -> str:
    """The study's markdown report: Pass@1 tables with intervals, robustness verdicts with intervals and
    tests, attention allocation."""
    mode = study.report.mode
    lines = [
        f"# Noise-robustness study `{study.name}`",
        "",
        f"Models: {', '.join(study.models)}; sets: {', '.join(study.tasks)}; SFT: {bool(study.sft)}; "
        f"attention analysis: {bool(study.attention)}. Pass@1 ({mode} extraction).",
        "",
    ]
    confidence = f"{settings.confidence:.0%}"
    for stage in dict.fromkeys(r["stage"] for r in rows):
        lines += [
            f"## Pass@1 ({stage.replace('_', '-')})",
            "",
            f"Each cell: Pass@1 [{confidence} interval] over its problems ({stage}_performance.md names the "
            f"method and n; {stage}_comparisons.md compares every two cells on the same problems).",
            "",
            "| model | " + " | ".join(study.tasks) + " |",
            "|---|" + "---|" * len(study.tasks),
        ]
        for model in study.models:
            mine = {r["dataset"]: r for r in rows if r["stage"] == stage and r["model"] == model}
            cells = [
                tables.with_interval(
                    *(mine.get(t, {}).get(f"pass@1_{mode}{end}") for end in ("", "_low", "_high"))
                )
                for t in study.tasks
            ]
            lines.append(f"| {model} | " + " | ".join(cells) + " |")
        lines += ["", f"![{stage}]({stage}_performance.png)", ""]
    if comparisons:
        first, second = list(study.models)[:2]
        lines += [
            "## Is differential attention more robust?",
            "",
            f"Advantage = drop of {second} - drop of {first} (clean -> noisy Pass@1); > 0: {first} loses "
            f"less. {confidence} paired t interval over problems (a problem's clean and noisy versions and "
            "both models' scores stay together); p: paired t test, Holm-adjusted over the rows; a verdict "
            "only where the Holm-adjusted interval excludes 0, else the minimum detectable effect.",
            "",
            f"| stage | noise | problems | drop {first} | drop {second} | advantage [{confidence} CI] | "
            "p_holm | verdict |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for c in comparisons:
            lines.append(
                f"| {c['stage']} | {c['noise']} | {c['problems']} | {c[f'drop_{first}']:.3f} | "
                f"{c[f'drop_{second}']:.3f} | "
                f"{c['advantage']:+.3f} [{c['ci_low']:+.3f}, {c['ci_high']:+.3f}] | {c['p_holm']:.3g} | "
                f"{c['verdict']} |"
            )
        lines.append("")
    if allocations:
        lines += [
            "## Attention allocation on the noisy sets",
            "",
            f"Share of attention per class: mean [{confidence} interval] over the problems.",
            "",
            "| stage | model | set | problems | KMI | NI | OC | KMI/NI score |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for result in allocations:
            entry = next(iter(result["maps"].values()))
            ratio = {c: entry["ratio"][c] for c in allocation.CLASSES}
            kmi_to_ni = entry["kmi_vs_ni"]["kmi_to_ni"]
            lines.append(
                f"| {result['stage']} | {result['model']} | {result['task']} | {result['num_problems']} | "
                + " | ".join(
                    tables.with_interval(ratio[c]["mean"], ratio[c]["low"], ratio[c]["high"])
                    for c in allocation.CLASSES
                )
                + f" | {'-' if kmi_to_ni is None else f'{kmi_to_ni:.3f}'} |"
            )
        lines += ["", "![allocation](attention_allocation.png)", ""]
    return "\n".join(lines)
