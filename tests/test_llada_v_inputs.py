"""LLaDA-V: bad and unusual inputs get a clear error or the official behaviour."""

import numpy as np
import pytest
import reference_llada_v as ref
import torch
from llada_v_helpers import CROP, IMAGE_ID, official_pinpoints_wh, tiny_processor, write_official_checkpoint
from PIL import Image

from transformers import AutoModel


@pytest.fixture(scope="module")
def processor():
    return tiny_processor()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("official")
    write_official_checkpoint(folder)
    return AutoModel.from_pretrained(folder).eval()


def _ask(processor, images, text="<image>\nWhat is this?"):
    return processor(images=images, text=[text], return_tensors="pt")


def _noise(width, height, mode="RGB"):
    rng = np.random.default_rng(0)
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65535, (height, width), dtype=np.uint16))
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = rng.integers(0, 255, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode)


def test_image_count_must_match_the_placeholders(processor, model):
    with pytest.raises(ValueError, match="number of images"):
        _ask(processor, [_noise(30, 20), _noise(20, 30)])  # one <image>, two images
    with pytest.raises(ValueError, match="no images"):
        processor(text=["<image>\nWhat is this?"], return_tensors="pt")
    inputs = _ask(processor, [_noise(30, 20)])
    cut = inputs["input_ids"][:, 3:]  # drops no placeholder, but a prompt built by hand may lose some
    fewer = torch.cat([cut[:, :5], cut[:, 6:]], dim=1)
    assert int((fewer == IMAGE_ID).sum()) == int((cut == IMAGE_ID).sum()) - 1
    with pytest.raises(ValueError, match="image placeholders .* features"):
        model(fewer, pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"])
    with pytest.raises(ValueError, match="no `pixel_values`"):
        model(inputs["input_ids"])


@pytest.mark.parametrize("content", [b"hello, not an image", b"\x89PNG\r\n\x1a\n broken"])
def test_unreadable_files_are_refused(processor, tmp_path, content):
    path = tmp_path / "picture.png"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="Cannot read an image"):
        _ask(processor, [str(path)])
    messages = [{"role": "user", "content": [{"type": "image", "path": str(path)}, {"type": "text", "text": "Hi"}]}]
    with pytest.raises(ValueError, match="Cannot read an image"):
        processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)


@pytest.mark.parametrize("mode", ["L", "RGBA", "I;16"])
def test_grayscale_alpha_and_16_bit_images_convert_as_the_official_loader(processor, mode):
    """The official pipeline opens images with PIL and calls `.convert("RGB")` (grayscale replicated, alpha
    dropped, 16-bit values saturated); transformers' own conversion would composite alpha on white instead."""
    image = _noise(40, 26, mode)
    pixels = _ask(processor, [image])["pixel_values"][0]
    expected = ref.anyres_crops(image.convert("RGB"), official_pinpoints_wh(), CROP)
    assert (pixels[: len(expected)] - expected).abs().max() <= 1e-6


def test_empty_images_and_wrong_types_are_refused(processor):
    with pytest.raises(ValueError, match="empty"):
        _ask(processor, [Image.new("RGB", (0, 12))])
    with pytest.raises(ValueError, match="empty"):
        _ask(processor, [np.zeros((0, 12, 3), dtype=np.uint8)])
    with pytest.raises(TypeError, match="type=<class 'float'>"):  # transformers' loader names the type
        _ask(processor, [3.5])


def test_an_image_larger_than_any_pinpoint_takes_the_largest_grid(processor, model):
    """The official best-fit choice downsizes it into the largest grid; the features are downscaled by
    anyres_max_N. Nothing is refused."""
    image = _noise(400, 400)
    inputs = _ask(processor, [image])
    assert inputs["pixel_values"].shape[1] == 1 + 3 * 3  # base + the 3 x 3 grid (84 x 84 px)
    expected = ref.anyres_crops(image, official_pinpoints_wh(), CROP)
    assert (inputs["pixel_values"][0] - expected).abs().max() <= 1e-6
    with torch.no_grad():
        assert model(**inputs).logits.shape[1] == inputs["input_ids"].shape[1]


