"""Which resyntheses a set of captions needs, which are already stored, and making the rest.

A resynthesis is keyed by (generator, caption hash, generation-settings hash, seed). A runnable
generator with K resyntheses per caption needs seeds 0..K-1; whatever of those is stored is
reused, the rest is generated in batches per generator. An imported generator cannot run: any
resynthesis supplied for the caption counts, and a caption it lacks becomes a work order.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from resynth_index.fingerprints import hash_bytes
from resynth_index.images import LoadedImage
from resynth_index.intake import encode_png, store_image
from resynth_index.store import repository
from resynth_index.store.models import GeneratorRow

if TYPE_CHECKING:
    import PIL.Image

    from resynth_index.lab import Lab

Key = tuple[str, str]  # (caption hash, generator name)


@dataclass
class ResynthesisPlan:
    """Stored resynthesis images per (caption, generator), what is missing, what is pending."""

    stored: dict[Key, list[int]] = field(default_factory=lambda: defaultdict(list))
    missing: dict[str, list[tuple[str, int]]] = field(default_factory=lambda: defaultdict(list))
    pending: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))

    def missing_count(self) -> int:
        return sum(len(v) for v in self.missing.values())


def plan_resyntheses(
    lab: Lab,
    caption_hashes: Sequence[str],
    generators: Sequence[GeneratorRow],
    resyntheses: int | None = None,
) -> ResynthesisPlan:
    """Sort every (caption, candidate) into reused, missing (to generate) or pending (imported)."""
    plan = ResynthesisPlan()
    captions = list(dict.fromkeys(caption_hashes))
    by_id = {row.id: row for row in generators}
    with lab.session() as session:
        rows = repository.stored_resyntheses(session, captions, list(by_id))
    found: dict[tuple[str, int], dict[int, int]] = defaultdict(
        dict
    )  # (caption, gen) -> seed->image
    settings_hashes = {row.id: lab.settings_hash(row) for row in generators}
    for row in rows:
        if row.settings_hash == settings_hashes[row.generator_id]:
            found[(row.caption_hash, row.generator_id)][row.seed] = row.image_id
    for caption in captions:
        for generator in generators:
            wanted = resyntheses or lab.resyntheses_per_caption(generator)
            have = found.get((caption, generator.id), {})
            key = (caption, generator.name)
            if generator.kind == "imported":
                plan.stored[key] = [have[s] for s in sorted(have)][:wanted]
                if not have:
                    plan.pending[caption].append(generator.name)
                continue
            for seed in range(wanted):
                if seed in have:
                    plan.stored[key].append(have[seed])
                else:
                    plan.missing[generator.name].append((caption, seed))
    return plan


def generate_missing(
    lab: Lab,
    plan: ResynthesisPlan,
    generators: Sequence[GeneratorRow],
    caption_texts: dict[str, str],
    *,
    batch_size: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[int, PIL.Image.Image]:
    """Generate every missing resynthesis, batched per generator; store each batch as it lands.

    Returns the new images by image id (so they can be embedded without decoding them again).
    The plan is updated in place: generated images join ``stored``.
    """
    from resynth_index.generators.base import GenerationRequest

    batch_size = batch_size or lab.settings.generation_batch_size
    by_name = {row.name: row for row in generators}
    made: dict[int, PIL.Image.Image] = {}
    for name, work in plan.missing.items():
        row = by_name[name]
        model = lab.generator_model(row)
        settings_hash = lab.settings_hash(row)
        for start in range(0, len(work), batch_size):
            chunk = work[start : start + batch_size]
            requests = [GenerationRequest(caption_texts[c], seed) for c, seed in chunk]
            images = model.generate(requests, batch_size=batch_size)
            for (caption, seed), image in zip(chunk, images, strict=True):
                image_id = _store_resynthesis(lab, row, caption, seed, settings_hash, image)
                plan.stored[(caption, name)].append(image_id)
                made[image_id] = image
            if progress is not None:
                progress(len(chunk))
    plan.missing.clear()
    return made


def _store_resynthesis(
    lab: Lab, row: GeneratorRow, caption: str, seed: int, settings_hash: str, image
) -> int:
    data = encode_png(image)
    loaded = LoadedImage(
        sha256=hash_bytes(data),
        data=data,
        format="PNG",
        width=image.width,
        height=image.height,
        image=image,
    )
    image_id, _ = store_image(lab, loaded)
    with lab.session() as session:
        repository.ensure_resynthesis(
            session,
            image_id=image_id,
            generator_id=row.id,
            caption_hash=caption,
            seed=seed,
            settings_hash=settings_hash,
        )
    return image_id


def record_pending(lab: Lab, plan: ResynthesisPlan, generators: Sequence[GeneratorRow]) -> None:
    """Write a work order for every (imported generator, caption) still lacking a resynthesis."""
    by_name = {row.name: row for row in generators}
    with lab.session() as session:
        for caption, names in plan.pending.items():
            for name in names:
                repository.add_pending(session, by_name[name].id, caption)
