"""An lm-evaluation-harness model for llada-hf checkpoints (optional extra `eval`).

Registered as `llada_hf`. Scoring requests (`loglikelihood`, used by multiple-choice tasks) get the
Monte-Carlo ELBO of `log_likelihood`; generation requests (`generate_until`) get the diffusion
`generate`, cut at the task's stop strings. Under `accelerate launch`, each process evaluates its own
share of the documents (lm_eval's `rank` / `world_size` convention) and lm_eval gathers the results.

Command line: `python -m llada_hf.evaluation` is lm_eval's own command line with `llada_hf` registered
(see `llada_hf/evaluation/__main__.py`):

    python -m llada_hf.evaluation --model llada_hf --model_args pretrained=PATH,mc_num=128 \\
        --tasks arc_easy --batch_size 8
    accelerate launch -m llada_hf.evaluation --model llada_hf ...   # one share of the documents per process

From Python: `run_lm_eval(PATH, ["arc_easy"])`.
"""

import json
from collections import defaultdict
from collections.abc import Sequence

import torch
from accelerate import PartialState
from accelerate.utils import gather
from lm_eval import utils as lm_eval_utils
from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from transformers import AutoModel, AutoTokenizer, PreTrainedModel

import llada_hf  # noqa: F401  (registers LLaDA with the Auto classes)
from llada_hf.decoding_llada import left_pad
from llada_hf.streaming_llada import end_token_ids, truncate_at_eos

from .likelihood import greedy_match, log_likelihood


