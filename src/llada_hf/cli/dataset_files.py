"""The datasets `train` and `tune` read: a .json/.jsonl/.parquet file or a `save_to_disk` folder, checked before it is
read (no download)."""

import json
import os

from datasets import Image, load_dataset, load_from_disk

from llada_hf_cli import CliError


DATASET_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
IMAGE_COLUMNS = ("image", "images")  # TRL's vision formats


def load_local_dataset(path: str, split: str = "train"):
    """A datasets.Dataset from a .json/.jsonl/.parquet file or a `save_to_disk` folder (no download)."""
    check_dataset_path(path)
    if os.path.isdir(path):
        data = load_from_disk(path)
        return data[split] if hasattr(data, "keys") and split in data else data
    builder = DATASET_BUILDERS[os.path.splitext(path)[1].lower()]
    dataset = load_dataset(builder, data_files={split: path}, split=split)
    return resolve_image_paths(dataset, os.path.dirname(os.path.abspath(path)))


def check_dataset_path(path: str) -> None:
    """A `save_to_disk` folder, or an existing .json/.jsonl/.parquet file whose JSON parses."""
    if os.path.isdir(path):
        return
    extension = os.path.splitext(path)[1].lower()
    if extension not in DATASET_BUILDERS:
        raise CliError(f"--dataset_path {path!r}: use a .json, .jsonl or .parquet file or a datasets folder.")
    if not os.path.isfile(path):
        raise CliError(f"--dataset_path {path!r} does not exist.")
    if DATASET_BUILDERS[extension] == "json":
        check_json_records(path)


def check_json_records(path: str) -> None:
    """A JSON document, or JSON lines with one object per line, with at least one record; else name the file and
    the first bad line."""
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
    except UnicodeDecodeError as error:
        raise CliError(f"{path} is not UTF-8 text (byte {error.start}: {error.reason}); save it as UTF-8.") from None
    if not text.strip():
        raise CliError(f"{path} is empty: write one JSON record per line.")
    try:
        json.loads(text)  # a whole JSON document (datasets reads a list of records or a dict of columns)
        return
    except json.JSONDecodeError:
        pass
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            check_json_line(path, number, line)


def check_json_line(path: str, number: int, line: str) -> None:
    """One line of a JSON-lines file: a JSON object."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise CliError(f"--dataset_path {path}: line {number} is not valid JSON ({error.msg}, column "
                       f"{error.colno}).") from None
    if not isinstance(record, dict):
        raise CliError(f"--dataset_path {path}: line {number} is a JSON {type(record).__name__}, not an object "
                       '({"prompt": ..., "completion": ...}).')


def resolve_image_paths(dataset, folder: str):
    """Image paths of a dataset file's rows (`image` / `images` columns: paths, or `{"bytes", "path"}` records as
    `datasets` writes them) read relative to the file's folder, as `datasets` reads the paths of an image folder's
    metadata.jsonl, not relative to where the command runs; absolute paths are kept. (A `datasets` Image column is
    left alone: its images are stored or resolved by `datasets`.)"""
    columns = [name for name in IMAGE_COLUMNS
               if name in dataset.column_names and not _decodes_images(dataset.features[name])]
    if not columns:
        return dataset
    return dataset.map(_resolve_row, fn_kwargs={"columns": columns, "folder": folder}, desc="Resolving image paths")


def _decodes_images(feature) -> bool:
    if isinstance(feature, Image):
        return True
    if isinstance(feature, (list, tuple)):
        return any(_decodes_images(item) for item in feature)
    if isinstance(feature, dict):
        return any(_decodes_images(item) for item in feature.values())
    return hasattr(feature, "feature") and _decodes_images(feature.feature)  # List / Sequence


def _resolve_row(row: dict, columns: list[str], folder: str) -> dict:
    return {name: _resolve_path(row[name], folder) for name in columns}


def _resolve_path(value, folder: str):
    if isinstance(value, list):
        return [_resolve_path(item, folder) for item in value]
    if isinstance(value, dict) and not value.get("bytes"):
        return {**value, "path": _resolve_path(value.get("path"), folder)}
    if isinstance(value, str) and value and not os.path.isabs(value):
        return os.path.join(folder, value)
    return value
