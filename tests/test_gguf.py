"""GGUF export on tiny random models, read back with gguf-py.

Exactness: every projection must dequantize to exactly ``T * fp16(g)``, with ``T`` the folder's own codes (in
llama.cpp's q/k row order for the llama architecture) and ``g`` its per-tensor scale; the only rounding is fp16(g),
checked against bitconvert's own layer (``load``) to 2^-11 relative. Float tensors must carry the same bits as the
folder's tensor cast to the chosen type. Q2_0 (type 42) is unknown to gguf-py <= 0.19, so :class:`Reader` reads those
tensors as raw blocks and :func:`dequantize_q2_0` decodes them as llama.cpp's ``dequantize_row_q2_0`` does.
"""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import _permute_for_gguf, make_tiny_llama
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from bitconvert.cli import main
from bitconvert.convert import ConvertOptions, convert
from bitconvert.export import gguf as gguf_export
from bitconvert.export.gguf_tokenizer import pre_tokenizer_name
from bitconvert.load import load
from bitconvert.packing import unpack_ternary

Q2_0 = 42
SPECIALS = ("<s>", "</s>", "<unk>", "<pad>")
VOCAB = 262
PROJECTIONS = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down"}


class Reader(gguf.GGUFReader):
    """gguf-py's reader, plus the Q2_0 tensors (unknown to gguf <= 0.19) as raw ``(rows, bytes)`` blocks in ``q2_0``."""

    def _build_tensors(self, start_offs, fields):
        super()._build_tensors(start_offs, [f for f in fields if int(f.parts[4][0]) != Q2_0])
        self.q2_0 = {}
        for f in fields:
            if int(f.parts[4][0]) == Q2_0:
                _, name, _, dims, _, offset = f.parts
                rows, row_bytes = int(np.prod(dims[1:])), int(dims[0]) // 64 * 18
                data = self._get(start_offs + int(offset[0]), np.uint8, rows * row_bytes)
                self.q2_0[bytes(name).decode()] = data.reshape(rows, row_bytes)


def dequantize_q2_0(blocks: np.ndarray) -> np.ndarray:
    """llama.cpp's Q2_0: per 18-byte block, fp16 d then 16 bytes; value j = (((qs[j/4] >> 2*(j%4)) & 3) - 1) * d."""
    rows = blocks.shape[0]
    blocks = blocks.reshape(-1, 18)
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    codes = (blocks[:, 2:, None] >> np.array([0, 2, 4, 6], dtype=np.uint8)) & 3
    return ((codes.reshape(-1, 64).astype(np.float32) - 1) * d).reshape(rows, -1)


def read(path):
    """``(reader, {name: (type name, dequantized fp32 array in numpy (rows, in) order)})``."""
    reader = Reader(path)
    tensors = {t.name: (t.tensor_type.name, gguf.quants.dequantize(t.data, t.tensor_type)) for t in reader.tensors}
    tensors.update({name: ("Q2_0", dequantize_q2_0(data)) for name, data in reader.q2_0.items()})
    return reader, tensors


def field(reader, key):
    return reader.fields[key].contents()


def bpe_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE with two merges ("Ġ t", "h e"; llama.cpp needs merges) and four special tokens: 262 ids."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: index for index, token in enumerate([*alphabet, "Ġt", "he", *SPECIALS])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[("Ġ", "t"), ("h", "e")], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")


def converted(root, **options):
    """A tiny random LLaMA with :func:`bpe_tokenizer`, converted (``options``: config overrides, ``sub_norm``)."""
    sub_norm = options.pop("sub_norm", False)
    src = make_tiny_llama(root / "src", vocab_size=VOCAB, bos_token_id=258, eos_token_id=259, pad_token_id=261, **options)
    bpe_tokenizer().save_pretrained(src)
    convert(src, root / "ternary", ConvertOptions(sub_norm=sub_norm), progress=False)
    return root / "ternary"


@pytest.fixture(scope="module")
def small_ternary(tmp_path_factory):
    """Rows of 64 and 128 values (Q2_0 under auto), untied embeddings."""
    return converted(tmp_path_factory.mktemp("gguf-small"))


