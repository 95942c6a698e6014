"""QAT on DeepSpeed (``bitconvert finetune``) with a tiny random LLaMA and a tiny text file.

DeepSpeed JIT-compiles its CPU communication op on the first ``initialize`` of a process; all tests share one
``TORCH_EXTENSIONS_DIR`` (the caller's, e.g. a CI cache, or one per test session), so it is compiled once.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tiny import make_tiny_llama  # noqa: E402

from bitconvert.cli import main  # noqa: E402
from bitconvert.finetune import FinetuneOptions, finetune  # noqa: E402
from bitconvert.finetune import engine as ds  # noqa: E402
from bitconvert.finetune import precision, trainer  # noqa: E402
from bitconvert.finetune.loss import distillation_kl  # noqa: E402
from bitconvert.finetune.runlog import read_log  # noqa: E402
from bitconvert.finetune.schedule import lr_multiplier, quant_lambda  # noqa: E402
from bitconvert.errors import BitconvertError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FAST = dict(seq_len=32, batch_size=4, lr=3e-3, lr_warmup_steps=2, warmup_quant_steps=4, heldout_sequences=4,
            distill=False, progress=False, precision="fp32")  # fp32: the same arithmetic on every CI CPU


@pytest.fixture(scope="session", autouse=True)
def torch_extensions_dir(tmp_path_factory):
    """One compile of DeepSpeed's CPU ops per session (kept where the caller points TORCH_EXTENSIONS_DIR)."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(tmp_path_factory.getbasetemp() / "torch_extensions"))


@pytest.fixture(scope="session")
def tiny_src(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("ft") / "src")


def run_finetune(src, data, out, **options):
    return finetune(FinetuneOptions(source=str(src), data=str(data), out=out, **{**FAST, **options}))


def train_losses(save_dir: Path) -> list[float]:
    return [r["loss"] for r in read_log(save_dir / "log.jsonl") if r["kind"] == "train"]


def test_quant_lambda_schedule():
    assert [quant_lambda(s, 4) for s in range(6)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert quant_lambda(0, 0) == 1.0


def test_lr_schedule_warms_up_from_a_nonzero_lr_then_decays_to_the_floor():
    values = [lr_multiplier(s, 4, 14, 0.1) for s in range(16)]
    assert values[:4] == [0.2, 0.4, 0.6, 0.8] and values[4] == 1.0
    assert all(a > b for a, b in zip(values[4:14], values[5:15]))
    assert values[14] == pytest.approx(0.1) and values[15] == pytest.approx(0.1)


def test_distillation_kl_is_zero_for_the_teacher_and_positive_otherwise():
    torch.manual_seed(0)
    teacher = torch.randn(2, 5, 11)
    assert distillation_kl(teacher, teacher, 5.0).abs().item() < 1e-6
    assert distillation_kl(torch.randn(2, 5, 11), teacher, 5.0).item() > 0


def test_generated_optimizer_is_torch_adamw_fused_on_cuda():
    """No DeepSpeed op to JIT-compile on either device: torch's AdamW, as one fused kernel on CUDA."""
    hp = ds.TrainingHyperparameters(4, 2, 1e-3, 0.1, 5, 0.01, 0.5, "adamw", 50)
    cpu = ds.resolve_config(None, hp, world_size=1, cuda=False)["optimizer"]["params"]
    cuda = ds.resolve_config(None, hp, world_size=1, cuda=True)["optimizer"]["params"]
    assert cpu["torch_adam"] is True and "fused" not in cpu
    assert cuda["torch_adam"] is True and cuda["fused"] is True


def test_more_processes_than_gpus_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_RANK", "1")
    # training_device() alone: deepspeed, once imported under a faked GPU, would keep a CUDA accelerator for the
    # whole test session
    with pytest.raises(BitconvertError, match="process 1 of this launch has no GPU"):
        ds.training_device()


def test_user_config_auto_values_are_filled_and_unsupported_settings_refused():
    hp = ds.TrainingHyperparameters(4, 2, 1e-3, 0.1, 5, 0.01, 0.5, "adamw", 50)
    user = {"train_micro_batch_size_per_gpu": "auto", "zero_optimization": {"stage": 2},
            "optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": 0.3}}}
    config = ds.resolve_config(user, hp, world_size=2, cuda=False)
    assert config["train_micro_batch_size_per_gpu"] == 4 and config["gradient_accumulation_steps"] == 2
    assert config["train_batch_size"] == 16 and config["gradient_clipping"] == 0.5
    assert config["optimizer"]["params"]["lr"] == 1e-3 and config["optimizer"]["params"]["weight_decay"] == 0.3
    assert "scheduler" not in config  # bitconvert's own warm-up + cosine, stepped by DeepSpeed
    scheduled = ds.resolve_config({"scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": "auto"}}}, hp,
                                  world_size=1, cuda=False)
    assert scheduled["scheduler"]["params"]["warmup_num_steps"] == 5
    with pytest.raises(BitconvertError, match="ZeRO stage 3"):
        ds.resolve_config({"zero_optimization": {"stage": 3}}, hp, world_size=1, cuda=False)
    with pytest.raises(BitconvertError, match="conflicts"):
        ds.resolve_config(user, ds.TrainingHyperparameters(4, 2, 1e-3, 0.1, 5, 0.01, 0.5, "adamw8bit", 50),
                          world_size=1, cuda=False)


