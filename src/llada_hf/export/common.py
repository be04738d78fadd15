"""What both export formats share: which models can be exported, and writing the output all at once.

A model has an official (GSAI-ML) equivalent only when every field of its config maps onto an official key; a
model that does not is refused with the field named, because an export that silently dropped it would compute
something else in the tools that read it.
"""

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..modeling_llada import LladaForMaskedDiffusion


def check_exportable(model) -> None:
    """Refuse, with what to change, a model the official layout and llama.cpp cannot express.

    Example:
        ```python
        >>> from llada_hf import LladaConfig, LladaForMaskedDiffusion
        >>> from llada_hf.export.common import check_exportable
        >>> config = LladaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        ...                      num_attention_heads=4, head_dim=16, mask_token_id=63, pad_token_id=0)
        >>> check_exportable(LladaForMaskedDiffusion(config))
        Traceback (most recent call last):
        ValueError: `head_dim=16` has no official equivalent: the official code uses d_model / n_heads = 8.
        ```
    """
    if hasattr(model, "merge_and_unload"):
        raise TypeError(
            "This is a PEFT model with adapters: merge them first (`model = model.merge_and_unload()`), then export."
        )
    if not isinstance(model, LladaForMaskedDiffusion):
        raise TypeError(
            f"Export takes a LladaForMaskedDiffusion (the text model), got {type(model).__name__}. LLaDA-V has no "
            "official text-only layout; export its language model on its own only if you know the tools need that."
        )
    config = model.config
    if getattr(config, "quantization_config", None) is not None:
        raise ValueError(
            "`quantization_config` has no official equivalent: load the model unquantized to export it (GGUF "
            "quantises on its own, see --dtype)."
        )
    natural_head_dim = config.hidden_size // config.num_attention_heads
    if config.head_dim != natural_head_dim:
        raise ValueError(
            f"`head_dim={config.head_dim}` has no official equivalent: the official code uses d_model / n_heads = "
            f"{natural_head_dim}."
        )
    if config.mask_token_id is None:
        raise ValueError(
            "`mask_token_id` is None: a masked diffusion model needs its mask token, and llama.cpp's diffusion CLI "
            "refuses a model without one. Set `model.config.mask_token_id`."
        )


def check_output(path: Path, *, overwrite: bool, folder: bool) -> None:
    """Refuse an output that exists (a non-empty folder, or a file) unless `overwrite`, and one of the wrong kind.

    Example:
        ```python
        >>> import tempfile
        >>> from pathlib import Path
        >>> from llada_hf.export.common import check_output
        >>> check_output(Path(tempfile.mkdtemp()), overwrite=False, folder=True)  # an empty folder is fine
        ```
    """
    if not path.exists():
        return
    if folder and not path.is_dir():
        raise FileExistsError(f"{path} is a file; the official layout is a folder. Give a folder path.")
    if not folder and path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; a GGUF export is one file. Give a file path (NAME.gguf).")
    if path.is_dir() and not any(path.iterdir()):
        return
    if not overwrite:
        raise FileExistsError(
            f"{path} already exists and is not empty; pass --overwrite (overwrite=True) to replace it."
        )


@contextmanager
def written_at_once(path: Path, *, overwrite: bool, folder: bool) -> Iterator[Path]:
    """Yield a staging path next to `path`; when the block succeeds, the staged output replaces `path`.

    The staging path lies in a hidden temporary folder beside `path` (same file system, so the final rename is
    atomic for a file). A failure anywhere leaves `path` as it was: no partial folder or file, and an
    overwritten output is replaced only once the new one is complete.

    Example:
        ```python
        >>> import tempfile
        >>> from pathlib import Path
        >>> from llada_hf.export.common import written_at_once
        >>> target = Path(tempfile.mkdtemp()) / "model.gguf"
        >>> with written_at_once(target, overwrite=False, folder=False) as staging:
        ...     _ = staging.write_bytes(b"GGUF")
        >>> target.read_bytes()
        b'GGUF'
        ```
    """
    path = Path(path)
    check_output(path, overwrite=overwrite, folder=folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.partial-"))
    try:
        staging = scratch / path.name
        yield staging
        replaced = scratch / "replaced"
        if path.is_dir():  # os.replace cannot replace a folder: move the old one into the scratch folder first
            path.rename(replaced)
        try:
            os.replace(staging, path)
        except OSError:
            if replaced.exists():
                replaced.rename(path)
            raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
