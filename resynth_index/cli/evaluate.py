"""`rsx eval`: the paper's protocol on the lab's own references."""

from __future__ import annotations

import json
from pathlib import Path

import click

from resynth_index.cli.app import cli, open_lab


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
    help="Comma-separated methods; also aeroblade, fused, fused-loo (autoencoder"
    " reconstruction and its fusion with resynthesis).",
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
@click.option(
    "--conformal", help="Measure prediction sets at these target coverages, e.g. 0.9,0.95."
)
@click.option("--per-generator", is_flag=True, help="With --conformal: per-generator thresholds.")
@click.option(
    "--conformal-splits",
    type=click.IntRange(min=1),
    default=100,
    show_default=True,
    help="Random calibration/test splits for --conformal.",
)
@click.option(
    "--calibration-share",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=0.5,
    show_default=True,
    help="Share of each generator's references that calibrates, per split.",
)
@click.option(
    "--families",
    help="Look-alike generators, reported within and across families: groups by commas,"
    " members by '+', e.g. sd15+sd15-ft,flux+flux-lora.",
)
@click.option(
    "--fusion-weights",
    help="Fixed weights of 'fused' (and the tie-break prior of 'fused-loo'), e.g."
    " resynthesis=1,reconstruction=1 (default: equal).",
)
@click.option(
    "--fusion-layers",
    help="Embedder blocks whose resynthesis distances join fused-loo's signals, e.g. 1,2.",
)
@click.option(
    "--reconstruction-metric",
    type=click.Choice(["embedder", "pixel-l1", "pixel-l2"]),
    default="embedder",
    show_default=True,
    help="How the reconstruction signal compares an image with its reconstruction.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the full results as one JSON object.")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    help="Write report.md, results.json and PNG plots here.",
)
@click.pass_context
def eval_command(
    ctx, shots, repeats, methods, perturb, holdout_unknown, generators, resyntheses, generate,
    seed, conformal, per_generator, conformal_splits, calibration_share, families,
    fusion_weights, fusion_layers, reconstruction_metric, as_json, out,
) -> None:  # fmt: skip
    """Measure attribution on the lab's references, next to few-shot baselines.

    Each reference is a query; N references per generator (drawn per repeat) train the few-shot
    methods and every other reference is tested, by every method on the same split.
    --conformal measures prediction sets over random calibration/test splits of the references:
    how often the set holds the true generator (coverage) and how many generators it names.

    \b
    Examples:
      rsx eval
      rsx eval --shots 1,5 --repeats 3 --methods resynthesis,clip-svm,hybrid
      rsx eval --perturb jpeg,resize,social --out ./eval-report
      rsx eval --holdout-unknown 2 --json
      rsx eval --conformal 0.9,0.95 --per-generator --perturb jpeg
      rsx eval --methods resynthesis,aeroblade,fused,fused-loo --families sd15+sd15-ft
    """
    from resynth_index.attribution.combination import parse_weights
    from resynth_index.evaluation.conformal_eval import parse_coverages
    from resynth_index.evaluation.fusion import parse_families
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
        conformal=parse_coverages(conformal),
        per_generator=per_generator,
        conformal_splits=conformal_splits,
        calibration_share=calibration_share,
        families=parse_families(families),
        fusion_weights=tuple(parse_weights(fusion_weights).items()),
        fusion_layers=_parse_layers(fusion_layers),
        reconstruction_metric=reconstruction_metric,
    )
    config.validate()
    if out is not None:
        require_matplotlib()
    lab = open_lab(ctx)
    summary = evaluate(lab, config, echo=lambda line: click.echo(line, err=True))
    if as_json:
        click.echo(json.dumps(summary, sort_keys=True))
    else:
        click.echo(terminal_text(summary))
    if out is not None:
        written = write_report(summary, out)
        click.echo(f"report: {written[0]}", err=as_json)


def _parse_layers(text: str | None) -> tuple[int, ...]:
    """``"2,3"`` -> (2, 3); one line and exit 1 for anything but positive block numbers."""
    from resynth_index.errors import RsxError
    from resynth_index.evaluation.protocol import parse_list

    try:
        layers = tuple(sorted({int(part) for part in parse_list(text)}))
    except ValueError:
        raise RsxError(
            f"cannot read --fusion-layers {text!r}: give block numbers like 2,3"
        ) from None
    return layers
