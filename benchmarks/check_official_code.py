"""The official export against the official LLaDA code itself (issue 25): logits, `generate()` tokens, tokenizer.

CI cannot fetch the official code (no network) and this repository may not ship it, so this is a script run by
hand, whose result is recorded in benchmarks/RESULTS.md. It takes the official files' locations as arguments:

    python benchmarks/check_official_code.py \\
        --official-code DIR            # holds the official configuration_llada.py and modeling_llada.py
        --official-generate FILE       # the official generate.py (ML-GSAI/LLaDA)
        [--official-likelihood FILE]   # the official get_log_likelihood.py (optional extra check)
        [--transformers4 .transformers4] [--out benchmarks/outputs/official_code.json]

What it does:

1. Builds tiny LLaDA models with llada-hf (hidden 64, 2 layers, 4 heads, no GQA; random weights with random norm
   scales, so every weight matters): `untied` and `tied` (tied embeddings) with a vocabulary trained by
   `llada_hf.tokenization.train_tokenizer` (LLaDA's special tokens and chat template); `lora-merged`, a LoRA
   adapter (random A and B) on `untied`; and `llada-ids`, a model with LLaDA-8B's vocabulary size and special
   ids (the official `generate()` hard-codes EOS 126081 and EoT 126348 for `logits_eos_inf` and
   `confidence_eos_eot_inf`), whose EOS/EoT head rows are boosted so that those options decide tokens.
   Each is saved with `save_pretrained` and exported with the command line, `llada-hf export SAVED OUT --format
   official` (the adapter folder directly, which merges it; `llada-ids` has no tokenizer, which the command
   needs, so it goes through `llada_hf.export.export_official`).
2. Copies the official modeling/config files next to a copy of each export and points its `auto_map` at them;
   then, in a subprocess whose import path puts transformers 4.46.3 first (and where `import llada_hf` fails),
   loads it with `AutoModel.from_pretrained(..., trust_remote_code=True)` (the official `LLaDAModelLM`), renders
   the chat prompts with the exported tokenizer (`AutoTokenizer`, as the official generate.py does: left
   padding, `add_special_tokens=False`), computes fp32 logits, and runs the official `generate()` for each
   setting below; sampled settings once per seed (`torch.manual_seed`).
3. Here (llada-hf, transformers 5): loads the export and the saved folder with llada-hf's classes, computes the
   same logits and `model.generate(...)`, and compares.

Comparisons and their tolerance:
- logits: max |official - llada-hf| over non-padding positions <= LOGIT_ULPS * eps32 * max|logit| (eps32 =
  2^-23: one float32 rounding at the largest logit). The two implementations run the same float32 operations in
  a different order (their own matmul/attention calls), so they may differ by a few roundings; a real mismatch
  (norm, rotary layout, mask, head) is O(1) relative. Padding positions (attention 0) are reported, not compared:
  no output there is used.
- greedy `generate()` (temperature 0): tokens equal per row, prompt + answer.
- sampled `generate()` (random remasking, temperature > 0): not comparable token for token, by design: the
  official code draws its noise with the global generator over the full [B, L, V] (candidates, float64) and
  [B, L] (random scores, float32) tensors, llada-hf with its `generator` over the active window only (and the
  random scores in float64). Both sample the same distribution (Gumbel-max: argmax exp(l)/(-log U)^T =
  argmax l/T - log(-log U)), so the check is distributional: N generations per sampler (one per seed), the
  mean total variation distance between their per-position token frequencies, and a permutation test of it
  (whole generations shuffled between the two samples). Beside it: two independent sets of official seeds (what
  agreement looks like), and a control, llada-hf with one setting changed (2 tokens per step; temperature 1/T),
  which the test must detect, so that a pass is not merely a weak test.
- tokenizer: ids, attention masks, chat text and special tokens equal under 4.46.3 and 5.x.
- log-likelihood (with --official-likelihood): one-token answers are exact in both (every row masks the single
  token), compared to float tolerance; a 4-token answer is compared statistically against the estimator's exact
  expectation (`llada_reference.exact_expected_estimate`, every mask pattern enumerated).
"""

import argparse
import hashlib
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


OFFICIAL_CODE_FILES = ("configuration_llada.py", "modeling_llada.py")
LOCAL_AUTO_MAP = {
    "AutoConfig": "configuration_llada.LLaDAConfig",
    "AutoModel": "modeling_llada.LLaDAModelLM",
    "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
}
EPS32 = float(torch.finfo(torch.float32).eps)
LOGIT_ULPS = 64

CORPUS = [
    "The sea is calm tonight. The tide is full, the moon lies fair upon the straits.",
    "A masked diffusion model fills in the blanks of a sentence, many at a time.",
    "Lily can run 12 kilometers per hour for 4 hours. How many kilometers can she run?",
    "Joy can read 8 pages of a book in 20 minutes. How long will 120 pages take?",
    "Write a short poem about the sea, the wind and the stars over the harbour.",
] * 4
MESSAGES = [
    [{"role": "user", "content": "Write a short poem about the sea."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "How many kilometers can Lily run?"}],
    [{"role": "user", "content": "  Hi!  "}],  # trimmed by the template; the shortest row: the most padding
]
PROBE_TEXT = "After the tide <|mdm_mask|> comes the moon.<|eot_id|><|endoftext|>"

