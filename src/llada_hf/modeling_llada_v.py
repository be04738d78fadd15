"""LLaDA-V: a SigLIP vision tower and an MLP projector in front of the LLaDA masked diffusion language model.

Part of the model bundle: imports only torch, transformers and sibling bundle modules, because it is
copied next to every saved checkpoint and must run where `llada_hf` is not installed.

Built by composition, as transformers' LLaVA-OneVision: `LladaVModel` holds the vision tower, the projector, the
`image_newline` vector and the LLaDA body (`LladaModel`) and merges image features into the token embeddings;
`LladaVForConditionalGeneration` holds `LladaVModel` and the LM head, and gets the diffusion sampler from the text
bundle's `DiffusionGenerationMixin` (the same step engine as the text model, driven from `inputs_embeds`). Module
tree and names are LLaVA-OneVision's (`model.vision_tower`, `model.multi_modal_projector`, `model.image_newline`,
`model.language_model`, `lm_head`). Official `llava_llada` checkpoints load unchanged through a registered
checkpoint conversion mapping. Reused from transformers: `SiglipVisionModel` (the tower, holding only the kept
layers; features are its last hidden state *before* `post_layernorm`) and `LlavaOnevisionMultiModalProjector` (= the
official `mlp2x_gelu`). Crop and feature counts come from `geometry_llada_v.py`, shared with the processor; the
packing follows the official code where transformers' LLaVA-OneVision differs (see `pack_image_features`).
"""

import torch
import torch.nn.functional as F
from torch import nn

from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import WeightRenaming
from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionMultiModalProjector
from transformers.models.siglip.modeling_siglip import SiglipVisionModel
from transformers.utils.deprecation import deprecate_kwarg

from .configuration_llada import LladaConfig, check_token_ids
from .configuration_llada_v import LladaVConfig
from .decoding_llada import DiffusionDecodingState
from .generation_llada import LLADA_EOT_TOKEN_ID, DiffusionGenerationMixin
from .geometry_llada_v import CROP, CROP_ROW, ImageGeometry
from .modeling_llada import (
    BUNDLE_FILES,
    VISION_BUNDLE_FILES,
    LladaModel,
    LladaPreTrainedModel,
    MaskedDiffusionOutput,
    copy_bundle_files,
    masked_diffusion_output,
)


# The ids the official LLaDA-V sampler never generates at a masked position: eos, bos, start_header, end_header
# (LLaDA's tokenizer; eot stays allowed). Models with another vocabulary suppress their own eos and bos.
OFFICIAL_SUPPRESS_TOKENS = [126081, 126080, 126346, 126347]
LLADA_TOKENIZER_SIZE = 126349

# Official `llava_llada` parameter names -> ours (the official tower wrapper nests the SigLIP model twice; its
# language model sits directly under `model.`).
OFFICIAL_CHECKPOINT_RENAMES = [
    WeightRenaming(r"^model\.vision_tower\.vision_tower\.vision_model\.", "model.vision_tower."),
    WeightRenaming(r"^model\.mm_projector\.0\.", "model.multi_modal_projector.linear_1."),
    WeightRenaming(r"^model\.mm_projector\.2\.", "model.multi_modal_projector.linear_2."),
    WeightRenaming(r"^model\.(embed_tokens|layers|norm)\.", r"model.language_model.\1."),
]
register_checkpoint_conversion_mapping("llada_v", OFFICIAL_CHECKPOINT_RENAMES, overwrite=True)


class LladaVPreTrainedModel(LladaPreTrainedModel):
    """Shared base: the strict `from_pretrained` of the text model (missing, unexpected or mis-shaped weights are
    errors) and LLaDA-V's weight initialisation."""

    config: LladaVConfig
    config_class = LladaVConfig
    input_modalities = ("image", "text")
    _no_split_modules = ["LladaDecoderLayer", "SiglipEncoderLayer"]

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, LladaVModel):
            nn.init.normal_(module.image_newline, std=module.image_newline.shape[0] ** -0.5)


