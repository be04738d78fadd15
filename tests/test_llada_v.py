"""LLaDA-V: config, official checkpoints, parity with an independent implementation of the official forward."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import reference_llada_v as ref
import torch
from helpers import assert_close_across_kernels, forward_terms
from llada_v_helpers import (
    CROP,
    IMAGE_ID,
    TOWER_CONFIG,
    official_config,
    official_pinpoints_wh,
    tiny_processor,
    write_official_checkpoint,
)
from PIL import Image
from safetensors.torch import load_file, save_file

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText

import llada_hf  # noqa: F401  (registers the Auto classes)
from llada_hf.configuration_llada_v import OFFICIAL_GRID, LladaVConfig
from llada_hf.geometry_llada_v import ImageGeometry, unpad_bounds
from llada_hf.modeling_llada import BUNDLE_FILES, VISION_BUNDLE_FILES
from llada_hf.modeling_llada_v import LladaVForConditionalGeneration
from llada_hf.processing_llada_v import LladaVProcessor


pytestmark = pytest.mark.numerics  # rerun under other CPU kernels by the test command (pyproject.toml)


def _terms(model, length: int) -> int:
    """Rounded operations behind one logit (see `helpers.kernel_tolerance`): the kept tower layers over its patches,
    the projector, then the language model over `length` positions."""
    tower = model.config.vision_config
    patches = (tower.image_size // tower.patch_size) ** 2
    tower_terms = tower.num_hidden_layers * (3 * tower.hidden_size + tower.intermediate_size + patches)
    text = model.config.text_config
    return tower_terms + tower.hidden_size + text.hidden_size + forward_terms(text, length)


def _image(width, height, seed=0):
    g = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(height, width, 3, generator=g) * 255).to(torch.uint8).numpy()
    return Image.fromarray(pixels, "RGB")


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """(folder, official config dict, official state dict, model loaded from the folder)."""
    folder = tmp_path_factory.mktemp("official")
    cfg, state = write_official_checkpoint(folder)
    return folder, cfg, state, AutoModel.from_pretrained(folder).eval()


@pytest.fixture(scope="module")
def processor():
    return tiny_processor()


# ---- config -------------------------------------------------------------------------------------------------------


def test_official_config_is_read(tmp_path):
    write_official_checkpoint(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(config, LladaVConfig) and config.model_type == "llada_v"
    vision, text = config.vision_config, config.text_config
    assert vision.num_hidden_layers == TOWER_CONFIG["num_hidden_layers"] - 1  # the last layer is dropped
    assert (vision.hidden_size, vision.image_size, vision.patch_size, vision.vision_use_head) == (16, CROP, 14, False)
    assert (text.hidden_size, text.num_hidden_layers, text.rope_parameters["rope_theta"]) == (32, 2, 500000.0)
    assert text.rope_full_precision is False  # LLaDA-V's language model applies rotary in the model dtype
    assert config.vision_aspect_ratio == "anyres_max_4"
    # "(1x1),...,(3x3)" -> [width, height] pairs in the official order, stored transposed as [height, width]
    assert config.image_grid_pinpoints == [[h, w] for w, h in official_pinpoints_wh()]
    saved = config.to_dict()
    assert not any(key.startswith("mm_") for key in saved)
    assert saved["auto_map"]["AutoModel"].startswith("modeling_llada_v")


def test_official_defaults_know_the_so400m_tower_without_network():
    cfg = official_config()
    cfg["mm_vision_tower"] = "google/siglip2-so400m-patch14-384"
    cfg["image_grid_pinpoints"] = [[w, h] for h, w in OFFICIAL_GRID]  # as saved by the official code: [w, h]
    config = LladaVConfig(**cfg)
    vision = config.vision_config
    assert (vision.hidden_size, vision.intermediate_size, vision.num_hidden_layers, vision.num_attention_heads) == (
        1152, 4304, 26, 16,
    )
    assert (vision.image_size, vision.patch_size) == (384, 14)
    assert config.image_grid_pinpoints == OFFICIAL_GRID and len(OFFICIAL_GRID) == 36
    cfg["image_grid_pinpoints"] = "(1x1),...,(6x6)"
    assert LladaVConfig(**cfg).image_grid_pinpoints == OFFICIAL_GRID


@pytest.mark.parametrize(
    "key,value",
    [
        ("mm_projector_type", "linear"), ("mm_patch_merge_type", "flat"), ("image_aspect_ratio", "pad"),
        ("mm_use_im_start_end", True), ("attention_bias", True), ("rope_scaling", {"type": "linear", "factor": 2}),
    ],
)  # fmt: skip
def test_unsupported_official_variants_are_refused_by_name(tmp_path, key, value):
    write_official_checkpoint(tmp_path)
    cfg = official_config() | {key: value}
    with open(tmp_path / "config.json", "w") as f:
        json.dump(cfg, f)
    with pytest.raises(ValueError, match=key):
        AutoConfig.from_pretrained(tmp_path)


def test_missing_tower_folder_is_named(tmp_path):
    cfg = official_config() | {"mm_vision_tower": "no-such-tower"}
    with pytest.raises(ValueError, match="mm_vision_tower"):
        LladaVConfig(**cfg)


# ---- official checkpoints -----------------------------------------------------------------------------------------


def test_official_checkpoint_loads_unchanged(official):
    folder, _, state, model = official
    assert isinstance(model, LladaVForConditionalGeneration)
    ours = model.state_dict()
    assert torch.equal(ours["model.vision_tower.encoder.layers.1.mlp.fc2.weight"],
                       state[ref.TOWER + "encoder.layers.1.mlp.fc2.weight"])
    assert torch.equal(ours["model.multi_modal_projector.linear_2.bias"], state["model.mm_projector.2.bias"])
    assert torch.equal(ours["model.language_model.layers.1.mlp.up_proj.weight"],
                       state["model.layers.1.mlp.up_proj.weight"])
    assert torch.equal(ours["model.image_newline"], state["model.image_newline"])
    assert torch.equal(ours["lm_head.weight"], state["lm_head.weight"])
    assert len(ours) == len(state)
    for auto in (AutoModelForImageTextToText,):
        assert isinstance(auto.from_pretrained(folder), LladaVForConditionalGeneration)


@pytest.mark.parametrize("problem", ["missing", "unexpected", "mis-shaped"])
def test_bad_official_weights_are_errors(tmp_path, problem):
    write_official_checkpoint(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    if problem == "missing":
        del state[ref.TOWER + "encoder.layers.1.mlp.fc1.weight"]
    elif problem == "unexpected":  # e.g. a checkpoint that kept the tower's last layer
        state[ref.TOWER + "encoder.layers.2.mlp.fc1.bias"] = torch.zeros(32)
    else:
        state["model.mm_projector.0.weight"] = torch.zeros(32, 8)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    if problem == "mis-shaped":  # transformers refuses it itself (ignore_mismatched_sizes=False), naming the key
        with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
            AutoModel.from_pretrained(tmp_path)
        return
    with pytest.raises(ValueError, match=f"{problem}_keys"):
        AutoModel.from_pretrained(tmp_path)


def test_save_writes_our_layout_and_bundle_and_runs_without_llada_hf(official, processor, tmp_path):
    _, _, _, model = official
    model.save_pretrained(tmp_path / "ckpt")
    processor.save_pretrained(tmp_path / "ckpt")
    saved = load_file(tmp_path / "ckpt" / "model.safetensors")
    assert "model.vision_tower.encoder.layers.0.self_attn.q_proj.weight" in saved
    assert not any(key.startswith(("model.mm_projector", "model.layers.")) for key in saved)
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["model_type"] == "llada_v" and config["auto_map"]["AutoModelForImageTextToText"]
    for name in BUNDLE_FILES + VISION_BUNDLE_FILES:
        assert (tmp_path / "ckpt" / name).is_file(), name
    inputs = _chat_inputs(processor, [_image(70, 40)], "What is in the image?")
    with torch.no_grad():
        expected = model(**inputs).logits
    expected_tokens = model.generate(**inputs, max_new_tokens=8, steps=8, block_length=4)
    torch.save(dict(inputs), tmp_path / "inputs.pt")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["llada_hf"] = None  # any `import llada_hf` now fails
        sys.path = [p for p in sys.path if not p.rstrip("/").endswith(("src", "tests", "benchmarks"))]
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor
        folder = {str(tmp_path / "ckpt")!r}
        model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        assert "llada_hf" not in type(model).__module__ and "llada_hf" not in type(processor).__module__
        inputs = torch.load({str(tmp_path / "inputs.pt")!r})
        with torch.no_grad():
            torch.save(model(**inputs).logits, {str(tmp_path / "logits.pt")!r})
        tokens = model.generate(**inputs, max_new_tokens=8, steps=8, block_length=4)
        torch.save(tokens, {str(tmp_path / "tokens.pt")!r})
        print(type(model).__module__, type(processor).__name__)
        """
    )
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "transformers_modules" in result.stdout and "LladaVProcessor" in result.stdout
    assert torch.equal(torch.load(tmp_path / "logits.pt"), expected)
    assert torch.equal(torch.load(tmp_path / "tokens.pt"), expected_tokens)


