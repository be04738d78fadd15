"""Export for the rest of the ecosystem: the official GSAI-ML layout and GGUF (llama.cpp).

- `export_official(model, folder, tokenizer)`: official parameter names and config keys, read by the official
  remote code (transformers 4.x), by tools that patch `model.transformer.blocks`, and by llama.cpp's converter.
- `export_gguf(model, tokenizer, "model.gguf", dtype="f16")`: one GGUF file for `llama-diffusion-cli`.
- `export_checkpoint(path, output, format=...)`: the same from a saved folder (`llada-hf export`).

Tooling, not bundle: nothing here ships with a checkpoint. `gguf` (the `export` extra) is imported only by
`export_gguf`.
"""

from .checkpoint import export_checkpoint
from .official import export_official, official_config


def __getattr__(name: str):
    if name == "export_gguf":  # needs the `gguf` package; the official layout does not
        from .gguf import export_gguf

        return export_gguf
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["export_checkpoint", "export_gguf", "export_official", "official_config"]
