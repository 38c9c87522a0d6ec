"""Rendering an evaluation summary: terminal table, markdown report, PNG plots, JSON.

The plots use matplotlib with the Agg backend, imported only when a report is written.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from resynth_index.errors import RsxError
from resynth_index.evaluation.conformal_eval import PER_GENERATOR
from resynth_index.evaluation.fewshot import INSTALL_HINT
from resynth_index.evaluation.protocol import CLEAN, recorded_result, result_for

METRIC_LABELS = {
    "accuracy": "accuracy",
    "balanced_accuracy": "balanced accuracy",
    "top3": "top-3 accuracy",
    "auroc": "macro one-vs-rest ROC-AUC",
}


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise RsxError(f"the evaluation report's plots need matplotlib: {INSTALL_HINT}") from None


def _cell(stat: dict | None) -> str:
    """'mean±std' in percent; the mean alone when there is no spread (one repeat); '-' when
    there is no value."""
    if not stat or stat.get("mean") is None:
        return "-"
    if stat.get("std") is None:
        return f"{stat['mean'] * 100:.1f}"
    return f"{stat['mean'] * 100:.1f}±{stat['std'] * 100:.1f}"


def _span(values: list[int]) -> str:
    """One count, or 'lowest-highest' when the repeats differ."""
    low, high = min(values), max(values)
    return str(low) if low == high else f"{low}-{high}"


def split_lines(summary: dict) -> list[str]:
    """What each repeat tested, one line per shot count, e.g. '10 test queries per repeat (15
    references, 5 used for training)'; with several shot counts each line starts 'N-shot: '."""
    splits = summary["splits"]
    parts = []
    for split in splits:
        text = (
            f"{_span(split['test_queries'])} test queries per repeat"
            f" ({summary['reference_count']} references,"
            f" {_span(split['training_references'])} used for training"
        )
        if summary["holdout_unknown"]:
            unknown = _span(split["unknown_test_queries"])
            text += f"; {unknown} of them from held-out generators, in the open-set numbers only"
        text += ")"
        parts.append(text if len(splits) == 1 else f"{split['shots']}-shot: {text}")
    return parts


def spread_text(summary: dict) -> str:
    """How to read the numbers: mean±std over repeats, or one repeat's value."""
    if summary["repeats"] == 1:
        return "one repeat, so no spread"
    return f"mean±std over {summary['repeats']} repeats"


def metric_rows(summary: dict, cond: str, key: str = "accuracy") -> list[list[str]]:
    """Rows [method, cell per shot count] of one metric under one condition."""
    rows = []
    for method in summary["methods"]:
        cells = []
        for shots in summary["shots"]:
            entry = result_for(summary, cond, method, shots)
            cells.append(_cell(entry[key] if entry else None))
        rows.append([method, *cells])
    return rows


def mean_over_operators_rows(summary: dict) -> list[list[str]]:
    """Accuracy per method and shot count averaged over the post-processing conditions."""
    ops = [c for c in summary["conditions"] if c != CLEAN]
    rows = []
    for method in summary["methods"]:
        cells = []
        for shots in summary["shots"]:
            means = [recorded_result(summary, c, method, shots)["accuracy"]["mean"] for c in ops]
            means = [m for m in means if m is not None]
            cells.append(f"{100 * sum(means) / len(means):.1f}" if means else "-")
        rows.append([method, *cells])
    return rows


def open_set_rows(summary: dict, cond: str) -> list[list[str]]:
    rows = []
    for method in summary["methods"]:
        cells = []
        for shots in summary["shots"]:
            entry = result_for(summary, cond, method, shots)
            stats = (entry or {}).get("open_set") or {}
            cells.append(f"{_cell(stats.get('auroc'))} / {_cell(stats.get('accuracy'))}")
        rows.append([method, *cells])
    return rows


FAMILY_NOTE = (
    "within: queries whose generator has a look-alike (family member) among the candidates;"
    " across: the other queries; family: the answer names the true generator or one of its family"
)


def family_header(summary: dict) -> list[str]:
    """[method, then 'N-shot within', 'N-shot across', 'N-shot family' per shot count]."""
    return [
        "method",
        *[f"{s}-shot {part}" for s in summary["shots"] for part in ("within", "across", "family")],
    ]


