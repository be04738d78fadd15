"""LLaDA-V generation speed (issue 14): answer tokens/s of generate-from-image with and without the dual cache and a
confidence threshold, and the share of the time spent in the vision tower (which must run once per request).

A LLaDA-V with random weights answers one question about one 400 x 300 image, through the processor and the same
`generate` as the text model. Sizes (`--size`):

- `small` (default; CPU): language model hidden 256, 4 layers, 4 heads, MLP 704, vocabulary 512; SigLIP tower hidden
  192, 4 layers, 3 heads, MLP 768, 112 px crops of 14 px patches (64 features a crop), grids of 1x1 ... 3x3 crops,
  `anyres_max_4` (the official packing, scaled down: the image takes about 5 crops' worth of positions).
- `official` (GPU): the official shapes, LLaDA 8B (hidden 4096, 32 layers, vocabulary 126464) + SigLIP so400m
  (26 kept layers, 384 px crops, 729 features a crop), grids 1x1 ... 6x6.

The prompt is the official chat template (with its system prompt) around the image and the question; the script
prints how many positions the image takes.

Random weights: with the default init the logits are nearly uniform over the vocabulary, so no prediction reaches a
confidence of 0.9, a threshold never fires and `tau=0.9` equals the baseline. The LM head is therefore drawn with
`--logit-std` 40 (the standard deviation of the logits), which makes the model sure of many of its tokens, so that the
threshold fires; how often depends on that knob, as for a trained model it depends on the task: read the `tau` rows
as an illustration (the trained text model of `bench_fast_decoding.py` needed 8-24 steps for 128-256 tokens at
tau = 0.9). The baseline and the cache settings follow a fixed schedule and do not depend on the head. Every other
weight keeps its default init.

Settings: `baseline` (`generate`'s defaults: the official sampler), `dual` (kv_cache="dual"), `tau=0.9`
(confidence_threshold=0.9) and `dual+tau`; `steps = max_new_tokens`, `block_length` 32. Each setting runs a one-block
request untimed (warm-up), then `--repeats` timed requests; medians are reported. tokens/s = answer positions decoded
(batch x max_new_tokens: random weights have no meaningful end token) per wall second of `generate` (the processor's
time is reported apart). The vision tower's time is measured by forward hooks (synchronised on a GPU), and its calls
are counted: one per `generate` call, whatever the setting, or the script stops.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_llada_v.py
    .venv/bin/python benchmarks/bench_llada_v.py --device cuda --size official --dtype bfloat16 --lengths 128 256 \
        --batches 1 4 --repeats 3
"""

import argparse
import statistics
import time

import torch
from bench_fast_decoding import sync
from PIL import Image


SETTINGS = {
    "baseline": {},
    "dual": {"kv_cache": "dual"},
    "tau=0.9": {"confidence_threshold": 0.9},
    "dual+tau": {"kv_cache": "dual", "confidence_threshold": 0.9},
}
QUESTION = "What is in the image? Describe it in detail."
SIZES = {
    "small": {
        "text": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4),
        "vision": dict(hidden_size=192, intermediate_size=768, num_hidden_layers=4, num_attention_heads=3,
                       image_size=112, patch_size=14, vision_use_head=False),
        "grid": 3,
        "vocab": 512,
    },
    "official": {"text": {}, "vision": None, "grid": 6, "vocab": 126464},  # LladaConfig's / LladaVConfig's defaults
}


