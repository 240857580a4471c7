"""The GPU check: what lmlab's fast paths do on a CUDA device, written to one JSON (`make gpu-check`, a few
minutes on one GPU).

1. SmolLM2-135M-Instruct, bf16-mixed, LoRA and full fine-tuning on GSM8K: tokens/s and MFU (the
   ThroughputMonitor, from the FLOPs lmlab counts for every batch: modeling/flops.py);
2. a Llama of about 375M parameters trained from scratch (the shape of the Llama-375M / DiffLlama-375M pair:
   hidden 1024, 24 layers, 16 heads, SmolLM tokenizer) on packed text: tokens/s and MFU;
3. padding-free vs padded LoRA batches with sdpa and flash attention (flash where `flash-attn` is installed):
   tokens/s and the per-step losses of both;
4. continuous-batching generation vs one prompt at a time: identical completions, generated tokens/s;
5. FSDP over every visible GPU (two or more): a LoRA run that trains, tests and exports;
6. data-parallel evaluation over every visible GPU (two or more): `evaluate.py devices=N` against one process,
   identical completions and the speed ratio (goal 0.9 x N);
7. a model spread over every visible GPU (`model.device_map=balanced`) against one GPU: identical completions;
8. `generation.backend=vllm` against lmlab's own generation (where vLLM is installed): identical completions
   and the speed ratio;
9. QLoRA: LoRA on SmolLM2's NF4-quantized base (`model.quantization=nf4`) against LoRA on its bf16 weights
   (`model.dtype=bfloat16`): the peak GPU memory of training and the losses (where bitsandbytes is installed).

    python bench/gpu_check.py [--out gpu_check.json] [--steps 30]
    python bench/gpu_check.py --quick      # tiny models, a few steps, any device: checks the script itself

Ends with `ratio padding_free_vs_padded_<attention> = <x> (goal >= 1.3)` lines and
`ratio eval_data_parallel_vs_one_process = <x> (goal >= 0.9 x N)`, `ratio vllm_vs_lmlab = <x> (goal >= 1.0)`,
`ratio qlora_vs_bf16_lora_peak_memory = <x> (goal <= 0.8)`.
"""

from __future__ import annotations

import argparse
import csv
import gc
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(ROOT / "bench"))
from helpers import quick as quick_mode  # noqa: E402
from helpers.gpu_evaluation import data_parallel_evaluation, sharded_evaluation, vllm_generation  # noqa: E402

from modeling import models  # noqa: E402
from modeling.generation import generate  # noqa: E402
from runtime.training import run  # noqa: E402

LLAMA_375M = (
    "+model.architecture={model_type:llama,hidden_size:1024,intermediate_size:2816,num_hidden_layers:24,"
    "num_attention_heads:16,num_key_value_heads:16,max_position_embeddings:2048,tie_word_embeddings:false}"
)


def train(run_dir: Path, overrides: list[str], quick: bool) -> dict[str, Any]:
    """One train.py run on the device; its tokens/s, MFU and per-step losses from its metrics."""
    from omegaconf import open_dict

    device = [] if quick else ["trainer=gpu"]
    cfg = compose_config(
        *device,
        "logger=csv",
        "print_config=false",
        "trainer.enable_progress_bar=false",
        "test_after_fit=false",
        "+trainer.limit_val_batches=0",
        "task.source=bundled",
        *overrides,
    )
    with open_dict(cfg):
        cfg.paths.output_dir = str(run_dir)
    started = time.perf_counter()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    results = run(cfg)
    peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    rows = list(csv.DictReader((run_dir / "metrics" / "metrics.csv").open()))
    last = lambda key: next((float(r[key]) for r in reversed(rows) if r.get(key)), None)  # noqa: E731
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {
        "seconds": round(time.perf_counter() - started, 1),
        "global_step": results["global_step"],
        "padding_free": results["padding_free"],
        "tokens_per_s": last("train/device/items_per_sec"),
        "mfu": last("train/device/mfu"),
        "peak_memory_mib": peak,
        "losses": [float(r["train/loss_step"]) for r in rows if r.get("train/loss_step")],
    }


def compose_config(*overrides: str, config_name: str = "train"):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name, overrides=list(overrides))


def generation(quick: bool) -> dict[str, Any]:
    cfg = compose_config("model=tiny_llama" if quick else "model=smollm2_135m", config_name="evaluate")
    model, tokenizer = models.build(cfg.model)
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    prompts = [f"Question: {a} apples and {a + 2} pears. How many fruits?\nAnswer:" for a in range(3, 19)]
    start = time.perf_counter()
    batched = [c[0] for c in generate(model, tokenizer, prompts, batch_size=8, max_new_tokens=64)]
    seconds = time.perf_counter() - start
    alone = [generate(model, tokenizer, [p], batch_size=1, max_new_tokens=64)[0][0] for p in prompts]
    tokens = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in batched)
    return {
        "identical": sum(a == b for a, b in zip(batched, alone, strict=True)),
        "prompts": len(prompts),
        "tokens_per_s": round(tokens / seconds, 1),
        "device": str(model.device),
    }


