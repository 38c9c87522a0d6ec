"""Normalising untrusted text (captions, prompts found in files) before it is hashed or compared."""

from __future__ import annotations

import re
import unicodedata

# Unicode category Cc: C0 controls, DEL, C1 controls. Those that are not whitespace to
# str.split() are turned into spaces first; the search and the translation run at C speed, so a
# megabyte of hostile text costs milliseconds.
_CONTROLS_TO_SPACE = {code: " " for code in (*range(0x00, 0x20), *range(0x7F, 0xA0))}
_NON_SPACE_CONTROL = re.compile("[\x00-\x08\x0e-\x1b\x7f-\x84\x86-\x9f]")


def normalise_caption(text: str) -> str:
    """Unicode NFC, control characters and whitespace runs become one space, ends stripped.

    Case is kept: generators treat "Paris" and "paris" differently.
    """
    text = unicodedata.normalize("NFC", text)
    if _NON_SPACE_CONTROL.search(text):
        text = text.translate(_CONTROLS_TO_SPACE)
    return " ".join(text.split())
