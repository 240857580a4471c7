"""LLM-as-a-judge against a fake OpenAI-compatible endpoint on 127.0.0.1: parsing, retries, timeouts, cache,
secrecy."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from omegaconf import OmegaConf, open_dict

from evaluation import evaluate
from evaluation.judge import Judge, judge_rows, parse_verdict
from tests.conftest import compose_config
from tests.helpers import FakeEndpoint, serving

SECRET = "sk-test-never-written-anywhere"


@pytest.fixture
def endpoint() -> Iterator[str]:
    FakeEndpoint.calls, FakeEndpoint.auth = {}, []
    with serving(FakeEndpoint) as url:
        yield url


def settings(url: str, cache: Path, **changes: object):
    cfg = compose_config("judge=openai_compatible", config_name="evaluate").judge
    with open_dict(cfg):
        cfg.merge_with(
            {
                "base_url": url,
                "model": "fake-judge",
                "cache_dir": str(cache),
                "timeout_s": 0.4,
                "max_retries": 2,
                "backoff_s": 0.01,
                "max_concurrency": 3,
                **changes,
            }
        )
    return cfg


def rows(*predicted: str) -> list[dict]:
    return [
        {"text": f"headline {i}", "gold": "World", "predicted": p, "correct": float(p == "World")}
        for i, p in enumerate(predicted)
    ]


def test_verdicts_are_parsed_from_the_first_word() -> None:
    assert (
        parse_verdict("Yes.") == 1.0
        and parse_verdict("**No**, because") == 0.0
        and parse_verdict(" yes") == 1.0
    )
    with pytest.raises(ValueError, match="unparseable"):
        parse_verdict("I think so")


def test_judge_scores_rows_and_reports_agreement_with_exact_match(
    endpoint: str, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    table = rows("World", "Sports", "World", "Business")
    metrics = judge_rows(settings(endpoint, tmp_path / "cache"), "classification", table, "correct")
    assert [r["judge_correct"] for r in table] == [1.0, 0.0, 1.0, 0.0]
    assert (
        metrics["judge_accuracy"] == 0.5
        and metrics["judge_agreement"] == 1.0
        and metrics["judge_requests"] == 4
    )
    assert set(FakeEndpoint.auth) == {f"Bearer {SECRET}"}


def test_retries_on_429_and_500_then_succeed(endpoint: str, tmp_path: Path) -> None:
    outcome = Judge(settings(endpoint, tmp_path)).verdict("FLAKY Predicted label: World")
    assert outcome == {"judge_correct": 1.0, "judge_error": None, "judge_cached": False}
    assert FakeEndpoint.calls["FLAKY Predicted label: World"] == 3


def test_failures_and_timeouts_are_reported_per_item_without_losing_the_others(
    endpoint: str, tmp_path: Path
) -> None:
    judge = Judge(settings(endpoint, tmp_path, max_retries=1))
    outcomes = judge.judge_all(
        ["SLOW one", "Predicted label: World", "FAIL500 two", "BAD three", "Predicted label: Sports"]
    )
    assert outcomes[0]["judge_correct"] is None and outcomes[0]["judge_error"].startswith("timeout")
    assert outcomes[2]["judge_error"] == "HTTP 500" and FakeEndpoint.calls["FAIL500 two"] == 2
    assert "unparseable" in outcomes[3]["judge_error"]
    assert [outcomes[1]["judge_correct"], outcomes[4]["judge_correct"]] == [1.0, 0.0]


def test_a_rerun_is_served_from_the_cache(endpoint: str, tmp_path: Path) -> None:
    cfg = settings(endpoint, tmp_path / "cache")
    first = judge_rows(cfg, "classification", rows("World", "Sports"), "correct")
    second_rows = rows("World", "Sports")
    second = judge_rows(cfg, "classification", second_rows, "correct")
    assert first["judge_requests"] == 2 and second["judge_requests"] == 0
    assert all(r["judge_cached"] for r in second_rows) and second["judge_accuracy"] == first["judge_accuracy"]
    other_model = judge_rows(
        settings(endpoint, tmp_path / "cache", model="other-judge"),
        "classification",
        rows("World"),
        "correct",
    )
    assert other_model["judge_requests"] == 1  # the cache key includes the judge model


def test_evaluate_with_judge_keeps_the_key_out_of_every_output(
    endpoint: str, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    cfg = compose_config(
        "model=tiny_llama",
        "task=classification",
        "task.source=bundled",
        "judge=openai_compatible",
        "print_config=false",
        config_name="evaluate",
    )
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "run")
        cfg.judge.merge_with(
            OmegaConf.create({"base_url": endpoint, "cache_dir": str(tmp_path / "cache"), "backoff_s": 0.01})
        )
    metrics = evaluate.run(cfg)["metrics"]
    assert metrics["judge_judged"] == 12 and "judge_agreement" in metrics
    predictions = [
        json.loads(line) for line in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()
    ]
    assert all(p["judge_correct"] == float(p["predicted"] == "World") for p in predictions)
    assert FakeEndpoint.auth and set(FakeEndpoint.auth) == {f"Bearer {SECRET}"}
    for path in [*tmp_path.rglob("*")]:
        if path.is_file():
            assert SECRET not in path.read_text(errors="ignore"), path
