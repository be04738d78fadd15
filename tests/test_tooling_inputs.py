"""Bad input to the Python tooling is one clear error naming the argument; tokenizers that llada-hf saves know
their mask token; `truncate_at_eos` is the one cut of an answer at its end token."""

import pytest
import torch
from datasets import Dataset

from transformers import AutoTokenizer, PreTrainedTokenizerFast

from llada_hf import LladaConfig, LladaForMaskedDiffusion, end_token_ids, truncate_at_eos
from llada_hf.evaluation import greedy_match, log_likelihood
from llada_hf.hub_card import publish, publish_folder
from llada_hf.tokenization import BOS, EOS, EOT, MASK, SPECIAL_TOKENS, model_token_ids, train_tokenizer
from llada_hf.trainers import DiffusionSFTConfig, DiffusionSFTTrainer
from llada_hf.trainers.config import bf16_supported


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(["the cat sat on the mat", "a dog ran in the park"] * 4, vocab_size=290)


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    config = LladaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         **model_token_ids(tokenizer))
    return LladaForMaskedDiffusion(config).eval()


def official_like_tokenizer(tokenizer) -> PreTrainedTokenizerFast:
    """Built like the official LLaDA tokenizer: `<|mdm_mask|>` only among the additional special tokens."""
    others = [token for token in SPECIAL_TOKENS if token not in (BOS, EOS)]
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, bos_token=BOS, eos_token=EOS,
                                   additional_special_tokens=others)


# ---- answers end at their end token ----------------------------------------------------------------


def test_truncate_at_eos_cuts_each_answer_at_its_first_end_token(tokenizer):
    ends = end_token_ids(tokenizer)
    assert ends == sorted([tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(EOT)])
    eos, eot = ends
    assert truncate_at_eos(torch.tensor([[50, eot, 60, eos], [70, 80, 90, 99], [eos, 50, 50, 50]]), ends) == [
        [50], [70, 80, 90, 99], []
    ]
    assert truncate_at_eos([[50, 60, eos]], eos) == [[50, 60]]
    with pytest.raises(TypeError, match="batch"):
        truncate_at_eos(torch.tensor([50, 60, eos]), ends)


# ---- log_likelihood / greedy_match ---------------------------------------------------------------


@pytest.mark.parametrize(
    "prompts, answers, error, message",
    [
        ("The capital of France is", " Paris", TypeError, "`prompts` is one string"),
        (["The capital of France is"], " Paris", TypeError, "`answers` is one string"),
        ([], [], ValueError, "are empty"),
        ([[5, 6]], [[7, 10_000]], ValueError, r"answers\[0\] holds the token id 10000, outside the model's vocab"),
        ([[-1, 6]], [[7]], ValueError, r"prompts\[0\] holds the token id -1"),
    ],
)
@pytest.mark.parametrize("score", [log_likelihood, greedy_match])
def test_likelihood_refuses_what_it_cannot_score(model, tokenizer, score, prompts, answers, error, message):
    with pytest.raises(error, match=message):
        score(model, prompts, answers, tokenizer=tokenizer)


# ---- from_pretrained ------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/no/such/llada", "./no-such-llada", "runs/no/such-llada"])
def test_from_pretrained_names_a_missing_folder(path):
    with pytest.raises(FileNotFoundError, match="No such folder"):
        LladaForMaskedDiffusion.from_pretrained(path)


# ---- training ------------------------------------------------------------------------------------


def sft_args(tmp_path) -> DiffusionSFTConfig:
    return DiffusionSFTConfig(output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=2,
                              report_to="none")


def test_trainer_refuses_a_tokenizer_without_eos(tmp_path):
    tokenizer = train_tokenizer(["2+2=4", "3+3=6"], vocab_size=270)
    config = LladaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         **model_token_ids(tokenizer))
    tokenizer.eos_token = None
    data = Dataset.from_dict({"prompt": ["2+2="], "completion": ["4"]})
    with pytest.raises(ValueError, match=r"no EOS token .*tokenizer.eos_token"):
        DiffusionSFTTrainer(model=LladaForMaskedDiffusion(config), args=sft_args(tmp_path), train_dataset=data,
                            processing_class=tokenizer)
    assert not (tmp_path / "out").exists()


def test_bf16_is_the_default_only_where_the_device_supports_it(tmp_path):
    assert sft_args(tmp_path).bf16 == bf16_supported(use_cpu=False)
    assert DiffusionSFTConfig(output_dir=str(tmp_path), use_cpu=True).bf16 is False
    assert DiffusionSFTConfig(output_dir=str(tmp_path), fp16=False, bf16=False).bf16 is False


