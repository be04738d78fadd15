"""The export as a transformers 4.x tool reads it: the tokenizer of an official-layout export loads under
transformers 4.46.3 (the version of the official LLaDA `generate.py`) with the same ids, special tokens and chat
template as ours.

transformers 4.46.3 lives in `.transformers4/` beside the project (with its tokenizers and huggingface_hub), put
there by the README's test command; it is imported in a subprocess whose import path puts it first."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llada_hf.export import export_official


TRANSFORMERS4 = Path(__file__).resolve().parents[1] / ".transformers4"
pytestmark = pytest.mark.skipif(not (TRANSFORMERS4 / "transformers").is_dir(),
                                reason="transformers 4.46.3 is not installed in .transformers4/ (the README's test "
                                       "command installs it)")

READ_WITH_TRANSFORMERS4 = """
import json, sys
sys.modules["llada_hf"] = None  # a 4.x tool has no llada_hf
import transformers
from transformers import AutoTokenizer
folder, messages, text = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
tokenizer = AutoTokenizer.from_pretrained(folder)
print(json.dumps({
    "version": transformers.__version__, "class": type(tokenizer).__name__, "ids": tokenizer(text).input_ids,
    "chat": tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
    "special": {"bos": tokenizer.bos_token, "eos": tokenizer.eos_token, "pad": tokenizer.pad_token,
                "mask": tokenizer.mask_token, "mask_id": tokenizer.mask_token_id,
                "additional": tokenizer.additional_special_tokens},
}))
"""


def test_exported_tokenizer_loads_under_transformers_4(tmp_path, text_tokenizer, text_model):
    folder = export_official(text_model, tmp_path / "exported", text_tokenizer)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What follows lomi?"}]
    text = "After lomi comes vuku.<|eot_id|>"
    env = dict(os.environ, PYTHONPATH=str(TRANSFORMERS4), HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-c", READ_WITH_TRANSFORMERS4, str(folder), json.dumps(messages), text],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    read = json.loads(result.stdout.strip().splitlines()[-1])
    assert read["version"] == "4.46.3" and read["class"] == "PreTrainedTokenizerFast"
    assert read["ids"] == text_tokenizer(text).input_ids
    assert read["chat"] == text_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert read["special"] == {
        "bos": text_tokenizer.bos_token, "eos": text_tokenizer.eos_token, "pad": text_tokenizer.pad_token,
        "mask": "<|mdm_mask|>", "mask_id": text_model.config.mask_token_id,
        "additional": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
    }
