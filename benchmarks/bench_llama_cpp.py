"""llama.cpp against llada-hf on the demo's model: the logits of every position, the tokenizer, one diffusion run.

Not a CI test (llama.cpp is built from source by hand); its result is recorded in benchmarks/RESULTS.md.

llama.cpp's sources come with llama-cpp-python's source distribution on the package index (vendor/llama.cpp).
Build once (CPU), then install the Python bindings without building a second copy of the library:

    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d /tmp/lcpp
    tar xzf /tmp/lcpp/llama_cpp_python-0.3.36.tar.gz -C /tmp/lcpp
    cd /tmp/lcpp/llama_cpp_python-0.3.36/vendor/llama.cpp
    cmake -B /tmp/lcpp/build -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON -DGGML_NATIVE=ON \\
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF \\
        -DLLAMA_OPENSSL=OFF
    cmake --build /tmp/lcpp/build -j2 --target llama llama-diffusion-cli
    # bindings only (ctypes; LLAMA_BUILD=OFF compiles nothing), in an environment that also sees llada-hf:
    CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" pip install /tmp/lcpp/llama_cpp_python-0.3.36.tar.gz

    python benchmarks/bench_llama_cpp.py [MODEL_FOLDER] --llama-cpp-build /tmp/lcpp/build

MODEL_FOLDER: a llada-hf model folder; by default the full demo's `outputs/demo/llada-reversal` (`llada-hf demo`) when
it exists, otherwise the quick demo's model, trained here (`llada-hf demo --quick`, under a minute). The demo's
questions are rebuilt from the `results.json` beside the folder (its settings and seed).

What it does:

1. Exports the folder with the command line, `llada-hf export FOLDER OUT.gguf --format gguf --dtype D`, for
   D = f32, f16, q8_0.
2. Loads each GGUF with llama.cpp (llama-cpp-python's ctypes bindings over the library built above) and runs every
   test sequence through it in one `llama_decode` call: LLaDA's attention is bidirectional, so the whole sequence is
   one micro-batch (n_ctx = n_batch = n_ubatch = its length; llama.cpp asserts it: "encoder requires n_ubatch >=
   n_tokens"), with the logits of every position requested. Sequences: each demo question as a chat prompt followed
   by the answer budget of mask tokens (the demo's canvas), one prompt alone, and one prompt followed by masks up to
   the model's context length (every rotary position). llama.cpp runs with flash attention off (its float32 path)
   and with its default (`auto`, on for the CPU), which casts K and V to f16 when there is no KV cache.
3. Compares the logits of every position with llada-hf's (fp32, the same token ids):
   - f32 GGUF: max |llama.cpp - llada-hf| against TOL = eps32 * max|logit| * depth * K, where eps32 = 2^-23,
     depth = layers + 1 (each block, then the head) and K = the longest reduction (max of hidden size,
     intermediate size, sequence length). It is the worst-case forward-error bound of a float32 dot product of
     length K (Higham: gamma_K ~ K * u, with eps32 = 2u also covering the rounding of its inputs), relative to the
     logits' size, added up over the sequential stages; the two run the same float32 function with different
     kernels (summation order, FMA, ggml's vectorised exp/SiLU), so they differ by roundings, and a real mismatch
     (rotary layout, norm, mask, head) is O(1) relative to the logits. The ratio max|diff| / (eps32 * max|logit|)
     is reported too.
     This bound holds only where ggml computes in float32: the f32 GGUF with flash attention off.
   - flash attention on, f16 and q8_0 GGUF: ggml rounds K and V to f16 (flash attention), the weights, and the
     activations that meet them (to f16, or to q8_0 blocks), so these are reported, not bounded; the f16 and q8_0
     files are compared both with llada-hf's fp32 model and with llada-hf running the GGUF's own weights
     dequantised (what remains is then ggml's rounding of activations).
   - a control: an f32 GGUF written with q/k rows left in rotate-half order must fail the bound by far.
   - argmax agreement (%) over all positions, and over the mask positions alone.
4. Tokenizer: llama.cpp's `llama_tokenize` of the chat prompts, the bare questions and the demo's plain sentences
   (`parse_special` on, no BOS added) against llada-hf's tokenizer (`add_special_tokens=False`); and the prompt
   without its BOS text with llama.cpp adding BOS (as `llama-diffusion-cli` tokenizes).
5. Runs `llama-diffusion-cli` on one demo question with the flags docs/publish_export.md recommends (`--temp 0
   --top-k 0 --top-p 1.0`, confidence-based remasking), one block covering the answer, the model's steps, for a few
   seeds, and `--top-k 1` once; next to `model.generate`'s answer (its generation config) for the same prompt.
   The prompt length llama-diffusion-cli tokenizes is checked too (it must generate with -ub = our prompt + 1 and
   refuse -ub = our prompt). What the record shows: with these flags the example's sampler chain is only
   `dist` (`--temp 0` leaves the temperature stage out; it does not make the choice greedy), so each position's
   token is drawn from the softmax at temperature 1, with the seed (`-s`, random by default); `--top-k 1` is
   greedy, but then every confidence is 1.0 and the tie order (left to right) decides. llama.cpp's log, which
   carries the answer, is written by a thread that is not joined at exit, so its last lines are sometimes lost:
   such runs are repeated (the count is recorded).

Prints a table; writes benchmarks/outputs/llama_cpp.json (--out).
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


REPO = Path(__file__).resolve().parents[1]
FULL_DEMO_MODEL = REPO / "outputs" / "demo" / "llada-reversal"
DTYPES = ("f32", "f16", "q8_0")
EPS32 = 2.0**-23
DOC_FLAGS = ["--temp", "0", "--top-k", "0", "--top-p", "1.0"]  # docs/publish_export.md, closest to low-confidence
CLI_SEEDS = (0, 1, 2, 3, 4, 5, 6, 7)
QUESTIONS_PER_WAY = 3  # held-out pairs asked forward and reverse


# ---- the model and the demo's questions ------------------------------------------------------------------------


def llada_hf_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "llada_hf.cli", *args]


def resolve_model(folder: str | None, scratch: Path) -> tuple[Path, str]:
    """The model folder and how it was obtained (trains the quick demo when none is given or found)."""
    if folder:
        return Path(folder), "given"
    if FULL_DEMO_MODEL.is_dir():
        return FULL_DEMO_MODEL, "full demo (outputs/demo)"
    output_dir = scratch / "demo-quick"
    print(f"no model folder given and {FULL_DEMO_MODEL} absent: training the quick demo into {output_dir}", flush=True)
    subprocess.run(llada_hf_command("demo", "--quick", "--output-dir", str(output_dir)), check=True,
                   stdout=subprocess.DEVNULL)
    return output_dir / "llada-reversal", "quick demo (trained here)"


def demo_texts(folder: Path) -> dict:
    """The demo's questions (forward and reverse, held-out pairs), its traced question and plain sentences.

    Rebuilt from the results.json the demo writes beside its model folder (settings and seed); without it, from the
    default demo's first pairs (the words then need not be single tokens of this tokenizer: any text will do)."""
    from llada_hf.demo import DEFAULT, forward_question, invented_pairs, plain_texts, reverse_question

    results_file = folder.parent / "results.json"
    if results_file.is_file():
        results = json.loads(results_file.read_text())
        settings, seed = results["settings"], results["seed"]
        pairs = invented_pairs(settings["pairs"], seed)
        held_out = pairs[int(len(pairs) * settings["question_fraction"]):]
        traced = results["example"]["question"]
        source = str(results_file)
    else:
        pairs = invented_pairs(DEFAULT.pairs, 0)
        held_out, traced, source = pairs[-QUESTIONS_PER_WAY:], None, "default demo pairs (no results.json)"
    chosen = held_out[:QUESTIONS_PER_WAY]
    questions = [forward_question(a) for a, _ in chosen] + [reverse_question(b) for _, b in chosen]
    traced = traced or questions[-1]
    if traced not in questions:
        questions.append(traced)
    sentences = [text for a, b in chosen[:2] for text in plain_texts(a, b, 4)]
    return {"questions": questions, "traced": traced, "sentences": sentences, "source": source}


