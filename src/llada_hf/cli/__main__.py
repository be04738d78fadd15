"""`python -m llada_hf.cli ...`: the `llada-hf` command."""

import sys

from llada_hf_cli import main


sys.exit(main())
