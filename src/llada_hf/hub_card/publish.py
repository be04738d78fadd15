"""Publish a LLaDA checkpoint to the Hugging Face Hub: one folder, one commit.

The folder holds everything a stranger needs with only `torch` and `transformers`: weights, config,
generation config, tokenizer (for LLaDA-V: the processor), the bundle's modeling code and the model card. It is
written locally
first, so what is uploaded is exactly what was saved (and can be inspected, or re-uploaded with
`publish_folder`, if the upload fails).
"""

import copy
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import CommitOperationAdd, HfApi, ModelCard
from huggingface_hub.errors import RepositoryNotFoundError

from ..modeling_llada import copy_bundle_files
from ..tokenization import set_mask_token
from .card import (
    CONFIG_CLASSES,
    PROCESSOR_FILE,
    CheckpointFacts,
    check_repo_id,
    facts_from_folder,
    facts_from_model,
    render_model_card,
)


# A saved tokenizer always writes one of these; without them the published checkpoint cannot be used.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@dataclass
class PublishResult:
    """What `publish` / `publish_folder` uploaded (or, for a dry run, would upload).

    Args:
        repo_id: the Hub repository.
        files: the paths inside the repository, sorted; exactly the files of `folder`.
        card: the model card (README.md).
        folder: the local folder the files came from; `None` after a dry run into a temporary folder.
        commit_url: the Hub commit; `None` for a dry run.
    """

    repo_id: str
    files: list[str]
    card: ModelCard
    folder: Path | None
    commit_url: str | None


class PublishError(RuntimeError):
    """The Hub refused or interrupted the upload. Nothing was committed; the local folder is kept."""


def publish(
    model: Any,
    tokenizer: Any,
    repo_id: str,
    *,
    card: ModelCard | None = None,
    base_model: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    dry_run: bool = False,
    merge_adapter: bool = False,
    save_directory: str | Path | None = None,
) -> PublishResult:
    """Save a LLaDA model (or LoRA adapter), its tokenizer, code and card, and upload them in one commit.

    Steps: check the inputs; unless `dry_run`, check the Hub repo (an existing repo must not hold another
    model type); write the folder; create the repo if needed; upload every file of the folder in one commit.

    Args:
        model: a `LladaForMaskedDiffusion` or `LladaVForConditionalGeneration`, or a PEFT model wrapping one. A
            PEFT model is published as an adapter (adapter files + a card pointing at the base model), or with
            `merge_adapter=True` as a full model with the adapter merged in (the merge runs on a copy; `model` is
            left unchanged).
        tokenizer: the model's tokenizer; for LLaDA-V its processor (`LladaVProcessor`). Required: the checkpoint
            is unusable without it.
        repo_id: "owner/name".
        card: the model card; default: `render_model_card(model, repo_id=..., tokenizer=..., base_model=...,
            merge_adapter=...)`. Render it yourself to add a trainer, datasets, evaluation results, a license.
        base_model: Hub id of the model this one was fine-tuned from (for the default card). An adapter
            needs one unless PEFT recorded its base as a Hub id.
        private: visibility of a repo that is created; an existing repo keeps its visibility.
        revision: branch to commit to (created from main if missing); default main.
        commit_message: default "Upload LLaDA model with llada-hf" (or "... adapter ...").
        token: Hub token; default: the locally saved one (`hf auth login`) or `HF_TOKEN`.
        dry_run: write the folder and return the planned files and card; no network access at all.
        save_directory: where to write the folder (must be empty or absent); it is kept. Default: a
            temporary folder, deleted after a successful upload or a dry run, kept if the upload fails.

    Returns:
        A `PublishResult` (files, card, folder, commit URL).

    Raises:
        ValueError / TypeError: bad input (repo id, missing tokenizer, not a LLaDA model, an existing repo
            with another model type, an adapter whose base the snippet could not load).
        PublishError: the upload failed; nothing was committed, and the folder is kept and named.

    Example:
        ```python
        >>> from llada_hf import LladaConfig, LladaForMaskedDiffusion
        >>> from llada_hf.hub_card import publish
        >>> from llada_hf.tokenization import model_token_ids, train_tokenizer
        >>> tokenizer = train_tokenizer(["hello world"], vocab_size=280)
        >>> config = LladaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        ...                      num_attention_heads=2, **model_token_ids(tokenizer))
        >>> plan = publish(LladaForMaskedDiffusion(config), tokenizer, "alice/tiny-llada", dry_run=True)
        >>> "model.safetensors" in plan.files and "modeling_llada.py" in plan.files
        True
        ```
    """
    check_repo_id(repo_id)
    check_tokenizer(tokenizer)
    facts = facts_from_model(model, tokenizer, merge_adapter=merge_adapter)  # refuses what cannot be published
    check_processor(tokenizer, facts)
    check_mask_token_id(facts)
    text_tokenizer = tokenizer.tokenizer if facts.is_vision else tokenizer
    set_mask_token(text_tokenizer, facts.config.get_text_config().mask_token_id)  # saved, so tools reading it find it
    if card is None:
        card = render_model_card(
            model, repo_id=repo_id, tokenizer=tokenizer, base_model=base_model, merge_adapter=merge_adapter
        )
    api = None if dry_run else HfApi(token=token)
    repo_exists = None if dry_run else check_remote_repo(api, repo_id)  # before writing gigabytes locally

    folder, temporary = prepare_folder(save_directory)
    try:
        save_checkpoint(model, tokenizer, card, folder, merge_adapter=merge_adapter)
    except BaseException:
        if temporary:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    files = list_files(folder)
    if dry_run:
        if temporary:
            shutil.rmtree(folder)
        return PublishResult(repo_id, files, card, None if temporary else folder, None)

    commit_url = upload(
        api, folder, files, repo_id, repo_exists=repo_exists, private=private, revision=revision,
        commit_message=commit_message or default_commit_message(facts.is_adapter),
    )
    if temporary:
        shutil.rmtree(folder)
    return PublishResult(repo_id, files, card, None if temporary else folder, commit_url)


