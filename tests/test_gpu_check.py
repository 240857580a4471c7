"""bench/gpu_check.py: its quick mode on any device (so the script works when a GPU session runs it), and the
full check on a CUDA device (skipped elsewhere: CI has none)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import launch


def run_check(out: Path, *arguments: str) -> dict:
    launch("bench/gpu_check.py", "--out", str(out), *arguments, timeout=900)
    return json.loads(out.read_text())


@pytest.mark.xdist_group("processes")  # its FSDP section starts two training processes
def test_the_gpu_check_runs_end_to_end_in_its_quick_mode(tmp_path: Path) -> None:
    report = run_check(tmp_path / "check.json", "--quick")
    for section in (
        "smollm2_lora",
        "smollm2_full",
        "llama_375m_pretraining",
        "padding_free_sdpa",
        "padded_sdpa",
    ):
        assert report[section]["global_step"] == 3 and len(report[section]["losses"]) == 3, section
    assert report["padding_free_sdpa"]["padding_free"] and not report["padded_sdpa"]["padding_free"]
    assert report["padding_free_sdpa"]["losses"][0] == pytest.approx(
        report["padded_sdpa"]["losses"][0], abs=1e-5
    )
    assert report["generation"]["identical"] == report["generation"]["prompts"]
    assert report["fsdp"]["ok"] and report["fsdp"]["final_exported"]
    evaluation = report["eval_data_parallel"]  # two CPU processes against one
    assert evaluation["devices"] == 2 and evaluation["identical"] == evaluation["problems"] == 4
    sharded = report["eval_sharded"]  # a saved tiny model over CPU and disk against one device
    assert sharded["identical"] == sharded["problems"] == 4
    served = report["eval_vllm"]  # the stand-in engine against lmlab's own generation
    assert served["identical"] == served["problems"] == 4 and len(served["seconds"]["vllm"]) == 1
    assert "model.quantization=nf4 needs" in report["qlora"]["skipped"]  # no bitsandbytes kernels on the CPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_gpu_check_on_a_cuda_device(tmp_path: Path) -> None:
    report = run_check(tmp_path / "check.json")
    assert report["generation"]["identical"] == report["generation"]["prompts"]
    for section in ("smollm2_lora", "smollm2_full", "llama_375m_pretraining", "padding_free_sdpa"):
        assert report[section]["tokens_per_s"] and report[section]["mfu"], section
    assert report["padding_free_sdpa"]["padding_free"]
    evaluation = report["eval_data_parallel"]
    assert "skipped" in evaluation or evaluation["identical"] == evaluation["problems"]
    sharded = report["eval_sharded"]
    assert "skipped" in sharded or sharded["identical"] == sharded["problems"]
    assert (
        "skipped" in report["eval_vllm"]
        or report["eval_vllm"]["identical"] == report["eval_vllm"]["problems"]
    )
    qlora = report["qlora"]
    assert "skipped" in qlora or (
        qlora["nf4"]["peak_memory_mib"] < qlora["bf16"]["peak_memory_mib"] and len(qlora["nf4"]["losses"]) > 1
    )
