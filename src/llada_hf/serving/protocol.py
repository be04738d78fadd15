"""The OpenAI-compatible request bodies (pydantic), the `generate` settings they turn into, and OpenAI-style errors.

OpenAI fields keep their meaning (`max_tokens`, `temperature`, `top_p`, `stop`, `seed`, `n`, `stream`); the
diffusion settings are extra body fields with `generate`'s names (`steps`, `block_length`, `remasking`,
`kv_cache`, `confidence_threshold`, `cfg_scale`, ...); `drafts: true` adds draft events to a stream. A field
that has no meaning here is refused with a 400 that names it, never ignored. A request turns itself into
`generate` keywords (`to_generate_kwargs`, as vLLM's `to_sampling_params`), and `check_generate_kwargs` checks them
as the engine would, without building a decoding state.
"""

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model

from ..decoding_llada import plan_blocks
from ..generation_llada import DIFFUSION_OPTIONS, HONOURED_FIELDS


class OpenAIError(Exception):
    """An error answered as OpenAI does: `{"error": {"message", "type", "param", "code"}}` with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.kind = kind or _ERROR_TYPES.get(status, "server_error")
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    @classmethod
    def from_validation(cls, problems: list[dict]) -> "OpenAIError":
        """The 400 of a body that does not fit the schema (pydantic's first problem), naming the field."""
        problem = problems[0] if problems else {}
        location = [str(part) for part in problem.get("loc", ()) if part != "body"]
        param = ".".join(location) or None
        if problem.get("type") == "extra_forbidden":
            message = f"Unrecognized request argument supplied: {param}"
        elif problem.get("type") in ("json_invalid", "model_attributes_type") or not location:
            message = "The body must be a JSON object (" + problem.get("msg", "invalid JSON") + ")."
        else:
            message = f"Invalid value for `{param}`: {problem.get('msg', 'invalid')}."
        return cls(400, message, param=param)


_ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
                413: "invalid_request_error", 429: "rate_limit_error", 503: "server_error"}


# ---- diffusion settings accepted as extra body fields ----------------------------------------------

# Every diffusion setting of `DIFFUSION_OPTIONS` that has a command-line flag is a body field with the same name
# (so a new option needs no change here); the engine's own checks validate the values (400 on a bad one).
SERVER_ONLY_OPTIONS = ("allow_beyond_context",)  # the server enforces the context itself


def _diffusion_fields() -> dict:
    fields = {}
    for option in DIFFUSION_OPTIONS:
        if option.cli_type is None or option.name in SERVER_ONLY_OPTIONS:
            continue
        kind = Literal[tuple(option.choices)] if getattr(option, "choices", None) else option.cli_type
        fields[option.name] = (kind | None, Field(None, description=option.help))
    return fields


_DiffusionOptions = create_model("_DiffusionOptions", **_diffusion_fields())
DIFFUSION_SETTINGS = tuple(_DiffusionOptions.model_fields)


class DiffusionFields(_DiffusionOptions):
    """The diffusion settings a request may carry (unset: the server's defaults, then the model's), and the
    sampling filters that OpenAI does not have."""

    top_k: int | None = Field(None, ge=0, description="sampling: keep the k most likely candidates")
    min_p: float | None = Field(None, ge=0, le=1, description="sampling: min-p filtering of the candidates")
    min_tokens: int | None = Field(None, ge=0, description="EOS/EoT are no candidates at the first N positions")
    drafts: bool = Field(False, description="stream a draft event (the whole answer, masks included) per step")


# The request fields that are `generate` settings (besides the answer length), and those `generate` knows under
# another name (an error names the request's field).
GENERATE_FIELDS = (*DIFFUSION_SETTINGS, "temperature", "top_p", "top_k", "min_p", "min_tokens")
GENERATE_NAMES = {"max_tokens": "max_new_tokens", "max_completion_tokens": "max_new_tokens",
                  "min_tokens": "min_new_tokens"}
REQUEST_NAMES = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens"}


# OpenAI fields with no meaning here: (the values that mean "off", why). Anything else is a 400.
REFUSED_OPENAI_FIELDS: dict[str, tuple[tuple, str]] = {
    "logprobs": ((None, False), "log-probabilities are not returned by the diffusion sampler"),
    "top_logprobs": ((None, 0), "log-probabilities are not returned by the diffusion sampler"),
    "logit_bias": ((None, {}), "logit_bias is not supported; use `min_tokens`, `logits_eos_inf`"),
    "presence_penalty": ((None, 0, 0.0), "penalties have no diffusion counterpart"),
    "frequency_penalty": ((None, 0, 0.0), "penalties have no diffusion counterpart"),
    "tools": ((None, []), "tool calling is not supported"),
    "tool_choice": ((None, "none"), "tool calling is not supported"),
    "parallel_tool_calls": ((None,), "tool calling is not supported"),
    "functions": ((None, []), "function calling is not supported"),
    "function_call": ((None, "none"), "function calling is not supported"),
    "response_format": ((None, {"type": "text"}), "only plain text answers are supported"),
    "audio": ((None,), "audio output is not supported"),
    "modalities": ((None, ["text"]), "only text output is supported"),
    "prediction": ((None,), "predicted outputs are not supported"),
    "reasoning_effort": ((None,), "reasoning effort is not supported"),
    "web_search_options": ((None,), "web search is not supported"),
    "service_tier": ((None, "auto", "default"), "service tiers are not supported"),
    "store": ((None, False), "stored completions are not supported"),
    "metadata": ((None, {}), "stored completions are not supported"),
    "echo": ((None, False), "echo is not supported"),
    "best_of": ((None, 1), "best_of is not supported; use `n`"),
    "suffix": ((None, ""), "suffix is not supported on /v1/completions"),
}


