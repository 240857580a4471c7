"""GSM8K noise injection: INF (irrelevant numbers/facts), RCS (redundant calculation steps), SD (semantic
distraction).

Written here because no maintained library injects these with span annotations. Each injector is a
pure function of (question, noise type, seed): the same inputs give the same text byte for byte. The
original sentences and the question stay intact and in order; distractor sentences are inserted at
sentence boundaries before the question sentence, each followed by one space. Templates are data
(`resources/gsm8k_noise.yaml`). Every character of the noisy question belongs to one labelled span:
KMI (key math information: the quantities and the question sentence of the original text), NI (an
injected sentence, its numbers included) or OC (other context).

Export noisy test sets with their spans:
    python -m datamodules.noise --input test.jsonl --out-dir data/noisy [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import random
import re
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from datamodules.sentences import main_subject, question_sentence, split_sentences

NOISE_TYPES = ("inf", "rcs", "sd")
TEMPLATES_FILE = Path(__file__).parent / "resources" / "gsm8k_noise.yaml"

QUANTITY = re.compile(
    r"\$?\d[\d,]*(?:\.\d+)?%?|\b(?:one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|"
    r"fifteen|twenty|thirty|forty|fifty|sixty|hundred|thousand|million|half|twice|double|triple|"
    r"quarter|third|dozen)s?\b",
    re.IGNORECASE,
)
NUMBER = re.compile(r"\d[\d,]*(?:\.\d+)?")
NUMBER_WORDS = {
    "two": 2,
    "three": 3,
    "four": 4,
    "five": 5,
    "six": 6,
    "seven": 7,
    "eight": 8,
    "nine": 9,
    "ten": 10,
    "eleven": 11,
    "twelve": 12,
    "fifteen": 15,
    "twenty": 20,
    "thirty": 30,
    "forty": 40,
    "fifty": 50,
    "sixty": 60,
    "hundred": 100,
    "thousand": 1000,
    "dozen": 12,
}


@dataclass(frozen=True)
class Span:
    """Characters [start, end) of the noisy question carry `label` (KMI, NI or OC)."""

    start: int
    end: int
    label: str


@dataclass
class NoisyProblem:
    """A question with injected distractors and the labelled spans of every character."""

    question: str
    original_question: str
    noise_type: str
    seed: int
    distractors: list[str] = field(default_factory=list)
    spans: list[Span] = field(default_factory=list)

    def to_record(self) -> dict[str, Any]:
        """JSON-ready dict (spans as {start, end, label})."""
        return asdict(self)


@cache
def templates() -> dict[str, Any]:
    """The distractor templates and fillers of `resources/gsm8k_noise.yaml`."""
    return yaml.safe_load(TEMPLATES_FILE.read_text())


def inject(question: str, noise_type: str, seed: int, sentences: int = 1) -> NoisyProblem:
    """Insert `sentences` distractors of `noise_type` into `question`; deterministic in (question, type,
    seed)."""
    if noise_type not in NOISE_TYPES:
        raise ValueError(f"noise type must be one of {NOISE_TYPES}, got {noise_type!r}")
    rng = random.Random(f"{noise_type}|{seed}|{question}")
    asked = question_sentence(split_sentences(question), question)
    distractors = [d for d in (_distractor(noise_type, question, rng) for _ in range(sentences)) if d]
    slots = sorted(rng.choice(range(asked + 1)) for _ in distractors)  # before sentence `slot`
    return _assemble(question, noise_type, seed, distractors, slots)


def annotate(question: str) -> NoisyProblem:
    """The clean question with its KMI / OC spans (no distractors)."""
    return _assemble(question, "none", 0, [], [])


def _assemble(
    question: str, noise_type: str, seed: int, distractors: list[str], slots: list[int]
) -> NoisyProblem:
    ranges = split_sentences(question)
    asked = question_sentence(ranges, question)
    pieces, noise, cursor, shift = [], [], 0, []
    for slot, distractor in zip(slots, distractors, strict=True):
        boundary = ranges[slot][0]
        pieces.append(question[cursor:boundary])
        cursor = boundary
        start = sum(len(p) for p in pieces)
        pieces += [distractor, " "]
        noise.append((start, start + len(distractor)))
        shift.append((boundary, len(distractor) + 1))
    pieces.append(question[cursor:])
    noisy = "".join(pieces)

    def moved(position: int) -> int:
        return position + sum(size for boundary, size in shift if boundary <= position)

    key = [(moved(m.start()), moved(m.end() - 1) + 1) for m in QUANTITY.finditer(question)]
    key.append((moved(ranges[asked][0]), moved(ranges[asked][1] - 1) + 1))
    return NoisyProblem(noisy, question, noise_type, seed, distractors, _label(len(noisy), key, noise))


def _label(length: int, key: list[tuple[int, int]], noise: list[tuple[int, int]]) -> list[Span]:
    labels = ["OC"] * length
    for label, ranges in (("KMI", key), ("NI", noise)):
        for start, end in ranges:
            labels[start:end] = [label] * (end - start)
    spans, start = [], 0
    for i in range(1, length + 1):
        if i == length or labels[i] != labels[start]:
            spans.append(Span(start, i, labels[start]))
            start = i
    return spans


def _distractor(noise_type: str, question: str, rng: random.Random) -> str:
    data = templates()
    slots = {key: rng.choice(values) for key, values in data["fillers"].items()}
    slots |= {"subject": main_subject(question), "n": rng.randint(2, 99), "m": rng.randint(2, 30)}
    if noise_type == "inf":
        pool = data["inf"]["related"] if rng.random() < 0.5 else data["inf"]["unrelated"]
        return _capitalised(rng.choice(pool).format(**slots))
    if noise_type == "sd":
        return _capitalised(rng.choice(data["sd"]).format(**slots))
    numbers = [float(n.replace(",", "")) for n in NUMBER.findall(question)]
    numbers += [
        NUMBER_WORDS[w.lower()] for w in re.findall(r"[A-Za-z]+", question) if w.lower() in NUMBER_WORDS
    ]
    if not numbers:
        return ""
    a, b = rng.sample(numbers, 2) if len(numbers) >= 2 else (numbers[0], numbers[0])
    operation = rng.choice(["sum", "product"])
    result = a + b if operation == "sum" else a * b
    template = rng.choice(data["rcs"][operation])
    return _capitalised(template.format(a=_number(a), b=_number(b), result=_number(result), **slots))


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.4f}".rstrip("0").rstrip(".")


def _capitalised(sentence: str) -> str:
    return sentence[0].upper() + sentence[1:]


def export(input_path: Path, out_dir: Path, seed: int, sentences: int = 1) -> list[Path]:
    """Write `gsm8k_{inf,rcs,sd}_<stem>.jsonl` (question, answer, original question, spans) for a GSM8K
    JSONL."""
    from datamodules.sources import read_file

    records = read_file(input_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for noise_type in NOISE_TYPES:
        path = out_dir / f"gsm8k_{noise_type}_{input_path.stem}.jsonl"
        with path.open("w", encoding="utf-8") as handle:
            for record in records:
                problem = inject(record["question"], noise_type, seed, sentences)
                handle.write(
                    json.dumps({**problem.to_record(), "answer": record["answer"]}, ensure_ascii=False) + "\n"
                )
        written.append(path)
    return written


def main() -> None:
    """Command line: export the three noisy versions of a GSM8K JSONL file."""
    parser = argparse.ArgumentParser(
        description="Export INF / RCS / SD noisy versions of a GSM8K JSONL file."
    )
    parser.add_argument("--input", type=Path, required=True)
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sentences", type=int, default=1, help="distractor sentences per problem")
    arguments = parser.parse_args()
    for path in export(arguments.input, arguments.out_dir, arguments.seed, arguments.sentences):
        print(path)


if __name__ == "__main__":
    main()
