"""The front of the `llada-hf` command: its parser and the dispatch to the commands, importing nothing heavy.

`llada-hf --help`, every subcommand's `--help` and argument errors answer at once: torch, transformers and the
`llada_hf` package (whose import registers the models with transformers' Auto classes, so it imports both) are
imported only when a command runs. Each command is a module of `llada_hf.cli` with `run(args)`; this is a top-level
module because importing any module of `llada_hf` first imports the package. (`train` and `eval` parse their own
flags with TRL's and lm_eval's parsers, so their `--help` imports those.)
"""

import argparse
import importlib
import os
import sys


class CliError(Exception):
    """A problem the user can fix; printed as one line."""


# ---- generate, chat and serve ----------------------------------------------------------------------


# (name, type, choices, help) of every generation flag: transformers' fields that keep their meaning
# (`HONOURED_FIELDS`), then each setting of `DIFFUSION_OPTIONS` that has a CLI type. Written out here so that
# building the parser needs no torch; tests/test_cli.py checks that it matches `llada_hf.generation_llada`.
GENERATION_FLAGS: tuple[tuple[str, type, tuple | None, str], ...] = (
    ("max_new_tokens", int, None, "answer length (masked positions appended to the prompt)"),
    ("min_new_tokens", int, None, "EOS/EoT are not candidates at the first N answer positions"),
    ("temperature", float, None, "0 = greedy; otherwise candidates are sampled from softmax(logits / T)"),
    ("top_k", int, None, "sampling: keep the k most likely candidates"),
    ("top_p", float, None, "sampling: nucleus filtering of the candidates"),
    ("min_p", float, None, "sampling: min-p filtering of the candidates"),
    ("steps", int, None, "total denoising steps over the answer (default: one per answer token)"),
    ("block_length", int, None, "semi-autoregressive block size (default: the whole answer, one block)"),
    ("remasking", str, None, "how masked candidates are scored: low_confidence, random, margin, entropy"),
    ("cfg_scale", float, None, "classifier-free guidance scale w (0 = off)"),
    ("logits_eos_inf", bool, None, "forbid EOS as a candidate"),
    ("logits_mask_inf", bool, None, "forbid the mask token as a candidate (the official sampler allows it)"),
    ("confidence_eos_eot_inf", bool, None, "commit EOS/EoT candidates only when nothing else is left in the block"),
    ("score_dtype", str, ("float32", "float64"),
     "dtype of the low-confidence score (default: the logits' own, as the official sampler)"),
    ("early_exit", bool, None, "stop a row once its answer is decided up to an EOS (the rest is filled with EOS)"),
    ("kv_cache", str, ("prefix", "dual"), "Fast-dLLM key/value cache: prefix or dual (default: none)"),
    ("confidence_threshold", float, None, "parallel decoding: also commit every candidate whose score reaches tau"),
    ("parallel_factor", float, None,
     "parallel decoding: commit the leading run of sorted scores with c_n >= 1 - f / (n + 1)"),
    ("entropy_bound", float, None,
     "parallel decoding (EB-sampler): commit the best candidates while their summed entropy minus the largest stays "
     "<= bound"),
    ("cache_refresh_interval", int, None,
     "with kv_cache: a full pass refreshes the keys every N-th block; at the others a block's first step "
     "recomputes only the block before it and reuses the rest (default: every block)"),
    ("canvas_tail", int, None, "run only the block and this many positions after it (a bounded canvas; default: all)"),
    ("allow_beyond_context", bool, None,
     "warn instead of refusing when prompt + answer exceed max_position_embeddings"),
)

DTYPES = ("auto", "float32", "bfloat16", "float16")


def add_generation_options(parser: argparse.ArgumentParser) -> None:
    """The generation flags (`GENERATION_FLAGS`), `--seed`, `--dtype` and `--device`."""
    group = parser.add_argument_group("generation (defaults: the checkpoint's generation_config)")
    for name, kind, choices, help_text in GENERATION_FLAGS:
        flag = "--" + name.replace("_", "-")
        if kind is bool:
            group.add_argument(flag, action="store_true", default=None, help=help_text)
        else:
            group.add_argument(flag, type=kind, choices=choices, help=help_text.replace("%", "%%"))
    group.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="auto", help=", ".join(DTYPES))
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when there is one)")


