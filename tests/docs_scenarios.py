"""The documented commands that run here, grouped in scenarios (commands that build on each other's runs),
each with the promise its page makes, and the download commands."""

from __future__ import annotations

from tests import docs_causal, docs_evaluation, docs_first_steps, docs_rl, docs_training
from tests import docs_promises as promise
from tests.docs_workspace import Step

SCENARIOS: dict[str, list[Step]] = {
    **docs_rl.SCENARIOS,
    **docs_causal.SCENARIOS,
    "fine_tune_then_evaluate_it": [
        Step(
            "python train.py model=diffllama task=gsm8k_inf method=lora",
            promise.trained("outputs/gsm8k_inf/tiny_diffllama-lora/*", method="lora"),
        ),
        Step(
            "python evaluate.py task=gsm8k_inf ckpt=outputs/gsm8k_inf/diffllama-lora/<time>",
            promise.evaluated("outputs/eval/gsm8k_inf/*/*", "sft", "tiny_diffllama"),
        ),
        Step("python -m runtime.export ckpt=<run dir> out=merged", docs_training.merged_export),
    ],
    "zero_shot": [
        Step(
            "python evaluate.py model=diffllama task=gsm8k_inf",
            promise.evaluated("outputs/eval/gsm8k_inf/*/*", "zero_shot", "tiny_diffllama"),
        )
    ],
    "noise_grid": [
        Step(
            "python evaluate.py -m model=diffllama,llama task=gsm8k,gsm8k_inf,gsm8k_rcs,gsm8k_sd",
            promise.grid_tables,
        )
    ],
    "noise_study": [
        Step("python -m analysis.noise_study", promise.noise_study),
        Step("python -m analysis.noise_study study=diffllama_noise_quick", promise.noise_study),
    ],
    "attention_on_a_task": [
        Step(
            "python -m analysis.attention model=diffllama task=gsm8k_inf",
            promise.classes_allocated("KMI", "NI", "OC"),
        )
    ],
    "attention_sweep": [
        Step(
            "python -m analysis.attention -m model=diffllama,llama task=gsm8k_inf",
            promise.attention_comparison,
        )
    ],
    "attention_on_text": [
        Step(
            'python -m analysis.attention analysis.text="Tom has 3 apples and eats 1." '
            "analysis.save_maps=true",
            promise.saved_maps,
        )
    ],
    "attention_on_a_text_file": [
        Step("python -m analysis.attention analysis.text_file=prompts.txt", promise.one_figure_per_prompt)
    ],
    "classification_head_then_attention": [
        Step(
            "python train.py task=classification method=projection_head",
            promise.trained("outputs/classification/tiny_llama-projection_head/*", method="projection_head"),
        ),
        Step(
            "python -m analysis.attention task=classification ckpt=<run dir>",
            promise.classes_allocated("LABEL", "TEXT", "OTHER"),
        ),
    ],
    "ripple_two_models_then_compare": [
        Step("python -m analysis.ripple model=gpt2 task=hotpotqa", promise.ripple),
        Step(
            "python -m analysis.ripple model=smollm2_135m task=hotpotqa 'task.data_files={test: "
            "data/hotpotqa/hotpot_dev_distractor.json}' analysis.num_edits=20",
            promise.ripple,
        ),
        Step(
            "python -m analysis.ripple_compare outputs/ripple/hotpotqa/gpt2/<time> "
            "outputs/ripple/hotpotqa/smollm2_135m/<time> --out outputs/ripple/comparison",
            promise.ripple_comparison,
        ),
    ],
    "memit_edit_then_evaluate_it": [
        Step(
            'python -m analysis.memit model=gpt2 \'analysis.requests=[{prompt: "{} plays the sport of", '
            "subject: LeBron James, target: football}]'",
            promise.memit_edit,
        ),
        Step(
            "python evaluate.py ckpt=outputs/memit/gpt2/<time>",
            promise.evaluated("outputs/eval/gsm8k/*/*", "edited", "tiny_gpt2"),
        ),
    ],
    "gradsim_on_local_files": [
        Step(
            "python -m analysis.gradsim model=gpt2 task=hotpotqa 'task.data_files={test: "
            "data/hotpotqa/hotpot_dev_distractor.json}'",
            promise.coupling("mlp.c_proj"),
        )
    ],
    "gradsim_projected": [
        Step(
            "python -m analysis.gradsim model=gpt2 task=hotpotqa analysis.projection_dim=8192",
            promise.coupling("mlp.c_proj"),
        )
    ],
    "gradsim_on_a_stated_matrix": [
        Step(
            "python -m analysis.gradsim model=llama task=hotpotqa model.structure.mlp_output=mlp.up_proj",
            promise.coupling("mlp.up_proj"),
        )
    ],
    "ablation_then_report": [
        Step(
            "python train.py -m task=cosmopedia "
            "experiment=ablation/baseline,ablation/high_lr,ablation/low_lr,"
            "ablation/large_batch,ablation/short_seq,ablation/small_model seed=0,1,2,3,4",
            promise.swept("multirun/cosmopedia/*", 12, "summary.csv"),
        ),
        Step("python -m analysis.ablation multirun/cosmopedia/<time>", promise.ablation_report),
    ],
    "ablation_tiny": [
        Step(
            "python train.py -m task=cosmopedia "
            "experiment=ablation_tiny/baseline,ablation_tiny/high_lr,ablation_tiny/low_lr,"
            "ablation_tiny/large_batch,ablation_tiny/short_seq,ablation_tiny/small_model seed=0,1,2",
            promise.swept("multirun/cosmopedia/*", 12, "summary.csv", "summary_by_config.csv"),
        ),
    ],
    "paired_comparison": [
        Step(
            "python evaluate.py model=diffllama task=gsm8k",
            promise.evaluated("outputs/eval/gsm8k/tiny_diffllama/*", "zero_shot", "tiny_diffllama"),
        ),
        Step(
            "python evaluate.py model=llama task=gsm8k",
            promise.evaluated("outputs/eval/gsm8k/tiny_llama/*", "zero_shot", "tiny_llama"),
        ),
        Step(
            "python -m analysis.compare outputs/eval/gsm8k/diffllama/<time> outputs/eval/gsm8k/llama/<time>",
            promise.compared_runs,
        ),
    ],
    "seed_sweep": [Step("python train.py -m seed=0,1,2 optim.lr=1e-4,3e-4", promise.grouped_over_seeds)],
    "tensorboard_sweep": [
        Step(
            "python train.py -m logger=tensorboard optim.lr=1e-4,3e-4 data.batch_size=4,8",
            promise.tensorboard_events,
        )
    ],
    "optuna": [
        Step(
            "python train.py hparams_search=lora_lr_bs model=smollm2_135m task=gsm8k "
            "hydra.sweeper.n_trials=20",
            promise.optuna_best,
        ),
    ],
    "every_method_on_classification": [
        Step(
            "python train.py -m task=classification "
            "method=full,lora,svd_lora,prompt_tuning,adapter,projection_head",
            promise.methods_table,
        ),
    ],
    "socratic_on_converted_files": [
        Step(
            "python -m datamodules.socratic --input data/gsm8k/test_socratic.jsonl --output "
            "data/socratic.json",
            promise.socratic_json,
        ),
        Step(
            "python train.py -m experiment=socratic_math,socratic_math_qvgd 'task.data_files={train: "
            "data/socratic.json, test: data/socratic.json}'",
            promise.swept("multirun/gsm8k/*", 2, "summary.md"),
        ),
    ],
    "socratic_settings": [
        Step(
            "python train.py -m experiment=socratic_math,socratic_math_qvgd",
            promise.swept("multirun/gsm8k/*", 2, "summary.md"),
        )
    ],
    "socratic_on_a_tiny_model": [
        Step(
            "python train.py experiment=socratic_math model=tiny_qwen2 task.source=bundled trainer=cpu",
            promise.trained("outputs/socratic_math/tiny_qwen2-lora/*"),
        )
    ],
    "train_on_gpu_settings": [
        Step(
            "python train.py model=gpt2 task=gsm8k method=full optim.lr=5e-5 trainer=gpu",
            promise.trained("outputs/gsm8k/tiny_gpt2-full/*", method="full"),
        )
    ],
    "smoke_check": [
        Step(
            "python train.py model=tiny_llama task=gsm8k task.source=bundled trainer=debug",
            promise.fast_dev_run,
        )
    ],
    "local_gsm8k_files": [
        Step(
            "python train.py task=gsm8k 'task.data_files={train: data/gsm8k/train.jsonl, "
            "test: data/gsm8k/test.jsonl}'",
            promise.trained("outputs/gsm8k/tiny_llama-lora/*"),
        )
    ],
    "noisy_test_sets": [
        Step(
            "python -m datamodules.noise --input data/gsm8k/test.jsonl --out-dir data/noisy",
            promise.noisy_sets,
        )
    ],
    "lm_eval_gsm8k": [
        Step(
            "python evaluate.py task=gsm8k prompt.style=lm_eval prompt.num_fewshot=5",
            promise.lm_eval_prompts,
        )
    ],
    "llm_judge": [
        Step(
            "python evaluate.py task=classification judge=openai_compatible "
            "judge.base_url=http://localhost:8000/v1 "
            "judge.model=qwen2.5-7b-instruct",
            promise.judged,
        )
    ],
    "any_hub_model": [
        Step(
            "python train.py model=hf_causal_lm model.hub_id=Qwen/Qwen2.5-0.5B method=lora",
            promise.trained("outputs/gsm8k/hf_causal_lm-lora/*"),
        )
    ],
    "a_saved_model": [
        Step(
            "python train.py model=hf_causal_lm model.path=saved/my_model method=adapter",
            promise.trained("outputs/gsm8k/hf_causal_lm-adapter/*", method="adapter"),
        )
    ],
    "remote_code": [
        Step(
            "python train.py model=minimind2 model.revision=<commit> method=lora task=gsm8k",
            promise.trained("outputs/gsm8k/minimind2-lora/*", model="minimind2"),
        )
    ],
    "fsdp_on_cpu": [
        Step(
            "python train.py trainer=fsdp trainer.accelerator=cpu trainer.devices=2 "
            "trainer.precision=32-true model=tiny_llama method=lora",
            promise.fsdp_tested,
        )
    ],
    "data_parallel_evaluation": [
        Step(
            "python evaluate.py model=smollm2_135m task=gsm8k devices=2 accelerator=cpu",
            promise.evaluated("outputs/eval/gsm8k/tiny_llama/*", "zero_shot", "tiny_llama", processes=2),
        )
    ],
    "submitit_local": [
        Step(
            "python train.py -m hydra/launcher=submitit_local data.batch_size=4,8",
            promise.swept("multirun/gsm8k/*", 2, "summary.csv"),
        )
    ],
    "sbatch_script": [
        Step(
            "python -m runtime.slurm model=llama2_13b trainer=fsdp trainer.devices=8 trainer.num_nodes=2 "
            "method=lora",
            promise.sbatch_script,
        )
    ],
}

# README's first steps (tests/docs_first_steps.py) and docs/evaluation.md's chat templates, pass@k, own data
# and lm-eval benchmarks (tests/docs_evaluation.py)
for module in (docs_first_steps, docs_evaluation):
    SCENARIOS |= {name: [Step(*step) for step in steps] for name, steps in module.SCENARIOS.items()}

DOWNLOADS = (
    "python -m datamodules.download gsm8k --out data/",
    "python -m datamodules.download hotpotqa --out data/",
)
