"""Export to GGUF for llama.cpp (`llama-diffusion-cli`), written as llama.cpp's own converter writes LLaDA.

The facts come from llama.cpp (ggml-org/llama.cpp): its converter's `LLaDAModel` (registered for the official
`LLaDAModelLM`) and the `TextModel` base it extends, the `MODEL_ARCH.LLADA` tensor list of its Python package
`gguf` (the writer used here), and its LLaDA loader (`src/models/llada.cpp`). What they fix:

- architecture "llada"; tensors `token_embd`, `output_norm`, `output` (absent when the head is tied: the loader
  reuses `token_embd`), and per block `attn_norm`, `attn_q`, `attn_k`, `attn_v`, `attn_output`, `ffn_norm`,
  `ffn_gate`, `ffn_up`, `ffn_down`; the names come from `gguf`'s own name map.
- q and k rows are permuted from the rotate-half layout of Hugging Face checkpoints to the interleaved pairs that
  ggml's rotary embedding rotates (the converter's `undo_permute`).
- 1-D tensors and norms stay float32; the others take the requested type (a q8_0 row that is not a whole number
  of 32-value blocks falls back to f16, as in the converter).
- metadata: the Llama-style hyperparameters, `llada.vocab_size`, `llada.rope.dimension_count`,
  `llada.attention.causal = false`, `diffusion.shift_logits = false` (llama-diffusion-cli shifts the logits when
  the key is missing), the mask token id, and a byte-level BPE ("gpt2") vocabulary with BOS added to prompts.
"""

import json
import tempfile
from contextlib import closing
from pathlib import Path

import gguf
import torch

from .common import check_exportable, written_at_once
from .official import official_config, save_tokenizer_with_mask


# --dtype: (the file type recorded in the header, the type of the 2-D weights)
GGUF_DTYPES = {
    "f32": (gguf.LlamaFileType.ALL_F32, gguf.GGMLQuantizationType.F32),
    "f16": (gguf.LlamaFileType.MOSTLY_F16, gguf.GGMLQuantizationType.F16),
    "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, gguf.GGMLQuantizationType.Q8_0),
}
ARCHITECTURE = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLADA]


