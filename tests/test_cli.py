"""The `llada-hf` command: every subcommand on a tiny model and one-line errors (the demo: tests/test_demo.py)."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from llada_hf.cli import main
from llada_hf.loading import generation_kwargs
from llada_hf_cli import build_parser


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    from llada_hf import LladaConfig, LladaForMaskedDiffusion
    from llada_hf.tokenization import model_token_ids, train_tokenizer

    folder = tmp_path_factory.mktemp("cli-model")
    texts = [f"the {w} sat on the {v} mat" for w in ("cat", "dog", "bird") for v in ("red", "blue")]
    tokenizer = train_tokenizer(texts * 4, vocab_size=290)
    torch.manual_seed(0)
    config = LladaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         **model_token_ids(tokenizer))
    model = LladaForMaskedDiffusion(config).eval()
    model.generation_config.max_new_tokens = 6
    model.generation_config.steps = 6
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def test_generate_prints_one_answer_per_prompt(saved_model, capsys):
    assert main(["generate", saved_model, "the cat", "the dog", "--max-new-tokens", "4", "--steps", "4"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 2


def test_generation_flags_reach_generate():
    args = build_parser().parse_args(["generate", "m", "hi", "--steps", "4", "--kv-cache", "dual",
                                      "--confidence-threshold", "0.9", "--logits-eos-inf", "--logits-mask-inf"])
    assert generation_kwargs(args) == {"steps": 4, "kv_cache": "dual", "confidence_threshold": 0.9,
                                       "logits_eos_inf": True, "logits_mask_inf": True}


def test_generate_stream_chat_and_visualize(saved_model, tmp_path, capsys):
    png = tmp_path / "order.png"
    code = main(["generate", saved_model, "the cat", "--chat", "--stream", "--visualize", str(png),
                 "--block-length", "3", "--kv-cache", "dual", "--early-exit"])
    assert code == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_errors_are_one_line_with_a_non_zero_exit(saved_model, tmp_path, capsys):
    assert main(["generate", str(tmp_path / "missing"), "hi"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("llada-hf: error:") and len(err.splitlines()) == 1
    assert main(["generate", saved_model, "hi", "--steps", "0"]) == 1
    assert "steps" in capsys.readouterr().err
    assert main(["generate", saved_model, "a", "b", "--stream"]) == 1
    assert "single prompt" in capsys.readouterr().err


@pytest.mark.parametrize("command", [[], ["demo"], ["generate"], ["chat"], ["train"], ["publish"], ["eval"]])
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    assert "usage" in capsys.readouterr().out.lower()


HEAVY = ("torch", "transformers", "datasets", "llada_hf")


def test_help_and_argument_errors_import_nothing_heavy():
    """The parser lives in `llada_hf_cli`, which imports neither torch nor transformers nor `llada_hf` (whose import
    registers the models, so imports both): help and argument errors answer at once."""
    probe = textwrap.dedent(f"""
        import contextlib, io, sys
        from llada_hf_cli import build_parser, main
        build_parser()
        codes = []
        for argv in (["--help"], ["generate", "--help"], ["serve", "--help"], ["bogus"], ["generate"],
                     ["generate", "m", "hi", "--steps", "x"]):
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                try:
                    main(argv)
                except SystemExit as exit_info:
                    codes.append(exit_info.code)
        print(codes, sorted(name for name in {HEAVY!r} if name in sys.modules))
    """)
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[0, 0, 0, 2, 2, 2] []"


def test_the_installed_command_answers_help():
    script = Path(sys.executable).with_name("llada-hf")
    if not script.is_file():
        pytest.skip("the llada-hf script is not installed next to this Python")
    assert "llada_hf_cli" in script.read_text()  # the light entry point (reinstall after changing pyproject.toml)
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "usage: llada-hf" in result.stdout


def test_generation_flags_match_the_generation_options():
    """`llada_hf_cli.GENERATION_FLAGS` is written out (building the parser needs no torch): it must stay what the
    options declared in generation_llada.py give."""
    from llada_hf.generation_llada import DIFFUSION_OPTIONS, HONOURED_FIELDS
    from llada_hf_cli import GENERATION_FLAGS

    inherited = [flag for flag in GENERATION_FLAGS if flag[0] in HONOURED_FIELDS]  # transformers' fields first
    assert all(choices is None and text == HONOURED_FIELDS[name][1] for name, _, choices, text in inherited)
    diffusion = [(option.name, option.cli_type, option.choices, option.help) for option in DIFFUSION_OPTIONS
                 if option.cli_type is not None]
    assert list(GENERATION_FLAGS) == inherited + diffusion


def test_no_library_progress_bars_when_stderr_is_not_a_terminal(saved_model, tmp_path):
    """Piped (a log file), stderr gets no "Loading weights" (transformers) nor "Generating train split" (datasets)."""
    dev = tmp_path / "dev.jsonl"
    dev.write_text("\n".join(json.dumps({"prompt": "the cat", "completion": " sat"}) for _ in range(2)))
    result = subprocess.run([sys.executable, "-m", "llada_hf_cli", "tune", saved_model, "--dev", str(dev),
                             "--max-new-tokens", "4", "--trials", "1", "--device", "cpu"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "chosen" in result.stdout
    assert "Loading weights" not in result.stderr and "Generating train split" not in result.stderr, result.stderr


def test_library_progress_bars_stay_on_a_terminal():
    probe = textwrap.dedent("""
        import io, sys
        import datasets, transformers
        from llada_hf_cli import quiet_when_logged

        def bars():
            return transformers.utils.logging.is_progress_bar_enabled(), not datasets.are_progress_bars_disabled()

        class Terminal(io.StringIO):
            def isatty(self):
                return True

        sys.stderr = Terminal()
        quiet_when_logged()
        on_terminal = bars()
        sys.stderr = io.StringIO()
        quiet_when_logged()
        print(on_terminal, bars())
    """)
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert result.stdout.strip() == "(True, True) (False, False)", result.stderr


def test_chat_answers_each_turn(saved_model):
    result = subprocess.run(
        [sys.executable, "-m", "llada_hf.cli", "chat", saved_model, "--max-new-tokens", "4", "--steps", "4"],
        input="hello\nand again\n\n", capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("model>") == 2


def test_train_on_a_local_jsonl(saved_model, tmp_path):
    data = tmp_path / "data.jsonl"
    rows = [{"prompt": "the cat", "completion": " sat on the red mat"}, {"prompt": "the dog", "completion": " sat"}]
    data.write_text("\n".join(json.dumps(r) for r in rows * 4))
    out = tmp_path / "trained"
    code = main(["train", "--model_name_or_path", saved_model, "--dataset_path", str(data), "--output_dir", str(out),
                 "--max_steps", "2", "--per_device_train_batch_size", "4", "--report_to", "none",
                 "--gradient_checkpointing", "false", "--bf16", "false", "--save_strategy", "no"])
    assert code == 0
    assert (out / "model.safetensors").is_file() and (out / "modeling_llada.py").is_file()
    assert main(["train", "--model_name_or_path", saved_model, "--dataset_path", str(tmp_path / "x.csv"),
                 "--output_dir", str(out)]) == 1


def test_publish_dry_run_lists_the_files(saved_model, capsys):
    assert main(["publish", saved_model, "someone/tiny-llada", "--dry-run"]) == 0
    out = capsys.readouterr().out
    for name in ("README.md", "config.json", "model.safetensors", "modeling_llada.py", "tokenizer.json"):
        assert name in out
    assert "dry run" in out
    assert main(["publish", saved_model, "not a repo id", "--dry-run"]) == 1
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