def fsdp(run_dir: Path, quick: bool) -> dict[str, Any]:
    devices = torch.cuda.device_count()
    if devices < 2 and not quick:
        return {"skipped": f"{devices} GPU visible; FSDP needs two or more"}
    hardware = (
        ["trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true"]
        if quick
        else [f"trainer.devices={devices}"]
    )
    command = [
        "train.py",
        "trainer=fsdp",
        *hardware,
        "model=tiny_llama" if quick else "model=smollm2_135m",
        "method=lora",
        "task.source=bundled",
        "trainer.max_steps=4",
        "logger=csv",
        "print_config=false",
        f"hydra.run.dir={run_dir}",
    ]
    result = quick_mode.run_python(command, check=False)
    if result.returncode:
        return {"ok": False, "error": result.stderr[-2000:]}
    results = json.loads((run_dir / "results.json").read_text())
    return {
        "ok": True,
        "devices": 2 if quick else devices,
        "global_step": results["global_step"],
        "test_loss": results["metrics"].get("test/loss"),
        "final_exported": (run_dir / "final").is_dir(),
    }


def qlora_memory(root: Path, smol: str, common: list[str], quick: bool) -> dict[str, Any]:
    """LoRA on the bf16 base against LoRA on its NF4-quantized base: each run's numbers and the ratio of their
    peak memory (skipped, with the reason, where bitsandbytes cannot quantize)."""
    from modeling.quantization import unavailable_reason

    if reason := unavailable_reason():
        return {"skipped": f"model.quantization=nf4 {reason}"}
    lora = [smol, "method=lora", "model.dtype=bfloat16", *common]
    sides = {"bf16": train(root / "bf16", lora, quick)}
    sides["nf4"] = train(root / "nf4", [*lora, "model.quantization=nf4"], quick)
    return {**sides, "ratio": sides["nf4"]["peak_memory_mib"] / sides["bf16"]["peak_memory_mib"]}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    parser.add_argument("--steps", type=int, default=30)
    args = quick_mode.parse(parser, steps=3)
    smol = "model=tiny_llama" if args.quick else "model=smollm2_135m"
    common = [
        f"trainer.max_steps={args.steps}",
        "trainer.max_epochs=-1",
        "data.batch_size=8",
        "metrics.every_n_steps=1",
    ]
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "quick": args.quick,
    }
    attention = ["sdpa", *(["flash_attention_2"] if importlib.util.find_spec("flash_attn") else [])]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for method in ("lora", "full"):
            report[f"smollm2_{method}"] = train(
                root / method, [smol, f"method={method}", *common], args.quick
            )
        scratch = ["model=tiny_pretrain_baseline"] if args.quick else ["model=pretrain_baseline", LLAMA_375M]
        report["llama_375m_pretraining"] = train(
            root / "pretrain",
            [
                *scratch,
                "task=cosmopedia",
                "method=full",
                "task.text_fields=[question,answer]",
                "data.max_length=512",
                *common,
            ],
            args.quick,
        )
        for implementation in attention:
            for padding_free in (True, False):
                key = f"padding_free_{implementation}" if padding_free else f"padded_{implementation}"
                report[key] = train(
                    root / key,
                    [
                        smol,
                        "method=lora",
                        f"model.attn_implementation={implementation}",
                        f"data.padding_free={padding_free}",
                        *common,
                    ],
                    args.quick,
                )
        report["generation"] = generation(args.quick)
        report["fsdp"] = fsdp(root / "fsdp", args.quick)
        report["eval_data_parallel"] = data_parallel_evaluation(root / "eval", args.quick)
        report["eval_sharded"] = sharded_evaluation(root / "sharded", args.quick)
        report["eval_vllm"] = vllm_generation(root / "vllm", args.quick)
        report["qlora"] = qlora_memory(root / "qlora", smol, common, args.quick)
    if not attention[1:]:
        report["flash_attention_2"] = "not run: flash-attn is not installed"
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))
    for implementation in attention:
        packed, padded = report[f"padding_free_{implementation}"], report[f"padded_{implementation}"]
        if packed["tokens_per_s"] and padded["tokens_per_s"]:
            print(
                f"ratio padding_free_vs_padded_{implementation} = "
                f"{packed['tokens_per_s'] / padded['tokens_per_s']:.2f} (goal >= 1.3)"
            )
    evaluation = report["eval_data_parallel"]
    if "ratio" in evaluation:
        goal = 0.9 * evaluation["devices"] if torch.cuda.is_available() else 1.0
        print(f"ratio eval_data_parallel_vs_one_process = {evaluation['ratio']:.2f} (goal >= {goal:.1f})")
    if "ratio" in report["eval_vllm"]:
        print(f"ratio vllm_vs_lmlab = {report['eval_vllm']['ratio']:.2f} (goal >= 1.0)")
    if "ratio" in report["qlora"]:
        print(f"ratio qlora_vs_bf16_lora_peak_memory = {report['qlora']['ratio']:.2f} (goal <= 0.8)")


if __name__ == "__main__":
    main()
