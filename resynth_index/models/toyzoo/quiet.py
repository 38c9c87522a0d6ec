"""Saving toy models without progress bars.

transformers and huggingface_hub draw a progress bar while they write model shards ("Writing
model shards"), which would clutter ``rsx demo`` and ``rsx generator add --toy`` for a tiny model
written in milliseconds. ``no_progress_bars`` turns both libraries' bars off for the duration of
a save and puts back what was set before, so a caller's own choice is never changed for good.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def no_progress_bars() -> Iterator[None]:
    """Within the block, transformers and huggingface_hub draw no progress bars."""
    import huggingface_hub.utils as hub_utils
    from transformers.utils import logging as transformers_logging

    hub_was_off = hub_utils.are_progress_bars_disabled()
    transformers_was_on = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()  # turns huggingface_hub's bars off as well
    hub_utils.disable_progress_bars()
    try:
        yield
    finally:
        if transformers_was_on:
            transformers_logging.enable_progress_bar()  # also turns huggingface_hub's on
        if hub_was_off:
            hub_utils.disable_progress_bars()
        else:
            hub_utils.enable_progress_bars()