# ---- parity with the official forward ----------------------------------------------------------------------------


def _chat_inputs(processor, images, question):
    content = [{"type": "image", "image": image} for image in images] + [{"type": "text", "text": question}]
    messages = [{"role": "user", "content": content}]
    return processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )


def _official_ids(input_ids):
    """Our prompt ids with each run of placeholders collapsed into the official single IMAGE_TOKEN_INDEX."""
    out = []
    for token in input_ids.tolist():
        if token == IMAGE_ID:
            if out and out[-1] == ref.IMAGE_TOKEN_INDEX:
                continue
            token = ref.IMAGE_TOKEN_INDEX
        out.append(token)
    return torch.tensor(out)


def _reference(state, images_per_row, ids_per_row):
    """Per row: official merged embeddings [L, D] and logits [L, vocab]."""
    lm_cfg = official_config()
    out = []
    for images, ids in zip(images_per_row, ids_per_row):
        feats = ref.image_features(state, TOWER_CONFIG, images, official_pinpoints_wh(), CROP, 4) if images else []
        embeds = ref.merged_embeddings(state, ids, feats)
        out.append((embeds, ref.lm_logits(state, lm_cfg, embeds[None])[0]))
    return out


@pytest.mark.parametrize(
    "sizes",
    [
        [(84, 84)],  # 3x3 grid, downscaled by anyres_max_4
        [(80, 30)],  # wide: a 1x3 grid, unpadded rows
        [(10, 12)],  # small: a 1x1 grid
        [(94, 47)],  # (w, h): unpadding where int() and transformers' round(., 7) disagree
        [(300, 100)],  # larger than any pinpoint: the largest grid, downscaled
        [(60, 45), (20, 70)],  # two images in one prompt: one padded crop each
    ],
)
def test_merged_embeddings_and_logits_match_the_official_forward(official, processor, sizes):
    _, _, state, model = official
    images = [_image(w, h, seed=i) for i, (w, h) in enumerate(sizes)]
    inputs = _chat_inputs(processor, images, "What is in the image?")
    expected_crops = [ref.anyres_crops(images[0], official_pinpoints_wh(), CROP)] if len(images) == 1 else [
        ref.padded_square_crop(image, CROP) for image in images
    ]
    for i, crops in enumerate(expected_crops):
        assert (inputs["pixel_values"][i, : len(crops)] - crops).abs().max() <= 1e-6
    with torch.no_grad():
        embeds = model.model.embed_multimodal(
            inputs["input_ids"], inputs["pixel_values"], inputs["image_sizes"], inputs["batch_num_images"]
        )
        logits = model(**inputs).logits
    [(ref_embeds, ref_logits)] = _reference(state, [images], [_official_ids(inputs["input_ids"][0])])
    assert embeds.shape[1] == ref_embeds.shape[0]
    terms = _terms(model, embeds.shape[1])
    assert_close_across_kernels(embeds[0], ref_embeds, terms)
    assert_close_across_kernels(logits[0], ref_logits, terms)


