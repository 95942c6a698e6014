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
