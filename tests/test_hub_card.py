"""Model cards and Hub publishing (issue 6).

- Dry runs: the exact files and card, for a model, a LoRA adapter and a merged adapter.
- A real upload: the `huggingface_hub` client, pointed by HF_ENDPOINT (set before it is imported, hence a
  subprocess) at a fake Hub on 127.0.0.1 (tests/fake_hub.py); the received files must be the saved folder,
  byte for byte. Then, in a subprocess where `llada_hf` cannot be imported, the usage snippet of each card
  runs against the received files and must produce the original model's tokens.
- Bad input: repo ids, missing tokenizer, a repo holding another model type, an upload failing midway.
"""

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from fake_hub import FakeHub
from helpers import tiny_model, write_official_checkpoint
from huggingface_hub import EvalResult, ModelCard
from peft import LoraConfig, get_peft_model

import transformers
from transformers import LlamaConfig, LlamaForCausalLM, TrainerState, TrainingArguments

from llada_hf import LladaForMaskedDiffusion
from llada_hf.hub_card import add_card_and_code, publish, publish_folder, render_model_card
from llada_hf.hub_card.card import LLADA_CITATION, LLADA_V_CITATION
from llada_hf.modeling_llada import BUNDLE_FILES
from llada_hf.tokenization import model_token_ids, train_tokenizer


TEXTS = ["the sea is wide and blue", "a short poem about the quiet sea", "hello world, hello sea"] * 10
GENERATION = {"max_new_tokens": 12, "steps": 6, "block_length": 4}  # the checkpoint's own settings
TOKEN = "hf_fake_token"
TOKENIZER_FILES = ["chat_template.jinja", "tokenizer.json", "tokenizer_config.json"]
MODEL_FILES = sorted(
    ["README.md", "config.json", "generation_config.json", "model.safetensors", *BUNDLE_FILES, *TOKENIZER_FILES]
)
ADAPTER_FILES = sorted(["README.md", "adapter_config.json", "adapter_model.safetensors", *TOKENIZER_FILES])
SUBPROCESS_TIMEOUT = 240


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS, vocab_size=300)


@pytest.fixture(scope="module")
def model(tokenizer):
    model = tiny_model(**model_token_ids(tokenizer))
    model.generation_config.update(**GENERATION)
    return model


@pytest.fixture(scope="module")
def base_folder(model, tokenizer, tmp_path_factory):
    """The model saved as a llada-hf checkpoint: the base of the adapters below."""
    folder = tmp_path_factory.mktemp("base")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def adapter(base_folder):
    """A LoRA adapter with non-zero weights on the base loaded from `base_folder` (PEFT records that path)."""
    base = LladaForMaskedDiffusion.from_pretrained(base_folder).eval()
    torch.manual_seed(1)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    return get_peft_model(base, lora).eval()


def chat_inputs(tokenizer):
    messages = [{"role": "user", "content": "Write a short poem about the sea."}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, return_tensors="pt")


def generate_like_the_snippet(model, tokenizer) -> list[list[int]]:
    """What the card's snippet computes, with the same prompt and the checkpoint's own settings."""
    inputs = chat_inputs(tokenizer)
    with torch.no_grad():
        output = model.generate(inputs["input_ids"], attention_mask=inputs["attention_mask"], **GENERATION)
    return output.tolist()


def snippet_of(card) -> str:
    (snippet,) = re.findall(r"```python\n(.*?)```", str(card), flags=re.DOTALL)
    return snippet


def read_folder(folder: Path) -> dict[str, bytes]:
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


def run_python(code: str, *args: str, env: dict[str, str]) -> str:
    """Run `code` in a fresh interpreter; return its last stdout line (the JSON the script prints)."""
    result = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True, text=True, env=env, timeout=SUBPROCESS_TIMEOUT,
        stdin=subprocess.DEVNULL,  # a trust_remote_code prompt fails at once instead of waiting for an answer
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout.strip().splitlines()[-1]


