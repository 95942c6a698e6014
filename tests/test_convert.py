"""Conversion end to end: CLI, stock-transformers loading with matching logits, GGUF, shards, SubLN, bad inputs."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, BitNetForCausalLM, LlamaForCausalLM

import bitconvert
import bitconvert.checkpoint as checkpoint
from bitconvert import PackedBitLinear, TernaryConfig, quantize_
from bitconvert.cli import main
from bitconvert.load import load
from tiny import make_tiny_llama, write_tiny_gguf

IDS = torch.tensor([[256, 72, 101, 108, 108, 111, 32, 119, 111, 114, 108, 100, 33, 10, 65, 66]])


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def _leftovers(parent: Path) -> list[str]:
    return [path.name for path in parent.iterdir() if path.name.startswith(".")]


def test_cli_converts_and_reports(tiny_llama, tmp_path, capsys):
    out = tmp_path / "ternary"
    code, stdout, _ = _run(capsys, tiny_llama, "--out", out, "--quiet")
    assert code == 0
    assert "converted 73,728 parameters in 14 projections" in stdout
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "bitconvert.json"} <= {
        path.name for path in out.iterdir()}
    report = json.loads((out / "bitconvert.json").read_text())
    assert report["source"] == str(tiny_llama) and report["options"]["weight_scale"] == "absmean"
    assert len(report["layers"]) == 14 and report["bytes_after"] < report["bytes_before"]
    for layer in report["layers"]:
        assert 0 < layer["zero_fraction"] < 1 and layer["scale"] > 0 and 0 < layer["relative_error"] < 1
    tensors = load_file(out / "model.safetensors")
    assert tensors["model.layers.0.self_attn.q_proj.weight"].dtype == torch.uint8
    assert tensors["model.layers.0.self_attn.q_proj.weight"].shape == (16, 64)
    assert tensors["model.layers.0.mlp.down_proj.weight_scale"].dtype == torch.float32
    assert tensors["lm_head.weight"].dtype == torch.float32
    assert _leftovers(tmp_path) == []


def test_stock_transformers_and_bitconvert_load_agree(tiny_ternary):
    stock = AutoModelForCausalLM.from_pretrained(tiny_ternary)
    ours = load(tiny_ternary)
    assert type(stock) is LlamaForCausalLM and isinstance(ours.model.layers[0].mlp.up_proj, PackedBitLinear)
    # Same integer accumulators; stock divides by the product of the scales, we divide one after the other:
    # fp32 rounding differences, far below the logits' scale.
    torch.testing.assert_close(_logits(ours), _logits(stock), rtol=0, atol=1e-4)
    generated = ours.generate(IDS, max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, IDS.shape[1] + 4)


def test_loaded_model_equals_in_memory_packing(tiny_llama, tiny_ternary):
    source = LlamaForCausalLM.from_pretrained(tiny_llama).eval()
    quantize_(source, TernaryConfig(mode="packed"))
    torch.testing.assert_close(_logits(load(tiny_ternary)), _logits(source), rtol=0, atol=1e-5)


def test_gguf_source_converts_like_the_folder(tiny_llama, tiny_ternary, tmp_path, capsys):
    gguf_path = write_tiny_gguf(tiny_llama, tmp_path / "tiny.gguf")
    out = tmp_path / "from-gguf"
    assert _run(capsys, gguf_path, "--out", out, "--quiet")[0] == 0
    ours, reference = load_file(out / "model.safetensors"), load_file(tiny_ternary / "model.safetensors")
    assert set(ours) == set(reference)
    for name in reference:
        assert torch.equal(ours[name], reference[name]), name


def test_sharded_output_and_source(tiny_llama, tmp_path, capsys):
    sharded = tmp_path / "sharded"
    assert _run(capsys, tiny_llama, "--out", sharded, "--shard-size", "40KB", "--quiet")[0] == 0
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all((sharded / name).is_file() for name in shards)
    assert oct((sharded / shards[0]).stat().st_mode & 0o777) == oct(0o666 & ~_umask())
    torch.testing.assert_close(_logits(load(sharded)), _logits(AutoModelForCausalLM.from_pretrained(sharded)),
                               rtol=0, atol=1e-4)
    # a sharded *source* streams too
    src = tmp_path / "sharded-src"
    LlamaForCausalLM.from_pretrained(tiny_llama).save_pretrained(src, max_shard_size="100KB")
    shutil.copy(tiny_llama / "tokenizer.json", src)
    assert _run(capsys, src, "--out", tmp_path / "from-sharded", "--quiet")[0] == 0


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_sub_norm_writes_bitnet_model_type(tiny_llama, tmp_path, capsys):
    out = tmp_path / "subln"
    assert _run(capsys, tiny_llama, "--out", out, "--sub-norm", "--quiet")[0] == 0
    stock = AutoModelForCausalLM.from_pretrained(out)
    assert type(stock) is BitNetForCausalLM
    torch.testing.assert_close(stock.model.layers[1].mlp.ffn_sub_norm.weight, torch.ones(128))
    ours = load(out)
    torch.testing.assert_close(_logits(ours), _logits(stock), rtol=0, atol=1e-4)
    # the same as inserting SubLN in memory (gain 1) and packing
    source = LlamaForCausalLM.from_pretrained(tiny_llama).eval()
    quantize_(source, TernaryConfig(mode="packed", sub_norm=True, sub_norm_eps=source.config.rms_norm_eps))
    torch.testing.assert_close(_logits(ours), _logits(source), rtol=0, atol=1e-4)


def test_bfloat16_source_keeps_its_dtype_and_tied_embeddings(tmp_path, capsys):
    src = make_tiny_llama(tmp_path / "bf16", dtype=torch.bfloat16, tie_word_embeddings=True)
    out = tmp_path / "bf16-out"
    assert _run(capsys, src, "--out", out, "--quiet")[0] == 0
    tensors = load_file(out / "model.safetensors")
    assert "lm_head.weight" not in tensors and tensors["model.embed_tokens.weight"].dtype == torch.bfloat16
    model = load(out)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert torch.isfinite(_logits(model)).all()


def test_absmedian_option_recorded(tiny_llama, tmp_path, capsys):
    out = tmp_path / "median"
    assert _run(capsys, tiny_llama, "--out", out, "--weight-scale", "absmedian", "--quiet")[0] == 0
    assert json.loads((out / "bitconvert.json").read_text())["options"]["weight_scale"] == "absmedian"


def test_overwrite_replaces_only_when_asked(tiny_llama, tiny_ternary, tmp_path, capsys):
    out = tmp_path / "again"
    shutil.copytree(tiny_ternary, out)
    (out / "marker").write_text("old")
    code, _, err = _run(capsys, tiny_llama, "--out", out, "--quiet")
    assert code == 2 and "already exists" in err and "--overwrite" in err and (out / "marker").exists()
    assert _run(capsys, tiny_llama, "--out", out, "--overwrite", "--quiet")[0] == 0
    assert not (out / "marker").exists() and (out / "model.safetensors").is_file()
    assert _leftovers(tmp_path) == []


def _unsupported_model(folder: Path) -> Path:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    save_file({"wte.weight": torch.zeros(4, 4)}, folder / "model.safetensors")
    return folder


def _truncated_model(tiny_llama: Path, folder: Path) -> Path:
    shutil.copytree(tiny_llama, folder)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    return folder


def _pickled_model(tiny_llama: Path, folder: Path) -> Path:
    shutil.copytree(tiny_llama, folder)
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    return folder


BAD_INPUTS = {
    "missing path": (lambda src, tmp: tmp / "does-not-exist", "no such file or folder"),
    "not a model folder": (lambda src, tmp: tmp, "not a model folder"),
    "unsupported architecture": (lambda src, tmp: _unsupported_model(tmp / "gpt2"), "unsupported architecture 'GPT2LMHeadModel'"),
    "truncated safetensors": (lambda src, tmp: _truncated_model(src, tmp / "truncated"), "truncated or corrupt"),
    "pickled weights": (lambda src, tmp: _pickled_model(src, tmp / "pickled"), "--allow-pickle"),
    "a text file": (lambda src, tmp: (tmp / "notes.txt").write_text("x") and tmp / "notes.txt", "not a .gguf"),
    "an already converted folder": (lambda src, tmp: bitconvert.convert(src, tmp / "done", progress=False).out,
                                    "already quantized (bitnet)"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_source_is_one_line_error_and_no_output(case, tiny_llama, tmp_path, capsys):
    make_source, message = BAD_INPUTS[case]
    workdir = tmp_path / "work"
    workdir.mkdir()
    source = make_source(tiny_llama, workdir)
    out = tmp_path / "out"
    code, _, err = _run(capsys, source, "--out", out, "--quiet")
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1 and err.startswith("bitconvert: error: ")
    assert not out.exists() and _leftovers(tmp_path) == []


def test_pickled_weights_convert_with_explicit_flag(tiny_llama, tiny_ternary, tmp_path, capsys):
    source = _pickled_model(tiny_llama, tmp_path / "pickled")
    out = tmp_path / "out"
    assert _run(capsys, source, "--out", out, "--allow-pickle", "--quiet")[0] == 0
    torch.testing.assert_close(_logits(load(out)), _logits(load(tiny_ternary)), rtol=0, atol=1e-5)


def test_unwritable_destination(tiny_llama, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for out in (blocker / "out", Path("/proc/bitconvert-test-out")):
        code, _, err = _run(capsys, tiny_llama, "--out", out, "--quiet")
        assert code == 2 and "cannot write" in err and len(err.strip().splitlines()) == 1


def test_hub_id_offline_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = _run(capsys, "nobody-here/no-such-model", "--out", tmp_path / "out", "--quiet")
    assert code == 2 and "cannot fetch 'nobody-here/no-such-model'" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, RuntimeError])
def test_interrupted_conversion_leaves_nothing(interrupt, tiny_llama, tmp_path, capsys, monkeypatch):
    calls = []
    original = checkpoint.quantize_weight_tensor

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise interrupt("stop")
        return original(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "quantize_weight_tensor", failing)
    out = tmp_path / "out"
    if interrupt is KeyboardInterrupt:
        code, _, err = _run(capsys, tiny_llama, "--out", out, "--quiet")
        assert code == 130 and "interrupted" in err
    else:
        with pytest.raises(RuntimeError):
            main([str(tiny_llama), "--out", str(out), "--quiet"])
    assert not out.exists() and _leftovers(tmp_path) == []


def test_console_script_help_lists_every_verb_with_examples():
    result = subprocess.run([sys.executable, "-m", "bitconvert.cli", "--help"], capture_output=True, text=True, check=True)
    for verb in ("convert", "ppl"):
        assert verb in result.stdout
    assert "bitconvert smollm2-135m --out ternary-smollm2" in result.stdout


def test_python_api_mirrors_the_cli(tiny_llama, tmp_path):
    import bitconvert

    result = bitconvert.convert(tiny_llama, tmp_path / "api", bitconvert.ConvertOptions(weight_scale="absmedian"),
                                progress=False)
    assert result.report.options["weight_scale"] == "absmedian"
    model = bitconvert.load(result.out)
    assert isinstance(model.model.layers[0].self_attn.q_proj, bitconvert.PackedBitLinear)
    assert torch.isfinite(_logits(model)).all()
