"""The ``rsx`` command line: click commands that parse, call the Lab and render. Nothing more.

Heavy modules (the lab, models, torch) load inside the commands that need them, so ``rsx --help``
and ``rsx generator list`` start fast.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from resynth_index import __version__
from resynth_index.config import LAB_ENV, resolve_lab_dir
from resynth_index.errors import RsxError
from resynth_index.models.devices import DEVICE_CHOICES


class RsxGroup(click.Group):
    """Turns every RsxError into one clear line and exit status 1, never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except RsxError as error:
            raise click.ClickException(str(error)) from None


@click.group(cls=RsxGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--lab",
    "lab_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help=f"Lab directory (default: ${LAB_ENV}, else a per-user data directory).",
)
@click.option(
    "--device",
    type=click.Choice(DEVICE_CHOICES),
    default=None,
    help="Where models run (default: the lab's setting, 'auto').",
)
@click.version_option(__version__, prog_name="rsx")
@click.pass_context
def cli(ctx: click.Context, lab_dir: Path | None, device: str | None) -> None:
    """Attribute AI-generated images to their source generator by resynthesis.

    \b
    Quick start (toy models, no downloads):
      rsx demo
    A lab of your own:
      rsx --lab ./lab init --embedder ViT-L-14-336@/models/clip.safetensors --layer 12
      rsx --lab ./lab generator add sd15 --diffusers /models/sd15
      rsx --lab ./lab generator add midjourney --imported
      rsx --lab ./lab query suspect.png --caption "a portrait of an old man"
    """
    ctx.obj = {"lab_dir": resolve_lab_dir(lab_dir), "lab_flag": lab_dir, "device": device}


def _open_lab(ctx: click.Context):
    from resynth_index.lab import Lab

    return Lab.open(ctx.obj["lab_dir"], device=ctx.obj["device"])


def _progress(label: str, total: int):
    """A progress bar on a terminal, nothing otherwise (logs stay clean)."""
    if not sys.stderr.isatty() or total <= 1:
        return None
    return click.progressbar(length=total, label=label, file=sys.stderr)


# --------------------------------------------------------------------------- init / check
@cli.command()
@click.option(
    "--embedder",
    default="toy",
    show_default=True,
    help="'toy', 'local-dir:FOLDER' (open_clip_config.json + weights) or 'ARCH@WEIGHTS_FILE'.",
)
@click.option("--layer", type=click.IntRange(min=1), help="Use the class token of this ViT block.")
@click.option("--threshold", type=float, help="Distance above which the verdict is 'unknown'.")
@click.pass_context
def init(ctx: click.Context, embedder: str, layer: int | None, threshold: float | None) -> None:
    """Create a lab. Its embedder is fixed here, for good.

    \b
    Examples:
      rsx --lab ./lab init                       # the toy embedder
      rsx --lab ./lab init --embedder ViT-L-14-336@/models/clip-l-336.safetensors --layer 12
      rsx --lab ./lab init --embedder local-dir:/models/my-clip
    """
    from resynth_index.lab import Lab

    lab = Lab.create(
        ctx.obj["lab_dir"], embedder=embedder, layer=layer, device=ctx.obj["device"] or "auto"
    )
    if threshold is not None:
        lab.settings.unknown_threshold = threshold
        lab.settings.save(lab.root)
    click.echo(
        f"created lab {lab.root} (embedder {embedder}, fingerprint {lab.fingerprint[:12]}, "
        f"dim {lab.settings.embedder_dim})"
    )


@cli.command()
@click.option("--repair", is_flag=True, help="Rebuild what can be derived; name what cannot.")
@click.pass_context
def check(ctx: click.Context, repair: bool) -> None:
    """Verify the database against the blob store and the vector index.

    Prints one line per problem and exits non-zero when any remains.

    \b
    Examples:
      rsx --lab ./lab check
      rsx --lab ./lab check --repair
    """
    from resynth_index.store.integrity import check_lab

    lab = _open_lab(ctx)
    report = check_lab(lab, repair=repair)
    for line in report.problems:
        click.echo(f"problem: {line}")
    for line in report.repaired:
        click.echo(f"repaired: {line}")
    for line in report.unrepairable:
        click.echo(f"cannot repair: {line}")
    if not report.problems:
        click.echo("ok: database, blobs and index agree")
    elif not repair or report.unrepairable:
        sys.exit(1)


# --------------------------------------------------------------------------- generators
@cli.group(cls=RsxGroup)
def generator() -> None:
    """Register, list and retire candidate generators."""