# ---- llama.cpp through llama-cpp-python's bindings --------------------------------------------------------------


def import_llama_cpp(build: Path | None):
    """llama-cpp-python's low-level module, loading the library of `build` (its bin/ folder) when given."""
    if build is not None:
        lib_dir = build / "bin" if (build / "bin").is_dir() else build
        os.environ["LLAMA_CPP_LIB_PATH"] = str(lib_dir)
    try:
        from llama_cpp import llama_cpp
    except ImportError as error:
        sys.exit(f"llama-cpp-python is not importable ({error}); see this script's docstring to build and install it.")
    return llama_cpp


def llama_cpp_version(lib) -> dict:
    """The bindings' version and the library's ggml version and commit (as built)."""
    import ctypes

    import llama_cpp as package

    version = {"llama_cpp_python": package.__version__}
    lib_dir = Path(os.environ.get("LLAMA_CPP_LIB_PATH") or Path(package.__file__).parent / "lib")
    try:
        base = ctypes.CDLL(str(next(lib_dir.glob("libggml-base.*"))))
        for name in ("ggml_version", "ggml_commit"):
            getattr(base, name).restype = ctypes.c_char_p
            version[name] = getattr(base, name)().decode()
    except (OSError, StopIteration, AttributeError):
        pass
    return version


