"""Export to the official GSAI-ML LLaDA layout (docs/LLADA.md section 1), for tools built on the official code.

The weights get the official names from the checkpoint conversion mapping that loads official checkpoints
(`OFFICIAL_CHECKPOINT_RENAMES`, inverted here: one table, both directions). The
config gets the official OLMo-style keys, `architectures: ["LLaDAModelLM"]`, and an `auto_map` that points at the
official modeling code on the Hub, so the folder runs where only transformers 4.x and the official code are
available; llama.cpp's `convert_hf_to_gguf.py` reads it as it reads GSAI-ML's own checkpoints.
"""

import copy
import json
import re
from pathlib import Path

from huggingface_hub import save_torch_state_dict

from ..configuration_llada import BUNDLE_AUTO_MAP, OFFICIAL_KEY_RENAMES
from ..modeling_llada import OFFICIAL_CHECKPOINT_RENAMES, copy_bundle_files
from ..tokenization import set_mask_token
from .common import check_exportable, written_at_once


# The Hub repository whose modeling code the exported `auto_map` names (LLaDA-8B-Base, -Instruct and LLaDA-1.5
# ship the same configuration_llada.py and modeling_llada.py).
OFFICIAL_CODE_REPO = "GSAI-ML/LLaDA-8B-Instruct"

# The official classes, as the `auto_map` of the GSAI-ML checkpoints names them.
OFFICIAL_AUTO_CLASSES = {
    "AutoConfig": "configuration_llada.LLaDAConfig",
    "AutoModel": "modeling_llada.LLaDAModelLM",
    "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
}

# Official config keys with no counterpart in `LladaConfig`, at the values of the GSAI-ML checkpoints: the
# architecture switches at the one variant LLaDA (and this package) implements, and the keys that only steer the
# official code's initialisation and kernels. `LladaConfig` accepts each of these values.
OFFICIAL_FIXED_KEYS = {
    "activation_type": "silu",
    "alibi": False,
    "alibi_bias_max": 8.0,
    "attention_layer_norm": False,
    "attention_layer_norm_with_affine": True,
    "bias_for_layer_norm": False,
    "block_group_size": 1,
    "block_type": "llama",
    "embedding_dropout": 0.0,
    "flash_attention": False,
    "include_bias": False,
    "include_qkv_bias": False,
    "init_cutoff_factor": None,
    "init_device": "meta",
    "init_fn": "mitchell",
    "input_emb_norm": False,
    "layer_norm_type": "rms",
    "layer_norm_with_affine": True,
    "mlp_ratio": 4,  # read by the official code only when mlp_hidden_size is missing, which it never is here
    "multi_query_attention": None,
    "precision": "amp_bf16",
    "residual_dropout": 0.0,
    "rope": True,
    "scale_logits": False,
    "use_cache": False,
}


def official_config(
    config, *, torch_dtype: str = "float32", ship_bundle: bool = False, code_repo: str = OFFICIAL_CODE_REPO
) -> dict:
    """The official GSAI-ML `config.json` (OLMo-style keys) of a `LladaConfig`.

    `vocab_size` and `embedding_size` are both the embedding's rows, as in the GSAI-ML checkpoints (llama.cpp's
    converter sizes its vocabulary by `vocab_size`). `bos_token_id` has no official key; the tokenizer keeps it.

    Example:
        ```python
        >>> from llada_hf import LladaConfig
        >>> from llada_hf.export.official import official_config
        >>> cfg = official_config(LladaConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=2))
        >>> cfg["d_model"], cfg["n_layers"], cfg["architectures"], cfg["auto_map"]["AutoModel"]
        (64, 2, ['LLaDAModelLM'], 'GSAI-ML/LLaDA-8B-Instruct--modeling_llada.LLaDAModelLM')
        ```
    """
    renamed = {official: getattr(config, ours) for official, ours in OFFICIAL_KEY_RENAMES.items()}
    if ship_bundle:
        auto_map = dict(BUNDLE_AUTO_MAP)
    else:  # transformers' `repo--module.Class` form: the code is fetched from that Hub repository
        auto_map = {auto: f"{code_repo}--{target}" for auto, target in OFFICIAL_AUTO_CLASSES.items()}
    return dict(sorted({
        **OFFICIAL_FIXED_KEYS,
        **renamed,
        "architectures": ["LLaDAModelLM"],
        "auto_map": auto_map,
        "model_type": "llada",
        "vocab_size": config.vocab_size,
        "embedding_size": config.vocab_size,
        "rope_theta": config.rope_parameters["rope_theta"],
        "rms_norm_eps": config.rms_norm_eps,
        "rope_full_precision": config.rope_full_precision,
        "attention_dropout": config.attention_dropout,
        "mask_token_id": config.mask_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        "torch_dtype": torch_dtype,
    }.items()))