def _parse_size(value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    try:
        width, height = (int(part) for part in value.lower().split("x"))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not WIDTHxHEIGHT, e.g. 512x512") from None
    if width <= 0 or height <= 0 or width % 8 or height % 8:
        raise click.BadParameter("width and height must be positive multiples of 8")
    return width, height


@generator.command("add")
@click.argument("name")
@click.option(
    "--diffusers",
    "diffusers_path",
    type=click.Path(path_type=Path),
    help="A local diffusers pipeline folder or single-file checkpoint.",
)
@click.option(
    "--config",
    "config_dir",
    type=click.Path(path_type=Path),
    help="For a single-file checkpoint: a local pipeline folder with its configs.",
)
@click.option("--imported", is_flag=True, help="A service the lab cannot run; ingest its images.")
@click.option("--toy", "toy_seed", type=int, help="A toy pipeline built from this seed.")
@click.option("--steps", type=click.IntRange(min=1), help="Denoising steps.")
@click.option("--guidance", type=float, help="Classifier-free guidance scale.")
@click.option("--size", help="Output size WIDTHxHEIGHT.")
@click.option("--scheduler", help="A diffusers scheduler class name, e.g. DDIMScheduler.")
@click.option("--negative-prompt", help="Negative prompt for every resynthesis.")
@click.option("--dtype", type=click.Choice(["auto", "float32", "float16", "bfloat16"]))
@click.option("--resyntheses", type=click.IntRange(min=1), help="Resyntheses per caption (K).")
@click.pass_context
def generator_add(
    ctx,
    name,
    diffusers_path,
    config_dir,
    imported,
    toy_seed,
    steps,
    guidance,
    size,
    scheduler,
    negative_prompt,
    dtype,
    resyntheses,
) -> None:
    """Register a candidate generator. Nothing already stored is recomputed.

    \b
    Examples:
      rsx generator add sd15 --diffusers /models/stable-diffusion-v1-5 --steps 25
      rsx generator add sdxl --diffusers /models/sdxl --size 1024x1024 --resyntheses 3
      rsx generator add midjourney --imported
      rsx generator add toy-a --toy 1
    """
    chosen = [diffusers_path is not None, imported, toy_seed is not None]
    if sum(chosen) != 1:
        raise click.UsageError("give exactly one of --diffusers PATH, --imported, --toy SEED")
    tuning = {
        "steps": steps,
        "guidance": guidance,
        "scheduler": scheduler,
        "negative_prompt": negative_prompt,
        "dtype": dtype,
    }
    parsed_size = _parse_size(size)
    if parsed_size:
        tuning["width"], tuning["height"] = parsed_size
    tuning = {k: v for k, v in tuning.items() if v is not None}
    if imported and tuning:
        raise click.UsageError("an imported generator takes no generation settings")
    lab = _open_lab(ctx)
    if imported:
        row = lab.add_generator(name, "imported", resyntheses=resyntheses)
    else:
        from resynth_index.models.generators.protocol import GenerationSettings

        if toy_seed is not None:
            from resynth_index.models.toyzoo.pipelines import TOY_SETTINGS

            base = TOY_SETTINGS.to_dict()
            row = lab.add_toy_generator(name, toy_seed, resyntheses=resyntheses)
            if tuning:
                raise click.UsageError("a toy generator uses the toy settings; drop the tuning")
        else:
            base = GenerationSettings().to_dict()
            settings = GenerationSettings.from_dict({**base, **tuning})
            row = lab.add_generator(
                name,
                "diffusers",
                source=diffusers_path,
                settings=settings,
                resyntheses=resyntheses,
                config=config_dir,
            )
    click.echo(f"added generator {row.name} ({row.kind}, fingerprint {row.fingerprint[:12]})")


@generator.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.option("--all", "show_all", is_flag=True, help="Include retired generators.")
@click.pass_context
def generator_list(ctx, as_json: bool, show_all: bool) -> None:
    """List the lab's generators.

    \b
    Examples:
      rsx generator list
      rsx generator list --all --json
    """
    lab = _open_lab(ctx)
    rows = lab.generators(include_retired=show_all)
    for row in rows:
        record = {
            "name": row.name,
            "kind": row.kind,
            "source": row.source,
            "settings": json.loads(row.settings_json),
            "fingerprint": row.fingerprint,
            "added_at": row.added_at.isoformat(),
            "retired_at": row.retired_at.isoformat() if row.retired_at else None,
        }
        if as_json:
            click.echo(json.dumps(record, sort_keys=True))
        else:
            state = " (retired)" if row.retired_at else ""
            click.echo(
                f"{row.name:<20} {row.kind:<10} {row.fingerprint[:12]}  {row.source or '-'}{state}"
            )
    if not rows and not as_json:
        click.echo("no generators; add one with 'rsx generator add'")


@generator.command("remove")
@click.argument("name")
@click.pass_context
def generator_remove(ctx, name: str) -> None:
    """Retire a generator: its data stays, it stops being a candidate.

    \b
    Example:
      rsx generator remove sd15
    """
    _open_lab(ctx).retire_generator(name)
    click.echo(f"retired generator {name}")


# --------------------------------------------------------------------------- ingest
@cli.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--role",
    type=click.Choice(["query", "resynthesis", "reference"]),
    default="query",
    show_default=True,
    help="Role of the plain files given.",
)
@click.option("--generator", "generator_name", help="Generator of the plain files given.")
@click.option("--caption", help="Caption of the plain files given.")
@click.option(
    "--layout",
    type=click.Choice(["files", "resynthesis-dataset"]),
    default="files",
    show_default=True,
    help="How to read PATHS.",
)
@click.option("--batch-size", type=click.IntRange(min=1), help="Images per batch.")
@click.pass_context
def ingest(ctx, paths, role, generator_name, caption, layout, batch_size) -> None:
    """Add images, folders and manifests (CSV / JSON lines) to the lab.

    Manifest columns: path, role (query | resynthesis | reference), generator, caption, seed;
    relative paths resolve against the manifest. Re-running is cheap: what is stored is skipped.

    \b
    Examples:
      rsx ingest ./suspects/
      rsx ingest mj_batch.csv
      rsx ingest ./refs/*.png --role reference --generator midjourney
      rsx ingest ~/data/resynthesis-dataset --layout resynthesis-dataset
    """
    from resynth_index.pipeline import ingest as ingest_module

    lab = _open_lab(ctx)
    if layout == "resynthesis-dataset":
        items = [i for p in paths for i in ingest_module.resynthesis_dataset(p)]
    else:
        items = list(
            ingest_module.expand_paths(paths, role=role, generator=generator_name, caption=caption)
        )
    bar = _progress("ingesting", len(items))

    def report_failure(failure) -> None:
        click.echo(f"failed: {failure.path}: {failure.reason}", err=True)

    if bar is None:
        summary = ingest_module.ingest(
            lab,
            items,
            batch_size=batch_size,
            on_failure=report_failure,
            register_missing_as_imported=layout == "resynthesis-dataset",
        )
    else:
        with bar:
            summary = ingest_module.ingest(
                lab,
                items,
                batch_size=batch_size,
                progress=bar.update,
                on_failure=report_failure,
                register_missing_as_imported=layout == "resynthesis-dataset",
            )
    for name in summary.generators_added:
        click.echo(f"registered imported generator {name}")
    click.echo(
        f"ingest: {summary.added} added, {summary.skipped} skipped (already present), "
        f"{summary.failed} failed"
    )
    if summary.failed:
        sys.exit(1)


