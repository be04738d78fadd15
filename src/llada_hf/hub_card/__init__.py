"""Hub model cards and publishing for LLaDA checkpoints (weights, config, generation config, tokenizer,
the bundle's code and the card, uploaded in one commit).

```python
from llada_hf.hub_card import publish
publish(model, tokenizer, "your-username/llada-tiny-sft", dry_run=True).files  # what would be uploaded
publish(model, tokenizer, "your-username/llada-tiny-sft")                      # upload, one commit
publish(vision_model, processor, "your-username/llada-v-tiny")                  # LLaDA-V: with its processor
```
"""

from .card import CheckpointFacts, render_model_card
from .publish import PublishError, PublishResult, add_card_and_code, publish, publish_folder


__all__ = [
    "render_model_card",
    "publish",
    "publish_folder",
    "add_card_and_code",
    "PublishResult",
    "PublishError",
    "CheckpointFacts",
]