# Greedy settings: official `generate()` keywords. "batch": "padded" (3 chat prompts, left-padded, attention
# mask) or "single" (the first prompt alone, no attention mask).
GREEDY = [
    {"name": "one block", "steps": 16, "gen_length": 16, "block_length": 16},
    {"name": "semi-AR 4 blocks", "steps": 32, "gen_length": 32, "block_length": 8},
    {"name": "uneven schedule", "steps": 10, "gen_length": 24, "block_length": 12},  # 12 tokens in 5 steps
    {"name": "cfg 1.5", "steps": 16, "gen_length": 16, "block_length": 8, "cfg_scale": 1.5},
    {"name": "single, no mask", "steps": 12, "gen_length": 12, "block_length": 4, "batch": "single"},
]
# For `llada-ids` only: the options whose official code hard-codes LLaDA-8B's EOS / EoT ids.
GREEDY_LLADA_IDS = [
    {"name": "one block", "steps": 16, "gen_length": 16, "block_length": 16},
    {"name": "semi-AR, no option", "steps": 16, "gen_length": 16, "block_length": 8},  # the two below, without
    {"name": "logits_eos_inf", "steps": 16, "gen_length": 16, "block_length": 8, "logits_eos_inf": True},
    {"name": "confidence_eos_eot_inf", "steps": 16, "gen_length": 16, "block_length": 8,
     "confidence_eos_eot_inf": True},
]
# Sampled settings, each with a control: llada-hf run with one thing changed, a difference the test must detect.
SAMPLED = [
    {"name": "random remasking", "steps": 8, "gen_length": 8, "block_length": 4, "remasking": "random",
     "control": {"steps": 4}},  # two tokens per step instead of one
    {"name": "temperature 0.8", "steps": 8, "gen_length": 8, "block_length": 4, "temperature": 0.8,
     "control": {"temperature": 1.25}},  # 1/T: the temperature multiplying the logits instead of dividing
]
PERMUTATIONS = 1000
P_AGREE = 0.01  # official vs llada-hf must not differ at this level; the control must
LLADA_IDS = {"vocab_size": 126464, "bos_token_id": 126080, "eos_token_id": 126081, "pad_token_id": 126081,
             "mask_token_id": 126336}
LLADA_EOT = 126348
BOOST = 4.0  # scale of the EOS and EoT rows of llada-ids's head


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official-code", required=True, type=Path,
                        help="folder with the official configuration_llada.py and modeling_llada.py")
    parser.add_argument("--official-generate", required=True, type=Path, help="the official generate.py")
    parser.add_argument("--official-likelihood", type=Path, help="the official get_log_likelihood.py (optional)")
    parser.add_argument("--transformers4", type=Path, default=Path(__file__).resolve().parents[1] / ".transformers4",
                        help="a --target install of transformers 4.x (put first on the worker's PYTHONPATH)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/outputs/official_code.json"))
    parser.add_argument("--work-dir", type=Path, help="keep the models and exports here (default: a temp folder)")
    parser.add_argument("--seeds", type=int, default=200, help="seeds per sampler for the sampled settings")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in both processes")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)  # internal: the transformers 4 side
    return parser.parse_args()


# ================================================================================================
# The official side: runs under transformers 4.x, without llada_hf
# ================================================================================================