def test_pixel_values_of_the_wrong_shape_or_type_are_refused(processor, model):
    inputs = _ask(processor, [_noise(30, 20)])
    ids, sizes = inputs["input_ids"], inputs["image_sizes"]
    with pytest.raises(ValueError, match=r"pixel_values` must have shape \[images, crops, 3, 28, 28\]"):
        model(ids, pixel_values=torch.zeros(1, 3, 3, 32, 32), image_sizes=sizes)
    with pytest.raises(ValueError, match="must have shape"):
        model(ids, pixel_values=torch.zeros(3, 28, 28), image_sizes=sizes)
    with pytest.raises(ValueError, match="crops"):
        model(ids, pixel_values=inputs["pixel_values"][:, :1], image_sizes=sizes)
    with pytest.raises(TypeError, match="float tensor"):
        model(ids, pixel_values=inputs["pixel_values"].long(), image_sizes=sizes)
    with pytest.raises(ValueError, match="image_sizes"):
        model(ids, pixel_values=inputs["pixel_values"], image_sizes=[[0, 20]])
    with pytest.raises(ValueError, match="image_sizes"):
        model(ids, pixel_values=inputs["pixel_values"])
    flat = inputs["pixel_values"][0]  # [all crops, C, H, W] is accepted too
    with torch.no_grad():
        assert torch.equal(model(ids, pixel_values=flat, image_sizes=sizes).logits, model(**inputs).logits)


def test_a_flat_image_list_is_grouped_by_the_prompts_placeholders():
    """`images=[a, b]` and `images=[[a, b]]` pack one two-image prompt the same way (one base crop per image);
    a count that does not match the placeholders is refused."""
    from llada_v_helpers import tiny_processor

    processor = tiny_processor()
    a, b = Image.new("RGB", (70, 40)), Image.new("RGB", (30, 50))
    text = "<image>\n<image>\nWhat is in the images?"
    flat, nested = (processor(images=images, text=[text], return_tensors="pt") for images in ([a, b], [[a, b]]))
    assert torch.equal(flat["input_ids"], nested["input_ids"]) and flat["batch_num_images"].tolist() == [2]
    assert torch.equal(flat["pixel_values"], nested["pixel_values"])
    with pytest.raises(ValueError, match=r"number of images \(3\) differs from the `<image>` placeholders"):
        processor(images=[a, b, a], text=[text], return_tensors="pt")


def test_an_unknown_image_packing_is_refused_by_name(processor, model):
    from llada_hf import LladaVConfig, LladaVProcessor

    with pytest.raises(ValueError, match="vision_aspect_ratio"):
        LladaVProcessor(processor.image_processor, processor.tokenizer, num_image_tokens=4, vision_aspect_ratio="pad")
    with pytest.raises(ValueError, match="vision_aspect_ratio"):
        LladaVConfig(vision_aspect_ratio="pad")
    inputs = _ask(processor, [_noise(30, 20)])
    with pytest.raises(ValueError, match="vision_aspect_ratio"):
        model(**inputs, vision_aspect_ratio="pad")
    with pytest.raises(ValueError, match="image placeholders"):  # packed as the processor did not: named, not silent
        model(**inputs, vision_aspect_ratio="square")


def test_llada_v_is_not_taken_for_the_text_model(model):
    """LLaDA-V holds its language model (composition) rather than being one: text-only tools refuse it by name."""
    from llada_hf import LladaForMaskedDiffusion
    from llada_hf.export.common import check_exportable
    from llada_hf.modeling_llada import LladaModel

    assert not isinstance(model, LladaForMaskedDiffusion) and isinstance(model.model.language_model, LladaModel)
    with pytest.raises(TypeError, match="LLaDA-V"):
        check_exportable(model)
