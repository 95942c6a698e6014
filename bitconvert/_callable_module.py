"""Let ``bitconvert.convert(...)`` and ``bitconvert.load(...)`` be calls while ``bitconvert.convert`` and
``bitconvert.load`` stay importable modules (``import bitconvert.convert.pipeline as p`` keeps working)."""

from __future__ import annotations

import sys
import types


def make_callable(module_name: str, function_name: str) -> None:
    """Calling the module ``module_name`` calls its attribute ``function_name``."""

    class CallableModule(types.ModuleType):
        def __call__(self, *args, **kwargs):
            return getattr(self, function_name)(*args, **kwargs)

    sys.modules[module_name].__class__ = CallableModule
