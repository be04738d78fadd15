"""What every llada-hf trainer adds to TRL's Hub pushes: the llada-hf model card and the model's code."""

import os
import re

from .common import tokenizer_of


LOCAL_OWNER = "your-name"  # the card's repo id when the run is not pushed (its snippet names a repo)


def _repo_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")[:96] or "llada-model"


class LladaHubMixin:
    """Mixed into a TRL trainer (before it in the bases): `push_to_hub()`, `hub_strategy` checkpoint pushes and saved
    checkpoints carry the llada-hf model card (a usage snippet that runs, the training summary, and the method and
    its settings from `_card_description`) and the model's own code.

    TRL's card would describe a causal LM, and transformers' pushes carry weights and config but not the
    `trust_remote_code` files a stranger needs.
    """

    def _card_description(self) -> str | None:
        """A paragraph for the card: the training method and its settings (`None`: no paragraph)."""
        return None

    def create_model_card(self, model_name: str | None = None, dataset_name: str | None = None, tags=None, **kwargs):
        """Write the llada-hf model card and the model's code into `output_dir`, where `push_to_hub` and
        `hub_strategy` checkpoint pushes upload from."""
        if not self.is_world_process_zero():
            return
        from ..hub_card import add_card_and_code

        repo_id = (
            self.hub_model_id or f"{LOCAL_OWNER}/{_repo_name(model_name or os.path.basename(self.args.output_dir))}"
        )
        try:
            add_card_and_code(
                self.args.output_dir,
                self.model,
                repo_id=repo_id,
                tokenizer=tokenizer_of(self.processing_class),
                trainer=self,
                datasets=dataset_name,
                tags=tags,
                description=self._card_description(),
            )
        except ValueError:
            if self.args.push_to_hub:  # a push would publish a wrong card: say so
                raise
            super().create_model_card(model_name=model_name, dataset_name=dataset_name, tags=tags)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        # Checkpoint pushes copy only weights and config into output_dir: add the card and code first.
        if self.args.hub_strategy != "end":
            self.create_model_card()
        super()._push_from_checkpoint(checkpoint_folder)
