"""Tiny causal-LM families built from configs, for float64 exactness sweeps of the chunk scheduler.

``FAMILIES[name]`` names a transformers config class, its causal-LM class and the kwargs of a tiny
config: vocab 97, hidden 32 (4 heads of 8, 2 KV heads where the family has GQA), 2 layers, 256
positions. Mixed-attention families get one sliding and one full layer, and their window (16) is
shorter than a 45-token test sequence, so the sliding path really runs. ``build(name)`` makes the
seeded model. Nothing is downloaded; each model builds in milliseconds (plus its module's first import).
"""

from __future__ import annotations

import copy

import torch
import transformers
from torch import nn

VOCAB, WINDOW, POSITIONS = 97, 16, 256
MIXED = ["sliding_attention", "full_attention"]  # layer 0 sliding, layer 1 full

# Token ids inside the tiny vocabulary (defaults such as GPT-2's 50256 are not); no pad id, so no
# embedding row is frozen by padding_idx. _COMMON: the Llama-style size keys most families share.
_IDS = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=None)
_COMMON = dict(_IDS, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
_COMMON.update(max_position_embeddings=POSITIONS, tie_word_embeddings=False)
_GQA = dict(_COMMON, num_key_value_heads=2)
_GPT = dict(_IDS, n_embd=32, n_layer=2, n_head=4, n_positions=POSITIONS, n_inner=64)
# Small MoEs: 4 experts, 2 per token. With output_router_logits the CausalLM forward adds
# coef * load-balancing loss, a function of router probabilities averaged over the whole sequence.
_MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)
_LOCAL_MOE = dict(num_local_experts=4, num_experts_per_tok=2)
_ROUTER = dict(output_router_logits=True, router_aux_loss_coef=0.1)
# DeepSeek-style routing (grouped top-k, shared expert); layer 0 dense, layer 1 MoE.
_DEEPSEEK_MOE = dict(
    moe_intermediate_size=16, n_routed_experts=4, n_shared_experts=1, n_group=1, topk_group=1, first_k_dense_replace=1
)
# Attention sinks, one sliding and one full layer, 4 experts.
_GPT_OSS = dict(head_dim=8, **_LOCAL_MOE, sliding_window=WINDOW, layer_types=MIXED,
                rope_parameters=dict(rope_type="default", rope_theta=10000.0))  # fmt: skip
# longrope rescales 4 frequency pairs (head_dim 8); original context 32 < 45 tokens, so a long
# sequence switches to the long factors, as Phi-3 does past 4K tokens.
_FACTORS = dict(short_factor=[1.0, 1.1, 1.2, 1.3], long_factor=[1.5, 2.0, 3.0, 4.0])
_LONGROPE = dict(_FACTORS, rope_type="longrope", rope_theta=10000.0, original_max_position_embeddings=32)
_YARN = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=64)
_DYNAMIC = dict(rope_type="dynamic", rope_theta=10000.0, factor=4.0)
_GRANITE = dict(embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.2)
# Gemma-style: head_dim and query scaling set explicitly; small soft caps so tanh really bends.
_GEMMA = dict(head_dim=8, query_pre_attn_scalar=8, sliding_window=WINDOW, layer_types=MIXED, tie_word_embeddings=True)
_SOFTCAPS = dict(attn_logit_softcapping=5.0, final_logit_softcapping=2.0)


def _fam(config: str, model: str, base: dict = _GQA, **kwargs) -> dict:
    return {"config": config, "model": model, "kwargs": {**base, **kwargs}}


