"""Typed config dataclasses -> command-line interfaces.

Each field becomes `--field-name`; its help text is the docstring written under the field (cleanrl
style). Booleans take `--flag/--no-flag`; tuples and lists take several values; dicts take JSON.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import textwrap
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")


def field_docs(cls: type) -> dict[str, str]:
    """Docstrings written under dataclass fields, by field name (base classes included)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, nxt in zip(body, body[1:], strict=False):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant)
                    and isinstance(nxt.value.value, str)):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _unwrap_optional(tp):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type) -> None:
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        if not f.init or f.name.startswith("_"):
            continue
        tp, optional = _unwrap_optional(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        flag = "--" + f.name.replace("_", "-")
        help_text = docs.get(f.name, "")
        if not required:
            help_text += f" (default: {default!r})"
        kwargs: dict[str, Any] = {"dest": f.name, "help": help_text}
        origin = typing.get_origin(tp)
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif origin in (tuple, list):
            args = [a for a in typing.get_args(tp) if a is not Ellipsis]
            kwargs.update(nargs="+", type=args[0] if args else str, action="extend")  # repeats add up
        elif origin is dict or tp is dict:
            kwargs["type"] = json.loads
        elif isinstance(tp, type) and tp in (int, float, str):
            kwargs["type"] = tp
        else:
            kwargs["type"] = str
        if optional and kwargs.get("type") in (int, float):
            base = kwargs["type"]
            kwargs["type"] = lambda s, base=base: None if s.lower() == "none" else base(s)
        if required:
            kwargs["required"] = True
        else:
            kwargs["default"] = argparse.SUPPRESS
        parser.add_argument(flag, **kwargs)


def dataclass_from_args(cls: type[T], namespace: argparse.Namespace) -> T:
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        if f.init and hasattr(namespace, f.name):
            value = getattr(namespace, f.name)
            tp, _ = _unwrap_optional(hints[f.name])
            if typing.get_origin(tp) is tuple and value is not None:
                value = tuple(value)
            values[f.name] = value
    return cls(**values)


def to_jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {k: to_jsonable(v) for k, v in dataclasses.asdict(obj).items()}
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    return obj