def family_rows(summary: dict, cond: str) -> list[list[str]]:
    """Rows [method, within, across, family accuracy per shot count] under one condition."""
    rows = []
    for method in summary["methods"]:
        cells = []
        for shots in summary["shots"]:
            fam = (result_for(summary, cond, method, shots) or {}).get("families") or {}
            cells += [_cell(fam.get(part)) for part in ("within", "across", "family")]
        rows.append([method, *cells])
    return rows


def family_counts_line(summary: dict) -> str:
    """How many test queries were within and across families, per shot count."""
    parts = []
    for shots in summary["shots"]:
        entry = result_for(summary, CLEAN, summary["methods"][0], shots) or {}
        counts = (entry.get("families") or {}).get("queries")
        if counts:
            parts.append(
                f"{shots}-shot {_span(counts['within'])} within / {_span(counts['across'])} across"
            )
    families = "; ".join("+".join(f) for f in summary.get("families", []))
    return f"families: {families}; test queries per repeat: {', '.join(parts)}"


def fusion_goal_lines(summary: dict, cond: str) -> list[str]:
    """The look-alike goal of the training-free methods under one condition, one line each."""
    lines = []
    for row in summary.get("fusion_goal", []):
        if row["condition"] != cond:
            continue
        across = "-" if row["across"] is None else f"{row['across'] * 100:.1f}"
        base_across = (
            "-" if row["across_resynthesis"] is None else f"{row['across_resynthesis'] * 100:.1f}"
        )
        lines.append(
            f"look-alike goal at {row['shots']} shot ({row['method']} vs resynthesis: within"
            f" +10 points, across at most -1): within {row['within'] * 100:.1f} vs"
            f" {row['within_resynthesis'] * 100:.1f}, across {across} vs {base_across}:"
            f" {'met' if row['met'] else 'not met'}"
        )
    return lines


def fusion_weight_lines(summary: dict) -> list[str]:
    """The weights the fused methods used, averaged over repeats, per shot count (clean)."""
    lines = []
    for method in ("fused", "fused-loo"):
        if method not in summary["methods"]:
            continue
        parts = []
        for shots in summary["shots"]:
            entry = result_for(summary, CLEAN, method, shots) or {}
            chosen = entry.get("fusion_weights") or []
            if not chosen:
                continue
            names = sorted(chosen[0])
            mean = {n: sum(w.get(n, 0.0) for w in chosen) / len(chosen) for n in names}
            part = f"{shots}-shot " + " ".join(f"{n}={mean[n]:.2f}" for n in names)
            nested = entry.get("nested_loo_accuracy") or []
            training = entry.get("train_accuracy") or []
            if nested and training:
                part += (
                    f" (training references: nested leave-one-out"
                    f" {sum(nested) / len(nested) * 100:.1f} %, training accuracy"
                    f" {sum(training) / len(training) * 100:.1f} %)"
                )
            parts.append(part)
        if parts:
            how = "fixed" if method == "fused" else "chosen on the training references"
            lines.append(f"{method} weights ({how}, mean over repeats): " + "; ".join(parts))
    return lines


def _text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(lines)


def _goal_line(summary: dict, cond: str) -> str | None:
    rows = [g for g in summary.get("hybrid_goal", []) if g["condition"] == cond]
    if not rows:
        return None
    met = [f"{g['shots']}:{'yes' if g['met'] else 'no'}" for g in rows]
    return "hybrid >= max(resynthesis, clip-svm) per shot count: " + ", ".join(met)


