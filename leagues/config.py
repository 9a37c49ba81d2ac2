"""Per-component configs: building them from dicts, YAML and dotted CLI overrides, with checked types.

Every component declares its knobs as a `@dataclass(kw_only=True, slots=True)` beside the code that uses
it, and documents each field once, as a string literal right under the field. A run composes those
dataclasses; this module is the only machinery they need:

    from_dict(cls, data)        nested dicts -> dataclasses, every value type-checked
    to_dict(cfg)                dataclasses -> plain YAML-safe data
    dump_yaml / load_yaml       the resolved config of a run, written atomically and read back
    apply_overrides(cfg, args)  `--train.lr 1e-6`, `--train.lr=1e-6`, `--flag`, `--no-flag`
    describe(cls)               dotted key, type, default and field doc of every knob, for `--help`
    load_named(spec, what, form) the Python object a 'module:name' value names (rewards, envs, agents...)

Decisions:
- Strict: an unknown key or a value of the wrong type raises `ValueError` naming the full dotted key
  (`train.lr: expected float, got 'abc'`), with a did-you-mean for near misses, and for YAML files the
  file and line. Nothing is silently dropped or guessed.
- Coercion is minimal: ints are accepted for floats, strings for `Path`, `Enum` values or names for
  enums. A string that parses as a float is accepted for a float, because YAML 1.1 (PyYAML) reads
  `1e-6` as a string.
- CLI override values are parsed with `yaml.safe_load` (so `3`, `true`, `null`, `[1, 2]` work), then
  type-checked like any other value; if the parsed value does not fit but the raw text does (a prompt
  of `yes` or `1.10` for a `str` field), the raw text wins.
- Configs are values: `apply_overrides` returns a new config built with `dataclasses.replace`.
- Field docs are read from the class source with `ast`, so they are written once and not repeated in
  `metadata=` or help strings.

This module imports nothing from leagues.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import difflib
import enum
import functools
import importlib
import inspect
import os
import tempfile
import textwrap
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

T = TypeVar("T")
KeyPath = tuple[str | int, ...]


class ConfigError(ValueError):
    """A bad config key or value; `path` is where it sits, for finding its line in a YAML file."""

    def __init__(self, path: KeyPath, message: str) -> None:
        super().__init__(message)
        self.path = path
        self.message = message


def dotted(path: KeyPath) -> str:
    """`("train", "stages", 2, "lr")` -> `train.stages[2].lr`."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


# ---------------------------------------------------------------------------------------------------
# field docs and help


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass (and of its dataclass bases), by field name."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            docs.update(_own_field_docs(klass))
    return docs


