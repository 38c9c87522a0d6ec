"""`rsx calibrate`: calibrate prediction sets (or choose the fused method's weights) on the lab's
references, for `rsx query` to use."""

from __future__ import annotations

import json
from functools import partial
from typing import TYPE_CHECKING, Any

import click

from resynth_index.cli.app import cli, open_lab

if TYPE_CHECKING:
    from resynth_index.pipeline.calibrated import CalibrationOutcome
    from resynth_index.pipeline.fusion_lab import FusionOutcome


@cli.command()
@click.option(
    "--method",
    default="resynthesis",
    show_default=True,
    help="resynthesis: prediction sets of its answers; fused: choose the fused method's"
    " weights on the references (leave-one-out), for 'rsx query --method fused'.",
)
@click.option(
    "--coverage",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=0.95,
    show_default=True,
    help="How often the set should hold the true generator (needs ceil(1/(1-a)) - 1"
    " references: 19 at 0.95).",
)
@click.option(
    "--per-generator",
    is_flag=True,
    help="One threshold per generator (Mondrian): coverage holds for each generator, and each"
    " needs that many references.",
)
@click.option(
    "--candidates",
    help="Comma-separated generators the sets choose among (default: as 'rsx query': the lab's"
    " default_candidates, else all active).",
)
@click.option(
    "--generate", is_flag=True, help="Make runnable candidates' missing resyntheses first."
)
@click.option(
    "--fusion-layers",
    help="With --method fused: embedder blocks whose resynthesis distances join the fusion"
    " (e.g. 1,2,3).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the saved calibration as JSON.")
@click.pass_context
def calibrate(
    ctx, method, coverage, per_generator, candidates, generate, fusion_layers, as_json
) -> None:
    """Calibrate prediction sets on the lab's references of known generator.

    Every captioned reference of a candidate whose caption has resyntheses by every candidate
    is scored as 'rsx query' would score it; the softmax temperature is fitted on them and the
    conformal threshold computed. The calibration is saved in the lab: from then on 'rsx query'
    with exactly these candidates (and the same models and settings) adds a prediction set, the
    candidates that contain the true generator at the chosen coverage. A new calibration of the
    same candidates replaces the older one for queries; every one stays in the lab for audit.

    \b
    Examples:
      rsx calibrate
      rsx calibrate --coverage 0.9 --per-generator
      rsx calibrate --candidates sd15,sdxl,midjourney --json
      rsx calibrate --method fused --fusion-layers 1,2,3
    """
    from click.core import ParameterSource

    from resynth_index.pipeline.calibrated import calibrate_lab, check_method
    from resynth_index.pipeline.layers import parse_layers
    from resynth_index.pipeline.query import select_candidates

    check_method(method)  # before the lab opens: a refusal touches nothing
    layers = parse_layers(fusion_layers)
    if method == "fused":
        given = ctx.get_parameter_source("coverage") == ParameterSource.COMMANDLINE
        if given or per_generator:
            option = "--coverage" if given else "--per-generator"
            raise click.ClickException(
                f"{option} does not apply to --method fused: it chooses fusion weights, not"
                " prediction sets"
            )
    elif fusion_layers:
        raise click.ClickException("--fusion-layers applies to --method fused only")
    lab = open_lab(ctx)
    names = [n.strip() for n in candidates.split(",") if n.strip()] if candidates else None
    rows = select_candidates(lab, names)
    if method == "fused":
        from resynth_index.pipeline.fusion_lab import calibrate_fusion

        echo = partial(click.echo, err=True)
        fused = calibrate_fusion(lab, rows, layers=layers, generate=generate, echo=echo)
        _show(as_json, _fusion_json(fused), fused.summary["notes"], lambda: fusion_text(fused))
        return
    outcome = calibrate_lab(
        lab,
        rows,
        method=method,
        coverage=coverage,
        per_generator=per_generator,
        generate=generate,
        echo=lambda line: click.echo(line, err=True),
    )
    _show(as_json, _as_json(outcome), outcome.summary["notes"], lambda: summary_text(outcome))


def _show(as_json: bool, record: dict[str, Any], notes: list[str], text) -> None:
    """The calibration as one JSON object (its notes on stderr) or as ``text()``."""
    if as_json:
        click.echo(json.dumps(record, sort_keys=True))
        for note in notes:
            click.echo(f"note: {note}", err=True)
    else:
        click.echo(text())