@pytest.fixture(scope="module")
def wide_ternary(tmp_path_factory):
    """Rows of 256 and 512 values: every ternary type fits (tied embeddings)."""
    return converted(tmp_path_factory.mktemp("gguf-wide"), hidden_size=256, intermediate_size=512, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def odd_ternary(tmp_path_factory):
    """Rows of 48 (F16 fallback) and 96 values (Q8_0 fallback)."""
    return converted(tmp_path_factory.mktemp("gguf-odd"), hidden_size=48, intermediate_size=96)


def expected_projections(folder, config):
    """``{gguf name: (T in llama.cpp row order, g)}`` from the folder's packed codes and ``weight_scale = 1/g``."""
    tensors = load_file(folder / "model.safetensors")
    heads = {"self_attn.q_proj": config["num_attention_heads"], "self_attn.k_proj": config["num_key_value_heads"]}
    bitnet = config["model_type"] == "bitnet"
    expected = {}
    for layer in range(config["num_hidden_layers"]):
        for hf, name in PROJECTIONS.items():
            prefix = f"model.layers.{layer}.{hf}"
            packed = tensors[f"{prefix}.weight"]
            out_features = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"],
                            "attn_v": config["num_key_value_heads"]}.get(name)
            out_features = out_features * config["head_dim"] if out_features else packed.shape[0] * 4
            ternary = unpack_ternary(packed, out_features)
            if hf in heads and not bitnet:
                ternary = _permute_for_gguf(ternary, heads[hf])
            expected[f"blk.{layer}.{name}.weight"] = (ternary.numpy(), 1.0 / tensors[f"{prefix}.weight_scale"].double().item())
    return expected


def export(folder, out, *args):
    return main(["export", str(folder), "--out", str(out), *args])


