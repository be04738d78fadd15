"""`python -m llada_hf.evaluation ...`: lm_eval's command line with the `llada_hf` model registered.

    python -m llada_hf.evaluation --model llada_hf --model_args pretrained=PATH --tasks arc_easy
    accelerate launch -m llada_hf.evaluation --model llada_hf ...   # one share of the documents per process
"""

from lm_eval.__main__ import cli_evaluate

from . import lm_eval_adapter  # noqa: F401  (registers `llada_hf` with lm_eval)


if __name__ == "__main__":
    cli_evaluate()