FAMILIES: dict[str, dict] = {
    # Llama and close relatives (RoPE, RMSNorm, gated MLP).
    "llama": _fam("LlamaConfig", "LlamaForCausalLM"),
    "llama_longrope": _fam("LlamaConfig", "LlamaForCausalLM", rope_parameters=_LONGROPE),
    "llama_yarn": _fam("LlamaConfig", "LlamaForCausalLM", rope_parameters=_YARN),
    # Dynamic NTK rescales once a forward's positions pass max_position_embeddings (32 < 45).
    "llama_dynamic": _fam("LlamaConfig", "LlamaForCausalLM", rope_parameters=_DYNAMIC, max_position_embeddings=32),
    "mistral": _fam("MistralConfig", "MistralForCausalLM", sliding_window=None),
    "mistral_sliding16": _fam("MistralConfig", "MistralForCausalLM", sliding_window=WINDOW),
    "ministral": _fam("MinistralConfig", "MinistralForCausalLM", head_dim=8, sliding_window=WINDOW, layer_types=MIXED),
    "qwen2": _fam("Qwen2Config", "Qwen2ForCausalLM"),
    # Qwen2 slides in layers >= max_window_layers: layer 0 full, layer 1 sliding.
    "qwen2_sliding": _fam(
        "Qwen2Config", "Qwen2ForCausalLM", use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1
    ),
    "qwen3": _fam("Qwen3Config", "Qwen3ForCausalLM", head_dim=8),
    "olmo": _fam("OlmoConfig", "OlmoForCausalLM", clip_qkv=None),
    "olmo2": _fam("Olmo2Config", "Olmo2ForCausalLM"),
    "olmo3": _fam("Olmo3Config", "Olmo3ForCausalLM", sliding_window=WINDOW, layer_types=MIXED),
    # Granite's CausalLM forward divides the logits by logits_scaling; the multipliers act inside.
    "granite": _fam("GraniteConfig", "GraniteForCausalLM", **_GRANITE, logits_scaling=4.0),
    "granite_unscaled": _fam("GraniteConfig", "GraniteForCausalLM", **_GRANITE, logits_scaling=1.0),
    # Cohere multiplies the logits by logit_scale.
    "cohere": _fam("CohereConfig", "CohereForCausalLM", logit_scale=0.0625),
    "cohere2": _fam("Cohere2Config", "Cohere2ForCausalLM", sliding_window=WINDOW, layer_types=MIXED, logit_scale=0.25),
    "helium": _fam("HeliumConfig", "HeliumForCausalLM", head_dim=8),
    "glm": _fam("GlmConfig", "GlmForCausalLM", head_dim=8),
    "glm4": _fam("Glm4Config", "Glm4ForCausalLM", head_dim=8),
    "smollm3": _fam("SmolLM3Config", "SmolLM3ForCausalLM", no_rope_layer_interval=2),  # layer 1 without RoPE
    "exaone4": _fam("Exaone4Config", "Exaone4ForCausalLM", sliding_window=WINDOW, layer_types=MIXED),
    "ernie4_5": _fam("Ernie4_5Config", "Ernie4_5ForCausalLM", head_dim=8),
    "diffllama": _fam("DiffLlamaConfig", "DiffLlamaForCausalLM"),
    "nemotron": _fam("NemotronConfig", "NemotronForCausalLM", head_dim=8),
    # Partial rotary: phi / persimmon 0.5, stablelm / gpt_neox 0.25 of each head.
    "phi": _fam("PhiConfig", "PhiForCausalLM"),
    "phi3": _fam("Phi3Config", "Phi3ForCausalLM", original_max_position_embeddings=POSITIONS),
    "phi3_longrope": _fam(
        "Phi3Config", "Phi3ForCausalLM", rope_parameters=_LONGROPE, original_max_position_embeddings=32
    ),
    "stablelm": _fam("StableLmConfig", "StableLmForCausalLM", qk_layernorm=True),
    "persimmon": _fam("PersimmonConfig", "PersimmonForCausalLM", base=_COMMON, qk_layernorm=True),
    "gpt_neox": _fam("GPTNeoXConfig", "GPTNeoXForCausalLM", base=_COMMON),
    "starcoder2": _fam("Starcoder2Config", "Starcoder2ForCausalLM", sliding_window=None),
    # Gemma: sqrt(hidden) embedding scale, (1 + w) norms, tied LM head; gemma2 soft-caps the logits.
    "gemma": _fam("GemmaConfig", "GemmaForCausalLM", head_dim=8, tie_word_embeddings=True),
    "gemma2": _fam("Gemma2Config", "Gemma2ForCausalLM", **_GEMMA, **_SOFTCAPS),
    "gemma3": _fam("Gemma3TextConfig", "Gemma3ForCausalLM", **_GEMMA),
    "vaultgemma": _fam("VaultGemmaConfig", "VaultGemmaForCausalLM", **_GEMMA, **_SOFTCAPS),
    # Gemma 3n: AltUp, Laurel, per-layer inputs; final_logit_softcapping 30 by default. No KV sharing
    # (num_kv_shared_layers=0): with 2 layers it would leave a layer without its own K/V.
    "gemma3n": _fam(
        "Gemma3nTextConfig",
        "Gemma3nForCausalLM",
        **_GEMMA,
        intermediate_size=[64, 64],
        vocab_size_per_layer_input=VOCAB,
        hidden_size_per_layer_input=8,
        num_kv_shared_layers=0,
        laurel_rank=4,
        altup_num_inputs=2,
        activation_sparsity_pattern=[0.0, 0.0],
    ),
    # GPT-2 lineage and other learned / ALiBi / partial-rotary position schemes.
    "gpt2": _fam("GPT2Config", "GPT2LMHeadModel", base=_GPT),
    "gpt_bigcode": _fam("GPTBigCodeConfig", "GPTBigCodeForCausalLM", base=_GPT, multi_query=True),
    "gptj": _fam("GPTJConfig", "GPTJForCausalLM", base=_GPT, rotary_dim=4),
    "codegen": _fam("CodeGenConfig", "CodeGenForCausalLM", base=_GPT, n_ctx=POSITIONS, rotary_dim=4),
    # GPT-Neo's "local" layer attends to the last window_size tokens.
    "gpt_neo": _fam(
        "GPTNeoConfig",
        "GPTNeoForCausalLM",
        base=_IDS,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        intermediate_size=64,
        max_position_embeddings=POSITIONS,
        attention_types=[[["global", "local"], 1]],
        window_size=WINDOW,
    ),
    "opt": _fam("OPTConfig", "OPTForCausalLM", base=_COMMON, ffn_dim=64, word_embed_proj_dim=32, enable_bias=True),
    "biogpt": _fam("BioGptConfig", "BioGptForCausalLM", base=_COMMON, scale_embedding=True),
    "bloom": _fam("BloomConfig", "BloomForCausalLM", base=_IDS, hidden_size=32, n_layer=2, n_head=4),
    "mpt": _fam(
        "MptConfig",
        "MptForCausalLM",
        base=_IDS,
        d_model=32,
        n_heads=4,
        n_layers=2,
        expansion_ratio=2,
        max_seq_len=POSITIONS,
        attn_config={"alibi": True},
    ),
    "falcon": _fam("FalconConfig", "FalconForCausalLM", base=_COMMON),  # multi-query, parallel attn/MLP, RoPE
    "falcon_alibi": _fam("FalconConfig", "FalconForCausalLM", base=_COMMON, alibi=True),
    # Mixture of experts (routing per token; "_router" adds the load-balancing loss).
    "mixtral": _fam("MixtralConfig", "MixtralForCausalLM", **_LOCAL_MOE),
    "mixtral_router": _fam("MixtralConfig", "MixtralForCausalLM", **_LOCAL_MOE, **_ROUTER),
    "qwen2_moe": _fam("Qwen2MoeConfig", "Qwen2MoeForCausalLM", **_MOE, shared_expert_intermediate_size=32),
    "qwen2_moe_router": _fam(
        "Qwen2MoeConfig", "Qwen2MoeForCausalLM", **_MOE, shared_expert_intermediate_size=32, **_ROUTER
    ),
    "qwen3_moe": _fam("Qwen3MoeConfig", "Qwen3MoeForCausalLM", **_MOE, head_dim=8),
    "qwen3_moe_router": _fam("Qwen3MoeConfig", "Qwen3MoeForCausalLM", **_MOE, head_dim=8, **_ROUTER),
    "olmoe": _fam("OlmoeConfig", "OlmoeForCausalLM", num_experts=4, num_experts_per_tok=2, clip_qkv=None),
    "olmoe_router": _fam("OlmoeConfig", "OlmoeForCausalLM", num_experts=4, num_experts_per_tok=2, **_ROUTER),
    "granitemoe": _fam("GraniteMoeConfig", "GraniteMoeForCausalLM", **_LOCAL_MOE),
    "granitemoe_router": _fam("GraniteMoeConfig", "GraniteMoeForCausalLM", **_LOCAL_MOE, **_ROUTER),
    # PhiMoE's router samples experts in train mode (Gumbel, sparsemixer): compare it in eval mode.
    "phimoe": _fam("PhimoeConfig", "PhimoeForCausalLM", **_LOCAL_MOE),
    "phimoe_router": _fam("PhimoeConfig", "PhimoeForCausalLM", **_LOCAL_MOE, **_ROUTER),
    "glm4_moe": _fam("Glm4MoeConfig", "Glm4MoeForCausalLM", **_DEEPSEEK_MOE, num_experts_per_tok=2),
    # Multi-head latent attention: the cache holds the compressed latent, expanded to one K/V head
    # per query head (so num_key_value_heads = heads, as in the real configs).
    "deepseek_v3": _fam(
        "DeepseekV3Config",
        "DeepseekV3ForCausalLM",
        **_DEEPSEEK_MOE,
        num_experts_per_tok=2,
        num_key_value_heads=4,
        kv_lora_rank=16,
        q_lora_rank=16,
        qk_rope_head_dim=4,
        qk_nope_head_dim=4,
        v_head_dim=8,
    ),
    "gpt_oss": _fam("GptOssConfig", "GptOssForCausalLM", **_GPT_OSS),
    "gpt_oss_router": _fam("GptOssConfig", "GptOssForCausalLM", **_GPT_OSS, **_ROUTER),
    # Chunked attention (layer 0 attends within blocks of 16), MoE.
    "llama4": _fam(
        "Llama4TextConfig",
        "Llama4ForCausalLM",
        head_dim=8,
        intermediate_size_mlp=64,
        num_local_experts=2,
        num_experts_per_tok=1,
        attention_chunk_size=WINDOW,
    ),
    # Recurrent-state layers next to attention: gated DeltaNet, short convolutions, Mamba-2.
    "qwen3_next": _fam(
        "Qwen3NextConfig",
        "Qwen3NextForCausalLM",
        **_MOE,
        head_dim=8,
        shared_expert_intermediate_size=16,
        layer_types=["linear_attention", "full_attention"],
        linear_key_head_dim=8,
        linear_value_head_dim=8,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
    ),
    "lfm2": _fam("Lfm2Config", "Lfm2ForCausalLM", layer_types=["conv", "full_attention"]),
    "falcon_h1": _fam(
        "FalconH1Config",
        "FalconH1ForCausalLM",
        mamba_d_ssm=32,
        mamba_n_heads=4,
        mamba_d_head=8,
        mamba_n_groups=1,
        mamba_d_state=8,
        mamba_chunk_size=8,
    ),
}