def _import_file(path: Path, name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def official_worker(spec_path: Path) -> None:
    """Load each prepared export with the official code and write logits, tokens and tokenizer output."""
    sys.modules["llada_hf"] = None  # a 4.x tool has no llada_hf: importing it here must fail
    import transformers
    from transformers import AutoModel, AutoTokenizer

    spec = json.loads(spec_path.read_text())
    torch.set_num_threads(spec["threads"])
    official_generate = _import_file(Path(spec["official_generate"]), "official_generate").generate
    likelihood = spec.get("official_likelihood")
    get_log_likelihood = _import_file(Path(likelihood), "official_likelihood").get_log_likelihood if likelihood \
        else None
    arrays, info = {}, {"transformers": transformers.__version__, "torch": torch.__version__, "models": {}}
    for entry in spec["models"]:
        name, folder = entry["name"], entry["folder"]
        model, loading = AutoModel.from_pretrained(folder, trust_remote_code=True, torch_dtype=torch.float32,
                                                   output_loading_info=True)
        model.eval()
        record = {"class": f"{type(model).__module__}.{type(model).__qualname__}",
                  "code_file": sys.modules[type(model).__module__].__file__,
                  "loading_info": {key: sorted(map(str, value)) for key, value in loading.items()}}
        if entry["tokenizer"]:
            tokenizer = AutoTokenizer.from_pretrained(folder)
            special = _special_tokens(tokenizer)
            tokenizer.padding_side = "left"  # as the official generate.py
            texts = [tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False)
                     for m in spec["messages"]]
            encoded = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
            input_ids, attention_mask = encoded["input_ids"], encoded["attention_mask"]
            record["tokenizer"] = {
                "class": type(tokenizer).__name__, "chat_texts": texts, "input_ids": input_ids.tolist(),
                "attention_mask": attention_mask.tolist(), "probe_ids": tokenizer(spec["probe"]).input_ids,
                "probe_decoded": tokenizer.decode(tokenizer(spec["probe"]).input_ids),
                "special": special,
            }
        else:
            input_ids = torch.tensor(entry["input_ids"])
            attention_mask = torch.tensor(entry["attention_mask"])
        mask_id = entry["mask_token_id"]
        with torch.no_grad():
            single = input_ids[:1, int((attention_mask[0] == 0).sum()):]
            canvas = torch.cat([input_ids, torch.full((len(input_ids), 16), mask_id)], 1)
            canvas_mask = torch.cat([attention_mask, torch.ones(len(input_ids), 16, dtype=attention_mask.dtype)], 1)
            arrays[f"{name}/logits/prompt"] = model(input_ids, attention_mask=attention_mask).logits.numpy()
            arrays[f"{name}/logits/canvas"] = model(canvas, attention_mask=canvas_mask).logits.numpy()
            arrays[f"{name}/logits/single"] = model(single).logits.numpy()
        record["generate_seconds"] = {}
        for index, setting in enumerate(entry["greedy"]):
            start = time.perf_counter()
            ids, mask = (single, None) if setting.get("batch") == "single" else (input_ids, attention_mask)
            out = official_generate(model, ids, mask, mask_id=mask_id, **_generate_kwargs(setting))
            arrays[f"{name}/greedy/{index}"] = out.numpy()
            record["generate_seconds"][setting["name"]] = time.perf_counter() - start
        for index, setting in enumerate(entry["sampled"]):
            start = time.perf_counter()
            outs = []
            for seed in range(2 * spec["seeds"]):  # two independent sets: the second shows what agreement is
                torch.manual_seed(seed)
                outs.append(official_generate(model, input_ids, attention_mask, mask_id=mask_id,
                                              **_generate_kwargs(setting)).numpy())
            arrays[f"{name}/sampled/{index}"] = np.stack(outs)
            record["generate_seconds"][setting["name"]] = time.perf_counter() - start
        if entry.get("likelihood") and get_log_likelihood is not None:
            record["likelihood"] = _official_likelihood(get_log_likelihood, model, spec["likelihood"], mask_id)
        info["models"][name] = record
    np.savez(spec["arrays"], **arrays)
    Path(spec["info"]).write_text(json.dumps(info, indent=2))


def _generate_kwargs(setting: dict) -> dict:
    """The official `generate()` keywords of a setting (its defaults for the rest)."""
    keys = ("steps", "gen_length", "block_length", "temperature", "cfg_scale", "remasking", "logits_eos_inf",
            "confidence_eos_eot_inf")
    return {key: setting[key] for key in keys if key in setting}


def _official_likelihood(get_log_likelihood, model, plan: dict, mask_id: int) -> dict:
    prompt = torch.tensor(plan["prompt"])
    result = {}
    for cfg in plan["cfg_scales"]:  # one-token answers: every row masks the token, so the estimate is exact
        result[f"one_token_cfg{cfg}"] = get_log_likelihood(model, prompt, torch.tensor(plan["one_token"]),
                                                           mc_num=16, batch_size=16, cfg_scale=cfg, mask_id=mask_id)
    groups = []
    for seed in range(plan["groups"]):  # one call = one stratified group of `batch_size` rows
        torch.manual_seed(seed)
        groups.append(get_log_likelihood(model, prompt, torch.tensor(plan["answer"]), mc_num=plan["batch_size"],
                                         batch_size=plan["batch_size"], mask_id=mask_id))
    result["groups"] = groups
    return result


def _special_tokens(tokenizer) -> dict:
    """Special tokens and ids, and the saved padding side. The extra special tokens are
    `additional_special_tokens` in transformers 4.x and `extra_special_tokens` in 5.x."""
    extra = getattr(tokenizer, "additional_special_tokens", None)
    if extra is None:
        extra = tokenizer.extra_special_tokens
    return {"bos": [tokenizer.bos_token, tokenizer.bos_token_id], "eos": [tokenizer.eos_token, tokenizer.eos_token_id],
            "pad": [tokenizer.pad_token, tokenizer.pad_token_id],
            "mask": [tokenizer.mask_token, tokenizer.mask_token_id], "extra": list(extra),
            "padding_side_saved": tokenizer.padding_side}


# ================================================================================================
# The llada-hf side
# ================================================================================================