@pytest.mark.parametrize("sizes", [[(80, 30)], [(60, 45), (20, 70)]])
def test_square_packing_matches_the_official_stage_1_forward(official, processor, sizes):
    """Official stage 1 keeps the training script's `image_aspect_ratio = "square"` and `mm_patch_merge_type =
    "flat"`: an image resized to one crop by the SigLIP processor (bicubic, as the anyres base crop), or, among
    several of a prompt, padded to a square first (the training code's "pad" for those); each crop's features
    flattened without `image_newline`."""
    _, _, state, model = official
    square = LladaVProcessor(processor.image_processor, processor.tokenizer, num_image_tokens=4,
                             vision_aspect_ratio="square")
    images = [_image(w, h, seed=i) for i, (w, h) in enumerate(sizes)]
    text = " and ".join(["<image>"] * len(images)) + " a picture of a cat\n"
    inputs = square(images=[images], text=[text], return_tensors="pt", add_special_tokens=False)
    crops = [ref.anyres_crops(images[0], official_pinpoints_wh(), CROP)[:1]] if len(images) == 1 else [
        ref.padded_square_crop(image, CROP) for image in images
    ]
    assert inputs["pixel_values"].shape[1] == 1
    for pixels, expected in zip(inputs["pixel_values"], crops):
        assert (pixels - expected).abs().max() <= 1e-6
    assert int((inputs["input_ids"] == IMAGE_ID).sum()) == 4 * len(images)
    with torch.no_grad():
        embeds = model.model.embed_multimodal(inputs["input_ids"], inputs["pixel_values"], inputs["image_sizes"],
                                              inputs["batch_num_images"], vision_aspect_ratio="square")
        logits = model(**inputs, vision_aspect_ratio="square").logits
    features = [ref.project(state, ref.tower_features(state, TOWER_CONFIG, crop))[0] for crop in crops]
    ref_embeds = ref.merged_embeddings(state, _official_ids(inputs["input_ids"][0]), features)
    ref_logits = ref.lm_logits(state, official_config(), ref_embeds[None])[0]
    terms = _terms(model, embeds.shape[1])
    assert_close_across_kernels(embeds[0], ref_embeds, terms)
    assert_close_across_kernels(logits[0], ref_logits, terms)


