"""The comparison table: per task acc and acc_norm with standard errors, one column per model, differences, averages.

A *column* (as built by :func:`column_from_results`) is a dict ``{"spec", "kind", "seconds", "tasks", "average"}``:
``tasks[name]`` holds ``split`` (the split lm-eval scored), ``n`` (items scored), ``version`` (the task's version),
and for each metric of :data:`METRICS` that the task reports, ``<metric>`` and ``<metric>_stderr``. ``average``
holds the two averages of :data:`AVERAGES` and their standard errors (tasks taken as independent samples).
A *report* is ``{"tasks", "limit", "data", "lm_eval_version", "baseline", "models"}``: ``baseline`` is a column or
None, ``models`` a list of columns; :func:`render_markdown` turns it into the table.
"""

from __future__ import annotations

import math
from pathlib import Path

METRICS = ("acc", "acc_norm")
# "acc": mean accuracy over all tasks. "acc_norm_else_acc": acc_norm where the task has it, acc otherwise (the choice
# of BitNet b1.58 2B4T's table: acc_norm for ARC, HellaSwag, PIQA, OpenBookQA; acc for BoolQ and Winogrande).
AVERAGES = {"acc": "average acc", "acc_norm_else_acc": "average acc_norm (acc where absent)"}


def _number(value):
    """lm-eval writes "N/A" for a standard error it cannot compute (one item); keep numbers only."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def column_from_results(results: dict, names: list[str], spec: str, kind: str, seconds: float) -> dict:
    """One model's column from the dict ``lm_eval.simple_evaluate`` returns (see the module docstring)."""
    from .tasks import split_of

    tasks = {}
    for name in names:
        scores = results["results"][name]
        entry = {
            "split": split_of(results["configs"][name]),
            "n": int(results["n-samples"][name]["effective"]),
            "version": results["versions"].get(name),
        }
        for metric in METRICS:
            if f"{metric},none" in scores:
                entry[metric] = _number(scores[f"{metric},none"])
                entry[f"{metric}_stderr"] = _number(scores.get(f"{metric}_stderr,none"))
        tasks[name] = entry
    return {"spec": spec, "kind": kind, "seconds": round(seconds, 1), "tasks": tasks, "average": averages(tasks)}


def averages(tasks: dict) -> dict:
    """The :data:`AVERAGES` of a column's tasks, each with ``<name>_stderr`` = sqrt(sum of squared stderrs) / count."""
    picks = {
        "acc": [(entry["acc"], entry["acc_stderr"]) for entry in tasks.values()],
        "acc_norm_else_acc": [
            (entry["acc_norm"], entry["acc_norm_stderr"]) if "acc_norm" in entry else (entry["acc"], entry["acc_stderr"])
            for entry in tasks.values()
        ],
    }
    result = {}
    for name, pairs in picks.items():
        values = [value for value, _ in pairs]
        errors = [error for _, error in pairs]
        result[name] = sum(values) / len(values) if values and None not in values else None
        result[f"{name}_stderr"] = (
            math.sqrt(sum(error**2 for error in errors)) / len(errors) if errors and None not in errors else None
        )
    return result


def label(column: dict) -> str:
    """Header of a column: the model's short name and whether it ran ternary or in full precision."""
    spec = column["spec"].rstrip("/")
    return f"{Path(spec).name or spec} ({column['kind']})"


def _cell(value, stderr=None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f} ± {stderr:.3f}" if stderr is not None else f"{value:.3f}"


def _diff(value, reference) -> str:
    return "-" if value is None or reference is None else f"{value - reference:+.3f}"


def render_markdown(report: dict) -> str:
    """The report as one Markdown table (readable as plain text too), baseline first, then a Δ column per model."""
    baseline = report.get("baseline")
    columns = ([baseline] if baseline else []) + report["models"]
    header = ["task", "split", "n", "metric"] + [label(column) for column in columns]
    if baseline:
        header += [f"Δ {label(column)}" for column in report["models"]]
    rows = []
    for name in report["tasks"]:
        first = columns[0]["tasks"][name]
        for metric in METRICS:
            if metric not in first:
                continue
            cells = [name, first["split"], str(first["n"]), metric]
            cells += [_cell(column["tasks"][name].get(metric), column["tasks"][name].get(f"{metric}_stderr"))
                      for column in columns]
            if baseline:
                reference = baseline["tasks"][name].get(metric)
                cells += [_diff(column["tasks"][name].get(metric), reference) for column in report["models"]]
            rows.append(cells)
    for key, title in AVERAGES.items():
        cells = [title, "", str(len(report["tasks"])) + " tasks", ""]
        cells += [_cell(column["average"][key], column["average"][f"{key}_stderr"]) for column in columns]
        if baseline:
            cells += [_diff(column["average"][key], baseline["average"][key]) for column in report["models"]]
        rows.append(cells)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines) + "\n"


def describe(report: dict) -> str:
    """One line on what was measured: data source, limit, lm-eval version, seconds per model."""
    data = report["data"]
    limit = f"first {report['limit']} items per task" if report["limit"] else "all items"
    times = ", ".join(f"{label(column)} {column['seconds']:.0f} s" for column in
                      ([report["baseline"]] if report["baseline"] else []) + report["models"])
    return f"zero-shot, {limit}; data: {data['source']} ({data['reason']}); lm-eval {report['lm_eval_version']}; time: {times}"
