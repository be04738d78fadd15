"""GGUF export: the file reads back with `gguf`'s reader, carries what llama.cpp's LLaDA converter writes (the fixture
below, taken from llama.cpp's source), dequantises to the model's weights, and refuses bad input."""

import copy
import json
import os

import gguf
import pytest
import torch
from helpers import tokenizer_model

from llada_hf.cli import main
from llada_hf.export import export_gguf
from llada_hf.export.gguf import interleave_rotary_halves
from llada_hf.modeling_llada import apply_rotary_pos_emb


pytestmark = pytest.mark.numerics  # rerun under other CPU kernels by the test command (pyproject.toml)


# What llama.cpp (ggml-org/llama.cpp) expects of a LLaDA GGUF, from its source:
# - the architecture string and tensor list: gguf-py's constants, MODEL_ARCH.LLADA ("llada");
# - the tensor shapes, in ggml's order (fastest-varying dimension first): src/models/llada.cpp, load_arch_tensors
#   (`output` is optional there: without it the loader reuses token_embd);
# - the metadata keys: the converter's LLaDAModel (set_gguf_parameters, set_vocab: add_bos_token) and the
#   TextModel base it extends (set_gguf_parameters, _set_vocab_gpt2 with gguf.SpecialVocab), plus general.* from
#   its metadata and quantisation steps; llama-diffusion-cli reads diffusion.shift_logits and the mask token id.
LLAMA_CPP_LLADA = {
    "architecture": "llada",
    "tensors": {
        "token_embd.weight": ("n_embd", "n_vocab"),
        "output_norm.weight": ("n_embd",),
        "output.weight": ("n_embd", "n_vocab"),
        "blk.{i}.attn_norm.weight": ("n_embd",),
        "blk.{i}.attn_q.weight": ("n_embd", "n_embd_head_k * n_head"),
        "blk.{i}.attn_k.weight": ("n_embd", "n_embd_k_gqa"),
        "blk.{i}.attn_v.weight": ("n_embd", "n_embd_v_gqa"),
        "blk.{i}.attn_output.weight": ("n_embd_head_k * n_head", "n_embd"),
        "blk.{i}.ffn_norm.weight": ("n_embd",),
        "blk.{i}.ffn_gate.weight": ("n_embd", "n_ff"),
        "blk.{i}.ffn_down.weight": ("n_ff", "n_embd"),
        "blk.{i}.ffn_up.weight": ("n_embd", "n_ff"),
    },
    "metadata": [
        "general.architecture", "general.type", "general.name", "general.file_type", "general.quantization_version",
        "llada.block_count", "llada.context_length", "llada.embedding_length", "llada.feed_forward_length",
        "llada.attention.head_count", "llada.attention.head_count_kv", "llada.rope.freq_base",
        "llada.attention.layer_norm_rms_epsilon", "llada.vocab_size", "llada.rope.dimension_count",
        "llada.attention.causal", "diffusion.shift_logits",
        "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
        "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.padding_token_id", "tokenizer.ggml.mask_token_id", "tokenizer.ggml.add_bos_token",
        "tokenizer.chat_template",
    ],
}

VARIANTS = {"untied-mha": {}, "tied-gqa": {"num_key_value_heads": 2, "tie_word_embeddings": True}}


def llama_cpp_sizes(config) -> dict:
    """llama.cpp's names for the hyperparameters the fixture's shapes use."""
    n_embd_head, n_head_kv = config.head_dim, config.num_key_value_heads
    return {"n_embd": config.hidden_size, "n_vocab": config.vocab_size, "n_ff": config.intermediate_size,
            "n_embd_head_k * n_head": n_embd_head * config.num_attention_heads,
            "n_embd_k_gqa": n_embd_head * n_head_kv, "n_embd_v_gqa": n_embd_head * n_head_kv}


def expected_tensors(config) -> dict[str, tuple[int, ...]]:
    sizes = llama_cpp_sizes(config)
    expected = {}
    for name, shape in LLAMA_CPP_LLADA["tensors"].items():
        for i in range(config.num_hidden_layers) if "{i}" in name else [None]:
            expected[name.format(i=i)] = tuple(sizes[dim] for dim in shape)
    if config.tie_word_embeddings:
        del expected["output.weight"]
    return expected


