"""`rsx init`, `rsx info` and `rsx check`: creating a lab, describing it, verifying it."""

from __future__ import annotations

import dataclasses
import json
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from resynth_index.cli.app import cli, open_lab
from resynth_index.config import DATABASE_FILE

if TYPE_CHECKING:
    from resynth_index.lab import Lab
    from resynth_index.store.integrity import Finding
    from resynth_index.store.stats import IndexFileState


@cli.command()
@click.option(
    "--embedder",
    default="toy",
    show_default=True,
    help="'toy', 'local-dir:FOLDER' (open_clip_config.json + weights) or 'ARCH@WEIGHTS_FILE'.",
)
@click.option("--layer", type=click.IntRange(min=1), help="Use the class token of this ViT block.")
@click.option("--threshold", type=float, help="Distance above which the verdict is 'unknown'.")
@click.option(
    "--precision",
    type=click.Choice(["auto", "fp32", "fp16", "bf16"]),
    default="auto",
    show_default=True,
    help="Embedder precision, fixed with the lab ('auto': fp16 on CUDA, else fp32).",
)
@click.option(
    "--database",
    metavar="URL",
    help="Keep the store on PostgreSQL (postgresql+psycopg://USER@HOST:PORT/DB; the password"
    " comes from PGPASSWORD or ~/.pgpass, never the URL). Default: the lab's SQLite file.",
)
@click.option(
    "--blobs",
    type=click.Path(file_okay=False, path_type=Path),
    help="Content-addressed blob folder, possibly shared by several labs. Default: LAB/blobs.",
)
@click.pass_context
def init(
    ctx: click.Context,
    embedder: str,
    layer: int | None,
    threshold: float | None,
    precision: str,
    database: str | None,
    blobs: Path | None,
) -> None:
    """Create a lab. Its embedder is fixed here, for good.

    \b
    Examples:
      rsx --lab ./lab init                       # the toy embedder
      rsx --lab ./lab init --embedder ViT-L-14-336@/models/clip-l-336.safetensors --layer 12
      rsx --lab ./lab init --embedder local-dir:/models/my-clip
      rsx --lab ./lab init --database postgresql+psycopg://rsx@db.lan:5432/rsx --blobs /shared/blobs
    """
    from resynth_index.lab import Lab

    lab = Lab.create(
        ctx.obj["lab_dir"],
        embedder=embedder,
        layer=layer,
        device=ctx.obj["device"] or "auto",
        precision=precision,
        database=database,
        blobs=blobs,
    )
    if threshold is not None:
        lab.settings.unknown_threshold = threshold
        lab.settings.save(lab.root)
    click.echo(
        f"created lab {lab.root} (embedder {embedder}, fingerprint {lab.fingerprint[:12]}, "
        f"dim {lab.settings.embedder_dim})"
    )
    if lab.settings.database_url:
        click.echo(f"database: {lab.settings.database_url}")
    if lab.settings.blobs:
        click.echo(f"blobs: {lab.blobs.root}")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON object instead of the table.")
@click.pass_context
def info(ctx: click.Context, as_json: bool) -> None:
    """Describe the lab: where it is, its schema, embedder, generators, counts and sizes.

    Reads the database, the sizes of its folders and the index file's header; loads no model.

    \b
    Examples:
      rsx --lab ./lab info
      rsx --lab ./lab info --json | jq .counts
    """
    lab = open_lab(ctx)
    facts = _lab_facts(lab)
    if as_json:
        click.echo(json.dumps(facts, sort_keys=True))
        return
    for name, text in _describe(facts):
        click.echo(f"{name:<11}{text}")


