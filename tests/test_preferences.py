"""`python -m evaluation.preferences`: a model's own sampled completions, scored, paired correct against
incorrect per problem, written as a preference set that objective=dpo trains on."""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

from evaluation import preferences
from runtime.results import read_results
from runtime.training import run
from tests.conftest import composed_in


def test_pairs_join_a_correct_with_an_incorrect_completion_each_used_once() -> None:
    completions = ["r1", "w1", "r2", "w2", "w3"]
    solved = [True, False, True, False, False]
    drawn = preferences.pairs(completions, solved, 5, random.Random(0))
    assert len(drawn) == 2  # as many as the rarer side
    assert {c for c, _ in drawn} == {"r1", "r2"} and len({r for _, r in drawn}) == 2
    assert all(r.startswith("w") for _, r in drawn)
    assert len(preferences.pairs(completions, solved, 1, random.Random(0))) == 1
    assert preferences.pairs(["r"], [True], 3, random.Random(0)) == []


def test_a_built_preference_set_trains_with_dpo(tmp_path: Path, tiny_config) -> None:
    data = tmp_path / "letters.jsonl"
    rows = [{"prompt": f"Write letters {i}:", "response": string.ascii_lowercase} for i in range(6)]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    cfg = composed_in(
        tmp_path / "build", "print_config=false", "model=tiny_llama", "task=prompt_response",
        f"task.data_files={data}",
        "task.definition._target_=tests.fixtures.letter_task.LetterShareTask", "score=letter_share",
        "correct_at=0.125", "generation.num_samples=8", "generation.max_new_tokens=8",
        "generation.stop_strings=[]", "pairs_per_problem=2", config_name="preferences",
    )  # fmt: skip
    results = preferences.run(cfg)
    written = [json.loads(line) for line in Path(results["preferences"]).read_text().splitlines()]
    assert results["pairs"] == len(written) > 0
    assert results["problems"] == 5  # the train split as training reads it: one of the 6 validates
    assert 0 < results["solve_rate"]["value"] < 1
    assert results["solve_rate"]["low"] < results["solve_rate"]["value"] < results["solve_rate"]["high"]
    for row in written:
        assert row["prompt"].startswith("Write letters") and row["chosen"] != row["rejected"]
        assert row["problem"].startswith(f"{data}:")
    task = preferences_task = [
        "task=preferences",
        f"task.data_files={results['preferences']}",
        "data.val_size=1",
    ]
    trained = run(tiny_config("model=tiny_llama", "objective=dpo", *preferences_task, "trainer.max_steps=1",
                              "test_after_fit=false", "data.batch_size=2"))  # fmt: skip
    assert trained["global_step"] == 1 and task
    assert read_results(Path(trained["run_dir"]))["metrics"]["train/loss"] > 0