class LladaVModel(LladaVPreTrainedModel):
    """Vision tower + projector + the bidirectional LLaDA body; merges image features into the token embeddings."""

    def __init__(self, config: LladaVConfig):
        super().__init__(config)
        self.vision_tower = SiglipVisionModel(config.vision_config)
        self.multi_modal_projector = LlavaOnevisionMultiModalProjector(config)
        self.image_newline = nn.Parameter(torch.empty(config.text_config.hidden_size))
        self.language_model = LladaModel(config.text_config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.embed_tokens = value

    def image_geometry(self, vision_aspect_ratio: str | None = None) -> ImageGeometry:
        """Crop and feature counts of this model's images (`vision_aspect_ratio` in place of the config's)."""
        return ImageGeometry.from_config(self.config, vision_aspect_ratio)

    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        image_sizes: torch.Tensor | list,
        batch_num_images: torch.Tensor | list | None = None,
        vision_aspect_ratio: str | None = None,
    ) -> list[torch.Tensor]:
        """Run the tower once over every crop of every image; return each image's packed features [tokens, hidden].

        `pixel_values`: [images, crops, C, H, W] as the processor returns it (crops zero-padded to the largest
        count), or [all crops, C, H, W]. `image_sizes`: [images, 2] original (height, width). `batch_num_images`:
        images per prompt (default: one each); an image of a multi-image prompt is one padded-square crop (no anyres
        grid). `vision_aspect_ratio`: the config's unless given (`"square"`: every image its first crop alone, the
        official stage-1 packing).
        """
        sizes = _image_sizes(image_sizes)
        geometry = self.image_geometry(vision_aspect_ratio)
        layouts = geometry.layouts(_images_per_prompt(len(sizes), batch_num_images))
        crops = [geometry.num_crops(size, layout) for size, layout in zip(sizes, layouts)]
        pixel_values = self._flat_crops(pixel_values, crops)  # [all crops, C, H, W]
        hidden = self.vision_tower(pixel_values, output_hidden_states=True).hidden_states
        features = self.multi_modal_projector(hidden[self.config.vision_feature_layer])  # [all crops, unit², hidden]
        return [
            self.pack_image_features(image, size, layout, geometry)
            for image, size, layout in zip(features.split(crops), sizes, layouts)
        ]

    def pack_image_features(
        self, features: torch.Tensor, image_size: tuple[int, int], layout: str, geometry: ImageGeometry
    ) -> torch.Tensor:
        """One image's crop features [crops, unit², hidden] -> its token features [tokens, hidden].

        `"grid"`: the base crop's unit² features, then the grid of the other crops, unpadded to the image's aspect
        ratio, downscaled (bilinear) when `anyres_max_N` says it is too large, with `image_newline` after each row.
        `"crop_row"` (an image of a multi-image prompt): its one crop's features and one `image_newline`, as the
        official model packs a single crop. `"crop"` (`"square"`): its one crop's features alone. Differences from
        transformers' LLaVA-OneVision, official behaviour kept: unpadding truncates the kept extent (`unpad_bounds`),
        and the grid pinpoints are tried in the official order (`LladaVConfig.image_grid_pinpoints`).
        """
        newline = self.image_newline.to(features.dtype)
        if layout == CROP:
            return features[0]  # [unit², hidden]
        if layout == CROP_ROW:
            return torch.cat((features[0], newline[None]))  # [unit² + 1, hidden]
        unit = geometry.patches_per_side
        rows, cols = geometry.grid(image_size)
        base, grid = features[0], features[1:]
        grid = grid.view(rows, cols, unit, unit, -1).permute(4, 0, 2, 1, 3).flatten(1, 2).flatten(2, 3)
        # grid: [hidden, rows * unit, cols * unit]
        top, bottom, left, right = geometry.unpadded_bounds(image_size)
        grid = grid[:, top:bottom, left:right]
        target = geometry.downscaled_size(*grid.shape[1:])
        if target is not None:
            grid = F.interpolate(grid[None], list(target), mode="bilinear")[0]
        grid = torch.cat((grid, newline[:, None, None].expand(*grid.shape[:-1], 1)), dim=-1)  # [hidden, h, w + 1]
        return torch.cat((base, grid.flatten(1, 2).transpose(0, 1)))  # [unit² + h * (w + 1), hidden]

    def _flat_crops(self, pixel_values: torch.Tensor, crops: list[int]) -> torch.Tensor:
        vision = self.config.vision_config
        crop_shape = (vision.num_channels, vision.image_size, vision.image_size)
        if not torch.is_tensor(pixel_values) or not pixel_values.is_floating_point():
            raise TypeError(
                "`pixel_values` must be a float tensor (the processor's output), got "
                f"{getattr(pixel_values, 'dtype', type(pixel_values).__name__)}."
            )
        expected = (
            f"[images, crops, {', '.join(map(str, crop_shape))}] or [all crops, {', '.join(map(str, crop_shape))}]"
        )
        if pixel_values.dim() == 5 and tuple(pixel_values.shape[2:]) == crop_shape:
            if pixel_values.shape[0] != len(crops) or pixel_values.shape[1] < max(crops):
                raise ValueError(
                    f"`pixel_values` holds {pixel_values.shape[0]} images of up to {pixel_values.shape[1]} crops, but "
                    f"`image_sizes` describes {len(crops)} images needing {crops} crops. Pass the processor's "
                    "`pixel_values` and `image_sizes` together."
                )
            return torch.cat([image[:count] for image, count in zip(pixel_values, crops)])
        if pixel_values.dim() == 4 and tuple(pixel_values.shape[1:]) == crop_shape:
            if pixel_values.shape[0] != sum(crops):
                raise ValueError(
                    f"`pixel_values` holds {pixel_values.shape[0]} crops, but `image_sizes` needs {sum(crops)} "
                    f"({crops} per image). Pass the processor's `pixel_values` and `image_sizes` together."
                )
            return pixel_values
        raise ValueError(f"`pixel_values` must have shape {expected}, got {tuple(pixel_values.shape)}.")

    def embed_multimodal(
        self,
        input_ids: torch.LongTensor,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | list | None = None,
        batch_num_images: torch.Tensor | list | None = None,
        vision_aspect_ratio: str | None = None,
        check_input_ids: bool = True,
    ) -> torch.Tensor:
        """Token embeddings [B, L, hidden] with every image placeholder replaced by the next image feature.

        `check_input_ids=False` skips the check that every other id is a row of the embedding (a host sync), as the
        language model's own flag."""
        if input_ids.dim() != 2:
            raise ValueError(f"`input_ids` must be 2-D [batch, length], got shape {tuple(input_ids.shape)}.")
        if input_ids.is_floating_point():
            raise TypeError(f"`input_ids` must hold integer token ids, got dtype {input_ids.dtype}.")
        image_mask = input_ids == self.config.image_token_id  # [B, L]
        token_ids = input_ids.masked_fill(image_mask, 0)
        if check_input_ids and not torch.compiler.is_compiling():  # a host sync cannot be compiled
            check_token_ids(token_ids, self.config.text_config.vocab_size)
        inputs_embeds = self.language_model.embed_tokens(token_ids)  # [B, L, hidden]
        placeholders = int(image_mask.sum())
        if pixel_values is None:
            if placeholders:
                raise ValueError(
                    f"`input_ids` hold {placeholders} image placeholders (id {self.config.image_token_id}) but no "
                    "`pixel_values` were given. Pass the images to the processor together with the text."
                )
            return inputs_embeds
        if image_sizes is None:
            raise ValueError("`pixel_values` need `image_sizes` (the processor returns both).")
        features = self.get_image_features(pixel_values, image_sizes, batch_num_images, vision_aspect_ratio)
        counts = [len(f) for f in features]
        if placeholders != sum(counts):
            raise ValueError(
                f"`input_ids` hold {placeholders} image placeholders (id {self.config.image_token_id}) but the "
                f"{len(counts)} images give {sum(counts)} features ({counts} per image). Use one `<image>` per image "
                "in the prompt and let LladaVProcessor expand it, with the same images."
            )
        features = torch.cat(features).to(inputs_embeds.dtype)
        return inputs_embeds.masked_scatter(image_mask[..., None], features)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | list | None = None,
        batch_num_images: torch.Tensor | list | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        vision_aspect_ratio: str | None = None,
        check_input_ids: bool = True,
        **kwargs,
    ):
        """The language model's output over the merged sequence (text embeddings with image features spliced in).

        With `inputs_embeds` (e.g. merged once by `embed_multimodal` and reused at every denoising step) the
        vision tower does not run. `vision_aspect_ratio` and `check_input_ids`: as `embed_multimodal`.
        """
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("Pass `input_ids` (with `pixel_values` for images) or `inputs_embeds`.")
            inputs_embeds = self.embed_multimodal(input_ids, pixel_values, image_sizes, batch_num_images,
                                                  vision_aspect_ratio, check_input_ids)
        elif pixel_values is not None or input_ids is not None:
            raise ValueError(
                "Pass either `input_ids` (+ `pixel_values`) or `inputs_embeds`, which already hold the image features."
            )
        return self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            **kwargs,
        )