def publish_folder(
    path: str | Path,
    repo_id: str,
    *,
    card: ModelCard | None = None,
    base_model: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    dry_run: bool = False,
) -> PublishResult:
    """Upload a folder written by `save_pretrained` (LLaDA model or LoRA adapter, plus tokenizer) in one commit.

    This is what `llada-hf publish PATH REPO_ID [--private] [--dry-run]` runs. The card is rendered from the
    folder and written to `PATH/README.md`, replacing any README.md there; to keep your own, pass
    `card=ModelCard.load(PATH / "README.md")`. A model folder must contain the bundle's code
    (`save_pretrained` of `LladaForMaskedDiffusion` writes it; of `LladaVForConditionalGeneration`, the vision
    bundle too) and, for LLaDA-V, the processor (`processor.save_pretrained`). `dry_run` writes the card and
    returns the planned files without network access. An adapter folder needs `base_model` (the base's Hub id)
    unless PEFT recorded its base as a Hub id. Other arguments as in `publish`.

    Example:
        ```python
        >>> import tempfile
        >>> from llada_hf import LladaConfig, LladaForMaskedDiffusion
        >>> from llada_hf.hub_card import publish_folder
        >>> from llada_hf.tokenization import model_token_ids, train_tokenizer
        >>> tokenizer = train_tokenizer(["hello world"], vocab_size=280)
        >>> config = LladaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        ...                      num_attention_heads=2, **model_token_ids(tokenizer))
        >>> folder = tempfile.mkdtemp()
        >>> LladaForMaskedDiffusion(config).save_pretrained(folder)
        >>> _ = tokenizer.save_pretrained(folder)
        >>> plan = publish_folder(folder, "alice/tiny-llada", dry_run=True)
        >>> plan.files[:3]
        ['README.md', 'cache_llada.py', 'chat_template.jinja']
        ```
    """
    check_repo_id(repo_id)
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"No such folder: {str(folder)!r}; pass the folder written by save_pretrained.")
    facts = facts_from_folder(folder)  # also refuses a folder that is neither a LLaDA model nor an adapter
    check_folder_complete(folder, facts)
    check_mask_token_id(facts)
    name_folder_mask_token(folder, facts)
    if card is None:
        card = render_model_card(folder, repo_id=repo_id, base_model=base_model)
    api = None if dry_run else HfApi(token=token)
    repo_exists = None if dry_run else check_remote_repo(api, repo_id)
    card.save(folder / "README.md")
    files = list_files(folder)
    if dry_run:
        return PublishResult(repo_id, files, card, folder, None)
    commit_url = upload(
        api, folder, files, repo_id, repo_exists=repo_exists, private=private, revision=revision,
        commit_message=commit_message or default_commit_message(facts.is_adapter),
    )
    return PublishResult(repo_id, files, card, folder, commit_url)