def subprocess_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("HF_")}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_DISABLE_TELEMETRY="1", TOKENIZERS_PARALLELISM="false")
    env.update(extra)
    return env


# --------------------------------------------------------------------------------------------------
# Dry runs: files and card
# --------------------------------------------------------------------------------------------------


def test_dry_run_plans_the_model_folder_and_renders_the_card(model, tokenizer, tmp_path):
    plan = publish(model, tokenizer, "alice/tiny-llada", dry_run=True, save_directory=tmp_path / "out")

    assert plan.files == MODEL_FILES
    assert sorted(read_folder(tmp_path / "out")) == MODEL_FILES
    assert plan.commit_url is None
    assert (tmp_path / "out" / "README.md").read_text() == str(plan.card)
    assert plan.card.data.to_dict() == {
        "library_name": "transformers",
        "license": "apache-2.0",
        "pipeline_tag": "text-generation",
        "tags": ["llada", "masked-diffusion", "custom_code"],
    }
    text = str(plan.card)
    assert re.findall(r"^## .*", text, flags=re.MULTILINE) == ["## Architecture", "## Usage", "## Citation"]
    assert text.startswith("---\n") and "\n# tiny-llada\n" in text
    assert f"| Mask token id | {tokenizer.mask_token_id} |" in text
    assert LLADA_CITATION in text and LLADA_V_CITATION not in text
    assert f"Needs `torch`, `transformers>={transformers.__version__}`; not `llada-hf`." in text
    assert snippet_of(plan.card) == textwrap.dedent('''\
        from transformers import AutoModel, AutoTokenizer

        model_id = "alice/tiny-llada"
        tokenizer = AutoTokenizer.from_pretrained(model_id, trust_remote_code=True)
        model = AutoModel.from_pretrained(model_id, trust_remote_code=True, dtype="auto").eval()

        messages = [{"role": "user", "content": "Write a short poem about the sea."}]
        inputs = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_dict=True, return_tensors="pt"
        )
        output = model.generate(
            inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            max_new_tokens=12,
            steps=6,
            block_length=4,
            remasking="low_confidence",
            temperature=0.0,
            cfg_scale=0.0,
        )
        answer = output[0, inputs["input_ids"].shape[1]:]  # generate returns prompt + answer
        print(tokenizer.decode(answer, skip_special_tokens=True))
        ''')


def test_dry_run_without_folder_leaves_nothing_behind(model, tokenizer):
    plan = publish(model, tokenizer, "alice/tiny-llada", dry_run=True)
    assert plan.files == MODEL_FILES and plan.folder is None


def test_publish_folder_of_an_adapter_needs_and_takes_its_base(adapter, tokenizer, tmp_path):
    adapter.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="Pass base_model='owner/name'"):
        publish_folder(tmp_path, "alice/tiny-lora", dry_run=True)
    plan = publish_folder(tmp_path, "alice/tiny-lora", base_model="alice/tiny-llada", dry_run=True)
    assert plan.files == ADAPTER_FILES
    assert (plan.card.data.base_model, plan.card.data.base_model_relation) == ("alice/tiny-llada", "adapter")
    assert "Architecture" not in str(plan.card)  # the base's config is not in an adapter folder


def test_adapter_publishes_as_adapter_pointing_at_its_base(adapter, tokenizer, tmp_path):
    plan = publish(
        adapter, tokenizer, "alice/tiny-lora", dry_run=True, base_model="alice/tiny-llada",
        save_directory=tmp_path / "out",
    )
    assert plan.files == ADAPTER_FILES
    assert (tmp_path / "out" / "README.md").read_text() == str(plan.card)  # replaces PEFT's template card
    assert plan.card.data.to_dict() == {
        "base_model": "alice/tiny-llada",
        "base_model_relation": "adapter",
        "library_name": "peft",
        "license": "apache-2.0",
        "pipeline_tag": "text-generation",
        "tags": ["llada", "masked-diffusion", "lora", "peft"],
    }
    text = str(plan.card)
    assert "A LoRA adapter (r=4, alpha=8, on `q_proj`, `v_proj`) for [alice/tiny-llada]" in text
    assert "Needs `torch`, `transformers>=" in text and "`peft`; not `llada-hf`." in text
    snippet = snippet_of(plan.card)
    assert 'model = AutoModel.from_pretrained("alice/tiny-llada", trust_remote_code=True, dtype="auto")' in snippet
    assert "model = PeftModel.from_pretrained(model, adapter_id).eval()" in snippet


