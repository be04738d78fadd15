"""Diffusion generation for LLaDA (bundle module; imports only torch, transformers and siblings)."""


class DiffusionGenerationMixin:
    """Gives `LladaForMaskedDiffusion` its diffusion `generate()`."""

    def generate(self, *args, **kwargs):
        raise NotImplementedError("Diffusion generation is not available yet.")
