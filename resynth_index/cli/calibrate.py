"""`rsx calibrate`: calibrate prediction sets (or choose the fused method's weights) on the lab's
references, for `rsx query` to use.

Like `rsx query`, it first makes the runnable candidates' missing resyntheses of the references'
captions (`--no-generate`: stored ones only), with the same progress (a status line on a
terminal), the same planning line on stderr and the same rule: more than `GENERATION_CAP`
generations need `--yes`. Ctrl-C says how many resyntheses were kept and exits 130.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import click

from resynth_index.cli.app import StatusLine, cli, open_lab
from resynth_index.cli.generation import GENERATION_CAP, GenerationProgress, announce_plan

if TYPE_CHECKING:
    from resynth_index.lab import Lab
    from resynth_index.pipeline.calibrate import CalibrationOutcome, FusionOutcome
    from resynth_index.pipeline.plans import PlannedGenerations, ProgressCallback
    from resynth_index.store.models import GeneratorRow


@cli.command()
@click.option(
    "--method",
    default="resynthesis",
    show_default=True,
    help="resynthesis: prediction sets of its answers; fused: choose the fused method's"
    " weights on the references (best accuracy on a grid), for 'rsx query --method fused'.",
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
    "--generate/--no-generate",
    default=True,
    show_default=True,
    help="Make the runnable candidates' missing resyntheses of the references' captions first,"
    " as 'rsx query' does (--no-generate: use stored ones only). An imported candidate's"
    " missing ones become work orders ('rsx export-prompts').",
)
@click.option(
    "--yes",
    is_flag=True,
    help=f"Generate even when the calibration plans more than {GENERATION_CAP} generations.",
)
@click.option(
    "--fusion-layers",
    help="With --method fused: embedder blocks whose resynthesis distances join the fusion"
    " (e.g. 1,2,3).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the saved calibration as JSON.")
@click.pass_context
def calibrate(
    ctx, method, coverage, per_generator, candidates, generate, yes, fusion_layers, as_json
) -> None:
    """Calibrate prediction sets on the lab's references of known generator.

    Every captioned reference of a candidate whose caption has resyntheses by every candidate
    is scored as 'rsx query' would score it; the softmax temperature is fitted on them and the
    conformal threshold computed. The calibration is saved in the lab: from then on 'rsx query'
    with exactly these candidates (and the same models and settings) adds a prediction set, the
    candidates that contain the true generator at the chosen coverage. A new calibration of the
    same candidates replaces the older one for queries; every one stays in the lab for audit.

    As 'rsx query' does, the runnable candidates' missing resyntheses of the references'
    captions are made first (--no-generate: stored ones only); an imported candidate's missing
    ones are recorded as work orders ('rsx export-prompts').

    \b
    Examples:
      rsx calibrate
      rsx calibrate --coverage 0.9 --per-generator
      rsx calibrate --candidates sd15,sdxl,midjourney --json
      rsx calibrate --no-generate
      rsx calibrate --method fused --fusion-layers 1,2,3 --yes
    """
    from click.core import ParameterSource

    from resynth_index.attribution.calibration.sets import check_method
    from resynth_index.attribution.evidence.layers import parse_layers
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
    status = StatusLine()
    watch = GenerationProgress(status)  # rsx query's status line and count of what was stored
    work = _Work(
        generate=generate,
        on_plan=partial(
            announce_plan,
            status,
            yes,
            what="a calibration",
            smaller="--no-generate, or fewer --candidates",
        ),
        events=watch,
        echo=partial(_echo, status),
    )
    try:
        with status:
            if method == "fused":
                shown = _calibrate_fused(lab, rows, layers, work)
            else:
                shown = _calibrate_sets(lab, rows, method, coverage, per_generator, work)
    except KeyboardInterrupt:
        click.echo(f"interrupted: {watch.kept()}; rerun to continue", err=True)
        ctx.exit(130)
    _show(as_json, *shown)


#: What ``_show`` prints of a saved calibration: its JSON record, its notes, its text.
_Shown = tuple[dict[str, Any], list[str], Callable[[], str]]


@dataclass(frozen=True)
class _Work:
    """How a calibration makes what its references lack: whether to generate, and the
    planning line, progress events and messages that show it (as ``rsx query`` shows them)."""

    generate: bool
    on_plan: Callable[[PlannedGenerations], None]
    events: ProgressCallback
    echo: Callable[[str], None]


def _calibrate_sets(
    lab: Lab,
    rows: list[GeneratorRow],
    method: str,
    coverage: float,
    per_generator: bool,
    work: _Work,
) -> _Shown:
    """Prediction sets: the missing resyntheses made, then calibrated and saved."""
    from resynth_index.pipeline.calibrate import calibrate_lab

    outcome = calibrate_lab(
        lab,
        rows,
        method=method,
        coverage=coverage,
        per_generator=per_generator,
        generate=work.generate,
        echo=work.echo,
        on_plan=work.on_plan,
        events=work.events,
    )
    return _as_json(outcome), outcome.summary["notes"], partial(summary_text, outcome)


def _calibrate_fused(
    lab: Lab, rows: list[GeneratorRow], layers: tuple[int, ...], work: _Work
) -> _Shown:
    """The fused weights: the references' missing resyntheses made here, with the planning line
    and progress (``calibrate_fusion`` then finds nothing left to make), then chosen and saved.

    A block the embedder lacks and a lab without any usable reference are refused first.
    """
    from resynth_index.attribution.calibration.fusion_weights import FUSED
    from resynth_index.attribution.evidence.layers import layer_reader
    from resynth_index.pipeline.calibrate import calibrate_fusion
    from resynth_index.pipeline.references import check_usable, prepare_references

    if layers:
        layer_reader(lab, layers)  # refused before anything is generated
    prepare_references(
        lab,
        rows,
        generate=work.generate,
        check=partial(check_usable, method=FUSED),
        on_plan=work.on_plan,
        events=work.events,
        echo=work.echo,
    )
    fused = calibrate_fusion(lab, rows, layers=layers, generate=work.generate, echo=work.echo)
    return _fusion_json(fused), fused.summary["notes"], partial(fusion_text, fused)


def _echo(status: StatusLine, line: str) -> None:
    """A message on stderr, the status line cleared first so that it never lands mid-line."""
    status.clear()
    click.echo(line, err=True)


def _show(as_json: bool, record: dict[str, Any], notes: list[str], text: Callable[[], str]) -> None:
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
        + f": weights chosen by accuracy on the references (0.1-step grid), layers {layers}",
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
    nested = record.nested_loo_accuracy
    lines.append(
        "nested leave-one-out top-1 accuracy on these references:"
        f" {'-' if nested is None else f'{nested * 100:.1f} %'}"
        f" (training accuracy, in-sample: {record.training_accuracy * 100:.1f} %;"
        f" each signal alone: {alone})"
    )
    lines.extend(f"note: {note}" for note in summary["notes"])
    lines.append("'rsx query --method fused' with exactly these candidates now uses these weights")
    return "\n".join(lines)


def summary_text(outcome: CalibrationOutcome) -> str:
    """What ``rsx calibrate`` prints: what was saved, from which references, how well scored."""
    from resynth_index.attribution.calibration.sets import level

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
