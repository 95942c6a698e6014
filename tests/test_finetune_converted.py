"""Fine-tuning that starts from a converted folder (the recommended recipe: calibrated conversion, then distillation
against the full-precision teacher), the distillation loss, and warm-ups fitted to the run. Tiny random LLaMA."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tiny import make_tiny_llama  # noqa: E402

from bitconvert.cli import main  # noqa: E402
from bitconvert.convert import convert  # noqa: E402
from bitconvert.finetune import FinetuneOptions, finetune  # noqa: E402
from bitconvert.finetune.loss import distillation_kl, hidden_cosine  # noqa: E402
from bitconvert.finetune.schedule import (DEFAULT_LR_CONVERTED, DEFAULT_LR_FULL_PRECISION, resolve_lr,  # noqa: E402
                                          resolve_warmups)
from bitconvert.finetune.student import load_converted_student  # noqa: E402
from bitconvert.load import load  # noqa: E402

IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
# float fake quantization (x_q / s) @ (T g)^T vs the integer path (x_q @ T^T) / (1/g) / s: the same products, summed
# in another order and scaled at another point, so only fp32 rounding differs (a wrong code or scale is O(0.1))
ATOL, RTOL = 2e-3, 1e-3


@pytest.fixture(scope="module", autouse=True)
def torch_extensions_dir(tmp_path_factory):
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(tmp_path_factory.getbasetemp() / "torch_extensions"))


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    """A tiny random LLaMA converted directly; its bitconvert.json records the source folder."""
    root = tmp_path_factory.mktemp("conv")
    src = make_tiny_llama(root / "src")
    convert(str(src), root / "ternary", progress=False)
    return root / "ternary"


def test_student_starts_exactly_at_the_folders_logits(converted):
    student, _, sub_norm = load_converted_student(converted)
    assert not sub_norm
    with torch.no_grad():
        ours = student.eval()(IDS).logits
        expected = load(converted)(IDS).logits
    assert torch.allclose(ours, expected, atol=ATOL, rtol=RTOL)


def test_kl_is_zero_for_identical_logits_and_its_gradient_pulls_towards_the_teacher():
    torch.manual_seed(0)
    teacher = torch.randn(2, 5, 11)
    assert distillation_kl(teacher, teacher.clone(), 1.0).abs().item() < 1e-6
    student = torch.zeros(2, 5, 11, requires_grad=True)  # uniform student
    distillation_kl(student, teacher, 2.0).backward()
    # d KL / d student logit j = tau * (p_student_j - p_teacher_j) / N: negative where the teacher puts more mass, so a
    # gradient step raises exactly the logits the teacher prefers (scored positions only: the last one predicts nothing)
    gap = torch.softmax(teacher[:, :-1] / 2.0, -1) - torch.softmax(student.detach()[:, :-1] / 2.0, -1)
    assert torch.equal(torch.sign(student.grad[:, :-1]), -torch.sign(gap))
    assert torch.all(student.grad[:, -1] == 0)


def test_hidden_cosine_is_zero_for_equal_states_and_positive_otherwise():
    states = tuple(torch.randn(2, 4, 8) for _ in range(3))
    assert hidden_cosine(states, tuple(s.clone() for s in states)).abs().item() < 1e-6
    assert hidden_cosine(states, tuple(torch.randn(2, 4, 8) for _ in range(3))).item() > 0.1


def test_warmups_fit_the_run():
    assert resolve_warmups(40, None, None, student_is_ternary=False) == (4, 2)
    assert resolve_warmups(40, None, None, student_is_ternary=True) == (0, 2)
    assert resolve_warmups(100_000, None, None, student_is_ternary=False) == (1000, 100)
    assert resolve_warmups(3, None, None, student_is_ternary=False) == (0, 1)
    assert resolve_warmups(40, 10, 5, student_is_ternary=False) == (10, 5)
    with pytest.raises(ValueError, match="--warmup-quant-steps 1000 does not finish within the run's 40 steps"):
        resolve_warmups(40, 1000, None, student_is_ternary=False)
    with pytest.raises(ValueError, match="--lr-warmup-steps 100 does not finish"):
        resolve_warmups(40, None, 100, student_is_ternary=False)
    with pytest.raises(ValueError, match="ternary from the start"):
        resolve_warmups(40, 5, None, student_is_ternary=True)


def test_default_learning_rate_depends_on_the_start():
    assert resolve_lr(None, student_is_ternary=True) == DEFAULT_LR_CONVERTED == 3e-3
    assert resolve_lr(None, student_is_ternary=False) == DEFAULT_LR_FULL_PRECISION == 3e-4
    assert resolve_lr(2e-4, student_is_ternary=True) == 2e-4  # a given rate is kept


def test_distillation_from_a_converted_folder_writes_the_trained_codes_and_scales(converted, text_file, tmp_path):
    out = tmp_path / "distilled"
    result = finetune(FinetuneOptions(source=str(converted), data=str(text_file), out=out, seq_len=32, batch_size=4,
                                      lr=3e-3, max_steps=6, eval_every=6, heldout_sequences=4, distill_hidden=0.5,
                                      progress=False, precision="fp32"))  # fp32: the same on every CI CPU
    train = [r for r in result.history if r["kind"] == "train"]
    assert all(r["quant_lambda"] == 1.0 and r["kl"] > 0 and r["hidden"] > 0 for r in train)
    assert all(r["loss"] == pytest.approx(r["kl"] + 0.5 * r["hidden"], rel=1e-5) for r in train)  # alpha 1: no CE
    assert all(r["teacher_seconds"] > 0 for r in train)
    report = json.loads((out / "bitconvert.json").read_text())
    assert report["options"]["teacher"] == json.loads((converted / "bitconvert.json").read_text())["source"]
    assert report["options"]["training"]["started_from"] == "converted folder"
    assert report["options"]["training"]["lr"] == 3e-3  # the rate the run used is recorded

    # the written folder is the trained student at lambda = 1 (learned scales), in stock transformers and ours
    from transformers import AutoModelForCausalLM

    from bitconvert.finetune.student import load_converted_student as reload

    retrained, _, _ = reload(out)
    with torch.no_grad():
        ours, stock = load(out)(IDS).logits, AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)(IDS).logits
        before = load(converted)(IDS).logits
        again = retrained.eval()(IDS).logits
    assert torch.allclose(ours, stock, atol=ATOL, rtol=RTOL)
    assert torch.allclose(ours, again, atol=ATOL, rtol=RTOL)
    assert not torch.allclose(ours, before, atol=1e-2)  # training moved it
    scales = [layer["scale"] for layer in report["layers"]]
    converted_scales = [layer["scale"] for layer in json.loads((converted / "bitconvert.json").read_text())["layers"]]
    assert scales != pytest.approx(converted_scales, rel=1e-6)  # the learned scales were trained and written


@pytest.mark.parametrize("case", ["teacher-gone", "teacher-vocab", "warmup-on-ternary", "teacher-without-distill"])
def test_bad_inputs_from_a_converted_folder_fail_with_one_line(case, converted, text_file, tmp_path, capsys):
    folder = tmp_path / "ternary"
    shutil.copytree(converted, folder)
    out = tmp_path / "out"
    args = ["finetune", str(folder), "--out", str(out), "--data", str(text_file), "--max-steps", "2",
            "--seq-len", "32", "--heldout-sequences", "2", "--quiet"]
    expected = {"teacher-gone": "is gone; name the full-precision teacher with --teacher",
                "teacher-vocab": "has a vocabulary of 300 tokens, the student 260",
                "warmup-on-ternary": "ternary from the start", "teacher-without-distill": "--teacher is only used"}[case]
    if case == "teacher-gone":
        report = json.loads((folder / "bitconvert.json").read_text())
        (folder / "bitconvert.json").write_text(json.dumps({**report, "source": str(tmp_path / "moved-away")}))
    elif case == "teacher-vocab":
        args += ["--teacher", str(make_tiny_llama(tmp_path / "other", vocab_size=300))]
    elif case == "warmup-on-ternary":
        args += ["--warmup-quant-steps", "1"]
    else:
        args += ["--teacher", str(folder), "--no-distill"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err
    assert not out.exists() and not (tmp_path / "out-checkpoints").exists()