def test_merged_adapter_is_a_full_finetune_and_leaves_the_adapter_untouched(adapter, tokenizer, tmp_path):
    weights_before = {key: value.clone() for key, value in adapter.state_dict().items()}
    plan = publish(
        adapter, tokenizer, "alice/tiny-merged", dry_run=True, merge_adapter=True, save_directory=tmp_path / "out"
    )
    assert plan.files == MODEL_FILES
    assert all(torch.equal(value, adapter.state_dict()[key]) for key, value in weights_before.items())
    merged = LladaForMaskedDiffusion.from_pretrained(tmp_path / "out").eval()
    ids = chat_inputs(tokenizer)["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapter(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    assert plan.card.data.base_model is None  # PEFT recorded a local path; nothing to point at
    card = render_model_card(adapter, repo_id="alice/tiny-merged", merge_adapter=True, base_model="alice/base")
    assert (card.data.base_model, card.data.base_model_relation, card.data.library_name) == (
        "alice/base", "finetune", "transformers"
    )


def test_training_section_and_eval_results(adapter, tokenizer, tmp_path):
    args = TrainingArguments(
        output_dir=str(tmp_path), learning_rate=2e-4, per_device_train_batch_size=4, gradient_accumulation_steps=2,
        num_train_epochs=3, report_to=[],
    )
    state = TrainerState(global_step=24, epoch=3.0, log_history=[
        {"loss": 3.1, "masked_accuracy": 0.2, "step": 10},
        {"loss": 2.5, "masked_accuracy": 0.4, "step": 20},
        {"eval_loss": 2.7, "eval_masked_accuracy": 0.35, "step": 24},
        {"train_loss": 2.9, "step": 24},
    ])
    trainer = SimpleNamespace(args=args, state=state, model=adapter, train_dataset=list(range(64)))
    result = EvalResult(
        task_type="text-generation", dataset_type="poems", dataset_name="Reversal poems", metric_type="accuracy",
        metric_value=0.5,
    )
    card = render_model_card(
        adapter, repo_id="alice/tiny-lora", tokenizer=tokenizer, trainer=trainer, base_model="alice/tiny-llada",
        datasets=["alice/poems"], eval_results=[result],
    )
    text = str(card)
    for row in [
        "| Datasets | [alice/poems](https://huggingface.co/datasets/alice/poems) |",
        "| Training examples | 64 |",
        "| Optimizer steps | 24 |",
        "| Epochs | 3.00 |",
        "| Learning rate | 0.0002 (linear schedule) |",
        "| Batch size (per device × accumulation × devices) | 4 × 2 × 1 = 8 |",
        "| LoRA | r=4, alpha=8, dropout=0.0, on `q_proj`, `v_proj` |",
        "| Final `loss` | 2.5 |",
        "| Final `masked_accuracy` | 0.4 |",
        "| Final `eval_loss` | 2.7 |",
        "| Final `eval_masked_accuracy` | 0.35 |",
        "| Reversal poems | accuracy | 0.5 |",
    ]:
        assert row in text
    assert "train_loss" not in text  # the average over training is not a final value
    assert card.data.datasets == ["alice/poems"]
    assert card.data.to_dict()["model-index"][0]["results"][0]["metrics"] == [{"type": "accuracy", "value": 0.5}]
    assert re.findall(r"^## .*", text, flags=re.MULTILINE) == [
        "## Architecture", "## Usage", "## Training", "## Evaluation", "## Citation"
    ]


def test_vision_models_cite_llada_v():
    model = tiny_model()
    model.config.vision_config = {"model_type": "siglip_vision_model"}  # how transformers VLM configs say it
    card = render_model_card(model, repo_id="alice/tiny-llada-v")
    assert card.data.pipeline_tag == "image-text-to-text"
    assert LLADA_CITATION in str(card) and LLADA_V_CITATION in str(card)


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("repo_id", ["tiny-llada", "alice/tiny/llada", "alice/tiny llada", "alice/", "alice/--x"])
def test_invalid_repo_ids_are_refused(model, tokenizer, repo_id):
    with pytest.raises(ValueError, match="Invalid Hub repo id"):
        publish(model, tokenizer, repo_id, dry_run=True)


def test_model_without_tokenizer_is_refused(model, tmp_path):
    with pytest.raises(ValueError, match="needs the model's tokenizer"):
        publish(model, None, "alice/tiny-llada", dry_run=True, save_directory=tmp_path / "out")
    assert not (tmp_path / "out").exists()
    model.save_pretrained(tmp_path / "no_tokenizer")
    with pytest.raises(ValueError, match="lacks tokenizer.json or tokenizer_config.json"):
        publish_folder(tmp_path / "no_tokenizer", "alice/tiny-llada", dry_run=True)


def test_other_architectures_and_folders_are_refused(tokenizer, tmp_path):
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2))
    with pytest.raises(TypeError, match="Expected a LLaDA model"):
        publish(llama, tokenizer, "alice/tiny-llama", dry_run=True)
    with pytest.raises(ValueError, match="neither a model"):
        publish_folder(tmp_path, "alice/empty", dry_run=True)


