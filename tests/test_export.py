"""Export to the official GSAI-ML layout: names, shapes and config keys of an official checkpoint, identical logits
through our loader and through the official architecture, the shipped bundle, LoRA, bad input, the CLI."""

import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import (
    assert_close_across_kernels,
    forward_terms,
    official_config,
    official_state_dict,
    tiny_model,
    write_official_checkpoint,
)
from llada_reference import reference_logits
from safetensors.torch import load_file

from llada_hf import LladaForMaskedDiffusion
from llada_hf.cli import main
from llada_hf.configuration_llada import BUNDLE_AUTO_MAP
from llada_hf.export import export_official
from llada_hf.export import official as official_module
from llada_hf.modeling_llada import BUNDLE_FILES


pytestmark = pytest.mark.numerics  # rerun under other CPU kernels by the test command (pyproject.toml)


IDS = torch.tensor([[5, 17, 95, 95, 40, 95], [2, 8, 95, 33, 95, 95]])


def exported_files(folder):
    return json.loads((folder / "config.json").read_text()), load_file(folder / "model.safetensors")


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


# ---- the layout ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llada", "illada"])
def test_export_equals_an_official_checkpoint_in_names_shapes_values_and_config(tmp_path, kind):
    write_official_checkpoint(tmp_path / "official", kind=kind)
    model = LladaForMaskedDiffusion.from_pretrained(tmp_path / "official")
    config, state = exported_files(export_official(model, tmp_path / "exported"))

    official = official_state_dict(official_config(kind))
    assert {name: tuple(t.shape) for name, t in state.items()} == {n: tuple(t.shape) for n, t in official.items()}
    for name, tensor in official.items():
        assert torch.equal(state[name], tensor), name
    expected = official_config(kind)
    assert config.keys() == expected.keys()
    # vocab_size is the embedding rows (llama.cpp's converter sizes its vocabulary by it); auto_map names Hub code
    different = {key for key in expected if config[key] != expected[key]}
    assert different == {"vocab_size", "auto_map"}
    assert config["vocab_size"] == config["embedding_size"] == expected["embedding_size"]
    assert config["architectures"] == ["LLaDAModelLM"]
    assert config["auto_map"] == {
        "AutoConfig": "GSAI-ML/LLaDA-8B-Instruct--configuration_llada.LLaDAConfig",
        "AutoModel": "GSAI-ML/LLaDA-8B-Instruct--modeling_llada.LLaDAModelLM",
        "AutoModelForCausalLM": "GSAI-ML/LLaDA-8B-Instruct--modeling_llada.LLaDAModelLM",
    }


@pytest.mark.parametrize("overrides", [{}, {"num_key_value_heads": 2, "tie_word_embeddings": True}],
                         ids=["untied-mha", "tied-gqa"])
def test_export_gives_identical_logits_through_our_loader_and_the_official_architecture(tmp_path, overrides):
    model = tiny_model(**overrides)
    folder = export_official(model, tmp_path / "exported")
    expected = logits(model)
    assert torch.equal(logits(LladaForMaskedDiffusion.from_pretrained(folder).eval()), expected)
    config, state = exported_files(folder)
    assert ("model.transformer.ff_out.weight" in state) != bool(overrides)  # the head is absent when tied
    terms = forward_terms(model.config, IDS.shape[1])
    assert_close_across_kernels(reference_logits(state, config, IDS), expected, terms)


def _model_from(source: str, tmp_path):
    """The model a user exports: fresh, reloaded from a `save_pretrained` folder, loaded from an official
    checkpoint, LoRA-merged, or with a tied head (reloaded from its folder)."""
    if source == "official":
        write_official_checkpoint(tmp_path / "official")
        return LladaForMaskedDiffusion.from_pretrained(tmp_path / "official").eval()
    if source == "lora-merged":
        from peft import LoraConfig, get_peft_model

        peft_model = get_peft_model(tiny_model(), LoraConfig(r=4, target_modules=["q_proj", "down_proj"]))
        return peft_model.merge_and_unload().eval()
    model = tiny_model(tie_word_embeddings=source == "tied-saved")
    if source == "fresh":
        return model
    model.save_pretrained(tmp_path / "saved")  # the everyday path: fine-tune, save, export the folder
    return LladaForMaskedDiffusion.from_pretrained(tmp_path / "saved").eval()


@pytest.mark.parametrize("source", ["fresh", "saved", "official", "lora-merged", "tied-saved"])
def test_export_writes_official_names_from_every_source(tmp_path, source):
    model = _model_from(source, tmp_path)
    config, state = exported_files(export_official(model, tmp_path / "exported"))
    official_names = set(official_state_dict(official_config("illada" if source == "tied-saved" else "llada")))
    assert set(state) == official_names  # what the official `LLaDAModelLM` loads, nothing else
    expected = logits(model)
    assert_close_across_kernels(reference_logits(state, config, IDS), expected,
                                forward_terms(model.config, IDS.shape[1]))


def test_bf16_model_keeps_its_dtype(tmp_path):
    model = tiny_model().to(torch.bfloat16)
    config, state = exported_files(export_official(model, tmp_path / "exported"))
    assert config["torch_dtype"] == "bfloat16"
    assert {t.dtype for t in state.values()} == {torch.bfloat16}


def test_tokenizer_is_saved_with_its_mask_token(tmp_path, text_tokenizer, text_model):
    tokenizer = copy.deepcopy(text_tokenizer)
    tokenizer.mask_token = None  # as an official LLaDA tokenizer
    folder = export_official(text_model, tmp_path / "exported", tokenizer)
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(folder)
    assert saved.mask_token == "<|mdm_mask|>" and saved.mask_token_id == text_model.config.mask_token_id
    assert tokenizer.mask_token is None  # the caller's tokenizer is left alone


