"""``wtacrs-inspect``: show what the ``wtacrs`` pass changes in a model's training step.

    wtacrs-inspect bert                          # a bundled example: mlp, bert, vit, t5
    wtacrs-inspect mypkg.models:make --ratio 0.5 --diff
    wtacrs-inspect path/to/models.py:make --json report.json --html report.html

A model is given as ``module:factory`` (or ``file.py:factory``): ``factory()`` returns
``(model, example_inputs)``, the inputs a tuple of positional arguments or a dict of keyword
arguments.  The step inspected is forward plus backward of ``output.loss`` (or of the output's
sum).  Prints the op table and the saved-activation totals of plain ``torch.compile`` and of
``wtacrs``, both read off the backward graphs Inductor compiled.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import pathlib
import sys
from typing import Any, Callable, List, Optional, Tuple

from .config import SAMPLINGS
from .examples import EXAMPLES


class UsageError(Exception):
    """A problem with what the user asked for: printed as one line, exit status 2."""


def resolve_factory(spec: str) -> Tuple[str, Callable[[], Any]]:
    """``spec`` (a bundled example name, ``module:factory`` or ``file.py:factory``) to
    ``(label, factory)``."""
    if spec in EXAMPLES:
        return spec, EXAMPLES[spec]
    if ":" not in spec:
        raise UsageError(
            f"unknown model {spec!r}: give a bundled example ({', '.join(EXAMPLES)}) or "
            "module:factory, a function returning (model, example_inputs)"
        )
    module_name, _, attr = spec.rpartition(":")
    if not module_name or not attr:
        raise UsageError(f"bad model {spec!r}: expected module:factory, e.g. mypkg.models:make_model")
    module = _import(module_name, spec)
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise UsageError(f"{spec}: module {module.__name__!r} has no attribute {attr!r}") from None
    if not callable(obj):
        raise UsageError(f"{spec}: {attr!r} is a {type(obj).__name__}, not a function returning (model, example_inputs)")
    return spec, obj


def _import(module_name: str, spec: str):
    if module_name.endswith(".py") or os.sep in module_name or "/" in module_name:
        path = pathlib.Path(module_name)
        if not path.is_file():
            raise UsageError(f"{spec}: no such file {str(path)!r}")
        # Registered (dataclasses and pickling look modules up), never over an existing module.
        name = path.stem if path.stem not in sys.modules else f"{path.stem}__wtacrs_inspect"
        import_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(import_spec)
        sys.modules[name] = module
        import_spec.loader.exec_module(module)
        return module
    # As `python -m` does: modules of the working directory are importable.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and module_name.startswith(e.name):
            raise UsageError(f"{spec}: cannot import module {module_name!r} ({e})") from None
        raise


def build(spec: str) -> Tuple[str, Any, Any]:
    """Call the factory and check it kept the ``(model, example_inputs)`` contract."""
    import torch

    label, factory = resolve_factory(spec)
    try:
        result = factory()
    except ImportError as e:
        if spec in EXAMPLES:  # a bundled example's optional dependency: say which to install
            raise UsageError(str(e)) from None
        raise
    if not (isinstance(result, (tuple, list)) and len(result) == 2):
        raise UsageError(
            f"{label}: the factory must return a (model, example_inputs) pair, "
            f"got {type(result).__name__}" + (f" of length {len(result)}" if isinstance(result, (tuple, list)) else "")
        )
    model, inputs = result
    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"{label}: the factory's model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(inputs, (tuple, dict, torch.Tensor)):
        raise UsageError(
            f"{label}: the factory's example_inputs must be a tuple of positional inputs or a dict "
            f"of keyword inputs, got {type(inputs).__name__}"
        )
    return label, model, inputs


def _options(args: argparse.Namespace) -> dict:
    options: dict = {}
    if args.options:
        try:
            options = json.loads(args.options)
        except json.JSONDecodeError as e:
            raise UsageError(f"--options is not valid JSON: {e}") from None
        if not isinstance(options, dict):
            raise UsageError(f"--options must be a JSON object, got {args.options!r}")
    for key in ("ratio", "min_k", "mode", "deterministic", "sampling"):
        value = getattr(args, key)
        if value is not None:
            options[key] = value
    return options


def _deterministic(value: str) -> Any:
    if value == "adaptive":
        return value
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'adaptive' or a number, got {value!r}") from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="wtacrs-inspect",
        description="Show, per matched op, what the wtacrs pass decided, why, and the bytes; "
        "and the saved-activation totals of plain torch.compile vs wtacrs.",
        epilog="Examples: wtacrs-inspect bert --diff | wtacrs-inspect mypkg.models:make --json r.json --html r.html",
    )
    p.add_argument("model", nargs="?", help=f"a bundled example ({', '.join(EXAMPLES)}) or module:factory")
    p.add_argument("--list", action="store_true", help="list the bundled examples and exit")
    g = p.add_argument_group("wtacrs settings (see WTACRSConfig)")
    g.add_argument("--ratio", type=float, help="fraction of rows kept, in (0, 1] (default 0.3)")
    g.add_argument("--min-k", dest="min_k", type=int, help="least number of rows kept")
    g.add_argument("--mode", help="memory | compute | memory+compute | all")
    g.add_argument("--deterministic", type=_deterministic, help="'adaptive' or a fraction of k")
    g.add_argument("--sampling", choices=SAMPLINGS, help="systematic (default) | iid: how non-winner rows are drawn")
    g.add_argument("--options", metavar="JSON", help='any config as JSON, e.g. \'{"rules": [{"match": "*.query", "enabled": false}]}\'')
    g.add_argument("--dynamic", action="store_true", help="compile with dynamic=True (symbolic sizes)")
    o = p.add_argument_group("output")
    o.add_argument("--diff", action="store_true", help="print the unified diff of the forward and backward graphs")
    o.add_argument("--joint", action="store_true", help="print the diff of the joint graph too")
    o.add_argument("--json", metavar="FILE", help="write the report as JSON (with the graphs when --diff/--joint)")
    o.add_argument("--html", metavar="FILE", help="write a self-contained HTML page: table, totals, highlighted diffs")
    o.add_argument("--color", choices=("auto", "always", "never"), default="auto", help="colour the diff (default: auto)")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.list:
        for name, factory in EXAMPLES.items():
            print(f"{name:<6} {(factory.__doc__ or '').strip().splitlines()[0]}")
        return 0
    if not args.model:
        p.error("give a model: a bundled example or module:factory (see --list)")
    from .config import WTACRSConfig

    # Bad settings (the config's own message), a bad module:factory, a missing optional
    # dependency of an example: one line.  What the user's own code raises keeps its traceback.
    try:
        config = WTACRSConfig.from_options(_options(args))
    except (UsageError, ValueError) as e:
        p.exit(2, f"{p.prog}: error: {e}\n")
    try:
        label, model, inputs = build(args.model)
    except UsageError as e:
        p.exit(2, f"{p.prog}: error: {e}\n")

    from .inspection import InspectError, inspect

    try:
        report = inspect(model, inputs, config=config, name=label, dynamic=True if args.dynamic else None)
    except InspectError as e:
        p.exit(2, f"{p.prog}: error: {label}: {str(e).removeprefix('inspect: ')}\n")
    color = args.color == "always" or (
        args.color == "auto" and sys.stdout.isatty() and not os.environ.get("NO_COLOR")
    )
    sys.stdout.write(report.format(diff=args.diff, joint=args.joint, color=color))
    if args.json:
        data = report.to_dict(graphs=args.diff or args.joint)
        pathlib.Path(args.json).write_text(json.dumps(data, indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.html:
        pathlib.Path(args.html).write_text(report.to_html(joint=args.joint), encoding="utf-8")
        print(f"wrote {args.html}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
