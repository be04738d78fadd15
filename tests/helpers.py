"""Small builders shared by the tests: tiny configs, official-layout checkpoints, tiny models.

Two kinds of tiny model: `tiny_model` works on bare ids (vocabulary `EMBEDDING_ROWS`, mask `MASK_ID`, weights
spread so that predictions depend on position and context); `tokenizer_model` is sized for a trained tokenizer
(its vocabulary and special ids), for tests that work on text. conftest.py wraps both as fixtures.
"""

import json
import os

import torch
from safetensors.torch import save_file

from llada_hf import LladaConfig, LladaForMaskedDiffusion
from llada_hf.decoding_llada import left_pad
from llada_hf.tokenization import model_token_ids


VOCAB = 96  # tokens the tiny "tokenizer" knows
EMBEDDING_ROWS = 104  # official checkpoints may pad the embedding beyond the vocabulary
MASK_ID, EOS_ID, PAD_ID, BOS_ID, EOT_ID = 95, 1, 1, 2, 3


def official_config(kind: str = "llada") -> dict:
    """An official GSAI-ML style config.json (OLMo keys). kind: "llada" (untied, MHA) or "illada" (tied, GQA)."""
    cfg = {
        "activation_type": "silu", "alibi": False, "alibi_bias_max": 8.0, "architectures": ["LLaDAModelLM"],
        "attention_dropout": 0.0, "attention_layer_norm": False, "attention_layer_norm_with_affine": True,
        "auto_map": {
            "AutoConfig": "configuration_llada.LLaDAConfig",
            "AutoModel": "modeling_llada.LLaDAModelLM",
            "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
        },
        "bias_for_layer_norm": False, "block_group_size": 1, "block_type": "llama", "d_model": 64,
        "embedding_dropout": 0.0, "embedding_size": EMBEDDING_ROWS, "eos_token_id": EOS_ID,
        "flash_attention": False, "include_bias": False, "include_qkv_bias": False, "init_cutoff_factor": None,
        "init_device": "meta", "init_fn": "mitchell", "init_std": 0.02, "input_emb_norm": False,
        "layer_norm_type": "rms", "layer_norm_with_affine": True, "mask_token_id": MASK_ID,
        "max_sequence_length": 256, "mlp_hidden_size": 96, "mlp_ratio": 4, "model_type": "llada",
        "multi_query_attention": None, "n_heads": 4, "n_kv_heads": 4, "n_layers": 2, "pad_token_id": PAD_ID,
        "precision": "amp_bf16", "residual_dropout": 0.0, "rms_norm_eps": 1e-05, "rope": True,
        "rope_full_precision": True, "rope_theta": 500000.0, "scale_logits": False, "use_cache": False,
        "vocab_size": VOCAB, "weight_tying": False, "torch_dtype": "float32",
    }
    if kind == "illada":
        cfg.update(n_kv_heads=2, weight_tying=True, mlp_hidden_size=112)
    return cfg


def official_state_dict(cfg: dict, seed: int = 0) -> dict:
    """Random weights under the official parameter names, scaled so logits are well spread."""
    g = torch.Generator().manual_seed(seed)
    d, hd = cfg["d_model"], cfg["d_model"] // cfg["n_heads"]
    kv = cfg["n_kv_heads"] * hd
    ff, rows = cfg["mlp_hidden_size"], cfg["embedding_size"]

    def w(*shape, std=0.08):
        return torch.randn(*shape, generator=g) * std

    state = {"model.transformer.wte.weight": w(rows, d, std=0.5), "model.transformer.ln_f.weight": 1 + w(d)}
    for i in range(cfg["n_layers"]):
        p = f"model.transformer.blocks.{i}."
        state.update({
            p + "attn_norm.weight": 1 + w(d), p + "ff_norm.weight": 1 + w(d),
            p + "q_proj.weight": w(d, d, std=0.2), p + "k_proj.weight": w(kv, d, std=0.2),
            p + "v_proj.weight": w(kv, d), p + "attn_out.weight": w(d, d),
            p + "ff_proj.weight": w(ff, d), p + "up_proj.weight": w(ff, d), p + "ff_out.weight": w(d, ff),
        })
    if not cfg["weight_tying"]:
        state["model.transformer.ff_out.weight"] = w(rows, d, std=0.3)
    return state


