"""The lm-eval model ``bitconvert``: lm-eval's ``HFLM`` over a model loaded by bitconvert.

``pretrained`` is anything :func:`bitconvert.load.load_for_inference` accepts: a converted folder runs through
:func:`bitconvert.load.load` (ternary ``PackedBitLinear`` layers, and the compiled kernels once they land); a source
(folder, .gguf, hub id, alias) runs in full precision. Everything else (batching, request scoring, ``batch_size``,
``max_length``) is lm-eval's ``HFLM``.

The stock ``lm_eval`` command has no plugin hook for models, so the name is registered when this module is imported:
use it from Python after ``import bitconvert.eval.harness``, or run lm-eval's own command line through this module::

    python -m bitconvert.eval.harness --model bitconvert --model_args pretrained=ternary-smollm2 --device cpu \\
        --tasks arc_easy --include_path offline-tasks     (offline-tasks: from `bitconvert eval --write-tasks`)
"""

from __future__ import annotations

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from ..errors import BitconvertError
from ..load import is_converted_folder, load_for_inference


@register_model("bitconvert")
class BitconvertLM(HFLM):
    """``HFLM`` whose model and tokenizer come from :func:`~bitconvert.load.load_for_inference`.

    ``dtype`` is passed to the loader ("auto": the folder's own); ``device``, if given, is where the model is moved
    (default: where it was loaded, the CPU). ``spec`` holds what was given as ``pretrained``; ``ternary`` is True for
    a converted folder."""

    def __init__(self, pretrained: str, dtype=None, device: str | None = None, **kwargs):
        import torch

        if device and device.startswith("cuda") and not torch.cuda.is_available():
            raise BitconvertError(f"device '{device}' is not available (torch sees no CUDA GPU); pass --device cpu")
        model, tokenizer = load_for_inference(str(pretrained), dtype=None if dtype in (None, "auto") else dtype)
        if device:
            model.to(device)
        super().__init__(pretrained=model, tokenizer=tokenizer, backend="causal", **kwargs)
        self.spec = str(pretrained)
        self.ternary = is_converted_folder(self.spec)


if __name__ == "__main__":
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