class LlamaCpp:
    """One GGUF in llama.cpp: tokenize, and the logits of every position of a sequence (one micro-batch)."""

    def __init__(self, lib, path: Path, threads: int):
        self.lib, self.threads = lib, threads
        self.model = lib.llama_model_load_from_file(str(path).encode(), lib.llama_model_default_params())
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        self.vocab = lib.llama_model_get_vocab(self.model)
        self.n_vocab = lib.llama_vocab_n_tokens(self.vocab)
        self.contexts = {}

    def tokenize(self, text: str, add_special: bool) -> list[int]:
        data = text.encode()
        buffer = (self.lib.llama_token * (len(data) + 8))()
        n = self.lib.llama_tokenize(self.vocab, data, len(data), buffer, len(buffer), add_special, True)
        if n < 0:
            raise RuntimeError(f"llama_tokenize needs {-n} tokens")
        return list(buffer[:n])

    def context(self, length: int, flash_attention: str):
        key = (length, flash_attention)
        if key not in self.contexts:
            lib = self.lib
            params = lib.llama_context_default_params()
            params.n_ctx = params.n_batch = params.n_ubatch = length  # the whole sequence in one micro-batch
            params.n_seq_max = 1
            params.n_threads = params.n_threads_batch = self.threads
            params.flash_attn_type = {"off": lib.LLAMA_FLASH_ATTN_TYPE_DISABLED,
                                      "auto": lib.LLAMA_FLASH_ATTN_TYPE_AUTO}[flash_attention]
            ctx = lib.llama_init_from_model(self.model, params)
            if not ctx:
                raise RuntimeError(f"llama.cpp could not create a context of {length} tokens")
            self.contexts[key] = ctx
        return self.contexts[key]

    def logits(self, ids: list[int], flash_attention: str) -> np.ndarray:
        lib, n = self.lib, len(ids)
        ctx = self.context(n, flash_attention)
        batch = lib.llama_batch_init(n, 0, 1)
        try:
            for i, token in enumerate(ids):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, i, 1
                batch.seq_id[i][0], batch.logits[i] = 0, 1
            batch.n_tokens = n
            status = lib.llama_decode(ctx, batch)  # no memory for LLaDA: llama.cpp encodes the batch in one shot
            if status != 0:
                raise RuntimeError(f"llama_decode returned {status}")
            pointer = lib.llama_get_logits(ctx)
            return np.ctypeslib.as_array(pointer, shape=(n, self.n_vocab)).astype(np.float64)
        finally:
            lib.llama_batch_free(batch)

    def close(self) -> None:
        for ctx in self.contexts.values():
            self.lib.llama_free(ctx)
        self.lib.llama_model_free(self.model)


