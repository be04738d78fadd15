"""The OpenAI-compatible request bodies (pydantic), the diffusion settings they carry, OpenAI-style errors, and
the committed text of an answer as it grows.

OpenAI fields keep their meaning (`max_tokens`, `temperature`, `top_p`, `stop`, `seed`, `n`, `stream`); the
diffusion settings are extra body fields with `generate`'s names (`steps`, `block_length`, `remasking`,
`kv_cache`, `confidence_threshold`, `cfg_scale`, ...); `drafts: true` adds draft events to a stream. A field
that has no meaning here is refused with a 400 that names it, never ignored.
"""

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model


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


_ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
                413: "invalid_request_error", 429: "rate_limit_error", 503: "server_error"}


# ---- diffusion settings accepted as extra body fields ----------------------------------------------

# Every diffusion setting of `DIFFUSION_OPTIONS` that has a command-line flag is a body field with the same name
# (so a new option needs no change here); the engine's own checks validate the values (400 on a bad one).
SERVER_ONLY_OPTIONS = ("allow_beyond_context",)  # the server enforces the context itself


def _diffusion_fields() -> dict:
    from ..generation_llada import DIFFUSION_OPTIONS

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

    def refused(self) -> tuple[str, str] | None:
        """The first field set to something this server cannot do: (name, why)."""
        for name, (off, why) in REFUSED_OPENAI_FIELDS.items():
            value = getattr(self, name, None)
            if not any(value == value_off and type(value) is type(value_off) or value is value_off
                       for value_off in off):
                return name, why
        return None

    def stop_strings(self) -> list[str]:
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

    def answer_length(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_OpenAIFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: Any = None
    best_of: Any = None
    suffix: Any = None

    def answer_length(self) -> int | None:
        return self.max_tokens

    def prompts(self) -> list[str | list[int]]:
        """The prompts: strings, or lists of token ids."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if prompt and all(isinstance(item, int) for item in prompt):
            return [list(prompt)]
        return list(prompt)


def settings_of(request: _OpenAIFields) -> dict:
    """The `generate` keywords a request sets (only what it sets)."""
    names = (*DIFFUSION_SETTINGS, "top_k", "min_p")
    settings = {name: getattr(request, name) for name in names if getattr(request, name) is not None}
    if request.min_tokens is not None:
        settings["min_new_tokens"] = request.min_tokens
    if request.temperature is not None:
        settings["temperature"] = request.temperature
    if request.top_p is not None:
        settings["top_p"] = request.top_p
    return settings


# ---- the committed text of an answer -----------------------------------------------------------------

class AnswerText:
    """The text of one answer as its committed prefix grows: what may be sent now, and when it is whole.

    `update(ids)` takes the committed answer ids (left to right, no masks); the text is cut at the first end token
    (EOS / EoT) or stop string. Text that could still change is held back: a trailing incomplete character
    (byte-level tokens) and an ending that may be the start of a stop string. `update(ids, final=True)` when the
    row is done. `finish_reason` is "stop" (an end token or stop string) or "length".
    """

    def __init__(self, tokenizer, end_token_ids, stop: list[str] | None = None):
        self.tokenizer = tokenizer
        self.end_token_ids = set(end_token_ids)
        self.stop = list(stop or [])
        self.sent = ""
        self.done = False
        self.finish_reason: str | None = None
        self.tokens = 0

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def update(self, ids: list[int], final: bool = False) -> str:
        """The new text that may be sent ("" when none)."""
        if self.done:
            return ""
        end = next((i for i, token in enumerate(ids) if token in self.end_token_ids), None)
        ended = end is not None
        ids = ids[:end] if ended else ids
        text = self.decode(ids)
        stops = [position for position in (text.find(stop) for stop in self.stop) if position >= 0]
        if stops:
            text, ended = text[: min(stops)], True
        if ended or final:
            self.done = True
            self.finish_reason = "stop" if ended else "length"
            safe = text
        else:
            safe = text.rstrip("\ufffd")  # an incomplete UTF-8 character: wait for its other bytes
            hold = max((k for stop in self.stop for k in range(1, len(stop)) if safe.endswith(stop[:k])), default=0)
            safe = safe[: len(safe) - hold]
        self.tokens = len(ids)
        if not safe.startswith(self.sent):  # decoding changed earlier text: send nothing more until it settles
            return ""
        delta, self.sent = safe[len(self.sent):], safe if len(safe) >= len(self.sent) else self.sent
        return delta


ChatCompletionRequest.model_rebuild()
CompletionRequest.model_rebuild()