def read(path) -> tuple[dict, dict]:
    reader = gguf.GGUFReader(path)
    fields = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    return fields, {tensor.name: tensor for tensor in reader.tensors}


def ours_in_gguf_order(model) -> dict[str, torch.Tensor]:
    """The model's weights under llama.cpp's names, q and k in the interleaved rotary layout."""
    config = model.config
    state = {
        "token_embd.weight": model.model.embed_tokens.weight, "output_norm.weight": model.model.norm.weight,
        "output.weight": model.lm_head.weight,
    }
    for i, layer in enumerate(model.model.layers):
        attention, mlp = layer.self_attn, layer.mlp
        state |= {
            f"blk.{i}.attn_norm.weight": layer.input_layernorm.weight,
            f"blk.{i}.attn_q.weight": interleave_rotary_halves(attention.q_proj.weight, config.num_attention_heads),
            f"blk.{i}.attn_k.weight": interleave_rotary_halves(attention.k_proj.weight, config.num_key_value_heads),
            f"blk.{i}.attn_v.weight": attention.v_proj.weight, f"blk.{i}.attn_output.weight": attention.o_proj.weight,
            f"blk.{i}.ffn_norm.weight": layer.post_attention_layernorm.weight,
            f"blk.{i}.ffn_gate.weight": mlp.gate_proj.weight, f"blk.{i}.ffn_up.weight": mlp.up_proj.weight,
            f"blk.{i}.ffn_down.weight": mlp.down_proj.weight,
        }
    return {name: weight.detach().float() for name, weight in state.items()}


@pytest.fixture(params=list(VARIANTS))
def variant_model(request, text_tokenizer):
    return tokenizer_model(text_tokenizer, **VARIANTS[request.param])


# ---- what llama.cpp expects ----------------------------------------------------------------------------------


def test_file_has_the_architecture_tensors_and_metadata_llama_cpp_expects(tmp_path, variant_model, text_tokenizer):
    config = variant_model.config
    fields, tensors = read(export_gguf(variant_model, text_tokenizer, tmp_path / "model.gguf", dtype="f32"))

    assert fields["general.architecture"] == LLAMA_CPP_LLADA["architecture"]
    assert {name: tuple(int(n) for n in t.shape) for name, t in tensors.items()} == expected_tensors(config)
    assert set(LLAMA_CPP_LLADA["metadata"]) <= fields.keys()
    assert {
        "llada.block_count": config.num_hidden_layers, "llada.context_length": config.max_position_embeddings,
        "llada.embedding_length": config.hidden_size, "llada.feed_forward_length": config.intermediate_size,
        "llada.attention.head_count": config.num_attention_heads,
        "llada.attention.head_count_kv": config.num_key_value_heads, "llada.vocab_size": config.vocab_size,
        "llada.rope.dimension_count": config.head_dim, "llada.attention.causal": False,
        "diffusion.shift_logits": False, "general.file_type": gguf.LlamaFileType.ALL_F32,
        "general.quantization_version": gguf.GGML_QUANT_VERSION, "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2", "tokenizer.ggml.mask_token_id": config.mask_token_id,
        "tokenizer.ggml.bos_token_id": config.bos_token_id, "tokenizer.ggml.eos_token_id": config.eos_token_id,
        "tokenizer.ggml.padding_token_id": config.pad_token_id, "tokenizer.ggml.add_bos_token": True,
        "tokenizer.chat_template": text_tokenizer.chat_template,
    }.items() <= fields.items()
    assert fields["llada.rope.freq_base"] == pytest.approx(config.rope_parameters["rope_theta"])
    assert fields["llada.attention.layer_norm_rms_epsilon"] == pytest.approx(config.rms_norm_eps)


