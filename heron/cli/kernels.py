"""`heron kernels build | status`: compile heron's C++ CPU kernels ahead of time, or show
where they are cached and what their cache key hashes."""

from __future__ import annotations

import argparse
import sys
import time

from heron.cli.common import HelpFormatter, common_parent


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Registers ``kernels`` and its two actions."""
    kernels = subparsers.add_parser(
        "kernels",
        formatter_class=HelpFormatter,
        help="build heron's C++ CPU kernels ahead of time; show their cache",
        description="heron's CPU kernels are compiled with this machine's C++ compiler once "
        "per machine and torch install (several minutes on a few cores) and cached under "
        "$TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions). `make install` builds "
        "them; otherwise the first engine start does. Without a compiler, or with "
        "HERON_CPU_KERNELS=0, heron uses PyTorch ops instead.",
    )
    kernels_sub = kernels.add_subparsers(dest="kernels_command", metavar="ACTION", required=True)
    kernels_sub.add_parser(
        "build",
        parents=[common_parent()],
        formatter_class=HelpFormatter,
        help="compile the kernels now (a no-op where they are built)",
    ).set_defaults(func=build)
    kernels_sub.add_parser(
        "status",
        parents=[common_parent()],
        formatter_class=HelpFormatter,
        help="the cache folder, whether the kernels are built there, what its key hashes",
    ).set_defaults(func=status)


def build(args: argparse.Namespace) -> int:
    """Compiles the kernels now, so no engine start pays for it; exit 1 if they fail."""
    from heron import kernels

    if not kernels.enabled():
        print("heron's CPU kernels are off (HERON_CPU_KERNELS=0): nothing to build")
        return 0
    start = time.monotonic()
    try:
        kernels.build()
    except kernels.KernelBuildError as e:
        print(f"error: heron's CPU kernels did not build: {e}", file=sys.stderr)
        return 1
    elapsed = time.monotonic() - start
    print(f"heron's CPU kernels are built in {kernels.build_folder()} ({elapsed:.0f} s)")
    return 0


def status(args: argparse.Namespace) -> int:
    """Where the kernels are cached, whether they are built, and what their key hashes."""
    from heron import kernels

    folder = kernels.build_folder()
    built = "yes" if kernels.is_built(folder) else "no (`heron kernels build` compiles them)"
    print(f"folder     {folder}")
    print(f"built      {built}")
    if not kernels.enabled():
        print("in use     no (HERON_CPU_KERNELS=0)")
    print("key, a hash of these and of the CPU's flags:")
    for part, value in kernels.identity().items():
        if part != "cpu":
            print(f"  {part:<9} {value}")
    return 0
