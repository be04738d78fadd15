"""LLaDA-V configuration (ours, and the official `llava_llada` config.json read into it).

Part of the model bundle: imports only torch, transformers and sibling bundle modules, because it is
copied next to every saved checkpoint and must run where `llada_hf` is not installed.

LLaDA-V = a SigLIP vision tower (penultimate layer) + an `mlp2x_gelu` projector + the LLaDA language model,
with LLaVA-OneVision's image packing (anyres grid, unpadding, `image_newline`, `anyres_max_N` downscale), whose
arithmetic lives in `geometry_llada_v.py`.
"""

import json
import os
import re
from typing import Any, ClassVar

from transformers.configuration_utils import PreTrainedConfig
from transformers.models.siglip.configuration_siglip import SiglipVisionConfig

from .configuration_llada import LladaConfig
from .geometry_llada_v import max_num_patches


BUNDLE_AUTO_MAP_V = {
    "AutoConfig": "configuration_llada_v.LladaVConfig",
    "AutoModel": "modeling_llada_v.LladaVForConditionalGeneration",
    "AutoModelForImageTextToText": "modeling_llada_v.LladaVForConditionalGeneration",
}

# The official tower, google/siglip2-so400m-patch14-384, with its last encoder layer removed (26 of 27 kept)
# and no pooling head: the checkpoint holds exactly these layers.
SO400M_KEPT_LAYERS = {
    "hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 26, "num_attention_heads": 16,
    "image_size": 384, "patch_size": 14, "num_channels": 3, "hidden_act": "gelu_pytorch_tanh",
    "layer_norm_eps": 1e-6, "vision_use_head": False,
}  # fmt: skip

# The official `image_grid_pinpoints = "(1x1),...,(6x6)"` with 384 px crops, as [height, width] pairs (transformers'
# convention), in the order the official code tries them.
OFFICIAL_GRID = [[384 * h, 384 * w] for w in range(1, 7) for h in range(1, 7)]

# Official `llava_llada` config.json keys of the language model (Llama-style names) that go into `text_config`.
OFFICIAL_TEXT_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps",
    "rope_theta", "tie_word_embeddings", "attention_dropout", "mask_token_id", "pad_token_id", "bos_token_id",
    "eos_token_id", "use_cache",
)  # fmt: skip

# Official multimodal keys that select a variant, with the values implemented here (anything else is refused).
OFFICIAL_MM_SUPPORTED: dict[str, tuple[Any, ...]] = {
    "mm_projector_type": ("mlp2x_gelu",),
    "mm_patch_merge_type": ("spatial_unpad",),
    "mm_vision_select_feature": ("patch", None),
    "mm_use_im_start_end": (False, None),
    "mm_use_im_patch_token": (False, None),
    "mm_resampler_type": (None,),
    "attention_bias": (False, None),
    "rope_scaling": (None,),
    "add_faster_video": (False, None),
    "use_pos_skipping": (False, None),
}

# Official keys that steer training, video input or the official code's bookkeeping: no effect on an image forward.
# `mm_vision_select_layer` is among them: the official tower never reads it (features are the output of the last
# kept layer, without the final layer norm).
OFFICIAL_KEYS_WITHOUT_EFFECT = (
    "mm_vision_select_layer", "mm_hidden_size", "mm_newline_position", "mm_spatial_pool_mode",
    "mm_spatial_pool_stride", "mm_spatial_pool_out_channels", "mm_tunable_parts", "mm_vision_tower_lr",
    "mm_projector_lr", "vision_tower_pretrained", "use_mm_proj", "tune_mm_mlp_adapter", "freeze_mm_mlp_adapter",
    "unfreeze_mm_vision_tower", "image_crop_resolution", "image_split_resolution", "tokenizer_padding_side",
    "pos_skipping_range", "faster_token_stride", "delay_load", "pretraining_tp", "mm_mask_drop_mode",
    "mm_mask_drop_skip_percentage", "mm_mask_drop_ratio", "mm_mask_drop_ratio_upper", "mm_mask_drop_ratio_lower",
    "temperature", "max_new_tokens", "do_sample", "top_p",
    "tokenizer_model_max_length",  # the official code silently truncates longer prompts; we never truncate
)  # fmt: skip


