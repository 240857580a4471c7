"""`python -m analysis.causal` as a user meets it: what a trace of a fact file writes, the inputs it refuses
by name, trained exports (LoRA, adapters, prompt tuning) analysed as they load, and MEMIT and GradSim on
traced layers (`model.memit.layers=traced`): the argmax window of the trace, cached, and an edit that runs
with it."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict

from analysis import causal, causal_inputs, gradsim, memit, traced_layers
from analysis.interventions import Interventions
from analysis.logit_lens import lens
from datamodules import build_task
from runtime.training import run as train
from tests.conftest import compose_config, composed_in
from tests.docs_causal import FACTS
from tests.helpers import load_saved

EDIT = [
    'analysis.requests=[{prompt: "{} plays the sport of", subject: LeBron James, target: football}]',
    "analysis.mom2_n_samples=8",
    "analysis.v_num_grad_steps=2",
    "analysis.stats.source.kind=bundled",
    "analysis.stats.text_field=question",
]


def _analysis(tmp_path: Path, *overrides: str) -> dict:
    return causal.analyse(
        composed_in(tmp_path, "model=tiny_llama", "task.source=bundled", *overrides, config_name="causal")
    )


def _constructed_trace(monkeypatch: pytest.MonkeyPatch, curve: list[float]) -> list[list[dict]]:
    """Every fact set traced from now on; the trace of each is `curve` over the layers."""
    traced: list[list[dict]] = []

    def constructed(model, tokenizer, facts, trace):
        traced.append(facts)
        return {"layers": list(range(len(curve))), "curve": curve}

    monkeypatch.setattr(traced_layers, "mlp_curve", constructed)
    return traced


def test_a_trace_of_a_fact_file_writes_every_effect_with_its_interval(tmp_path: Path) -> None:
    facts = tmp_path / "facts.jsonl"
    facts.write_text("".join(json.dumps(fact) + "\n" for fact in FACTS))
    result = _analysis(tmp_path, f"analysis.facts={facts}", "analysis.samples=2", "analysis.window=1")
    assert (result["task"], result["facts"]) == ("facts", 3) and result["noise_level"] > 0
    summary = result["summary"]["effect"]
    assert set(summary) == {"block", "attention", "mlp"}
    for layer, entry in summary["block"]["last"].items():
        assert entry["n"] == 3 and entry["low"] <= entry["mean"] <= entry["high"], layer
        assert entry["holm_low"] <= entry["low"] and entry["method"] == "paired t interval over 3 clusters"
    rows = [json.loads(line) for line in (tmp_path / "run" / "causal_items.jsonl").read_text().splitlines()]
    assert [len(row["kinds"]["mlp"]["effect"][0]) for row in rows] == [len(row["tokens"]) for row in rows]
    # the last block's state at the last token is the clean prediction: its effect is the whole gap
    for row in rows:
        gap = row["clean"][0] - row["corrupted"][0]
        assert row["kinds"]["block"]["effect"][-1][-1] == pytest.approx(gap, abs=1e-5)
    mean_gap = sum(r["kinds"]["block"]["effect"][-1][-1] for r in rows) / 3
    assert summary["block"]["last"]["1"]["mean"] == pytest.approx(mean_gap, abs=1e-6)
    assert (tmp_path / "run" / "trace.png").stat().st_size > 5000 and (
        tmp_path / "run" / "trace_curves.png"
    ).exists()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["analysis.intervention=ablate"], "analysis.intervention=ablate: expected one of trace, patch"),
        (["analysis.sites=[mixer]", "analysis.text=Tom is", "analysis.subject=Tom"], "no position mixer"),
        (["task=hotpotqa", "analysis.intervention=patch"], "HotpotQATask injects no noise"),
        (["task=gsm8k_inf", "analysis.intervention=trace"], "no record of split 'test' is a fact"),
        (["analysis.text=Tom is tall", "analysis.subject=Ann"], "subject 'Ann' is not in the prompt"),
        (["task=gsm8k", "analysis.intervention=knockout"], "no NI \\(noise\\) token to knock out"),
    ],
)
def test_bad_input_is_refused_by_name(tmp_path: Path, overrides: list[str], message: str) -> None:
    with pytest.raises(Exception, match=message):
        _analysis(tmp_path, *overrides)


def test_a_malformed_fact_file_is_named_by_file_and_line(tmp_path: Path) -> None:
    facts = tmp_path / "facts.jsonl"
    facts.write_text(json.dumps(FACTS[0]) + "\n{not json\n")
    with pytest.raises(ValueError, match=rf"{facts}:2: not a JSON object"):
        _analysis(tmp_path, f"analysis.facts={facts}")
    facts.write_text(json.dumps({"prompt": "Tom is"}) + "\n")
    with pytest.raises(ValueError, match=rf"{facts}:1: a fact needs a prompt and a subject"):
        _analysis(tmp_path, f"analysis.facts={facts}")


def test_the_traced_window_is_the_argmax_of_the_curve() -> None:
    assert traced_layers.best_window([0.1, 0.5, 0.2, 0.4, 0.9], [0, 1, 2, 3, 4], 2) == [3, 4]
    assert traced_layers.best_window([0.3, 0.3, 0.1], [2, 5, 7], 1) == [2]  # the earliest of a tie
    assert traced_layers.best_window([0.3, 0.1], [0, 1], 5) == [0, 1]  # clipped to the layers there are


def _edit(tmp_path: Path, *overrides: str) -> dict:
    return memit.run(composed_in(tmp_path, "model=tiny_llama", *EDIT, *overrides, config_name="memit"))


def test_memit_edits_the_traced_window_of_a_constructed_trace_and_caches_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    traced = _constructed_trace(monkeypatch, [0.05, 0.4, 0.3, 0.9])
    deeper = [
        "model.architecture.num_hidden_layers=4",
        "model.memit.layers=traced",
        "model.memit.num_layers=2",
    ]
    result = _edit(tmp_path, *deeper)
    # the best pair the edit can reach: the last layer (0.9) has no block after it
    assert result["layers"] == [1, 2]
    assert result["probability_after"]["value"] > result["probability_before"]["value"]
    record = json.loads((tmp_path / "run" / "traced_layers.json").read_text())
    assert (record["layers"], record["curve"], record["facts"]) == ([1, 2], [0.05, 0.4, 0.3, 0.9], 1)
    assert traced == [[{"prompt": "LeBron James plays the sport of", "subject": "LeBron James"}]]
    again = _edit(tmp_path, *deeper)
    assert again["layers"] == [1, 2] and len(traced) == 1  # the second edit read the cached trace


def test_memit_traces_the_facts_it_edits(tmp_path: Path) -> None:
    result = _edit(tmp_path, "model.memit.layers=traced", "model.memit.trace.samples=2")
    record = json.loads((tmp_path / "run" / "traced_layers.json").read_text())
    assert record["curve_layers"] == [0, 1] and len(record["curve"]) == 2
    assert result["layers"] == record["layers"] == [0]  # of two layers, the one with a block after it
    assert Path(record["trace"]).is_file()


def test_gradsim_reads_the_traced_layers_of_its_own_pieces(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    traced = _constructed_trace(monkeypatch, [0.9, 0.1, 0.2, 0.3])
    cfg = composed_in(
        tmp_path,
        "model=tiny_llama",
        "model.architecture.num_hidden_layers=4",
        "task.source=bundled",
        "analysis.max_pieces=4",
        "model.memit.layers=traced",
        "model.memit.num_layers=2",
        config_name="gradsim",
    )
    result = gradsim.run(cfg)
    assert [name.split(".")[2] for name in result["layers"]] == ["0", "1"]
    assert all(fact["subject"] in fact["prompt"] for fact in traced[0]) and 0 < len(traced[0]) <= 4


@pytest.mark.parametrize("method", ["lora", "adapter", "prompt_tuning"])
def test_a_trained_export_is_analysed_as_it_loads(tiny_config, tmp_path: Path, method: str) -> None:
    cfg = tiny_config(
        "model=tiny_llama",
        f"method={method}",
        "trainer.max_steps=2",
        "data.max_train_samples=8",
        "test_after_fit=false",
    )
    train(cfg)
    analysis = compose_config(
        f"ckpt={cfg.paths.output_dir}", "task.source=bundled", "analysis.num_problems=2", config_name="causal"
    )
    with open_dict(analysis):
        analysis.paths.output_dir = str(tmp_path / "lens")
    model, tokenizer = load_saved(analysis)
    task = build_task(analysis, tokenizer)
    problem = causal_inputs.problem(task, task.records("test")[0], 0, True)
    ids = torch.tensor([problem.prompt_ids])
    with torch.no_grad():
        own = (
            model(input_ids=ids).logits[0, -1].float().softmax(-1)
        )  # a prompt-tuned model's: after its virtual tokens
    hooks = Interventions(model, ("block",), knockout=True)
    with hooks.hooked():
        read = lens(hooks, problem.prompt_ids, problem.target_ids[0])
        plain = hooks.run(ids)
        nothing = hooks.run(
            ids, knockout={layer: torch.zeros(1, 8, 8, dtype=torch.bool) for layer in hooks.attention}
        )
        hooks.run(ids, record={("block", 0)})
        state = hooks.recorded[("block", 0)][0]
        everywhere = torch.arange(ids.shape[1])
        noise = (everywhere[:3], torch.randn(1, 3, state.shape[-1]))
        restored = hooks.run(
            ids, edits={("block", 0): (torch.zeros_like(everywhere), everywhere, state)}, noise=noise
        )
    assert state.shape[0] == ids.shape[1]  # the input tokens' states, virtual tokens left out
    assert read["probability"][-1] == pytest.approx(float(own[problem.target_ids[0]]), rel=1e-3)
    assert torch.equal(nothing, plain) and torch.allclose(plain[0, -1].float().softmax(-1), own, atol=1e-6)
    assert torch.allclose(restored, plain, atol=1e-5)
    with open_dict(analysis):
        analysis.analysis.intervention = "knockout"
        analysis.analysis.max_new_tokens = 3
    result = causal.analyse(analysis)
    assert result["summary"]["log_prob"][0]["n"] == 2


def test_a_mixture_of_routed_experts_takes_its_traced_window_from_every_layer_but_the_last(
    family_model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shared, model, tokenizer = family_model("mixtral")  # no dense MLP output: MEMIT edits the routed experts
    cfg = copy.deepcopy(shared)  # the family's config stays as other tests find it
    _constructed_trace(monkeypatch, [0.1, 0.9])
    with open_dict(cfg):
        cfg.model.memit.layers, cfg.paths.cache_dir = "traced", str(tmp_path)
    facts = [{"prompt": "Tom plays the sport of", "subject": "Tom"}]
    assert traced_layers.resolve(cfg, model, tokenizer, facts, tmp_path, 1) == [0]
    assert cfg.model.memit.layers == [0]
