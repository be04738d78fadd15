"""The `llada-hf` commands, one module per subcommand, each with `run(args)`.

The parser and the dispatch live in the top-level module `llada_hf_cli`, which imports nothing heavy (so that
`llada-hf --help` answers at once); its `main` is importable from here too, and `python -m llada_hf.cli ...` runs it
(under `torchrun`, say).
"""

from llada_hf_cli import main


__all__ = ["main"]