def test_trainer_saves_a_tokenizer_that_names_its_mask(tmp_path, tokenizer):
    official = official_like_tokenizer(tokenizer)
    assert official.mask_token_id is None
    config = LladaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         **{**model_token_ids(tokenizer), "mask_token_id": tokenizer.mask_token_id})
    data = Dataset.from_dict({"prompt": ["the cat"] * 2, "completion": [" sat"] * 2})
    trainer = DiffusionSFTTrainer(model=LladaForMaskedDiffusion(config), args=sft_args(tmp_path), train_dataset=data,
                                  processing_class=official)
    trainer.save_model()
    assert AutoTokenizer.from_pretrained(tmp_path / "out").mask_token_id == tokenizer.mask_token_id


# ---- tokenizers and publishing --------------------------------------------------------------------


def test_the_readme_line_fixes_an_official_tokenizer(tokenizer, tmp_path):
    official = official_like_tokenizer(tokenizer)
    assert official.mask_token_id is None
    official.mask_token = "<|mdm_mask|>"  # the README's line
    assert official.mask_token_id == official.convert_tokens_to_ids(MASK) == tokenizer.mask_token_id
    official.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path).mask_token_id == tokenizer.mask_token_id


def test_publish_names_the_mask_token_and_refuses_a_model_without_one(model, tokenizer, tmp_path):
    official = official_like_tokenizer(tokenizer)
    publish(model, official, "alice/tiny-llada", dry_run=True, save_directory=tmp_path / "plan")
    assert AutoTokenizer.from_pretrained(tmp_path / "plan").mask_token_id == tokenizer.mask_token_id

    folder = tmp_path / "folder"
    model.save_pretrained(folder)
    official_like_tokenizer(tokenizer).save_pretrained(folder)
    publish_folder(folder, "alice/tiny-llada", dry_run=True)
    assert AutoTokenizer.from_pretrained(folder).mask_token_id == tokenizer.mask_token_id

    config = LladaConfig(**{**model.config.to_dict(), "mask_token_id": None})
    with pytest.raises(ValueError, match="could not generate"):
        publish(LladaForMaskedDiffusion(config), tokenizer, "alice/tiny-llada", dry_run=True)


def test_lm_eval_answers_end_at_eos_or_eot_like_the_cli(model, tokenizer):
    from llada_hf.evaluation.lm_eval_adapter import LladaEvalHarness

    lm = LladaEvalHarness(pretrained=model, tokenizer=tokenizer, device="cpu")
    cat, dog = tokenizer(" cat").input_ids, tokenizer(" dog").input_ids
    eot = tokenizer.convert_tokens_to_ids(EOT)
    assert lm._answer_text([*cat, eot, *dog, tokenizer.eos_token_id], until=[]) == " cat"
    assert lm._answer_text([*cat, tokenizer.eos_token_id, *dog], until=[]) == " cat"


@pytest.mark.parametrize(("config", "field", "value"), [
    ("DiffusionDPOConfig", "beta", float("nan")), ("DiffusionDPOConfig", "beta", 0.0),
    ("DiffusionDPOConfig", "beta", float("inf")), ("DiffusionGRPOConfig", "beta", float("nan")),
    ("DiffusionGRPOConfig", "epsilon", -0.2), ("DiffusionGRPOConfig", "temperature", 0.0),
])
def test_alignment_numbers_must_be_finite_and_in_range(tmp_path, config, field, value):
    import llada_hf.trainers as trainers

    with pytest.raises(ValueError, match=rf"`{field}` must be a finite number"):
        getattr(trainers, config)(output_dir=str(tmp_path), **{field: value})


def test_rows_and_images_that_cannot_train_are_named(tmp_path):
    from PIL import Image

    from llada_hf.processing_llada_v import official_image_processor
    from llada_hf.trainers.sft import check_dataset_format
    from llada_hf.trainers.vision import load_image

    data = Dataset.from_dict({"prompt": ["2+2=", "3+3="], "completion": ["4", None]})
    with pytest.raises(ValueError, match="Row 1 of the train dataset has no prompt or no completion"):
        check_dataset_format(data, "text", "train")
    with pytest.raises(ValueError, match=r"image is empty \(0 x 0 pixels\)"):
        load_image(Image.new("RGB", (0, 0)))
    with pytest.raises(ValueError, match="`pinpoints` must be a non-empty list"):
        official_image_processor(28, [])
    with pytest.raises(ValueError, match="`crop_size` must be a positive number"):
        official_image_processor(0)
