"""Read a lock (`uv pip compile --generate-hashes` output): each pin with its hash block and what requires it."""

from __future__ import annotations

import re
from dataclasses import dataclass

_BLOCK = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._\-]*)==(?P<version>\S+) \\\n(?P<hashes>(?:    --hash=\S+(?: \\)?\n)+)"
                    r"(?P<via>(?:    #.*\n)*)", re.M)


def normalize(name: str) -> str:
    """PEP 503 name: `Foo_Bar.baz` and `foo-bar-baz` are one package."""
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass(frozen=True)
class Pin:
    name: str
    version: str
    block: str
    """`name==version` with its `--hash` lines, ready for `pip install --require-hashes -r`."""
    required_by: tuple[str, ...]
    """Normalized names of the locked packages that require it (`-r <image>.in` entries are left out)."""


def parse(text: str) -> dict[str, Pin]:
    """The lock's pins by normalized name."""
    pins = {}
    for m in _BLOCK.finditer(text):
        via = [line.strip("# ").removeprefix("via").strip() for line in m["via"].splitlines()]
        parents = tuple(normalize(v) for v in via if v and not v.startswith("-r ") and v != "via")
        block = f"{m['name']}=={m['version']} \\\n{m['hashes']}".rstrip(" \\\n") + "\n"
        pins[normalize(m["name"])] = Pin(m["name"], m["version"], block, parents)
    return pins


def closure(pins: dict[str, Pin], roots: set[str], stop: set[str]) -> set[str]:
    """The locked packages `roots` need, following requirements downward; a name in `stop` is neither kept nor
    followed (torch: its own dependencies belong to the CUDA build the lock holds)."""
    children: dict[str, set[str]] = {}
    for name, pin in pins.items():
        for parent in pin.required_by:
            children.setdefault(parent, set()).add(name)
    seen: set[str] = set()
    todo = [r for r in roots if r in pins and r not in stop]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += [c for c in children.get(name, ()) if c not in stop]
    return seen
