"""``layer-N`` signals: the resynthesis distance read at vision block N of the lab's own embedder.

Shared by ``rsx query --method fused``, ``rsx calibrate --method fused`` and ``rsx eval``
(``evaluation.fusion``), so the three measure the same thing:

- the lab's embedder model (same weights, precision and device; the one the lab already holds
  when it is an open_clip one) is read at several blocks in **one** forward pass
  (``forward_intermediates`` with several indices, stopping after the deepest): block N's vector
  is the class token of its output, L2-normalised, exactly what an embedder built with
  ``EmbedderSpec(layer=N)`` gives (``models.embedders``);
- each block's vectors of stored images are kept in the embeddings table under that block's own
  embedder fingerprint (the fingerprint ``rsx init --layer N`` would record), so a resynthesis is
  read at a block once, whatever asks; the lab's index, ``rsx check`` and every query of the
  lab's own embedder read only the lab's fingerprint and never see them;
- a query's distance to a candidate at block N is the lab's distance and aggregation over the
  candidate's resyntheses, as for the lab's own layer (``layer_distance_matrix``).
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from resynth_index.attribution.evidence.resynthesis import distance_matrix
from resynth_index.errors import RsxError
from resynth_index.store import embeddings

if TYPE_CHECKING:
    import PIL.Image

    from resynth_index.lab import Lab

LAYER_PREFIX = "layer-"


def layer_signal(layer: int) -> str:
    """The signal name of block ``layer``: ``layer-2``."""
    return f"{LAYER_PREFIX}{layer}"


def signal_layer(name: str) -> int | None:
    """The block of a ``layer-N`` signal name; None for any other signal."""
    if name.startswith(LAYER_PREFIX) and name[len(LAYER_PREFIX) :].isdigit():
        return int(name[len(LAYER_PREFIX) :])
    return None


def parse_layers(text: str | None, option: str = "--fusion-layers") -> tuple[int, ...]:
    """``"1,2,3"`` -> (1, 2, 3) (sorted, once each); empty -> (). Refused in one line otherwise."""
    if not text or not text.strip():
        return ()
    try:
        layers = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        layers = [0]
    if not layers or any(layer < 1 for layer in layers):
        raise RsxError(f"cannot read {option} {text!r}: give block numbers from 1, like 1,2,3")
    return tuple(sorted(set(layers)))


class LayerReader:
    """The lab's embedder read at several vision blocks in one forward pass.

    ``fingerprints`` maps each block to the fingerprint of an embedder built at that block;
    ``images_read`` counts the images passed through the model (tests count re-embedding).
    """

    def __init__(self, model: Any, layers: Sequence[int], fingerprints: Mapping[int, str]) -> None:
        self.model = model  # an OpenClipEmbedder
        self.layers = tuple(sorted(set(layers)))
        self.fingerprints = dict(fingerprints)
        self.dim = int(model.model.visual.transformer.width)
        self.images_read = 0

    def embed(
        self, images: Sequence[PIL.Image.Image], batch_size: int = 32
    ) -> dict[int, np.ndarray]:
        """block -> (n, width) float32 vectors, rows L2-normalised; one forward per batch."""
        import torch

        parts: dict[int, list[np.ndarray]] = {layer: [] for layer in self.layers}
        model = self.model
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            pixels = model.preprocess_batch(chunk)
            with torch.inference_mode():
                batch = pixels.to(device=model.device, dtype=model._input_dtype)
                out = model.model.visual.forward_intermediates(
                    batch,
                    indices=[layer - 1 for layer in self.layers],
                    stop_early=True,
                    intermediates_only=True,
                    output_fmt="NLC",
                    output_extra_tokens=True,
                )
                # the intermediates come in block order, as self.layers is sorted
                prefixes = out["image_intermediates_prefix"]
                for layer, tokens in zip(self.layers, prefixes, strict=True):
                    features = torch.nn.functional.normalize(tokens[:, 0].float(), dim=-1)
                    parts[layer].append(features.cpu().numpy().astype(np.float32, copy=False))
            self.images_read += len(chunk)
        return {
            layer: np.concatenate(chunks) if chunks else np.zeros((0, self.dim), np.float32)
            for layer, chunks in parts.items()
        }


#: Readers kept per open lab and set of blocks, so a long-lived process (``rsx serve``) hashes
#: the weights for the blocks' fingerprints once.
_READERS: weakref.WeakKeyDictionary[Any, dict[tuple[int, ...], LayerReader]] = (
    weakref.WeakKeyDictionary()
)


def layer_reader(lab: Lab, layers: Sequence[int]) -> LayerReader:
    """The lab's embedder read at ``layers``, made once per lab; a block the embedder lacks (or
    an image tower that is not a vision transformer) is refused in one line."""
    key = tuple(sorted(set(layers)))
    if not key:
        raise RsxError("no layers asked for")
    cached = _READERS.setdefault(lab, {})
    if key in cached:
        return cached[key]
    model = _openclip_model(lab)
    count = _block_count(model, lab)
    lacking = [layer for layer in key if not 1 <= layer <= count]
    if lacking:
        raise RsxError(
            f"layer {', '.join(map(str, lacking))} does not exist: the lab's embedder has"
            f" {count} vision transformer blocks (use 1..{count})"
        )
    # each block's fingerprint, as load_embedder(EmbedderSpec(.., layer=N)) would make it
    reader = LayerReader(model, key, {layer: model.fingerprint_at(layer) for layer in key})
    cached[key] = reader
    return reader


def _openclip_model(lab: Lab) -> Any:
    """The lab's open_clip embedder: the one it holds, else one loaded as it would load it."""
    from resynth_index.models.embedders import OpenClipEmbedder, load_embedder

    model = lab.embedder
    if isinstance(model, OpenClipEmbedder):
        return model
    spec = lab.embedder_spec()
    precision = lab.settings.embedder_precision or model.precision
    return load_embedder(spec, lab.device, precision, digests=lab.file_digests)