def add_image_option(parser: argparse.ArgumentParser, help_text: str) -> None:
    parser.add_argument("--image", action="append", metavar="PATH", help=help_text)


def add_serve_options(parser: argparse.ArgumentParser) -> None:
    """The flags of `llada-hf serve` (the generation flags are added by `build_parser`: they are the defaults)."""

    group = parser.add_argument_group("server")
    group.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    group.add_argument("--port", type=int, default=8000)
    group.add_argument("--api-key", default=os.environ.get("LLADA_HF_API_KEY"),
                       help="require `Authorization: Bearer KEY` on /v1/* and /metrics (default: $LLADA_HF_API_KEY)")
    group.add_argument("--served-model-name", help="the `model` id clients pass (default: the folder's name)")
    group.add_argument("--max-batch", type=int, default=32, help="rows decoded at once (default: 32)")
    group.add_argument("--max-queue", type=int, default=256,
                       help="requests waiting beyond the running ones; more get 429 (default: 256)")
    group.add_argument("--max-tokens-limit", type=int, default=None,
                       help="largest max_tokens a request may ask for (default: the model's context)")
    group.add_argument("--max-body-bytes", type=int, default=None,
                       help="largest request body (default: 1 MiB; 16 MiB for LLaDA-V, whose images come in the body)")
    group.add_argument("--batch-wait-ms", type=float, default=20.0,
                       help="when idle, wait up to this long for requests received together with the first one, so "
                            "that they start together; a lone request never waits (default: 20)")
    group.add_argument("--join-wait", type=int, default=8,
                       help="hold a new request back up to this many steps, until running rows start a block: with "
                            "caches it then shares their passes instead of adding one per step where its blocks "
                            "start; 0 joins at the next step (default: 8)")
    group.add_argument("--step-delay", type=float, default=0.0,
                       help="seconds to pause after each step, to watch a tiny model denoise (default: 0)")
    group.add_argument("--shutdown-grace", type=float, default=10.0,
                       help="on SIGTERM, seconds running answers may take to finish before they are cancelled")
    group.add_argument("--tensor-parallel", action="store_true",
                       help="shard the model over the processes of `torchrun` (transformers' tp_plan='auto')")
    group.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    group.add_argument("--trust-special-tokens", action="store_true",
                       help="tokenize special tokens written in chat messages (<|mdm_mask|>, <|eot_id|>, ...) as "
                            "control tokens; by default message text is text, for clients you do not control")
    images = parser.add_argument_group("images (LLaDA-V models)")
    images.add_argument("--max-images", type=int, default=8, help="images per request (default: 8)")
    images.add_argument("--max-image-pixels", type=int, default=4096 * 4096,
                        help="width x height of one image (default: 4096 x 4096)")
    images.add_argument("--max-image-bytes", type=int, default=10 << 20,
                        help="encoded bytes of one image; more: 413 (default: 10 MiB)")
    images.add_argument("--allow-image-urls", action="store_true",
                        help="fetch http(s) image URLs (off: only data: URLs; the server would fetch any URL a client "
                             "names, so turn it on only for clients you trust)")
    images.add_argument("--image-fetch-timeout", type=float, default=10.0,
                        help="seconds one image fetch may take in all (default: 10)")
    images.add_argument("--allowed-local-media-path", metavar="FOLDER",
                        help="read file:// image URLs of files under FOLDER (vLLM's flag; default: none)")


# ---- the parser ----------------------------------------------------------------------------------


DEMO_OUTPUT_DIR = "outputs/demo"


def add_demo_command(sub) -> None:
    demo = sub.add_parser("demo", help="the reversal experiment in miniature (the main job)")
    demo.add_argument("--output-dir", default=DEMO_OUTPUT_DIR)
    demo.add_argument("--seed", type=int, default=0)
    size = demo.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="a smoke run in under a minute")
    size.add_argument("--large", action="store_true", help="a bigger run that shows the effect more strongly")
    demo.add_argument("--vision", action="store_true",
                      help="the LLaDA-V miniature instead: three training stages on pictures, beside an AR LLaVA")


