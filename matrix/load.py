"""Load matrix.yaml: YAML with line numbers → strict pydantic model → cross-entry rules.

Every problem of the file is collected and raised together as one `MatrixError`, each located by file,
line and YAML path, so a user fixes the whole file in one pass.
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from pathlib import Path

import yaml
from pydantic import BaseModel, ValidationError

from matrix.errors import MatrixError, Problem
from matrix.rules import check_matrix, check_references
from matrix.schema import Matrix, pattern_names

PATTERN_NAMES = pattern_names()

DEFAULT_MATRIX_PATH = Path(__file__).resolve().parent.parent / "matrix.yaml"
TOP_LEVEL = ", ".join(Matrix.model_fields)

YamlPath = tuple[str | int, ...]
KEY_ERRORS = ("missing", "extra_forbidden")

# The committed matrix is ~28 kB and ~2.4k YAML nodes; these bounds leave room for any real one and refuse a file
# built to exhaust memory (a 490-byte alias bomb expands to billions of nodes, 100k brackets recurse past Python's
# stack) before anything expands it.
MAX_FILE_BYTES = 1 << 20
MAX_EXPANDED_NODES = 200_000
MAX_FLOW_DEPTH = 64  # PyYAML's scanner is quadratic in the bracket depth: 100k brackets take minutes


def _flow_depth(text: str) -> int:
    """Nesting of [ ] and { } where it first passes the cap, else at the end (brackets inside strings count too: a
    real matrix is nowhere near the cap)."""
    depth = 0
    for bracket in re.finditer(r"[\[\]{}]", text):
        depth = depth + 1 if bracket.group() in "[{" else max(depth - 1, 0)
        if depth > MAX_FLOW_DEPTH:
            break
    return depth


class _TooLarge(Exception):
    pass


def _expanded_size(root: yaml.Node) -> int:
    """Nodes the document has once every alias is expanded, counting each distinct node once (memoised), and
    stopping as soon as the count passes MAX_EXPANDED_NODES; an alias inside its own anchor counts as too large."""
    sizes: dict[int, int] = {}
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    open_nodes: set[int] = set()
    while stack:
        node, done = stack.pop()
        key = id(node)
        children = ([n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode)
                    else node.value if isinstance(node, yaml.SequenceNode) else [])
        if done:
            open_nodes.discard(key)
            sizes[key] = 1 + sum(sizes[id(c)] for c in children)
            if sizes[key] > MAX_EXPANDED_NODES:
                raise _TooLarge
            continue
        if key in sizes:
            continue
        if key in open_nodes:
            raise _TooLarge
        open_nodes.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in children if id(c) not in sizes)
    return sizes[id(root)]


class _Located:
    """Line of every node of a YAML document, by path; duplicate keys are recorded as problems."""

    def __init__(self, root: yaml.Node):
        self.lines: dict[YamlPath, int] = {}
        self.duplicates: list[tuple[YamlPath, int]] = []
        self._seen: set[int] = set()
        self._walk(root, ())

    def _walk(self, node: yaml.Node, path: YamlPath) -> None:
        self.lines[path] = node.start_mark.line + 1
        if id(node) in self._seen:  # an alias: a problem inside it is reported at the alias
            return
        self._seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            seen: set = set()
            for key, value in node.value:
                name = key.value
                if name in seen:
                    self.duplicates.append((path + (name,), key.start_mark.line + 1))
                seen.add(name)
                self.lines[path + (name,)] = key.start_mark.line + 1
                self._walk(value, path + (name,))
                self.lines[path + (name,)] = key.start_mark.line + 1  # the key's line, not the value's
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self._walk(item, path + (i,))

    def line(self, path: YamlPath) -> int:
        """Line of the deepest existing prefix of `path` (a missing key is reported at its parent)."""
        for n in range(len(path), -1, -1):
            if path[:n] in self.lines:
                return self.lines[path[:n]]
        return 1


def _dotted(path: YamlPath) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else str(p)) for i, p in enumerate(path))


def _model_at(path: YamlPath) -> type[BaseModel] | None:
    """The schema class that owns the mapping at `path` (to list its valid keys)."""
    annotation: typing.Any = Matrix
    for part in path:
        while True:  # unwrap Optional / Annotated / dict / list down to a class
            origin = typing.get_origin(annotation)
            if origin in (typing.Union, types.UnionType):
                annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
            elif origin is typing.Annotated:
                annotation = typing.get_args(annotation)[0]
            else:
                break
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            if part not in annotation.model_fields:
                return None
            annotation = annotation.model_fields[part].annotation
        elif typing.get_origin(annotation) in (dict, list):
            annotation = typing.get_args(annotation)[-1]
        else:
            return None
    while typing.get_origin(annotation) in (typing.Union, types.UnionType, typing.Annotated):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _message(error: dict) -> str:
    path, kind = tuple(error["loc"]), error["type"]
    if kind == "extra_forbidden":
        owner = _model_at(path[:-1])
        valid = list(owner.model_fields) if owner else []
        close = difflib.get_close_matches(str(path[-1]), valid, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        return f"unknown key '{path[-1]}'; {hint}valid keys: {', '.join(valid)}"
    if kind == "missing":
        return f"missing required key '{path[-1]}'"
    found = error.get("input")
    shown = repr(found) if not isinstance(found, dict | list) else type(found).__name__
    if kind == "string_pattern_mismatch":
        pattern = error.get("ctx", {}).get("pattern", "")
        return f"{shown}: expected {PATTERN_NAMES.get(pattern, 'a string matching ' + pattern)}"
    if kind == "string_type" and isinstance(found, int | float):
        return f"{shown}: expected a string; quote it (\"{found}\")"
    return f"{shown}: {error['msg']}"


def _problems_from_validation(exc: ValidationError, file: str, where: _Located) -> list[Problem]:
    problems = []
    for error in exc.errors():
        # pydantic inserts union member tags into loc ("str", "function-after[...]"): keep only the parts
        # that exist in the document, plus a final key that is missing or unknown.
        path: YamlPath = ()
        for i, part in enumerate(error["loc"]):
            if path + (part,) in where.lines or (i == len(error["loc"]) - 1 and error["type"] in KEY_ERRORS):
                path += (part,)
        problems.append(Problem(file, where.line(path), _dotted(path), _message(error | {"loc": path})))
    return problems


def _parse(text: str, file: str) -> tuple[dict, _Located]:
    def fail(line: int, message: str) -> MatrixError:
        return MatrixError([Problem(file, line, "", message)])

    if not text.strip():
        raise fail(1, f"the file is empty; expected a mapping with keys {TOP_LEVEL}")
    too_deep = fail(1, "nested too deeply for a matrix file (thousands of brackets or indents); entries are at most "
                       "a few levels deep")
    if _flow_depth(text) > MAX_FLOW_DEPTH:
        raise too_deep
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        if node is not None:
            _expanded_size(node)
        data = yaml.safe_load(text)
    except _TooLarge:
        raise fail(1, f"YAML aliases expand to more than {MAX_EXPANDED_NODES} nodes (or an alias sits inside its "
                      "own anchor); write the entries out or use fewer nested aliases") from None
    except RecursionError:
        raise too_deep from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark else 1
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        if "\t" in text.splitlines()[line - 1 if line <= len(text.splitlines()) else 0] or "tab" in problem:
            problem = "a tab character; YAML indentation must use spaces"
        raise fail(line, f"not valid YAML: {problem}") from None
    if not isinstance(data, dict):
        kind = "empty document" if data is None else type(data).__name__
        raise fail(node.start_mark.line + 1 if node else 1, f"found a {kind}; expected a mapping with keys {TOP_LEVEL}")
    return data, _Located(node)


def load_matrix(path: str | Path = DEFAULT_MATRIX_PATH) -> Matrix:
    """Read, validate and cross-check a matrix file; raises MatrixError listing every problem."""
    path = Path(path)
    file = path.name if path.resolve() == DEFAULT_MATRIX_PATH else str(path)
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise MatrixError([Problem(file, 1, "", f"cannot read the file ({exc.__class__.__name__}); "
                                                "pass an existing UTF-8 YAML file")]) from None
    if len(raw) > MAX_FILE_BYTES:
        raise MatrixError([Problem(file, 1, "", f"the file is larger than {MAX_FILE_BYTES} bytes (the limit for a "
                                                "matrix file); pass the matrix, not another file")])
    data, where = _parse(text, file)
    problems = [Problem(file, line, _dotted(p), "duplicate key; each key may appear once")
                for p, line in where.duplicates]
    try:
        matrix = Matrix.model_validate(data)
    except ValidationError as exc:
        problems += _problems_from_validation(exc, file, where)
        findings = list(check_references(data))
        rest = _valid_remainder(data)
        if rest is not None:  # cross-check what did validate, so one pass reports everything
            findings += check_matrix(rest, references=False)
        problems += [Problem(file, where.line(p), _dotted(p), msg) for p, msg in findings]
        raise MatrixError(problems) from None
    problems += [Problem(file, where.line(p), _dotted(p), msg) for p, msg in check_matrix(matrix)]
    if problems:
        raise MatrixError(problems)
    return matrix


def _valid_remainder(data: dict) -> Matrix | None:
    """The matrix without its invalid entries and the entries that name them, or None if that fails."""
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for _ in range(4):
        try:
            return Matrix.model_validate(data)
        except ValidationError as exc:
            bad = {tuple(e["loc"][:2]) for e in exc.errors() if len(e["loc"]) >= 2}
            if not bad:
                return None
            for section, name in bad:
                data.get(section, {}).pop(name, None)
            gone = {name for _, name in bad}
            for name, recipe in list(data.get("recipes", {}).items()):
                if isinstance(recipe, dict) and gone & {str(recipe.get(k)) for k in ("model", "image", "layout")}:
                    data["recipes"].pop(name)
            for section in ("gates", "benchmarks"):
                for name, entry in list(data.get(section, {}).items()):
                    named = entry.get("recipes", [entry.get("recipe")]) if isinstance(entry, dict) else []
                    if any(r not in data.get("recipes", {}) for r in named if isinstance(r, str)):
                        data[section].pop(name)
    return None
