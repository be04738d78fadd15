"""`llada-hf export`: load a saved model (or a LoRA adapter folder, merged into its base) and export it."""

import json
from pathlib import Path

from ..modeling_llada import check_local_folder
from .common import check_output


FORMATS = ("official", "gguf")


def export_checkpoint(
    model_path: str | Path,
    output: str | Path,
    *,
    format: str,
    dtype: str | None = None,
    overwrite: bool = False,
    ship_bundle: bool = False,
    tokenizer_pre: str | None = None,
    code_repo: str | None = None,
) -> Path:
    """Export the model saved at `model_path` to `output` in `format` ("official" or "gguf"); return the output.

    The flags that belong to one format are refused with the other, and an existing output is refused (unless
    `overwrite`) before the model is loaded.

    Example:
        ```python
        >>> import tempfile
        >>> from llada_hf.export import export_checkpoint
        >>> export_checkpoint("saved-model", tempfile.mkdtemp(), format="onnx")
        Traceback (most recent call last):
        ValueError: Unknown export format 'onnx'; use one of official, gguf.
        ```
    """
    if format not in FORMATS:
        raise ValueError(f"Unknown export format {format!r}; use one of {', '.join(FORMATS)}.")
    gguf_only = {"--dtype": dtype, "--tokenizer-pre": tokenizer_pre}
    official_only = {"--ship-bundle": ship_bundle or None, "--code-repo": code_repo}
    misplaced = [flag for flag, value in (official_only if format == "gguf" else gguf_only).items() if value]
    if misplaced:
        raise ValueError(f"{', '.join(misplaced)} does not apply to --format {format}.")
    output = Path(output)
    check_output(output, overwrite=overwrite, folder=format == "official")
    model, tokenizer = load_for_export(model_path)
    if format == "gguf":
        try:
            from .gguf import export_gguf
        except ModuleNotFoundError as error:
            raise ImportError(f"--format gguf needs the `{error.name}` package: pip install -e '.[export]' in the "
                              "llada-hf checkout.") from error

        return export_gguf(model, tokenizer, output, dtype=dtype or "f16", tokenizer_pre=tokenizer_pre,
                           overwrite=overwrite)
    from .official import OFFICIAL_CODE_REPO, export_official

    return export_official(model, output, tokenizer, ship_bundle=ship_bundle,
                           code_repo=code_repo or OFFICIAL_CODE_REPO, overwrite=overwrite)


def load_for_export(model_path: str | Path):
    """(model, tokenizer) from a saved model folder or Hub id, in the checkpoint's dtype.

    A LoRA adapter folder (`adapter_config.json`) is loaded onto its base model and merged: the official layout
    and GGUF hold plain weights. Its tokenizer is the adapter folder's when it has one, else the base model's.
    """
    from transformers import AutoModel, AutoTokenizer

    import llada_hf  # noqa: F401  (registers the Auto classes)

    check_local_folder(model_path)
    adapter_config = Path(model_path) / "adapter_config.json"
    if not adapter_config.is_file():
        from transformers import AutoConfig

        model_type = AutoConfig.from_pretrained(model_path).model_type
        if model_type != "llada":
            raise TypeError(f"{model_path} holds a `{model_type}` model; export takes a text LLaDA model (the "
                            "official layout and llama.cpp have no LLaDA-V format).")
        return AutoModel.from_pretrained(model_path, dtype="auto").eval(), AutoTokenizer.from_pretrained(model_path)
    from peft import PeftModel

    base_path = json.loads(adapter_config.read_text())["base_model_name_or_path"]
    base = AutoModel.from_pretrained(base_path, dtype="auto")
    model = PeftModel.from_pretrained(base, model_path).merge_and_unload().eval()
    has_tokenizer = (Path(model_path) / "tokenizer_config.json").is_file()
    return model, AutoTokenizer.from_pretrained(model_path if has_tokenizer else base_path)
