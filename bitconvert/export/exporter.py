"""``export_onnx(model, out)``: a converted (or full-precision) model -> a KV-cache ONNX decoder beside its tokenizer.

Steps: load the model in fp32 (:func:`bitconvert.load.load_for_inference`), swap each PackedBitLinear for its export
stand-in (:mod:`bitconvert.export.modules`), trace :class:`~bitconvert.export.decoder.KVCacheDecoder` with PyTorch's
dynamo ONNX exporter (the custom ops translated by :data:`bitconvert.export.ops.TRANSLATIONS` and
:func:`bitconvert.export.fused_ops.translations`), then save the model
with its initializers in one external-data file when the model is above 2 GB (protobuf's limit), check it with
``onnx.checker`` (full check, custom domain declared) and write the tokenizer next to it. The model's metadata
records the operator (``bitconvert.op``: ternary, matmulnbits or fp32), the graph (``bitconvert.graph``: plain,
fused or layer), the lm_head (``bitconvert.lm_head``: exact, int8, int8-row or int6), which logits it returns
(``bitconvert.logits``: all or last), the KV cache's type (``bitconvert.kv_cache``: fp32 or fp16) and the attention
operator (``bitconvert.attention``: bitconvert, gqa, or standard ops in the plain graph). A full-precision source
exports as fp32.
"""

from __future__ import annotations

import os
import re
import tempfile
import warnings
from pathlib import Path

import torch

from ..errors import BitconvertError, reason
from .decoder import INPUT_NAMES, KV_CACHE_DTYPES, FusedKVCacheDecoder, KVCacheDecoder, cache_names
from .fused_ops import ATTENTIONS, translations
from .modules import OPS, Int6LmHead, Int8LmHead, Int8RowLmHead, fuse_projections, replace_bitlinears
from .ops import DOMAIN, MS_DOMAIN, NORM_OP_VERSION, TRANSLATIONS

GRAPHS = ("plain", "fused", "layer")
FUSED_GRAPHS = ("fused", "layer")  # FusedKVCacheDecoder's; layer: with DecoderLayer nodes
LM_HEADS = ("exact", "int8", "int8-row", "int6")
LM_HEAD_MODULES = {"int8": Int8LmHead, "int8-row": Int8RowLmHead, "int6": Int6LmHead}
LIBRARY_LM_HEADS = ("int8-row", "int6")  # heads on bitconvert's custom-op library
LOGITS = ("all", "last")
FUSED_MODEL_TYPES = ("llama", "bitnet")  # rotate-half rotary on the whole head, RMSNorm, SiLU-gated MLP

OPSET = 18
PROTOBUF_LIMIT = 2 * 1024**3


def _trace(decoder: KVCacheDecoder, attention: str):
    """The dynamo export of ``decoder`` with batch, sequence and past length dynamic (an ``ONNXProgram``), the fused
    graph's attention as ``attention`` (see :func:`bitconvert.export.fused_ops.translations`)."""
    names = [*INPUT_NAMES, *cache_names(decoder.num_layers, "past_key_values")]
    auto = torch.export.Dim.AUTO
    dynamic = (*({0: auto, 1: auto} for _ in INPUT_NAMES), tuple({0: auto, 2: auto} for _ in names[3:]))  # *past: one arg
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation and tracing chatter, not the user's concern
        return torch.onnx.export(
            decoder, decoder.example_inputs(), dynamo=True, opset_version=OPSET, input_names=names,
            output_names=["logits", *cache_names(decoder.num_layers, "present")], dynamic_shapes=dynamic,
            custom_translation_table={**TRANSLATIONS, **translations(attention)}, optimize=True, verbose=False,
        )


def _name_dims(graph) -> None:
    """Replace the tracer's dimension names (s10, s70 + s69, ...) by optimum's on every value of ``graph``."""
    import onnx_ir as ir

    ids, mask, _, past = graph.inputs[:4]
    names = {str(ids.shape[0]): "batch_size", str(ids.shape[1]): "sequence_length",
             str(mask.shape[1]): "total_sequence_length", str(past.shape[2]): "past_sequence_length"}
    symbol = re.compile(r"\bs\d+\b")

    def rename(dim):
        if isinstance(dim, ir.SymbolicDim) and dim.value:
            return ir.SymbolicDim(symbol.sub(lambda match: names.get(match.group(0), match.group(0)), dim.value))
        return dim

    values = [*graph.inputs, *(output for node in graph for output in node.outputs)]
    for value in values:
        if value.shape is not None:
            value.shape = ir.Shape([rename(dim) for dim in value.shape])