def test_tensor_names_are_the_ones_llama_cpp_gives_the_official_names(tmp_path, text_tokenizer):
    # llama.cpp's converter reads official checkpoints and maps their names with gguf's own TensorNameMap
    from helpers import official_config, official_state_dict

    from llada_hf import LladaConfig, LladaForMaskedDiffusion

    cfg = official_config()
    config = LladaConfig(**{**cfg, "vocab_size": len(text_tokenizer), "embedding_size": len(text_tokenizer),
                            "mask_token_id": text_tokenizer.mask_token_id})
    official_names = official_state_dict({**cfg, "embedding_size": config.vocab_size})
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLADA, cfg["n_layers"])
    converter_names = {name_map.get_name(name, try_suffixes=(".weight",)) for name in official_names}
    _, tensors = read(export_gguf(LladaForMaskedDiffusion(config), text_tokenizer, tmp_path / "m.gguf"))
    assert tensors.keys() == converter_names == expected_tensors(config).keys()


def test_vocabulary_one_token_per_embedding_row(tmp_path, text_tokenizer):
    model = tokenizer_model(text_tokenizer, vocab_size=len(text_tokenizer) + 4)  # padded embedding rows
    fields, _ = read(export_gguf(model, text_tokenizer, tmp_path / "model.gguf"))
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == model.config.vocab_size
    vocab = text_tokenizer.get_vocab()
    assert all(tokens[token_id] == token for token, token_id in vocab.items())
    assert tokens[-4:] == [f"[PAD{i}]" for i in range(len(text_tokenizer), len(text_tokenizer) + 4)]
    assert types[-4:] == [gguf.TokenType.UNUSED] * 4
    for token in ("<|startoftext|>", "<|endoftext|>", "<|mdm_mask|>", "<|eot_id|>"):
        assert types[vocab[token]] == gguf.TokenType.CONTROL
    assert types[vocab["a"]] == gguf.TokenType.NORMAL
    merges = json.loads(text_tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    assert fields["tokenizer.ggml.merges"] == [" ".join(pair) for pair in merges]


# ---- the weights ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["f32", "f16", "q8_0"])
def test_dequantised_tensors_equal_the_weights(tmp_path, variant_model, text_tokenizer, dtype):
    _, tensors = read(export_gguf(variant_model, text_tokenizer, tmp_path / "model.gguf", dtype=dtype))
    ours = ours_in_gguf_order(variant_model)
    for name, tensor in tensors.items():
        values = torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type).copy())
        weight = ours[name]
        if weight.dim() == 1 or dtype == "f32":  # norms stay float32
            assert tensor.tensor_type == gguf.GGMLQuantizationType.F32 and torch.equal(values, weight), name
        elif dtype == "f16":
            assert torch.equal(values, weight.half().float()), name
        else:  # q8_0: 32 values share a scale d = max |x| / 127 (stored as f16) and are rounded to multiples of it
            assert tensor.tensor_type == gguf.GGMLQuantizationType.Q8_0
            blocks = weight.reshape(-1, 32)
            step = blocks.abs().amax(dim=1, keepdim=True) / 127
            error = (values.reshape(-1, 32) - blocks).abs()
            # half a step of rounding, plus up to 127 times the f16 rounding of d (2^-11 relative)
            assert (error <= step * (0.5 + 127 * 2**-11) + 1e-7).all(), name
            assert error.max() > 0, name  # quantised for real


