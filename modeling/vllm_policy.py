"""Sampling a policy's completions with a vLLM engine in the training process (`objective.generation_backend=
vllm`, docs/rl.md). The engine starts from the policy's config and tokenizer with placeholder weights; before
every generation batch it is handed the policy's current weights as a checkpoint names them (an adapter merged
into copies of the layers it changes, so the training model stays bit-for-bit what it was). Prompts go in as
lmlab's token ids and completions come back as token ids (up to and including the EOS token or the token that
completed a stop string, as lmlab's own sampler returns them). Each prompt's seed is drawn from torch's global
RNG, which checkpoints keep: a resumed run draws the same seeds."""

from __future__ import annotations

import contextlib
import copy
import os
import tempfile
from collections.abc import Collection, Sequence
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.core_model_loading import revert_weight_conversion

from modeling.architecture import bare_model

INSTALL_HINT = "pip install 'lmlab[vllm]' (docs/scaling.md lists the versions that install beside lmlab's)"


def merged_layer_weights(chain: list[BaseTunerLayer]) -> dict[str, torch.Tensor]:
    """Copies of the base parameters under a tuned layer, with the active adapters of that layer and of the
    tuned layers it wraps (peft nests one wrapper per adapted parameter of a mixture's experts) merged in; the
    layers are left exactly as they were (restored from a copy, not by subtracting the merge back out)."""
    base = chain[0].get_base_layer()
    before = {name: value.detach().clone() for name, value in base.named_parameters()}
    for layer in chain:
        layer.merge()
    merged = {name: value.detach().clone() for name, value in base.named_parameters()}
    for layer in reversed(chain):
        layer.unmerge()
    with torch.no_grad():
        for name, value in base.named_parameters():
            value.copy_(before[name])
    return merged


def _inside(name: str, modules: Collection[str]) -> bool:
    """Whether the dotted path `name` lies strictly inside one of the module paths `modules`."""
    path = name.split(".")
    return any(".".join(path[:end]) in modules for end in range(1, len(path)))


