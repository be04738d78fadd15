"""`llada-hf serve`: the model loading (one process, or tensor parallel under `torchrun`), and uvicorn.

Nothing here imports FastAPI or uvicorn until the server starts. The flags (`add_serve_options`) are declared with the
CLI's parser in `llada_hf_cli`, which imports nothing heavy.
"""

import argparse
import ipaddress
import logging
import os
import signal

from llada_hf_cli import CliError, add_serve_options  # noqa: F401  (add_serve_options: its former home)


logger = logging.getLogger("llada_hf.serve")


def check_serve_args(args: argparse.Namespace) -> None:
    for name in ("max_batch", "max_queue", "max_body_bytes", "port", "max_images", "max_image_pixels",
                 "max_image_bytes"):
        value = getattr(args, name)
        if name == "max_body_bytes" and value is None:  # the default: by the model's kind
            continue
        if value is None or value < (0 if name == "port" else 1):
            raise CliError(f"--{name.replace('_', '-')} must be a positive integer, got {value}.")
    if args.port > 65535:
        raise CliError(f"--port must lie in 0..65535, got {args.port}.")
    if args.max_tokens_limit is not None and args.max_tokens_limit < 1:
        raise CliError(f"--max-tokens-limit must be a positive integer, got {args.max_tokens_limit}.")
    for name in ("batch_wait_ms", "join_wait", "step_delay", "shutdown_grace"):
        if getattr(args, name) < 0:
            raise CliError(f"--{name.replace('_', '-')} must be >= 0.")
    if not args.image_fetch_timeout > 0:
        raise CliError(f"--image-fetch-timeout must be > 0 seconds, got {args.image_fetch_timeout}.")
    if args.allowed_local_media_path is not None and not os.path.isdir(args.allowed_local_media_path):
        raise CliError(f"--allowed-local-media-path {args.allowed_local_media_path!r} is not a folder.")
    if args.tensor_parallel and "WORLD_SIZE" not in os.environ:
        raise CliError("--tensor-parallel runs under torchrun: torchrun --nproc_per_node N -m llada_hf.cli serve ...")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_for_serving(args: argparse.Namespace):
    """(model, tokenizer) of a text model folder, or (model, processor) of a LLaDA-V folder; a text model is sharded
    with tensor parallelism under torchrun when asked."""
    import torch

    from transformers import AutoConfig, AutoModel, AutoTokenizer

    import llada_hf  # noqa: F401  (registers the Auto classes)

    from ..loading import check_generation_args, check_model_path, load_model_and_processor

    check_model_path(args.model)
    model_type = AutoConfig.from_pretrained(args.model).model_type
    if model_type not in ("llada", "llada_v"):
        raise CliError(f"{args.model}: `llada-hf serve` serves LLaDA (model_type 'llada') and LLaDA-V ('llada_v') "
                       f"models, not {model_type!r}.")
    if model_type == "llada_v":
        if args.tensor_parallel:
            raise CliError("--tensor-parallel serves text models; serve LLaDA-V on one device.")
        check_generation_args(args)
        return load_model_and_processor(args.model, args.dtype, args.device)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    tokenizer.padding_side = "left"
    if args.tensor_parallel:
        from transformers.distributed import DistributedConfig

        if args.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise CliError(f"--dtype {args.dtype!r} is not supported.")
        dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
        model = AutoModel.from_pretrained(args.model, dtype=dtype,
                                          distributed_config=DistributedConfig(tp_plan="auto")).eval()
        return model, tokenizer
    check_generation_args(args)
    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    model = AutoModel.from_pretrained(args.model, dtype=dtype).to(args.device).eval()
    return model, tokenizer