# --------------------------------------------------------------------------- query
@cli.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--caption", help="The description to resynthesise from (else sidecar/metadata/model)."
)
@click.option("--candidates", help="Comma-separated generator names (default: all active).")
@click.option("--resyntheses", type=click.IntRange(min=1), help="Resyntheses per generator (K).")
@click.option("--no-generate", is_flag=True, help="Use only stored resyntheses.")
@click.option(
    "--captioner",
    type=click.Path(path_type=Path),
    help="A local transformers image-to-text folder for images without a caption.",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per image.")
@click.option(
    "--report",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write a self-contained HTML report.",
)
@click.pass_context
def query(
    ctx, images, caption, candidates, resyntheses, no_generate, captioner, as_json, report
) -> None:
    """Name the generator that most likely made each image.

    \b
    Examples:
      rsx query suspect.png --caption "a lighthouse at dusk, oil painting"
      rsx query a.png b.png --candidates sd15,sdxl,midjourney --json
      rsx query suspect.png --report suspect.html
    """
    from resynth_index.pipeline.query import QueryFailure, run_queries

    lab = _open_lab(ctx)
    names = [n.strip() for n in candidates.split(",") if n.strip()] if candidates else None
    model = None
    captioner_path = captioner or lab.settings.captioner
    if captioner_path:
        from resynth_index.models.captioners import TransformersCaptioner

        model = TransformersCaptioner(captioner_path, device=lab.device)
    results = run_queries(
        lab,
        list(images),
        caption=caption,
        candidates=names,
        resyntheses=resyntheses,
        generate=not no_generate,
        captioner=model,
    )
    failed = 0
    for result in results:
        if isinstance(result, QueryFailure):
            failed += 1
            click.echo(f"failed: {result.image}: {result.error}", err=True)
            if as_json:
                click.echo(json.dumps({"image": result.image, "error": result.error}))
            continue
        if as_json:
            click.echo(json.dumps(result.to_json(), sort_keys=True))
        else:
            click.echo(_render_result(result))
    if report:
        from resynth_index.report import write_report

        write_report(lab, [r for r in results if not isinstance(r, QueryFailure)], report)
        click.echo(f"report written to {report}", err=as_json)
    if failed:
        sys.exit(1)


def _render_result(result) -> str:
    lines = [
        f"{result.image}  sha256 {result.sha256[:12]}",
        f"  caption ({result.caption_source}): {result.caption[:100]}",
        f"  verdict: {result.verdict}"
        + (f"  (margin {result.margin:.4f})" if result.margin is not None else ""),
        f"  {'generator':<20} {'distance':>9} {'score':>7}  resyntheses",
    ]
    for entry in result.ranking:
        lines.append(
            f"  {entry.generator:<20} {entry.distance:>9.4f} {entry.score:>7.3f}  "
            f"{len(entry.distances)}"
        )
    extra = [f"generated {result.generated}", f"reused {result.reused}"]
    if result.pending:
        extra.append(f"pending (imported, no resynthesis yet): {', '.join(result.pending)}")
    if result.not_generated:
        extra.append(f"not generated (--no-generate): {', '.join(result.not_generated)}")
    lines.append("  " + "; ".join(extra))
    return "\n".join(lines)


# --------------------------------------------------------------------------- export-prompts
@cli.command("export-prompts")
@click.option("--generator", "generator_name", help="Only this imported generator.")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write CSV here (default: standard output).",
)
@click.pass_context
def export_prompts(ctx, generator_name: str | None, out: Path | None) -> None:
    """The work order for imported generators: captions queries needed that they lack.

    Produce the images with the service, then ingest them as a manifest with role
    'resynthesis'; the CSV already has the columns such a manifest needs (fill in 'path').

    \b
    Examples:
      rsx export-prompts --generator midjourney --out mj_todo.csv
    """
    import csv

    from resynth_index.pipeline.work_orders import pending_work

    rows = pending_work(_open_lab(ctx), generator_name)
    handle = open(out, "w", newline="", encoding="utf-8") if out else sys.stdout
    try:
        writer = csv.writer(handle)
        writer.writerow(["generator", "caption_hash", "caption", "role", "path"])
        for row in rows:
            writer.writerow([row.generator, row.caption_hash, row.caption, "resynthesis", ""])
    finally:
        if out:
            handle.close()
    if out:
        click.echo(f"{len(rows)} prompt(s) written to {out}")