def _lab_facts(lab: Lab) -> dict[str, Any]:
    """Everything ``rsx info`` reports, as the JSON object ``--json`` prints."""
    from resynth_index.store import migrate, repository, stats

    with lab.session() as session:
        counts = stats.store_counts(session, lab.fingerprint)
        generators = repository.list_generators(session, include_retired=True)
    current, head = migrate.current_revision(lab.engine), migrate.head_revision(lab.engine)
    index = stats.index_file_state(lab.index_path)
    settings = lab.settings
    url = lab.engine.url
    if url.get_backend_name() == "sqlite":
        database = lab.root / DATABASE_FILE
        wal = database.with_name(database.name + "-wal")
        store = {
            "url": None,
            "path": str(database.resolve()),
            "bytes": _file_size(database),
            "wal_bytes": _file_size(wal),
        }
    else:  # a server's database: its size is the server's business
        store = {
            "url": url.render_as_string(hide_password=True),
            "path": None,
            "bytes": None,
            "wal_bytes": None,
        }
    folders = {
        "blobs": lab.blobs.root,
        "index": lab.index_path.parent,
        "models": lab.root / "models",
    }
    return {
        "lab": str(lab.root.resolve()),
        "database": store,
        "schema": {"current": current, "head": head, "up_to_date": current == head},
        "embedder": {
            "label": settings.embedder_label,
            "fingerprint": settings.embedder_fingerprint,
            "dim": settings.embedder_dim,
            "layer": settings.embedder.get("layer"),
            "precision": settings.embedder_precision or None,
        },
        "generators": {
            "active": sum(1 for row in generators if row.retired_at is None),
            "retired": sum(1 for row in generators if row.retired_at is not None),
            "list": [
                {"name": row.name, "kind": row.kind, "retired": row.retired_at is not None}
                for row in generators
            ],
        },
        "counts": {
            "images": counts.images,
            "captions": counts.captions,
            "resyntheses": counts.resyntheses,
            "references": counts.references,
            "embeddings": counts.embeddings,
            "other_embeddings": counts.other_embeddings,
            "queries": counts.queries,
            "pending_work_orders": counts.pending_work_orders,
        },
        "disk": {
            name: {"path": str(folder.resolve()), **dataclasses.asdict(stats.disk_usage(folder))}
            for name, folder in folders.items()
        },
        "index": {
            "path": str(lab.index_path.resolve()),
            "exists": index.exists,
            "bytes": index.bytes,
            "vectors": index.vectors,
            "watermark": index.watermark,
            "database_embeddings": counts.embeddings,
            "database_max_id": counts.embedding_max_id,
            "state": _index_state(lab, index, counts.embeddings, counts.embedding_max_id),
            "problem": index.problem,
        },
    }


def _index_state(lab: Lab, index: IndexFileState, db_count: int, db_max_id: int) -> str:
    """The index file against the database, in a few words."""
    if not index.exists:
        return (
            "none yet"
            if db_count == 0
            else "missing (rsx index sync or check --repair rebuilds it)"
        )
    if index.problem is not None:
        return "unreadable (rsx index sync or check --repair rebuilds it)"
    if index.fingerprint != lab.fingerprint or index.dim != lab.settings.embedder_dim:
        return "made by another embedder (rsx index sync or check --repair rebuilds it)"
    if index.vectors == db_count and index.watermark == db_max_id:
        return "in step with the database"
    if (index.watermark or -1) < db_max_id:
        return "behind the database (rsx index sync or the next ingest catches up)"
    return "does not match the database (run rsx check)"


def _describe(facts: dict[str, Any]) -> list[tuple[str, str]]:
    """The lines of ``rsx info``'s table: (name, text)."""
    database, schema, embedder = facts["database"], facts["schema"], facts["embedder"]
    lab_root = Path(facts["lab"])
    generators, counts, disk, index = (
        facts["generators"],
        facts["counts"],
        facts["disk"],
        facts["index"],
    )
    if database["path"] is None:
        where = database["url"]
    else:
        wal = database["wal_bytes"]
        where = f"{database['path']} ({_human(database['bytes'])}"
        where += f", write-ahead log {_human(wal)})" if wal else ")"
    status = "up to date" if schema["up_to_date"] else f"code expects {schema['head']}"
    names = ", ".join(
        f"{g['name']} ({g['kind']}{', retired' if g['retired'] else ''})"
        for g in generators["list"]
    )
    layer = embedder["layer"] if embedder["layer"] is not None else "final"
    precision = embedder["precision"] or "not recorded"
    counted = ", ".join(
        _plural(counts[key], one, many)
        for key, one, many in (
            ("images", "image", "images"),
            ("captions", "caption", "captions"),
            ("resyntheses", "resynthesis", "resyntheses"),
            ("references", "reference", "references"),
            ("embeddings", "embedding", "embeddings"),
            ("queries", "query", "queries"),
            ("pending_work_orders", "pending work order", "pending work orders"),
        )
    )
    if counts["other_embeddings"]:
        others = _plural(counts["other_embeddings"], "embedding", "embeddings")
        counted += f" ({others} by other embedders or layers)"
    sizes = ", ".join(
        f"{name}/ {_human(usage['bytes'])} ({_plural(usage['files'], 'file', 'files')})"
        + ("" if Path(usage["path"]) == lab_root / name else f" at {usage['path']}")
        for name, usage in disk.items()
    )
    if index["vectors"] is None:
        held = index["problem"] or "no file"
    else:
        held = f"{_plural(index['vectors'], 'vector', 'vectors')}, watermark {index['watermark']}"
    return [
        ("lab", facts["lab"]),
        ("database", where),
        ("schema", f"{schema['current']} ({status})"),
        (
            "embedder",
            f"{embedder['label']}  fingerprint {embedder['fingerprint'][:12]}  dim "
            f"{embedder['dim']}  layer {layer}  precision {precision}",
        ),
        (
            "generators",
            f"{generators['active']} active, {generators['retired']} retired"
            + (f": {names}" if names else ""),
        ),
        ("counts", counted),
        ("disk", sizes),
        (
            "index",
            f"{Path(index['path']).name}: {held}; database"
            f" {_plural(index['database_embeddings'], 'embedding', 'embeddings')},"
            f" max id {index['database_max_id']}: {index['state']}",
        ),
    ]


