"""Reading the JSON and YAML files that users write or edit (datasets, predictions, references,
configs, run records, checkpoint files, baselines) in one way, with one kind of error.

A file is read as UTF-8 (a byte-order mark is allowed), and refused with a message naming the
file (and the line, where the parser knows it) when it is not UTF-8, not valid JSON/YAML, holds
a key twice in one object (the parsers would keep the last one silently), is nested deeper than
:data:`MAX_DEPTH`, or (YAML) expands through aliases to more than :data:`MAX_YAML_NODES`
values or refers to itself. :func:`quote` and :func:`describe` show user values in messages,
never longer than a line.
"""

from __future__ import annotations

import io
import json
import reprlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from benchmark.errors import CapbenchError

#: deepest nesting of lists/objects accepted (capbench's own files nest 5 levels at most)
MAX_DEPTH = 100
#: most values a YAML document may expand to through its aliases (a config has a few hundred)
MAX_YAML_NODES = 100_000
#: longest quoted value in a message, in characters
QUOTE_LIMIT = 80

__all__ = ["read_json", "parse_json", "read_yaml", "quote", "describe", "field_type_problem", "MAX_DEPTH",
           "MAX_YAML_NODES", "QUOTE_LIMIT"]

_JSON_TYPES = {bool: "boolean", int: "integer", float: "number", str: "string", list: "list",
               dict: "object", type(None): "null"}


def quote(value: Any, limit: int = QUOTE_LIMIT) -> str:
    """``repr(value)`` cut to about ``limit`` characters (``...`` marks the cut), in time
    bounded whatever the size of ``value`` (a YAML alias bomb, a 100 MB string)."""
    r = reprlib.Repr()
    r.maxstring = r.maxother = max(limit, 8)
    r.maxlist = r.maxtuple = r.maxdict = r.maxset = 6
    r.maxlevel = 3
    return _cut(r.repr(value), limit)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe(value: Any) -> str:
    """A user value by its JSON type and (cut) value, e.g. ``integer 3``, ``string 'a dog'``,
    ``null``: what a message says a field was given."""
    kind = next((name for t, name in _JSON_TYPES.items() if type(value) is t),
                type(value).__name__)
    return "null" if value is None else f"{kind} {quote(value)}"


_KIND_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true/false",
               dict: "an object", list: "a list", type(None): "null"}


def _values_at(data, path: list[str], prefix: str = ""):
    """``(dotted name, value)`` of every value at ``path`` in ``data`` (absent ones left out;
    ``*`` goes through every value of an object or item of a list)."""
    if not path:
        yield prefix, data
        return
    head, rest = path[0], path[1:]
    if head == "*":
        items = data.items() if isinstance(data, dict) else \
            ((f"[{i}]", v) for i, v in enumerate(data)) if isinstance(data, list) else ()
    else:
        items = [(head, data[head])] if isinstance(data, dict) and head in data else ()
    for key, value in items:
        name = f"{prefix}{key}" if key.startswith("[") or not prefix else f"{prefix}.{key}"
        yield from _values_at(value, rest, name)


def field_type_problem(data: Any, types: Iterable[tuple[str, tuple[type, ...]]]) -> str | None:
    """``field 'metrics.CIDEr' must be a number or null, got string 'high'`` for the first
    value of parsed JSON ``data`` whose type is not one of its ``types`` entry, else None.

    ``types``: ``(dotted path, allowed types)`` pairs, parents before children; ``*`` in a
    path stands for every value of an object or item of a list; absent fields are fine
    (``bool`` counts only where listed, although Python's bool is an int)."""
    for path, kinds in types:
        for name, value in _values_at(data, path.split(".")):
            if type(value) not in kinds:
                shown = [n for k, n in _KIND_NAMES.items()
                         if k in kinds and not (k is int and float in kinds)]
                return f"field {name!r} must be {' or '.join(shown)}, got {describe(value)}"
    return None


class _DuplicateKey(ValueError):
    def __init__(self, key: str, obj: dict):
        super().__init__(key)
        self.key, self.obj = key, obj


def _pairs_without_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key, out)
        out[key] = value
    return out