def quiet_llama_cpp(lib) -> None:
    """Silence llama.cpp's loader log (errors still raise here)."""
    callback = lib.llama_log_callback(lambda level, text, data: None)
    lib.llama_log_set(callback, None)
    quiet_llama_cpp.keep = callback  # the C side keeps the pointer


# ---- llada-hf's side ---------------------------------------------------------------------------------------------


def dequantised_model(model, gguf_path: Path):
    """A copy of `model` with the GGUF's weights, dequantised (q/k rows back in Hugging Face's rotate-half order)."""
    import copy

    import gguf

    from llada_hf.export.gguf import interleave_rotary_halves

    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLADA, config.num_hidden_layers)
    stored = {}
    for tensor in gguf.GGUFReader(gguf_path).tensors:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        stored[tensor.name] = torch.from_numpy(np.array(values, dtype=np.float32))
    rotary_heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}
    copy_ = copy.deepcopy(model)
    state = copy_.state_dict()
    for name in state:
        gguf_name = names.get_name(name, try_suffixes=(".weight",))
        if name == "lm_head.weight" and gguf_name not in stored:  # tied: llama.cpp reuses token_embd
            gguf_name = names.get_name("model.embed_tokens.weight", try_suffixes=(".weight",))
        weight = stored[gguf_name].reshape(state[name].shape)
        heads = rotary_heads.get(gguf_name.split(".")[-2])
        if heads is not None:  # undo the export's interleaving: rows[order] were written
            order = interleave_rotary_halves(torch.arange(weight.shape[0], dtype=torch.float64)[:, None], heads)
            restored = torch.empty_like(weight)
            restored[order.flatten().long()] = weight
            weight = restored
        state[name] = weight
    copy_.load_state_dict(state)
    return copy_.eval()


def llada_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double().numpy()


# ---- llama-diffusion-cli ---------------------------------------------------------------------------------------

def diffusion_cli(binary: Path, gguf_path: Path, question: str, ub: int, steps: int, block: int, flags: list[str],
                  seed: int, attempts: int = 40) -> dict:
    """Run llama-diffusion-cli once; return the text it printed after generating (or why it printed none).

    Its log (the answer included) goes through llama.cpp's asynchronous logger, whose thread is not joined at exit:
    the last lines are sometimes lost, so a run whose answer line did not arrive is repeated (counted in
    `attempts`)."""
    command = [str(binary), "-m", str(gguf_path), "-p", question, "-ub", str(ub), "--diffusion-steps", str(steps),
               "--diffusion-block-length", str(block), *flags, "-s", str(seed), "--no-log-timestamps",
               "--log-colors", "off"]
    for attempt in range(1, attempts + 1):
        result = subprocess.run(command, capture_output=True, text=True, errors="backslashreplace", timeout=120)
        log = result.stdout + result.stderr
        if "diffusion generation failed" in log:
            return {"command": command, "ok": False, "answer": None, "attempts": attempt, "returncode":
                    result.returncode}
        tail = log.split("total time:", 1)[1] if "total time:" in log else ""
        lines = tail.split("\n")[1:]  # after the timing line: a blank log line, then the answer and "\n"
        if len(lines) >= 3 and tail.endswith("\n"):
            answer = "\n".join(lines[1:-1])
            timing = "total time:" + tail.split("\n", 1)[0]
            return {"command": command, "ok": True, "answer": answer, "timing": timing.strip(), "attempts": attempt,
                    "returncode": result.returncode}
    return {"command": command, "ok": None, "answer": None, "attempts": attempts, "returncode": result.returncode,
            "log_tail": log[-500:]}


# ---- the comparison ---------------------------------------------------------------------------------------------


