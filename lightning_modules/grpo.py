"""GRPO (Shao et al. 2024, DeepSeekMath) as a LightningModule: per prompt a group of sampled completions from
the current policy (lmlab's own batched generation with a KV cache, or a vLLM engine in the process that gets
the policy's weights before each generation batch: modeling/vllm_policy.py), rewards from the task's scorer,
group-relative advantages, and the clipped importance-ratio loss with an optional KL penalty to the reference
policy (lightning_modules/policy_losses.py, TRL's definitions). One training batch is one generation batch of
prompts; with `num_iterations` > 1 the DataModule repeats it and its completions, old log-probs and
advantages are reused for that many optimiser steps (kept in checkpoints, so a resume mid-reuse is exact).
Validation and test generate greedily: the mean reward and Pass@1 (Wilson interval), and pass@k from
`val_samples` sampled completions (the unbiased estimator)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import PreTrainedModel

from datamodules.task import Task
from lightning_modules.base import OptimisedModule, module_settings
from lightning_modules.policy_losses import group_advantages, grpo_loss
from lightning_modules.rollouts import ReferencePolicy, Reward, completion_batch, completion_log_probs
from modeling.generation import generate, sample_token_ids, truncate_at_stop
from modeling.vllm_policy import VLLMPolicySampler
from stats.estimates import wilson
from stats.sampled import pass_at_k

ROLLOUT_KEY = "grpo_rollout"  # the checkpoint entry of a generation batch still being reused


@dataclass
class Rollout:
    """One generation batch: its completions as a training batch [N, T], their advantages [N], the sampling
    policy's log-probs [N, K] (and the reference's, with a KL term), and the optimiser steps it has served."""

    batch: dict[str, torch.Tensor]
    advantages: torch.Tensor
    old_log_probs: torch.Tensor | None  # None: one step per generation batch (the ratio's denominator is the
    # step's own log-probs, detached)
    ref_log_probs: torch.Tensor | None
    uses: int = 0


class GRPOModule(OptimisedModule):
    """Group-relative policy optimisation of any causal LM (plain or peft-wrapped) on a task with a reward."""

    def __init__(
        self,
        model: PreTrainedModel,
        task: Task,
        reward: Reward,
        objective: dict[str, Any],
        lr: float = 1e-5,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_ratio: float = 0.0,
        metrics_every_n_steps: int = 1,
        trust_remote_code: bool = False,
    ) -> None:
        super().__init__(model, lr, weight_decay, betas, warmup_ratio, metrics_every_n_steps)
        self.model, self.task, self.reward = model, task, reward
        self.settings, self.trust_remote_code = objective, trust_remote_code
        # objective.generation_backend=vllm: the engine, started at fit start
        self.sampler: VLLMPolicySampler | None = None
        self.group_size = int(objective["num_generations"])
        self.stop_strings = task.prompt_format.stop_strings(list(objective["stop_strings"]))
        if objective["disable_dropout"]:
            for layer in model.modules():
                if isinstance(layer, torch.nn.Dropout):
                    layer.p = 0.0
        self.reference = ReferencePolicy(model) if objective["beta"] else None
        self.rollout: Rollout | None = None
        self.evaluated: dict[str, list[tuple[float, float, float]]] = {}  # stage: (reward, success, pass@k)

    @classmethod
    def from_config(cls, model: PreTrainedModel, cfg: DictConfig, task: Task) -> GRPOModule:
        """The module of a train.py config: `objective.*`, the task's reward, `optim.*`."""
        objective = OmegaConf.to_container(cfg.objective, resolve=True)
        weights = objective["reward"] or {task.reward_score: 1.0}
        return cls(
            model, task, Reward(task.prompt_format.score, weights, objective["format_reward"]), objective,
            **module_settings(cfg), trust_remote_code=bool(cfg.model.get("trust_remote_code")),
        )  # fmt: skip

    def on_fit_start(self) -> None:
        """Start the vLLM engine that samples the rollouts (objective.generation_backend=vllm)."""
        super().on_fit_start()
        if self.settings["generation_backend"] != "vllm" or self.sampler is not None:
            return
        if self.trainer.world_size > 1:
            raise ValueError(
                f"objective.generation_backend=vllm runs one engine in one training process, not "
                f"{self.trainer.world_size}: train on one device or use objective.generation_backend=lmlab"
            )
        self.sampler = VLLMPolicySampler(
            self.model, self.task.tokenizer, self.settings["vllm"], self.trust_remote_code
        )

    def make_rollout(self, prompts: list[dict[str, Any]]) -> Rollout:
        """Sample `num_generations` completions per prompt, score them, and fix their advantages and the
        sampling policy's log-probs."""
        settings, tokenizer = self.settings, self.task.tokenizer
        if self.sampler is not None:
            self.sampler.sync(self.model, prompts[0]["prompt_ids"])
            completions = self.sampler.sample(
                [p["prompt_ids"] for p in prompts], self.group_size, settings["max_completion_length"],
                self.stop_strings, settings["temperature"], settings["top_p"],
            )  # fmt: skip
        else:
            completions = sample_token_ids(
                self.model, tokenizer, [p["prompt"] for p in prompts], self.group_size,
                settings["generation_batch_size"], settings["max_completion_length"], self.stop_strings,
                settings["temperature"], settings["top_p"],
            )  # fmt: skip
        self.model.train()
        flat = [ids for group in completions for ids in group]  # [N] = prompts x G, each prompt's together
        references = [p["reference"] for p in prompts for _ in range(self.group_size)]
        rewards = torch.tensor(
            [self.reward(self._text(ids), ref)[0] for ids, ref in zip(flat, references, strict=True)],
            dtype=torch.float64,
        )
        advantages, flat_group = group_advantages(rewards, self.group_size, settings["scale_rewards"])
        prompt_ids = [p["prompt_ids"] for p in prompts for _ in range(self.group_size)]
        batch = completion_batch(prompt_ids, flat, tokenizer.pad_token_id)
        batch = {name: value.to(self.device) for name, value in batch.items()}
        old = ref = None
        temperature = settings["temperature"]
        if settings["num_iterations"] > 1:
            with torch.no_grad():
                old = completion_log_probs(self.model, batch, temperature)[0]
        if self.reference is not None:
            ref = self.reference.log_probs(self.model, batch, temperature)
        lengths = torch.tensor([len(ids) for ids in flat], dtype=torch.float32)
        self.log_measured(
            {
                "train/reward": rewards.mean(),
                "train/reward_std": rewards.view(-1, self.group_size).std(1).mean(),
                "train/frac_reward_zero_std": flat_group.float().mean(),
                "train/completion_length": lengths.mean(),
                "train/clipped_completions": (lengths >= settings["max_completion_length"]).float().mean(),
            }
        )
        return Rollout(batch, advantages.to(self.device), old, ref)

    def _text(self, ids: list[int]) -> str:
        return truncate_at_stop(self.task.tokenizer.decode(ids, skip_special_tokens=True), self.stop_strings)

    def _shared_step(self, batch: list[dict[str, Any]], stage: str) -> torch.Tensor:
        """Training: the policy loss of a step (a method's regulariser is added by the base class);
        validation and test: `evaluate`."""
        return self.policy_step(batch) if stage == "train" else self.evaluate(batch, stage)

    def policy_step(self, batch: list[dict[str, Any]]) -> torch.Tensor:
        """GRPO's loss on the current generation batch (sampled from `batch` when the last one is used up)."""
        if self.rollout is None or self.rollout.uses >= self.settings["num_iterations"]:
            self.rollout = self.make_rollout(batch)
        rollout = self.rollout
        rollout.uses += 1
        log_probs, mask = completion_log_probs(self.model, rollout.batch, self.settings["temperature"])
        tokens = mask.sum().float()
        if self.trainer.world_size > 1:  # dapo: the generation batch's tokens per process
            tokens = self.trainer.strategy.reduce(tokens, reduce_op="mean")
        result = grpo_loss(
            log_probs,
            log_probs.detach() if rollout.old_log_probs is None else rollout.old_log_probs,
            rollout.advantages.to(log_probs.dtype),
            mask,
            self.settings["loss_type"],
            self.settings["epsilon"],
            self.settings["epsilon_high"] or self.settings["epsilon"],
            self.settings["beta"],
            rollout.ref_log_probs,
            self.settings["max_completion_length"],
            float(tokens),
            self.settings["kl_importance_correction"],
        )
        values = {"loss": result.loss.detach(), "kl": result.kl, "clip_low": result.clip_low}
        for name, value in (values | {"clip_high": result.clip_high}).items():
            self.log(f"train/{name}", value, on_step=True, on_epoch=False, prog_bar=name == "loss")
        return result.loss

    def evaluate(self, batch: list[dict[str, Any]], stage: str) -> torch.Tensor:
        """Greedy completions of `batch` (and `val_samples` sampled ones) scored: kept for the epoch's
        means and intervals."""
        settings, texts = self.settings, [p["prompt"] for p in batch]
        common = {"batch_size": settings["generation_batch_size"], "stop_strings": self.stop_strings}
        common["max_new_tokens"] = settings["max_completion_length"]
        greedy = generate(self.model, self.task.tokenizer, texts, **common)
        k = settings["val_samples"]
        sampled = (
            generate(self.model, self.task.tokenizer, texts, **common, do_sample=True, num_samples=k,
                     temperature=settings["temperature"], top_p=settings["top_p"])
            if k > 1 else [[] for _ in texts]
        )  # fmt: skip
        key = self.reward.success_key
        for prompt, [text], samples in zip(batch, greedy, sampled, strict=True):
            reward, scores = self.reward(text, prompt["reference"])
            correct = sum(float(self.reward(s, prompt["reference"])[1][key] or 0) == 1.0 for s in samples)
            at_k = pass_at_k(k, correct, k) if k > 1 else float("nan")
            self.evaluated.setdefault(stage, []).append((reward, float(scores[key] or 0), at_k))
        return torch.zeros(())

    def on_validation_epoch_end(self) -> None:
        self._log_evaluated("val")

    def on_test_epoch_end(self) -> None:
        self._log_evaluated("test")

    def _log_evaluated(self, stage: str) -> None:
        """The stage's means over every process's prompts, Pass@1 with its Wilson interval where it is 0/1."""
        rows = torch.tensor(self.evaluated.pop(stage, []), dtype=torch.float64).view(-1, 3)
        binary = float(set(rows[:, 1].tolist()) <= {0.0, 1.0})
        # [reward sum, successes, pass@k sum, prompts, all 0/1 on every process]
        sums = rows[:, :3].nan_to_num().sum(0).tolist()
        totals = torch.tensor([*sums, len(rows), binary], dtype=torch.float64, device=self.device)
        if self.trainer.world_size > 1:
            reduce = self.trainer.strategy.reduce
            totals = torch.cat([reduce(totals[:4], reduce_op="sum"), reduce(totals[4:], reduce_op="min")])
        rewards, successes, at_k, n, binary = totals.tolist()
        if not n:
            return
        metrics = {f"{stage}/reward": rewards / n, f"{stage}/pass@1": successes / n}
        if binary:
            interval = wilson(int(successes), int(n))
            metrics |= {f"{stage}/pass@1_low": interval.low, f"{stage}/pass@1_high": interval.high}
        if self.settings["val_samples"] > 1:
            metrics[f"{stage}/pass@{self.settings['val_samples']}"] = at_k / n
        for name, value in metrics.items():
            self.log(name, value)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Also keep a generation batch that later steps still reuse."""
        super().on_save_checkpoint(checkpoint)
        reused = self.rollout is not None and self.rollout.uses < self.settings["num_iterations"]
        checkpoint[ROLLOUT_KEY] = asdict(self.rollout) if reused else None

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        saved = checkpoint.get(ROLLOUT_KEY)
        self.rollout = Rollout(**saved) if saved else None
