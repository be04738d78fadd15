"""DiffusionSFTTrainer on LLaDA-V: vision batches, the loss by hand, stage presets, LoRA, memory options, bad input."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from llada_v_helpers import (
    BOS_ID,
    CROP,
    EOS_ID,
    IMAGE_ID,
    MASK_ID,
    PATCH,
    VOCAB,
    official_pinpoints_wh,
    tiny_processor,
)
from PIL import Image
from sft_helpers import build_model, build_tokenizer, logged_losses

from transformers.models.siglip.modeling_siglip import SiglipEncoderLayer

from llada_hf import LladaConfig, LladaVConfig, LladaVForConditionalGeneration
from llada_hf.trainers import DiffusionSFTConfig, DiffusionSFTTrainer
from llada_hf.trainers.stages import STAGE_PRESETS, module_group
from llada_hf.trainers.vision import DataCollatorForVisionMaskedDiffusion, language_model_lora_config


COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30)}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def processor():
    return tiny_processor()


def tiny_llada_v(seed: int = 0) -> LladaVForConditionalGeneration:
    """A tiny LLaDA-V for `tiny_processor()`'s tokenizer: 28 px crops of 2 x 2 features, 2 text layers."""
    torch.manual_seed(seed)
    text = LladaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, mask_token_id=MASK_ID, pad_token_id=EOS_ID, eos_token_id=EOS_ID,
                       bos_token_id=BOS_ID, max_position_embeddings=512)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=CROP,
                  patch_size=PATCH, vision_use_head=False)
    pinpoints = [[h, w] for w, h in official_pinpoints_wh()]
    config = LladaVConfig(text_config=text, vision_config=vision, image_token_id=IMAGE_ID,
                          image_grid_pinpoints=pinpoints)
    return LladaVForConditionalGeneration(config).train()


def square(colour: str, width: int = CROP, height: int = CROP) -> Image.Image:
    return Image.new("RGB", (width, height), COLOURS[colour])


def colour_rows(n: int) -> list[tuple[str, Image.Image]]:
    names = list(COLOURS)
    return [(names[i % 3], square(names[i % 3], CROP + 14 * (i % 2))) for i in range(n)]


def messages_dataset(n: int = 6) -> Dataset:
    """TRL's "images" + "messages" format; answers of different lengths (EOS padding)."""
    rows = colour_rows(n)
    return Dataset.from_dict({
        "images": [[image] for _, image in rows],
        "messages": [[{"role": "user", "content": "What colour is it?"},
                      {"role": "assistant", "content": name if i % 2 else f"it is {name}"}]
                     for i, (name, _) in enumerate(rows)],
    })  # fmt: skip


def caption_dataset(n: int = 6) -> Dataset:
    """TRL's "image" + "prompt" / "completion" format (plain strings, `<image>` written in the prompt)."""
    rows = colour_rows(n)
    return Dataset.from_dict({"image": [image for _, image in rows], "prompt": ["<image>\nDescribe the picture."] * n,
                              "completion": [f" a {name} square" for name, _ in rows]})


def vision_args(output_dir, **overrides) -> DiffusionSFTConfig:
    kwargs = dict(output_dir=str(output_dir), per_device_train_batch_size=3, max_steps=2, learning_rate=1e-2,
                  bf16=False, gradient_checkpointing=False, report_to="none", logging_steps=1, save_strategy="no",
                  disable_tqdm=True, max_length=None)
    return DiffusionSFTConfig(**{**kwargs, **overrides})


def make_trainer(tmp_path, processor, dataset=None, model=None, peft_config=None, **overrides) -> DiffusionSFTTrainer:
    return DiffusionSFTTrainer(
        model=model if model is not None else tiny_llada_v(),
        args=vision_args(tmp_path / "out", **overrides),
        train_dataset=dataset if dataset is not None else messages_dataset(),
        processing_class=processor,
        peft_config=peft_config,
    )


