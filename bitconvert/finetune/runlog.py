"""The JSONL step log (one object per line: training steps, evaluations, events) and the loss-curve PNG."""

from __future__ import annotations

import json
from pathlib import Path


class StepLog:
    """Appends records to ``path``; on resume from ``step`` drops records of later steps (they will be redone)."""

    def __init__(self, path: Path, resume_step: int = 0):
        self.path = path
        records = read_log(path) if path.exists() else []
        kept = [record for record in records if record.get("step", 0) <= resume_step]
        path.write_text("".join(json.dumps(record) + "\n" for record in kept))

    def write(self, **record) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss_curve(records: list[dict], path: Path) -> None:
    """Training loss per step and held-out loss (log perplexity) at each evaluation, against tokens seen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["tokens"] for r in train], [r["loss"] for r in train], lw=0.8, label="training loss")
    if evals:
        ax.plot([r["tokens"] for r in evals], [r["heldout_loss"] for r in evals], "o-", label="held-out CE (ln ppl)")
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("bitconvert finetune")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
