"""Configs are data: a YAML file (or dict) read into a typed dataclass, with `key=value` overrides.

Every stage declares one flat dataclass whose fields carry a `help` string; `config_help` turns it into
the `--help` text, so the listing of keys and defaults can never drift from the code.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from audio_rft import UserError

T = TypeVar("T")


def option(default: Any, help: str, **kwargs: Any) -> Any:
    """A dataclass field with a help string (lists and dicts get a default_factory)."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kwargs)
    return dataclasses.field(default=default, metadata={"help": help}, **kwargs)


def _yaml_value(text: str, key: str) -> Any:
    """An override's list or mapping, read as YAML (safely); a bad one is a one-line error."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise UserError(f"config key {key!r}: invalid YAML value {text!r} ({getattr(e, 'problem', None) or e})") from None


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Turn a YAML value or an override string into the field's declared type."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "~")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for a in inner:
            try:
                return _coerce(value, a, key)
            except UserError as e:
                errors.append(str(e))
        raise UserError(errors[0] if errors else f"config key {key!r}: cannot read {value!r}")
    if annotation is Any:
        return value
    if origin in (list, tuple):
        if isinstance(value, str):
            value = _yaml_value(value, key) if value.strip().startswith("[") else [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise UserError(f"config key {key!r}: expected a list, got {value!r}")
        item_type = args[0] if args else Any
        return [_coerce(v, item_type, key) for v in value]
    if origin is dict:
        if isinstance(value, str):
            value = _yaml_value(value, key)
        if not isinstance(value, dict):
            raise UserError(f"config key {key!r}: expected a mapping, got {value!r}")
        return dict(value)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "no", "0", "off"):
            return False
        raise UserError(f"config key {key!r}: expected true/false, got {value!r}")
    if annotation in (int, float):
        if isinstance(value, bool):
            raise UserError(f"config key {key!r}: expected a number, got {value!r}")
        try:
            number = float(value) if annotation is float else int(str(value), 0) if isinstance(value, str) else int(value)
        except (TypeError, ValueError):
            raise UserError(f"config key {key!r}: expected {annotation.__name__}, got {value!r}") from None
        if annotation is int and isinstance(value, float) and value != int(value):
            raise UserError(f"config key {key!r}: expected an integer, got {value!r}")
        return number
    if annotation is str:
        if isinstance(value, (dict, list)):
            raise UserError(f"config key {key!r}: expected a string, got {value!r}")
        return str(value)
    return value


def parse_overrides(items: list[str] | tuple[str, ...]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"override {item!r} is not key=value")
        out[key.strip()] = value
    return out


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}:{where} invalid YAML ({getattr(e, 'problem', e)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of config keys at the top level")
    return data


def build_config(cls: type[T], values: dict | None = None, overrides: dict | None = None, source: str = "config") -> T:
    """Build `cls` from a mapping plus overrides; unknown keys are an error naming the key and `source`."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    merged: dict[str, Any] = {}
    for origin, mapping in ((source, values or {}), ("override", overrides or {})):
        for key, value in mapping.items():
            name = key.replace("-", "_")
            if name not in fields:
                close = [f for f in fields if f.startswith(name[:4])][:3]
                hint = f" (did you mean {', '.join(close)}?)" if close else ""
                raise UserError(f"{origin}: unknown key {key!r} for {cls.__name__}{hint}")
            merged[name] = _coerce(value, hints[name], key)
    try:
        return cls(**merged)
    except (TypeError, ValueError) as e:
        raise UserError(f"{source}: {e}") from None


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> T:
    values = read_yaml(path) if path else {}
    return build_config(cls, values, parse_overrides(overrides), source=str(path or "config"))


def config_to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)


def config_help(cls: type, keys: tuple[str, ...] | None = None) -> str:
    """Every key of `cls` (or those of `keys`) with its type, default and help."""
    hints = typing.get_type_hints(cls)
    lines = [f"config keys ({cls.__name__}); set in the YAML file or as key=value:"]
    for f in dataclasses.fields(cls):
        if keys is not None and f.name not in keys:
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "(required)")
        type_name = getattr(hints[f.name], "__name__", str(hints[f.name]).replace("typing.", ""))
        lines.append(f"  {f.name}={default!r}  [{type_name}]\n      {f.metadata.get('help', '')}")
    return "\n".join(lines)


# ---------------------------------------------------------------- the command-line dialect

OVERRIDE_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*=.*", re.S)
_TRUTH = ("true", "false", "yes", "no", "on", "off", "1", "0")


def _flag_overrides(cls: type, argv: list[str]) -> list[str]:
    """Flag spellings of config keys, read as key=value: `--batch-size 8` or `--batch-size=8` is batch_size=8,
    a bare `--ablate-audio` on a true/false key is ablate_audio=true. Anything else is left for argparse."""
    hints = typing.get_type_hints(cls)
    out, i = [], 0
    while i < len(argv):
        token = argv[i]
        name, sep, value = token[2:].partition("=")
        key = name.replace("-", "_")
        if not token.startswith("--") or key not in hints or key == "config":
            out.append(token)
        elif sep:
            out.append(f"{key}={value}")
        elif hints[key] is bool:
            following = argv[i + 1] if i + 1 < len(argv) else ""
            take = following.lower() in _TRUTH  # `--lora false` as well as a bare `--ablate-audio`
            out.append(f"{key}={following if take else 'true'}")
            i += take
        elif i + 1 < len(argv):
            out.append(f"{key}={argv[i + 1]}")
            i += 1
        else:
            raise UserError(f"{token}: expected a value ({key}=VALUE)")
        i += 1
    return out


def parse_command(cls: type[T], argv: list[str], prog: str, description: str = "", usage: str | None = None,
                  keys: tuple[str, ...] | None = None, positional: str | None = None,
                  setup: Any = None) -> tuple[T, Any]:
    """Every command's dialect: `[--config FILE] [key=value ...]` over the dataclass `cls`, defaults declared
    once, in it; `--help` lists its keys (`keys`: only those). `--key VALUE` and a bare `--flag` are read as
    key=value too, so flag spellings like `--batch-size 8` keep working. A bare argument sets the key
    `positional` (e.g. prepare's INPUT). `setup(parser)` adds the command's own flags (`--fresh`, ...).
    Returns the config and the parsed flags."""
    import argparse

    parser = argparse.ArgumentParser(
        prog=prog, usage=usage, formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(description + "\n\n" if description else "")
        + "Keys are set in a YAML file (--config), as key=value, or as --key VALUE (a true/false key also as a bare "
          "--key); key=value arguments override the file.",
        epilog=config_help(cls, keys))
    parser.add_argument("--config", metavar="FILE", help="YAML file of config keys")
    if setup is not None:
        setup(parser)
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_intermixed_args(_flag_overrides(cls, argv))
    bare = [item for item in args.overrides if not OVERRIDE_RE.fullmatch(item)]
    if bare and (positional is None or len(bare) > 1):
        raise UserError(f"{bare[-1]!r}: expected key=value" + (f" (only one {positional.upper()})" if positional else ""))
    args.overrides = [f"{positional}={b}" for b in bare] + [o for o in args.overrides if o not in bare]
    return load_config(cls, args.config, args.overrides), args