def add_card_and_code(
    folder: str | Path,
    model: Any,
    *,
    repo_id: str,
    tokenizer: Any = None,
    trainer: Any = None,
    **card_options: Any,
) -> ModelCard:
    """Write into `folder` what a Hub upload needs beyond the weights and config: the model card (README.md)
    and, for a full model, the bundle's .py files (for LLaDA-V, the vision bundle's too). Returns the card.

    For trainers, whose own pushes upload `output_dir` with `upload_folder`: transformers writes its own card
    there and, on `hub_strategy` checkpoint pushes, copies only weights and config files into it. Call this
    on `output_dir` before each push (see `DiffusionSFTTrainer`).

    Args:
        folder: the folder to complete (created if missing).
        model, repo_id, tokenizer, trainer, **card_options: as in `render_model_card` (all but `merge_adapter`).

    Example:
        ```python
        >>> import os, tempfile
        >>> from llada_hf import LladaConfig, LladaForMaskedDiffusion
        >>> from llada_hf.hub_card import add_card_and_code
        >>> config = LladaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        ...                      num_attention_heads=4, mask_token_id=63, pad_token_id=0, eos_token_id=1)
        >>> folder = tempfile.mkdtemp()
        >>> card = add_card_and_code(folder, LladaForMaskedDiffusion(config), repo_id="alice/tiny-llada")
        >>> sorted(os.listdir(folder))
        ['README.md', 'cache_llada.py', 'configuration_llada.py', 'decoding_llada.py', 'generation_llada.py',
         'modeling_llada.py', 'policy_llada.py', 'streaming_llada.py']
        ```
    """
    if card_options.get("merge_adapter"):
        raise ValueError(
            "add_card_and_code describes the folder `model.save_pretrained` wrote (for a PEFT model: the adapter). "
            "To publish an adapter merged into its base, use publish(..., merge_adapter=True)."
        )
    card = render_model_card(model, repo_id=repo_id, tokenizer=tokenizer, trainer=trainer, **card_options)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    facts = facts_from_model(model, tokenizer)
    if not facts.is_adapter:
        copy_bundle_files(folder, facts.bundle_files)
    card.save(folder / "README.md")
    return card


# --------------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------------


def check_tokenizer(tokenizer: Any) -> None:
    if tokenizer is None or not hasattr(tokenizer, "save_pretrained"):
        raise ValueError(
            "publish() needs the model's tokenizer (got "
            f"{'None' if tokenizer is None else type(tokenizer).__name__}): a checkpoint without one cannot be "
            "used. Pass the tokenizer you trained or loaded with the model, e.g. AutoTokenizer.from_pretrained(...)."
        )


def check_processor(tokenizer: Any, facts: CheckpointFacts) -> None:
    """A LLaDA-V model is published with its processor: without it the images of a prompt cannot be prepared."""
    if facts.is_vision and not hasattr(tokenizer, "image_processor"):
        raise ValueError(
            f"A LLaDA-V model is published with its processor (LladaVProcessor: image processor, tokenizer and chat "
            f"template), got a {type(tokenizer).__name__}. Pass the processor, e.g. "
            "AutoProcessor.from_pretrained(...) or LladaVProcessor(tokenizer=tokenizer)."
        )


def check_mask_token_id(facts: CheckpointFacts) -> None:
    """A model must know its mask token id: without it the published checkpoint could not generate. (An adapter
    folder carries no config: its base model's is checked when that is published.)"""
    if facts.config is None:
        return
    text_config = facts.config.get_text_config()
    mask_token_id, vocab_size = text_config.mask_token_id, text_config.vocab_size
    if mask_token_id is None or not 0 <= mask_token_id < vocab_size:
        raise ValueError(
            f"The model's `mask_token_id` is {mask_token_id} (vocabulary: {vocab_size} ids), so the published model "
            "could not generate. Set `model.config.mask_token_id` to the id of the tokenizer's mask token "
            "('<|mdm_mask|>') before publishing."
        )


