"""Quieter libraries: no progress bars from datasets and transformers (for logs and the demo's own output)."""


def disable_progress_bars() -> None:
    """No progress bars from datasets ("Generating train split", "Map") and transformers ("Loading weights",
    "Writing model shards")."""
    import datasets

    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()


def quiet_libraries() -> None:
    """No progress bars from datasets (dataset preparation) and transformers (loading and saving weights), and only
    transformers' errors."""
    import transformers

    disable_progress_bars()
    transformers.utils.logging.set_verbosity_error()


__all__ = ["disable_progress_bars", "quiet_libraries"]
