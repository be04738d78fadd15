"""The model: official-checkpoint parity, Auto classes, save/load, remote code, config and input checks."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import (
    EMBEDDING_ROWS,
    MASK_ID,
    assert_close_across_kernels,
    forward_terms,
    official_config,
    tiny_config,
    tiny_model,
    write_official_checkpoint,
)
from llada_reference import reference_logits
from safetensors import safe_open

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM

import llada_hf
from llada_hf import LladaConfig, LladaForMaskedDiffusion
from llada_hf.modeling_llada import BUNDLE_FILES


pytestmark = pytest.mark.numerics  # rerun under other CPU kernels by the test command (pyproject.toml)


def _batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 95, (3, 11), generator=g)
    ids[:, -4:] = MASK_ID
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding of different lengths
    mask[2, :6] = 0
    ids[mask == 0] = 1
    return ids, mask


@pytest.mark.parametrize("kind", ["llada", "illada"])
@pytest.mark.parametrize("sharded", [False, True])
def test_official_checkpoint_loads_unchanged_and_matches_reference(tmp_path, kind, sharded):
    cfg, state = write_official_checkpoint(tmp_path, kind=kind, sharded=sharded)
    model = AutoModel.from_pretrained(tmp_path).eval()
    assert type(model) is LladaForMaskedDiffusion
    assert model.config.vocab_size == EMBEDDING_ROWS  # embedding_size > vocab_size: the padded rows
    assert model.config.tie_word_embeddings == (kind == "illada")
    ids, mask = _batch()
    with torch.no_grad():
        for attention_mask in (None, mask):
            ours = model(ids, attention_mask=attention_mask).logits
            ref = reference_logits(state, cfg, ids, attention_mask)
            assert ours.shape == (3, 11, EMBEDDING_ROWS)
            assert_close_across_kernels(ours, ref, forward_terms(model.config, ids.shape[1]))


def test_every_auto_class_gives_the_diffusion_model(tmp_path):
    write_official_checkpoint(tmp_path)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), LladaConfig)
    for auto in (AutoModel, AutoModelForMaskedLM, AutoModelForCausalLM):
        assert type(auto.from_pretrained(tmp_path)) is LladaForMaskedDiffusion


def test_tied_head_shares_the_embedding(tmp_path):
    write_official_checkpoint(tmp_path, kind="illada")
    model = AutoModel.from_pretrained(tmp_path)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert model.config.num_key_value_heads == 2


@pytest.mark.parametrize("kind", ["llada", "illada"])
def test_eager_and_sdpa_agree(tmp_path, kind):
    write_official_checkpoint(tmp_path, kind=kind)
    ids, mask = _batch()
    logits = {}
    for impl in ("eager", "sdpa"):
        model = AutoModel.from_pretrained(tmp_path, attn_implementation=impl).eval()
        assert model.config._attn_implementation == impl
        with torch.no_grad():
            logits[impl] = model(ids, attention_mask=mask).logits
    assert_close_across_kernels(logits["eager"], logits["sdpa"], forward_terms(model.config, ids.shape[1]))


def test_save_writes_our_names_auto_map_and_bundle_and_round_trips_bitwise(tmp_path):
    write_official_checkpoint(tmp_path / "official")
    model = AutoModel.from_pretrained(tmp_path / "official")
    out = tmp_path / "saved"
    model.save_pretrained(out)
    names = set()
    with safe_open(out / "model.safetensors", "pt") as f:
        names = set(f.keys())
    assert "model.layers.0.self_attn.q_proj.weight" in names and "lm_head.weight" in names
    assert not any("transformer" in n for n in names)
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_llada.LladaConfig",
        "AutoModel": "modeling_llada.LladaForMaskedDiffusion",
        "AutoModelForMaskedLM": "modeling_llada.LladaForMaskedDiffusion",
        "AutoModelForCausalLM": "modeling_llada.LladaForMaskedDiffusion",
    }
    assert "d_model" not in config and config["hidden_size"] == 64
    for name in BUNDLE_FILES:
        assert (out / name).is_file()
    reloaded = AutoModel.from_pretrained(out)
    before, after = model.state_dict(), reloaded.state_dict()
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key


def test_saved_checkpoint_runs_as_remote_code_without_llada_hf(tmp_path):
    model = tiny_model(num_key_value_heads=2, tie_word_embeddings=True)
    model.save_pretrained(tmp_path / "ckpt")
    ids, mask = _batch()
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits
    expected_tokens = model.generate(ids, attention_mask=mask, max_new_tokens=8, steps=8, block_length=4)
    torch.save({"ids": ids, "mask": mask}, tmp_path / "inputs.pt")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["llada_hf"] = None  # any `import llada_hf` now fails
        sys.path = [p for p in sys.path if not p.rstrip("/").endswith("src")]
        import torch
        from transformers import AutoModel
        model = AutoModel.from_pretrained({str(tmp_path / "ckpt")!r}, trust_remote_code=True).eval()
        assert "llada_hf" not in type(model).__module__, type(model).__module__
        inputs = torch.load({str(tmp_path / "inputs.pt")!r})
        with torch.no_grad():
            logits = model(inputs["ids"], attention_mask=inputs["mask"]).logits
        torch.save(logits, {str(tmp_path / "logits.pt")!r})
        tokens = model.generate(
            inputs["ids"], attention_mask=inputs["mask"], max_new_tokens=8, steps=8, block_length=4
        )
        torch.save(tokens, {str(tmp_path / "tokens.pt")!r})
        print(type(model).__module__)
        """
    )
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "transformers_modules" in result.stdout
    assert torch.equal(torch.load(tmp_path / "logits.pt"), expected)
    assert torch.equal(torch.load(tmp_path / "tokens.pt"), expected_tokens)