class LladaVConfig(PreTrainedConfig):
    r"""Configuration of LLaDA-V: SigLIP tower + `mlp2x_gelu` projector + LLaDA, with LLaVA-OneVision image packing.

    Also reads the official `llava_llada` `config.json` (flat Llama-style language-model keys plus `mm_*` keys):
    the tower's sizes come from the folder `mm_vision_tower` names (relative to the checkpoint folder, or as
    given) or, for `siglip2-so400m-patch14-384` / `siglip-so400m-patch14-384`, from the known sizes; the tower
    keeps all layers but the last (as the official code, which deletes it). Variants not implemented here (other
    projectors, merge types or aspect-ratio modes, image start/end tokens) are refused with a `ValueError`
    naming the key.

    Args:
        vision_config: a `SiglipVisionConfig` (or its dict) of the *kept* tower layers; `vision_use_head=False`.
        text_config: a `LladaConfig` (or its dict). LLaDA-V's language model applies the rotary embedding in
            the model dtype (Llama-style), so official configs get `rope_full_precision=False`.
        image_token_id: the placeholder id the processor writes once per image feature. Official checkpoints
            have no such id (their code splices features at a fake id, -200); the processor adds `<image>` to
            the LLaDA tokenizer as its training code does, which gives it the id 126349 (the tokenizer's length).
        image_grid_pinpoints: candidate `[height, width]` resolutions of the anyres grid (transformers'
            convention; official configs store `[width, height]` pairs, transposed on reading).
        vision_aspect_ratio: `"anyres_max_N"` (downscale an unpadded grid above N crops' worth of tokens),
            `"anyres"` (never downscale) or `"square"` (each image one crop, squashed, or padded to a square among
            several, without `image_newline`: the official stage-1 packing; `geometry_llada_v.py` has the layouts).
        vision_feature_layer: hidden state of the tower that is projected (-1: the last kept layer, before the
            tower's final layer norm).
        projector_hidden_act, multimodal_projector_bias: the projector's activation and biases.

    Example:
        ```python
        >>> from llada_hf import LladaVConfig
        >>> config = LladaVConfig()
        >>> config.vision_config.num_hidden_layers, config.text_config.hidden_size, config.vision_aspect_ratio
        (26, 4096, 'anyres_max_4')
        ```
    """

    model_type = "llada_v"
    sub_configs: ClassVar[dict[str, type[PreTrainedConfig]]] = {
        "text_config": LladaConfig,
        "vision_config": SiglipVisionConfig,
    }

    vision_config: dict | SiglipVisionConfig | None = None
    text_config: dict | LladaConfig | None = None
    image_token_id: int = 126349
    image_grid_pinpoints: list | None = None
    vision_aspect_ratio: str = "anyres_max_4"
    vision_feature_layer: int = -1
    projector_hidden_act: str = "gelu"
    multimodal_projector_bias: bool = True
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        if any(key.startswith("mm_") for key in kwargs):
            kwargs = self._absorb_official_keys(kwargs)
        if not isinstance(self.text_config, LladaConfig):
            self.text_config = LladaConfig(**({"rope_full_precision": False} | (self.text_config or {})))
        if not isinstance(self.vision_config, SiglipVisionConfig):
            self.vision_config = SiglipVisionConfig(**(self.vision_config or SO400M_KEPT_LAYERS))
        if self.image_grid_pinpoints is None:
            self.image_grid_pinpoints = [list(pair) for pair in OFFICIAL_GRID]
        kwargs.pop("auto_map", None)
        self.auto_map = dict(BUNDLE_AUTO_MAP_V)
        super().__post_init__(**kwargs)
        max_num_patches(self.vision_aspect_ratio)  # validates the value

    def _absorb_official_keys(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Translate an official flat `llava_llada` config into `text_config`, `vision_config` and our fields."""
        for key, supported in OFFICIAL_MM_SUPPORTED.items():
            if key in kwargs and kwargs[key] not in supported:
                raise ValueError(
                    f"LladaVConfig does not implement `{key}={kwargs[key]!r}` (supported: "
                    f"{', '.join(repr(v) for v in supported)}); loading it would silently compute something else."
                )
            kwargs.pop(key, None)
        kwargs.pop("model_type", None)  # "llava_llada": this config is saved as "llada_v", in our layout
        self.architectures = None  # the official class name; saving writes ours
        aspect = kwargs.pop("image_aspect_ratio", "anyres_max_4")
        if aspect != "anyres" and not re.fullmatch(r"anyres_max_\d+", str(aspect)):
            raise ValueError(
                f"LladaVConfig implements `image_aspect_ratio` 'anyres' and 'anyres_max_N' only, got {aspect!r}."
            )
        self.vision_aspect_ratio = aspect
        text = {key: kwargs.pop(key) for key in OFFICIAL_TEXT_KEYS if key in kwargs}
        self.text_config = {"rope_full_precision": False, "tie_word_embeddings": self.tie_word_embeddings} | text
        self.vision_config = official_vision_config(kwargs.pop("mm_vision_tower", None), kwargs.get("name_or_path"))
        if self.image_grid_pinpoints is not None:  # official layout: [width, height] pairs or a range string
            self.image_grid_pinpoints = official_pinpoints(self.image_grid_pinpoints, self.vision_config["image_size"])
        for key in OFFICIAL_KEYS_WITHOUT_EFFECT:
            kwargs.pop(key, None)
        return kwargs


def official_vision_config(tower: str | None, checkpoint_dir: str | None) -> dict[str, Any]:
    """The kept-layer `SiglipVisionConfig` dict for the official `mm_vision_tower` value."""
    if not tower:
        raise ValueError("The official LLaDA-V config has no `mm_vision_tower`: the vision tower's sizes are unknown.")
    candidates = [os.path.join(checkpoint_dir, tower)] if checkpoint_dir and os.path.isdir(checkpoint_dir) else []
    candidates.append(tower)
    for folder in candidates:
        path = os.path.join(folder, "config.json")
        if os.path.isfile(path):
            with open(path) as f:
                tower_config = json.load(f)
            tower_config = tower_config.get("vision_config", tower_config)  # a full SigLIP config holds the tower's
            tower_config = {k: v for k, v in tower_config.items() if k not in ("model_type", "architectures")}
            tower_config["num_hidden_layers"] = tower_config.get("num_hidden_layers", 12) - 1  # the last is dropped
            return tower_config | {"vision_use_head": False}
    if re.search(r"siglip2?-so400m-patch14-384$", tower.rstrip("/")):
        return dict(SO400M_KEPT_LAYERS)
    raise ValueError(
        f"Cannot find the vision tower `mm_vision_tower={tower!r}`: not a folder with a SigLIP config.json (relative "
        "to the checkpoint or as given) nor a known tower (siglip2-so400m-patch14-384). Put its config.json there."
    )


def official_pinpoints(pinpoints: str | list, crop_size: int) -> list[list[int]]:
    """Official pinpoints — `[width, height]` pairs or a `"(1x1),...,(6x6)"` range string — as `[height, width]`."""
    if isinstance(pinpoints, str):
        corners = re.findall(r"\((\d+)x(\d+)\)", pinpoints)
        if not corners:
            raise ValueError(f"Cannot read `image_grid_pinpoints={pinpoints!r}`: expected '(1x1),...,(6x6)'.")
        (w0, h0), (w1, h1) = (tuple(map(int, c)) for c in (corners[0], corners[-1]))
        pinpoints = [[w * crop_size, h * crop_size] for w in range(w0, w1 + 1) for h in range(h0, h1 + 1)]
    return [[int(h), int(w)] for w, h in pinpoints]


__all__ = ["LladaVConfig"]