def _zero_dropout(config) -> None:
    """Every dropout probability 0: families name them differently (resid_pdrop, hidden_dropout, ...)."""
    for cfg in (config, *(getattr(config, k) for k in getattr(config, "sub_configs", {}))):
        for key, value in list(vars(cfg).items()):
            if ("dropout" in key or "pdrop" in key) and isinstance(value, (int, float)) and not isinstance(value, bool):
                setattr(cfg, key, type(value)(0))  # strict configs (MPT's attn_pdrop: int) keep their type


def build(name: str, dtype: torch.dtype = torch.float64, seed: int = 0) -> nn.Module:
    """The seeded tiny model of family ``name``, in train mode (dropout is 0 anyway)."""
    spec = FAMILIES[name]
    # A copy: configs standardise their rope_parameters dict in place.
    config = getattr(transformers, spec["config"])(**copy.deepcopy(spec["kwargs"]))
    _zero_dropout(config)
    torch.manual_seed(seed)
    # Eager experts: the default grouped_mm kernel has no float64.
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype, experts_implementation="eager")
    assert type(model).__name__ == spec["model"], f"{name}: built {type(model).__name__}, not {spec['model']}"
    # Random (not one / zero) norm weights and biases, as tests/models.py does, so a dropped or
    # doubled path shows up in every parameter's gradient. Matched by class: families call
    # their norms ln_1, input_layernorm, norm, ...
    with torch.no_grad():
        for module in model.modules():
            if "norm" in type(module).__name__.lower():
                for p in module.parameters(recurse=False):
                    p.add_(0.1 * torch.randn_like(p))
    return model.train()