def build(args):
    """A random-weight LLaDA-V of `args.size` and its processor (a small trained tokenizer; `<image>` added)."""
    from llada_hf import LladaConfig, LladaVConfig, LladaVForConditionalGeneration, LladaVProcessor
    from llada_hf.processing_llada_v import SYSTEM_PROMPT, official_image_processor
    from llada_hf.tokenization import model_token_ids, train_tokenizer

    size = SIZES[args.size]
    tokenizer = train_tokenizer([SYSTEM_PROMPT, QUESTION, "a photo of a cat on a red mat"], vocab_size=300)
    vision = LladaVConfig(vision_config=size["vision"]).vision_config  # None: the official tower's sizes
    crop = vision.image_size
    pinpoints = [[crop * h, crop * w] for w in range(1, size["grid"] + 1) for h in range(1, size["grid"] + 1)]
    processor = LladaVProcessor(official_image_processor(crop, pinpoints), tokenizer,
                                num_image_tokens=(crop // vision.patch_size) ** 2)
    processor.tokenizer.padding_side = "left"
    ids = model_token_ids(tokenizer) | {"vocab_size": size["vocab"]}  # spare embedding rows, as the official model
    config = LladaVConfig(text_config=LladaConfig(**size["text"], **ids), vision_config=vision.to_dict(),
                          image_token_id=processor.image_token_id, image_grid_pinpoints=pinpoints)
    torch.manual_seed(0)
    with torch.device(args.device):
        model = LladaVForConditionalGeneration(config).to(getattr(torch, args.dtype)).eval()
    with torch.no_grad():
        hidden = config.text_config.hidden_size
        model.lm_head.weight.normal_(0.0, args.logit_std / hidden**0.5)  # logits ~ N(0, logit_std²)
    return model, processor


def picture(width: int = 400, height: int = 300) -> Image.Image:
    """A smooth colour gradient with some noise (deterministic)."""
    x = torch.linspace(0, 1, width)[None, :, None]
    y = torch.linspace(0, 1, height)[:, None, None]
    noise = torch.rand(height, width, 3, generator=torch.Generator().manual_seed(0))
    pixels = torch.cat([x.expand(height, width, 1), y.expand(height, width, 1), (x * y).expand(height, width, 1)], -1)
    return Image.fromarray((255 * (0.8 * pixels + 0.2 * noise)).to(torch.uint8).numpy(), "RGB")


class TowerClock:
    """Forward hooks on the vision tower: its calls and its wall time (synchronised on a GPU)."""

    def __init__(self, tower: torch.nn.Module, device: str):
        self.device, self.calls, self.seconds, self._start = device, 0, 0.0, None
        tower.register_forward_pre_hook(self._before)
        tower.register_forward_hook(self._after)

    def reset(self) -> None:
        self.calls, self.seconds = 0, 0.0

    def _before(self, module, inputs) -> None:
        sync(self.device)
        self._start = time.perf_counter()

    def _after(self, module, inputs, output) -> None:
        sync(self.device)
        self.seconds += time.perf_counter() - self._start
        self.calls += 1


BLOCK_LENGTH = 32


def request(model, processor, clock: TowerClock, device: str, length: int, batch: int, settings: dict) -> dict:
    """One request (`batch` copies of the question about the picture): processor, `generate` and tower seconds, NFE.
    Stops the script if the vision tower did not run exactly once."""
    content = [{"type": "image", "image": picture()}, {"type": "text", "text": QUESTION}]
    messages = [{"role": "user", "content": content}]
    start = time.perf_counter()
    inputs = processor.apply_chat_template([messages] * batch, add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="pt",
                                           processor_kwargs={"padding": True}).to(device)
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    preprocess = time.perf_counter() - start
    clock.reset()
    sync(device)
    start = time.perf_counter()
    out = model.generate(**inputs, max_new_tokens=length, steps=length, block_length=BLOCK_LENGTH,
                         return_dict_in_generate=True, **settings)
    sync(device)
    seconds = time.perf_counter() - start
    if clock.calls != 1:
        raise SystemExit(f"the vision tower ran {clock.calls} times in one generate call (expected once)")
    return {"preprocess": preprocess, "generate": seconds, "tower": clock.seconds, "nfe": out.nfe,
            "prompt": inputs["input_ids"].shape[1],
            "image": int((inputs["input_ids"][0] == processor.image_token_id).sum())}


def measure(model, processor, clock: TowerClock, args, length: int, batch: int, settings: dict) -> dict:
    """Median figures of `args.repeats` requests, after a one-block warm-up request (one-off costs)."""
    request(model, processor, clock, args.device, BLOCK_LENGTH, batch, settings)
    runs = [request(model, processor, clock, args.device, length, batch, settings) for _ in range(args.repeats)]
    median = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
    median["tokens_per_s"] = batch * length / median["generate"]
    return median


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--size", default="small", choices=list(SIZES))
    parser.add_argument("--logit-std", type=float, default=40.0, help="standard deviation of the LM head's logits")
    parser.add_argument("--lengths", type=int, nargs="+", default=[128], help="max_new_tokens values")
    parser.add_argument("--batches", type=int, nargs="+", default=[1])
    parser.add_argument("--repeats", type=int, default=1, help="timed requests per setting (after one warm-up)")
    args = parser.parse_args()

    started = time.perf_counter()
    model, processor = build(args)
    clock = TowerClock(model.model.vision_tower, args.device)
    tower_params = sum(p.numel() for p in model.model.vision_tower.parameters())
    print(f"torch {torch.__version__}, device {args.device}, {args.dtype}, threads {torch.get_num_threads()}, "
          f"size {args.size}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters "
          f"(vision tower {tower_params / 1e6:.1f}M), logit std {args.logit_std}")
    print("\n| max_new_tokens | batch | prompt positions (image) | setting | tokens/s (speed-up) | NFE | generate s "
          "| vision tower s (share) | tower calls | processor s |")
    print("|---" * 10 + "|")
    for length in args.lengths:
        for batch in args.batches:
            base = None
            for name, settings in SETTINGS.items():
                m = measure(model, processor, clock, args, length, batch, settings)
                base = base or m["tokens_per_s"]
                print(f"| {length} | {batch} | {m['prompt']} ({m['image']}) | {name} | {m['tokens_per_s']:.1f} "
                      f"({m['tokens_per_s'] / base:.1f}x) | {m['nfe']:.0f} | {m['generate']:.2f} | {m['tower']:.3f} "
                      f"({100 * m['tower'] / m['generate']:.1f} %) | 1 | {m['preprocess']:.3f} |", flush=True)
    print(f"\ntotal time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
