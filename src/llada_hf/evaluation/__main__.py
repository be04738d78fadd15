"""`python -m llada_hf.evaluation ...`: the same as `llada-hf eval` (lm_eval's command line, model `llada_hf`).

    python -m llada_hf.evaluation --model_args pretrained=PATH --tasks arc_easy
    accelerate launch -m llada_hf.evaluation --model_args pretrained=PATH ...   # a share of the documents per process
"""

import sys

from llada_hf_cli import main


if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