def terminal_text(summary: dict) -> str:
    """The accuracy table (mean±std % over repeats) per condition, plus open-set numbers."""
    header = ["method", *[f"{s}-shot" for s in summary["shots"]]]
    parts = [
        *split_lines(summary),
        f"{len(summary['generators'])} generators, seed {summary['seed']};"
        f" accuracy % ({spread_text(summary)})",
    ]
    for note in summary["notes"]:
        parts.append(f"note: {note}")
    if summary.get("families"):
        parts.append(family_counts_line(summary))
    parts += fusion_weight_lines(summary)
    for cond in summary["conditions"]:
        title = "clean queries" if cond == CLEAN else f"queries post-processed: {cond}"
        parts.append(f"\n{title}\n" + _text_table(header, metric_rows(summary, cond)))
        goal = _goal_line(summary, cond)
        if goal:
            parts.append(goal)
        if summary.get("families"):
            parts.append(
                f"accuracy % within and across families ({FAMILY_NOTE})\n"
                + _text_table(family_header(summary), family_rows(summary, cond))
            )
            parts += fusion_goal_lines(summary, cond)
        if summary["holdout_unknown"]:
            parts.append(
                f"open set ({summary['holdout_unknown']} generator(s) held out per repeat): "
                "unknown-vs-known AUROC % / accuracy % at the known queries' 95th percentile\n"
                + _text_table(header, open_set_rows(summary, cond))
            )
    ops = [c for c in summary["conditions"] if c != CLEAN]
    if len(ops) > 1:
        parts.append(
            f"\nmean accuracy % over the {len(ops)} post-processings ({', '.join(ops)})\n"
            + _text_table(header, mean_over_operators_rows(summary))
        )
    if summary.get("conformal"):
        parts += _conformal_terminal(summary)
    return "\n".join(parts)


# ----------------------------------------------------------------------------- conformal
def _count(stat: dict | None) -> str:
    """A set size, 'mean±std' (no percent)."""
    if not stat or stat.get("mean") is None:
        return "-"
    if stat.get("std") is None:
        return f"{stat['mean']:.2f}"
    return f"{stat['mean']:.2f}±{stat['std']:.2f}"


def _share(value: float | None) -> str:
    """A share in percent, one decimal; '-' when there is none."""
    return "-" if value is None else f"{value * 100:.1f}"


def conformal_intro(section: dict) -> list[str]:
    """How the prediction sets were measured, in a few lines."""
    calibrating = sum(section["calibration_references"].values())
    testing = sum(section["test_queries"].values())
    return [
        f"{section['splits']} random calibration/test splits (seed {section['seed']}): per"
        f" generator a share {section['calibration_share']:g} of its references calibrates"
        f" ({calibrating} references), the rest are test queries ({testing} per split);"
        " % mean±std over splits",
        f"nonconformity: {section['score']}",
        "coverage: share of test queries whose set holds their true generator;"
        " 'vs target': coverage minus the target, in points",
    ]


def conformal_rows(section: dict) -> list[list[str]]:
    """[condition, calibration, target, coverage, vs target, set size, singletons, empty]."""
    rows = []
    for row in section["results"]:
        coverage = row["coverage"]["mean"]
        gap = "-" if coverage is None else f"{(coverage - row['target']) * 100:+.1f}"
        rows.append(
            [
                row["condition"],
                row["calibration"],
                f"{row['target'] * 100:g}",
                _cell(row["coverage"]),
                gap,
                _count(row["set_size"]),
                _cell(row["singletons"]),
                _cell(row["empty"]),
            ]
        )
    return rows


CONFORMAL_HEADER = [
    "condition", "calibration", "target %", "coverage %", "vs target", "set size",
    "singletons %", "empty %",
]  # fmt: skip


def conformal_generator_rows(section: dict, generators: list[str], cond: str) -> list[list[str]]:
    """Per-generator coverage % under one condition: [calibration, target, one per generator]."""
    return [
        [
            row["calibration"],
            f"{row['target'] * 100:g}",
            *[_cell(row["per_generator"][g]) for g in generators],
        ]
        for row in section["results"]
        if row["condition"] == cond
    ]


def score_calibration_rows(section: dict) -> list[list[str]]:
    """[condition, accuracy, ECE with the fixed temperature, ECE with the fitted one]."""
    return [
        [
            row["condition"],
            _cell(row["accuracy"]),
            _share(row["ece_fixed"]),
            _share(row["ece_fitted"]),
        ]
        for row in section["conditions"]
    ]


def score_calibration_title(section: dict) -> str:
    fitted = section["temperature"]["fitted"]["mean"]
    return (
        "calibration of the displayed score softmax(-d/T): expected calibration error %"
        " (10 bins, test queries of every split pooled) with the fixed"
        f" T = {section['temperature']['fixed']:g} and with T fitted on each split's calibration"
        f" references (mean T = {fitted:.3g})"
    )


SHIFT_NOTE = (
    "post-processed queries are not exchangeable with the clean calibration references: the"
    " guarantee does not hold for them, and 'vs target' shows by how much coverage falls"
)


