"""Test-only helpers: Lightning callbacks passed to the real entrypoint with `+callbacks.<name>._target_=...`,
model outputs of a collated batch, a reference greedy decode and a fake OpenAI-compatible judge endpoint."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import lightning as L
import torch
from safetensors.torch import save_file

from datamodules.padding_free import model_inputs
from runtime import saved_run


class InterruptAtEpoch(L.Callback):
    """Simulates Ctrl-C at the start of epoch `epoch` (after the previous epoch's checkpoint)."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            raise KeyboardInterrupt


class PoisonWeightsAtStep(L.Callback):
    """Sets every trainable weight to NaN before optimizer step `step`, so the loss becomes NaN."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int
    ) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                for parameter in pl_module.parameters():
                    if parameter.requires_grad:
                        parameter.fill_(float("nan"))


class DumpWeightsPerRank(L.Callback):
    """Writes each rank's trainable weights to `<dirpath>/weights_rank<r>.safetensors` at the end of fit."""

    def __init__(self, dirpath: str) -> None:
        self.dirpath = Path(dirpath)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.dirpath.mkdir(parents=True, exist_ok=True)
        state = {
            n: p.detach().clone().contiguous() for n, p in pl_module.named_parameters() if p.requires_grad
        }
        save_file(state, self.dirpath / f"weights_rank{trainer.global_rank}.safetensors")


class InterruptAtStep(L.Callback):
    """Simulates a kill before optimizer step `step` runs: Ctrl-C (KeyboardInterrupt) or a real SIGKILL of the
    process."""

    def __init__(self, step: int, kill: bool = False) -> None:
        self.step, self.kill = step, kill

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int
    ) -> None:
        if trainer.global_step == self.step:
            if self.kill:
                os.kill(os.getpid(), signal.SIGKILL)
            raise KeyboardInterrupt


class FailAtTest(L.Callback):
    """Fails the test stage as it starts (after fit), as a crash in a later stage would."""

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        raise RuntimeError("the test stage broke")


class RecordOutputs(L.Callback):
    """At the end of fit, writes the first validation batch and the trained module's outputs on it (eval mode)
    to `path`: the LM logits, or the class scores of a classifier."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        batch = next(iter(trainer.datamodule.val_dataloader()))
        batch = {key: value.to(pl_module.device) for key, value in batch.items()}
        pl_module.eval()
        with torch.no_grad():
            outputs = module_outputs(pl_module, batch)
        pl_module.train()
        save_file(
            {"outputs": outputs.contiguous(), **{k: v.contiguous() for k, v in batch.items()}}, self.path
        )


def load_saved(cfg) -> tuple:
    """(model, tokenizer) of an evaluate.py config, resolved as evaluate.py resolves it."""
    return saved_run.load(saved_run.resolve(cfg), cfg.paths.cache_dir)


def module_outputs(module: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """A task module's outputs on `batch`: class scores [B, C] (a classifier), else the LM logits [B, T,
    V]."""
    if hasattr(module, "predict_classes"):
        return module.predict_classes(batch)
    return lm_logits(module.model, batch)


def lm_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """A causal LM's logits on a collated batch, padded [B, T, V] or padding-free [1, N, V]."""
    return model(**model_inputs({key: value for key, value in batch.items() if key != "labels"})).logits


def greedy_without_cache(model: torch.nn.Module, tokenizer, prompt: str, steps: int) -> str:
    """The reference greedy decode: a full forward of the whole sequence for every new token, no cache."""
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    new: list[int] = []
    with torch.no_grad():
        for _ in range(steps):
            token = int(model(input_ids=ids).logits[0, -1].argmax())
            new.append(token)
            if token == tokenizer.eos_token_id:
                break
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return tokenizer.decode(new, skip_special_tokens=True)


class FakeEndpoint(BaseHTTPRequestHandler):
    """Chat completions whose behaviour the prompt chooses: SLOW, FAIL500, FLAKY (two 500/429 then ok),
    BAD."""

    calls: dict[str, int] = {}
    auth: list[str] = []

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][0]["content"]
        FakeEndpoint.auth.append(self.headers.get("Authorization", ""))
        count = FakeEndpoint.calls[prompt] = FakeEndpoint.calls.get(prompt, 0) + 1
        if "SLOW" in prompt:
            time.sleep(1.0)
        if "FAIL500" in prompt or ("FLAKY" in prompt and count <= 2):
            self.send_response(429 if count == 1 and "FLAKY" in prompt else 500)
            self.end_headers()
            return
        reply = (
            "Maybe, it depends."
            if "BAD" in prompt
            else ("Yes." if "Predicted label: World" in prompt else "no")
        )
        payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def serving(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """An OpenAI-compatible base URL on 127.0.0.1 answered by `handler`, for the duration of the block."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()


# an lm-eval multiple-choice task over a local JSONL file of {question, choices, label} records (no network)
MULTIPLE_CHOICE_TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
fewshot_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def lm_eval_tasks(folder: Path, names: list[str], questions: list[dict]) -> Path:
    """`folder` holding one multiple-choice lm-eval task per name over `questions` (an `include_path`)."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "questions.jsonl"
    data.write_text("".join(json.dumps(question) + "\n" for question in questions))
    for name in names:
        (folder / f"{name}.yaml").write_text(MULTIPLE_CHOICE_TASK.format(name=name, data=data))
    return folder