def export_gguf(
    model,
    tokenizer,
    output_file: str | Path,
    *,
    dtype: str = "f16",
    tokenizer_pre: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write `model` and `tokenizer` as one GGUF file for llama.cpp; return its path.

    `dtype` is "f16", "f32" or "q8_0" (norms stay float32). `tokenizer_pre` names llama.cpp's pre-tokenizer; by
    default it is read off the tokenizer ("gpt-2" for a plain byte-level BPE such as `train_tokenizer`'s), and a
    tokenizer it cannot name is refused. An existing file is refused unless `overwrite`; a failed export leaves
    no partial file. Run the result with `llama-diffusion-cli -m FILE -p PROMPT --diffusion-steps N
    --diffusion-block-length K -ub LENGTH` (README, "Export").

    Example:
        ```python
        >>> import tempfile
        >>> from llada_hf import LladaConfig, LladaForMaskedDiffusion
        >>> from llada_hf.export import export_gguf
        >>> from llada_hf.tokenization import model_token_ids, train_tokenizer
        >>> tokenizer = train_tokenizer(["hello world", "hello there"], vocab_size=300)
        >>> config = LladaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        ...                      **model_token_ids(tokenizer))
        >>> path = export_gguf(LladaForMaskedDiffusion(config), tokenizer, tempfile.mkdtemp() + "/tiny.gguf")
        >>> import gguf
        >>> gguf.GGUFReader(path).fields["general.architecture"].contents()
        'llada'
        ```
    """
    check_exportable(model)
    if dtype not in GGUF_DTYPES:
        raise ValueError(f"GGUF dtype {dtype!r} is not supported; use one of {', '.join(GGUF_DTYPES)}.")
    if tokenizer is None:
        raise ValueError("A GGUF file carries its vocabulary: pass the model's tokenizer.")
    pre = tokenizer_pre or llama_cpp_pre_tokenizer(tokenizer)
    file_type, weight_type = GGUF_DTYPES[dtype]
    output_file = Path(output_file)
    # The writer is closed (its file complete) before the staged file replaces `output_file`.
    with (written_at_once(output_file, overwrite=overwrite, folder=False) as staging,
          closing(gguf.GGUFWriter(path=None, arch=ARCHITECTURE)) as writer):
        add_model_metadata(writer, model, file_type)
        add_vocabulary(writer, tokenizer, model.config, pre)
        for name, data, tensor_type in gguf_tensors(model, weight_type):
            writer.add_tensor(name, data, raw_dtype=tensor_type)
        writer.write_header_to_file(path=staging)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    return output_file


# ---- tensors -------------------------------------------------------------------------------------------------


def interleave_rotary_halves(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorder q/k projection rows from the rotate-half layout to interleaved pairs, per head.

    Hugging Face checkpoints rotate dimension i with i + head_dim/2; ggml's rotary embedding (the kind llama.cpp
    uses for LLaDA) rotates 2i with 2i + 1. Row order [a0 a1 .. | b0 b1 ..] becomes [a0 b0 a1 b1 ..] in every head.

    Example:
        ```python
        >>> import torch
        >>> from llada_hf.export.gguf import interleave_rotary_halves
        >>> interleave_rotary_halves(torch.arange(8.0)[:, None], heads=2).flatten().tolist()
        [0.0, 2.0, 1.0, 3.0, 4.0, 6.0, 5.0, 7.0]
        ```
    """
    rows, columns = weight.shape
    halves = weight.reshape(heads, 2, rows // heads // 2, columns)  # [head, half, pair, in]
    return halves.transpose(1, 2).reshape(rows, columns)


def gguf_tensors(model, weight_type: gguf.GGMLQuantizationType):
    """Yield (GGUF name, data, GGML type) for every weight, named by `gguf`'s map for the LLaDA architecture."""
    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLADA, config.num_hidden_layers)
    rotary_heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}
    state = model.state_dict()
    if config.tie_word_embeddings:  # no `output` tensor: llama.cpp's loader falls back to token_embd
        state.pop("lm_head.weight")
    for name, tensor in state.items():
        gguf_name = names.get_name(name, try_suffixes=(".weight",))
        if gguf_name is None:
            raise ValueError(f"llama.cpp's LLaDA architecture has no tensor for {name!r}.")
        tensor = tensor.detach().to("cpu", torch.float32)
        heads = rotary_heads.get(gguf_name.split(".")[-2])  # "blk.N.attn_q.weight" -> "attn_q"
        if heads is not None:
            tensor = interleave_rotary_halves(tensor, heads)
        data = tensor.numpy()
        keep_float32 = data.ndim == 1 or gguf_name.endswith("_norm.weight")
        yield (gguf_name, *quantize(data, gguf.GGMLQuantizationType.F32 if keep_float32 else weight_type))


def quantize(data, tensor_type: gguf.GGMLQuantizationType):
    """`gguf.quants.quantize`, falling back to f16 when rows do not split into whole blocks (as the converter)."""
    try:
        return gguf.quants.quantize(data, tensor_type), tensor_type
    except gguf.QuantError:
        return gguf.quants.quantize(data, gguf.GGMLQuantizationType.F16), gguf.GGMLQuantizationType.F16


# ---- metadata ------------------------------------------------------------------------------------------------


def add_model_metadata(writer: gguf.GGUFWriter, model, file_type: gguf.LlamaFileType) -> None:
    """The hyperparameters llama.cpp's LLaDA loader reads, under the keys its converter writes."""
    config = model.config
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(Path(str(config.name_or_path)).name or "LLaDA")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_file_type(file_type)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_causal_attention(False)  # bidirectional: the whole difference from Llama
    writer.add_diffusion_shift_logits(False)  # position i predicts its own token (without the key: shifted)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def add_vocabulary(writer: gguf.GGUFWriter, tokenizer, config, pre: str) -> None:
    """Tokens, token types, merges, special ids and chat template of a byte-level BPE tokenizer.

    One token per embedding row: rows beyond the tokenizer become unused "[PAD<i>]" tokens. The special ids,
    merges and chat template are read by `gguf.SpecialVocab` from the tokenizer saved (mask token named) beside
    the official config.json, as llama.cpp's converter reads a checkpoint folder.
    """
    tokens, token_types = vocabulary(tokenizer, config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    with tempfile.TemporaryDirectory() as folder:
        save_tokenizer_with_mask(tokenizer, config.mask_token_id, Path(folder))
        (Path(folder) / "config.json").write_text(json.dumps(official_config(config)))
        special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=len(tokens))
    if special.special_token_ids.get("mask") != config.mask_token_id:
        raise ValueError(
            f"The tokenizer's mask token (id {special.special_token_ids.get('mask')}) is not the model's "
            f"`mask_token_id` ({config.mask_token_id}); pass the tokenizer the model was trained with."
        )
    special.add_special_token["bos"] = True  # LLaDA's prompts start with BOS; llama.cpp's converter sets this too
    special.add_to_gguf(writer, quiet=True)


def vocabulary(tokenizer, rows: int) -> tuple[list[str], list[int]]:
    """The token strings and GGUF token types for ids 0..rows-1 (special tokens are CONTROL, as the converter).

    Example:
        ```python
        >>> from llada_hf.export.gguf import vocabulary
        >>> from llada_hf.tokenization import train_tokenizer
        >>> tokenizer = train_tokenizer(["hello world"], vocab_size=280)
        >>> tokens, types = vocabulary(tokenizer, len(tokenizer) + 1)
        >>> tokens[2], types[2].name, tokens[-1], types[-1].name  # the mask token; a padding row
        ('<|mdm_mask|>', 'CONTROL', '[PAD271]', 'UNUSED')
        ```
    """
    by_id = {token_id: token for token, token_id in tokenizer.get_vocab().items()}
    if max(by_id) >= rows:
        raise ValueError(
            f"The tokenizer has ids up to {max(by_id)} but the model's embedding has {rows} rows; pass the "
            "tokenizer the model was trained with."
        )
    added = tokenizer.added_tokens_decoder
    tokens, token_types = [], []
    for token_id in range(rows):
        if token_id not in by_id:
            tokens.append(f"[PAD{token_id}]")
            token_types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(by_id[token_id])
        if token_id not in added:
            token_types.append(gguf.TokenType.NORMAL)
        else:
            token_types.append(gguf.TokenType.CONTROL if added[token_id].special else gguf.TokenType.USER_DEFINED)
    return tokens, token_types


def llama_cpp_pre_tokenizer(tokenizer) -> str:
    """The name llama.cpp gives this tokenizer's pre-tokenizer; refuse tokenizers GGUF's "gpt2" model cannot hold.

    llama.cpp's converter names it by hashing the tokens of a test text against a table of known models, which
    no fine-tuned or newly trained tokenizer is in; here it is read off the structure. A plain byte-level
    pre-tokenizer with GPT-2's split pattern is llama.cpp's "gpt-2"; for anything else pass `tokenizer_pre`.

    Example:
        ```python
        >>> from llada_hf.export.gguf import llama_cpp_pre_tokenizer
        >>> from llada_hf.tokenization import train_tokenizer
        >>> llama_cpp_pre_tokenizer(train_tokenizer(["hello world"], vocab_size=280))
        'gpt-2'
        ```
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    model_type = (spec.get("model") or {}).get("type")
    if model_type != "BPE":
        raise ValueError(
            f"GGUF export writes byte-level BPE vocabularies (llama.cpp's 'gpt2' model); this tokenizer is "
            f"{model_type or type(tokenizer).__name__}. Convert the official-layout export with llama.cpp's "
            "convert_hf_to_gguf.py instead."
        )
    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space"):
        return "gpt-2"
    raise ValueError(
        f"Cannot tell which llama.cpp pre-tokenizer matches this tokenizer's ({pre.get('type')}). Pass "
        "tokenizer_pre= (--tokenizer-pre) with the name llama.cpp's convert_hf_to_gguf.py prints for the base "
        "model's tokenizer, or convert the official-layout export with convert_hf_to_gguf.py."
    )