def check_folder_complete(folder: Path, facts: CheckpointFacts) -> None:
    """A model folder needs its bundle code (LLaDA-V: the vision bundle too, and the processor); any folder needs
    the tokenizer."""
    missing = [] if facts.is_adapter else [name for name in facts.bundle_files if not (folder / name).is_file()]
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        missing.append(" or ".join(TOKENIZER_FILES))
    if facts.is_vision and not (folder / PROCESSOR_FILE).is_file():
        missing.append(PROCESSOR_FILE)
    if missing:
        inputs = "processor" if facts.is_vision else "tokenizer"
        raise ValueError(
            f"{folder} lacks {', '.join(missing)}. Save the model with its save_pretrained (it writes the bundle "
            f"code) and the {inputs} with {inputs}.save_pretrained into the same folder."
        )


def check_remote_repo(api: HfApi, repo_id: str) -> bool:
    """Whether `repo_id` exists; refuse one that holds another model type (its config says so)."""
    try:
        info = api.model_info(repo_id)
    except RepositoryNotFoundError:
        return False
    model_type = (info.config or {}).get("model_type")
    if model_type is not None and model_type not in CONFIG_CLASSES:
        raise ValueError(
            f"The Hub repo {repo_id} already holds a model of type {model_type!r}; publishing a LLaDA checkpoint "
            "there would mix two models. Choose another repo id."
        )
    return True


# --------------------------------------------------------------------------------------------------
# Saving and uploading
# --------------------------------------------------------------------------------------------------


def prepare_folder(save_directory: str | Path | None) -> tuple[Path, bool]:
    """The folder to save into and whether it is temporary. A given folder must be empty: what is uploaded is
    the whole folder, and stale files from an earlier save must not ride along."""
    if save_directory is None:
        return Path(tempfile.mkdtemp(prefix="llada-hf-publish-")), True
    folder = Path(save_directory)
    if folder.exists() and any(folder.iterdir()):
        raise ValueError(f"save_directory {folder} is not empty; publish() uploads the whole folder. Use a new one.")
    folder.mkdir(parents=True, exist_ok=True)
    return folder, False


def save_checkpoint(model: Any, tokenizer: Any, card: ModelCard, folder: Path, *, merge_adapter: bool) -> None:
    """Write weights, config, generation config and bundle code (or adapter files), tokenizer and card."""
    # merge_and_unload rewrites the base model's layers in place, so merge a copy: `model` stays usable.
    to_save = copy.deepcopy(model).merge_and_unload() if merge_adapter else model
    to_save.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    card.save(folder / "README.md")  # after save_pretrained: replaces the template card PEFT writes


def name_folder_mask_token(folder: Path, facts: CheckpointFacts) -> None:
    """Rewrite the folder's tokenizer with its mask token named, if it lacks one (see `set_mask_token`)."""
    if facts.config is None:
        return
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.mask_token is None:
        set_mask_token(tokenizer, facts.config.get_text_config().mask_token_id)
        tokenizer.save_pretrained(folder)


def default_commit_message(is_adapter: bool) -> str:
    return f"Upload LLaDA {'adapter' if is_adapter else 'model'} with llada-hf"


def list_files(folder: Path) -> list[str]:
    return sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file())


def upload(
    api: HfApi,
    folder: Path,
    files: list[str],
    repo_id: str,
    *,
    repo_exists: bool,
    private: bool | None,
    revision: str | None,
    commit_message: str,
) -> str:
    """Create the repo (and branch) if needed and commit `files` of `folder` in one commit; return its URL."""
    try:
        if not repo_exists:
            api.create_repo(repo_id, private=private, exist_ok=True)
        if revision is not None:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=folder / name) for name in files]
        commit = api.create_commit(repo_id, operations, commit_message=commit_message, revision=revision)
    except Exception as error:  # whatever broke (HTTP status, connection, server reply), say where the files are
        cause = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        # One line: the CLI shows only the first line of an error (the full cause stays chained).
        raise PublishError(
            f"Uploading to {repo_id} failed ({cause}). Nothing was committed; the files are kept in {folder}: "
            f"retry with `llada-hf publish {folder} {repo_id}` or publish_folder({str(folder)!r}, {repo_id!r})."
        ) from error
    return commit.commit_url
