"""Apply unified-diff patches by content, not by line number, and check that every hunk applied.

Standalone on purpose (standard library only): the Dockerfile runs this file inside an image, before the
harness is installed, from a bind mount that never enters a layer.

A hunk applies when its old text (context and removed lines) occurs exactly once in the target file; it is
replaced by its new text, and the new text must then be present. Absent or ambiguous old text is a refusal
naming the patch, the file and the first line of the hunk. A patch with no hunks is a slot: its header says
what it is for, but its content is not known yet; applying it is refused.
"""

from __future__ import annotations

import argparse
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path


class PatchError(Exception):
    """The patch does not apply (or is a slot with no hunks)."""


@dataclass(frozen=True)
class Hunk:
    old: list[str]
    new: list[str]


@dataclass(frozen=True)
class Patch:
    name: str
    header: str
    target: str | None
    """Path relative to the install root (site-packages), from the `+++ b/...` line."""
    hunks: list[Hunk]


def parse(text: str, name: str) -> Patch:
    lines = text.splitlines()
    header, target, hunks, i = [], None, [], 0
    while i < len(lines) and not lines[i].startswith("--- "):
        header.append(lines[i])
        i += 1
    while i < len(lines):
        line = lines[i]
        if line.startswith("+++ "):
            target = line[4:].split("\t")[0].removeprefix("b/")
        elif line.startswith("@@"):
            old, new = [], []
            i += 1
            while i < len(lines) and lines[i][:1] in (" ", "-", "+", ""):
                if lines[i].startswith(("--- ", "+++ ")):
                    break
                body, kind = lines[i][1:], lines[i][:1]
                if kind in (" ", "", "-"):
                    old.append(body)
                if kind in (" ", "", "+"):
                    new.append(body)
                i += 1
            hunks.append(Hunk(old, new))
            continue
        i += 1
    if hunks and target is None:
        raise PatchError(f"{name}: hunks without a `+++ b/<path>` line naming the file to patch")
    return Patch(name, "\n".join(header), target, hunks)


def _find(lines: list[str], block: list[str]) -> list[int]:
    n = len(block)
    return [i for i in range(len(lines) - n + 1) if lines[i:i + n] == block]


def apply_to_text(patch: Patch, text: str) -> str:
    """The patched text; raises PatchError when a hunk's old text is absent or not unique."""
    if not patch.hunks:
        raise PatchError(f"{patch.name}: a slot with no hunks (its content is not known yet); nothing to apply")
    lines = text.splitlines()
    for number, hunk in enumerate(patch.hunks, 1):
        where = _find(lines, hunk.old)
        first = next((line.strip() for line in hunk.old if line.strip()), "")
        if len(where) != 1:
            state = ("already applied" if not where and _find(lines, hunk.new) else
                     "target text not found" if not where else f"target text found {len(where)} times")
            raise PatchError(f"{patch.name}: hunk {number} ({first!r}) in {patch.target}: {state}")
        lines[where[0]:where[0] + len(hunk.old)] = hunk.new
        if not _find(lines, hunk.new):
            raise PatchError(f"{patch.name}: hunk {number} in {patch.target}: new text missing after applying")
    return "\n".join(lines) + ("\n" if text.endswith("\n") else "")


def apply(patch_file: Path, root: Path) -> Path:
    """Apply one patch file to the file it names under `root`; returns the patched file's path."""
    patch = parse(patch_file.read_text(encoding="utf-8"), patch_file.stem)
    if not patch.hunks:
        apply_to_text(patch, "")  # raises the slot refusal
    target = root / patch.target
    if not target.is_file():
        raise PatchError(f"{patch.name}: {target} does not exist (is the package installed under {root}?)")
    target.write_text(apply_to_text(patch, target.read_text(encoding="utf-8")), encoding="utf-8")
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("patches", nargs="+", type=Path, help="patch files to apply, in order")
    parser.add_argument("--root", type=Path, default=Path(sysconfig.get_paths()["purelib"]),
                        help="folder the patch paths are relative to (default: this Python's site-packages)")
    args = parser.parse_args(argv)
    for patch_file in args.patches:
        try:
            print(f"patched {apply(patch_file, args.root)} ({patch_file.name})")
        except PatchError as exc:
            print(f"patch failed: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