def _depth_problem(data: Any) -> str | None:
    """Whether ``data`` nests deeper than MAX_DEPTH (an iterative walk over its containers;
    ``map(type, ...)`` runs in C, so lists of plain values cost little)."""
    stack = [(data, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            return f"nested deeper than {MAX_DEPTH} levels"
        kids = node.values() if type(node) is dict else node
        types = set(map(type, kids))
        if dict in types or list in types:
            stack.extend((k, depth + 1) for k in kids if type(k) in (dict, list))
    return None


def parse_json(text: str, source: str | Path, what: str,
               error: type[CapbenchError] = CapbenchError, *, walk: bool = True) -> Any:
    """Parse the JSON ``text`` of the ``what`` file ``source``. Raises ``error`` naming
    ``source`` for invalid JSON (with line and column), a key given twice in one object, or
    nesting deeper than Python's parser allows. ``walk``: also refuse nesting deeper than
    :data:`MAX_DEPTH` (a walk over every value, about as long as the parse: pass False for
    large files whose fields are type-checked one by one, so that nothing walks the rest)."""
    try:
        data = json.loads(text, object_pairs_hook=_pairs_without_duplicates)
    except json.JSONDecodeError as exc:
        raise error(f"{source}:{exc.lineno}: not valid JSON ({exc.msg}, line {exc.lineno}, col "
                    f"{exc.colno}); the {what} must be JSON") from None
    except _DuplicateKey as exc:
        raise error(f"{source}: the {what} gives key {quote(exc.key)} twice in one object "
                    f"(the one holding {quote(list(exc.obj))}); JSON readers keep only the last "
                    "one, silently: keep one") from None
    except RecursionError:
        raise error(f"{source}: the {what} is nested deeper than {MAX_DEPTH} levels; it cannot "
                    "be a capbench file") from None
    if walk and isinstance(data, dict | list) and (why := _depth_problem(data)):
        raise error(f"{source}: the {what} is {why}; it cannot be a capbench file")
    return data


def _read_text(path: Path, what: str, error: type[CapbenchError]) -> str:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise error(f"cannot read the {what} {path}: {exc.strerror or exc}") from None
    try:
        return raw.decode("utf-8-sig")  # a byte-order mark (Windows editors) is fine
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise error(f"{path}:{line}: the {what} is not UTF-8 text ({exc.reason} at byte "
                    f"{exc.start}); save it as UTF-8") from None


def read_json(path: str | Path, what: str, error: type[CapbenchError] = CapbenchError, *,
              walk: bool = True) -> Any:
    """The JSON value in the ``what`` file ``path`` (e.g. ``what="predictions"``), read as
    UTF-8 with or without a byte-order mark. Raises ``error`` naming the file when it cannot
    be read, is not UTF-8, or :func:`parse_json` (given ``walk``) refuses it."""
    path = Path(path)
    return parse_json(_read_text(path, what, error), path, what, error, walk=walk)


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader (no tags that run code) refusing duplicate keys, self-reference,
    deep nesting and alias expansion past MAX_YAML_NODES."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may be overridden
                    continue
                key = self.construct_object(key_node, deep=deep)
                try:
                    first = seen.setdefault(key, key_node)
                except TypeError:
                    continue  # an unhashable key: the base class names it
                if first is not key_node:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {quote(key)} appears twice in one mapping (line "
                        f"{first.start_mark.line + 1} and line {key_node.start_mark.line + 1}); "
                        "YAML keeps only the last one, silently: keep one",
                        key_node.start_mark)
        return super().construct_mapping(node, deep=deep)

    def get_single_node(self):
        node = super().get_single_node()
        if node is not None:
            _check_expansion(node)
        return node


def _kids(node) -> list:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def _check_expansion(root) -> None:
    """Raise a YAMLError when the composed document refers to itself, nests deeper than
    MAX_DEPTH or expands to more than MAX_YAML_NODES values (aliases counted each time)."""
    done: dict[int, tuple[int, int]] = {}  # id(node) -> (expanded size, depth)
    open_: set[int] = set()
    stack = [(root, False)]
    while stack:
        node, closing = stack.pop()
        if closing:
            sizes = [done[id(k)] for k in _kids(node)]
            size = 1 + sum(s for s, _ in sizes)
            depth = 1 + max((d for _, d in sizes), default=0)
            if size > MAX_YAML_NODES or depth > MAX_DEPTH:
                what = (f"expands to more than {MAX_YAML_NODES} values through its aliases"
                        if size > MAX_YAML_NODES else f"is nested deeper than {MAX_DEPTH} levels")
                raise yaml.YAMLError(f"the document {what} (line {node.start_mark.line + 1})")
            open_.discard(id(node))
            done[id(node)] = (size, depth)
            continue
        if id(node) in done:
            continue
        if id(node) in open_:
            raise yaml.YAMLError(f"an alias refers to the value that holds it (line "
                                 f"{node.start_mark.line + 1}); write the value out")
        open_.add(id(node))
        stack.append((node, True))
        stack.extend((k, False) for k in _kids(node) if id(k) not in done)


def read_yaml(path: str | Path, what: str, error: type[CapbenchError] = CapbenchError) -> Any:
    """The YAML value in the ``what`` file ``path`` (None for an empty file), read with the
    safe loader (tags such as ``!!python`` are refused, never run). Raises ``error`` naming the
    file for what :func:`read_json` refuses, and for invalid YAML, a key given twice in one
    mapping, an alias to the value that holds it, or aliases expanding past
    :data:`MAX_YAML_NODES` values (an alias bomb)."""
    path = Path(path)
    stream = io.StringIO(_read_text(path, what, error))
    stream.name = str(path)  # PyYAML's marks name the file
    try:
        return yaml.load(stream, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as exc:
        raise error(f"{path}: not valid YAML: {_cut(str(exc), 600)}") from None
    except RecursionError:
        raise error(f"{path}: the {what} is nested deeper than {MAX_DEPTH} levels; it cannot "
                    "be a capbench file") from None