def run_from_args(args: argparse.Namespace) -> None:
    """Load the model and serve until SIGINT/SIGTERM."""
    from ..loading import generation_kwargs

    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as error:
        raise CliError(f"`llada-hf serve` needs FastAPI and uvicorn: pip install -e '.[serve]' in the llada-hf "
                       f"checkout ({error}).") from None
    check_serve_args(args)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
    model, processor = load_for_serving(args)
    from ..loading import is_vision_processor, text_tokenizer
    from .images import ImageLimits
    from .scheduler import RankMirror, Scheduler, follow

    mirror = None
    if args.tensor_parallel:
        import torch.distributed as dist

        mirror = RankMirror()
        if dist.get_rank() != 0:  # rank 0 serves HTTP; the others replay its engine operations
            from ..decoding_llada import DiffusionEngine

            follow(DiffusionEngine(model), mirror, seed=args.seed)
            return
    scheduler = Scheduler(model, text_tokenizer(processor), max_batch=args.max_batch, max_queue=args.max_queue,
                          batch_wait=args.batch_wait_ms / 1000, join_wait=args.join_wait, step_delay=args.step_delay,
                          seed=args.seed, mirror=mirror)
    images = ImageLimits(max_images=args.max_images, max_pixels=args.max_image_pixels, max_bytes=args.max_image_bytes,
                         allow_urls=args.allow_image_urls, fetch_timeout=args.image_fetch_timeout,
                         local_folder=args.allowed_local_media_path)
    max_body_bytes = args.max_body_bytes or (16 << 20 if is_vision_processor(processor) else 1 << 20)
    serve(model, processor, scheduler, host=args.host, port=args.port, api_key=args.api_key,
          model_name=args.served_model_name or os.path.basename(os.path.normpath(args.model)),
          defaults=generation_kwargs(args), max_tokens_limit=args.max_tokens_limit,
          max_body_bytes=max_body_bytes, shutdown_grace=args.shutdown_grace, log_level=args.log_level,
          trust_special_tokens=args.trust_special_tokens, images=images)


def serve(model, processor, scheduler, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          model_name: str = "llada", defaults: dict | None = None, max_tokens_limit: int | None = None,
          max_body_bytes: int = 1 << 20, shutdown_grace: float = 10.0, log_level: str = "info",
          trust_special_tokens: bool = False, images=None) -> None:
    """Serve `model` (`processor`: a text model's tokenizer, or LLaDA-V's processor) with uvicorn until
    SIGINT/SIGTERM; on the signal, running answers get `shutdown_grace` seconds to finish, then are cancelled (their
    clients get an error), and the process exits. `images`: an `ImageLimits` (LLaDA-V; default: its defaults)."""
    import uvicorn

    from .app import ServerConfig, create_app
    from .images import ImageLimits

    if not is_loopback(host) and api_key is None:
        logger.warning("Serving on %s without --api-key: anyone who can reach this address can use the model.", host)
    context = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    config = ServerConfig(model_name=model_name, api_key=api_key, defaults=dict(defaults or {}),
                          max_tokens_limit=max_tokens_limit or context or 4096, max_body_bytes=max_body_bytes,
                          context=context, trust_special_tokens=trust_special_tokens, images=images or ImageLimits())
    app = create_app(model, processor, scheduler, config)
    uvicorn_config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                                    timeout_graceful_shutdown=shutdown_grace + 5)
    GracefulServer(uvicorn_config, scheduler, shutdown_grace).run()


def _graceful_server_class():
    import uvicorn

    class GracefulServer(uvicorn.Server):
        """uvicorn's server, telling the scheduler to finish or cancel running rows when a signal arrives."""

        def __init__(self, config, scheduler, grace: float):
            super().__init__(config)
            self.scheduler = scheduler
            self.grace = grace

        def handle_exit(self, sig, frame) -> None:
            self.scheduler.begin_shutdown(self.grace)
            super().handle_exit(sig, frame)

        async def shutdown(self, sockets=None) -> None:
            await super().shutdown(sockets)
            # uvicorn raises a captured SIGTERM again once it has shut down (the process then dies of it); the
            # shutdown was graceful, so exit normally instead. A captured Ctrl-C still ends as KeyboardInterrupt.
            self._captured_signals = [sig for sig in self._captured_signals if sig != signal.SIGTERM]

    return GracefulServer


def GracefulServer(config, scheduler, grace: float):  # noqa: N802  (a class made on first use: uvicorn is optional)
    return _graceful_server_class()(config, scheduler, grace)