def _plural(count: int, one: str, many: str) -> str:
    """``1 file``, ``2 files``, ``0 files``: a count with the noun it agrees with."""
    return f"{count} {one if count == 1 else many}"


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _human(size: int) -> str:
    """Bytes for people: 512 B, 3.4 KiB, 1.2 GiB."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{size} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


#: Problems of one kind shown before "... and N more" (``rsx check --all`` shows every one).
SHOWN_PER_KIND = 5


@cli.command()
@click.option("--repair", is_flag=True, help="Rebuild what can be derived; name what cannot.")
@click.option(
    "--force",
    is_flag=True,
    help="With --repair: quarantine orphan blobs even when the database holds no image, when"
    " they are many (over 10 % of the blobs) or when the index holds vectors the database"
    " lacks, and rebuild such an index.",
)
@click.option(
    "--purge-quarantine",
    is_flag=True,
    help="With --repair: delete the blobs earlier repairs moved to the lab's quarantine.",
)
@click.option(
    "--all", "show_all", is_flag=True, help="Every problem, not the first few of each kind."
)
@click.pass_context
def check(
    ctx: click.Context, repair: bool, force: bool, purge_quarantine: bool, show_all: bool
) -> None:
    """Verify the database against the blob store and the vector index.

    Prints the problems (the first few of each kind), what was repaired, what cannot be, then
    a summary line and the fix to run. Exits non-zero when any problem remains. Files in the
    blob store that it never writes are named and left alone. A repair never deletes a blob:
    orphan blobs go to the lab's quarantine folder, and stay where they are while the database
    holds no image or the index remembers vectors the database lacks (a lost or old database
    is restored, not repaired around).

    \b
    Examples:
      rsx --lab ./lab check
      rsx --lab ./lab check --repair
      rsx --lab ./lab check --all          # every orphan blob, not the first few
      rsx --lab ./lab check --repair --purge-quarantine
    """
    if (force or purge_quarantine) and not repair:
        raise click.UsageError("--force and --purge-quarantine go with --repair")
    lab = open_lab(ctx)
    from resynth_index.pipeline.check import check as check_the_lab

    report = check_the_lab(lab, repair, force=force, purge_quarantine=purge_quarantine)
    shown = None if show_all else SHOWN_PER_KIND
    for line in report.notes:
        click.echo(f"note: {line}")
    for line in _grouped(report.problems, shown):
        click.echo(f"problem: {line}")
    for line in report.repaired:
        click.echo(f"repaired: {line}")
    for line in _grouped(report.unrepairable, shown):
        click.echo(f"cannot repair: {line}")
    if not report.problems:
        click.echo("ok: database, blobs and index agree")
        return
    summary = report.summary()
    if repair:
        left = report.unrepairable_count()
        click.echo(f"{summary}; {f'{left} cannot be repaired' if left else 'all repaired'}")
    else:
        click.echo(summary)
        repairs = report.repairs()
        if repairs:
            flag = ctx.obj["lab_flag"]
            command = f"rsx --lab {shlex.quote(str(flag))} check" if flag else "rsx check"
            click.echo(f"fix: {command} --repair  ({'; '.join(repairs)})")
            for way in report.otherwise():
                click.echo(f" or: {way}")
    for step in report.by_hand():
        click.echo(f"by hand: {step}")
    if not repair or report.unrepairable:
        sys.exit(1)


def _grouped(findings: Sequence[Finding], shown: int | None) -> list[str]:
    """The lines of ``findings``, kind by kind in order of first appearance: the first ``shown``
    of each kind, then "... and N more <kind>" (every line when ``shown`` is None)."""
    from resynth_index.store.integrity import KINDS

    by_kind: dict[str, list[Finding]] = {}
    for finding in findings:
        by_kind.setdefault(finding.kind, []).append(finding)
    lines: list[str] = []
    for kind, group in by_kind.items():
        lines.extend(f.text for f in (group if shown is None else group[:shown]))
        hidden = 0 if shown is None else len(group) - shown
        if hidden > 0:
            plural = KINDS[kind].plural or kind
            lines.append(f"... and {hidden} more {kind if hidden == 1 else plural}")
    return lines