def test_non_empty_save_directory_is_refused(model, tokenizer, tmp_path):
    (tmp_path / "stale.bin").write_bytes(b"old")
    with pytest.raises(ValueError, match="is not empty"):
        publish(model, tokenizer, "alice/tiny-llada", dry_run=True, save_directory=tmp_path)
    assert [path.name for path in tmp_path.iterdir()] == ["stale.bin"]


def test_adapter_needs_a_hub_base_model(adapter, tokenizer):
    with pytest.raises(ValueError, match="Pass base_model='owner/name'"):
        publish(adapter, tokenizer, "alice/tiny-lora", dry_run=True)


def test_adapter_on_an_official_layout_base_needs_a_llada_hf_copy_of_it(tokenizer, tmp_path):
    write_official_checkpoint(tmp_path / "official")
    base = LladaForMaskedDiffusion.from_pretrained(tmp_path / "official")
    adapter = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"]))
    adapter.peft_config["default"].base_model_name_or_path = "GSAI-ML/LLaDA-8B-Instruct"  # as if from the Hub
    with pytest.raises(ValueError, match="official GSAI-ML checkpoint; its own remote code"):
        publish(adapter, tokenizer, "alice/tiny-lora", dry_run=True)
    plan = publish(adapter, tokenizer, "alice/tiny-lora", dry_run=True, base_model="alice/llada-8b-instruct-hf")
    assert plan.card.data.base_model == "alice/llada-8b-instruct-hf"


def test_merge_needs_an_adapter(model, tokenizer):
    with pytest.raises(ValueError, match="needs a PEFT model"):
        publish(model, tokenizer, "alice/tiny-llada", dry_run=True, merge_adapter=True)


# --------------------------------------------------------------------------------------------------
# A real upload to a fake Hub, then loading as a stranger
# --------------------------------------------------------------------------------------------------