def compare(ours: np.ndarray, theirs: np.ndarray, mask_rows: np.ndarray, depth: int, reduction: int,
            bounded: bool) -> dict:
    """max |diff|, and for a float32 run (`bounded`) the tolerance; argmax agreement over all and mask positions."""
    scale = float(np.abs(ours).max())
    diff = np.abs(ours - theirs)
    tolerance = EPS32 * scale * depth * reduction if bounded else None
    agree = ours.argmax(-1) == theirs.argmax(-1)
    return {
        "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()), "max_abs_logit": scale,
        "tolerance": tolerance, "within": bool(diff.max() <= tolerance) if bounded else None,
        "diff_in_eps32_logit_units": float(diff.max() / (EPS32 * scale)),
        "argmax_agree_pct": 100 * float(agree.mean()),
        "argmax_agree_masks_pct": 100 * float(agree[mask_rows].mean()) if mask_rows.any() else None,
        "positions": int(len(agree)), "mask_positions": int(mask_rows.sum()),
    }


def merge(results: list[dict]) -> dict:
    """One row over several sequences: the worst difference, argmax agreement over all their positions."""
    positions = sum(r["positions"] for r in results)
    masks = [r for r in results if r["argmax_agree_masks_pct"] is not None]
    bounded = results[0]["tolerance"] is not None
    worst = max(results, key=lambda r: r["max_abs_diff"] / r["tolerance"]) if bounded else None
    return {
        "max_abs_diff": max(r["max_abs_diff"] for r in results),
        "max_abs_logit": max(r["max_abs_logit"] for r in results),
        "worst_ratio_to_tolerance": worst["max_abs_diff"] / worst["tolerance"] if bounded else None,
        "tolerance_at_worst": worst["tolerance"] if bounded else None,
        "diff_in_eps32_logit_units": max(r["diff_in_eps32_logit_units"] for r in results),
        "within": all(r["within"] for r in results) if bounded else None,
        "argmax_agree_pct": sum(r["argmax_agree_pct"] * r["positions"] for r in results) / positions,
        "argmax_agree_masks_pct": (sum(r["argmax_agree_masks_pct"] * r["mask_positions"] for r in masks)
                                   / sum(r["mask_positions"] for r in masks)) if masks else None,
        "positions": positions, "sequences": len(results),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", help="a llada-hf model folder (default: the demo's, see above)")
    parser.add_argument("--llama-cpp-build", type=Path, help="llama.cpp's cmake build folder (libllama and "
                        "llama-diffusion-cli in its bin/); default: the installed llama-cpp-python's own library")
    parser.add_argument("--diffusion-cli", type=Path, help="llama-diffusion-cli (default: BUILD/bin/)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "outputs" / "llama_cpp.json")
    args = parser.parse_args()
    started = time.perf_counter()

    lib = import_llama_cpp(args.llama_cpp_build)
    quiet_llama_cpp(lib)
    lib.llama_backend_init()
    import llada_hf  # noqa: F401  (registers the model with the Auto classes)

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-llama-cpp-") as scratch:
        report = run(args, lib, Path(scratch), started)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, ensure_ascii=False))
    print_report(report)
    print(f"\nwritten: {args.out}")


def run(args, lib, scratch: Path, started: float) -> dict:
    """Everything but the output: the exports and the model trained here live in `scratch`."""
    from transformers import AutoModel, AutoTokenizer

    from llada_hf.demo import chat_prompt, clean_answer

    folder, origin = resolve_model(args.model, scratch)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
    config, generation = model.config, model.generation_config
    texts = demo_texts(folder)
    budget = generation.max_new_tokens or 32

    # the sequences: chat prompt + the answer budget of masks, one prompt alone, one prompt + masks to the context
    mask = config.mask_token_id
    prompt_ids = {question: tokenizer(chat_prompt(tokenizer, question), add_special_tokens=False).input_ids
                  for question in texts["questions"]}
    traced_ids = prompt_ids[texts["traced"]]
    sequences = {f"canvas: {q}": ids + [mask] * budget for q, ids in prompt_ids.items()}
    sequences[f"prompt alone: {texts['traced']}"] = list(traced_ids)
    full = config.max_position_embeddings
    fill = full - len(traced_ids)
    sequences[f"prompt + {fill} masks (context {full})"] = traced_ids + [mask] * fill
    depth = config.num_hidden_layers + 1
    ours_fp32 = {name: llada_logits(model, ids) for name, ids in sequences.items()}

    rows, details, tokenizer_report = [], {}, None
    for dtype in DTYPES:
        gguf_path = scratch / f"model-{dtype}.gguf"
        subprocess.run(llada_hf_command("export", str(folder), str(gguf_path), "--format", "gguf", "--dtype", dtype),
                       check=True, stdout=subprocess.DEVNULL)
        llama = LlamaCpp(lib, gguf_path, args.threads)
        if tokenizer_report is None:
            tokenizer_report = compare_tokenizers(llama, tokenizer, texts, chat_prompt)
        references = {"llada-hf fp32": ours_fp32}
        if dtype != "f32":
            stored = dequantised_model(model, gguf_path)
            references[f"llada-hf, GGUF's {dtype} weights"] = {name: llada_logits(stored, ids)
                                                                for name, ids in sequences.items()}
        for flash in ("off", "auto"):
            theirs = {name: llama.logits(ids, flash) for name, ids in sequences.items()}
            for reference, ours in references.items():
                per_sequence = {}
                for name, ids in sequences.items():
                    reduction = max(config.hidden_size, config.intermediate_size, len(ids))
                    # the float32 bound applies where ggml computes in float32: f32 weights, attention not in f16
                    per_sequence[name] = compare(ours[name], theirs[name], np.array(ids) == mask, depth, reduction,
                                                 bounded=dtype == "f32" and flash == "off")
                rows.append({"gguf": dtype, "flash_attention": flash, "against": reference,
                             **merge(list(per_sequence.values()))})
                details[f"{dtype} / fa {flash} / {reference}"] = per_sequence
        llama.close()
    f32_path = scratch / "model-f32.gguf"  # the one llama-diffusion-cli runs

    control = rotary_control(lib, model, tokenizer, scratch, sequences, ours_fp32, mask, depth, args.threads)
    rows.append(control)

    # llama-diffusion-cli on the traced question, beside model.generate
    binary = args.diffusion_cli or (args.llama_cpp_build / "bin" / "llama-diffusion-cli" if args.llama_cpp_build
                                    else None)
    cli_report = run_cli(binary, f32_path, model, tokenizer, texts["traced"], traced_ids, budget, generation,
                         chat_prompt, clean_answer) if binary and binary.exists() else {"skipped": "no binary"}

    report = {
        "model": str(folder), "model_origin": origin, "config": {k: getattr(config, k) for k in (
            "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "vocab_size", "max_position_embeddings", "tie_word_embeddings")},
        "questions_from": texts["source"], "sequences": {name: len(ids) for name, ids in sequences.items()},
        "tolerance": "f32 GGUF, flash attention off: 2^-23 * max|logit| * (layers + 1) * max(hidden, "
                     "intermediate, sequence length); the other runs round to f16 or q8_0 inside ggml: reported",
        "logits": rows, "logits_per_sequence": details, "tokenizer": tokenizer_report, "diffusion_cli": cli_report,
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "torch": torch.__version__,
                    "torch_threads": torch.get_num_threads(), "llama_threads": args.threads,
                    "llama_cpp": llama_cpp_version(lib),
                    "llama_cpp_system_info": lib.llama_print_system_info().decode().strip()},
        "seconds": round(time.perf_counter() - started, 1),
    }
    return report


def rotary_control(lib, model, tokenizer, scratch: Path, sequences: dict, ours: dict, mask: int, depth: int,
                   threads: int) -> dict:
    """A control, that a pass is not merely a weak test: an f32 GGUF whose q/k rows keep Hugging Face's rotate-half
    order (the export's interleaving replaced by the identity) must fail the float32 bound by far."""
    from unittest import mock

    from llada_hf.export import gguf as gguf_export

    path = scratch / "control-no-interleave.gguf"
    with mock.patch.object(gguf_export, "interleave_rotary_halves", lambda weight, heads: weight):
        gguf_export.export_gguf(model, tokenizer, path, dtype="f32")
    llama = LlamaCpp(lib, path, threads)
    config = model.config
    per_sequence = {name: compare(ours[name], llama.logits(ids, "off"), np.array(ids) == mask, depth,
                                  max(config.hidden_size, config.intermediate_size, len(ids)), bounded=True)
                    for name, ids in sequences.items()}
    llama.close()
    return {"gguf": "f32, q/k not interleaved (control)", "flash_attention": "off", "against": "llada-hf fp32",
            **merge(list(per_sequence.values()))}


def compare_tokenizers(llama: LlamaCpp, tokenizer, texts: dict, chat_prompt) -> dict:
    """llama.cpp's tokenization against ours, per text (parse_special on, no BOS added; then BOS added)."""
    cases = [("chat prompt", chat_prompt(tokenizer, q)) for q in texts["questions"]]
    cases += [("question", q) for q in texts["questions"]] + [("sentence", s) for s in texts["sentences"]]
    mismatches = []
    for kind, text in cases:
        ours = tokenizer(text, add_special_tokens=False).input_ids
        theirs = llama.tokenize(text, add_special=False)
        if ours != theirs:
            mismatches.append({"kind": kind, "text": text, "ours": ours, "llama_cpp": theirs})
    bos = tokenizer.bos_token
    with_bos = [chat_prompt(tokenizer, q) for q in texts["questions"]]
    bos_equal = sum(llama.tokenize(p[len(bos):], add_special=True) == tokenizer(p, add_special_tokens=False).input_ids
                    for p in with_bos if p.startswith(bos))
    return {"texts": len(cases), "equal": len(cases) - len(mismatches), "mismatches": mismatches,
            "bos_added_by_llama_cpp_equal": f"{bos_equal}/{len(with_bos)}"}


def run_cli(binary: Path, gguf_path: Path, model, tokenizer, question: str, prompt_ids: list[int], budget: int,
            generation, chat_prompt, clean_answer) -> dict:
    """llama-diffusion-cli with the doc's flags (several seeds) and with --top-k 1, beside model.generate."""
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(ids)
    ours_raw = tokenizer.decode(out[0, len(prompt_ids):], skip_special_tokens=False)
    canvas = torch.tensor([prompt_ids + [model.config.mask_token_id] * budget])
    with torch.no_grad():  # how sure the model is at the first step: a sampler draws another token with 1 - p
        first_step = model(canvas).logits[0, len(prompt_ids):].double().softmax(-1).max(-1).values.tolist()
    ub = len(prompt_ids) + budget
    steps = generation.steps or budget
    # one llama.cpp block over the whole answer (blocks start at the prompt's end; their count is ub / block length)
    block = ub
    # llama-diffusion-cli generates only while -ub exceeds the prompt it tokenized: one more than ours must work,
    # ours alone must be refused ("diffusion generation failed")
    plus_one = diffusion_cli(binary, gguf_path, question, len(prompt_ids) + 1, 1, len(prompt_ids) + 1, DOC_FLAGS, 0)
    alone = diffusion_cli(binary, gguf_path, question, len(prompt_ids), 1, len(prompt_ids), DOC_FLAGS, 0)
    doc_runs = []
    for seed in CLI_SEEDS:
        run = diffusion_cli(binary, gguf_path, question, ub, steps, block, DOC_FLAGS, seed)
        doc_runs.append({"seed": seed, "answer": run["answer"], "attempts": run["attempts"]})
    top1 = diffusion_cli(binary, gguf_path, question, ub, steps, block, ["--temp", "0", "--top-k", "1"], 0)
    return {
        "question": question, "prompt_tokens": len(prompt_ids), "answer_tokens": budget,
        "llada_generate": {"steps": steps, "block_length": generation.block_length, "remasking": generation.remasking,
                           "temperature": generation.temperature, "raw": ours_raw, "answer": clean_answer(ours_raw)},
        "first_step_argmax_probability": first_step,
        "cli_flags": ["-ub", str(ub), "--diffusion-steps", str(steps), "--diffusion-block-length", str(block),
                      *DOC_FLAGS],
        "cli_doc_flags_by_seed": doc_runs,
        "cli_doc_flags_answers": sorted({clean_answer(r["answer"] or "") for r in doc_runs}),
        "cli_top_k_1": {"answer": top1["answer"], "attempts": top1["attempts"]},
        "cli_prompt_length_equals_ours": plus_one["ok"] is True and alone["ok"] is False,
        "cli_prompt_length_runs": {"ub_prompt_plus_1": {k: plus_one.get(k) for k in ("ok", "answer", "attempts")},
                                   "ub_prompt": {k: alone.get(k) for k in ("ok", "attempts")}},
        "example_command": " ".join(diffusion_cli_command_for_doc(gguf_path, question, ub, steps, block)),
    }


def diffusion_cli_command_for_doc(gguf_path, question, ub, steps, block) -> list[str]:
    return ["llama-diffusion-cli", "-m", gguf_path.name, "-p", repr(question), "-ub", str(ub), "--diffusion-steps",
            str(steps), "--diffusion-block-length", str(block), *DOC_FLAGS, "-s", "SEED"]


def print_report(report: dict) -> None:
    print(f"\nmodel: {report['model']} ({report['model_origin']}); questions from {report['questions_from']}")
    print(f"llama.cpp: {report['machine']['llama_cpp']}; {report['machine']['llama_cpp_system_info']}")
    print(f"sequences (tokens): {report['sequences']}")
    print(f"tolerance: {report['tolerance']}\n")
    print("| GGUF | flash attn | against | max \\|diff\\| | max \\|logit\\| | diff / (eps32 x max\\|logit\\|) | "
          "tolerance | within | argmax agree % (all / masks) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in report["logits"]:
        masks = f"{r['argmax_agree_masks_pct']:.1f}" if r["argmax_agree_masks_pct"] is not None else "-"
        bounded = r["within"] is not None
        tolerance = f"{r['tolerance_at_worst']:.3g}" if bounded else "-"
        within = ("yes" if r["within"] else "NO") if bounded else "-"
        print(f"| {r['gguf']} | {r['flash_attention']} | {r['against']} | {r['max_abs_diff']:.3g} | "
              f"{r['max_abs_logit']:.3g} | {r['diff_in_eps32_logit_units']:.3g} | {tolerance} | {within} | "
              f"{r['argmax_agree_pct']:.1f} / {masks} |")
    t = report["tokenizer"]
    print(f"\ntokenizer: {t['equal']}/{t['texts']} texts tokenized identically; prompt without BOS text + "
          f"llama.cpp's BOS equal: {t['bos_added_by_llama_cpp_equal']}")
    for m in t["mismatches"]:
        print(f"  MISMATCH {m['kind']}: {m['text']!r}: ours {m['ours']} llama.cpp {m['llama_cpp']}")
    c = report["diffusion_cli"]
    if "skipped" in c:
        print(f"\nllama-diffusion-cli: skipped ({c['skipped']})")
    else:
        g = c["llada_generate"]
        print(f"\nllama-diffusion-cli vs model.generate, Q: {c['question']!r} ({c['prompt_tokens']} prompt tokens "
              f"+ {c['answer_tokens']} masks; prompt length as ours: {c['cli_prompt_length_equals_ours']})")
        print(f"  model.generate (steps {g['steps']}, block {g['block_length']}, {g['remasking']}, temperature "
              f"{g['temperature']}): {g['raw']!r} -> {g['answer']!r}")
        probabilities = ", ".join(f"{p:.3f}" for p in c["first_step_argmax_probability"])
        print(f"  softmax probability of the argmax at each masked position, first step (llada-hf): {probabilities}")
        print(f"  llama-diffusion-cli {' '.join(c['cli_flags'])}:")
        for run in c["cli_doc_flags_by_seed"]:
            print(f"    -s {run['seed']}: {run['answer']!r}" + (f" ({run['attempts']} runs: log lost at exit)"
                                                               if run["attempts"] > 1 else ""))
        print(f"  ... --temp 0 --top-k 1 -s 0: {c['cli_top_k_1']['answer']!r}")
    print(f"\ntime: {report['seconds']} s")


if __name__ == "__main__":
    main()