@register_model("llada_hf")
class LladaEvalHarness(TemplateLM):
    """lm_eval model for LLaDA-family masked diffusion LMs.

    Args (all can be given in `--model_args`):
        pretrained: a checkpoint folder / Hub id, or an already loaded model.
        tokenizer: tokenizer name or object (default: the checkpoint's).
        batch_size: prompts generated together, and pairs checked together by the greedy check
            (lm_eval's `--batch_size`; an integer).
        mc_num, mc_batch_size, cfg_scale, balanced_masks: the ELBO settings of `log_likelihood`
            (`mc_batch_size` is its `batch_size`: rows per forward pass and per stratified group).
        check_greedy: answer lm_eval's "is greedy" with `greedy_match` (needed by e.g. LAMBADA's
            accuracy; costs one forward pass per answer token). False reports False.
        max_new_tokens: answer length for generation (default: the task's `max_gen_toks`).
        steps, block_length, remasking: diffusion sampling settings (defaults: one step per token,
            one block).
        max_length: longest prompt + answer (default: the model's context).
        device: "cpu", "cuda", ...; under `accelerate launch` each process's own device.
        dtype: "auto", "float32", "bfloat16", ...
        seed: seed of the masks drawn for the ELBO.

    Example:
        ```python
        >>> from llada_hf.evaluation.lm_eval_adapter import LladaEvalHarness
        >>> lm = LladaEvalHarness(pretrained="path/to/checkpoint", mc_num=64)  # doctest: +SKIP
        ```
    """

    def __init__(
        self,
        pretrained: str | PreTrainedModel,
        tokenizer=None,
        batch_size: int | str = 1,
        mc_num: int = 128,
        mc_batch_size: int = 16,
        cfg_scale: float = 0.0,
        balanced_masks: bool = False,
        check_greedy: bool = True,
        max_new_tokens: int | None = None,
        steps: int | None = None,
        block_length: int | None = None,
        remasking: str = "low_confidence",
        max_length: int | None = None,
        device: str | None = None,
        dtype: str = "auto",
        seed: int = 1234,
        trust_remote_code: bool = False,
    ):
        super().__init__()
        # Without an accelerator, processes started by `accelerate launch` / torchrun talk over gloo on CPU.
        self._state = PartialState(cpu=device == "cpu" or not torch.accelerator.is_available())
        self._rank, self._world_size = self._state.process_index, self._state.num_processes
        self._device = torch.device(self._pick_device(device))
        self.model = self._load_model(pretrained, dtype, trust_remote_code).to(self._device).eval()
        self.tokenizer = self._load_tokenizer(tokenizer if tokenizer is not None else pretrained, trust_remote_code)
        self.end_ids = end_token_ids(self.tokenizer, self.model.generation_config)  # EOS and EoT end an answer

        self.batch_size = _positive_int(batch_size, "batch_size")
        self.likelihood_kwargs = dict(
            mc_num=int(mc_num), batch_size=int(mc_batch_size), cfg_scale=float(cfg_scale),
            balanced_masks=bool(balanced_masks), generator=torch.Generator().manual_seed(int(seed)),
        )
        self.check_greedy = bool(check_greedy)
        self.generation_kwargs = dict(
            max_new_tokens=max_new_tokens, steps=steps, block_length=block_length, remasking=remasking,
            cfg_scale=float(cfg_scale),
        )
        self.max_length = int(max_length or self.model.config.max_position_embeddings)

    # -- set-up ----------------------------------------------------------------------------------------

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "LladaEvalHarness":
        """Build from lm-eval's `--model_args` string; a setting named there (e.g. `device=cpu`) wins over the same
        setting of lm-eval's own flags (`--device`, `--batch_size`), which lm-eval's base class would pass twice."""
        from lm_eval.utils import simple_parse_args_string

        args = simple_parse_args_string(arg_string)
        extra = {key: value for key, value in (additional_config or {}).items()
                 if value is not None and key not in args}
        return cls(**args, **extra)

    def _pick_device(self, device: str | None) -> str:
        if self._world_size > 1:  # accelerate chose one device per process
            return str(self._state.device)
        if device is None or (device.startswith("cuda") and not torch.cuda.is_available()):
            # lm_eval's command line asks for cuda:0 by default, also on machines that have none
            return "cuda" if torch.cuda.is_available() else "cpu"
        return device

    @staticmethod
    def _load_model(pretrained, dtype: str, trust_remote_code: bool) -> PreTrainedModel:
        if isinstance(pretrained, PreTrainedModel):
            return pretrained
        return AutoModel.from_pretrained(pretrained, dtype=dtype, trust_remote_code=trust_remote_code)

    @staticmethod
    def _load_tokenizer(tokenizer, trust_remote_code: bool):
        if isinstance(tokenizer, str):
            return AutoTokenizer.from_pretrained(tokenizer, trust_remote_code=trust_remote_code)
        if isinstance(tokenizer, PreTrainedModel) or tokenizer is None:
            raise ValueError("Pass `tokenizer=` (a name or object) when `pretrained` is a loaded model.")
        return tokenizer

    # -- what lm_eval asks of a model ------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        # An empty context is scored after this token; LLaDA texts start with bos.
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.eot_token_id

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer(string, add_special_tokens=bool(add_special_tokens)).input_ids

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """ELBO of each continuation given its context; contexts are cut from the left to fit."""
        if not requests:  # a process's share of the documents can be empty
            return []
        contexts, continuations = [], []
        for _, context, continuation in requests:
            room = max(self.max_length - len(continuation), 0)
            contexts.append(context[len(context) - room :] if room < len(context) else context)
            continuations.append(continuation)
        scores = log_likelihood(self.model, contexts, continuations, **self.likelihood_kwargs)
        if self.check_greedy:
            greedy = greedy_match(
                self.model, contexts, continuations, batch_size=self.batch_size,
                cfg_scale=self.likelihood_kwargs["cfg_scale"],
            )
        else:
            greedy = [False] * len(requests)
        results = list(zip(scores, greedy))
        for (request_args, _, _), result in zip(requests, results):
            if request_args is not None:
                self.cache_hook.add_partial("loglikelihood", request_args, result)
        return results

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        """ELBO of whole texts, in disjoint windows of at most `max_length` tokens (lm_eval's rolling
        windows), summed per text."""
        windows, owners = [], []
        for index, (text,) in enumerate(request.args for request in requests):
            for window in lm_eval_utils.get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1,
            ):
                windows.append((None, *lm_eval_utils.make_disjoint_window(window)))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (score, _) in zip(owners, self._loglikelihood_tokens(windows)):
            totals[owner] += score
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        """Diffusion generation for every request, cut at its stop strings. Requests with the same
        generation settings are batched, shortest contexts together."""
        outputs = [""] * len(requests)
        by_settings = defaultdict(list)
        for index, request in enumerate(requests):
            context, gen_kwargs = request.args
            by_settings[_settings_key(gen_kwargs)].append((index, context))
        for key, items in by_settings.items():
            gen_kwargs = dict(key)
            items.sort(key=lambda item: len(self.tok_encode(item[1])))
            for start in range(0, len(items), self.batch_size):
                batch = items[start : start + self.batch_size]
                texts = self._generate([context for _, context in batch], gen_kwargs)
                for (index, context), text in zip(batch, texts):
                    outputs[index] = text
                    self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return outputs

    def _generate(self, contexts: list[str], gen_kwargs: dict) -> list[str]:
        answer_length = self.generation_kwargs["max_new_tokens"] or int(gen_kwargs.get("max_gen_toks", 256))
        sampling = {key: value for key, value in self.generation_kwargs.items() if value is not None}
        sampling["max_new_tokens"] = answer_length
        sampling["temperature"] = float(gen_kwargs.get("temperature", 0.0)) if gen_kwargs.get("do_sample") else 0.0
        room = self.max_length - answer_length
        if room < 1:
            raise ValueError(
                f"max_new_tokens ({answer_length}) leaves no room for a prompt in max_length ({self.max_length})."
            )
        prompts = [self.tok_encode(context)[-room:] for context in contexts]
        input_ids, attention_mask = left_pad(prompts, self.tokenizer.pad_token_id)  # [B, P]
        sequences = self.model.generate(
            input_ids.to(self._device), attention_mask=attention_mask.to(self._device), **sampling
        )  # [B, P + answer_length]
        until = _stop_strings(gen_kwargs.get("until"))
        return [self._answer_text(answer.tolist(), until) for answer in sequences[:, input_ids.shape[1] :]]

    def _answer_text(self, answer_ids: list[int], until: list[str]) -> str:
        """Decode up to the first end token (EOS or EoT), cut at the first stop string, then drop special tokens
        (in that order, so a special token can itself be a stop string)."""
        answer_ids = truncate_at_eos([answer_ids], self.end_ids)[0]
        text = self.tokenizer.decode(answer_ids, skip_special_tokens=False)
        for stop in until:
            text = text.split(stop)[0]
        for special in self.tokenizer.all_special_tokens:
            text = text.replace(special, "")
        return text

    # -- several processes (lm_eval calls these when world_size > 1) -----------------------------------

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return gather(tensor) if self._world_size > 1 else tensor

    def gather_object(self, obj, dst: int = 0):
        if self._world_size == 1:
            return [obj]
        gathered = [None] * self._world_size if self._rank == dst else None
        torch.distributed.gather_object(obj, gathered, dst=dst)
        return gathered

    def barrier(self) -> None:
        self._state.wait_for_everyone()


