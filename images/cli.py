"""`python -m images {lock,render,lint,build}`: the commands behind `nox -s lock|render|lint|build`.

Bad input (an unknown image, a bad flag combination, a stale lock) is one line per problem naming the place
and the valid choices, exit code 2, and nothing written; a resolver conflict, a lint finding or a failed build
is exit code 1.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console

from images.common import LOCKS_DIR, MATRIX_ENV, UsageError, display, load, matrix_path, select_images


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of the usage block
        print(f"{self.prog}: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="*", metavar="IMAGE", help="images of matrix.yaml (default: all)")
    p.add_argument("--file", help=f"matrix file (default: ${MATRIX_ENV} or matrix.yaml)")
    p.add_argument("--locks", type=Path, default=LOCKS_DIR, help="lock folder (default: images/locks)")


def parser() -> Parser:
    top = Parser(prog="python -m images", description=__doc__.split("\n\n")[0])
    sub = top.add_subparsers(dest="command", required=True, parser_class=Parser)
    p = sub.add_parser("lock", help="resolve each image's Python set with hashes (uv)", description=
                       "Resolve each image's full Python set with uv into images/locks/<image>.lock.txt.")
    _common(p)
    p.add_argument("--check", action="store_true", help="offline: fail when matrix.yaml changed since a lock")
    p.add_argument("--wheelhouse", action="append", default=[], metavar="DIR",
                   help="local wheels standing in for an image's extra indexes (default: the host pip's find-links)")
    p.add_argument("--no-host-pip", action="store_true", help="ignore the host's pip settings")
    p = sub.add_parser("render", help="Dockerfiles and docker-bake.json", description=
                       "Render build/images/<image>/Dockerfile (+ context/) and build/docker-bake.json.")
    _common(p)
    p.add_argument("--strict", action="store_true",
                   help="refuse a base without digest, a moving source ref or a patch slot (default: warn)")
    p.add_argument("--allow-unpinned", action="store_true", help=argparse.SUPPRESS)  # the default now; kept working
    p = sub.add_parser("lint", help="hadolint over rendered Dockerfiles",
                       description="Run hadolint on build/images/<image>/Dockerfile.")
    _common(p)
    p = sub.add_parser("build", help="render and build images",
                       description="Render (as `render` does) and build images with a backend.")
    _common(p)
    from images.build import add_arguments
    add_arguments(p)
    return top


def run(args: argparse.Namespace, console: Console) -> int:
    matrix = load(args.file)
    names = select_images(matrix, args.images)
    if args.command == "lock":
        from images import lock, summary
        from images.hostpip import read_host_pip
        if args.check:
            if args.wheelhouse or args.no_host_pip:
                raise UsageError("lock: --check is offline and resolves nothing; drop --wheelhouse/--no-host-pip")
            problems = lock.check_locks(matrix, names, args.locks)
            for problem in problems:
                print(problem, file=sys.stderr)
            if not problems:
                print(f"{len(names)} lock(s) match {display(matrix_path(args.file))}: {', '.join(names)}")
            return 1 if problems else 0
        wheelhouse = lock.wheelhouse_dirs(args.wheelhouse, read_host_pip(not args.no_host_pip).find_links)
        try:
            summaries = lock.lock_images(matrix, names, args.locks, wheelhouse, console)
        except lock.ResolutionError as exc:
            print(exc, file=sys.stderr)
            return 1
        console.print(summary.table(summaries))
        return 0
    if args.command == "render":
        from images.render import render
        for path in render(matrix, names, args.locks, matrix_path(args.file), console, strict=args.strict):
            console.print(f"rendered {display(path)}")
        return 0
    if args.command == "lint":
        from images.lint import lint
        return lint(names, console)
    from images.build import build
    return build(matrix, names, args, console)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    console = Console(highlight=False, width=150)
    try:
        return run(args, console)
    except UsageError as exc:
        for line in str(exc).splitlines():
            print(f"{args.command}: {line}" if not line.startswith(args.command) else line, file=sys.stderr)
        return 2