class LladaVForConditionalGeneration(DiffusionGenerationMixin, LladaVPreTrainedModel):
    """LLaDA-V with its LM head: `LladaVModel` + `lm_head`, scored as the text model (masked-token loss, unshifted
    labels) and decoded by the text model's diffusion sampler (`DiffusionGenerationMixin`, from `inputs_embeds`).

    Example:
        ```python
        >>> import torch
        >>> from llada_hf import LladaConfig, LladaVConfig, LladaVForConditionalGeneration
        >>> text = LladaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        ...                    num_attention_heads=4, mask_token_id=63, pad_token_id=0, eos_token_id=1)
        >>> vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        ...               image_size=28, patch_size=14, vision_use_head=False)
        >>> config = LladaVConfig(text_config=text, vision_config=vision, image_token_id=62,
        ...                       image_grid_pinpoints=[[28, 28], [28, 56], [56, 28]])
        >>> model = LladaVForConditionalGeneration(config).eval()
        >>> pixel_values = torch.randn(1, 3, 3, 28, 28)  # one 28x50 image: base crop + a 1x2 grid of crops
        >>> ids = torch.tensor([[5] + [62] * 14 + [6, 63]])  # 4 base tokens + 2 rows x (4 + newline): nothing unpadded
        >>> model(ids, pixel_values=pixel_values, image_sizes=[[28, 50]]).logits.shape
        torch.Size([1, 17, 64])
        ```
    """

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}

    def __init__(self, config: LladaVConfig):
        super().__init__(config)
        self.model = LladaVModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()
        fill_official_sampler_settings(self.generation_config, config.text_config)

    def adjust_generation_fn(self, *args, **kwargs):
        """As the text model (generation_config.json, else defaults with the text config's token ids), then the
        official sampler's suppressions and stop where they are unset (`fill_official_sampler_settings`)."""
        super().adjust_generation_fn(*args, **kwargs)
        fill_official_sampler_settings(self.generation_config, self.config.text_config)

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | list | None = None,
        batch_num_images: torch.Tensor | list | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs,
    ):
        """Answer about images (and text) by masked diffusion, with the text model's sampler.

        The prompt's embeddings, image features included, are computed once (`embed_multimodal`: the vision tower
        runs once per request) and the sampler decodes from them (`inputs_embeds`), so every option of the text
        `generate` applies: strategies, blocks, CFG (the unconditional copy masks the whole prompt, images
        included, as the official sampler), caches, thresholds, early exit, streamers, stopping criteria.

        With the model's defaults the tokens at masked positions never include eos, bos or the header tokens
        (`suppress_tokens`, as the official `generate_with_embeds`), and with the official settings (one block of
        `block_length = max_new_tokens`, `steps = max_new_tokens`, temperature 0, no stop words) the answer equals
        the official sampler's. Batches are left-padded by the processor; text-only prompts work the same way.

        Args:
            input_ids, pixel_values, image_sizes, batch_num_images, attention_mask: the processor's output.
            kwargs: anything the text `generate` takes (`max_new_tokens`, `steps`, `block_length`, `remasking`,
                `temperature`, `cfg_scale`, `kv_cache`, `streamer`, ..., or `inputs_embeds` instead of `input_ids`).

        Returns:
            The prompt ids followed by the answer, [B, P + max_new_tokens] (transformers' convention: decode
            `out[:, input_ids.shape[1]:]`), or a `DiffusionGenerationOutput` whose `sequences` and `history` are so
            extended; given `inputs_embeds` instead of `input_ids`, the answer alone.

        Example:
            ```python
            >>> import torch
            >>> from llada_hf import LladaConfig, LladaVConfig, LladaVForConditionalGeneration
            >>> text = LladaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
            ...                    num_attention_heads=4, mask_token_id=63, pad_token_id=0, eos_token_id=1)
            >>> vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            ...               image_size=28, patch_size=14, vision_use_head=False)
            >>> config = LladaVConfig(text_config=text, vision_config=vision, image_token_id=62,
            ...                       image_grid_pinpoints=[[28, 28], [28, 56], [56, 28]])
            >>> model = LladaVForConditionalGeneration(config).eval()
            >>> ids = torch.tensor([[5] + [62] * 14 + [6]])  # a 28 x 50 image: 4 base + 2 x (4 + 1) grid tokens
            >>> out = model.generate(ids, pixel_values=torch.randn(1, 3, 3, 28, 28), image_sizes=[[28, 50]],
            ...                      max_new_tokens=8, steps=8, block_length=4)
            >>> out.shape
            torch.Size([1, 24])
            ```
        """
        output = super().generate(input_ids, attention_mask, pixel_values=pixel_values, image_sizes=image_sizes,
                                  batch_num_images=batch_num_images, **kwargs)
        return output if input_ids is None else _with_prompt(input_ids, output)

    def prepare_decoding(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | list | None = None,
        batch_num_images: torch.Tensor | list | None = None,
        **kwargs,
    ) -> DiffusionDecodingState:
        """The text model's `prepare_decoding` from the prompt's embeddings: the images go through the vision tower
        here, once (`embed_multimodal`), and every later step reads the embedded prompt. So `generate`, the
        `DiffusionEngine` (continuous batching) and the server decode LLaDA-V as they decode text; the state's
        outputs are the answer alone (the prompt holds no ids)."""
        if input_ids is None:
            if pixel_values is not None:
                raise ValueError("`pixel_values` need the `input_ids` that hold their placeholders.")
            return super().prepare_decoding(None, attention_mask, **kwargs)
        if not torch.is_tensor(input_ids):
            raise TypeError(f"`input_ids` must be a tensor (the processor's output), got {type(input_ids).__name__}.")
        if kwargs.pop("inputs_embeds", None) is not None:
            raise ValueError("Pass the prompt as `input_ids` or as `inputs_embeds`, not both.")
        inputs_embeds = self.model.embed_multimodal(input_ids, pixel_values, image_sizes, batch_num_images)
        return super().prepare_decoding(None, attention_mask, inputs_embeds=inputs_embeds, **kwargs)

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | list | None = None,
        batch_num_images: torch.Tensor | list | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        vision_aspect_ratio: str | None = None,
        **kwargs,
    ) -> MaskedDiffusionOutput:
        """Logits for every position of the merged sequence (one position per image feature); with `labels`
        (one per merged position, -100 = ignored, not shifted) the masked-token cross-entropy, as the text model.

        `logits_to_keep` (int = last N positions, or a tensor of positions) limits the LM head to the positions that
        are needed; `vision_aspect_ratio` packs the images otherwise than the config says (`"square"`: the official
        stage-1 packing, one crop per image); `check_input_ids=False` (passed on) skips the vocabulary check.
        """
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            image_sizes=image_sizes,
            batch_num_images=batch_num_images,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            vision_aspect_ratio=vision_aspect_ratio,
            **kwargs,
        )
        return masked_diffusion_output(self.lm_head, outputs, logits_to_keep, labels)

    def save_pretrained(self, save_directory, *args, save_original_format: bool = False, **kwargs):
        """Save weights (our names, as the text model: `save_original_format=False`), config with `auto_map`, and
        the text and vision bundles' code, so the folder runs with `trust_remote_code=True` without `llada_hf`."""
        super().save_pretrained(save_directory, *args, save_original_format=save_original_format, **kwargs)
        if kwargs.get("is_main_process", True):
            copy_bundle_files(save_directory, BUNDLE_FILES + VISION_BUNDLE_FILES)


