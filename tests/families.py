"""The decoder-only families every capability that reaches inside a model is tested on
(tests/test_families.py).

Each is a tiny random model built offline from config fields through `model=hf_causal_lm`, exactly as a user
brings a family lmlab has no config for; `minimind` is the remote-code stand-in (tests/fixtures/minimind)
loaded from a local directory through `trust_remote_code`. `structure` is what discovery must find in it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modeling.architecture import Structure

TINY_FIELDS = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
}
LLAMA_LIKE = Structure("model.layers", "self_attn", "mlp", "mlp.down_proj")


@dataclass(frozen=True)
class Family:
    """A family's expected structure, the config fields it needs beyond TINY_FIELDS, and whether packed rows
    must attend per example (its attention goes through transformers' attention interface on sdpa)."""

    structure: Structure
    fields: dict[str, Any] = field(default_factory=dict)
    per_example: bool = True


FAMILIES: dict[str, Family] = {
    "llama": Family(LLAMA_LIKE),
    "diffllama": Family(LLAMA_LIKE),
    "qwen2": Family(LLAMA_LIKE),
    "gpt2": Family(Structure("transformer.h", "attn", "mlp", "mlp.c_proj", conv1d=True)),
    "mistral": Family(LLAMA_LIKE),
    "qwen3": Family(LLAMA_LIKE, {"head_dim": 16}),
    "gemma2": Family(LLAMA_LIKE, {"head_dim": 16}, per_example=False),  # eager (soft-capped attention)
    "olmo2": Family(LLAMA_LIKE),
    "phi3": Family(LLAMA_LIKE),
    "gpt_neox": Family(Structure("gpt_neox.layers", "attention", "mlp", "mlp.dense_4h_to_h")),
    "opt": Family(  # packed rows are refused
        Structure("model.decoder.layers", "self_attn", "fc2", "fc2"),
        {"ffn_dim": 128, "word_embed_proj_dim": 64},
        per_example=False,
    ),
    "falcon": Family(
        Structure("transformer.h", "self_attention", "mlp", "mlp.dense_4h_to_h"), per_example=False
    ),
    "bloom": Family(  # eager attention (ALiBi), and packed rows are refused
        Structure("transformer.h", "self_attention", "mlp", "mlp.dense_4h_to_h"), per_example=False
    ),
    "gpt_bigcode": Family(Structure("transformer.h", "attn", "mlp", "mlp.c_proj")),
    "minimind": Family(LLAMA_LIKE, per_example=False),  # remote code; ignores position ids
}
REMOTE_CODE = {"minimind", "minimind_moe"}


@dataclass(frozen=True)
class Mixture:
    """A mixture-of-experts or hybrid family: the structure discovery must find, its config fields beyond
    TINY_FIELDS, whether its experts are fused 3-D parameters, the routers LoRA must leave out and the other
    linear maps it must leave out (paths within a block)."""

    structure: Structure
    fields: dict[str, Any]
    fused: bool = False
    routers: tuple[str, ...] = ()
    left_out: tuple[str, ...] = ()


EXPERTS = {"num_experts_per_tok": 2}
FUSED = Structure("model.layers", "self_attn", "mlp", None)  # no dense output projection: the MoE layer
MIXTURES: dict[str, Mixture] = {
    "mixtral": Mixture(FUSED, {"num_local_experts": 4, **EXPERTS}, fused=True, routers=("mlp.gate",)),
    "qwen2_moe": Mixture(  # a router and a shared expert with its own scalar gate
        Structure("model.layers", "self_attn", "mlp", "mlp.shared_expert.down_proj"),
        {"num_experts": 4, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 96, **EXPERTS},
        fused=True,
        routers=("mlp.gate", "mlp.shared_expert_gate"),
    ),
    "olmoe": Mixture(FUSED, {"num_experts": 4, **EXPERTS}, fused=True, routers=("mlp.gate",)),
    "jamba": Mixture(  # Mamba block, then attention with a mixture of experts; dt_proj feeds the scan kernel
        Structure(
            "model.layers",
            "self_attn",
            "feed_forward",
            "feed_forward.down_proj",
            mixers=("mamba", "self_attn"),
        ),
        {
            "num_experts": 4,
            "attn_layer_period": 2,
            "attn_layer_offset": 1,
            "expert_layer_period": 2,
            "expert_layer_offset": 1,
            "mamba_d_state": 8,
            "mamba_dt_rank": 8,
            **EXPERTS,
        },
        fused=True,
        routers=("feed_forward.router",),
        left_out=("mamba.dt_proj",),
    ),
    "lfm2": Mixture(  # a short-convolution block, then attention
        Structure(
            "model.layers", "self_attn", "feed_forward", "feed_forward.w2", mixers=("conv", "self_attn")
        ),
        {"layer_types": "[conv,full_attention]", "block_ff_dim": 128},
    ),
    "minimind_moe": Mixture(  # remote code: a list of experts, a linear gate, one shared expert
        Structure("model.layers", "self_attn", "mlp", "mlp.shared_experts.0.down_proj"),
        {},
        routers=("mlp.gate",),
    ),
}
HYBRIDS = {name for name, family in MIXTURES.items() if family.structure.mixers}


def family_fields(name: str) -> dict[str, Any]:
    """The config fields beyond TINY_FIELDS of a dense or mixture family."""
    return FAMILIES[name].fields if name in FAMILIES else MIXTURES[name].fields


def overrides(name: str, minimind_dir: Path) -> list[str]:
    """The command-line overrides that build family `name`'s tiny model (MEMIT on its first block)."""
    memit = ["model.memit.layers=[0]", "model.memit.mom2_update_weight=1"]
    if name in REMOTE_CODE:  # the MiniMind-MoE stand-in is saved beside the dense one
        path = minimind_dir / "moe" if name == "minimind_moe" else minimind_dir
        return ["model=minimind2", f"model.path={path}", *memit]
    fields = {"model_type": name, **TINY_FIELDS, **family_fields(name)}
    scratch = ",".join(f"{key}:{value}" for key, value in fields.items())
    return [
        "model=hf_causal_lm",
        f"model.name=tiny_{name}",
        "model.tokenizer=byte",
        f"model.architecture={{{scratch}}}",
        *memit,
    ]