@pytest.fixture(scope="session")
def trained(tiny_src, text_file, tmp_path_factory):
    """Plain QAT (no distillation), 30 steps."""
    out = tmp_path_factory.mktemp("ft-run") / "qat"
    result = run_finetune(tiny_src, text_file, out, max_steps=30, eval_every=10, save_every=10)
    return out, result


def test_loss_goes_down_and_heldout_perplexity_improves(trained):
    out, result = trained
    assert result.out == out and result.steps == 30
    losses = train_losses(out.with_name("qat-checkpoints"))
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    evals = [(r["step"], r["heldout_ppl"]) for r in result.history if r["kind"] == "eval"]
    assert [step for step, _ in evals] == [0, 10, 20, 30]  # step 0: the start of the curve, before training
    assert evals[-1][1] < evals[1][1]
    lambdas = [r["quant_lambda"] for r in result.history if r["kind"] == "train"]
    assert lambdas[:5] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert (out / "loss_curve.png").stat().st_size > 1000
    assert json.loads((out.with_name("qat-checkpoints") / "ds_config.json").read_text())["optimizer"]["type"] == "AdamW"


def _logits_match_latent_model_at_lambda_one(out: Path, sub_norm: bool):
    """The written folder, through stock transformers and bitconvert.load, reproduces the trained model at lambda=1
    (rebuilt from latent/, which holds exactly the trained tensors)."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    from bitconvert.finetune.export import load_latent_sub_norms
    from bitconvert.load import load
    from bitconvert.quantize import TernaryConfig, quantize_

    trained = LlamaForCausalLM.from_pretrained(out / "latent", dtype=torch.float32)
    quantize_(trained, TernaryConfig(mode="train", sub_norm=sub_norm, sub_norm_eps=trained.config.rms_norm_eps,
                                     quant_lambda=1.0))
    load_latent_sub_norms(trained, out / "latent", sub_norm)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = trained.eval()(ids).logits
        ours = load(out)(ids).logits
        stock = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)(ids).logits
    # Float fake quantization vs the integer path: they differ by fp32 summation order only, but an activation that
    # lands on an int8 rounding boundary can round the other way in one path (the order depends on the CPU's SIMD
    # width), which moves the following logits by about one quantization step, ~1e-3 of their spread (measured 1.6e-3
    # on AMD Zen 3). A renamed or missing tensor moves them by O(spread): 2% of the spread separates the two.
    bound = 0.02 * expected.std().item()
    assert (ours - expected).abs().max().item() < bound
    assert (stock - expected).abs().max().item() < bound
    if sub_norm:  # the trained SubLN gains moved, so a name mix-up would show
        assert type(load(out)).__name__ == "BitNetForCausalLM"


def test_output_loads_in_stock_transformers_with_the_trained_logits(trained):
    _logits_match_latent_model_at_lambda_one(trained[0], sub_norm=False)


def test_distillation_with_sub_norm(tiny_src, text_file, tmp_path):
    out = tmp_path / "distilled"
    result = run_finetune(tiny_src, text_file, out, max_steps=12, distill=True, distill_alpha=0.7, sub_norm=True,
                          eval_every=6, warmup_quant_steps=0)
    records = [r for r in result.history if r["kind"] == "train"]
    assert all(r["kl"] > 0 for r in records)
    for r in records:  # the logged loss is the documented mix
        assert math.isclose(r["loss"], 0.3 * r["ce"] + 0.7 * r["kl"], rel_tol=1e-5)
    assert sum(r["loss"] for r in records[-3:]) < sum(r["loss"] for r in records[:3])
    _logits_match_latent_model_at_lambda_one(out, sub_norm=True)


def test_precision_rules():
    assert precision.cpu_has_native_bf16("flags : fpu avx2 avx512f avx512_bf16 avx512_vnni")
    assert precision.cpu_has_native_bf16("flags : fpu avx2 amx_bf16 amx_tile")
    assert not precision.cpu_has_native_bf16("flags : fpu avx2 avx512f avx512_vnni")
    assert precision.resolve_bf16("bf16", cuda=False, user_config=None, saved_config=None)
    assert not precision.resolve_bf16("fp32", cuda=False, user_config=None, saved_config=None)
    assert precision.resolve_bf16("auto", cuda=False, user_config=None, saved_config=None) == precision.cpu_has_native_bf16()
    saved_bf16 = {"bf16": {"enabled": True}}
    assert precision.resolve_bf16("auto", cuda=False, user_config=None, saved_config=saved_bf16)
    assert not precision.resolve_bf16("auto", cuda=False, user_config=None, saved_config={})
    with pytest.raises(BitconvertError, match="trains in fp32 but the run being resumed trained in bf16"):
        precision.resolve_bf16("fp32", cuda=False, user_config=None, saved_config=saved_bf16)
    with pytest.raises(BitconvertError, match="trains in fp32 but the run being resumed trained in bf16"):
        precision.resolve_bf16("auto", cuda=False, user_config={"bf16": {"enabled": False}}, saved_config=saved_bf16)
    assert precision.resolve_bf16("auto", cuda=False, user_config={"bf16": {"enabled": True}}, saved_config=saved_bf16)
    auto_section = {"bf16": {"enabled": "auto"}}
    assert precision.resolve_bf16("auto", cuda=False, user_config=auto_section,
                                  saved_config=None) == precision.cpu_has_native_bf16()
    with pytest.raises(BitconvertError, match="with --deepspeed set its \"bf16\" section"):
        precision.resolve_bf16("bf16", cuda=False, user_config={}, saved_config=None)
    hp = ds.TrainingHyperparameters(4, 1, 1e-3, 0.1, 1, 0.0, 1.0, "adamw", 10)
    assert ds.resolve_config(None, hp, world_size=1, cuda=False, bf16=True)["bf16"] == {"enabled": True}
    assert "bf16" not in ds.resolve_config(None, hp, world_size=1, cuda=False, bf16=False)
    assert ds.resolve_config(auto_section, hp, world_size=1, cuda=False, bf16=True)["bf16"] == {"enabled": True}
    # DeepSpeed still reads the section's older name, "bfloat16": so do the precision rules and the "auto" filling
    old_name = {"bfloat16": {"enabled": True}}
    assert precision.resolve_bf16("auto", cuda=False, user_config=old_name, saved_config=None)
    assert precision.resolve_bf16("auto", cuda=False, user_config=None, saved_config=old_name)
    assert ds.resolve_config({"bfloat16": {"enabled": "auto"}}, hp, world_size=1, cuda=False,
                             bf16=False)["bfloat16"] == {"enabled": False}


def test_bf16_distillation_writes_a_model_with_the_trained_logits(tiny_src, text_file, tmp_path):
    """bf16 mixed precision (forced, so that it runs on every CPU): the folder is written from the fp32 master
    weights and reproduces the trained model; a resume cannot switch precision."""
    out = tmp_path / "bf16"
    result = run_finetune(tiny_src, text_file, out, max_steps=12, distill=True, eval_every=6, precision="bf16",
                          warmup_quant_steps=0)
    records = [r for r in result.history if r["kind"] == "train"]
    assert sum(r["loss"] for r in records[-3:]) < sum(r["loss"] for r in records[:3])
    report = json.loads((out / "bitconvert.json").read_text())
    assert report["options"]["training"]["precision"] == "bf16"
    # written from the fp32 master weights, not their bf16 copies: latent values that bf16 cannot hold
    from safetensors.torch import load_file

    latent = load_file(out / "latent" / "model.safetensors")
    q_proj = latent["model.layers.0.self_attn.q_proj.weight"]
    assert q_proj.dtype == torch.float32 and not torch.equal(q_proj, q_proj.bfloat16().float())
    _logits_match_latent_model_at_lambda_one(out, sub_norm=False)
    with pytest.raises(BitconvertError, match="trains in fp32 but the run being resumed trained in bf16"):
        run_finetune(tiny_src, text_file, tmp_path / "bf16", max_steps=14, resume=True, overwrite=True,
                     save_dir=tmp_path / "bf16-checkpoints")


def test_resume_continues_the_same_loss_sequence(tiny_src, text_file, tmp_path):
    straight = run_finetune(tiny_src, text_file, tmp_path / "a", max_steps=8, save_every=100)
    first = run_finetune(tiny_src, text_file, tmp_path / "b", max_steps=8, save_every=100, stop_after=4)
    assert first.out is None and first.stopped == "stop_after" and first.steps == 4
    resumed = run_finetune(tiny_src, text_file, tmp_path / "b", max_steps=8, save_every=100, resume=True)
    assert resumed.steps == 8 and (tmp_path / "b").is_dir()
    a, b = train_losses(tmp_path / "a-checkpoints"), train_losses(tmp_path / "b-checkpoints")
    assert len(a) == len(b) == 8
    assert a[4:] != a[:4]
    assert b == pytest.approx(a, rel=1e-5, abs=1e-6)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_src, text_file, tmp_path, monkeypatch):
    calls = []
    real = trainer.cross_entropy

    def poisoned(logits, ids):
        if not torch.is_grad_enabled():  # held-out evaluation (step 0 and --eval-every), not a training step
            return real(logits, ids)
        calls.append(1)
        loss = real(logits, ids)
        return loss * float("nan") if len(calls) == 4 else loss

    monkeypatch.setattr(trainer, "cross_entropy", poisoned)
    with pytest.raises(BitconvertError, match=r"loss became nan at step 4.*step_2"):
        run_finetune(tiny_src, text_file, tmp_path / "out", max_steps=10, save_every=2)
    assert not (tmp_path / "out").exists()
    assert (tmp_path / "out-checkpoints" / "latest").read_text().strip() == "step_2"


def test_interrupt_saves_a_checkpoint_and_stops(tiny_src, text_file, tmp_path, monkeypatch):
    calls = []
    real = trainer.cross_entropy

    def interrupting(logits, ids):
        if not torch.is_grad_enabled():  # held-out evaluation, not a training step
            return real(logits, ids)
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return real(logits, ids)

    monkeypatch.setattr(trainer, "cross_entropy", interrupting)
    result = run_finetune(tiny_src, text_file, tmp_path / "out", max_steps=10, save_every=100)
    assert result.stopped == "interrupted" and result.steps == 3
    assert not (tmp_path / "out").exists()
    assert (tmp_path / "out-checkpoints" / "latest").read_text().strip() == "step_3"


def test_two_processes_with_zero2(tiny_src, text_file, tmp_path):
    config = tmp_path / "zero2.json"
    config.write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto", "zero_optimization": {"stage": 2}}))
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    if torch.cuda.device_count() < 2:
        env["CUDA_VISIBLE_DEVICES"] = ""  # two processes need two GPUs; on fewer, both train on the CPU (gloo)
    with socket.socket() as probe:  # torchrun hangs with --master_port 0; give it a free port
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
               "-m", "bitconvert.cli", "finetune", str(tiny_src), "--data", str(text_file), "--out", str(out),
               "--deepspeed", str(config), "--max-steps", "6", "--seq-len", "32", "--batch-size", "2",
               "--lr", "3e-3", "--lr-warmup-steps", "1", "--warmup-quant-steps", "2", "--heldout-sequences", "4",
               "--eval-every", "3", "--no-distill", "--quiet"]
    # own process group, so that a hang kills torchrun's workers too instead of orphaning them
    launcher = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
    try:
        _, stderr = launcher.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(launcher.pid, signal.SIGKILL)
        launcher.communicate()
        raise
    assert launcher.returncode == 0, stderr[-3000:]
    records = read_log(tmp_path / "out-checkpoints" / "log.jsonl")
    train = [r for r in records if r["kind"] == "train"]
    assert len(train) == 6 and train[0]["tokens"] == 2 * 2 * 32  # two processes x micro-batch 2 x 32 tokens
    assert train[-1]["loss"] < train[0]["loss"]
    assert (out / "model.safetensors").is_file()
    assert json.loads((tmp_path / "out-checkpoints" / "ds_config.json").read_text())["zero_optimization"]["stage"] == 2


@pytest.mark.parametrize("case", ["missing", "empty", "jsonl-field", "bad-json-config", "rejected-config",
                                  "seq-len", "existing-out", "zero-steps", "zero-tokens", "long-warmup"])
def test_bad_inputs_fail_with_one_line_and_write_nothing(case, tiny_src, text_file, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["finetune", str(tiny_src), "--out", str(out), "--data", str(text_file), "--max-steps", "2",
            "--seq-len", "32", "--heldout-sequences", "2", "--no-distill", "--quiet"]
    expected = {
        "missing": "does not exist", "empty": "fewer than 32 training tokens", "jsonl-field": "no 'text' field",
        "bad-json-config": "not valid JSON", "rejected-config": "DeepSpeed rejected config",
        "seq-len": "exceeds the model's maximum of 256", "existing-out": "already exists",
        "zero-steps": "--max-steps must be at least 1", "zero-tokens": "--max-tokens must be at least 1",
        "long-warmup": "--warmup-quant-steps 5 does not finish within the run's 2 steps",
    }[case]
    if case == "missing":
        args[args.index("--data") + 1] = str(tmp_path / "nope.txt")
    elif case == "empty":
        (tmp_path / "empty.txt").write_text("")
        args[args.index("--data") + 1] = str(tmp_path / "empty.txt")
    elif case == "jsonl-field":
        (tmp_path / "d.jsonl").write_text(json.dumps({"content": "hello"}) + "\n")
        args[args.index("--data") + 1] = str(tmp_path / "d.jsonl")
    elif case == "bad-json-config":
        (tmp_path / "ds.json").write_text("{not json")
        args += ["--deepspeed", str(tmp_path / "ds.json")]
    elif case == "rejected-config":  # 4 != 3 x 1 x 1: DeepSpeed's own batch check
        (tmp_path / "ds.json").write_text(json.dumps({"train_batch_size": 4, "train_micro_batch_size_per_gpu": 3}))
        args += ["--deepspeed", str(tmp_path / "ds.json")]
    elif case == "seq-len":
        args[args.index("--seq-len") + 1] = "512"
    elif case == "existing-out":
        out.mkdir()
    elif case == "zero-steps":
        args[args.index("--max-steps") + 1] = "0"
    elif case == "zero-tokens":
        args[args.index("--max-steps"):args.index("--max-steps") + 2] = ["--max-tokens", "0"]
    elif case == "long-warmup":
        args += ["--warmup-quant-steps", "5"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err
    assert out.exists() == (case == "existing-out")
    assert not (tmp_path / "out-checkpoints").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