UPLOAD_SCRIPT = """
import json, sys
from pathlib import Path
import torch
from transformers import AutoTokenizer
from llada_hf import LladaForMaskedDiffusion
from llada_hf.hub_card import publish, publish_folder

source, work, token = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
model = LladaForMaskedDiffusion.from_pretrained(source).eval()
tokenizer = AutoTokenizer.from_pretrained(source)
weights_before = {key: value.clone() for key, value in model.state_dict().items()}

def attempt(call):
    try:
        result = call()
    except Exception as error:
        return {"error": type(error).__name__, "message": str(error)}
    return {"files": result.files, "folder": str(result.folder), "commit_url": result.commit_url}

outcomes = {
    "model": attempt(lambda: publish(model, tokenizer, "alice/tiny-llada", private=True, token=token,
                                     save_directory=work / "model")),
    "other_type": attempt(lambda: publish(model, tokenizer, "bob/tiny-llama", token=token,
                                          save_directory=work / "other_type")),
    "broken": attempt(lambda: publish(model, tokenizer, "alice/broken", token=token, save_directory=work / "broken")),
    "folder": attempt(lambda: publish_folder(source, "carol/tiny-llada", revision="dev", token=token)),
}
outcomes["model_unchanged"] = all(torch.equal(value, model.state_dict()[key]) for key, value in weights_before.items())
print(json.dumps(outcomes))
"""


@pytest.fixture(scope="module")
def upload(model, tokenizer, tmp_path_factory):
    """Run UPLOAD_SCRIPT against a fake Hub; return the hub, the script's outcomes and its folders."""
    tmp = tmp_path_factory.mktemp("upload")
    source = tmp / "source"
    model.save_pretrained(source)
    tokenizer.save_pretrained(source)
    hub = FakeHub()
    hub.add_repo("bob/tiny-llama", {"config.json": json.dumps({"model_type": "llama"}).encode()})
    hub.failing_commits.add("alice/broken")
    endpoint = hub.start()
    try:
        env = subprocess_env(tmp, HF_ENDPOINT=endpoint, HF_HUB_OFFLINE="0", NO_PROXY="127.0.0.1,localhost")
        outcomes = json.loads(run_python(UPLOAD_SCRIPT, str(source), str(tmp), TOKEN, env=env))
    finally:
        hub.stop()
    return SimpleNamespace(hub=hub, outcomes=outcomes, tmp=tmp, source=source)


def test_upload_sends_the_saved_folder_in_one_commit(upload):
    outcome = upload.outcomes["model"]
    assert "error" not in outcome, outcome
    folder = upload.tmp / "model"
    repo = upload.hub.repos["alice/tiny-llada"]
    assert outcome["files"] == MODEL_FILES
    assert repo.branches["main"] == read_folder(folder)  # byte for byte
    assert repo.private
    assert repo.commits == [{"revision": "main", "summary": "Upload LLaDA model with llada-hf", "files": MODEL_FILES}]
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+/alice/tiny-llada/commit/[0-9a-f]{40}", outcome["commit_url"])
    assert {request["authorization"] for request in upload.hub.requests} == {f"Bearer {TOKEN}"}


def test_repo_holding_another_model_type_is_refused_before_writing(upload):
    outcome = upload.outcomes["other_type"]
    assert outcome["error"] == "ValueError" and "already holds a model of type 'llama'" in outcome["message"]
    assert not (upload.tmp / "other_type").exists()
    assert upload.hub.repos["bob/tiny-llama"].commits == []


def test_failed_upload_keeps_model_and_folder_and_says_where(upload):
    outcome = upload.outcomes["broken"]
    folder = upload.tmp / "broken"
    assert outcome["error"] == "PublishError"
    first_line = outcome["message"].splitlines()[0]  # all the CLI shows
    assert first_line.startswith("Uploading to alice/broken failed (Server error '500 Internal Server Error'")
    assert "Nothing was committed" in first_line and f"llada-hf publish {folder} alice/broken" in first_line
    assert sorted(read_folder(folder)) == MODEL_FILES
    assert upload.hub.repos["alice/broken"].branches["main"] == {}
    assert upload.outcomes["model_unchanged"]


