"""Typed configs: defaults < YAML file (``--config``) < command-line flags < ``--set a.b=c``.

A config is a dataclass (nested dataclasses for sections). Values are coerced to the field's
type and checked; an unknown key is an error naming it and suggesting the closest valid key,
with the YAML line when it came from a file. The resolved config is saved as ``config.yaml``.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence, TypeVar, Union

import yaml

from mmkit.errors import ConfigError, suggest

C = TypeVar("C")


def load_config(
    cls: type[C],
    *,
    file: str | os.PathLike | None = None,
    flags: Mapping[str, Any] | None = None,
    sets: Sequence[str] = (),
) -> C:
    """Build ``cls`` from its defaults, a YAML file, flags (dotted keys; ``None`` = not given)
    and ``--set key=value`` strings, in that order of precedence (last wins)."""
    values: dict[str, Any] = {}
    lines: dict[str, int | str] = {}  # dotted key -> YAML line, "flag" or "set" (the last source)
    if file is not None:
        data, lines = _read_yaml(Path(file))
        _merge(values, data)
    for key, value in (flags or {}).items():
        if value is not None:
            _merge(values, _nest(key, value))
            lines[key] = "flag"
    for item in sets:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"expected key=value, got {item!r}", field="--set")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        _merge(values, _nest(key.strip(), value))
        lines[key.strip()] = "set"
    source = str(file) if file is not None else None
    return _build(cls, values, prefix="", source=source, lines=lines)


def config_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain YAML/JSON types (tuples become lists)."""
    def plain(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


def save_config(cfg: Any, path: str | os.PathLike) -> Path:
    """Write the resolved config as YAML, atomically."""
    from mmkit.io import atomic_write

    with atomic_write(path) as fh:
        yaml.safe_dump(config_dict(cfg), fh, sort_keys=False, allow_unicode=True)
    return Path(path)


def config_keys(cls: type) -> list[str]:
    """Every dotted key a config class accepts (for help texts and suggestions)."""
    keys = []
    for f in dataclasses.fields(cls):
        ftype = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(ftype):
            keys += [f"{f.name}.{k}" for k in config_keys(ftype)]
        else:
            keys.append(f.name)
    return keys


# --------------------------------------------------------------------------- internals


def _read_yaml(path: Path) -> tuple[dict[str, Any], dict[str, int]]:
    if not path.is_file():
        raise ConfigError("no such config file", file=str(path), field="--config")
    text = path.read_text(encoding="utf-8")
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise ConfigError(f"malformed YAML ({getattr(exc, 'problem', exc)})", file=str(path),
                          line=None if mark is None else mark.line + 1, field="yaml") from None
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise ConfigError("expected a mapping of config keys at the top level", file=str(path), line=1)
    return data, _key_lines(node, "")


def _key_lines(node: yaml.Node, prefix: str) -> dict[str, int]:
    out: dict[str, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = f"{prefix}{key_node.value}"
            out[key] = key_node.start_mark.line + 1
            out.update(_key_lines(value_node, key + "."))
    return out


def _nest(dotted: str, value: Any) -> dict[str, Any]:
    out: dict[str, Any] = value
    for part in reversed(dotted.split(".")):
        out = {part: out}
    return out


def _merge(into: dict[str, Any], new: Mapping[str, Any]) -> None:
    for key, value in new.items():
        if isinstance(value, Mapping) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def _build(cls: type[C], values: Mapping[str, Any], prefix: str, source: str | None,
           lines: dict[str, int | str]) -> C:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            raise _error(f"unknown key{suggest(key, fields)}; valid keys: {', '.join(fields)}",
                         dotted, source, lines)
        ftype = hints[key]
        if dataclasses.is_dataclass(ftype):
            if not isinstance(value, Mapping):
                raise _error("expected a mapping of keys", dotted, source, lines)
            # Start from the parent's default for this section, which may differ from the
            # section class's own defaults (a method's paper defaults for its TrainConfig).
            merged = _field_default(fields[key])
            _merge(merged, value)
            kwargs[key] = _build(ftype, merged, dotted + ".", source, lines)
        else:
            kwargs[key] = _coerce(value, ftype, dotted, source, lines)
    try:
        cfg = cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(str(exc), file=source, field=prefix.rstrip(".") or None) from None
    check = getattr(cfg, "validate", None)
    if check is not None:
        check()
    return cfg


def _field_default(f: dataclasses.Field) -> dict[str, Any]:
    """A nested section's default values as a plain dict ({} when the field has no default)."""
    if f.default_factory is not dataclasses.MISSING:
        return config_dict(f.default_factory())
    if f.default is not dataclasses.MISSING and dataclasses.is_dataclass(f.default):
        return config_dict(f.default)
    return {}


def _error(message: str, dotted: str, source: str | None, lines: dict[str, int | str]) -> ConfigError:
    """Locate the error at the source that set ``dotted`` (or a key below it) last."""
    origin = lines.get(dotted, next((v for k, v in lines.items() if k.startswith(dotted + ".")), None))
    if origin == "set":
        return ConfigError(message, field=f"--set {dotted}")
    if origin == "flag" or origin is None:
        return ConfigError(message, field=dotted)
    return ConfigError(message, file=source, line=origin, field=dotted)


def _coerce(value: Any, ftype: Any, dotted: str, source: str | None, lines: dict[str, int | str]) -> Any:
    """Check ``value`` against ``ftype`` (with the usual YAML-friendly coercions)."""
    origin = typing.get_origin(ftype)
    args = typing.get_args(ftype)
    if ftype is Any or (isinstance(ftype, type) and not origin and isinstance(value, ftype)
                        and not isinstance(value, bool)):
        return value
    if dataclasses.is_dataclass(ftype):
        if not isinstance(value, Mapping):
            raise _error(f"expected a mapping of {', '.join(f.name for f in dataclasses.fields(ftype))}",
                         dotted, source, lines)
        return _build(ftype, value, dotted + ".", source, lines)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, dotted, source, lines)
            except ConfigError as exc:
                errors.append(exc.message)
        raise _error(" or ".join(errors), dotted, source, lines)
    if origin is Literal:
        if value not in args:
            shown = ", ".join(map(str, args))
            raise _error(f"expected one of {shown}, got {value!r}{suggest(str(value), map(str, args))}",
                         dotted, source, lines)
        return value
    if origin in (list, tuple, Sequence) or ftype in (list, tuple):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise _error(f"expected a list, got {value!r}", dotted, source, lines)
        item = args[0] if args else Any
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise _error(f"expected {len(args)} values, got {len(value)}", dotted, source, lines)
            return tuple(_coerce(v, a, dotted, source, lines) for v, a in zip(value, args))
        coerced = [_coerce(v, item, dotted, source, lines) for v in value]
        return tuple(coerced) if origin is tuple else coerced
    if origin is dict or ftype is dict:
        if not isinstance(value, Mapping):
            raise _error(f"expected a mapping, got {value!r}", dotted, source, lines)
        return dict(value)
    if ftype is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in {"true", "false", "yes", "no", "1", "0"}:
            return value.lower() in {"true", "yes", "1"}
        raise _error(f"expected true or false, got {value!r}", dotted, source, lines)
    if ftype is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise _error(f"expected an integer, got {value!r}", dotted, source, lines)
        try:
            return int(value)
        except ValueError:
            raise _error(f"expected an integer, got {value!r}", dotted, source, lines) from None
    if ftype is float:
        if isinstance(value, bool):
            raise _error(f"expected a number, got {value!r}", dotted, source, lines)
        try:
            return float(value)
        except (TypeError, ValueError):
            raise _error(f"expected a number, got {value!r}", dotted, source, lines) from None
    if ftype is str:
        if isinstance(value, (dict, list)):
            raise _error(f"expected a string, got {value!r}", dotted, source, lines)
        return str(value)
    return value
