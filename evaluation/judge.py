"""LLM-as-a-judge: ask a chat model behind an OpenAI-compatible endpoint whether each prediction is right.

One POST to `<base_url>/chat/completions` per prediction (httpx), up to `max_concurrency` at a time.
429, 5xx, timeouts and connection errors are retried `max_retries` times with exponential backoff (or
the server's Retry-After); an item that still fails gets `judge_error` and no verdict, and the others
go on. The reply's first word decides: yes -> 1.0, no -> 0.0, anything else -> an error. Verdicts are
cached on disk under `cache_dir`, keyed by sha256(judge model, prompt), so a re-run sends nothing.
The API key comes from the environment variable `api_key_env` and is only ever put in the request
header: it is not logged, not cached and not written to any output.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
from omegaconf import DictConfig

log = logging.getLogger(__name__)

RETRY_STATUS = {429, 500, 502, 503, 504}


class _Fields(dict):
    """str.format_map source that leaves unknown {fields} empty."""

    def __missing__(self, key: str) -> str:
        return ""


def judge_prompt(settings: DictConfig, task: str, row: Mapping[str, Any]) -> str:
    """The judge prompt for one prediction row: the template of `task` (or `default`) filled from the row."""
    template = settings.prompts.get(task) or settings.prompts.default
    gold = row.get("gold")
    fields = _Fields({k: v for k, v in row.items() if isinstance(v, str | int | float)})
    if isinstance(gold, Mapping):  # Socratic rows: {"turn", "answer"}
        fields["reference"], fields["gold"] = gold.get("turn", ""), gold.get("answer") or ""
    return template.format_map(fields)


def parse_verdict(reply: str) -> float:
    """1.0 for a reply starting with yes, 0.0 for no; ValueError otherwise."""
    words = reply.strip().lower().lstrip("*\"' ").split()
    first = words[0].strip(".,!:;*\"'") if words else ""
    if first in ("yes", "no"):
        return 1.0 if first == "yes" else 0.0
    raise ValueError(f"unparseable judge reply {reply[:80]!r}")


class Judge:
    """A cached, retrying, concurrent client of one judge model."""

    def __init__(self, settings: DictConfig) -> None:
        self.settings = settings
        self.cache_dir = Path(settings.cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        key = os.environ.get(settings.api_key_env or "", "")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        if not key:
            log.info("judge: %s is not set; sending requests without an API key", settings.api_key_env)
        self.client = httpx.Client(
            base_url=str(settings.base_url).rstrip("/"), headers=headers, timeout=settings.timeout_s
        )
        self.requests = 0

    def _cache_path(self, prompt: str) -> Path:
        digest = hashlib.sha256(f"{self.settings.model}\n{prompt}".encode()).hexdigest()
        return self.cache_dir / f"{digest}.json"

    def verdict(self, prompt: str) -> dict[str, Any]:
        """{"judge_correct": 1.0 / 0.0 / None, "judge_error": None or why, "judge_cached": bool} for one
        prompt."""
        cached = self._cache_path(prompt)
        if cached.exists():
            return {
                "judge_correct": json.loads(cached.read_text())["verdict"],
                "judge_error": None,
                "judge_cached": True,
            }
        try:
            reply = self._ask(prompt)
            verdict = parse_verdict(reply)
        except (httpx.HTTPError, ValueError, KeyError, IndexError) as error:
            return {"judge_correct": None, "judge_error": _describe(error), "judge_cached": False}
        cached.write_text(
            json.dumps({"model": self.settings.model, "verdict": verdict, "reply": reply}) + "\n"
        )
        return {"judge_correct": verdict, "judge_error": None, "judge_cached": False}

    def _ask(self, prompt: str) -> str:
        body = {
            "model": self.settings.model,
            "messages": [{"role": "user", "content": prompt}],
            "temperature": self.settings.temperature,
            "max_tokens": self.settings.max_tokens,
        }
        for attempt in range(self.settings.max_retries + 1):
            self.requests += 1
            try:
                response = self.client.post("/chat/completions", json=body)
            except (httpx.TimeoutException, httpx.TransportError):
                if attempt == self.settings.max_retries:
                    raise
            else:
                if response.status_code not in RETRY_STATUS or attempt == self.settings.max_retries:
                    response.raise_for_status()
                    return response.json()["choices"][0]["message"]["content"]
                retry_after = response.headers.get("retry-after", "")
                if retry_after.replace(".", "", 1).isdigit():
                    time.sleep(min(float(retry_after), 60.0))
                    continue
            time.sleep(self.settings.backoff_s * 2**attempt)
        raise AssertionError("unreachable")

    def judge_all(self, prompts: list[str]) -> list[dict[str, Any]]:
        """Verdicts for `prompts`, in order, `max_concurrency` requests at a time."""
        with ThreadPoolExecutor(max_workers=max(1, int(self.settings.max_concurrency))) as pool:
            return list(pool.map(self.verdict, prompts))


def _describe(error: Exception) -> str:
    if isinstance(error, httpx.TimeoutException):
        return f"timeout ({type(error).__name__})"
    if isinstance(error, httpx.HTTPStatusError):
        return f"HTTP {error.response.status_code}"
    return f"{type(error).__name__}: {error}"[:200]


def judge_rows(
    settings: DictConfig, task: str, rows: list[dict[str, Any]], reference_key: str | None
) -> dict[str, float]:
    """Add judge_correct / judge_error (and judge_agrees with `reference_key`) to every row; return
    judge_accuracy, the agreement with `reference_key`, counts."""
    judge = Judge(settings)
    for row, outcome in zip(
        rows, judge.judge_all([judge_prompt(settings, task, row) for row in rows]), strict=True
    ):
        row.update(outcome)
    judged = [row for row in rows if row["judge_correct"] is not None]
    metrics = {
        "judge_judged": len(judged),
        "judge_errors": len(rows) - len(judged),
        "judge_requests": judge.requests,
    }
    if judged:
        metrics["judge_accuracy"] = sum(row["judge_correct"] for row in judged) / len(judged)
        if reference_key:
            for row in judged:
                row["judge_agrees"] = float(row["judge_correct"] == row[reference_key])
            metrics["judge_agreement"] = sum(row["judge_agrees"] for row in judged) / len(judged)
    log.info(
        "judge %s: %d judged, %d errors, %d requests",
        settings.model,
        len(judged),
        metrics["judge_errors"],
        judge.requests,
    )
    return metrics
