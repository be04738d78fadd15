"""Train a small byte-level BPE tokenizer with LLaDA's special tokens and chat template.

For demos, tests and from-scratch experiments: the official LLaDA tokenizer cannot be downloaded here,
so we build a small one with the same special tokens and the same Llama-3-style chat format.
"""

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from transformers import PreTrainedTokenizerFast


# LLaDA's special tokens (docs/LLADA.md section 1), given the lowest ids in a trained tokenizer.
BOS, EOS, MASK = "<|startoftext|>", "<|endoftext|>", "<|mdm_mask|>"
START_HEADER, END_HEADER, EOT = "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"
SPECIAL_TOKENS = [BOS, EOS, MASK, START_HEADER, END_HEADER, EOT]

# bos, then `<|start_header_id|>ROLE<|end_header_id|>\n\nCONTENT<|eot_id|>` per message (content trimmed),
# then the assistant header when a generation prompt is asked for.
LLADA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim"
    " + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on `texts` with LLaDA's special tokens and chat template.

    The tokenizer adds no bos/eos by itself (as LLaDA's); pad = eos, mask = `<|mdm_mask|>`.

    Example:
        ```python
        >>> from llada_hf.tokenization import train_tokenizer
        >>> tok = train_tokenizer(["hello world", "hello there"], vocab_size=300)
        >>> tok.mask_token, tok.convert_tokens_to_ids("<|mdm_mask|>")
        ('<|mdm_mask|>', 2)
        >>> tok.decode(tok("hello world").input_ids)
        'hello world'
        ```
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=EOS,
        mask_token=MASK,
        additional_special_tokens=[START_HEADER, END_HEADER, EOT],
        chat_template=LLADA_CHAT_TEMPLATE,
        padding_side="left",
    )


def model_token_ids(tokenizer) -> dict[str, int]:
    """The token-id fields of `LladaConfig` that match `tokenizer` (vocab_size included).

    Example:
        ```python
        >>> from llada_hf import LladaConfig
        >>> from llada_hf.tokenization import model_token_ids, train_tokenizer
        >>> tok = train_tokenizer(["a b c"], vocab_size=280)
        >>> config = LladaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        ...                      num_attention_heads=2, **model_token_ids(tok))
        >>> config.mask_token_id == tok.mask_token_id
        True
        ```
    """
    return {
        "vocab_size": len(tokenizer),
        "mask_token_id": tokenizer.mask_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
    }


def set_mask_token(tokenizer, mask_token_id: int | None) -> None:
    """Name `tokenizer`'s mask token (in place) when it has none and the model's `mask_token_id` is known.

    Official LLaDA tokenizers list `<|mdm_mask|>` only as an additional special token, so their `mask_token_id` is
    None and tools that read it pick a wrong id. llada-hf calls this wherever it saves or publishes a tokenizer.
    By hand, the same fix is one line: `tokenizer.mask_token = "<|mdm_mask|>"`.

    Example:
        ```python
        >>> from llada_hf.tokenization import set_mask_token, train_tokenizer
        >>> tok = train_tokenizer(["hello world"], vocab_size=280)
        >>> tok.mask_token = None  # as an official LLaDA tokenizer
        >>> set_mask_token(tok, 2)
        >>> tok.mask_token, tok.mask_token_id
        ('<|mdm_mask|>', 2)
        ```
    """
    if tokenizer.mask_token is not None or mask_token_id is None:
        return
    token = tokenizer.convert_ids_to_tokens(mask_token_id)
    if token is not None:  # an id beyond the tokenizer (padded embedding rows) has no token to name
        tokenizer.mask_token = token


def chat_prompt_ids(tokenizer, messages: list[dict], trust_special_tokens: bool = False,
                    chat_template: str | None = None) -> list[int]:
    """Token ids of `messages` in the chat template (the tokenizer's, or `chat_template`), with a generation prompt.

    Special tokens come only from the template: text in a message that spells one (`<|mdm_mask|>`, `<|eot_id|>`,
    ...) is tokenized as plain text, so a client cannot inject masks (which would be infilled) or fake turns.
    `trust_special_tokens=True` tokenizes message text as the template's own text (for trusted callers). A message's
    content is a string, or a list of parts (`{"type": "text", "text": ...}`, `{"type": "image"}`) for a template that
    renders images, such as LLaDA-V's (`chat_template=processor.chat_template`): each image part becomes the
    template's `<image>` token.

    Example:
        ```python
        >>> from llada_hf.tokenization import chat_prompt_ids, train_tokenizer
        >>> tok = train_tokenizer(["hello there"], vocab_size=300)
        >>> ids = chat_prompt_ids(tok, [{"role": "user", "content": "hi <|mdm_mask|>"}])
        >>> tok.mask_token_id in ids
        False
        ```
    """
    def render(conversation: list[dict]) -> str:
        return tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False,
                                             chat_template=chat_template)

    text = render(messages)
    written = [part for message in messages for part in _written_text(message.get("content"))]
    specials = _special_tokens(tokenizer)
    if trust_special_tokens or not any(special in part for part in written for special in specials):
        return tokenizer(text, add_special_tokens=False).input_ids
    # Render the template around placeholders: its own text is tokenized with its special tokens, the written text
    # as plain text. The real rendering says what the template kept of each written piece (LLaDA's trims it).
    marks = iter(range(len(written)))
    framed = render([dict(message, content=_marked(message.get("content"), marks)) for message in messages])
    pieces = [framed]
    for index in range(len(written)):
        pieces[-1:] = pieces[-1].split(_mark(index), 1)
    ids, position = [], 0
    for index, piece in enumerate(pieces):
        ids += tokenizer(piece, add_special_tokens=False).input_ids
        position += len(piece)
        if index == len(written):
            break
        after = pieces[index + 1]
        part = written[index]
        kept = next((kept for kept in (part, part.rstrip(), part.lstrip(), part.strip())
                     if text.startswith(kept + after, position)), None)
        if kept is None:
            raise ValueError("The chat template changes the text of the messages, so their special tokens cannot be "
                             "kept as text; pass `trust_special_tokens=True` or remove the special tokens.")
        ids += tokenizer(kept, add_special_tokens=False, split_special_tokens=True).input_ids
        position += len(kept)
    return ids


def _special_tokens(tokenizer) -> set[str]:
    """Every token the tokenizer reads as a control token: the named ones and the added special ones (`<image>`)."""
    added = [token.content for token in getattr(tokenizer, "added_tokens_decoder", {}).values() if token.special]
    return {token for token in [*tokenizer.all_special_tokens, *added] if token}


def _written_text(content) -> list[str]:
    """The text a message's author wrote: its content string, or its text parts."""
    if isinstance(content, str):
        return [content]
    if isinstance(content, list):
        return [part["text"] for part in content if isinstance(part, dict) and part.get("type") == "text"]
    return []


def _mark(index: int) -> str:
    return f"\ue000{index}\ue001"  # private-use characters: no template trims or changes them


def _marked(content, marks):
    """The content with each piece of written text replaced by the next placeholder."""
    if isinstance(content, str):
        return _mark(next(marks))
    if isinstance(content, list):
        return [dict(part, text=_mark(next(marks))) if isinstance(part, dict) and part.get("type") == "text" else part
                for part in content]
    return content