def fill_official_sampler_settings(generation_config, text: LladaConfig) -> None:
    """Unset settings become the official LLaDA-V sampler's: `suppress_tokens` its suppressions
    (`OFFICIAL_SUPPRESS_TOKENS` with LLaDA's tokenizer, else the model's eos and bos) and, with LLaDA's tokenizer,
    `stop_token_ids` its stop at `<|eot_id|>` (the official demo and evaluation pass it as `stopping_criteria`). The
    token ids come from the text config already (`DiffusionGenerationConfig.from_model_config`)."""
    if generation_config is None:
        return
    official = text.vocab_size >= LLADA_TOKENIZER_SIZE
    if generation_config.suppress_tokens is None:
        own = [t for t in (text.eos_token_id, text.bos_token_id) if isinstance(t, int) and 0 <= t < text.vocab_size]
        generation_config.suppress_tokens = list(OFFICIAL_SUPPRESS_TOKENS) if official else own
    if official and getattr(generation_config, "stop_token_ids", None) is None:
        generation_config.stop_token_ids = [LLADA_EOT_TOKEN_ID]


def _with_prompt(input_ids: torch.LongTensor, output):
    """Prepend the prompt ids to what the sampler returned for an embedded prompt (the answer alone)."""
    answers = output if torch.is_tensor(output) else output.sequences
    prompt = input_ids.repeat_interleave(answers.shape[0] // input_ids.shape[0], dim=0).to(answers.device)
    if torch.is_tensor(output):
        return torch.cat([prompt, output], dim=1)
    output.sequences = torch.cat([prompt, output.sequences], dim=1)
    if output.history is not None:
        output.history = tuple(torch.cat([prompt, step], dim=1) for step in output.history)
    return output


def _image_sizes(image_sizes) -> list[tuple[int, int]]:
    sizes = image_sizes.tolist() if torch.is_tensor(image_sizes) else list(image_sizes)
    if any(len(size) != 2 or min(size) <= 0 for size in sizes):
        raise ValueError(f"`image_sizes` must be one positive (height, width) pair per image, got {sizes}.")
    return [(int(h), int(w)) for h, w in sizes]


def _images_per_prompt(num_images: int, batch_num_images) -> list[int]:
    """The number of images of each prompt: `batch_num_images`, checked against the images; without it, one each."""
    if batch_num_images is None:
        return [1] * num_images
    counts = batch_num_images.tolist() if torch.is_tensor(batch_num_images) else list(batch_num_images)
    if sum(counts) != num_images:
        raise ValueError(f"`batch_num_images` {counts} does not add up to the {num_images} images of `image_sizes`.")
    return [int(count) for count in counts]


__all__ = ["LladaVPreTrainedModel", "LladaVModel", "LladaVForConditionalGeneration"]
