"""The config reference printed by `train/meta.py --help`: every field, its default and one line of help.

The help text is each field's docstring (the string literal under the field in train/config.py). Python keeps
no such attribute docstrings at run time, so they are read from the source with `ast`; the dataclasses
stay the single place where a field is documented.
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import re
import textwrap
import typing


def field_docs(cls) -> dict[str, str]:
    """{field name: docstring} of a dataclass, from the string literal that follows each annotated field."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
            docs[node.target.id] = inspect.cleandoc(nxt.value.value)
    return docs


def first_sentence(doc: str) -> str:
    """The docstring on one line, up to the end of its first sentence."""
    flat = " ".join(doc.split())
    m = re.search(r"(?<=\.)\s+(?=[A-Z\"(])", flat)
    return flat[:m.start()] if m else flat


def _type_name(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return "{" + ",".join(str(a) for a in args) + "}"
    if origin is typing.Union or type(tp).__name__ == "UnionType":
        return "|".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin in (list, tuple):
        return f"{origin.__name__}[{','.join(_type_name(a) for a in args if a is not Ellipsis)}]"
    return getattr(tp, "__name__", str(tp))


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "(required)"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value)) or "[]"
    return str(value)


def reference(root, sections: dict[str, type]) -> str:
    """Every field of `root` (top-level fields) and of each section class, as `key=default  type` + help."""
    lines = ["config fields (defaults shown; change with --set KEY=VALUE or a --config YAML file):"]

    def add(cls, prefix: str, skip=()):
        hints, docs = typing.get_type_hints(cls), field_docs(cls)
        for f in dataclasses.fields(cls):
            if f.name in skip:
                continue
            lines.append(f"  {prefix}{f.name}={_default(f)}  {_type_name(hints[f.name])}")
            lines.append(f"      {first_sentence(docs.get(f.name, '(undocumented)'))}")

    add(root, "", skip=sections)
    for name, cls in sections.items():
        add(cls, f"{name}.")
    return "\n".join(lines)
