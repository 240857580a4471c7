"""`prompt.chat_template`: a task's prompts in the tokenizer's chat template, the same in training (loss on
the assistant turn only), evaluation (token ids equal lm-eval's `--apply_chat_template`) and the analyses."""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
import yaml
from omegaconf import open_dict
from tokenizers.processors import TemplateProcessing

import datamodules
from datamodules import IGNORE_INDEX, chat
from evaluation import evaluate
from modeling import models
from modeling.models import CHATML
from runtime.training import run as train
from tests.conftest import compose_config

SAMPLES = Path(datamodules.__file__).parent / "samples" / "gsm8k"


def tiny_task(*overrides: str, template: str | None = CHATML, config_name: str = "train"):
    """A tiny model's task, its byte-level tokenizer given `template`."""
    cfg = compose_config("model=tiny_llama", "task.source=bundled", *overrides, config_name=config_name)
    tokenizer = models.build_tokenizer(cfg.model)
    tokenizer.chat_template = template
    return datamodules.build_task(cfg, tokenizer)


def test_auto_renders_in_the_template_only_for_a_chat_model_whose_tokenizer_has_one() -> None:
    assert tiny_task("model.chat=true").chat_style is not None
    assert tiny_task("model.chat=false").chat_style is None
    assert tiny_task("model.chat=true", template=None).chat_style is None
    assert tiny_task("prompt.chat_template=true").chat_style is not None
    assert tiny_task("model.chat=true", "prompt.chat_template=false").chat_style is None
    with pytest.raises(ValueError, match="prompt.chat_template=true: this model's tokenizer has no chat"):
        tiny_task("prompt.chat_template=true", template=None)
    # HotpotQA's cloze pieces stay plain text (as ROME / MEMIT read facts); asking for a template is refused
    assert tiny_task("model.chat=true", "task=hotpotqa").chat_style is None
    with pytest.raises(ValueError, match="task 'hotpotqa' prompts in plain text only"):
        tiny_task("prompt.chat_template=true", "task=hotpotqa")


def test_old_prompting_key_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"prompting.\* is now prompt.\*"):
        tiny_task("+prompting={style: lm_eval}", config_name="evaluate")


@pytest.mark.parametrize("task_name", ["gsm8k", "classification"])
def test_training_supervises_the_assistant_turn_only(task_name: str) -> None:
    task = tiny_task(f"task={task_name}", "prompt.chat_template=true", "prompt.system=Be brief.")
    record = task.records("train")[0]
    prompt, target = task.format_example(record)
    example = task.tokenize_record(record)
    supervised = task.tokenizer.decode([t for t in example["labels"] if t != IGNORE_INDEX])
    assert supervised == target.strip() + "<|im_end|>\n"
    whole = task.tokenizer.decode(example["input_ids"])
    expected = f"<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n{prompt}<|im_end|>\n"
    assert whole == expected + "<|im_start|>assistant\n" + target.strip() + "<|im_end|>\n"
    # evaluation prompts the same conversation, up to the generation prompt
    assert task.prompt_format.prompt(record, []) == expected + "<|im_start|>assistant\n"


def test_a_run_is_evaluated_in_the_rendering_it_trained_in(tiny_config, tmp_path: Path) -> None:
    for setting in ("true", "false"):
        run = train(
            tiny_config(
                "model=tiny_llama",
                f"prompt.chat_template={setting}",
                "model.chat=true",  # auto would render in the template: the run's own setting must win
                "trainer.max_steps=1",
                "data.max_train_samples=4",
                "data.val_size=2",
                run_dir=tmp_path / setting,
            )
        )
        cfg = compose_config(
            f"ckpt={run['run_dir']}",
            "task.source=bundled",
            "limit=1",
            "generation.max_new_tokens=2",
            config_name="evaluate",
        )
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp_path / f"eval_{setting}")
        evaluate.run(cfg)
        prompt = json.loads((tmp_path / f"eval_{setting}" / "predictions.jsonl").read_text())["prompt"]
        assert prompt.startswith("<|im_start|>") == (setting == "true")


def test_fewshot_exemplars_as_turns_or_in_one_user_message() -> None:
    overrides = ("prompt.chat_template=true", "prompt.num_fewshot=2")
    records = tiny_task(*overrides).records("test")
    exemplars = tiny_task(*overrides).records("train")[:2]
    turns = tiny_task(*overrides, "prompt.fewshot_as_multiturn=true").prompt_format.prompt(
        records[0], exemplars
    )
    assert turns.count("<|im_start|>user") == 3 and turns.count("<|im_start|>assistant") == 3
    folded = tiny_task(*overrides).prompt_format.prompt(records[0], exemplars)
    assert folded.count("<|im_start|>user") == 1 and folded.count("<|im_start|>assistant") == 1