def test_publish_folder_commits_to_a_new_branch(upload):
    outcome = upload.outcomes["folder"]
    assert "error" not in outcome, outcome
    repo = upload.hub.repos["carol/tiny-llada"]
    assert outcome["files"] == MODEL_FILES
    assert repo.branches["dev"] == read_folder(upload.source)
    assert repo.branches["main"] == {}
    assert "carol/tiny-llada" in (upload.source / "README.md").read_text()


STRANGER_SCRIPT = """
import contextlib, io, json, sys
sys.modules["llada_hf"] = None  # as on a machine where llada-hf is not installed

results = {}
for name, job in json.loads(sys.argv[1]).items():
    snippet = job["snippet"]
    for repo_id, path in job["paths"].items():
        snippet = snippet.replace(f'"{repo_id}"', repr(path))
    namespace, printed = {}, io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(snippet, namespace)
    results[name] = {"printed": printed.getvalue(), "tokens": namespace["output"].tolist()}
print(json.dumps(results))
"""


def test_a_stranger_runs_the_card_snippets_and_gets_the_original_tokens(
    upload, model, tokenizer, adapter, base_folder, tmp_path
):
    received = tmp_path / "received"
    for name, content in upload.hub.repos["alice/tiny-llada"].branches["main"].items():
        (received / name).parent.mkdir(parents=True, exist_ok=True)
        (received / name).write_bytes(content)
    adapter_plan = publish(
        adapter, tokenizer, "alice/tiny-lora", dry_run=True, base_model="alice/tiny-llada",
        save_directory=tmp_path / "adapter",
    )
    jobs = {
        "model": {
            "snippet": snippet_of(ModelCard.load(received / "README.md")),
            "paths": {"alice/tiny-llada": str(received)},
        },
        "adapter": {
            "snippet": snippet_of(adapter_plan.card),
            "paths": {"alice/tiny-llada": str(base_folder), "alice/tiny-lora": str(tmp_path / "adapter")},
        },
    }
    env = subprocess_env(tmp_path, HF_HUB_OFFLINE="1")
    results = json.loads(run_python(STRANGER_SCRIPT, json.dumps(jobs), env=env))

    prompt_length = chat_inputs(tokenizer)["input_ids"].shape[1]
    for name, original in (("model", model), ("adapter", adapter)):
        tokens = generate_like_the_snippet(original, tokenizer)
        assert results[name]["tokens"] == tokens, name
        answer = tokenizer.decode(tokens[0][prompt_length:], skip_special_tokens=True)
        assert results[name]["printed"] == answer + "\n", name
    assert results["model"]["tokens"] != results["adapter"]["tokens"]  # the adapter does change the model



def test_add_card_and_code_completes_a_trainer_output_dir(model, adapter, tokenizer, tmp_path):
    state = TrainerState(global_step=3, epoch=1.0, log_history=[{"loss": 1.5, "step": 3}])
    trainer = SimpleNamespace(args=TrainingArguments(output_dir=str(tmp_path), report_to=[]), state=state, model=model)
    card = add_card_and_code(tmp_path / "full", model, repo_id="alice/tiny-sft", tokenizer=tokenizer, trainer=trainer)
    assert sorted(read_folder(tmp_path / "full")) == sorted(["README.md", *BUNDLE_FILES])
    assert (tmp_path / "full" / "README.md").read_text() == str(card) and "| Final `loss` | 1.5 |" in str(card)

    add_card_and_code(tmp_path / "lora", adapter, repo_id="alice/tiny-lora", base_model="alice/tiny-llada")
    assert sorted(read_folder(tmp_path / "lora")) == ["README.md"]  # an adapter repo carries no code
    with pytest.raises(ValueError, match="merge_adapter=True"):
        add_card_and_code(tmp_path / "merged", adapter, repo_id="alice/x", base_model="alice/y", merge_adapter=True)
