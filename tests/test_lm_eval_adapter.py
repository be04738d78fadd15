"""lm_eval end to end on a tiny saved model and two local tasks (multiple choice and generation)."""

import glob
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import tokenizer_model

from llada_hf import LladaForMaskedDiffusion
from llada_hf.evaluation import greedy_match, log_likelihood
from llada_hf.evaluation.lm_eval_adapter import LladaEvalHarness, run_lm_eval
from llada_hf.tokenization import train_tokenizer


MC_DOCS = [
    {"question": "Is fire hot?", "choices": ["yes", "no"], "label": 0},
    {"question": "Is ice hot?", "choices": ["yes", "no"], "label": 1},
    {"question": "Is snow cold?", "choices": ["yes", "no", "maybe"], "label": 0},
    {"question": "Is the sun cold?", "choices": ["yes", "no"], "label": 1},
    {"question": "Is water wet?", "choices": ["yes", "no", "maybe"], "label": 0},
]
GEN_DOCS = [{"question": q, "answer": a} for q, a in [("Say hi", "hi"), ("Say yes", "yes"), ("Name a color", "red")]]
TASKS = {
    "toy_mc": """
        task: toy_mc
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {data}
        test_split: test
        output_type: multiple_choice
        doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
        doc_to_choice: "{{{{choices}}}}"
        doc_to_target: "{{{{label}}}}"
        metric_list:
          - metric: acc
    """,
    "toy_gen": """
        task: toy_gen
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {data}
        test_split: test
        output_type: generate_until
        doc_to_text: "Q: {{{{question}}}}\\nA:"
        doc_to_target: "{{{{answer}}}}"
        generation_kwargs:
          until: ["\\n", "."]
          max_gen_toks: 6
        metric_list:
          - metric: exact_match
    """,
}
MODEL_ARGS = {"mc_num": 8, "mc_batch_size": 4}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny checkpoint (weights + tokenizer) and a folder of local task YAMLs over local jsonl files."""
    root = tmp_path_factory.mktemp("lm_eval")
    texts = [f"Question: {d['question']}\nAnswer: {c}" for d in MC_DOCS for c in d["choices"]]
    texts += [f"Q: {d['question']}\nA: {d['answer']}." for d in GEN_DOCS]
    tokenizer = train_tokenizer(texts * 20, vocab_size=320)  # every choice is one token: its ELBO is exact
    model = tokenizer_model(tokenizer, max_position_embeddings=128)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    os.makedirs(root / "tasks")
    for name, docs in (("toy_mc", MC_DOCS), ("toy_gen", GEN_DOCS)):
        data = root / "tasks" / f"{name}.jsonl"
        data.write_text("".join(json.dumps(doc) + "\n" for doc in docs))
        (root / "tasks" / f"{name}.yaml").write_text(textwrap.dedent(TASKS[name]).format(data=data))
    return root


def _encode_pair(tokenizer, context, continuation):
    """lm_eval's split for causal-style tokenization: encode the whole, cut after the context."""
    whole = tokenizer(context + continuation, add_special_tokens=False).input_ids
    context_ids = tokenizer(context, add_special_tokens=False).input_ids
    return context_ids, whole[len(context_ids):]


def _expected_generation(model, tokenizer, context):
    """One prompt alone through `generate`, decoded and cut as lm_eval's `until` asks."""
    ids = torch.tensor([tokenizer(context, add_special_tokens=False).input_ids])
    answer = model.generate(ids, max_new_tokens=6).tolist()[0][ids.shape[1]:]
    if tokenizer.eos_token_id in answer:
        answer = answer[: answer.index(tokenizer.eos_token_id)]
    return tokenizer.decode(answer, skip_special_tokens=True).split("\n")[0].split(".")[0]


def _from_samples_file(sample):
    """A logged sample as lm_eval writes it to jsonl (arguments as dicts, values as strings), in the
    in-memory shape."""
    arguments = [(args["arg_0"], args["arg_1"]) for args in sample["arguments"].values()]
    if isinstance(arguments[0][1], dict):  # generation: one string per response
        return dict(sample, arguments=arguments)
    resps = [[(float(score), greedy == "True") for score, greedy in resp] for resp in sample["resps"]]
    return dict(sample, arguments=arguments, resps=resps)


