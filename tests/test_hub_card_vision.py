"""Model cards and Hub publishing for LLaDA-V (vision-language) checkpoints, tested like the text card
(tests/test_hub_card.py): dry runs (files, metadata, architecture, the exact snippet), bad input, a real upload to a
fake Hub (tests/fake_hub.py), then the card snippets — the model's and a LoRA adapter's — run with an image in a
subprocess where `llada_hf` cannot be imported, giving the original model's tokens."""

import json
import re
import textwrap
from types import SimpleNamespace

import pytest
import torch
from fake_hub import FakeHub
from llada_v_helpers import IMAGE_ID, MASK_ID, TOWER_CONFIG, tiny_processor, write_official_checkpoint
from peft import LoraConfig, get_peft_model
from PIL import Image
from test_hub_card import STRANGER_SCRIPT, TOKEN, read_folder, run_python, snippet_of, subprocess_env

import transformers
from transformers import AutoModel

from llada_hf import LladaVForConditionalGeneration
from llada_hf.hub_card import add_card_and_code, publish, publish_folder, render_model_card
from llada_hf.hub_card.card import LLADA_CITATION, LLADA_V_CITATION
from llada_hf.modeling_llada import BUNDLE_FILES, VISION_BUNDLE_FILES


GENERATION = {"max_new_tokens": 8, "steps": 8, "block_length": 4}  # the checkpoint's own settings
PROCESSOR_FILES = ["chat_template.jinja", "processor_config.json", "tokenizer.json", "tokenizer_config.json"]
MODEL_FILES = sorted(["README.md", "config.json", "generation_config.json", "model.safetensors", *BUNDLE_FILES,
                      *VISION_BUNDLE_FILES, *PROCESSOR_FILES])


@pytest.fixture(scope="module")
def processor():
    return tiny_processor()


@pytest.fixture(scope="module")
def saved(processor, tmp_path_factory):
    """A tiny LLaDA-V saved by llada-hf (model + processor), and the model loaded back from that folder."""
    root = tmp_path_factory.mktemp("llada-v-card")
    write_official_checkpoint(root / "official")
    model = AutoModel.from_pretrained(root / "official")
    model.generation_config.update(**GENERATION)
    model.save_pretrained(root / "saved")
    processor.save_pretrained(root / "saved")
    return SimpleNamespace(folder=root / "saved", model=LladaVForConditionalGeneration.from_pretrained(root / "saved"))