class _OpenAIFields(DiffusionFields):
    # Strict types, as OpenAI's API: `true` is no token count and no token id, "5" no integer; NaN and inf are no
    # numbers (a non-strict model would read `"max_tokens": true` as 1 and `"prompt": [true, false]` as ids 1, 0).
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: "StreamOptions | None" = None
    user: str | None = None  # an end-user id: accepted, only logged
    # refused unless off (see REFUSED_OPENAI_FIELDS)
    logprobs: Any = None
    top_logprobs: Any = None
    logit_bias: Any = None
    presence_penalty: Any = None
    frequency_penalty: Any = None

    # the fields that set the answer length (the last one set wins)
    LENGTH_FIELDS: ClassVar[tuple[str, ...]] = ("max_tokens",)

    def to_generate_kwargs(self, defaults: dict) -> dict:
        """The `generate` keywords of this request (as vLLM's `to_sampling_params`): `defaults` (the server's), then
        every setting the request sets, under `generate`'s name (`max_tokens` -> `max_new_tokens`, ...)."""
        names = (*GENERATE_FIELDS, *self.LENGTH_FIELDS)
        return {**defaults, **{GENERATE_NAMES.get(name, name): getattr(self, name) for name in names
                               if getattr(self, name) is not None}}

    def refused(self) -> tuple[str, str] | None:
        """The first field set to something this server cannot do: (name, why)."""
        for name, (off, why) in REFUSED_OPENAI_FIELDS.items():
            value = getattr(self, name, None)
            if not any(value == value_off and type(value) is type(value_off) or value is value_off
                       for value_off in off):
                return name, why
        return None

    def stop_strings(self) -> list[str]:
        """`stop` as a list (at most 4 non-empty strings, as OpenAI)."""
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4:
            raise OpenAIError(400, "`stop` takes at most 4 sequences.", param="stop")
        if any(not stop for stop in stops):
            raise OpenAIError(400, "`stop` sequences must not be empty.", param="stop")
        return stops


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


class ImagePart(BaseModel):
    """An OpenAI `image_url` content part: part of the schema, so that a model that takes no images can say so."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["image_url"]
    image_url: dict[str, Any]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart | ImagePart] | None = None
    name: str | None = None

    def has_images(self) -> bool:
        return isinstance(self.content, list) and any(isinstance(part, ImagePart) for part in self.content)

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content if isinstance(part, TextPart))


class ChatCompletionRequest(_OpenAIFields):
    LENGTH_FIELDS: ClassVar[tuple[str, ...]] = ("max_tokens", "max_completion_tokens")

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: Any = None
    functions: Any = None
    function_call: Any = None
    response_format: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    web_search_options: Any = None
    service_tier: Any = None
    store: Any = None
    metadata: Any = None


class CompletionRequest(_OpenAIFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: Any = None
    best_of: Any = None
    suffix: Any = None

    def prompts(self) -> list[str | list[int]]:
        """The prompts: strings, or lists of token ids."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if prompt and all(isinstance(item, int) for item in prompt):
            return [list(prompt)]
        return list(prompt)


# ---- checking the settings as the engine will ------------------------------------------------------

# The check of each setting alone: the functions `DiffusionGenerationConfig.validate` runs.
SETTING_CHECKS = {**{option.name: option.check for option in DIFFUSION_OPTIONS},
                  **{name: check for name, (check, _) in HONOURED_FIELDS.items()}}


def check_generate_kwargs(model, settings: dict) -> None:
    """Refuse settings the engine would refuse, with the 400 that names the field, before the request is queued.

    These are the checks of `prepare_decoding`, run on the settings alone (no decoding state is built, nothing
    touches the device): each value alone (so the error knows its field), then the settings together (the call's
    generation config, validated as `generate` builds it), then the block plan.
    """
    for name in [name for name in settings if name in SETTING_CHECKS]:
        problem = SETTING_CHECKS[name](settings[name])
        if problem is not None:
            field = REQUEST_NAMES.get(name, name)
            raise _invalid_settings(f"`{field}` {problem}, got {settings[name]!r}.", field)
    try:
        config = model._diffusion_config(None, dict(settings))  # step 1 of `prepare_decoding`: the call's settings
    except (ValueError, TypeError) as error:
        raise _invalid_settings(str(error).strip().splitlines()[0], None) from None
    length = config.max_new_tokens
    try:
        plan_blocks(0, length, config.block_length or length, config.steps or length)
    except ValueError as error:
        raise _invalid_settings(str(error), "steps") from None


def _invalid_settings(message: str, field: str | None) -> OpenAIError:
    return OpenAIError(400, message, param=field, code="invalid_settings")


ChatCompletionRequest.model_rebuild()
CompletionRequest.model_rebuild()