def _save(program, out: Path) -> None:
    """Write ``out`` (and ``out.data`` when the initializers reach protobuf's 2 GB) atomically: into a temporary
    folder beside it, checked there, then renamed into place, so a failure leaves any earlier file untouched."""
    import onnx

    size = sum(value.const_value.nbytes for value in program.model.graph.initializers.values()
               if value.const_value is not None)
    external = size >= PROTOBUF_LIMIT
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.tmp-") as tmp:
        staged = Path(tmp) / out.name
        program.save(str(staged), external_data=external)
        try:
            onnx.checker.check_model(str(staged) if external else onnx.load(str(staged)), full_check=True)
        except onnx.checker.ValidationError as exc:
            raise BitconvertError(f"the exported graph fails onnx.checker ({reason(exc)}); please report it") from None
        data = out.with_name(out.name + ".data")
        if external:
            os.replace(staged.with_name(out.name + ".data"), data)
        else:
            data.unlink(missing_ok=True)
        os.replace(staged, out)


def _declare_opsets(program) -> None:
    """Declare the custom domains the graph uses (the checker needs every domain's version)."""
    imports = program.model.opset_imports
    domains = {node.domain for node in program.model.graph.all_nodes()}
    if DOMAIN in domains:
        imports[DOMAIN] = NORM_OP_VERSION  # TernaryMatMul's latest and DecoderLayer's; the others are version 1
    if MS_DOMAIN in domains:
        imports[MS_DOMAIN] = 1


def _check_options(op: str, accuracy_level: int, graph: str, lm_head: str, logits: str, kv_cache: str,
                   attention: str) -> None:
    """Refuse an unknown value or a combination that does not exist, naming the option (BitconvertError)."""
    choices = {"--op": (op, OPS), "--graph": (graph, GRAPHS), "--lm-head": (lm_head, LM_HEADS),
               "--logits": (logits, LOGITS), "--kv-cache": (kv_cache, KV_CACHE_DTYPES),
               "--attention": (attention, ("auto", *ATTENTIONS))}
    for option, (value, allowed) in choices.items():
        if value not in allowed:
            raise BitconvertError(f"unknown {option} {value!r}; choose one of {', '.join(allowed)}")
    if kv_cache != "fp32" and graph not in FUSED_GRAPHS:
        raise BitconvertError(f"--kv-cache {kv_cache} needs --graph fused or layer (the plain graph keeps an fp32 "
                              "cache)")
    if attention != "auto" and graph == "plain":
        raise BitconvertError(f"--attention {attention} needs --graph fused or layer (the plain graph's attention is "
                              "standard ONNX ops)")
    if graph == "layer" and attention == "gqa":
        raise BitconvertError("--graph layer runs attention inside bitconvert's DecoderLayer op; drop --attention gqa "
                              "or use --graph fused")
    if graph == "layer" and op != "ternary":
        raise BitconvertError(f"--graph layer needs --op ternary (DecoderLayer computes on TernaryMatMul's packed "
                              f"weights); use --graph fused with --op {op}")
    if accuracy_level not in (0, 4):
        raise BitconvertError(f"accuracy level must be 0 or 4, got {accuracy_level}")


