"""Progress people can plan by: a bar with rate and time left on a terminal, log lines with the same figures
elsewhere, for every loop over items (generation, classification, the analyses)."""

from __future__ import annotations

import logging
import re

from modeling import progress
from modeling.generation import generate
from modeling.progress import Progress
from tests.conftest import built_model


def test_log_lines_say_done_total_rate_and_time_left(caplog, monkeypatch) -> None:
    clock = iter([0.0, 10.0, 20.0, 30.0, 40.0])
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    with (
        caplog.at_level(logging.INFO, logger="modeling.progress"),
        Progress(4, "items scored", every=15.0, terminal=False) as shown,
    ):
        shown.advance()  # t=10: not yet 15 s since the start
        shown.advance()  # t=20: a line
        shown.advance(2)  # t=30: the last item, a line
    lines = [record.getMessage() for record in caplog.records]
    assert lines == [
        "items scored 2 / 4 (0.10/s, 0:00:20 elapsed, 0:00:20 left)",
        "items scored 4 / 4 (0.13/s, 0:00:30 elapsed, 0:00:00 left)",
    ]


def test_a_terminal_gets_a_bar(capsys) -> None:
    with Progress(3, "problems read", terminal=True) as shown:
        shown.advance(3)
    bar = capsys.readouterr().err
    assert "problems read" in bar and "3/3" in bar and re.search(r"it/s|s/it", bar)


def test_generation_reports_each_completion_and_each_finished_prompt(caplog) -> None:
    _, model, tokenizer = built_model("model=tiny_llama")
    finished = []
    with caplog.at_level(logging.INFO, logger="modeling.progress"):
        texts = generate(
            model,
            tokenizer,
            ["a", "bcd", "ef"],
            max_new_tokens=3,
            num_samples=2,
            on_finished=lambda i, t: finished.append((i, t)),
        )
    assert sorted(finished) == [(i, texts[i]) for i in range(3)]
    assert caplog.records[-1].getMessage().startswith("completions generated 6 / 6 (")