def _check_against_direct_calls(results, model, tokenizer):
    mc_samples = results["samples"]["toy_mc"]
    correct = []
    for sample in mc_samples:
        pairs = [_encode_pair(tokenizer, *args) for args in sample["arguments"]]
        assert all(len(answer) == 1 for _, answer in pairs)  # one-token choices: the ELBO is exact
        expected = log_likelihood(model, [c for c, _ in pairs], [a for _, a in pairs])
        expected_greedy = greedy_match(model, [c for c, _ in pairs], [a for _, a in pairs])
        scores = [resp[0] for resp in sample["resps"]]
        assert [s for s, _ in scores] == pytest.approx(expected, abs=1e-4)
        assert [bool(g) for _, g in scores] == expected_greedy
        correct.append(max(range(len(expected)), key=expected.__getitem__) == sample["doc"]["label"])
    assert results["results"]["toy_mc"]["acc,none"] == pytest.approx(sum(correct) / len(correct))

    gen_samples = results["samples"]["toy_gen"]
    assert len(gen_samples) == len(GEN_DOCS)
    for sample in gen_samples:
        assert sample["resps"][0][0] == _expected_generation(model, tokenizer, sample["arguments"][0][0])


def test_lm_eval_runs_both_tasks_in_process(workspace):
    results = run_lm_eval(
        str(workspace / "model"), ["toy_mc", "toy_gen"], include_path=str(workspace / "tasks"),
        include_defaults=False, batch_size=2, model_args=dict(MODEL_ARGS, device="cpu"), log_samples=True,
        output_path=str(workspace / "results.json"),
    )
    lm = LladaEvalHarness(str(workspace / "model"), device="cpu")
    _check_against_direct_calls(results, lm.model, lm.tokenizer)
    assert json.loads((workspace / "results.json").read_text())["results"].keys() == {"toy_mc", "toy_gen"}


def test_lm_eval_command_line_splits_the_work_over_processes(workspace):
    out = workspace / "distributed"
    model_args = ",".join([f"pretrained={workspace / 'model'}"] + [f"{k}={v}" for k, v in MODEL_ARGS.items()])
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "-m", "llada_hf.evaluation", "--device", "cpu",
        "--model", "llada_hf", "--model_args", model_args, "--tasks", "toy_mc,toy_gen",
        "--include_path", str(workspace / "tasks"), "--batch_size", "2", "--log_samples", "--output_path", str(out),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_DATASETS_OFFLINE="1")
    run = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "on rank 1" in run.stderr + run.stdout  # the second process built (and ran) its own share

    results = json.loads(open(glob.glob(str(out / "**" / "results_*.json"), recursive=True)[0]).read())
    samples = {}
    for task in ("toy_mc", "toy_gen"):
        [path] = glob.glob(str(out / "**" / f"samples_{task}_*.jsonl"), recursive=True)
        samples[task] = [_from_samples_file(json.loads(line)) for line in open(path)]
    assert sorted(s["doc_id"] for s in samples["toy_mc"]) == list(range(len(MC_DOCS)))
    lm = LladaEvalHarness(str(workspace / "model"), device="cpu")
    _check_against_direct_calls(dict(results, samples=samples), lm.model, lm.tokenizer)


def test_model_args_win_over_lm_evals_own_flags(workspace):
    """`--model_args ...,device=cpu` together with lm-eval's `--device` / `--batch_size` (which lm-eval passes as
    well) builds the model instead of failing with "multiple values for 'device'"."""
    lm = LladaEvalHarness.create_from_arg_string(f"pretrained={workspace / 'model'},device=cpu,batch_size=3",
                                                 {"device": "cuda:0", "batch_size": 2, "max_batch_size": None})
    assert lm._device == torch.device("cpu") and lm.batch_size == 3


def test_bad_settings_are_clear_errors(workspace):
    with pytest.raises(ValueError, match="no 'auto'"):
        LladaEvalHarness(str(workspace / "model"), batch_size="auto", device="cpu")
    model = LladaForMaskedDiffusion.from_pretrained(workspace / "model")
    with pytest.raises(ValueError, match="Pass `tokenizer=`"):
        LladaEvalHarness(model, device="cpu")


def test_llada_hf_eval_command(workspace, capsys):
    from llada_hf.cli import main

    out = workspace / "cli"
    model_args = ",".join([f"pretrained={workspace / 'model'}"] + [f"{k}={v}" for k, v in MODEL_ARGS.items()])
    code = main(["eval", "--model_args", model_args, "--tasks", "toy_mc", "--include_path", str(workspace / "tasks"),
                 "--device", "cpu", "--batch_size", "2", "--output_path", str(out)])
    assert code == 0
    [path] = glob.glob(str(out / "**" / "results_*.json"), recursive=True)
    assert "toy_mc" in json.loads(open(path).read())["results"]