def checkpoint_weights(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """The policy's weights under the names its checkpoint uses (what `save_pretrained` writes, vLLM
    loads): a peft adapter merged into copies of the layers it tunes, every other tensor as it is."""
    base = bare_model(model)
    tuned = {name: layer for name, layer in base.named_modules() if isinstance(layer, BaseTunerLayer)}
    outermost = {name for name in tuned if not _inside(name, tuned)}
    weights = {
        name: value.detach() for name, value in base.named_parameters() if not _inside(name, outermost)
    }
    for name in outermost:
        chain = [inner for path, inner in tuned.items() if path == name or path.startswith(f"{name}.")]
        weights |= {f"{name}.{key}": value for key, value in merged_layer_weights(chain).items()}
    return revert_weight_conversion(base, weights)


def check_servable(model: PreTrainedModel) -> None:
    """Refuse a policy whose function a plain checkpoint of its architecture cannot hold: virtual prompt
    tokens, or modules the architecture lacks (bottleneck adapters)."""
    key = "objective.generation_backend=vllm"
    config = getattr(model, "active_peft_config", None)
    if config is not None and config.is_prompt_learning:
        raise ValueError(
            f"{key}: {config.peft_type.value} prepends trained virtual tokens to every input, which vLLM "
            "cannot serve; use objective.generation_backend=lmlab"
        )
    base = bare_model(model)
    with torch.device("meta"):
        plain = type(base)(base.config)
    expected = revert_weight_conversion(plain, dict(plain.named_parameters()))
    extra = sorted(set(checkpoint_weights(model)) - set(expected))
    if extra:
        raise ValueError(
            f"{key}: the policy has weights its architecture lacks ({', '.join(extra[:3])}, ...), which "
            "vLLM cannot serve; use objective.generation_backend=lmlab"
        )


def _tied_output_name(model: PreTrainedModel) -> str | None:
    """The checkpoint name of the output layer's weight when it is tied to the input embeddings, else None."""
    output = model.get_output_embeddings()
    if not model.config.get_text_config().tie_word_embeddings or output is None:
        return None
    return next(f"{name}.weight" for name, module in model.named_modules() if module is output)


class VLLMPolicySampler:
    """A vLLM engine that samples with the policy's current weights (`sync` before each generation batch)."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        settings: dict[str, Any],
        trust_remote_code: bool = False,
    ) -> None:
        try:
            from vllm import LLM
        except ModuleNotFoundError as error:
            raise ModuleNotFoundError(
                f"objective.generation_backend=vllm needs vLLM: {INSTALL_HINT}"
            ) from error
        check_servable(model)
        base = bare_model(model)
        self.folder = tempfile.TemporaryDirectory(prefix="lmlab-vllm-policy-")
        config = copy.deepcopy(base.config)
        config.architectures = [type(base).__name__]  # a model built from config names none
        # an output layer of its own, loaded at every sync: vLLM's in-place reload leaves a tied one behind
        self.output_name = _tied_output_name(base)
        config.tie_word_embeddings = False
        config.save_pretrained(self.folder.name)
        if base.generation_config is not None:
            base.generation_config.save_pretrained(self.folder.name)
        tokenizer.save_pretrained(self.folder.name)
        # the engine runs in this process, so weights pass to it as tensors, not through a socket
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        self.engine = LLM(
            model=self.folder.name,
            load_format="dummy",  # placeholder weights: `sync` loads the policy's
            dtype=str(settings["dtype"] or str(base.dtype).removeprefix("torch.")),
            gpu_memory_utilization=float(settings["gpu_memory_utilization"]),
            trust_remote_code=trust_remote_code,
            seed=0,
            **dict(settings["engine_args"] or {}),
        )
        self.checked = False  # whether the engine has been seen to compute the policy
        self.device_type = base.device.type
        # the largest mean log-prob difference accepted: float32 kernels agree closely, 16-bit ones less
        self.tolerance = settings["check_tolerance"] or (1e-2 if base.dtype == torch.float32 else 0.1)

    def sync(self, model: PreTrainedModel, probe_ids: list[int]) -> None:
        """Load the policy's current weights into the engine and drop its cached prefixes; after the first
        load, check on `probe_ids` that the engine computes the policy's log-probs."""
        with self.own_precision():
            weights = checkpoint_weights(model)
            if self.output_name is not None:
                weights[self.output_name] = bare_model(model).get_output_embeddings().weight.detach()
            self.engine.collective_rpc(
                "reload_weights",
                kwargs={"weights_iterator": iter(weights.items()), "is_checkpoint_format": True},
            )
            self.engine.reset_prefix_cache()
            if self.checked:
                return
            difference, tolerance = self.difference(model, probe_ids), self.tolerance
        if not difference <= tolerance:
            base = bare_model(model)
            raise RuntimeError(
                "objective.generation_backend=vllm: after loading the policy's weights, the engine's "
                f"log-probs of a prompt differ from the policy's by {difference:.3g} on average (tolerance "
                f"{tolerance:g} in {base.dtype}): this vLLM build does not reload {type(base).__name__} in "
                "place; use objective.generation_backend=lmlab"
            )
        self.checked = True

    def own_precision(self) -> contextlib.AbstractContextManager:
        """Autocast off: a mixed-precision training step runs in autocast, which would otherwise reach the
        adapter merges, the engine's forward (it runs in this thread) and the check's policy forward."""
        return torch.autocast(self.device_type, enabled=False)

    def difference(self, model: PreTrainedModel, probe_ids: list[int]) -> float:
        """Mean absolute difference between the engine's and the policy's log-probs of each token of
        `probe_ids` after the first."""
        from vllm import SamplingParams

        request = [{"prompt_token_ids": list(probe_ids)}]
        [result] = self.engine.generate(
            request, SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False
        )
        targets = probe_ids[1:]
        engine = [
            entry[token].logprob for entry, token in zip(result.prompt_logprobs[1:], targets, strict=True)
        ]
        model.eval()
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([probe_ids], device=model.device)).logits[0, :-1].float()
        policy = logits.log_softmax(-1).gather(-1, torch.tensor(targets, device=logits.device)[:, None])[:, 0]
        return float((policy.cpu() - torch.tensor(engine)).abs().mean())

    def sample(
        self,
        prompt_ids: Sequence[list[int]],
        num_samples: int,
        max_new_tokens: int,
        stop_strings: Sequence[str],
        temperature: float,
        top_p: float,
    ) -> list[list[list[int]]]:
        """`num_samples` completions of each prompt as token ids, in prompt order."""
        from vllm import SamplingParams

        seeds = torch.randint(0, 2**62, (len(prompt_ids),)).tolist()
        params = [
            SamplingParams(
                n=num_samples, temperature=temperature, top_p=top_p, max_tokens=max_new_tokens,
                stop=list(stop_strings), seed=seed,
            )
            for seed in seeds
        ]  # fmt: skip
        prompts = [{"prompt_token_ids": list(ids)} for ids in prompt_ids]
        with self.own_precision():
            results = self.engine.generate(prompts, params, use_tqdm=False)
        return [[list(completion.token_ids) for completion in result.outputs] for result in results]