def add_generate_command(sub) -> None:
    generate = sub.add_parser("generate", help="generate answers to prompts")
    generate.add_argument("model", help="a saved model folder")
    generate.add_argument("prompt", nargs="+", help="one or more prompts (one answer each)")
    generate.add_argument("--join", action="store_true", help="join the words into a single prompt")
    generate.add_argument("--chat", action="store_true",
                          help="apply the chat template to each prompt (always done for a vision model)")
    add_image_option(generate, "an image each prompt asks about (LLaDA-V models); repeat it for several images")
    generate.add_argument("--stream", action="store_true", help="show the drafts while denoising")
    generate.add_argument("--visualize", metavar="PNG", help="write the decoding-order picture here")
    generate.add_argument("--quiet", action="store_true", help="no progress bar (there is none when piped)")
    add_generation_options(generate)


def add_chat_command(sub) -> None:
    chat = sub.add_parser("chat", help="multi-turn chat in the terminal with live drafts")
    chat.add_argument("model", help="a saved model folder")
    chat.add_argument("--system", help="a system message")
    add_image_option(chat, "an image the first question is about (LLaDA-V models); repeat it for several images")
    add_generation_options(chat)


def add_tune_command(sub) -> None:
    tune = sub.add_parser("tune", help="measure decoding settings on a dev set: accuracy vs speed, save the best")
    tune.add_argument("model", help="a saved model folder")
    tune.add_argument("--dev", required=True, help="a JSON/JSONL file of {'prompt': ..., 'completion': ...} records")
    tune.add_argument("--max-new-tokens", type=int, default=64)
    tune.add_argument("--trials", type=int, default=None,
                      help="settings to measure, the defaults included (default: 12; not with --learn)")
    tune.add_argument("--batch-size", type=int, default=8)
    tune.add_argument("--seed", type=int, default=0, help="which settings are drawn (with --learn: the policy's seed)")
    tune.add_argument("--plot", metavar="PNG", help="draw accuracy against answer tokens/s here (not with --learn)")
    tune.add_argument("--save", action="store_true",
                      help="write the chosen setting (with --learn: the learned policy) into generation_config.json")
    learn = tune.add_argument_group("learned policy (--learn)")
    learn.add_argument("--learn", action="store_true",
                       help="instead of searching hand-set settings, learn a decoding policy from the model's own "
                            "exact decoding of the dev prompts, and compare it with the defaults on them")
    learn.add_argument("--block-length", type=int, default=32, help="block length of the traces (default: 32)")
    learn.add_argument("--target-precision", type=float, default=0.99,
                       help="share of early commits that must be final on held-out prompts (default: 0.99)")
    learn.add_argument("--hidden-size", type=int, default=0,
                       help="hidden units of the policy (default: 0, logistic regression)")
    tune.add_argument("--dtype", default="auto", help=", ".join(DTYPES))
    tune.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when there is one)")


def add_publish_command(sub) -> None:
    publish = sub.add_parser("publish", help="upload a saved model or adapter folder to the Hub in one commit")
    publish.add_argument("path", help="a folder written by save_pretrained (model or LoRA adapter)")
    publish.add_argument("repo_id", help="owner/name on the Hub")
    publish.add_argument("--private", action="store_true", help="create the repository as private")
    publish.add_argument("--dry-run", action="store_true", help="list the files and render the card; upload nothing")
    publish.add_argument("--base-model", help="Hub id of the base model (for adapters and fine-tunes)")


def add_export_command(sub) -> None:
    export = sub.add_parser("export", help="write the official GSAI-ML layout or a GGUF file (llama.cpp)")
    export.add_argument("model", help="a saved model folder (or LoRA adapter folder, merged into its base)")
    export.add_argument("output", help="the folder (--format official) or file, e.g. model.gguf (--format gguf)")
    export.add_argument("--format", required=True, choices=["official", "gguf"])
    export.add_argument("--dtype", choices=["f16", "f32", "q8_0"], help="gguf: weight type (default f16)")
    export.add_argument("--tokenizer-pre", help="gguf: llama.cpp's pre-tokenizer name, when it cannot be detected")
    export.add_argument("--ship-bundle", action="store_true",
                        help="official: auto_map points at llada-hf's code, copied beside the weights")
    export.add_argument("--code-repo", help="official: Hub repo of the official code (GSAI-ML/LLaDA-8B-Instruct)")
    export.add_argument("--overwrite", action="store_true", help="replace an existing output")


