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


def chat_prompt_ids(tokenizer, messages: list[dict], trust_special_tokens: bool = False) -> list[int]:
    """Token ids of `messages` in the tokenizer's chat template, with a generation prompt.

    Special tokens come only from the template: text in a message that spells one (`<|mdm_mask|>`, `<|eot_id|>`,
    ...) is tokenized as plain text, so a client cannot inject masks (which would be infilled) or fake turns.
    `trust_special_tokens=True` tokenizes message text as the template's own text (for trusted callers).

    Example:
        ```python
        >>> from llada_hf.tokenization import chat_prompt_ids, train_tokenizer
        >>> tok = train_tokenizer(["hello there"], vocab_size=300)
        >>> ids = chat_prompt_ids(tok, [{"role": "user", "content": "hi <|mdm_mask|>"}])
        >>> tok.mask_token_id in ids
        False
        ```
    """
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    specials = [token for token in tokenizer.all_special_tokens if token]
    contents = [m.get("content") for m in messages]
    if trust_special_tokens or not any(isinstance(c, str) and any(s in c for s in specials) for c in contents):
        return tokenizer(text, add_special_tokens=False).input_ids
    # Render the template around placeholders, then tokenize its own text and the messages' text separately.
    marks = [(f"\ue000{i}\ue001", c) for i, c in enumerate(contents)]
    framed = [dict(m, content=f" {mark} ") if isinstance(c, str) else m for m, (mark, c) in zip(messages, marks)]
    rest = tokenizer.apply_chat_template(framed, add_generation_prompt=True, tokenize=False)
    ids = []
    for mark, content in marks:
        if not isinstance(content, str):
            continue
        head, _, rest = rest.partition(mark)
        if head.endswith(" ") and rest.startswith(" "):  # the template kept the content as it is
            head, rest = head[:-1], rest[1:]
        else:  # the template trims content (LLaDA's does): trim it the same way
            content = content.strip()
        ids += tokenizer(head, add_special_tokens=False).input_ids
        ids += tokenizer(content, add_special_tokens=False, split_special_tokens=True).input_ids
    return ids + tokenizer(rest, add_special_tokens=False).input_ids