def test_lora_merged_model_exports(tmp_path):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(tiny_model(), LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    with pytest.raises(TypeError, match="merge_and_unload"):
        export_official(peft_model, tmp_path / "unmerged")
    assert not (tmp_path / "unmerged").exists()
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:  # LoRA starts as the identity; make it change the model
                parameter.normal_(0, 0.2)
    merged = peft_model.merge_and_unload().eval()
    folder = export_official(merged, tmp_path / "merged")
    config, state = exported_files(folder)
    assert not any("lora" in name for name in state)
    assert torch.equal(logits(LladaForMaskedDiffusion.from_pretrained(folder).eval()), logits(merged))


def test_ship_bundle_runs_as_remote_code_without_llada_hf(tmp_path):
    model = tiny_model(num_key_value_heads=2)
    folder = export_official(model, tmp_path / "exported", ship_bundle=True)
    config, _ = exported_files(folder)
    assert config["auto_map"] == BUNDLE_AUTO_MAP and config["architectures"] == ["LLaDAModelLM"]
    assert all((folder / name).is_file() for name in BUNDLE_FILES)
    torch.save(IDS, tmp_path / "ids.pt")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["llada_hf"] = None  # any `import llada_hf` now fails
        sys.path = [p for p in sys.path if not p.rstrip("/").endswith("src")]
        import torch
        from transformers import AutoModel
        model = AutoModel.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        with torch.no_grad():
            torch.save(model(torch.load({str(tmp_path / "ids.pt")!r})).logits, {str(tmp_path / "logits.pt")!r})
        """
    )
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert torch.equal(torch.load(tmp_path / "logits.pt"), logits(model))


# ---- bad input -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides,named",
    [({"head_dim": 32}, "head_dim"), ({"mask_token_id": None}, "mask_token_id")],
)
def test_configs_without_an_official_equivalent_are_refused_by_name(tmp_path, overrides, named):
    model = tiny_model(**overrides)
    with pytest.raises(ValueError, match=named):
        export_official(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_only_the_text_model_is_exported(tmp_path):
    with pytest.raises(TypeError, match="LladaForMaskedDiffusion"):
        export_official(torch.nn.Linear(2, 2), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_existing_output_is_refused_unless_overwrite(tmp_path, tiny_llada):
    out = tmp_path / "out"
    out.mkdir()
    export_official(tiny_llada, out)  # an empty folder is fine
    with pytest.raises(FileExistsError, match="--overwrite"):
        export_official(tiny_llada, out)
    (out / "stale.txt").write_text("from an earlier export")
    export_official(tiny_llada, out, overwrite=True)
    assert not (out / "stale.txt").exists()  # replaced, not merged into
    (tmp_path / "file").write_text("")
    with pytest.raises(FileExistsError, match="is a file"):
        export_official(tiny_llada, tmp_path / "file", overwrite=True)


def test_a_failed_export_leaves_no_partial_folder_and_keeps_the_old_one(tmp_path, tiny_llada, text_tokenizer,
                                                                         monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(official_module, "save_tokenizer_with_mask", fail)  # after the weights are written
    with pytest.raises(RuntimeError, match="disk full"):
        export_official(tiny_llada, tmp_path / "new", text_tokenizer)
    assert os.listdir(tmp_path) == []
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.json").write_text("{}")
    with pytest.raises(RuntimeError, match="disk full"):
        export_official(tiny_llada, old, text_tokenizer, overwrite=True)
    assert os.listdir(tmp_path) == ["old"] and os.listdir(old) == ["config.json"]


# ---- the command line ----------------------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path, text_tokenizer, text_model):
    text_model.save_pretrained(tmp_path / "model")
    text_tokenizer.save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def test_cli_exports_the_official_layout(saved, tmp_path, text_model, capsys):
    out = tmp_path / "official"
    assert main(["export", str(saved), str(out), "--format", "official"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    ids = IDS % 200  # inside the trained tokenizer's vocabulary
    assert torch.equal(logits(LladaForMaskedDiffusion.from_pretrained(out).eval(), ids), logits(text_model, ids))
    assert (out / "tokenizer.json").is_file()
    assert main(["export", str(saved), str(out), "--format", "official"]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert main(["export", str(saved), str(tmp_path / "x"), "--format", "official", "--dtype", "q8_0"]) == 1
    assert "--dtype does not apply to --format official" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "missing"), str(tmp_path / "y"), "--format", "official"]) == 1
    assert "No such folder" in capsys.readouterr().err


def test_cli_merges_a_lora_adapter_folder(saved, tmp_path, text_model):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(copy.deepcopy(text_model), LoraConfig(r=4, target_modules=["q_proj", "up_proj"]))
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.2)
    peft_model.save_pretrained(tmp_path / "adapter")
    config_path = tmp_path / "adapter" / "adapter_config.json"
    adapter_config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**adapter_config, "base_model_name_or_path": str(saved)}))
    out = tmp_path / "official"
    assert main(["export", str(tmp_path / "adapter"), str(out), "--format", "official"]) == 0
    ids = IDS % 200
    expected = logits(peft_model.merge_and_unload().eval(), ids)
    assert torch.equal(logits(LladaForMaskedDiffusion.from_pretrained(out).eval(), ids), expected)
    assert (out / "tokenizer.json").is_file()  # the base model's tokenizer


def test_export_has_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    assert all(flag in help_text for flag in ("--format", "--dtype", "--overwrite", "--ship-bundle"))