def _block_count(model: Any, lab: Lab) -> int:
    from open_clip.transformer import VisionTransformer

    visual = model.model.visual
    if not isinstance(visual, VisionTransformer):
        raise RsxError(
            f"layer signals need a vision transformer image tower; the lab's embedder has a"
            f" {type(visual).__name__}"
        )
    return len(visual.transformer.resblocks)


def stored_layer_vectors(
    lab: Lab,
    reader: LayerReader,
    images: Mapping[int, PIL.Image.Image | None],
    batch_size: int | None = None,
) -> dict[int, dict[int, np.ndarray]]:
    """block -> image id -> vector of each listed stored image.

    What the embeddings table holds under each block's fingerprint is read; the images lacking
    a block are read through the model (all blocks in one pass; a picture given is used, None
    loads the image from the blob store) and their vectors stored, so no image is read at a
    block twice.
    """

    ids = list(dict.fromkeys(int(i) for i in images))
    batch_size = batch_size or lab.settings.embedding_batch_size
    with lab.session() as session:
        found = {
            layer: embeddings.vectors_by_image_id(session, ids, fingerprint)
            for layer, fingerprint in reader.fingerprints.items()
        }
    missing = [i for i in ids if any(i not in found[layer] for layer in reader.layers)]
    for start in range(0, len(missing), batch_size):
        chunk = missing[start : start + batch_size]
        pictures = [images[i] if images[i] is not None else lab.stored_image(i) for i in chunk]
        vectors = reader.embed(pictures, batch_size=batch_size)  # type: ignore[arg-type]
        with lab.session() as session:
            for layer, fingerprint in reader.fingerprints.items():
                embeddings.add_embeddings(session, fingerprint, chunk, vectors[layer])
        for layer in reader.layers:
            for image_id, vector in zip(chunk, vectors[layer], strict=True):
                found[layer].setdefault(image_id, vector)
    return found


def layer_distance_matrix(
    queries: np.ndarray,
    resyntheses: Sequence[Sequence[np.ndarray]],
    distance: str,
    aggregation: str,
) -> np.ndarray:
    """(n, C) distance of each query to each candidate's resyntheses, NaN where it has none.

    ``queries``: (n, d) vectors; ``resyntheses``: per query, per candidate, (K, d) vectors. The
    lab's distance and aggregation (``evidence.resynthesis.distance_matrix``).
    """
    return distance_matrix(queries, resyntheses, distance, aggregation)


def layer_distances(
    lab: Lab,
    reader: LayerReader,
    query_ids: Sequence[int],
    resynthesis_ids: Sequence[Sequence[Sequence[int]]],
    *,
    pictures: Mapping[int, PIL.Image.Image] | None = None,
    query_vectors: Mapping[int, np.ndarray] | None = None,
) -> dict[int, np.ndarray]:
    """block -> (n, C) layer distances of n queries to their candidates' resyntheses.

    ``query_ids``: the queries' image ids; ``resynthesis_ids``: per query, per candidate, the
    image ids compared. The queries' vectors are ``query_vectors`` (block -> (n, d), for images
    that exist only in memory, such as post-processed ones) or else the stored ones, made and
    stored when missing (``pictures``: decoded images already at hand, by image id).
    """
    wanted: dict[int, PIL.Image.Image | None] = {}
    if query_vectors is None:
        for image_id in query_ids:
            wanted[int(image_id)] = (pictures or {}).get(int(image_id))
    for per_query in resynthesis_ids:
        for per_candidate in per_query:
            for image_id in per_candidate:
                wanted.setdefault(int(image_id), (pictures or {}).get(int(image_id)))
    vectors = stored_layer_vectors(lab, reader, wanted)
    out: dict[int, np.ndarray] = {}
    for layer in reader.layers:
        if query_vectors is not None:
            matrix = np.asarray(query_vectors[layer])
        else:
            matrix = np.stack([vectors[layer][int(i)] for i in query_ids])
        per = [
            [
                np.stack([vectors[layer][int(i)] for i in ids])
                if len(ids)
                else np.zeros((0, reader.dim), np.float32)
                for ids in per_query
            ]
            for per_query in resynthesis_ids
        ]
        out[layer] = layer_distance_matrix(
            matrix, per, lab.settings.distance, lab.settings.aggregation
        )
    return out
