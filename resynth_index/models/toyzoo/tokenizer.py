"""The real CLIP BPE tokenizer, built offline from the vocabulary file that open_clip ships.

Diffusers text-to-image pipelines need a ``transformers.CLIPTokenizer``; normally it is downloaded
with the weights. open_clip carries CLIP's merge list (``bpe_simple_vocab_16e6.txt.gz``), from which
CLIP's 49,408-token vocabulary is derived deterministically, so the toy pipelines get a genuine CLIP
tokenizer without any network access.
"""

from __future__ import annotations

import functools
import gzip
import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import CLIPTokenizer

#: Merge lines used by CLIP: the file's first line is a header, then 49152 - 256 - 2 merges.
_MERGE_COUNT = 49152 - 256 - 2
VOCAB_SIZE = 49408
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"


def _byte_alphabet() -> list[str]:
    """The 256 characters standing for bytes (GPT-2/CLIP byte-level BPE), in CLIP's vocab order.

    Printable Latin-1 bytes map to themselves and come first; the other bytes map to 256, 257, ...
    and follow, in byte order.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    others = [byte for byte in range(256) if byte not in set(printable)]
    return [chr(byte) for byte in printable] + [chr(256 + n) for n in range(len(others))]


def _bpe_file() -> Path:
    """open_clip's merge list, located without importing open_clip (that import takes seconds)."""
    import importlib.util

    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("open_clip is not installed: it provides the CLIP BPE vocabulary")
    return Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"


def clip_vocabulary() -> tuple[dict[str, int], list[str]]:
    """CLIP's token -> id map and its merge lines ("a b"), in CLIP's order."""
    lines = gzip.open(_bpe_file(), "rt", encoding="utf-8").read().split("\n")
    merges = lines[1 : 1 + _MERGE_COUNT]
    alphabet = _byte_alphabet()
    tokens = alphabet + [symbol + "</w>" for symbol in alphabet]
    tokens += ["".join(merge.split()) for merge in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    return {token: index for index, token in enumerate(tokens)}, merges


@functools.lru_cache(maxsize=1)
def clip_tokenizer() -> CLIPTokenizer:
    """A ``transformers.CLIPTokenizer`` with CLIP's real vocabulary, built without a download.

    The vocabulary is written as ``vocab.json`` + ``merges.txt`` (the layout every transformers
    version reads) and loaded from that temporary folder. Cached: build once per process.
    """
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocabulary()
    if len(vocab) != VOCAB_SIZE:  # the construction is fixed; guard against a changed BPE file
        raise RuntimeError(f"CLIP vocabulary has {len(vocab)} tokens, expected {VOCAB_SIZE}")
    with tempfile.TemporaryDirectory(prefix="rsx-clip-tok-") as tmp:
        folder = Path(tmp)
        (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), "utf-8")
        (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", "utf-8")
        tokenizer = CLIPTokenizer.from_pretrained(
            str(folder), local_files_only=True, model_max_length=77
        )
    if len(tokenizer) != VOCAB_SIZE:
        raise RuntimeError(f"CLIP tokenizer has {len(tokenizer)} tokens, expected {VOCAB_SIZE}")
    return tokenizer