def _conformal_terminal(summary: dict) -> list[str]:
    section = summary["conformal"]
    parts = ["\nconformal prediction sets (resynthesis)", *conformal_intro(section)]
    parts.append(_text_table(CONFORMAL_HEADER, conformal_rows(section)))
    if len(summary["conditions"]) > 1:
        parts.append(SHIFT_NOTE)
    if section["per_generator"]:
        parts.append(
            f"\nper-generator coverage % on clean queries ({PER_GENERATOR}: one threshold per"
            " generator)\n"
            + _text_table(
                ["calibration", "target %", *summary["generators"]],
                conformal_generator_rows(section, summary["generators"], CLEAN),
            )
        )
    parts.append(
        f"\n{score_calibration_title(section)}\n"
        + _text_table(
            ["condition", "accuracy %", "ECE fixed T", "ECE fitted T"],
            score_calibration_rows(section),
        )
    )
    return parts


def _conformal_markdown(summary: dict) -> list[str]:
    section = summary["conformal"]
    lines = ["", "## Conformal prediction sets (resynthesis)", ""]
    lines += [f"- {line}" for line in conformal_intro(section)]
    if len(summary["conditions"]) > 1:
        lines.append(f"- {SHIFT_NOTE}")
    lines += ["", _markdown_table(CONFORMAL_HEADER, conformal_rows(section))]
    if section["per_generator"]:
        header = ["calibration", "target %", *summary["generators"]]
        for cond in summary["conditions"]:
            title = "clean queries" if cond == CLEAN else f"queries post-processed: {cond}"
            rows = conformal_generator_rows(section, summary["generators"], cond)
            lines += ["", f"### Per-generator coverage %, {title}", ""]
            lines.append(_markdown_table(header, rows))
    lines += ["", "### Calibration of the displayed score", "", score_calibration_title(section)]
    lines += [
        "",
        _markdown_table(
            ["condition", "accuracy %", "ECE fixed T %", "ECE fitted T %"],
            score_calibration_rows(section),
        ),
    ]
    return lines


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text)


def write_report(summary: dict, out: Path) -> list[Path]:
    """Write report.md, results.json and the PNGs into ``out``; returns the files written."""
    require_matplotlib()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "results.json"]
    written[0].write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    plots = _plots(summary, out)
    written += plots
    lines = _markdown(summary, [p.name for p in plots])
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return [report, *written]


def _markdown(summary: dict, plot_names: list[str]) -> list[str]:
    header = ["method", *[f"{s}-shot" for s in summary["shots"]]]
    lines = [
        "# rsx evaluation",
        "",
        f"- lab: `{summary.get('lab', '-')}`; embedder `{str(summary.get('embedder', '-'))[:12]}`",
        f"- generators ({len(summary['generators'])}): "
        + ", ".join(f"{g} ({n})" for g, n in summary["references"].items())
        + " — references per generator in brackets",
        *[f"- {line}" for line in split_lines(summary)],
        f"- shots {summary['shots']}; {summary['repeats']} repeat(s), seed {summary['seed']};"
        f" resynthesis: {summary['distance']} distance, {summary['aggregation']} over resyntheses",
        "- every method is scored on the same test split (all references not drawn for"
        f" training); numbers are in % ({spread_text(summary)})",
    ]
    lines += [f"- note: {n}" for n in summary["notes"]]
    if summary.get("families"):
        lines += [f"- {family_counts_line(summary)}", f"- {FAMILY_NOTE}"]
    lines += [f"- {line}" for line in fusion_weight_lines(summary)]
    if "accuracy_vs_shots.png" in plot_names:
        lines += ["", "![accuracy versus shots](accuracy_vs_shots.png)"]
    if "robustness.png" in plot_names:
        lines += ["", "![accuracy per post-processing](robustness.png)"]
    ops = [c for c in summary["conditions"] if c != CLEAN]
    if len(ops) > 1:
        lines += [
            "",
            f"## Mean accuracy over the {len(ops)} post-processings",
            "",
            _markdown_table(header, mean_over_operators_rows(summary)),
        ]
    for cond in summary["conditions"]:
        title = "Clean queries" if cond == CLEAN else f"Queries post-processed: {cond}"
        lines += ["", f"## {title}"]
        for key, label in METRIC_LABELS.items():
            lines += [
                "",
                f"### {label}",
                "",
                _markdown_table(header, metric_rows(summary, cond, key)),
            ]
        goal = _goal_line(summary, cond)
        if goal:
            lines += ["", goal]
        if summary.get("families"):
            lines += [
                "",
                "### accuracy within and across families",
                "",
                _markdown_table(family_header(summary), family_rows(summary, cond)),
            ]
            goal_lines = fusion_goal_lines(summary, cond)
            if goal_lines:
                lines += ["", *goal_lines]
        if summary["holdout_unknown"]:
            lines += [
                "",
                f"### open set: {summary['holdout_unknown']} generator(s) held out per repeat",
                "",
                "unknown-vs-known AUROC / accuracy with 'unknown' as an answer (threshold: 95th"
                " percentile of the known queries' unknownness)",
                "",
                _markdown_table(header, open_set_rows(summary, cond)),
            ]
    if summary.get("conformal"):
        lines += _conformal_markdown(summary)
    top = max(summary["shots"])
    lines += ["", f"## Per-generator accuracy (clean, {top}-shot)", ""]
    per_rows = []
    for method in summary["methods"]:
        entry = recorded_result(summary, CLEAN, method, top)
        per_rows.append(
            [method, *[_cell(entry["per_generator"][g]) for g in summary["generators"]]]
        )
    lines.append(_markdown_table(["method", *summary["generators"]], per_rows))
    confusions = [n for n in plot_names if n.startswith("confusion_")]
    if confusions:
        lines += ["", f"## Confusion matrices (clean, {top}-shot, summed over repeats)", ""]
        lines += [f"![{n}]({n})" for n in confusions]
    return lines