def first_batch(trainer, n: int = 3) -> dict:
    return trainer.data_collator([trainer.train_dataset[i] for i in range(n)])


def snapshot(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


# ---- batches ----


def test_collator_masks_only_answer_tokens_and_pads_answers_with_eos(processor):
    rows = [
        {"images": [square("red")], "prompt": [{"role": "user", "content": "What colour is it?"}],
         "completion": [{"role": "assistant", "content": "it is red"}]},
        {"images": [square("blue", 56, 28), square("green")],  # two images in one example: one crop each
         "prompt": [{"role": "user", "content": "What colour is it?"}],
         "completion": [{"role": "assistant", "content": "blue"}]},
    ]  # fmt: skip
    batch = DataCollatorForVisionMaskedDiffusion(processor)(rows)
    ids, labels, attention = batch["input_ids"], batch["labels"], batch["attention_mask"]
    image = ids == IMAGE_ID
    assert (labels[image] == -100).all() and image.any()  # image placeholders are never maskable
    assert batch["pixel_values"].shape[:2] == (3, 2) and batch["batch_num_images"].tolist() == [1, 2]
    tokenizer = processor.tokenizer
    for row, answer in enumerate(["it is red<|eot_id|>", "blue<|eot_id|>"]):
        scored = (labels[row] != -100).nonzero().flatten()
        first = int(scored[0])
        assert (labels[row, :first] == -100).all()  # the whole prompt (system, user, images, header) is never scored
        assert tokenizer.decode(ids[row, :first]).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
        assert torch.equal(labels[row, first:], ids[row, first:])  # the answer, then EOS padding: all maskable
        assert tokenizer.decode(ids[row, first:]).startswith(answer)
        assert attention[row].all()  # EOS padding is attended
    short = 1  # its answer is shorter: padded with EOS up to the batch length
    assert ids[short, -1] == EOS_ID and labels[short, -1] == EOS_ID


def test_plain_template_is_the_image_then_the_caption_and_a_newline_without_eos(processor):
    """Official `preprocess_plain`: `<image>` + caption + "\n", no EOS appended; EOS only pads the shorter rows, as
    the official collator pads the labels with the pad (= EOS) token."""
    collator = DataCollatorForVisionMaskedDiffusion(processor, prompt_template="plain")
    batch = collator([{"image": square("red"), "prompt": "<image>\nDescribe the picture.",
                       "completion": " a red square and more"},
                      {"image": square("blue"), "prompt": "<image>", "completion": " a blue square"}])
    tokenizer = processor.tokenizer
    for row, caption in enumerate([" a red square and more\n", " a blue square\n"]):
        ids, labels = batch["input_ids"][row], batch["labels"][row]
        prompt = labels == -100
        assert (ids[prompt] == IMAGE_ID).all()  # no system prompt, no user text: only the image
        answer = ids[~prompt]
        caption_ids = tokenizer(caption, add_special_tokens=False)["input_ids"]
        assert answer[: len(caption_ids)].tolist() == caption_ids
        assert (answer[len(caption_ids):] == EOS_ID).all()  # padding only
    longest = batch["labels"][0][batch["labels"][0] != -100]
    assert EOS_ID not in longest.tolist()  # the longest caption has no EOS at all


def test_plain_template_packs_each_image_as_one_squashed_crop(processor):
    """Official stage 1 sets no `image_aspect_ratio` / `mm_patch_merge_type`: the training script's defaults
    ("square", "flat") squash each image to one crop whose features follow without grid or `image_newline`."""
    wide = square("green", 3 * CROP, CROP)  # anyres: a 1 x 3 grid
    plain = DataCollatorForVisionMaskedDiffusion(processor, prompt_template="plain")
    batch = plain([{"image": wide, "prompt": "<image>", "completion": " a green square"}])
    assert batch["vision_aspect_ratio"] == "square" and processor.vision_aspect_ratio == "anyres_max_4"
    assert batch["pixel_values"].shape == (1, 1, 3, CROP, CROP)
    anyres = processor(images=[wide], text=["<image>"], return_tensors="pt")
    assert torch.equal(batch["pixel_values"][0, 0], anyres["pixel_values"][0, 0])  # the base crop: the image squashed
    assert int((batch["input_ids"] == IMAGE_ID).sum()) == (CROP // PATCH) ** 2  # one crop's features, no newline
    model = tiny_llada_v().eval()
    with torch.no_grad():
        features = model.model.get_image_features(batch["pixel_values"], batch["image_sizes"],
                                                  batch["batch_num_images"], vision_aspect_ratio="square")
        tower = model.model.vision_tower(batch["pixel_values"][0], output_hidden_states=True)
        crop = model.model.multi_modal_projector(tower.hidden_states[-1])  # before the tower's post_layernorm
    assert torch.equal(features[0], crop[0])  # the projected features of the squashed crop, nothing appended
    gridded = DataCollatorForVisionMaskedDiffusion(processor, prompt_template="plain",
                                                   vision_aspect_ratio="anyres_max_4")
    assert gridded([{"image": wide, "prompt": "<image>", "completion": " a"}])["pixel_values"].shape[1] == 4


# ---- the loss ----


def test_vision_loss_equals_the_llada_v_loss_computed_by_hand(tmp_path, processor):
    """docs/LLADA_V.md section 5: CE at the masked answer tokens / p, per row / answer length (EOS padding incl.)."""
    trainer = make_trainer(tmp_path, processor)
    model, batch, seed = trainer.model, first_batch(trainer), 4321
    loss = trainer.compute_loss(model, {**batch, "noise_seed": seed})

    generator = torch.Generator().manual_seed(seed)
    ids, labels = batch["input_ids"], batch["labels"]
    t = torch.rand(len(ids), generator=generator)
    p = (1 - 1e-3) * t + 1e-3
    draws = torch.rand(ids.shape, generator=generator)
    answer = labels != -100
    masked = answer & (draws < p[:, None])
    noisy = ids.masked_fill(masked, MASK_ID)
    with torch.no_grad():
        logits = model(input_ids=noisy, attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"],
                       image_sizes=batch["image_sizes"], batch_num_images=batch["batch_num_images"]).logits
    expected = 0.0
    for row in range(len(ids)):
        row_sum = sum(F.cross_entropy(logits[row, pos], ids[row, pos]).item() / p[row].item()
                      for pos in range(ids.shape[1]) if masked[row, pos])
        expected += row_sum / answer[row].sum().item()
    expected /= len(ids)
    assert masked.any() and (answer & ~masked).any()
    assert not masked[ids == IMAGE_ID].any()
    assert loss.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("template", ["chat", "plain"])
def test_noise_copies_keep_their_images(tmp_path, processor, template):
    trainer = make_trainer(tmp_path, processor, dataset=caption_dataset(), noise_samples_per_example=2,
                           prompt_template=template)
    assert trainer.train().global_step == 2


# ---- stages ----


def test_stage_projector_trains_only_the_projector_and_the_rest_stays_bit_identical(tmp_path, processor):
    trainer = make_trainer(tmp_path, processor, dataset=caption_dataset(), stage="projector")
    assert trainer.data_collator.prompt_template == "plain"
    assert first_batch(trainer)["vision_aspect_ratio"] == "square"  # the official stage-1 packing
    before = snapshot(trainer.model)
    trainer.train()
    for name, parameter in trainer.model.named_parameters():
        if module_group(name) == "multi_modal_projector":
            assert not torch.equal(parameter, before[name]), name
        else:
            assert torch.equal(parameter, before[name]), name  # tower, image_newline, language model, LM head


def test_stage_instruct_trains_everything_with_a_lower_tower_learning_rate(tmp_path, processor):
    trainer = make_trainer(tmp_path, processor, stage="instruct", max_steps=1)
    assert trainer.data_collator.prompt_template == "chat"
    before = snapshot(trainer.model)
    trainer.train()
    changed = {module_group(n) for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"vision_tower", "multi_modal_projector", "language_model"}
    tower = {id(p) for n, p in trainer.model.named_parameters() if module_group(n) == "vision_tower"}
    rates = {("tower" if id(p) in tower else "rest", round(group["initial_lr"], 12))
             for group in trainer.optimizer.param_groups for p in group["params"]}
    assert rates == {("tower", 2e-3), ("rest", 1e-2)}  # the official ratio 2e-6 / 1e-5

    explicit = make_trainer(tmp_path, processor, stage="reasoning", vision_tower_learning_rate=1e-4, max_steps=1)
    explicit.create_optimizer()
    assert {g["lr"] for g in explicit.optimizer.param_groups if any(id(p) in tower for p in g["params"])} <= {1e-4}


def test_official_hyperparameters_are_the_defaults_of_for_stage():
    """The official scripts: llada_v_pretrain.sh, llada_v_si_10M.sh / llada_v_ov_2M.sh, llada_v_vw.sh."""
    stage1 = DiffusionSFTConfig.for_stage("projector", output_dir="out", bf16=False)
    assert (stage1.learning_rate, stage1.per_device_train_batch_size, stage1.max_length) == (1e-3, 16, 8192)
    assert stage1.lr_scheduler_type == "cosine" and stage1.warmup_steps == 0.03
    assert stage1.image_prompt_template == "plain" and not stage1.dataloader_drop_last
    stage2 = DiffusionSFTConfig.for_stage("instruct", output_dir="out", bf16=False)
    assert (stage2.learning_rate, stage2.vision_tower_learning_rate, stage2.gradient_accumulation_steps) == (
        1e-5, 2e-6, 4)
    assert stage2.max_length == 16384  # the OneVision part's (its single-image part: 8192)
    stage3 = DiffusionSFTConfig.for_stage("reasoning", output_dir="out", bf16=False)
    assert stage3.max_length == 8192  # llada_v_vw.sh, not stage 2's 16384
    assert {**STAGE_PRESETS["reasoning"].official_args, "max_length": 16384} == STAGE_PRESETS["instruct"].official_args
    assert stage2.dataloader_drop_last and stage3.dataloader_drop_last
    for stage in (stage1, stage2, stage3):
        assert stage.num_train_epochs == 1  # every script: --num_train_epochs 1 (transformers' default is 3)
        assert stage.weight_decay == 0.0
    assert DiffusionSFTConfig.for_stage("reasoning", output_dir="out", learning_rate=3e-5).learning_rate == 3e-5


def test_lora_on_the_language_model_with_the_projector_fully_trained_merges_and_reloads(tmp_path, processor):
    model = tiny_llada_v()
    before = snapshot(model)
    trainer = make_trainer(tmp_path, processor, model=model, peft_config=language_model_lora_config(r=4),
                           max_steps=2)
    trainer.train()
    peft_model = trainer.model
    lora_targets = {n for n, _ in peft_model.named_parameters() if "lora_A" in n}
    assert lora_targets and all("language_model.layers" in n for n in lora_targets)
    merged = peft_model.merge_and_unload()
    after = dict(merged.named_parameters())
    for name, value in before.items():
        group = module_group(name)
        if group == "vision_tower" or not name.endswith("_proj.weight") and group == "language_model":
            assert torch.equal(after[name], value), name  # frozen: not adapted
    assert not torch.equal(after["model.multi_modal_projector.linear_1.weight"],
                           before["model.multi_modal_projector.linear_1.weight"])  # fully trained
    assert not torch.equal(after["model.language_model.layers.0.self_attn.q_proj.weight"],
                           before["model.language_model.layers.0.self_attn.q_proj.weight"])  # the adapter is in

    merged.save_pretrained(tmp_path / "merged")
    processor.save_pretrained(tmp_path / "merged")
    batch = first_batch(trainer)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_sizes", "batch_num_images")}
    torch.save(inputs, tmp_path / "inputs.pt")
    with torch.no_grad():
        expected = merged.eval()(**inputs).logits
    # The saved code, where llada_hf cannot be imported
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["llada_hf"] = None
        sys.path = [p for p in sys.path if not p.rstrip("/").endswith(("src", "tests", "benchmarks"))]
        import torch
        from transformers import AutoModelForImageTextToText
        torch.set_num_threads(1)
        model = AutoModelForImageTextToText.from_pretrained({str(tmp_path / "merged")!r}, trust_remote_code=True)
        assert "transformers_modules" in type(model).__module__, type(model).__module__
        with torch.no_grad():
            torch.save(
                model.eval()(**torch.load({str(tmp_path / "inputs.pt")!r})).logits, {str(tmp_path / "out.pt")!r}
            )
        """
    )
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert torch.allclose(torch.load(tmp_path / "out.pt"), expected, atol=1e-5)


# ---- memory ----


def test_gradient_checkpointing_runs_through_the_vision_tower(tmp_path, processor):
    def one_step(checkpointing: bool):
        trainer = make_trainer(
            tmp_path, processor, stage="instruct", max_steps=1, gradient_checkpointing=checkpointing
        )
        layer = next(m for m in trainer.model.model.vision_tower.modules() if isinstance(m, SiglipEncoderLayer))
        calls = []
        layer.layer_norm1.register_forward_pre_hook(lambda *args: calls.append(1))  # inside the checkpointed forward
        trainer.train()
        return trainer, {n: p.detach().clone() for n, p in trainer.model.named_parameters()}, len(calls)

    plain_trainer, plain, plain_calls = one_step(False)
    checkpointed_trainer, checkpointed, checkpointed_calls = one_step(True)
    assert (plain_calls, checkpointed_calls) == (1, 2)  # the tower layer is recomputed in the backward pass
    assert logged_losses(checkpointed_trainer) == pytest.approx(logged_losses(plain_trainer), rel=1e-6)
    for name in plain:
        assert torch.allclose(checkpointed[name], plain[name], atol=1e-6), name


def test_a_frozen_tower_can_stay_in_bfloat16(tmp_path, processor):
    trainer = make_trainer(tmp_path, processor, dataset=caption_dataset(), stage="projector",
                           vision_tower_dtype="bfloat16")
    tower = trainer.model.model.vision_tower
    assert {p.dtype for p in tower.parameters()} == {torch.bfloat16}
    assert trainer.model.model.multi_modal_projector.linear_1.weight.dtype == torch.float32
    before = snapshot(tower)
    trainer.train()
    assert all(torch.equal(p, before[n]) for n, p in tower.named_parameters())
    assert all(torch.isfinite(torch.tensor(loss)) for loss in logged_losses(trainer).values())

    with pytest.raises(ValueError, match="frozen"):
        make_trainer(tmp_path, processor, stage="instruct", vision_tower_dtype="bfloat16")


# ---- bad input ----


def _bad_rows(case: str, tmp_path) -> Dataset:
    prompt = [{"role": "user", "content": "What colour is it?"}]
    completion = [{"role": "assistant", "content": "red"}]
    if case == "missing image":
        return Dataset.from_dict({"images": [[None]], "prompt": [prompt], "completion": [completion]})
    if case == "unreadable image":
        (tmp_path / "broken.png").write_text("not an image")
        return Dataset.from_dict({"image": [str(tmp_path / "broken.png")], "prompt": ["<image> Describe."],
                                  "completion": [" red"]})
    if case == "absent image file":
        return Dataset.from_dict({"image": [str(tmp_path / "absent.png")], "prompt": ["<image> Describe."],
                                  "completion": [" red"]})
    if case == "unconvertible mode":
        return [{"image": Image.new("La", (28, 28)), "prompt": "<image> Describe.", "completion": " red"}]
    if case == "more placeholders than images":
        return Dataset.from_dict({"image": [square("red")], "prompt": ["<image> and <image>: which is red?"],
                                  "completion": [" the first"]})
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing image", "missing image"),
        ("unreadable image", "Cannot read"),
        ("absent image file", "does not exist"),
        ("unconvertible mode", "cannot be converted to RGB"),
        ("more placeholders than images", "2 image placeholders .* but 1 images"),
    ],
)
def test_bad_rows_are_named(tmp_path, processor, case, message):
    rows = _bad_rows(case, tmp_path)
    rows = list(rows) if isinstance(rows, Dataset) else rows
    with pytest.raises(ValueError, match=message):
        DataCollatorForVisionMaskedDiffusion(processor)(rows)


def test_an_image_dataset_for_a_text_model_names_llada_v(tmp_path):
    with pytest.raises(TypeError, match="LLaDA-V"):
        DiffusionSFTTrainer(model=build_model(), args=vision_args(tmp_path / "out"), train_dataset=messages_dataset(),
                            processing_class=build_tokenizer())
    assert not (tmp_path / "out").exists()


def test_an_image_dataset_needs_the_processor(tmp_path, processor):
    with pytest.raises(TypeError, match="LladaVProcessor"):
        DiffusionSFTTrainer(model=tiny_llada_v(), args=vision_args(tmp_path / "out"), train_dataset=messages_dataset(),
                            processing_class=processor.tokenizer)


def test_a_stage_preset_for_a_text_model_is_refused(tmp_path):
    from sft_helpers import reversal_dataset

    with pytest.raises(ValueError, match="LLaDA-V training stage"):
        DiffusionSFTTrainer(model=build_model(), args=vision_args(tmp_path / "out", stage="instruct"),
                            train_dataset=reversal_dataset(4), processing_class=build_tokenizer())
    with pytest.raises(ValueError, match="stage"):
        vision_args(tmp_path / "out", stage="pretrain")


# ---- scale-out: two processes equal one process with gradient accumulation ----

TWO_PROCESS_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    sys.path.insert(0, {tests_dir!r})
    from llada_v_helpers import tiny_processor
    from sft_helpers import logged_losses
    from test_trainer_vision import messages_dataset, tiny_llada_v, vision_args
    from llada_hf.trainers import DiffusionSFTTrainer

    torch.set_num_threads(1)
    trainer = DiffusionSFTTrainer(
        model=tiny_llada_v(),
        args=vision_args({output_dir!r}, per_device_train_batch_size=2, max_steps=2, stage="instruct", use_cpu=True),
        train_dataset=messages_dataset(8),
        processing_class=tiny_processor(),
    )
    trainer.train()
    if trainer.accelerator.is_main_process:
        with open({result!r}, "w") as f:
            json.dump({{"processes": trainer.accelerator.num_processes, "losses": logged_losses(trainer)}}, f)
    """
)


def test_two_processes_give_the_loss_curve_of_gradient_accumulation(tmp_path, processor):
    script, result = tmp_path / "train.py", tmp_path / "result.json"
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    script.write_text(TWO_PROCESS_SCRIPT.format(tests_dir=tests_dir, output_dir=str(tmp_path / "ddp"),
                                                result=str(result)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    # accelerate's multi-process launcher; with `use_cpu=True` the processes join a gloo group
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(script)]
    run = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    two_processes = json.loads(result.read_text())
    assert two_processes["processes"] == 2

    one_process = make_trainer(tmp_path, processor, dataset=messages_dataset(8), per_device_train_batch_size=2,
                               gradient_accumulation_steps=2, max_steps=2, stage="instruct")
    one_process.train()
    expected = {str(step): loss for step, loss in logged_losses(one_process).items()}
    assert two_processes["losses"] == pytest.approx(expected, rel=1e-5)


# ---- command line ----


def test_cli_train_stage_takes_the_official_hyperparameters_as_defaults(tmp_path, processor):
    from llada_hf.cli import main

    model = tiny_llada_v()
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    rows = []
    for i, (name, image) in enumerate(colour_rows(4)):
        image.save(tmp_path / f"{i}.png")
        rows.append({"image": str(tmp_path / f"{i}.png"), "prompt": "<image>", "completion": f" a {name} square"})
    (tmp_path / "captions.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    out = tmp_path / "trained"
    code = main(["train", "--model_name_or_path", str(tmp_path / "model"), "--dataset_path",
                 str(tmp_path / "captions.jsonl"), "--stage", "projector", "--output_dir", str(out),
                 "--max_steps", "1",
                 "--per_device_train_batch_size", "2", "--report_to", "none", "--gradient_checkpointing", "false"])
    assert code == 0
    args = torch.load(out / "training_args.bin", weights_only=False)
    assert args.stage == "projector" and args.image_prompt_template == "plain"
    assert (args.learning_rate, args.lr_scheduler_type, args.warmup_steps, args.max_length, args.num_train_epochs) == (
        1e-3, "cosine", 0.03, 8192, 1)  # official
    assert args.per_device_train_batch_size == 2  # given on the command line
    trained = LladaVForConditionalGeneration.from_pretrained(out)
    for name, value in trained.state_dict().items():
        if module_group(name) != "multi_modal_projector":
            assert torch.equal(value, model.state_dict()[name]), name


def test_cli_train_reads_image_paths_relative_to_the_dataset_file(tmp_path, processor, monkeypatch):
    """`img/0.png` in data/captions.jsonl is data/img/0.png wherever the command runs (absolute paths are kept)."""
    from llada_hf.cli import main
    from llada_hf.cli.dataset_files import load_local_dataset

    model = tiny_llada_v()
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    (tmp_path / "data" / "img").mkdir(parents=True)
    rows = []
    for i, (name, image) in enumerate(colour_rows(4)):
        image.save(tmp_path / "data" / "img" / f"{i}.png")
        path = f"img/{i}.png" if i else str(tmp_path / "data" / "img" / "0.png")
        rows.append({"image": path, "prompt": "<image>", "completion": f" a {name} square"})
    (tmp_path / "data" / "captions.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    data = os.path.join("..", "data", "captions.jsonl")
    assert load_local_dataset(data)["image"] == [str(tmp_path / "data" / "img" / f"{i}.png") for i in range(4)]
    code = main(["train", "--model_name_or_path", str(tmp_path / "model"), "--dataset_path", data,
                 "--stage", "projector", "--output_dir", str(tmp_path / "trained"), "--max_steps", "1",
                 "--per_device_train_batch_size", "2", "--report_to", "none", "--gradient_checkpointing", "false"])
    assert code == 0
    assert (tmp_path / "trained" / "model.safetensors").is_file()


def test_cli_train_stage_from_an_official_folder(tmp_path):
    """`llada-hf train --stage` on a folder laid out as the official one: config, weights, tower folder and
    tokenizer, no processor config (AutoProcessor builds the official one from the config)."""
    from llada_v_helpers import tiny_processor, write_official_checkpoint

    from llada_hf.cli import main

    folder = tmp_path / "official"
    write_official_checkpoint(folder)
    tiny_processor().tokenizer.save_pretrained(folder)
    assert not (folder / "preprocessor_config.json").exists()
    rows = []
    for i, (name, image) in enumerate(colour_rows(4)):
        image.save(tmp_path / f"{i}.png")
        rows.append({"image": f"{i}.png", "prompt": "<image>", "completion": f" a {name} square"})
    (tmp_path / "captions.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    code = main(["train", "--model_name_or_path", str(folder), "--dataset_path", str(tmp_path / "captions.jsonl"),
                 "--stage", "projector", "--output_dir", str(tmp_path / "trained"), "--max_steps", "1",
                 "--per_device_train_batch_size", "2", "--report_to", "none", "--gradient_checkpointing", "false"])
    assert code == 0 and (tmp_path / "trained" / "model.safetensors").is_file()