def test_a_saved_tokenizer_loads_without_llada_hf_and_without_the_remote_code_question(tmp_path):
    """transformers 5's AutoTokenizer reads config.json first; with its auto_map and no llada_hf it would ask whether
    to run custom code. `trust_remote_code=False` loads the tokenizer from its own files (docs/generation.md)."""
    from llada_hf.tokenization import model_token_ids, train_tokenizer

    tokenizer = train_tokenizer(["a saved folder needs no code for its tokenizer"], vocab_size=300)
    LladaForMaskedDiffusion(LladaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, **model_token_ids(tokenizer))).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["llada_hf"] = None  # any `import llada_hf` now fails
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained({str(tmp_path)!r}, trust_remote_code=False)
        print(tokenizer("a saved folder").input_ids)
        """
    )
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(tokenizer("a saved folder").input_ids)
    assert "custom code" not in result.stdout + result.stderr


@pytest.mark.parametrize(
    "key,value",
    [
        ("alibi", True), ("rope", False), ("block_type", "sequential"), ("layer_norm_type", "default"),
        ("activation_type", "gelu"), ("include_bias", True), ("include_qkv_bias", True),
        ("attention_layer_norm", True), ("scale_logits", True), ("input_emb_norm", True), ("clip_qkv", 8.0),
        ("residual_dropout", 0.1), ("bias_for_layer_norm", True), ("layer_norm_with_affine", False),
    ],
)
def test_unsupported_official_variants_are_refused_by_name(key, value):
    cfg = official_config()
    cfg[key] = value
    with pytest.raises(ValueError, match=key):
        LladaConfig(**cfg)


def test_unsupported_standard_variants_are_refused():
    with pytest.raises(ValueError, match="hidden_act"):
        tiny_config(hidden_act="gelu")
    with pytest.raises(ValueError, match="rope_type"):
        tiny_config(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4})
    with pytest.raises(ValueError, match="pad_token_id"):
        tiny_config(pad_token_id=MASK_ID)
    with pytest.raises(ValueError, match="num_key_value_heads"):
        tiny_config(num_key_value_heads=3)


@pytest.mark.parametrize(("overrides", "message"), [
    (dict(num_hidden_layers=-1), r"`num_hidden_layers` must be a positive integer, got -1"),
    (dict(num_hidden_layers=True), r"`num_hidden_layers` must be a positive integer"),
    (dict(num_attention_heads=0), r"`num_attention_heads` must be a positive integer"),
    (dict(hidden_size=65), r"`hidden_size` \(65\) is not a multiple of `num_attention_heads` \(4\)"),
    (dict(mask_token_id=EMBEDDING_ROWS), r"`mask_token_id` \(104\) must be a token id in \[0, vocab_size=104\)"),
])
def test_impossible_sizes_are_refused_by_the_config(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)
    assert tiny_config(hidden_size=66, head_dim=16).head_dim == 16  # an explicit head size is the user's choice


def test_official_config_maps_to_standard_names():
    config = LladaConfig(**official_config("illada"))
    assert (config.hidden_size, config.num_attention_heads, config.num_key_value_heads) == (64, 4, 2)
    assert (config.num_hidden_layers, config.intermediate_size, config.max_position_embeddings) == (2, 112, 256)
    assert config.tie_word_embeddings and config.rope_parameters["rope_theta"] == 500000.0
    assert config.mask_token_id == MASK_ID and config.vocab_size == EMBEDDING_ROWS
    cfg = official_config()
    cfg["mlp_hidden_size"] = None
    assert LladaConfig(**cfg).intermediate_size == 4 * 64  # mlp_ratio * d_model
    saved = LladaConfig(**official_config()).to_dict()
    assert "d_model" not in saved and "block_type" not in saved


def test_llada_v_llama_style_config():
    llava_style = dict(
        model_type="llada", hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=4,
        num_hidden_layers=2, rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False,
        max_position_embeddings=512, vocab_size=EMBEDDING_ROWS, hidden_act="silu", mask_token_id=MASK_ID,
    )
    config = LladaConfig(**llava_style)
    model = LladaForMaskedDiffusion(config)
    assert model(torch.tensor([[5, 6, MASK_ID]])).logits.shape == (1, 3, EMBEDDING_ROWS)


def test_missing_or_unexpected_weights_are_errors(tmp_path):
    from safetensors.torch import load_file, save_file

    write_official_checkpoint(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    dropped = dict(state)
    del dropped["model.transformer.blocks.1.up_proj.weight"]
    save_file(dropped, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing_keys"):
        AutoModel.from_pretrained(tmp_path)
    extra = dict(state, **{"model.transformer.blocks.0.extra.weight": torch.zeros(2)})
    save_file(extra, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="unexpected_keys"):
        AutoModel.from_pretrained(tmp_path)


def test_bad_inputs_get_clear_errors(tiny_llada):
    with pytest.raises(ValueError, match=r"\[0, 104\)"):
        tiny_llada(torch.tensor([[5, 104]]))
    with pytest.raises(ValueError, match=r"\[0, 104\)"):
        tiny_llada(torch.tensor([[-1, 5]]))
    with pytest.raises(ValueError, match="attention_mask"):
        tiny_llada(torch.tensor([[5, 6, 7]]), attention_mask=torch.ones(1, 4))
    with pytest.raises(ValueError, match="attention_mask"):
        tiny_llada(torch.tensor([[5, 6, 7]]), attention_mask=torch.ones(3))
    with pytest.raises(ValueError, match="empty"):
        tiny_llada(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="2-D"):
        tiny_llada(torch.tensor([5, 6, 7]))
    with pytest.raises(TypeError, match="integer"):
        tiny_llada(torch.tensor([[5.0, 6.0]]))
    with pytest.raises(ValueError, match="exactly one"):
        tiny_llada(torch.tensor([[5]]), inputs_embeds=torch.zeros(1, 1, 64))
    with pytest.raises(ValueError, match="labels"):
        tiny_llada(torch.tensor([[5, 6]]), labels=torch.tensor([[5]]))


def test_inputs_embeds_position_ids_hidden_states_and_logits_to_keep(tiny_llada):
    ids, mask = _batch()
    with torch.no_grad():
        base = tiny_llada(ids, attention_mask=mask, output_hidden_states=True)
        embeds = tiny_llada(inputs_embeds=tiny_llada.get_input_embeddings()(ids), attention_mask=mask).logits
        positions = tiny_llada(ids, attention_mask=mask, position_ids=torch.arange(11)[None].expand(3, -1)).logits
        kept = tiny_llada(ids, attention_mask=mask, logits_to_keep=torch.tensor([7, 8, 9, 10])).logits
    assert len(base.hidden_states) == tiny_llada.config.num_hidden_layers + 1
    torch.testing.assert_close(embeds, base.logits)
    torch.testing.assert_close(positions, base.logits)
    # the same products on fewer rows: only the head's kernel may block them differently
    assert_close_across_kernels(kept, base.logits[:, 7:], tiny_llada.config.hidden_size)


def test_labels_give_the_plain_masked_token_cross_entropy(tiny_llada):
    ids, _ = _batch()
    labels = torch.full_like(ids, -100)
    labels[:, -4:] = torch.randint(4, 90, (3, 4))
    out = tiny_llada(ids, labels=labels)
    logits = out.logits[:, -4:].reshape(-1, out.logits.shape[-1])
    expected = torch.nn.functional.cross_entropy(logits, labels[:, -4:].reshape(-1))
    torch.testing.assert_close(out.loss, expected)


def test_gradient_checkpointing_gives_the_same_gradients():
    ids, _ = _batch()
    labels = torch.where(ids == MASK_ID, torch.full_like(ids, 7), torch.full_like(ids, -100))
    grads = []
    for checkpointing in (False, True):
        model = tiny_model().train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        model(ids, labels=labels).loss.backward()
        grads.append(model.model.layers[0].self_attn.q_proj.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_bf16_on_cpu_and_dtype_auto_respects_the_checkpoint(tmp_path, tiny_llada):
    model = tiny_llada.to(torch.bfloat16)
    ids, mask = _batch()
    with torch.no_grad():
        bf16 = model(ids, attention_mask=mask).logits
        fp32 = model.float()(ids, attention_mask=mask).logits
    assert bf16.dtype == torch.bfloat16
    assert (bf16.float() - fp32).abs().max() < 0.1 * fp32.abs().max()
    model.to(torch.bfloat16).save_pretrained(tmp_path)
    assert AutoModel.from_pretrained(tmp_path, dtype="auto").dtype == torch.bfloat16
    assert AutoModel.from_pretrained(tmp_path, dtype=torch.float32).dtype == torch.float32


def test_import_registers_the_auto_classes():
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    assert CONFIG_MAPPING["llada"] is LladaConfig
    for auto in (AutoModel, AutoModelForMaskedLM, AutoModelForCausalLM):
        assert auto._model_mapping[LladaConfig] is LladaForMaskedDiffusion
    assert llada_hf.__version__


def test_use_cache_returns_a_filled_diffusion_cache():
    from llada_hf.cache_llada import DiffusionCache

    model = tiny_model()
    ids = torch.tensor([[5, 6, 7, MASK_ID]])
    out = model(ids, use_cache=True)
    assert isinstance(out.cache, DiffusionCache)
    assert out.cache.layers[0].keys.shape[-2] == 4 and len(out.cache.layers) == model.config.num_hidden_layers
    assert model(ids).cache is None  # off by default (config.use_cache = False)


def test_forward_compiles_without_graph_breaks():
    model = tiny_model()
    ids = torch.tensor([[5, 6, 7, MASK_ID]])
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(ids).logits, model(ids).logits)