# --------------------------------------------------------------------------- demo
@cli.command()
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where the demo writes its query images and report (default: inside the lab).",
)
@click.pass_context
def demo(ctx, out: Path | None) -> None:
    """Build a toy lab, attribute toy images of known source, print the accuracy.

    Uses only tiny models built in-process: nothing is downloaded. Re-running reuses the lab.
    Without --lab the demo uses its own directory, never your $RSX_LAB.

    \b
    Examples:
      rsx demo
      rsx --lab /tmp/rsx-demo demo
    """
    from resynth_index.config import default_lab_dir
    from resynth_index.demo import run_demo

    lab_dir = ctx.obj["lab_flag"] or default_lab_dir().with_name("demo-lab")
    accuracy = run_demo(lab_dir, out=out, echo=click.echo)
    if accuracy < 1.0:
        click.echo("note: not every toy image was attributed correctly", err=True)


# --------------------------------------------------------------------------- resynthesize
@cli.command()
@click.option(
    "--captions",
    "captions_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Captions to precompute: one per line, or a CSV with a 'caption' column.",
)
@click.option("--pending", is_flag=True, help="Every caption queries have asked for.")
@click.option("--generator", "generator_name", help="Only this generator (default: all runnable).")
@click.option("--batch-size", type=click.IntRange(min=1), help="Images generated per batch.")
@click.pass_context
def resynthesize(ctx, captions_file: Path | None, pending: bool, generator_name, batch_size):
    """Precompute the missing resyntheses of many captions (fill the cache overnight).

    Work is grouped per generator and made in batches; each batch is stored (images, rows,
    embeddings) before the next, so an interrupted run keeps what it finished and a re-run
    makes only the rest.

    \b
    Examples:
      rsx resynthesize --captions prompts.txt --batch-size 16
      rsx resynthesize --pending --generator sd15
    """
    from resynth_index.pipeline import resynthesis

    if (captions_file is None) == (not pending):
        raise click.UsageError("give either --captions FILE or --pending")
    lab = _open_lab(ctx)
    generators = resynthesis.runnable_generators(lab, generator_name)
    if pending:
        captions = resynthesis.pending_captions(lab)
    else:
        captions = resynthesis.captions_by_hash(resynthesis.read_captions_file(captions_file))
    bar = None

    def start(total: int) -> None:
        nonlocal bar
        bar = _progress("generating", total)
        if bar is not None:
            bar.__enter__()

    try:
        summary = resynthesis.resynthesize(
            lab,
            captions,
            generators,
            batch_size=batch_size,
            on_plan=start,
            progress=lambda n: bar.update(n) if bar is not None else None,
        )
    finally:
        if bar is not None:
            bar.__exit__(None, None, None)
    click.echo(
        f"resynthesize: {summary.captions} caption(s) x {len(summary.generators)} generator(s): "
        f"{summary.generated} generated, {summary.reused} already stored"
    )