def write_official_checkpoint(path, kind: str = "llada", sharded: bool = False, seed: int = 0):
    """Write a tiny checkpoint in the official GSAI-ML layout; return (config dict, state dict)."""
    os.makedirs(path, exist_ok=True)
    cfg = official_config(kind)
    state = official_state_dict(cfg, seed)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    if not sharded:
        save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        return cfg, state
    names = sorted(state)
    shards = [names[: len(names) // 2], names[len(names) // 2 :]]
    weight_map = {}
    for n, shard in enumerate(shards, start=1):
        fname = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: state[k] for k in shard}, os.path.join(path, fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return cfg, state


def tiny_config(**overrides):
    """A tiny LladaConfig with standard names."""
    kwargs = dict(
        vocab_size=EMBEDDING_ROWS, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256, mask_token_id=MASK_ID,
        pad_token_id=PAD_ID, eos_token_id=EOS_ID, bos_token_id=BOS_ID,
    )
    kwargs.update(overrides)
    return LladaConfig(**kwargs)


def tiny_model(seed: int = 0, **overrides):
    """A tiny LladaForMaskedDiffusion with well-spread random weights (eval mode)."""
    torch.manual_seed(seed)
    model = LladaForMaskedDiffusion(tiny_config(**overrides))
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0, 0.5)
        for layer in model.model.layers:  # strong attention: predictions depend on position and context
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                proj.weight.normal_(0, 0.5)
            for proj in (layer.self_attn.v_proj, layer.self_attn.o_proj):
                proj.weight.normal_(0, 0.3)
        if not model.config.tie_word_embeddings:
            model.lm_head.weight.normal_(0, 0.3)
    return model.eval()


def tokenizer_model(tokenizer, seed: int = 0, **overrides):
    """A small LladaForMaskedDiffusion with the vocabulary and special ids of `tokenizer`, freshly initialised
    (eval mode). `overrides` replace any `LladaConfig` field."""
    kwargs = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, **model_token_ids(tokenizer)
    )
    kwargs.update(overrides)
    torch.manual_seed(seed)
    return LladaForMaskedDiffusion(LladaConfig(**kwargs)).eval()


def save_tiny_text_model(folder) -> str:
    """A `tokenizer_model` (seed 0) with a small trained tokenizer, saved to `folder` for the command-line tests."""
    from llada_hf.tokenization import train_tokenizer

    texts = [f"the {w} sat on the {v} mat" for w in ("cat", "dog", "bird") for v in ("red", "blue")]
    tokenizer = train_tokenizer(texts * 4, vocab_size=290)
    tokenizer_model(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def left_padded_batch(rows, pad_id=PAD_ID):
    """Left-pad lists of ids into (input_ids, attention_mask)."""
    return left_pad(rows, pad_id)


def forward_terms(config, length: int) -> int:
    """The number of rounded operations that feed one logit of a LLaDA forward over `length` positions: per layer
    the q/k/v and output products (2 × hidden), the attention sums (`length`) and the MLP (hidden + intermediate),
    then the head (hidden). Used by `kernel_tolerance`."""
    per_layer = 3 * config.hidden_size + config.intermediate_size + length
    return config.num_hidden_layers * per_layer + config.hidden_size


def kernel_tolerance(expected: torch.Tensor, terms: int, dtype: torch.dtype | None = None) -> float:
    """How far two correct computations of `expected` may drift apart on different CPU kernels.

    Kernels (other CPUs, or `ATEN_CPU_CAPABILITY` / `ONEDNN_MAX_CPU_ISA`) add the same products in other orders and
    widths, with or without fused multiply-adds. A result built from `terms` rounded operations differs by at most
    about terms · eps · scale (the classic bound for a sum of n rounded terms, n · eps · Σ|x|), with eps the machine
    epsilon of the dtype the arithmetic ran in and scale the largest |value| (at least 1, since hidden activations
    are normalised to that size). A real error (a wrong rotary angle, a missing mask) moves logits by 1e-2 or more,
    far above this for float32.
    """
    eps = torch.finfo(dtype or expected.dtype).eps
    return terms * eps * max(float(expected.detach().abs().max()), 1.0)


def assert_close_across_kernels(actual: torch.Tensor, expected: torch.Tensor, terms: int) -> None:
    """`actual` equals `expected` up to `kernel_tolerance` (shapes must match exactly)."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    tolerance = kernel_tolerance(expected, terms, actual.dtype)
    error = float((actual.double() - expected.double()).abs().max())
    assert error <= tolerance, f"max |difference| {error:.3g} > {tolerance:.3g} (from eps, {terms} terms and scale)"
