"""The benchmark scripts run as ``python benchmarks/NAME.py``, which puts ``benchmarks/`` first on ``sys.path``: a script
named like an installed module shadows it for everything imported after it. ``benchmarks/kernels.py`` did so for the
``kernels`` package that transformers (5.x) imports, and every script that loaded a model failed with an ImportError."""

import importlib.util
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


# imported by a dependency when installed, so reserved even where it is not (transformers 4.x did not require it)
RESERVED = {"kernels"}


def test_no_benchmark_script_shadows_an_installed_module():
    scripts = sorted(path.stem for path in BENCHMARKS.glob("*.py"))
    assert scripts, f"no scripts found in {BENCHMARKS}"
    shadowing = [name for name in scripts
                 if name in RESERVED or name in sys.stdlib_module_names or importlib.util.find_spec(name) is not None]
    assert not shadowing, f"benchmarks/ scripts named like installed modules: {shadowing}"


def test_paired_decode_alternates_blocks_and_reports_each(tiny_ternary, tmp_path):
    """benchmarks/paired_decode.py on a tiny converted model: one engine per layout, lm_head and cache, each gets one
    block per round, decoding goes on from the prompt after one untimed warm-up token per block and starts over
    before passing --max-position, and the figures of each block agree with each other (bytes per token grow with
    the cache; the fraction of the bound is bytes / time / bandwidth)."""
    import json
    import subprocess

    out = tmp_path / "paired.json"
    command = [sys.executable, str(BENCHMARKS / "paired_decode.py"), str(tiny_ternary), "--layouts", "2bit",
               "--lm-heads", "int8,int6", "--kv-caches", "fp32,fp16", "--rounds", "4", "--block", "3",
               "--warmup-tokens", "1", "--prompt-tokens", "5", "--max-position", "13", "--threads", "1",
               "--split", "0.001", "--json", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    assert list(report["blocks"]) == ["bitconvert 2bit", "bitconvert 2bit fp16-kv", "bitconvert 2bit int6",
                                      "bitconvert 2bit int6 fp16-kv"]
    read = {name: rows[0]["bytes_per_token"] for name, rows in report["blocks"].items()}
    assert read["bitconvert 2bit int6"] < read["bitconvert 2bit"]  # the int6 head reads fewer bytes than int8
    assert read["bitconvert 2bit fp16-kv"] < read["bitconvert 2bit"]  # and the fp16 cache fewer than fp32
    rows = report["blocks"]["bitconvert 2bit"]
    assert [row["round"] for row in rows] == [0, 1, 2, 3]
    # warm-up at 5, timed 6-8; warm-up at 9, timed 10-12; then over again from 5
    assert [row["mean_position"] for row in rows] == [7.5, 11.5, 7.5, 11.5]
    assert rows[1]["bytes_per_token"] > rows[0]["bytes_per_token"] == rows[2]["bytes_per_token"]
    for row in rows:
        expected = row["bytes_per_token"] / row["seconds_per_token"] / 1e9 / row["bandwidth_gb_s"]
        assert abs(row["fraction_of_bound"] - expected) <= 1e-9 * expected
    summary = report["summary"]["all"]
    assert summary["rounds"] == [0, 1, 2, 3]
    assert summary["engines"]["bitconvert 2bit"]["time_ratio_to_bitconvert 2bit"] == 1.0
    assert "high" in report["summary"] and "low" not in report["summary"]  # --split 0.001: every probe is above
    assert report["summary"]["high"]["rounds"] == [0, 1, 2, 3]
    assert "bitconvert 2bit" in result.stdout


def test_paired_decode_pages_engines(tiny_ternary, tmp_path, monkeypatch):
    """--pages 4k,huge gives one lean and one ORT engine per kind (4k named; an export with ORT's GroupQueryAttention
    named gqa), built with BITCONVERT_HUGE_PAGES=0 only while the 4k one loads or makes its cache; a kind that is not
    huge or 4k is refused."""
    import json
    import subprocess

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import paired_decode
    from bitconvert.kernels import pages

    monkeypatch.delenv(pages.ENV_VARIABLE, raising=False)
    with paired_decode.environment(pages.ENV_VARIABLE, "0"):
        assert not pages.huge_pages_requested()
    assert pages.ENV_VARIABLE not in paired_decode.os.environ
    with paired_decode.environment(pages.ENV_VARIABLE, None):
        assert pages.ENV_VARIABLE not in paired_decode.os.environ

    out = tmp_path / "paired.json"
    base = [sys.executable, str(BENCHMARKS / "paired_decode.py"), str(tiny_ternary), "--layouts", "2bit",
            "--rounds", "1", "--block", "2", "--prompt-tokens", "4", "--max-position", "9", "--threads", "1"]
    from bitconvert.export import export_onnx

    onnx_paths = [export_onnx(tiny_ternary, tmp_path / attention / "model.onnx", graph="fused", lm_head="int8",
                              logits="last", attention=attention) for attention in ("bitconvert", "gqa")]
    result = subprocess.run([*base, "--pages", "4k,huge", "--onnx", str(onnx_paths[0]), "--onnx", str(onnx_paths[1]),
                             "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert list(json.loads(out.read_text())["blocks"]) == ["bitconvert 2bit 4k-pages", "bitconvert 2bit",
                                                           "ort 4k-pages", "ort", "ort gqa 4k-pages", "ort gqa"]
    refused = subprocess.run([*base, "--pages", "huge,2m"], capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0
    assert refused.stderr.strip().splitlines()[-1] == "error: --pages huge,2m: list huge and/or 4k, each once"


def test_paired_decode_refuses_a_repeated_layout(tiny_ternary):
    import subprocess

    result = subprocess.run([sys.executable, str(BENCHMARKS / "paired_decode.py"), str(tiny_ternary), "--layouts",
                             "2bit,2bit"], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith("error: --layouts names 2bit twice")


def test_llama_bench_depth(monkeypatch):
    """benchmarks/llamacpp.bench_gguf asks llama-bench for a filled cache (-d) only when given a depth, and reads the
    decode figure either way (llama-bench itself is not run: its command line is checked)."""
    import json

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import llamacpp

    commands = []

    def fake_run(command):
        commands.append([str(part) for part in command])
        return json.dumps([{"n_prompt": 0, "n_gen": 8, "n_depth": 0, "avg_ts": 100.0, "model_size": 1,
                            "model_type": "llama"}])

    monkeypatch.setattr(llamacpp, "_run", fake_run)
    monkeypatch.setattr(llamacpp, "binary", lambda name: name)
    assert llamacpp.bench_gguf("m.gguf", 2, prompt=0, gen=8, depth=128)["decode_tok_s"] == 100.0
    assert llamacpp.bench_gguf("m.gguf", 2, prompt=0, gen=8)["decode_tok_s"] == 100.0
    assert commands[0][-2:] == ["-d", "128"]
    assert "-d" not in commands[1]


def test_llama_cpp_crash_is_reported_and_the_run_goes_on(tmp_path, monkeypatch):
    """A llama.cpp tool that crashes raises LlamaCppFailed with its exit status and stderr (not a bare exit), and
    benchmarks/headtohead.run_rounds reports that engine as failed while the other engines' runs go on."""
    import stat

    import pytest

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import headtohead
    import llamacpp

    crashing = tmp_path / "llama-bench"
    crashing.write_text("#!/bin/sh\necho 'ggml: something broke' >&2\nkill -SEGV $$\n")
    crashing.chmod(crashing.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setattr(llamacpp, "binary", lambda name: crashing)
    with pytest.raises(llamacpp.LlamaCppFailed, match=r"(?s)failed \(-11\): \S*llama-bench -m m.gguf .*something broke"):
        llamacpp.bench_gguf("m.gguf", 2)

    monkeypatch.setattr(headtohead, "memory_bandwidth", lambda threads: 10e9)
    engines = {"ours": lambda: {"decode_tok_s": 100.0, "prefill_tok_s": 1000.0, "bytes_per_token": 10**7},
               "llama.cpp tq2_0": lambda: llamacpp.bench_gguf("m.gguf", 2)}
    bandwidths = []
    runs, failures = headtohead.run_rounds("tiny", engines, 2, 2, bandwidths)
    assert [run["fraction_of_bandwidth"] for run in runs["ours"]] == [0.1, 0.1]
    assert runs["llama.cpp tq2_0"] == [] and failures["llama.cpp tq2_0"].startswith("failed (-11): ")
    assert bandwidths == [10.0] * 4


def test_attention_nodes_times_both_ops(tmp_path):
    """benchmarks/attention_nodes.py at tiny shapes: a row per position with both ops' time per node and their ratio."""
    import json
    import subprocess

    out = tmp_path / "attention.json"
    command = [sys.executable, str(BENCHMARKS / "attention_nodes.py"), "--heads", "4", "--kv-heads", "2",
               "--head-dim", "16", "--layers", "2", "--positions", "3,9", "--capacity", "16", "--rounds", "2",
               "--steps", "4", "--threads", "1", "--json", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["shapes"] == {"heads": 4, "kv_heads": 2, "head_dim": 16, "layers": 2, "threads": 1}
    assert [row["position"] for row in report["rows"]] == [3, 9]
    for row in report["rows"]:
        assert row["gqa_us_per_node"] > 0 and row["bitconvert_us_per_node"] > 0
        assert abs(row["speedup"] - row["gqa_us_per_node"] / row["bitconvert_us_per_node"]) < 1e-9
    refused = subprocess.run([*command[:2], "--positions", "20", "--capacity", "16"], capture_output=True, text=True)
    assert refused.returncode == 2 and "--capacity 16 must exceed every position" in refused.stderr