def randomise(model, seed: int) -> None:
    """Weights ~ N(0, 1/fan_in), norm scales ~ U(0.5, 1.5): logits of order one, every weight matters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() == 1:
                parameter.copy_(0.5 + torch.rand(parameter.shape, generator=generator))
            else:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) / math.sqrt(parameter.shape[1]))


def tiny_config(tokenizer_ids: dict, tied: bool):
    from llada_hf import LladaConfig

    return LladaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=4, max_position_embeddings=256, tie_word_embeddings=tied, **tokenizer_ids)


def llada_hf_cli() -> list[str]:
    script = Path(sys.executable).with_name("llada-hf")
    return [str(script)] if script.exists() else [sys.executable, "-m", "llada_hf.cli"]


def build_models(work: Path) -> tuple[list[dict], object]:
    """Save, adapt and export the models; return their descriptions (and the tokenizer)."""
    from llada_hf import LladaForMaskedDiffusion
    from llada_hf.export import export_official
    from llada_hf.tokenization import model_token_ids, train_tokenizer

    tokenizer = train_tokenizer(CORPUS, vocab_size=320)
    models = []
    for name, tied, seed in (("untied", False, 0), ("tied", True, 1)):
        torch.manual_seed(seed)
        model = LladaForMaskedDiffusion(tiny_config(model_token_ids(tokenizer), tied)).eval()
        randomise(model, seed)
        saved = work / f"{name}-saved"
        model.save_pretrained(saved)
        tokenizer.save_pretrained(saved)
        models.append({"name": name, "saved": saved, "export": work / f"{name}-official", "tokenizer": True})

    # A LoRA adapter on `untied` with random A and B (PEFT's default B = 0 would merge to the base itself).
    from peft import LoraConfig, get_peft_model

    base = LladaForMaskedDiffusion.from_pretrained(work / "untied-saved")
    torch.manual_seed(2)
    lora = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                           target_modules=["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]))
    adapter = work / "lora-adapter"
    lora.save_pretrained(adapter)  # base_model_name_or_path: the saved `untied` folder
    models.append({"name": "lora-merged", "saved": adapter, "export": work / "lora-merged-official",
                   "tokenizer": True})

    for entry in models:  # the command line, from the saved folder
        command = llada_hf_cli() + ["export", str(entry["saved"]), str(entry["export"]), "--format", "official"]
        subprocess.run(command, check=True, capture_output=True, text=True)
        entry["export_command"] = f"llada-hf export {entry['saved'].name} {entry['export'].name} --format official"

    # LLaDA-8B's vocabulary size and special ids, EOS and EoT rows of the head boosted (x BOOST) so that they are the
    # argmax at some positions: the official options that hard-code those ids then change tokens.
    torch.manual_seed(3)
    model = LladaForMaskedDiffusion(tiny_config(LLADA_IDS, tied=False)).eval()
    randomise(model, 3)
    with torch.no_grad():
        for token in (LLADA_IDS["eos_token_id"], LLADA_EOT):
            model.lm_head.weight[token] *= BOOST
    saved = work / "llada-ids-saved"
    model.save_pretrained(saved)
    export_official(model, work / "llada-ids-official")  # no tokenizer: the command line needs one
    models.append({"name": "llada-ids", "saved": saved, "export": work / "llada-ids-official", "tokenizer": False,
                   "export_command": "export_official(model, folder)"})
    return models, tokenizer


def with_official_code(export: Path, official_code: Path, work: Path) -> Path:
    """A copy of `export` with the official code beside it and `auto_map` pointing at those local files."""
    folder = work / f"{export.name}+official-code"
    shutil.copytree(export, folder)
    for file in OFFICIAL_CODE_FILES:
        shutil.copy(official_code / file, folder / file)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = dict(LOCAL_AUTO_MAP)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder


def run_worker(args, spec: dict, work: Path) -> tuple[dict, dict]:
    spec_path = work / "worker_spec.json"
    spec_path.write_text(json.dumps(spec, default=str))
    env = dict(os.environ, PYTHONPATH=str(args.transformers4.resolve()), HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", HF_MODULES_CACHE=str(work / "hf_modules"), OMP_NUM_THREADS=str(args.threads))
    result = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--official-code", str(args.official_code),
                             "--official-generate", str(args.official_generate), "--worker", str(spec_path)],
                            capture_output=True, text=True, env=env)
    if result.returncode != 0:
        sys.exit(f"The official (transformers 4) worker failed:\n{result.stderr[-6000:]}")
    arrays = dict(np.load(spec["arrays"]))
    return arrays, json.loads(Path(spec["info"]).read_text())


def logit_diff(ours: torch.Tensor, official: np.ndarray, attended: torch.Tensor) -> dict:
    """Max |difference| on attended positions, its tolerance, and the same on padding (reported only)."""
    official = torch.from_numpy(official)
    diff = (ours.float() - official).abs().amax(-1)  # [B, L]
    scale = float(official[attended].abs().max())
    tolerance = LOGIT_ULPS * EPS32 * scale
    on_tokens = float(diff[attended].max())
    on_padding = float(diff[~attended].max()) if (~attended).any() else 0.0
    return {"max_abs_diff": on_tokens, "tolerance": tolerance, "max_abs_logit": scale,
            "diff_in_eps_x_max_logit": on_tokens / (EPS32 * scale), "bitwise_equal": on_tokens == 0.0,
            "max_abs_diff_padding": on_padding, "ok": on_tokens <= tolerance}


def our_generate(model, input_ids, attention_mask, setting: dict, generator=None) -> torch.Tensor:
    kwargs = {"max_new_tokens": setting["gen_length"], "steps": setting["steps"],
              "block_length": setting["block_length"], "temperature": setting.get("temperature", 0.0),
              "remasking": setting.get("remasking", "low_confidence"), "cfg_scale": setting.get("cfg_scale", 0.0),
              "logits_eos_inf": setting.get("logits_eos_inf", False),
              "confidence_eos_eot_inf": setting.get("confidence_eos_eot_inf", False)}
    return model.generate(input_ids, attention_mask=attention_mask, generator=generator, **kwargs)


def mean_total_variation(first: np.ndarray, second: np.ndarray) -> float:
    """Mean over (row, answer position) of the total variation distance between the token frequencies of two
    [N, B, G] samples."""
    _, codes = np.unique(np.concatenate([first, second]), return_inverse=True)
    codes = codes.reshape(len(first) + len(second), -1)  # [N1 + N2, B * G], tokens numbered 0..K-1
    size = int(codes.max()) + 1
    a, b = codes[: len(first)], codes[len(first):]
    offsets = np.arange(a.shape[1]) * size  # one histogram per (row, position)
    count_a = np.bincount((a + offsets).ravel(), minlength=size * a.shape[1]).reshape(a.shape[1], size)
    count_b = np.bincount((b + offsets).ravel(), minlength=size * b.shape[1]).reshape(b.shape[1], size)
    return float(0.5 * np.abs(count_a / len(a) - count_b / len(b)).sum(1).mean())


def permutation_test(first: np.ndarray, second: np.ndarray, permutations: int = PERMUTATIONS) -> dict:
    """Are two samples of generations ([N, B, G], one generation per seed) from the same distribution?

    Statistic: `mean_total_variation`; its null distribution: the same statistic after shuffling whole
    generations between the two samples (exchangeable when both samplers draw from one distribution; a
    generation's positions stay together, so their dependence needs no model). p = (1 + #{shuffled >= observed})
    / (1 + permutations)."""
    observed = mean_total_variation(first, second)
    both, rng = np.concatenate([first, second]), np.random.default_rng(0)
    exceed = 0
    for _ in range(permutations):
        order = rng.permutation(len(both))
        exceed += int(mean_total_variation(both[order[: len(first)]], both[order[len(first):]]) >= observed)
    return {"mean_total_variation": observed, "p": (1 + exceed) / (1 + permutations)}


def compare(args, models: list[dict], tokenizer, arrays: dict, info: dict) -> dict:
    from transformers import AutoTokenizer

    from llada_hf import LladaForMaskedDiffusion

    results = {"logits": [], "greedy": [], "sampled": [], "tokenizer": [], "likelihood": [], "loading": {}}
    for entry in models:
        name, record = entry["name"], info["models"][entry["name"]]
        results["loading"][name] = {"official_class": record["class"], "official_code_file": record["code_file"],
                                    "official_loading_info": record["loading_info"]}
        exported = LladaForMaskedDiffusion.from_pretrained(entry["export"]).eval()
        if name == "lora-merged":  # the merged model in memory, as llada-hf users merge it
            from peft import PeftModel

            base = LladaForMaskedDiffusion.from_pretrained(entry["saved"].parent / "untied-saved")
            saved = PeftModel.from_pretrained(base, entry["saved"]).merge_and_unload().eval()
        else:
            saved = LladaForMaskedDiffusion.from_pretrained(entry["saved"]).eval()
        if entry["tokenizer"]:
            ours_tok = AutoTokenizer.from_pretrained(entry["export"])
            results["tokenizer"].append(compare_tokenizer(name, ours_tok, record["tokenizer"], entry))
            official_tok = record["tokenizer"]
            input_ids = torch.tensor(official_tok["input_ids"])
            attention_mask = torch.tensor(official_tok["attention_mask"])
        else:
            input_ids, attention_mask = torch.tensor(entry["input_ids"]), torch.tensor(entry["attention_mask"])
        mask_id = exported.config.mask_token_id
        single = input_ids[:1, int((attention_mask[0] == 0).sum()):]
        canvas = torch.cat([input_ids, torch.full((len(input_ids), 16), mask_id)], 1)
        canvas_mask = torch.cat([attention_mask, torch.ones(len(input_ids), 16, dtype=attention_mask.dtype)], 1)
        inputs = {"prompt": (input_ids, attention_mask), "canvas": (canvas, canvas_mask), "single": (single, None)}
        for which, model in (("export", exported), ("saved", saved)):
            for input_name, (ids, mask) in inputs.items():
                with torch.no_grad():
                    logits = model(ids, attention_mask=mask).logits
                attended = mask.bool() if mask is not None else torch.ones(ids.shape, dtype=torch.bool)
                row = logit_diff(logits, arrays[f"{name}/logits/{input_name}"], attended)
                results["logits"].append({"model": name, "llada_hf_from": which, "input": input_name,
                                          "shape": list(logits.shape), **row})
        for index, setting in enumerate(entry["greedy"]):
            official = arrays[f"{name}/greedy/{index}"]
            ids, mask = (single, None) if setting.get("batch") == "single" else (input_ids, attention_mask)
            for which, model in (("export", exported), ("saved", saved)):
                ours = our_generate(model, ids, mask, setting).numpy()
                equal_rows = [bool(np.array_equal(o, t)) for o, t in zip(official, ours)]
                row = {"model": name, "llada_hf_from": which, "setting": setting["name"], "rows": len(ours),
                       "rows_equal": sum(equal_rows), "ok": all(equal_rows) and ours.shape == official.shape}
                if name == "llada-ids":
                    answer = official[:, ids.shape[1]:]
                    row["official_eos_eot_share"] = float(np.isin(answer, [LLADA_IDS["eos_token_id"],
                                                                           LLADA_EOT]).mean())
                    if setting.get("logits_eos_inf") or setting.get("confidence_eos_eot_inf"):
                        baseline = next(i for i, s in enumerate(entry["greedy"]) if s["name"] == "semi-AR, no option")
                        row["option_changed_official_tokens"] = not np.array_equal(
                            official, arrays[f"{name}/greedy/{baseline}"])
                if not row["ok"]:
                    row["first_difference"] = first_difference(official, ours)
                results["greedy"].append(row)
        for index, setting in enumerate(entry["sampled"]):
            official = arrays[f"{name}/sampled/{index}"]  # [2N, B, L]
            seeds, prompt_length = args.seeds, input_ids.shape[1]
            ours = np.stack([our_generate(exported, input_ids, attention_mask, setting,
                                          torch.Generator().manual_seed(seed)).numpy() for seed in range(seeds)])
            control_setting = {**setting, **setting["control"]}
            control = np.stack([our_generate(exported, input_ids, attention_mask, control_setting,
                                             torch.Generator().manual_seed(10**6 + seed)).numpy()
                                for seed in range(seeds)])
            official_a, official_b = official[:seeds, :, prompt_length:], official[seeds:, :, prompt_length:]
            ours, control = ours[:, :, prompt_length:], control[:, :, prompt_length:]
            agree, detect = permutation_test(official_a, ours), permutation_test(official_a, control)
            results["sampled"].append({
                "model": name, "setting": setting["name"], "seeds": seeds, "permutations": PERMUTATIONS,
                "official_vs_llada_hf": agree, "official_vs_official": permutation_test(official_a, official_b),
                "control": setting["control"], "official_vs_llada_hf_control": detect,
                "distinct_answers_official": len({a.tobytes() for a in official_a}),
                "distinct_answers_llada_hf": len({a.tobytes() for a in ours}),
                "ok": agree["p"] > P_AGREE and detect["p"] < P_AGREE,
            })
        if "likelihood" in record:
            results["likelihood"] = compare_likelihood(exported, record["likelihood"], args.likelihood_plan)
    return results


def first_difference(official: np.ndarray, ours: np.ndarray) -> dict:
    row, column = (int(i[0]) for i in np.nonzero(official != ours))
    return {"row": row, "position": column, "official": int(official[row, column]), "llada_hf": int(ours[row, column])}


def compare_tokenizer(name: str, ours, official: dict, entry: dict) -> dict:
    special = _special_tokens(ours)
    ours.padding_side = "left"
    texts = [ours.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in MESSAGES]
    encoded = ours(texts, add_special_tokens=False, padding=True, return_tensors="pt")
    probe = ours(PROBE_TEXT).input_ids
    checks = {
        "chat_text": texts == official["chat_texts"],
        "input_ids": encoded["input_ids"].tolist() == official["input_ids"],
        "attention_mask": encoded["attention_mask"].tolist() == official["attention_mask"],
        "probe_ids": probe == official["probe_ids"],
        "probe_decoded": ours.decode(probe) == official["probe_decoded"],
        "special_tokens": special == official["special"],
    }
    return {"model": name, "official_class": official["class"], **checks, "ok": all(checks.values()),
            "official_special": official["special"]}


def compare_likelihood(model, official: dict, plan: dict) -> list[dict]:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from llada_reference import exact_expected_estimate, model_logits_fn

    from llada_hf.evaluation import log_likelihood

    rows = []
    for cfg in plan["cfg_scales"]:
        ours = log_likelihood(model, [plan["prompt"]], [plan["one_token"]], cfg_scale=cfg)[0]
        theirs = official[f"one_token_cfg{cfg}"]
        tolerance = LOGIT_ULPS * EPS32 * max(1.0, abs(theirs))
        rows.append({"check": f"one-token answer, cfg {cfg}", "official": theirs, "llada_hf": ours,
                     "abs_diff": abs(ours - theirs), "tolerance": tolerance, "ok": abs(ours - theirs) <= tolerance})
    exact = exact_expected_estimate(model_logits_fn(model), model.config.mask_token_id, plan["prompt"],
                                    plan["answer"], [plan["batch_size"]])
    groups = np.array(official["groups"])
    official_mean, official_se = float(groups.mean()), float(groups.std(ddof=1) / math.sqrt(len(groups)))
    mc_num = plan["groups"] * plan["batch_size"]
    (ours,), (ours_se,) = log_likelihood(model, [plan["prompt"]], [plan["answer"]], mc_num=mc_num,
                                         batch_size=plan["batch_size"], generator=torch.Generator().manual_seed(0),
                                         return_stderr=True)
    for who, value, se in (("official", official_mean, official_se), ("llada_hf", ours, ours_se)):
        z = (value - exact) / se
        rows.append({"check": f"{len(plan['answer'])}-token answer, mc_num {mc_num}: {who} vs exact expectation",
                     "estimate": value, "stderr": se, "exact_expectation": exact, "z": z, "ok": abs(z) < 4})
    return rows


def describe_sources(args) -> dict:
    files = [args.official_code / f for f in OFFICIAL_CODE_FILES] + [args.official_generate]
    files += [args.official_likelihood] if args.official_likelihood else []
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def print_table(results: dict) -> None:
    print("official model class (transformers 4.x, trust_remote_code) and its loading info:")
    for name, row in results["loading"].items():
        info = row["official_loading_info"]
        problems = {k: v for k, v in info.items() if v}
        print(f"  {name:<12} {row['official_class']}  {problems or 'no missing/unexpected/mismatched keys'}")
    print("\nlogits (fp32): max |official - llada-hf| on non-padding positions; tolerance "
          f"{LOGIT_ULPS} x eps32 x max|logit|")
    print(f"{'model':<12} {'llada-hf from':<13} {'input':<7} {'shape':<15} {'max diff':>9} {'/(eps*max)':>10} "
          f"{'tolerance':>9} {'pad diff':>9}  ok")
    for row in results["logits"]:
        print(f"{row['model']:<12} {row['llada_hf_from']:<13} {row['input']:<7} {str(row['shape']):<15} "
              f"{row['max_abs_diff']:>9.2e} {row['diff_in_eps_x_max_logit']:>10.2f} {row['tolerance']:>9.2e} "
              f"{row['max_abs_diff_padding']:>9.2e}  {row['ok']}")
    print("\ngreedy generate(): official generate() vs llada-hf model.generate(), tokens per row (prompt + answer)")
    print(f"{'model':<12} {'llada-hf from':<13} {'setting':<24} {'rows equal':>10}  ok")
    for row in results["greedy"]:
        extra = f"  (EOS/EoT share of official answer: {row['official_eos_eot_share']:.2f})" \
            if "official_eos_eot_share" in row else ""
        extra += f" (option changed official tokens: {row['option_changed_official_tokens']})" \
            if "option_changed_official_tokens" in row else ""
        extra += f"  first difference: {row['first_difference']}" if "first_difference" in row else ""
        print(f"{row['model']:<12} {row['llada_hf_from']:<13} {row['setting']:<24} "
              f"{row['rows_equal']:>4} / {row['rows']:<3}  {row['ok']}{extra}")
    if results["sampled"]:
        print(f"\nsampled generate(): mean TV of per-position token frequencies over N seeds each, permutation p "
              f"({PERMUTATIONS} shuffles); ok: official vs llada-hf p > {P_AGREE} and the control's p < {P_AGREE}")
        print(f"{'model':<8} {'setting':<17} {'N':>4} {'off/ours TV':>11} {'p':>6} {'off/off TV':>10} {'p':>6} "
              f"{'control':<18} {'TV':>6} {'p':>6} {'distinct off/ours':>17}  ok")
        for row in results["sampled"]:
            a, b, c = row["official_vs_llada_hf"], row["official_vs_official"], row["official_vs_llada_hf_control"]
            control = ", ".join(f"{k} {v}" for k, v in row["control"].items())
            print(f"{row['model']:<8} {row['setting']:<17} {row['seeds']:>4} {a['mean_total_variation']:>11.3f} "
                  f"{a['p']:>6.3f} {b['mean_total_variation']:>10.3f} {b['p']:>6.3f} {control:<18} "
                  f"{c['mean_total_variation']:>6.3f} {c['p']:>6.3f} "
                  f"{row['distinct_answers_official']:>8} / {row['distinct_answers_llada_hf']:<6}  {row['ok']}")
    print("\ntokenizer (exported, AutoTokenizer): transformers 4.46.3 vs 5.x")
    for row in results["tokenizer"]:
        checks = [k for k in ("chat_text", "input_ids", "attention_mask", "probe_ids", "probe_decoded",
                              "special_tokens") if row[k]]
        print(f"{row['model']:<12} {row['official_class']:<24} equal: {', '.join(checks)}  ok {row['ok']}")
    if results["likelihood"]:
        print("\nlog-likelihood: official get_log_likelihood() vs llada_hf.evaluation.log_likelihood")
        for row in results["likelihood"]:
            if "official" in row:
                print(f"  {row['check']:<58} official {row['official']:.6f}  llada-hf {row['llada_hf']:.6f}  "
                      f"diff {row['abs_diff']:.1e}  ok {row['ok']}")
            else:
                print(f"  {row['check']:<58} {row['estimate']:.4f} +- {row['stderr']:.4f} "
                      f"(exact {row['exact_expectation']:.4f}, z {row['z']:+.2f})  ok {row['ok']}")


def main() -> None:
    args = parse_args()
    if args.worker is not None:
        official_worker(args.worker)
        return
    for path in [args.official_code / f for f in OFFICIAL_CODE_FILES] + [args.official_generate]:
        if not path.is_file():
            sys.exit(f"{path} not found: --official-code must hold {' and '.join(OFFICIAL_CODE_FILES)}.")
    if not (args.transformers4 / "transformers").is_dir():
        sys.exit(f"{args.transformers4} holds no transformers package (pip install --target DIR transformers==4.46.3)")
    torch.set_num_threads(args.threads)
    from huggingface_hub.utils import disable_progress_bars

    from transformers.utils import logging as transformers_logging

    disable_progress_bars()
    transformers_logging.disable_progress_bar()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="check_official_code-") as scratch:
        work = args.work_dir or Path(scratch)
        if args.work_dir is not None and work.exists():
            shutil.rmtree(work)
        work.mkdir(parents=True, exist_ok=True)
        models, tokenizer = build_models(work)
        # Explicit prompts for the model without a tokenizer: LLaDA ids with the real special tokens, left-padded.
        generator = torch.Generator().manual_seed(4)
        bos, pad = LLADA_IDS["bos_token_id"], LLADA_IDS["pad_token_id"]
        rows = [[bos] + torch.randint(1000, 120000, (n,), generator=generator).tolist() for n in (12, 7, 3)]
        width = max(map(len, rows))
        llada_inputs = {"input_ids": [[pad] * (width - len(r)) + r for r in rows],
                        "attention_mask": [[0] * (width - len(r)) + [1] * len(r) for r in rows]}
        prompt_ids = tokenizer.apply_chat_template(MESSAGES[0], add_generation_prompt=True, tokenize=False)
        prompt_ids = tokenizer(prompt_ids, add_special_tokens=False).input_ids
        answer = tokenizer(" the moon lies fair", add_special_tokens=False).input_ids[:4]
        args.likelihood_plan = {"prompt": prompt_ids, "one_token": answer[:1], "answer": answer,
                                "cfg_scales": [0.0, 1.0], "batch_size": 16, "groups": 64}
        spec_models = []
        for entry in models:
            entry["official_folder"] = with_official_code(entry["export"], args.official_code, work)
            if not entry["tokenizer"]:
                entry.update(llada_inputs)
            entry["greedy"] = GREEDY_LLADA_IDS if entry["name"] == "llada-ids" else GREEDY
            entry["sampled"] = SAMPLED if entry["name"] == "untied" else []
            spec_models.append({"name": entry["name"], "folder": str(entry["official_folder"]),
                                "tokenizer": entry["tokenizer"], "greedy": entry["greedy"],
                                "sampled": entry["sampled"], "likelihood": entry["name"] == "untied",
                                "mask_token_id": json.loads((entry["export"] / "config.json").read_text())[
                                    "mask_token_id"],
                                **({} if entry["tokenizer"] else llada_inputs)})
        spec = {"models": spec_models, "messages": MESSAGES, "probe": PROBE_TEXT, "seeds": args.seeds,
                "threads": args.threads, "official_generate": str(args.official_generate.resolve()),
                "official_likelihood": str(args.official_likelihood.resolve()) if args.official_likelihood else None,
                "likelihood": args.likelihood_plan, "arrays": str(work / "official.npz"),
                "info": str(work / "official.json")}
        worker_started = time.perf_counter()
        arrays, info = run_worker(args, spec, work)
        worker_seconds = time.perf_counter() - worker_started
        results = compare(args, models, tokenizer, arrays, info)

    import transformers

    checks = results["logits"] + results["greedy"] + results["sampled"] + results["tokenizer"] + results["likelihood"]
    report = {
        "passed": all(row["ok"] for row in checks),
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "transformers_llada_hf": transformers.__version__,
                        "transformers_official": info["transformers"], "machine": platform.machine(),
                        "processor": platform.processor(), "threads": args.threads},
        "official_sources_sha256": describe_sources(args),
        "models": {e["name"]: {"export": e["export_command"], "greedy": e["greedy"], "sampled": e["sampled"]}
                   for e in models},
        "logit_tolerance": f"{LOGIT_ULPS} * eps32 ({EPS32:.3e}) * max|official logit| over non-padding positions",
        "seconds": {"total": time.perf_counter() - started, "official_worker": worker_seconds},
        **results,
    }
    print_table(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"\n{'PASSED' if report['passed'] else 'FAILED'}: {sum(r['ok'] for r in checks)} / {len(checks)} checks; "
          f"{report['seconds']['total']:.0f} s; written to {args.out}")
    sys.exit(0 if report["passed"] else 1)


if __name__ == "__main__":
    main()