def test_a_batch_of_prompts_with_images_of_different_sizes_matches_each_row(official, processor):
    _, _, state, model = official
    images = [_image(84, 50, seed=1), _image(20, 16, seed=2)]
    prompts = [
        processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
                                      add_generation_prompt=True)
        for q in ("What is in the image?", "a cat?")
    ]
    processor.tokenizer.padding_side = "left"
    inputs = processor(images=[[images[0]], [images[1]]], text=prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    rows = [_official_ids(ids[mask.bool()]) for ids, mask in zip(inputs["input_ids"], inputs["attention_mask"])]
    for row, ((_, ref_logits), mask) in enumerate(zip(_reference(state, [[images[0]], [images[1]]], rows),
                                                      inputs["attention_mask"])):
        assert_close_across_kernels(logits[row][mask.bool()], ref_logits, _terms(model, logits.shape[1]))


def test_text_only_prompts_match_the_official_language_model(official, processor):
    _, _, state, model = official
    inputs = processor(text=["a picture of a cat"], return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    [(_, ref_logits)] = _reference(state, [[]], [inputs["input_ids"][0]])
    assert_close_across_kernels(logits[0], ref_logits, _terms(model, logits.shape[1]))


def test_unpadding_truncates_as_the_official_code():
    """transformers' LLaVA-OneVision rounds the kept extent to 7 decimals before truncating; the official code
    truncates directly. For a 47 x 94 (height x width) image on a 2 x 3 grid of 2 x 2 features the kept height is
    47 * 6 / 94 = 2.9999999999999996: officially 2 rows (one cut off above and below), transformers keeps all 4."""
    from transformers.models.llava_onevision.modeling_llava_onevision import unpad_image

    assert unpad_bounds((47, 94), (4, 6)) == (1, 3, 0, 6)
    assert unpad_image(torch.zeros(1, 4, 6), (47, 94)).shape[1] == 4  # the transformers behaviour we do not use
    pinpoints = [[h, w] for w, h in official_pinpoints_wh()]
    assert ImageGeometry(CROP, 2, pinpoints, "anyres_max_4").num_tokens((47, 94), "grid") == 4 + 2 * (6 + 1)