def _plots(summary: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    written = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in summary["methods"]:
        means, stds = [], []
        for shots in summary["shots"]:
            acc = recorded_result(summary, CLEAN, method, shots)["accuracy"]
            means.append(acc["mean"] * 100)
            stds.append((acc["std"] or 0) * 100)
        ax.errorbar(summary["shots"], means, yerr=stds, marker="o", capsize=3, label=method)
    ax.set_xlabel("shots (references per generator)")
    ax.set_ylabel("accuracy (%)")
    ax.set_xscale("log")
    ax.set_xticks(summary["shots"], [str(s) for s in summary["shots"]])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    written.append(out / "accuracy_vs_shots.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    top = max(summary["shots"])
    if len(summary["conditions"]) > 1:
        conds = summary["conditions"]
        fig, ax = plt.subplots(figsize=(max(6, len(conds) * 0.8), 4))
        width = 0.8 / len(summary["methods"])
        for k, method in enumerate(summary["methods"]):
            values = [
                recorded_result(summary, c, method, top)["accuracy"]["mean"] * 100 for c in conds
            ]
            ax.bar(np.arange(len(conds)) + k * width, values, width, label=method)
        ax.set_xticks(np.arange(len(conds)) + 0.4 - width / 2, conds, rotation=45, ha="right")
        ax.set_ylabel(f"accuracy (%), {top}-shot")
        ax.set_ylim(0, 115)  # room for the legend above the bars
        ax.legend(fontsize=7, ncol=len(summary["methods"]), loc="upper center")
        fig.tight_layout()
        written.append(out / "robustness.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)

    names = summary["generators"]
    for method in summary["methods"]:
        matrix = np.array(
            recorded_result(summary, CLEAN, method, top)["confusion"], dtype=np.float64
        )
        rows = matrix.sum(axis=1, keepdims=True)
        share = np.divide(matrix, rows, out=np.zeros_like(matrix), where=rows > 0)
        size = max(4, 0.5 * len(names) + 2)
        fig, ax = plt.subplots(figsize=(size, size))
        ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
        ax.set_yticks(range(len(names)), names)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"{method}, {top}-shot")
        for i in range(len(names)):
            for j in range(len(names)):
                if matrix[i, j]:
                    color = "white" if share[i, j] > 0.5 else "black"
                    ax.text(j, i, str(int(matrix[i, j])), ha="center", va="center", color=color)
        fig.tight_layout()
        written.append(out / f"confusion_{_slug(method)}.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written