def test_attention_spans_follow_the_template() -> None:
    for template_on in (False, True):
        task = tiny_task("task=gsm8k_inf", f"prompt.chat_template={str(template_on).lower()}")
        record = task.records("test")[0]
        text, spans = task.attention_input(record)
        assert text.startswith("<|im_start|>") == template_on
        question = task.problem(record)
        assert [text[start:end] for start, end, _ in spans] == [
            question.question[s.start : s.end] for s in question.spans
        ]


def test_a_beginning_of_sequence_token_is_not_doubled() -> None:
    tokenizer = models.byte_level_tokenizer()
    tokenizer._tokenizer.post_processor = TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tokenizer.bos_token_id)]
    )
    tokenizer.chat_template = "{{ bos_token }}" + CHATML
    text = chat.render(tokenizer, [{"role": "user", "content": "hi"}], add_generation_prompt=True)
    ids = tokenizer(text)["input_ids"]
    assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id


def lm_eval_prompts(tokenizer, files: dict[str, str], shots: int, multiturn: bool, system: str | None):
    """lm-eval's own gsm8k task (its yaml, these files) with `--apply_chat_template`, rendered and encoded by
    its HF model's own methods on `tokenizer`."""
    import lm_eval.tasks
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.models.huggingface import HFLM

    config = yaml.safe_load((Path(lm_eval.tasks.__file__).parent / "gsm8k" / "gsm8k.yaml").read_text())
    config |= {"dataset_path": "json", "dataset_name": None, "dataset_kwargs": {"data_files": files}}
    config |= {"num_fewshot": shots}
    config.pop("tag", None)
    task = ConfigurableTask(config=config)
    task.set_fewshot_seed(1234)  # simple_evaluate's default fewshot_random_seed
    model = types.SimpleNamespace(
        tokenizer=tokenizer, chat_template_args={}, backend="causal", add_bos_token=None
    )
    task.build_all_requests(
        apply_chat_template=True,
        fewshot_as_multiturn=multiturn,
        system_instruction=system,
        chat_template=lambda history, add_generation_prompt=True: HFLM.apply_chat_template(
            model, history, add_generation_prompt
        ),
    )
    prompts = [instance.args[0] for instance in sorted(task.instances, key=lambda i: i.doc_id)]
    return [HFLM.tok_batch_encode(model, [prompt])[0][0].tolist() for prompt in prompts]


@pytest.mark.parametrize(
    ("shots", "multiturn", "system"), [(0, False, None), (5, True, None), (5, False, "Be exact.")]
)
def test_gsm8k_chat_prompts_are_lm_evals_token_for_token(tmp_path: Path, shots, multiturn, system) -> None:
    """SmolLM2's template, 40 test problems (the bundled 8 test and 32 train), exemplars from the train
    split."""
    test = tmp_path / "test.jsonl"
    test.write_text((SAMPLES / "test.jsonl").read_text() + (SAMPLES / "train.jsonl").read_text())
    files = {"train": str(SAMPLES / "train.jsonl"), "test": str(test)}
    cfg = compose_config(
        "model=smollm2_135m",
        f"task.data_files={{train: {files['train']}, test: {files['test']}}}",
        "prompt.style=lm_eval",
        f"prompt.num_fewshot={shots}",
        f"prompt.fewshot_as_multiturn={str(multiturn).lower()}",
        *([f"prompt.system='{system}'"] if system else []),
        config_name="evaluate",
    )
    tokenizer = models.build_tokenizer(cfg.model)
    task = datamodules.build_task(cfg, tokenizer)
    assert task.chat_style is not None  # auto: SmolLM2-135M-Instruct is a chat model with a template
    records = task.evaluation_records()
    exemplars = task.prompt_format.fewshot_exemplars(records, shots, cfg.prompt.fewshot_seed)
    mine = [
        tokenizer(task.prompt_format.prompt(r, e))["input_ids"]
        for r, e in zip(records, exemplars, strict=True)
    ]
    theirs = lm_eval_prompts(tokenizer, files, shots, multiturn, system)
    assert len(mine) == len(theirs) == 40
    assert mine == theirs
