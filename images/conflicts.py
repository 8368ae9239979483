"""Explain a failed resolution: the resolver's own words, the matrix entries involved, and the override to write."""

from __future__ import annotations

import re

from matrix.schema import Image

UV_NOISE = ("warning: A managed Python download", "warning: The requested Python version")


def _name(pin: str) -> str:
    return re.split(r"[\[=]", pin, maxsplit=1)[0].lower().replace("_", "-")


def _mentions(text: str, name: str) -> bool:
    pattern = re.escape(name).replace(r"\-", "[-_]")
    return re.search(rf"(?<![\w.-]){pattern}(?![\w-])", text, flags=re.IGNORECASE) is not None


def resolver_words(stderr: str) -> str:
    """The resolver's explanation: from its `error:` line on, without warnings about Python downloads."""
    lines = stderr.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("error:")), 0)
    return "\n".join(line for line in lines[start:] if not line.startswith(UV_NOISE)).strip()


def explain(image_name: str, image: Image, stderr: str) -> str:
    """A report for a conflict: what uv said, which `images.<name>` entries it names, how to override."""
    words = resolver_words(stderr)
    where = f"images.{image_name}"
    involved: list[str] = []
    if image.engine and _mentions(words, image.engine.name):
        involved.append(f"{where}.engine ({image.engine.name}=={image.engine.version})")
    pinned = [(i, pin) for i, pin in enumerate(image.requirements) if _mentions(words, _name(pin))]
    involved += [f"{where}.requirements[{i}] ({pin})" for i, pin in pinned]
    involved += [f"{where}.overrides[{i}] ({o.pin})" for i, o in enumerate(image.overrides)
                 if _mentions(words, _name(o.pin))]
    lines = [f"{where}: the Python set cannot be resolved; the resolver says:", "", words, ""]
    lines.append("matrix entries involved: " + ("; ".join(involved) if involved else
                                                "none by name (a transitive conflict; see the resolver's chain)"))
    if pinned:
        lines.append(f"if a pin must win over what other packages ask for, move it from {where}.requirements "
                     f"to {where}.overrides with its reason, e.g.:")
        lines.append("    overrides:")
        for _, pin in pinned:
            lines.append(f'      - {{pin: "{pin}", why: "<why this version must win>"}}')
    return "\n".join(lines)
