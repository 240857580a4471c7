"""Per-generation text overlap scores shared by the tasks that score free text (Socratic turns, a user's own
responses): smoothed sentence BLEU (sacreBLEU's tokenizers) and ROUGE-L F1 over words, CJK characters or
characters."""

from __future__ import annotations

import re

CJK_OR_WORD = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]|[^\W_]+")


def text_tokens(text: str, tokenize: str) -> list[str]:
    """Tokens for ROUGE: lower-cased words (`13a`), CJK characters + words (`zh`), or characters (`char`)."""
    if tokenize == "char":
        return [c for c in text if not c.isspace()]
    if tokenize == "zh":
        return CJK_OR_WORD.findall(text.lower())
    return re.findall(r"[^\W_]+", text.lower())


def sentence_scores(generation: str, reference: str, tokenize: str = "13a") -> dict[str, float]:
    """Smoothed sentence BLEU and ROUGE-L F1 of one generation against its reference."""
    from torchmetrics.functional.text import rouge_score, sacre_bleu_score

    rouge = rouge_score(
        generation,
        reference,
        rouge_keys="rougeL",
        normalizer=lambda text: text,
        tokenizer=lambda text: text_tokens(text, tokenize),
    )
    bleu = sacre_bleu_score([generation], [[reference]], tokenize=tokenize, smooth=True)
    return {"bleu": float(bleu), "rouge_l": float(rouge["rougeL_fmeasure"])}