def _own_field_docs(cls: type) -> dict[str, str]:
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # defined without a source file (exec, REPL)
        return {}
    body = ast.parse(source).body[0].body
    docs = {}
    for stmt, nxt in zip(body, body[1:], strict=False):
        if (
            isinstance(stmt, ast.AnnAssign)
            and isinstance(stmt.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[stmt.target.id] = inspect.cleandoc(nxt.value.value)
    return docs


@dataclasses.dataclass(kw_only=True, slots=True, frozen=True)
class FieldInfo:
    """One knob as `--help` shows it."""

    key: str
    type_name: str
    default: str
    doc: str


def describe(cls: type, prefix: str = "") -> list[FieldInfo]:
    """Every leaf knob of a config class, nested dataclasses flattened into dotted keys."""
    hints, docs, out = _hints(cls), field_docs(cls), []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        key, tp = prefix + f.name, hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += describe(tp, key + ".")
            continue
        out.append(FieldInfo(key=key, type_name=type_name(tp), default=_default_text(f), doc=docs.get(f.name, "")))
    return out


def _default_text(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return repr(_plain(f.default))
    if f.default_factory is not dataclasses.MISSING:
        return repr(_plain(f.default_factory()))
    return "required"


def type_name(tp: Any) -> str:
    """A short readable name for an annotation: `float`, `int | None`, `'greedy' | 'sample'`."""
    origin, args = get_origin(tp), get_args(tp)
    if origin is Literal:
        return " | ".join(repr(_plain(a)) for a in args)
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if tp is type(None):
        return "None"
    if origin is not None:
        return f"{origin.__name__}[{', '.join('...' if a is Ellipsis else type_name(a) for a in args)}]"
    return getattr(tp, "__name__", str(tp))


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


# ---------------------------------------------------------------------------------------------------
# dict -> dataclass


def from_dict(cls: type[T], data: Mapping[str, Any], *, where: str = "") -> T:
    """Build `cls` from nested plain data, checking every key and value.

    `where` prefixes error messages with the source of the data, e.g. `"run.yaml: "`.
    """
    try:
        return _build(cls, data, ())
    except ConfigError as e:
        raise ConfigError(e.path, where + e.message) from None


def _build(cls: type[T], data: Any, path: KeyPath) -> T:
    if isinstance(data, cls):
        return data
    if not isinstance(data, Mapping):
        raise ConfigError(path, f"{dotted(path) or 'config'}: expected a mapping ({cls.__name__}), got {_show(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            raise _unknown_key(path, key, fields)
    hints = _hints(cls)
    kwargs = {name: _coerce(hints[name], value, (*path, name)) for name, value in data.items()}
    for name, f in fields.items():
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError((*path, name), f"missing required config key '{dotted((*path, name))}'")
    return cls(**kwargs)


def _unknown_key(path: KeyPath, key: Any, known: Mapping[str, Any]) -> ConfigError:
    message = f"unknown config key '{dotted((*path, str(key)))}'"
    close = difflib.get_close_matches(str(key), list(known), n=1)
    if close:
        message += f" (did you mean '{dotted((*path, close[0]))}'?)"
    return ConfigError((*path, str(key)), message)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _mismatch(tp: Any, value: Any, path: KeyPath) -> ConfigError:
    return ConfigError(path, f"{dotted(path)}: expected {type_name(tp)}, got {_show(value)}")


def _coerce(tp: Any, value: Any, path: KeyPath) -> Any:
    """Check `value` against annotation `tp`, converting where the module docstring allows."""
    if tp is Any:
        return value
    origin = get_origin(tp)
    if origin in _GENERIC_COERCERS:
        return _GENERIC_COERCERS[origin](tp, value, path)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return _coerce_enum(tp, value, path)
    if tp in _SCALAR_COERCERS:
        result = _SCALAR_COERCERS[tp](value)
        if result is _BAD:
            raise _mismatch(tp, value, path)
        return result
    raise TypeError(f"config field {dotted(path)} has an unsupported type {tp!r}")


_BAD = object()


def _to_float(value: Any) -> Any:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return _BAD
    return _BAD


_SCALAR_COERCERS: dict[Any, Callable[[Any], Any]] = {
    int: lambda v: v if isinstance(v, int) and not isinstance(v, bool) else _BAD,
    float: _to_float,
    bool: lambda v: v if isinstance(v, bool) else _BAD,
    str: lambda v: v if isinstance(v, str) else _BAD,
    Path: lambda v: Path(v) if isinstance(v, str | os.PathLike) else _BAD,
    type(None): lambda v: v if v is None else _BAD,
}


def _coerce_union(tp: Any, value: Any, path: KeyPath) -> Any:
    arms = [a for a in get_args(tp) if a is not type(None)]
    if value is None and len(arms) < len(get_args(tp)):
        return None
    if len(arms) == 1:  # `X | None`: keep X's own (possibly nested) error
        return _coerce(arms[0], value, path)
    for arm in arms:
        try:
            return _coerce(arm, value, path)
        except ConfigError:
            continue
    raise _mismatch(tp, value, path)


def _coerce_literal(tp: Any, value: Any, path: KeyPath) -> Any:
    for allowed in get_args(tp):
        if value == allowed and type(value) is type(allowed):
            return allowed
    raise ConfigError(path, f"{dotted(path)}: expected one of {type_name(tp)}, got {_show(value)}")


def _coerce_enum(tp: type[enum.Enum], value: Any, path: KeyPath) -> enum.Enum:
    if isinstance(value, tp):
        return value
    for member in tp:
        if value == member.value or value == member.name:
            return member
    choices = " | ".join(repr(m.value) for m in tp)
    raise ConfigError(path, f"{dotted(path)}: expected one of {choices}, got {_show(value)}")


def _coerce_list(tp: Any, value: Any, path: KeyPath) -> list:
    if not isinstance(value, list | tuple):
        raise _mismatch(tp, value, path)
    (item_tp,) = get_args(tp) or (Any,)
    return [_coerce(item_tp, v, (*path, i)) for i, v in enumerate(value)]


def _coerce_tuple(tp: Any, value: Any, path: KeyPath) -> tuple:
    args = get_args(tp)
    if not isinstance(value, list | tuple):
        raise _mismatch(tp, value, path)
    if not args or (len(args) == 2 and args[1] is Ellipsis):
        item_tp = args[0] if args else Any
        return tuple(_coerce(item_tp, v, (*path, i)) for i, v in enumerate(value))
    if len(value) != len(args):
        raise ConfigError(path, f"{dotted(path)}: expected {len(args)} items ({type_name(tp)}), got {_show(value)}")
    return tuple(_coerce(a, v, (*path, i)) for i, (a, v) in enumerate(zip(args, value, strict=True)))


def _coerce_dict(tp: Any, value: Any, path: KeyPath) -> dict:
    if not isinstance(value, Mapping):
        raise _mismatch(tp, value, path)
    key_tp, value_tp = get_args(tp) or (Any, Any)
    return {_coerce(key_tp, k, (*path, str(k))): _coerce(value_tp, v, (*path, str(k))) for k, v in value.items()}


_GENERIC_COERCERS: dict[Any, Callable[[Any, Any, KeyPath], Any]] = {
    Union: _coerce_union,
    types.UnionType: _coerce_union,
    Literal: _coerce_literal,
    list: _coerce_list,
    tuple: _coerce_tuple,
    dict: _coerce_dict,
}


# ---------------------------------------------------------------------------------------------------
# dataclass -> dict, YAML


def to_dict(cfg: Any) -> dict[str, Any]:
    """A config as plain YAML-safe data (enums as their values, paths and tuples as str and list)."""
    assert dataclasses.is_dataclass(cfg) and not isinstance(cfg, type), f"not a config instance: {cfg!r}"
    return {f.name: _plain(getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.init}


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_dict(value)
    if isinstance(value, enum.Enum):
        return _plain(value.value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    return value


def dump_yaml(cfg: Any, path: str | os.PathLike) -> Path:
    """Write `cfg` as YAML, atomically (temp file in the same folder, then `os.replace`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = f"# {type(cfg).__name__}\n" + yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)
    return write_text_atomic(path, text)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` through a temp file in the same folder and `os.replace`: readers see the old
    file or the new one, never half of it."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_yaml(cls: type[T], path: str | os.PathLike) -> T:
    """Read a config written by `dump_yaml` (or by hand); errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such config file")
    text = path.read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ValueError(f"{path}{line}: invalid YAML: {getattr(e, 'problem', None) or e}") from None
    try:
        return _build(cls, {} if data is None else data, ())
    except ConfigError as e:
        line = _yaml_line(text, e.path)
        raise ConfigError(e.path, f"{path}{f':{line}' if line else ''}: {e.message}") from None


def _yaml_line(text: str, path: KeyPath) -> int | None:
    """The 1-based line of the deepest node of `path` found in the YAML text."""
    node, line = yaml.compose(text), None
    for part in path:
        if isinstance(node, yaml.MappingNode):
            match = next(((k, v) for k, v in node.value if getattr(k, "value", None) == part), None)
            if match is None:
                break
            line, node = match[0].start_mark.line + 1, match[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


# ---------------------------------------------------------------------------------------------------
# dotted CLI overrides


def apply_overrides(cfg: T, args: list[str]) -> T:
    """A copy of `cfg` with `--a.b value`, `--a.b=value`, `--flag` and `--no-flag` applied in order.

    Dashes in keys may stand for underscores (`--max-new-tokens`); a value that itself starts with `--`
    needs the `--key=value` form. Unknown keys and bad values raise `ValueError` naming the dotted key.
    Each value is type-checked as it is read; each config's own checks (`__post_init__`, which may relate
    several fields) run once all overrides are in, so the order of flags never matters.
    """
    for path, raw in _parse_overrides(type(cfg), args):
        path = _shorthand(type(cfg), path, raw)
        tp = _field_type(type(cfg), path)
        cfg = _replace_at(cfg, path, _parse_value(tp, raw, path))
    return from_dict(type(cfg), to_dict(cfg))


def _parse_overrides(cls: type, args: list[str]) -> Iterator[tuple[KeyPath, str]]:
    i = 0
    while i < len(args):
        token = args[i]
        if not token.startswith("--") or token == "--":
            raise ValueError(f"unexpected argument {token!r}: overrides look like --key value or --key=value")
        key, eq, value = token[2:].partition("=")
        has_next = i + 1 < len(args) and not args[i + 1].startswith("--")
        if eq or has_next:
            yield _resolve_key(cls, key), value if eq else args[i + 1]
            i += 1 if eq else 2
            continue
        yield _flag(cls, key)
        i += 1


def _flag(cls: type, key: str) -> tuple[KeyPath, str]:
    """`--flag` -> true and `--no-flag` -> false for a bool field; any other bare key lacks its value."""
    if key.startswith("no-") and not _is_key(cls, key) and _is_key(cls, key[3:]):
        path, value = _resolve_key(cls, key[3:]), "false"
    else:
        path, value = _resolve_key(cls, key), "true"
    tp = _field_type(cls, path)
    if not _accepts(tp, True):
        raise ValueError(f"--{key}: missing value (expected {type_name(tp)})")
    return path, value


def _is_key(cls: type, key: str) -> bool:
    try:
        _resolve_key(cls, key)
    except ValueError:
        return False
    return True


def _accepts(tp: Any, value: Any) -> bool:
    try:
        _coerce(tp, value, ())
    except ConfigError:
        return False
    return True


def _resolve_key(cls: type, key: str) -> KeyPath:
    """Walk a dotted key through nested config classes; unknown parts raise with a suggestion."""
    path: KeyPath = ()
    for part in key.split("."):
        if cls is None:
            raise ValueError(f"unknown config key '{key}': '{dotted(path)}' has no sub-keys")
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        name = part if part in names else part.replace("-", "_")
        if name not in names:
            raise _unknown_key(path, part, dict.fromkeys(names))
        path = (*path, name)
        cls = _dataclass_of(_hints(cls)[name])
    return path


def _dataclass_of(tp: Any) -> type | None:
    """The config class behind `Sub` or `Sub | None`, else None."""
    arms = [a for a in get_args(tp) if a is not type(None)] if get_origin(tp) in (Union, types.UnionType) else [tp]
    return arms[0] if len(arms) == 1 and dataclasses.is_dataclass(arms[0]) else None


def _shorthand(cls: type, path: KeyPath, raw: str) -> KeyPath:
    """`--data file.jsonl` for `--data.path file.jsonl`: a scalar given for a sub-config goes to the field its
    class names in `SHORTHAND` (a mapping still sets the whole sub-config)."""
    sub = _dataclass_of(_field_type(cls, path))
    key = getattr(sub, "SHORTHAND", None) if sub is not None else None
    if key is None or raw.lstrip().startswith("{"):
        return path
    return (*path, key)


def _field_type(cls: type, path: KeyPath) -> Any:
    for name in path[:-1]:
        cls = _dataclass_of(_hints(cls)[name])
    return _hints(cls)[path[-1]]


def _parse_value(tp: Any, raw: str, path: KeyPath) -> Any:
    try:
        parsed = yaml.safe_load(raw)
    except yaml.YAMLError:
        parsed = raw
    try:
        return _coerce(tp, parsed, path)
    except ConfigError as first:
        if isinstance(parsed, str) and parsed == raw:
            raise
        try:  # the raw text may fit where its YAML reading does not (`--prompt yes` for a str)
            return _coerce(tp, raw, path)
        except ConfigError:
            raise first from None


def _replace_at(cfg: Any, path: KeyPath, value: Any) -> Any:
    """A copy of `cfg` with the field at `path` set, without running `__post_init__` (see apply_overrides)."""
    name = path[0]
    if len(path) > 1:
        child = getattr(cfg, name)
        if child is None:  # `Sub | None` left unset: start from Sub's defaults
            child = _build(_dataclass_of(_hints(type(cfg))[name]), {}, (name,))
        value = _replace_at(child, path[1:], value)
    new = copy.copy(cfg)
    object.__setattr__(new, name, value)
    return new


def load_named(spec: str, what: str, form: str = "module:name"):
    """The object that a config value of the form 'module:name' names; a `ValueError` naming `what`, the value
    and the expected `form` when it is malformed or cannot be imported."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"{what} {spec!r}: expected '{form}'")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"{what} {spec!r}: cannot load it: {e}") from None