@pytest.fixture(scope="module")
def adapter(saved):
    """A LoRA adapter with non-zero weights on the language model's attention."""
    base = LladaVForConditionalGeneration.from_pretrained(saved.folder).eval()
    torch.manual_seed(1)
    targets = r".*language_model.*\.(q_proj|v_proj)"  # the language model's attention, not the tower's
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    return get_peft_model(base, lora).eval()


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    path = tmp_path_factory.mktemp("photo") / "photo.jpg"
    pixels = torch.randint(0, 256, (40, 70, 3), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    Image.fromarray(pixels.numpy(), "RGB").save(path)
    return path


def generate_like_the_snippet(model, processor, photo) -> list[list[int]]:
    """What the card's snippet computes: the same question about the same picture, the checkpoint's settings."""
    messages = [{"role": "user", "content": [{"type": "image", "image": Image.open(photo)},
                                             {"type": "text", "text": "What is in the image?"}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    return model.generate(**inputs, **GENERATION).tolist()


# --------------------------------------------------------------------------------------------------
# Dry runs: files and card
# --------------------------------------------------------------------------------------------------


def test_dry_run_plans_the_vision_folder_and_renders_the_card(saved, processor, tmp_path):
    plan = publish(saved.model, processor, "alice/tiny-llada-v", dry_run=True, save_directory=tmp_path / "out")

    assert plan.files == MODEL_FILES
    assert sorted(read_folder(tmp_path / "out")) == MODEL_FILES
    assert plan.card.data.to_dict() == {
        "library_name": "transformers",
        "license": "apache-2.0",
        "pipeline_tag": "image-text-to-text",
        "tags": ["llada", "masked-diffusion", "custom_code"],
    }
    text = str(plan.card)
    assert re.findall(r"^## .*", text, flags=re.MULTILINE) == ["## Architecture", "## Usage", "## Citation"]
    assert "vision-language masked diffusion model of the [LLaDA-V](https://arxiv.org/abs/2505.16933)" in text
    assert all(f"`{name}`" in text for name in BUNDLE_FILES + VISION_BUNDLE_FILES)
    for row in [
        "| Layers | 2 |",  # the language model's (text_config), not the tower's 2 kept layers by accident:
        "| Hidden size | 32 |",
        "| Vocabulary (embedding rows) | 296 |",
        f"| Mask token id | {MASK_ID} |",
        f"| Vision tower | SigLIP: {TOWER_CONFIG['num_hidden_layers'] - 1} layers, hidden size 16 |",
        "| Image crops | 28 px, patch 14: 4 features per crop |",
        "| Crop grids (anyres) | 9 grids, `anyres_max_4` |",
        f"| Image token id | {IMAGE_ID} |",
    ]:
        assert row in text
    assert LLADA_CITATION in text and LLADA_V_CITATION in text
    assert f"Needs `torch`, `transformers>={transformers.__version__}`, `pillow`; not `llada-hf`." in text
    assert snippet_of(plan.card) == textwrap.dedent('''\
        from PIL import Image
        from transformers import AutoModelForImageTextToText, AutoProcessor

        model_id = "alice/tiny-llada-v"
        processor = AutoProcessor.from_pretrained(model_id, trust_remote_code=True)
        model = AutoModelForImageTextToText.from_pretrained(model_id, trust_remote_code=True, dtype="auto").eval()

        image = Image.open("photo.jpg")  # any picture
        question = {"type": "text", "text": "What is in the image?"}
        messages = [{"role": "user", "content": [{"type": "image", "image": image}, question]}]
        inputs = processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
        )
        output = model.generate(
            **inputs,
            max_new_tokens=8,
            steps=8,
            block_length=4,
            remasking="low_confidence",
            temperature=0.0,
            cfg_scale=0.0,
        )
        answer = output[0, inputs["input_ids"].shape[1]:].tolist()  # generate returns prompt + answer
        ends = [processor.tokenizer.eos_token_id, processor.tokenizer.convert_tokens_to_ids("<|eot_id|>")]
        answer = answer[: min([answer.index(end) for end in ends if end in answer], default=len(answer))]
        print(processor.decode(answer, skip_special_tokens=True))
        ''')


def test_publish_folder_renders_the_same_card(saved):
    plan = publish_folder(saved.folder, "alice/tiny-llada-v", dry_run=True)
    assert plan.files == MODEL_FILES
    assert plan.card.data.pipeline_tag == "image-text-to-text" and "AutoProcessor.from_pretrained" in str(plan.card)


def test_adapter_card_loads_the_base_and_its_processor(adapter, processor, tmp_path):
    plan = publish(adapter, processor, "alice/tiny-llada-v-lora", dry_run=True, base_model="alice/tiny-llada-v",
                   save_directory=tmp_path / "adapter")
    assert plan.card.data.pipeline_tag == "image-text-to-text" and plan.card.data.library_name == "peft"
    snippet = snippet_of(plan.card)
    assert 'base_id, adapter_id = "alice/tiny-llada-v", "alice/tiny-llada-v-lora"' in snippet
    assert "processor = AutoProcessor.from_pretrained(base_id, trust_remote_code=True)" in snippet
    assert "model = PeftModel.from_pretrained(model, adapter_id).eval()" in snippet
    from_folder = render_model_card(tmp_path / "adapter", repo_id="alice/tiny-llada-v-lora",
                                    base_model="alice/tiny-llada-v")
    # The adapter folder's processor says it is a vision adapter (its generation settings are the base's: unknown)
    assert snippet_of(from_folder).split("output = ")[0] == snippet.split("output = ")[0]


def test_add_card_and_code_copies_the_vision_bundle(saved, processor, tmp_path):
    add_card_and_code(tmp_path, saved.model, repo_id="alice/tiny-llada-v", tokenizer=processor)
    assert sorted(read_folder(tmp_path)) == sorted(["README.md", *BUNDLE_FILES, *VISION_BUNDLE_FILES])


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------


def test_a_vision_model_needs_its_processor(saved, processor):
    with pytest.raises(ValueError, match="published with its processor"):
        publish(saved.model, processor.tokenizer, "alice/tiny-llada-v", dry_run=True)


@pytest.mark.parametrize("missing", ["processor_config.json", "modeling_llada_v.py"])
def test_an_incomplete_vision_folder_is_refused_by_name(saved, tmp_path, missing):
    for name, content in read_folder(saved.folder).items():
        if name != missing:
            (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match=f"lacks {re.escape(missing)}"):
        publish_folder(tmp_path, "alice/tiny-llada-v", dry_run=True)


# --------------------------------------------------------------------------------------------------
# A real upload to a fake Hub, then loading as a stranger
# --------------------------------------------------------------------------------------------------

UPLOAD_SCRIPT = """
import json, sys
from llada_hf.hub_card import publish_folder

result = publish_folder(sys.argv[1], "alice/tiny-llada-v", token=sys.argv[2])
print(json.dumps({"files": result.files, "commit_url": result.commit_url}))
"""


@pytest.fixture(scope="module")
def upload(saved, tmp_path_factory):
    """Publish the saved folder to a fake Hub; return the hub and what `publish_folder` reported."""
    tmp = tmp_path_factory.mktemp("upload")
    hub = FakeHub()
    endpoint = hub.start()
    try:
        env = subprocess_env(tmp, HF_ENDPOINT=endpoint, HF_HUB_OFFLINE="0", NO_PROXY="127.0.0.1,localhost")
        outcome = json.loads(run_python(UPLOAD_SCRIPT, str(saved.folder), TOKEN, env=env))
    finally:
        hub.stop()
    return SimpleNamespace(hub=hub, outcome=outcome)


def test_upload_sends_the_vision_folder_in_one_commit(upload, saved):
    repo = upload.hub.repos["alice/tiny-llada-v"]
    assert upload.outcome["files"] == MODEL_FILES
    assert repo.branches["main"] == read_folder(saved.folder)  # byte for byte
    assert [commit["files"] for commit in repo.commits] == [MODEL_FILES]


def test_a_stranger_runs_the_vision_card_snippets_and_gets_the_original_tokens(
    upload, saved, processor, adapter, photo, tmp_path
):
    received = tmp_path / "received"
    received.mkdir()
    for name, content in upload.hub.repos["alice/tiny-llada-v"].branches["main"].items():
        (received / name).write_bytes(content)
    adapter_plan = publish(adapter, processor, "alice/tiny-llada-v-lora", dry_run=True,
                           base_model="alice/tiny-llada-v", save_directory=tmp_path / "adapter")
    jobs = {
        "model": {
            "snippet": snippet_of((received / "README.md").read_text()),
            "paths": {"alice/tiny-llada-v": str(received), "photo.jpg": str(photo)},
        },
        "adapter": {
            "snippet": snippet_of(adapter_plan.card),
            "paths": {"alice/tiny-llada-v": str(received), "alice/tiny-llada-v-lora": str(tmp_path / "adapter"),
                      "photo.jpg": str(photo)},
        },
    }
    env = subprocess_env(tmp_path, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    results = json.loads(run_python(STRANGER_SCRIPT, json.dumps(jobs), env=env))

    for name, original in (("model", saved.model.eval()), ("adapter", adapter)):
        tokens = generate_like_the_snippet(original, processor, photo)
        assert results[name]["tokens"] == tokens, name
    assert results["model"]["tokens"] != results["adapter"]["tokens"]  # the adapter does change the model
    prompt_length = len(generate_like_the_snippet(saved.model, processor, photo)[0]) - GENERATION["max_new_tokens"]
    answer = torch.tensor(results["model"]["tokens"])[:, prompt_length:]
    from llada_hf import end_token_ids, truncate_at_eos

    ends = end_token_ids(processor.tokenizer, saved.model.generation_config)
    expected = processor.decode(truncate_at_eos(answer, ends)[0], skip_special_tokens=True)
    assert results["model"]["printed"] == expected + "\n"
