"""Chat-template rendering, shared by training, evaluation and the analyses (`prompt.chat_template`).

A task's prompt becomes a conversation: an optional system message (`prompt.system`), few-shot exemplars as
user/assistant turns (`prompt.fewshot_as_multiturn`) or folded into one user message, and the question as the
last user turn, rendered with the tokenizer's template and its generation prompt, as lm-evaluation-harness's
`--apply_chat_template` renders it. Training supervises the assistant turns only (`segments`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class ChatStyle:
    """How a task's prompts are put in the chat template: the system message and the exemplars' turns."""

    system: str | None = None
    fewshot_as_multiturn: bool = False


def style_for(
    prompt: Mapping[str, Any] | None, model_is_chat: bool, tokenizer: PreTrainedTokenizerBase
) -> ChatStyle | None:
    """The chat style `prompt.chat_template` asks for (auto: where the tokenizer has a template and the model
    config says `chat: true`), or None for plain-text prompts."""
    setting = (prompt or {}).get("chat_template", False)
    if setting not in ("auto", True, False):
        raise ValueError(f"prompt.chat_template={setting!r}: use auto, true or false")
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if setting is True and not has_template:
        raise ValueError(
            "prompt.chat_template=true: this model's tokenizer has no chat template (use auto or false)"
        )
    if setting is False or (setting == "auto" and not (has_template and model_is_chat)):
        return None
    return ChatStyle(prompt.get("system"), bool(prompt.get("fewshot_as_multiturn", False)))


def render(tokenizer: PreTrainedTokenizerBase, messages: Messages, add_generation_prompt: bool) -> str:
    """`messages` in the tokenizer's chat template, as text that the tokenizer's own call turns into the
    template's tokens (a beginning-of-sequence token the template writes is left to the tokenizer where it
    adds one itself, so it is not doubled)."""
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    bos = tokenizer.bos_token
    adds_bos = bos is not None and tokenizer("")["input_ids"][:1] == [tokenizer.bos_token_id]
    return text[len(bos) :] if adds_bos and text.startswith(bos) else text


def conversation(
    style: ChatStyle, exemplars: list[tuple[str, str]], question: str, target_delimiter: str = ""
) -> Messages:
    """The messages of a k-shot prompt: the system message, the (prompt, target) exemplars as turns (or, not
    multi-turn, written before the question in one user message, as the plain prompt writes them), then the
    question."""
    messages = [{"role": "system", "content": style.system}] if style.system else []
    if style.fewshot_as_multiturn:
        for prompt, target in exemplars:
            messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": target}]
        return [*messages, {"role": "user", "content": question}]
    shots = "".join(prompt + target_delimiter + target + "\n\n" for prompt, target in exemplars)
    return [*messages, {"role": "user", "content": shots + question}]


def segments(render_text: Callable[[Messages, bool], str], messages: Messages) -> list[tuple[str, bool]]:
    """The rendered conversation cut into (text, is_assistant_turn) pieces that concatenate to the whole:
    what each assistant turn adds after the generation prompt before it is supervised, nothing else."""
    pieces, done = [], ""
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render_text(messages[:index], True)
        after = render_text(messages[: index + 1], False)
        if not (before.startswith(done) and after.startswith(before)):
            raise ValueError(
                "the chat template does not render conversations prefix by prefix; assistant turns cannot be "
                "masked (prompt.chat_template=false renders plain text)"
            )
        pieces += [(before[len(done) :], False), (after[len(before) :], True)]
        done = after
    return pieces + [(render_text(messages, False)[len(done) :], False)]