def export_official(
    model,
    output_dir: str | Path,
    tokenizer=None,
    *,
    ship_bundle: bool = False,
    code_repo: str = OFFICIAL_CODE_REPO,
    overwrite: bool = False,
) -> Path:
    """Save `model` (and `tokenizer`) in the official GSAI-ML LLaDA layout; return the folder.

    Weights: safetensors under the official names (`model.transformer.*`; `model.transformer.ff_out` is the head,
    absent when the embeddings are tied, as `weight_tying` says). Config: the official keys (`official_config`),
    with an `auto_map` that points at the official code on the Hub (`code_repo`), or at our bundle's code copied
    into the folder with `ship_bundle=True` (for transformers ≥ 5.24, without `llada_hf` installed). The tokenizer
    is saved with its mask token named. An existing non-empty folder is refused unless `overwrite`; a failed
    export leaves no partial folder.

    This is tooling, not a `save_pretrained` option, on purpose: the model's own `save_pretrained` ships with
    every checkpoint (the bundle) and must keep importing only torch and transformers.

    Example:
        ```python
        >>> import tempfile
        >>> from llada_hf import LladaConfig, LladaForMaskedDiffusion
        >>> from llada_hf.export import export_official
        >>> config = LladaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        ...                      num_attention_heads=4, mask_token_id=63, pad_token_id=0, eos_token_id=1,
        ...                      bos_token_id=2)
        >>> folder = export_official(LladaForMaskedDiffusion(config), tempfile.mkdtemp() + "/official")
        >>> sorted(p.name for p in folder.iterdir())
        ['config.json', 'generation_config.json', 'model.safetensors']
        ```
    """
    check_exportable(model)
    output_dir = Path(output_dir)
    with written_at_once(output_dir, overwrite=overwrite, folder=True) as staging:
        staging.mkdir(parents=True, exist_ok=True)
        save_torch_state_dict(official_state_dict(model), staging, max_shard_size="5GB")
        torch_dtype = str(model.dtype).removeprefix("torch.")
        config = official_config(model.config, torch_dtype=torch_dtype, ship_bundle=ship_bundle, code_repo=code_repo)
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        model.generation_config.save_pretrained(staging)
        if ship_bundle:
            copy_bundle_files(staging)
        if tokenizer is not None:
            save_tokenizer_with_mask(tokenizer, model.config.mask_token_id, staging)
    return output_dir


def _inverted_renames() -> list[tuple[re.Pattern, str]]:
    """`OFFICIAL_CHECKPOINT_RENAMES` (official name -> ours) as (our-name pattern, official replacement) pairs."""
    inverted = []
    for renaming in OFFICIAL_CHECKPOINT_RENAMES:
        [official], [ours] = renaming.source_patterns, renaming.target_patterns
        pattern = re.escape(ours).replace(re.escape(r"\1"), r"(\d+)")
        inverted.append((re.compile("^" + pattern), official.replace(r"(\d+)", r"\1").replace("\\.", ".")))
    return inverted


def official_name(name: str) -> str:
    """The official GSAI-ML name of one of our parameter names.

    Example:
        ```python
        >>> from llada_hf.export.official import official_name
        >>> official_name("model.layers.3.self_attn.o_proj.weight"), official_name("lm_head.weight")
        ('model.transformer.blocks.3.attn_out.weight', 'model.transformer.ff_out.weight')
        ```
    """
    for pattern, replacement in _inverted_renames():
        if pattern.match(name):
            return pattern.sub(replacement, name, count=1)
    raise ValueError(f"`{name}` has no official LLaDA name; only the text model's weights can be exported.")


def official_state_dict(model) -> dict:
    """The model's weights under the official names, whatever the model was loaded from (a fresh model, a llada-hf
    folder, an official checkpoint, a merged LoRA). A tied head is left out: the official layout has no
    `ff_out` when `weight_tying` is set."""
    tied = model.config.tie_word_embeddings
    return {official_name(name): tensor.detach().contiguous() for name, tensor in model.state_dict().items()
            if not (tied and name == "lm_head.weight")}


def save_tokenizer_with_mask(tokenizer, mask_token_id: int, folder: Path) -> None:
    """Save a copy of `tokenizer` with its mask token named (official LLaDA tokenizers leave it unset), in a
    `tokenizer_config.json` that transformers 4.x reads as well as 5.x (`portable_tokenizer_config`)."""
    tokenizer = copy.deepcopy(tokenizer)
    set_mask_token(tokenizer, mask_token_id)
    tokenizer.save_pretrained(folder)
    config_file, template_file = Path(folder) / "tokenizer_config.json", Path(folder) / "chat_template.jinja"
    template = template_file.read_text() if template_file.exists() else None
    config = portable_tokenizer_config(json.loads(config_file.read_text()), template)
    config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def portable_tokenizer_config(config: dict, chat_template: str | None = None) -> dict:
    """A transformers 5 `tokenizer_config.json` rewritten so that 4.x tools (the official `generate.py`, llama.cpp's
    converter, lm-eval on 4.x) load it too: the fast tokenizer class by its 4.x name, the extra special tokens as
    `additional_special_tokens`, and the chat template inside the config (4.x before 4.50 reads it only there; 5.x
    reads it from either place).

    Example:
        ```python
        >>> from llada_hf.export.official import portable_tokenizer_config
        >>> config = portable_tokenizer_config({"tokenizer_class": "TokenizersBackend", "backend": "tokenizers",
        ...                                     "extra_special_tokens": ["<|eot_id|>"]}, "{{ bos_token }}")
        >>> config["tokenizer_class"], config["additional_special_tokens"], config["chat_template"]
        ('PreTrainedTokenizerFast', ['<|eot_id|>'], '{{ bos_token }}')
        ```
    """
    config = dict(config)
    config.pop("backend", None)
    if config.get("tokenizer_class") in (None, "TokenizersBackend"):
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
    extra = config.pop("extra_special_tokens", None)
    if isinstance(extra, dict):  # named extra tokens (a 5.x form): 4.x knows them only as additional tokens
        extra = list(extra.values())
    if extra:
        config["additional_special_tokens"] = list(extra)
    if chat_template is not None:
        config.setdefault("chat_template", chat_template)
    return config
