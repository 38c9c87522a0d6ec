"""Normalising untrusted text (captions, prompts found in files) before it is hashed or compared."""

from __future__ import annotations

import unicodedata


def normalise_caption(text: str) -> str:
    """Unicode NFC, control characters and whitespace runs become one space, ends stripped.

    Case is kept: generators treat "Paris" and "paris" differently.
    """
    text = unicodedata.normalize("NFC", text)
    text = "".join(" " if unicodedata.category(ch) == "Cc" else ch for ch in text)
    return " ".join(text.split())
