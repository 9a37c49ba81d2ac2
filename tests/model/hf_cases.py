"""Small random Hugging Face checkpoints of every supported family, written with `transformers` itself."""

from pathlib import Path

import torch
import transformers

COMMON = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    initializer_range=0.15,
    rms_norm_eps=1e-6,
)

# name -> (config class, extra fields)
CASES = {
    "qwen3_moe": ("Qwen3MoeConfig", dict(head_dim=16, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2)),
    "qwen3_moe_mixed": (
        "Qwen3MoeConfig",
        dict(
            head_dim=16,
            moe_intermediate_size=24,
            num_experts=5,
            num_experts_per_tok=1,
            norm_topk_prob=True,
            mlp_only_layers=[1],
            tie_word_embeddings=True,
        ),
    ),
    "qwen3_moe_sparse_step": (
        "Qwen3MoeConfig",
        dict(head_dim=16, moe_intermediate_size=32, num_experts=6, num_experts_per_tok=3, decoder_sparse_step=2),
    ),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        dict(moe_intermediate_size=32, shared_expert_intermediate_size=48, num_experts=4, num_experts_per_tok=2),
    ),
    "mixtral": ("MixtralConfig", dict(num_local_experts=3, num_experts_per_tok=2)),
    "mixtral_top1": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=1)),
    "olmoe": ("OlmoeConfig", dict(num_experts=5, num_experts_per_tok=2, clip_qkv=0.8)),
    "qwen3": ("Qwen3Config", dict(head_dim=16, tie_word_embeddings=True)),
    "llama": (
        "LlamaConfig",
        dict(
            attention_bias=True,
            mlp_bias=True,
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=500000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=64,
            ),
        ),
    ),
}


def write_hf_checkpoint(case: str, path: Path, seed: int = 0, **save_kwargs) -> transformers.PreTrainedModel:
    cls_name, extra = CASES[case]
    config = getattr(transformers, cls_name)(**COMMON | extra)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # HF inits norms to one and biases to zero; perturb them so they are tested
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("bias"):
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(path, **save_kwargs)
    return model