def export_onnx(model_path: str | os.PathLike, out: str | os.PathLike, op: str = "ternary",
                accuracy_level: int = 0, graph: str = "plain", lm_head: str = "exact", logits: str = "all",
                kv_cache: str = "fp32", attention: str = "auto") -> Path:
    """Export ``model_path`` to the ONNX file ``out`` (its folder also gets the tokenizer); returns ``out``.

    ``op``: ``ternary`` (one com.bitconvert::TernaryMatMul per BitLinear) or ``matmulnbits`` (portable
    com.microsoft::MatMulNBits, bits=2, with ``accuracy_level`` 0 or 4). A full-precision source exports as fp32.
    ``graph``: ``plain`` (attention and norms in standard ONNX ops), ``fused`` (one attention node per layer, see
    ``attention``; ORT's RMSNorm ops; q/k/v and gate/up stacked;
    :class:`~bitconvert.export.decoder.FusedKVCacheDecoder`) or ``layer`` (the fused graph with bitconvert's
    attention, each LLaMA layer that fits one com.bitconvert::DecoderLayer node instead of its five, the others as
    in ``fused``; needs ``op`` ternary and a converted model).
    ``lm_head``: ``exact`` (fp32 MatMul), ``int8`` (:class:`~bitconvert.export.modules.Int8LmHead`, MatMulNBits),
    ``int8-row`` (:class:`~bitconvert.export.modules.Int8RowLmHead`, bitconvert's Int8MatMul: ``bitconvert.load``'s
    int8 head, bit for bit) or ``int6`` (:class:`~bitconvert.export.modules.Int6LmHead`, bitconvert's Int6MatMul: 19%
    fewer bytes than int8).
    ``logits``: ``all`` positions (B, S, V) or the ``last`` one (B, 1, V), enough for generation and much cheaper
    for a prompt.
    ``kv_cache``: ``fp32`` or ``fp16`` (``--graph fused`` or ``layer`` only: the cache inputs/outputs and attention
    in float16, half the cache bytes per step; see :mod:`bitconvert.export.decoder`).
    ``attention`` (``--graph fused``): ``bitconvert`` (com.bitconvert::CachedAttention: the lean decoder's attention
    loops), ``gqa`` (ORT's GroupQueryAttention, no custom op) or ``auto``: bitconvert's where the graph needs
    bitconvert's library anyway (TernaryMatMul or the int8-row or int6 lm_head), else gqa; ``--graph layer`` is always
    bitconvert's.
    """
    from ..load import is_converted_folder, load_for_inference

    _check_options(op, accuracy_level, graph, lm_head, logits, kv_cache, attention)
    out = Path(out)
    if out.suffix != ".onnx":
        raise BitconvertError(f"--out must name a .onnx file, got '{out}'")
    model, tokenizer = load_for_inference(str(model_path), dtype=torch.float32)
    model = model.eval()
    converted = is_converted_folder(model_path)
    replaced = replace_bitlinears(model, op, accuracy_level)
    if converted and replaced == 0:
        raise BitconvertError(f"'{model_path}' has no BitLinear layers to export")
    if graph == "layer" and replaced == 0:
        raise BitconvertError(f"--graph layer needs a converted model: '{model_path}' is full precision (no BitLinear "
                              "layers for DecoderLayer's ternary products); use --graph fused")
    if lm_head != "exact":
        model.lm_head = LM_HEAD_MODULES[lm_head](model.lm_head)
    if graph in FUSED_GRAPHS:
        if model.config.model_type not in FUSED_MODEL_TYPES:
            raise BitconvertError(f"--graph {graph} supports {', '.join(FUSED_MODEL_TYPES)} models (LLaMA attention "
                                  f"and rotary), not '{model.config.model_type}'; use --graph plain")
        fuse_projections(model)
    if graph not in FUSED_GRAPHS:
        attention = "standard"
    elif attention == "auto":
        uses_library = (op == "ternary" and replaced > 0) or lm_head in LIBRARY_LM_HEADS
        attention = "bitconvert" if uses_library else "gqa"
    decoder = (FusedKVCacheDecoder(model, logits == "last", kv_cache, attention, graph == "layer")
               if graph in FUSED_GRAPHS else KVCacheDecoder(model, logits == "last")).eval()
    if graph == "layer" and not any(decoder.fits_layer_op(layer) for layer in model.model.layers):
        raise BitconvertError(f"--graph layer: no layer of '{model_path}' fits one DecoderLayer node (it needs stacked "
                              "q/k/v and gate/up, o_proj and down_proj without sub-norm or bias, SiLU, one norm "
                              "epsilon; a SubLN model has sub-norms); use --graph fused")
    with torch.no_grad():
        try:
            program = _trace(decoder, "gqa" if attention == "standard" else attention)
        except Exception as exc:
            root = exc
            while root.__cause__ is not None:
                root = root.__cause__
            raise BitconvertError(f"the ONNX exporter failed on '{model_path}': {type(root).__name__}: "
                                  f"{reason(root)}") from exc
    _name_dims(program.model.graph)
    _declare_opsets(program)
    kind = op if replaced else "fp32"
    metadata = {"op": kind, "graph": graph, "lm_head": lm_head, "logits": logits, "kv_cache": kv_cache,
                "attention": attention}
    if kind == "matmulnbits":
        metadata["accuracy_level"] = str(accuracy_level)
    program.model.metadata_props.update({f"bitconvert.{key}": value for key, value in metadata.items()})
    _save(program, out)
    tokenizer.save_pretrained(out.parent)
    return out