def test_q_and_k_rows_match_ggml_rotary_layout(variant_model):
    # llama.cpp gives LLaDA LLAMA_ROPE_TYPE_NORM (src/llama-model.cpp, llama_model_rope_type): ggml's rotary
    # embedding then rotates the pair (2i, 2i + 1) by position * theta_i;
    # ours rotates (i, i + head_dim / 2). The permuted projection, roped the ggml way, must equal our roped
    # projection with its rows permuted the same way.
    config = variant_model.config
    head_dim, positions = config.head_dim, torch.arange(7)
    hidden = torch.randn(1, 7, config.hidden_size)
    cos, sin = variant_model.model.rotary_emb(hidden, positions[None])
    layer = variant_model.model.layers[0].self_attn
    theta = config.rope_parameters["rope_theta"] ** (-torch.arange(0, head_dim, 2).float() / head_dim)
    angle = positions[:, None].float() * theta  # [L, head_dim / 2]
    for projection, heads in ((layer.q_proj, config.num_attention_heads), (layer.k_proj, config.num_key_value_heads)):
        with torch.no_grad():
            ours = (hidden @ projection.weight.T).view(1, 7, heads, head_dim).transpose(1, 2)
            ours, _ = apply_rotary_pos_emb(ours, ours, cos, sin)  # [1, heads, L, head_dim]
            permuted = interleave_rotary_halves(projection.weight, heads)
            pairs = (hidden @ permuted.T).view(1, 7, heads, head_dim // 2, 2).transpose(1, 2)
        even, odd = pairs[..., 0], pairs[..., 1]
        ggml = torch.stack((even * angle.cos() - odd * angle.sin(), even * angle.sin() + odd * angle.cos()), -1)
        expected = interleave_rotary_halves(ours.reshape(-1, head_dim).T, 1).T  # each vector's halves interleaved
        torch.testing.assert_close(ggml.reshape(-1, head_dim), expected, atol=1e-5, rtol=1e-5)


# ---- bad input -----------------------------------------------------------------------------------------------


def test_bad_input_is_refused_with_what_to_change(tmp_path, text_model, text_tokenizer):
    out = tmp_path / "model.gguf"
    with pytest.raises(ValueError, match="q4_k"):
        export_gguf(text_model, text_tokenizer, out, dtype="q4_k")
    with pytest.raises(ValueError, match="tokenizer"):
        export_gguf(text_model, None, out)
    with pytest.raises(ValueError, match="head_dim"):
        export_gguf(tokenizer_model(text_tokenizer, head_dim=16), text_tokenizer, out)
    with pytest.raises(ValueError, match="mask"):
        export_gguf(tokenizer_model(text_tokenizer, mask_token_id=5), text_tokenizer, out)
    with pytest.raises(ValueError, match="embedding has 100 rows"):
        export_gguf(tokenizer_model(text_tokenizer, vocab_size=100), text_tokenizer, out)
    with pytest.raises(IsADirectoryError):
        export_gguf(text_model, text_tokenizer, tmp_path)
    assert os.listdir(tmp_path) == []


def test_a_tokenizer_whose_pre_tokenizer_cannot_be_named_needs_tokenizer_pre(tmp_path, text_model, text_tokenizer):
    from tokenizers import pre_tokenizers

    tokenizer = copy.deepcopy(text_tokenizer)
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(ValueError, match="tokenizer_pre"):
        export_gguf(text_model, tokenizer, tmp_path / "model.gguf")
    fields, _ = read(export_gguf(text_model, tokenizer, tmp_path / "model.gguf", tokenizer_pre="llama-bpe"))
    assert fields["tokenizer.ggml.pre"] == "llama-bpe"


def test_existing_file_is_refused_unless_overwrite_and_a_failure_leaves_it_alone(tmp_path, text_model, text_tokenizer,
                                                                                 monkeypatch):
    out = tmp_path / "model.gguf"
    out.write_bytes(b"old")
    with pytest.raises(FileExistsError, match="--overwrite"):
        export_gguf(text_model, text_tokenizer, out)

    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    # the header and metadata are already in the staged file when the tensors fail to be written
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        export_gguf(text_model, text_tokenizer, out, overwrite=True)
    with pytest.raises(RuntimeError, match="disk full"):
        export_gguf(text_model, text_tokenizer, tmp_path / "new.gguf")
    assert os.listdir(tmp_path) == ["model.gguf"] and out.read_bytes() == b"old"
    monkeypatch.undo()
    export_gguf(text_model, text_tokenizer, out, overwrite=True)
    assert read(out)[0]["general.architecture"] == "llada"


# ---- the command line ----------------------------------------------------------------------------------------


def test_cli_exports_gguf(tmp_path, text_model, text_tokenizer, capsys):
    text_model.save_pretrained(tmp_path / "model")
    text_tokenizer.save_pretrained(tmp_path / "model")
    out = tmp_path / "model-q8_0.gguf"
    assert main(["export", str(tmp_path / "model"), str(out), "--format", "gguf", "--dtype", "q8_0"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    fields, tensors = read(out)
    assert fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    assert tensors["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert main(["export", str(tmp_path / "model"), str(out), "--format", "gguf"]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "model"), str(out), "--format", "gguf", "--ship-bundle"]) == 1
    assert "--ship-bundle does not apply to --format gguf" in capsys.readouterr().err