# --------------------------------------------------------------------------- eval
@cli.command("eval")
@click.option("--shots", default="1,5,10,20", show_default=True, help="Training shot counts.")
@click.option(
    "--repeats",
    type=click.IntRange(min=1),
    default=5,
    show_default=True,
    help="Repeats, each with its own seeded draw of training references.",
)
@click.option(
    "--methods",
    default="resynthesis,knn,clip-svm,clip-logreg,clip-mlp,hybrid",
    show_default=True,
    help="Comma-separated methods.",
)
@click.option("--perturb", help="Post-process the queries: 'all' or e.g. jpeg,resize,social.")
@click.option(
    "--holdout-unknown",
    type=click.IntRange(min=0),
    default=0,
    help="Leave N generators (drawn per repeat) out of the candidates: open-set test.",
)
@click.option("--generators", help="Comma-separated generators to evaluate (default: all).")
@click.option("--resyntheses", type=click.IntRange(min=1), help="Resyntheses per generator (K).")
@click.option("--generate", is_flag=True, help="Generate missing resyntheses of runnable ones.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the draws.")
@click.option("--json", "as_json", is_flag=True, help="Print the full results as one JSON object.")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    help="Write report.md, results.json and PNG plots here.",
)
@click.pass_context
def eval_command(
    ctx, shots, repeats, methods, perturb, holdout_unknown, generators, resyntheses, generate,
    seed, as_json, out,
) -> None:  # fmt: skip
    """Measure attribution on the lab's references, next to few-shot baselines.

    Each reference is a query; N references per generator (drawn per repeat) train the few-shot
    methods and every other reference is tested, by every method on the same split.

    \b
    Examples:
      rsx eval
      rsx eval --shots 1,5 --repeats 3 --methods resynthesis,clip-svm,hybrid
      rsx eval --perturb jpeg,resize,social --out ./eval-report
      rsx eval --holdout-unknown 2 --json
    """
    from resynth_index.evaluation.protocol import EvalConfig, evaluate, parse_list, parse_shots
    from resynth_index.evaluation.report import require_matplotlib, terminal_text, write_report

    config = EvalConfig(
        shots=parse_shots(shots),
        repeats=repeats,
        methods=tuple(parse_list(methods)),
        perturb=tuple(parse_list(perturb)),
        holdout_unknown=holdout_unknown,
        seed=seed,
        generators=tuple(parse_list(generators)) or None,
        resyntheses=resyntheses,
        generate=generate,
    )
    config.validate()
    if out is not None:
        require_matplotlib()
    lab = _open_lab(ctx)
    summary = evaluate(lab, config, echo=lambda line: click.echo(line, err=True))
    if as_json:
        click.echo(json.dumps(summary, sort_keys=True))
    else:
        click.echo(terminal_text(summary))
    if out is not None:
        written = write_report(summary, out)
        click.echo(f"report: {written[0]}", err=as_json)


def main() -> None:
    cli(prog_name="rsx")