def add_serve_command(sub) -> None:
    serve = sub.add_parser("serve", help="an OpenAI-compatible server: step-level batching, streamed drafts, a web "
                                         "page (generation flags: the defaults of every request)")
    serve.add_argument("model", help="a saved model folder")
    add_serve_options(serve)
    add_generation_options(serve)


def add_own_parser_commands(sub) -> None:
    """`train` and `eval`, listed for `llada-hf --help`: their flags go to their own parsers (`parse_command_line`)."""
    sub.add_parser("train", help="fine-tune with DiffusionSFTTrainer (flags: DiffusionSFTConfig fields)",
                   add_help=False)
    sub.add_parser("eval", help="lm-evaluation-harness with the llada_hf model (flags: lm_eval's)", add_help=False)


# in the order `llada-hf --help` lists them; each command runs as `llada_hf.cli.<name>.run(args)`
COMMANDS = (add_demo_command, add_generate_command, add_chat_command, add_tune_command, add_publish_command,
            add_export_command, add_serve_command, add_own_parser_commands)


def build_parser() -> argparse.ArgumentParser:
    """The `llada-hf` parser: every subcommand with its flags."""
    parser = argparse.ArgumentParser(prog="llada-hf", description="LLaDA masked diffusion language models.")
    sub = parser.add_subparsers(dest="command", required=True)
    for add_command in COMMANDS:
        add_command(sub)
    return parser


# ---- entry point ---------------------------------------------------------------------------------


OWN_PARSERS = ("train", "eval")  # commands whose flags TRL's and lm_eval's own parsers read


def parse_command_line(argv: list[str]) -> argparse.Namespace:
    """The command (`args.command`) and its settings. `train` and `eval` get their flags as given (`args.flags`):
    argparse cannot hand them on untouched (a `nargs=REMAINDER` argument refuses leading options, and what
    `parse_known_args` does with `--` differs between Python versions)."""
    if argv and argv[0] in OWN_PARSERS:
        return argparse.Namespace(command=argv[0], flags=argv[1:])
    return build_parser().parse_args(argv)


def run_command(args: argparse.Namespace) -> None:
    """`llada_hf.cli.<command>.run(args)`, imported only now: building the parser imports nothing heavy."""
    importlib.import_module(f"llada_hf.cli.{args.command}").run(args)


def quiet_when_logged() -> None:
    """No progress bars from transformers ("Loading weights") and datasets ("Generating train split") when stderr
    is not a terminal: in a log file they are only noise. (Imports both: call it when a command runs.)"""
    if not sys.stderr.isatty():
        from llada_hf.quiet import disable_progress_bars

        disable_progress_bars()


def is_user_error(error: BaseException) -> bool:
    """A mistake the user can fix from its message: the CLI's own checks, the environment (missing files,
    permissions, a package not installed), and the `ValueError`/`TypeError` that llada-hf's checks raise. A
    `ValueError`/`TypeError` raised anywhere else (torch, transformers internals) is treated as a bug."""
    if isinstance(error, (CliError, OSError, ImportError)):
        return True
    frame = error.__traceback__
    while frame is not None and frame.tb_next is not None:
        frame = frame.tb_next
    where = os.path.abspath(frame.tb_frame.f_code.co_filename) if frame is not None else ""
    package = os.path.join(os.path.dirname(os.path.abspath(__file__)), "llada_hf")
    return where.startswith(package + os.sep) or where == os.path.abspath(__file__)


def main(argv: list[str] | None = None) -> int:
    """Run `llada-hf` on `argv` (default: the process's arguments); the exit code: 0, 1 after a user error (one
    line on stderr), 130 after Ctrl-C."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = parse_command_line(argv)
        quiet_when_logged()
        run_command(args)
        return 0
    except (CliError, ValueError, TypeError, OSError, ImportError) as error:
        if os.environ.get("LLADA_HF_DEBUG") or not is_user_error(error):
            raise  # a bug (or a debugging user): the whole traceback
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"llada-hf: error: {message} (LLADA_HF_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
