"""The ``bitconvert`` command: ``bitconvert SOURCE --out DIR`` converts; other verbs do the rest of the path.

Each verb lives in its own module with ``register(subparsers)``, which adds its parser and sets ``run(args)``;
heavy imports happen inside ``run`` so that ``--help`` is instant. User mistakes raise
:class:`~bitconvert.errors.BitconvertError` and end as one line on stderr with exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from .errors import BitconvertError

VERB_MODULES = {
    "convert": "bitconvert.convert.cli",
    "finetune": "bitconvert.finetune.cli",
    "ppl": "bitconvert.ppl_cli",
    "eval": "bitconvert.eval.cli",
    "export": "bitconvert.export.cli",
    "generate": "bitconvert.export.generate_cli",
}

EXAMPLES = """\
examples:
  bitconvert smollm2-135m --out ternary-smollm2          convert (the verb 'convert' may be omitted)
  bitconvert meta-llama/Llama-2-7b-hf --out ternary-7b    from the hub (needs a network and access)
  bitconvert ./llama-folder --out ternary --sub-norm      add SubLN (then fine-tune)
  bitconvert finetune smollm2-135m --out qat-smollm2 --max-steps 1000 --distill    QAT with DeepSpeed
  bitconvert ppl ternary-smollm2                          perplexity on held-out LAMBADA text
  bitconvert ppl smollm2-135m --text book.txt             the full-precision source, your text
  bitconvert eval ternary-smollm2 --baseline smollm2-135m  zero-shot on the seven tasks, side by side
  bitconvert export ternary-smollm2 --out onnx/model.onnx ONNX with the TernaryMatMul op and a KV cache
  bitconvert generate onnx/model.onnx --prompt 'Hello'    generate in ONNX Runtime

Run `bitconvert VERB --help` for each verb's options.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bitconvert",
        description="Turn a pretrained LLaMA into a ternary BitNet b1.58 model and make it useful.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"bitconvert {__version__}")
    subparsers = parser.add_subparsers(dest="verb", metavar="VERB")
    for module in VERB_MODULES.values():
        importlib.import_module(module).register(subparsers)
    return parser


def _with_default_verb(argv: list[str]) -> list[str]:
    """``bitconvert SOURCE ...`` means ``bitconvert convert SOURCE ...``."""
    if argv and not argv[0].startswith("-") and argv[0] not in VERB_MODULES:
        return ["convert", *argv]
    return argv


def main(argv: list[str] | None = None) -> int:
    argv = _with_default_verb(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verb is None:
        parser.print_help()
        return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return args.run(args) or 0
    except BitconvertError as error:
        print(f"bitconvert: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bitconvert: interrupted; no partial output was kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