def check_projections(path, folder, type_names):
    config = json.loads((folder / "config.json").read_text())
    config.setdefault("head_dim", config["hidden_size"] // config["num_attention_heads"])
    _, tensors = read(path)
    for name, (ternary, scale) in expected_projections(folder, config).items():
        kind, values = tensors[name]
        assert kind in type_names, (name, kind)
        expected = ternary.astype(np.float32) * np.float32(np.float16(scale))
        np.testing.assert_array_equal(values.reshape(expected.shape), expected, err_msg=name)
    return tensors


@pytest.mark.parametrize("weight_type, kinds", [("auto", {"TQ2_0"}), ("tq2_0", {"TQ2_0"}), ("tq1_0", {"TQ1_0"}),
                                                ("q2_0", {"Q2_0"}), ("q8_0", {"Q8_0"})])
def test_wide_model_every_type_dequantizes_to_codes_times_scale(wide_ternary, tmp_path, weight_type, kinds):
    out = tmp_path / "m.gguf"
    assert export(wide_ternary, out, "--type", weight_type) == 0
    check_projections(out, wide_ternary, kinds)


def test_blocks_store_the_one_scale_even_when_all_zero(tmp_path, small_ternary):
    """Every block's d is fp16(g), including a block whose codes are all zero (set here on purpose)."""
    folder = tmp_path / "zeros"
    folder.mkdir()
    for item in small_ternary.iterdir():
        (folder / item.name).write_bytes(item.read_bytes())
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.0.mlp.up_proj.weight"][:, :64] = 0b01010101  # codes 1 = weight 0 in the first block of every row
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "m.gguf"
    assert export(folder, out) == 0
    blocks = Reader(out).q2_0["blk.0.ffn_up.weight"].reshape(-1, 18)
    scale = np.float16(1.0 / tensors["model.layers.0.mlp.up_proj.weight_scale"].double().item())
    assert (blocks[:, :2].copy().view(np.float16) == scale).all()
    check_projections(out, folder, {"Q2_0"})


def test_auto_type_on_small_rows_is_q2_0_and_matches_bitconverts_layers(small_ternary, tmp_path):
    out = tmp_path / "m.gguf"
    assert export(small_ternary, out) == 0
    tensors = check_projections(out, small_ternary, {"Q2_0"})
    # the convention check independent of the file format: T*fp16(g) vs bitconvert's layer (codes, 1/weight_scale)
    model = load(small_ternary)
    layer = model.model.layers[1].mlp.down_proj
    reference = layer.ternary().float() / layer.weight_scale.float()
    values = torch.from_numpy(tensors["blk.1.ffn_down.weight"][1])
    assert torch.allclose(values, reference, rtol=2**-11, atol=0)


def test_odd_rows_fall_back_to_exact_q8_0_and_f16(odd_ternary, tmp_path, capsys):
    out = tmp_path / "m.gguf"
    assert export(odd_ternary, out) == 0
    printed = capsys.readouterr().out
    assert "blk.*.ffn_down.weight        Q8_0" in printed and "blk.*.attn_q.weight          F16" in printed
    check_projections(out, odd_ternary, {"Q8_0", "F16"})


@pytest.mark.parametrize("folder_name, weight_type, block", [("small_ternary", "tq2_0", 256), ("small_ternary", "tq1_0", 256),
                                                             ("odd_ternary", "q2_0", 64), ("odd_ternary", "q8_0", 32)])
def test_forced_type_refuses_rows_it_cannot_hold(request, tmp_path, capsys, folder_name, weight_type, block):
    folder = request.getfixturevalue(folder_name)
    capsys.readouterr()
    out = tmp_path / "m.gguf"
    assert export(folder, out, "--type", weight_type) == 2
    _one_line_error(capsys, f"--type {weight_type} needs rows that are a multiple of {block}", "has rows of")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("float_type", ["f32", "f16", "bf16"])
def test_float_tensors_keep_their_bits(small_ternary, tmp_path, float_type):
    out = tmp_path / "m.gguf"
    assert export(small_ternary, out, "--float-type", float_type) == 0
    _, tensors = read(out)
    stored = load_file(small_ternary / "model.safetensors")
    cast = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[float_type]
    for hf, name in [("model.embed_tokens.weight", "token_embd.weight"), ("lm_head.weight", "output.weight")]:
        kind, values = tensors[name]
        assert kind == float_type.upper()
        assert torch.equal(torch.from_numpy(values).reshape(stored[hf].shape), stored[hf].to(cast).float())
    for layer in range(2):
        for hf, name in [("input_layernorm", "attn_norm"), ("post_attention_layernorm", "ffn_norm")]:
            kind, values = tensors[f"blk.{layer}.{name}.weight"]
            assert kind == "F32" and torch.equal(torch.from_numpy(values), stored[f"model.layers.{layer}.{hf}.weight"])
    assert torch.equal(torch.from_numpy(tensors["output_norm.weight"][1]), stored["model.norm.weight"])


def test_q8_0_embeddings_within_half_a_step(wide_ternary, tmp_path):
    out = tmp_path / "m.gguf"
    assert export(wide_ternary, out, "--float-type", "q8_0") == 0
    reader, tensors = read(out)
    kind, values = tensors["token_embd.weight"]
    embeddings = load_file(wide_ternary / "model.safetensors")["model.embed_tokens.weight"].float().numpy()
    blocks = embeddings.reshape(-1, 32)
    step = np.abs(blocks).max(axis=1, keepdims=True) / 127
    assert kind == "Q8_0" and "output.weight" not in tensors  # tied: llama.cpp reuses token_embd
    # rounding to the step d = max/127 costs d/2; storing d as fp16 moves each of up to 127 steps by d * 2^-11
    assert (np.abs(values.reshape(-1, 32) - blocks) <= step * (0.5 + 127 * 2**-11)).all()


def test_metadata_and_tokenizer(small_ternary, tmp_path):
    out = tmp_path / "m.gguf"
    assert export(small_ternary, out) == 0
    reader, tensors = read(out)
    config = json.loads((small_ternary / "config.json").read_text())
    assert field(reader, "general.architecture") == "llama"
    expected = {"llama.block_count": 2, "llama.embedding_length": 64, "llama.feed_forward_length": 128,
                "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2, "llama.rope.dimension_count": 16,
                "llama.context_length": 256, "llama.vocab_size": VOCAB, "tokenizer.ggml.model": "gpt2",
                "tokenizer.ggml.pre": "gpt-2", "tokenizer.ggml.bos_token_id": 258, "tokenizer.ggml.eos_token_id": 259,
                "tokenizer.ggml.padding_token_id": 261, "tokenizer.ggml.add_bos_token": False,
                "general.quantization_version": gguf.GGML_QUANT_VERSION}
    assert {key: field(reader, key) for key in expected} == expected
    assert field(reader, "llama.rope.freq_base") == pytest.approx(config["rope_parameters"]["rope_theta"])
    assert field(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(config["rms_norm_eps"])
    tokens, types = field(reader, "tokenizer.ggml.tokens"), field(reader, "tokenizer.ggml.token_type")
    assert len(tokens) == VOCAB and tokens[256:] == ["Ġt", "he", *SPECIALS]
    assert types[:258] == [gguf.TokenType.NORMAL] * 258 and types[258:] == [gguf.TokenType.CONTROL] * 4
    assert field(reader, "tokenizer.ggml.merges") == ["Ġ t", "h e"]
    assert "bitconvert.version" in reader.fields and len(tensors) == 2 * 9 + 3


def test_sub_norm_model_exports_as_bitnet_without_permutation(tmp_path):
    folder = converted(tmp_path, tie_word_embeddings=True, sub_norm=True)
    out = tmp_path / "m.gguf"
    assert export(folder, out) == 0
    reader, tensors = read(out)
    assert field(reader, "general.architecture") == "bitnet" and "bitnet.block_count" in reader.fields
    assert "blk.1.attn_sub_norm.weight" in tensors and tensors["blk.1.ffn_sub_norm.weight"][1].shape == (128,)
    assert "output.weight" not in tensors
    check_projections(out, folder, {"Q2_0"})


def test_autobitlinear_scale_convention_is_read_from_the_config(small_ternary, tmp_path):
    """autobitlinear stores T as floats and weight_scale = g (not 1/g): same export values."""
    folder = tmp_path / "auto"
    folder.mkdir()
    for item in small_ternary.iterdir():
        (folder / item.name).write_bytes(item.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["linear_class"] = "autobitlinear"
    (folder / "config.json").write_text(json.dumps(config))
    tensors = load_file(folder / "model.safetensors")
    for name in [name for name in tensors if name.endswith("_proj.weight")]:
        scale = tensors[name[:-len("weight")] + "weight_scale"]
        out_features = {"q": 64, "k": 32, "v": 32, "o": 64, "gate": 128, "up": 128, "down": 64}[name.split(".")[-2][0:-5]]
        tensors[name] = unpack_ternary(tensors[name], out_features).float()
        tensors[name[:-len("weight")] + "weight_scale"] = (1.0 / scale.double()).float()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "m.gguf"
    assert export(folder, out) == 0
    _, exported = read(out)
    _, reference = read(_exported(small_ternary, tmp_path / "ref.gguf"))
    for name, (kind, values) in reference.items():
        assert exported[name][0] == kind
        np.testing.assert_allclose(exported[name][1], values, rtol=2**-10, atol=0, err_msg=name)  # 1 fp16 ulp


def _exported(folder, out):
    assert export(folder, out) == 0
    return out


def _one_line_error(capsys, *phrases):
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and error.startswith("bitconvert: error:"), error
    assert all(phrase in error for phrase in phrases), error


def test_refuses_a_folder_that_is_not_converted(tiny_llama, tmp_path, capsys):
    assert export(tiny_llama, tmp_path / "m.gguf") == 2
    _one_line_error(capsys, "not a converted folder")
    assert list(tmp_path.iterdir()) == []


def test_refuses_an_existing_destination(small_ternary, tmp_path, capsys):
    out = tmp_path / "m.gguf"
    out.write_text("keep me")
    assert export(small_ternary, out) == 2
    _one_line_error(capsys, "already exists")
    assert out.read_text() == "keep me" and len(list(tmp_path.iterdir())) == 1


def test_refuses_untied_sub_norm_model(tmp_path, capsys):
    folder = converted(tmp_path / "model", sub_norm=True)
    capsys.readouterr()
    assert export(folder, tmp_path / "m.gguf") == 2
    _one_line_error(capsys, "tie_word_embeddings")
    assert not (tmp_path / "m.gguf").exists()


def test_format_gguf_needs_a_gguf_suffix(small_ternary, tmp_path, capsys):
    assert export(small_ternary, tmp_path / "m.bin", "--format", "gguf") == 2
    _one_line_error(capsys, ".gguf")


def test_interrupted_write_leaves_no_file(small_ternary, tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf_export.gguf.GGUFWriter, "write_tensors_to_file", interrupted)
    assert export(small_ternary, tmp_path / "m.gguf") == 130
    assert list(tmp_path.iterdir()) == []


def test_refuses_a_tokenizer_without_merges(tiny_ternary, tmp_path, capsys):
    """The shared tiny model's byte tokenizer has no merges, which llama.cpp's BPE loader requires."""
    assert export(tiny_ternary, tmp_path / "m.gguf") == 2
    _one_line_error(capsys, "no BPE merges")
    assert list(tmp_path.iterdir()) == []


def test_pre_tokenizer_names_follow_llama_cpp():
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    digits = {"type": "Digits", "individual_digits": True}
    assert pre_tokenizer_name(byte_level) == "gpt-2"
    assert pre_tokenizer_name({"type": "Sequence", "pretokenizers": [digits, byte_level]}) == "smollm"
    assert pre_tokenizer_name({"type": "Sequence", "pretokenizers": [byte_level, digits]}) is None
    assert pre_tokenizer_name({**byte_level, "use_regex": False}) is None