def _as_json(outcome: CalibrationOutcome) -> dict[str, Any]:
    return {
        "calibration_id": outcome.id,
        "superseded": outcome.superseded,
        "calibration": outcome.calibration.to_dict(),
        **outcome.summary,
    }


def _fusion_json(outcome: FusionOutcome) -> dict[str, Any]:
    return {
        "calibration_id": outcome.id,
        "superseded": outcome.superseded,
        "calibration": outcome.record.to_dict(),
        **outcome.summary,
    }


def fusion_text(outcome: FusionOutcome) -> str:
    """What ``rsx calibrate --method fused`` prints: the weights chosen, on what, how well."""
    record = outcome.record
    summary = outcome.summary
    replaced = ", ".join(f"#{i}" for i in outcome.superseded)
    layers = ",".join(map(str, record.layers)) or "none"
    lines = [
        f"fused calibration #{outcome.id} saved"
        + (f" (supersedes {replaced})" if replaced else "")
        + f": weights chosen by leave-one-out on the references, layers {layers}",
        f"candidates: {', '.join(record.candidates)}"
        f" ({record.distance} distance, {record.aggregation} over resyntheses,"
        f" {record.reconstruction_metric} reconstruction)",
    ]
    per = ", ".join(f"{g} {n}" for g, n in summary["references_per_generator"].items())
    lines.append(f"references used: {summary['references']} ({per})")
    weights = ", ".join(f"{name} {w:g}" for name, w in sorted(record.weights.items()))
    lines.append(f"weights: {weights}")
    alone = ", ".join(
        f"{name} {value * 100:.1f} %" for name, value in sorted(summary["accuracy_alone"].items())
    )
    lines.append(
        f"leave-one-out top-1 accuracy on these references: {record.loo_accuracy * 100:.1f} %"
        f" (each signal alone: {alone})"
    )
    lines.extend(f"note: {note}" for note in summary["notes"])
    lines.append("'rsx query --method fused' with exactly these candidates now uses these weights")
    return "\n".join(lines)


def summary_text(outcome: CalibrationOutcome) -> str:
    """What ``rsx calibrate`` prints: what was saved, from which references, how well scored."""
    from resynth_index.pipeline.calibrated import level

    calibration = outcome.calibration
    summary = outcome.summary
    replaced = ", ".join(f"#{i}" for i in outcome.superseded)
    kind = "one threshold per generator" if calibration.per_generator else "one threshold"
    lines = [
        f"calibration #{outcome.id} saved"
        + (f" (supersedes {replaced})" if replaced else "")
        + f": {calibration.method}, {level(calibration.coverage)} coverage, {kind}",
        f"candidates: {', '.join(calibration.generators)}"
        f" ({calibration.distance} distance, {calibration.aggregation} over resyntheses)",
    ]
    per = ", ".join(f"{g} {n}" for g, n in summary["references_per_generator"].items())
    lines.append(f"references used: {summary['references']} ({per})")
    if calibration.per_generator:
        thresholds = ", ".join(f"{g} {q:.4f}" for g, q in calibration.quantiles.items())
        lines.append(f"thresholds (1 - score of a candidate): {thresholds}")
    else:
        lines.append(f"threshold (1 - score of a candidate): {calibration.quantile:.4f}")
    lines.append(
        f"temperature: {calibration.temperature:.4g} (fitted; the lab's fixed temperature is"
        f" {summary['fixed_temperature']:g})"
    )
    lines.append(
        f"ECE on these references: {summary['ece_fixed'] * 100:.1f} % at"
        f" {summary['fixed_temperature']:g}, {summary['ece_fitted'] * 100:.1f} % at the fitted"
        f" {calibration.temperature:.4g} (measured where it was fitted: optimistic; 'rsx eval"
        " --conformal' measures on held-out references)"
    )
    lines.append(f"top-1 accuracy on these references: {summary['accuracy'] * 100:.1f} %")
    lines.extend(f"note: {note}" for note in summary["notes"])
    lacking = [g for g, n in summary["references_per_generator"].items() if n == 0]
    if lacking:
        lines.append(
            f"note: no references of {', '.join(lacking)}: the coverage says nothing about"
            " images they made"
        )
    lines.append(
        f"'rsx query' with exactly these candidates now answers with prediction sets at"
        f" {level(calibration.coverage)} coverage"
    )
    return "\n".join(lines)