def _positive_int(value: int | str, name: str) -> int:
    if isinstance(value, str) and not value.isdigit():
        raise ValueError(f"`{name}` must be a positive integer for llada_hf (no 'auto'), got {value!r}.")
    value = int(value)
    if value <= 0:
        raise ValueError(f"`{name}` must be a positive integer, got {value}.")
    return value


def _settings_key(gen_kwargs: dict) -> tuple:
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in gen_kwargs.items()))


def _stop_strings(until) -> list[str]:
    if until is None:
        return []
    return [until] if isinstance(until, str) else list(until)


def run_lm_eval(
    model_path: str | PreTrainedModel,
    tasks: Sequence[str],
    *,
    include_path: str | None = None,
    include_defaults: bool = True,
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    batch_size: int = 8,
    model_args: dict | None = None,
    apply_chat_template: bool = False,
    log_samples: bool = False,
    output_path: str | None = None,
) -> dict | None:
    """Evaluate a llada-hf checkpoint on lm_eval tasks; return lm_eval's results dict.

    Under `accelerate launch` every process must call it; the results come back on process 0 only
    (the others get None).

    Args:
        model_path: checkpoint folder / Hub id, or a loaded model (then pass `model_args={"tokenizer": ...}`).
        tasks: lm_eval task names (built-in, or defined by YAML files under `include_path`).
        include_path: folder of extra task YAMLs (e.g. local tasks over local jsonl files).
        include_defaults: also index lm_eval's built-in tasks (about half a minute); False when every
            task comes from `include_path`.
        num_fewshot, limit, apply_chat_template, log_samples: as in `lm_eval.simple_evaluate`.
        batch_size: prompts generated together / pairs greedy-checked together.
        model_args: further `LladaEvalHarness` arguments (`mc_num`, `cfg_scale`, `max_new_tokens`, ...).
        output_path: also write the results as JSON there (process 0).

    Example:
        ```python
        >>> from llada_hf.evaluation.lm_eval_adapter import run_lm_eval
        >>> results = run_lm_eval("path/to/checkpoint", ["arc_easy"], limit=50)  # doctest: +SKIP
        >>> results["results"]["arc_easy"]["acc,none"]  # doctest: +SKIP
        ```
    """
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    lm = LladaEvalHarness(pretrained=model_path, batch_size=batch_size, **(model_args or {}))
    results = simple_evaluate(
        model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit, log_samples=log_samples,
        apply_chat_template=apply_chat_template,
        task_manager=TaskManager(include_path=include_path, include_defaults=include_defaults),
    )
    if results is not None and output_path:
        with open(output_path, "w") as f:
            json.dump(results, f, indent=2, default=str)
    return results
