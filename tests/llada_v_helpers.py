"""Tiny LLaDA-V checkpoints in the official `llava_llada` layout, and tiny processors, for the LLaDA-V tests."""

import json
import os

import torch
from reference_llada_v import TOWER
from safetensors.torch import save_file


CROP, PATCH = 28, 14  # 2 x 2 = 4 features per crop
# The ids of `tiny_processor()`'s tokenizer (LLaDA's special tokens first, `<image>` added last); the embedding has
# a few spare rows, as the official one does.
BOS_ID, EOS_ID, MASK_ID, START_HEADER_ID, END_HEADER_ID, EOT_ID, IMAGE_ID = 0, 1, 2, 3, 4, 5, 287
VOCAB = 296
PINPOINTS = "(1x1),...,(3x3)"  # official range string: 28..84 px grids
# A SigLIP config as the folder named by `mm_vision_tower` holds it: all 3 layers (the official code drops the last).
TOWER_CONFIG = {
    "model_type": "siglip_vision_model", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 3,
    "num_attention_heads": 2, "image_size": CROP, "patch_size": PATCH, "num_channels": 3,
    "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6,
}  # fmt: skip


def official_config(tower: str = "siglip-tiny") -> dict:
    """A `llava_llada` config.json as the official training code writes it (flat Llama-style LM keys + mm_*)."""
    return {
        "architectures": ["LlavaLLaDAModelLM"], "model_type": "llava_llada", "attention_bias": False,
        "attention_dropout": 0.0, "bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": EOS_ID,
        "mask_token_id": MASK_ID, "hidden_act": "silu", "hidden_size": 32, "intermediate_size": 64,
        "initializer_range": 0.02, "max_position_embeddings": 512, "num_attention_heads": 4,
        "num_hidden_layers": 2, "num_key_value_heads": 4, "pretraining_tp": 1, "rms_norm_eps": 1e-5,
        "rope_scaling": None, "rope_theta": 500000.0, "tie_word_embeddings": False, "use_cache": False,
        "vocab_size": VOCAB, "torch_dtype": "float32",
        "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig", "AutoModel": "modeling_llada.LLaDAModelLM"},
        "image_aspect_ratio": "anyres_max_4", "image_crop_resolution": None, "image_split_resolution": None,
        "image_grid_pinpoints": PINPOINTS, "mm_hidden_size": 16, "mm_patch_merge_type": "spatial_unpad",
        "mm_projector_lr": None, "mm_projector_type": "mlp2x_gelu", "mm_resampler_type": None,
        "mm_spatial_pool_mode": "bilinear", "mm_tunable_parts": "mm_vision_tower,mm_mlp_adapter,mm_language_model",
        "mm_use_im_patch_token": False, "mm_use_im_start_end": False, "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2, "mm_vision_tower": tower, "mm_vision_tower_lr": 2e-6,
        "mm_newline_position": "grid", "tokenizer_model_max_length": 8192, "tokenizer_padding_side": "right",
        "use_mm_proj": True, "vision_tower_pretrained": None,
        "image_token_id": IMAGE_ID,  # not an official key: the tiny tokenizer's `<image>` is not 126349
    }  # fmt: skip


def official_state_dict(seed: int = 0) -> dict:
    """Random weights under the official parameter names, scaled so features and logits are well spread."""
    g = torch.Generator().manual_seed(seed)
    dv, fv, dt, ft = TOWER_CONFIG["hidden_size"], TOWER_CONFIG["intermediate_size"], 32, 64
    patches = (CROP // PATCH) ** 2

    def w(*shape, std=0.2):
        return torch.randn(*shape, generator=g) * std

    state = {
        TOWER + "embeddings.patch_embedding.weight": w(dv, 3, PATCH, PATCH, std=0.05),
        TOWER + "embeddings.patch_embedding.bias": w(dv),
        TOWER + "embeddings.position_embedding.weight": w(patches, dv, std=0.5),
        TOWER + "post_layernorm.weight": 1 + w(dv), TOWER + "post_layernorm.bias": w(dv),
        "model.mm_projector.0.weight": w(dt, dv, std=0.4), "model.mm_projector.0.bias": w(dt),
        "model.mm_projector.2.weight": w(dt, dt, std=0.4), "model.mm_projector.2.bias": w(dt),
        "model.image_newline": w(dt, std=0.5), "model.embed_tokens.weight": w(VOCAB, dt, std=0.5),
        "model.norm.weight": 1 + w(dt), "lm_head.weight": w(VOCAB, dt, std=0.12),
    }  # fmt: skip
    for i in range(TOWER_CONFIG["num_hidden_layers"] - 1):  # the kept layers only
        p = TOWER + f"encoder.layers.{i}."
        state.update({p + f"layer_norm{n}.{t}": (1 + w(dv)) if t == "weight" else w(dv) for n in (1, 2)
                      for t in ("weight", "bias")})
        state.update({p + f"self_attn.{t}_proj.{k}": w(dv, dv) if k == "weight" else w(dv)
                      for t in ("q", "k", "v", "out") for k in ("weight", "bias")})
        state.update({p + "mlp.fc1.weight": w(fv, dv), p + "mlp.fc1.bias": w(fv),
                      p + "mlp.fc2.weight": w(dv, fv), p + "mlp.fc2.bias": w(dv)})
    for i in range(2):
        p = f"model.layers.{i}."
        state.update({p + "input_layernorm.weight": 1 + w(dt), p + "post_attention_layernorm.weight": 1 + w(dt)})
        state.update({p + f"self_attn.{t}_proj.weight": w(dt, dt, std=0.3) for t in ("q", "k", "v", "o")})
        state.update({p + "mlp.gate_proj.weight": w(ft, dt), p + "mlp.up_proj.weight": w(ft, dt),
                      p + "mlp.down_proj.weight": w(dt, ft)})
    return state


def write_official_checkpoint(path, seed: int = 0, tower: str = "siglip-tiny"):
    """A tiny official-layout LLaDA-V folder: config.json, model.safetensors and the tower's config folder."""
    os.makedirs(os.path.join(path, tower), exist_ok=True)
    with open(os.path.join(path, tower, "config.json"), "w") as f:
        json.dump(TOWER_CONFIG, f)
    cfg, state = official_config(tower), official_state_dict(seed)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    return cfg, state


def official_pinpoints_wh() -> list[list[int]]:
    """The official expansion of PINPOINTS: [width, height] pairs."""
    return [[w * CROP, h * CROP] for w in range(1, 4) for h in range(1, 4)]


def tiny_processor(texts=("a picture of a cat", "What is in the image?")):
    """A LladaVProcessor with 28 px crops, the tiny pinpoints and a small trained LLaDA-style tokenizer."""
    from llada_hf.processing_llada_v import LladaVProcessor, official_image_processor
    from llada_hf.tokenization import train_tokenizer

    pinpoints = [[h, w] for w, h in official_pinpoints_wh()]
    processor = LladaVProcessor(
        official_image_processor(CROP, pinpoints), train_tokenizer(list(texts), vocab_size=300), num_image_tokens=4
    )
    assert processor.image_token_id == IMAGE_ID and processor.tokenizer.mask_token_id == MASK_ID
    return processor
