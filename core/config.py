"""Strict dataclass <-> YAML machinery: the one config mechanism of train/, data/, parallel/ and the CLIs.

Every section of a recipe is a plain dataclass with a docstring under each field (torchtitan style); this
module turns YAML (and `dotted.key=value` overrides) into those dataclasses and guarantees, because a mistyped
key in a 72B recipe must fail on the laptop and not after the job waited a day in the queue:
- every key must name a field; otherwise a `ConfigError` names the key, the closest valid key ("did you
  mean ...?") and all valid keys of that section;
- every value is checked against the field's annotation (int, float, bool, str, Literal, Optional, list,
  tuple, dict, nested dataclasses, lists of dataclasses); a wrong type names the key, the expected type and
  the value; floats must be finite (NaN or inf anywhere is an error, never a silently disabled feature);
- after a dataclass is built, its own `__post_init__` / `validate()` checks run and their ValueError becomes a
  ConfigError naming the section;
- precedence is CLI override > recipe file(s) > dataclass defaults; recipes may list `base:` files that they
  extend (paths relative to the recipe), so recipes only select and override; a key written twice in one YAML
  mapping is an error (PyYAML would keep the last one silently);
- `${NAME}` / `${NAME:-default}` in string values expand from the environment (an unset variable without a
  default is an error naming it). A value that is exactly one reference is read like a YAML literal
  (`steps: ${STEPS}` gives an int). A value that references a credential-like variable (a name with KEY,
  SECRET, TOKEN, PASSWORD, CREDENTIAL or AUTH in it) is recorded, so a saved config writes the reference back
  instead of the value: secrets in the environment never land in config.yaml, while paths and sizes are saved
  as they were resolved (what the run really used);
- field documentation is read from the source with `ast`, for `--help-config` and the generated docs.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import difflib
import inspect
import math
import os
import re
import textwrap
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from core.cli import one_line


class ConfigError(ValueError):
    """A recipe, override or value that does not match the config schema (the message says what to change)."""


# ------------------------------------------------------------------------------------------ key errors
def suggest(key: str, valid: list[str]) -> str:
    """' (did you mean 'x'?)' for the closest valid key, or ''."""
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def unknown_key_error(path: str, key: str, valid: list[str]) -> ConfigError:
    where = f"section {path!r}" if path else "the top level"
    full = f"{path}.{key}" if path else key
    return ConfigError(f"unknown config key {full!r}{suggest(key, valid)}; valid keys in {where}: {', '.join(valid)}")


# ------------------------------------------------------------------------------------------ typing helpers
def type_name(tp: Any) -> str:
    """A short readable name of an annotation: 'int | null', "'fp32' | 'bf16'", 'list[str]'."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        args = ", ".join(type_name(a) for a in typing.get_args(tp))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def strip_optional(tp: Any) -> Any:
    """`X | None` -> X (anything else unchanged)."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _init_fields(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.init]


class EnvValue(str):
    """A string that came from an environment variable in full (`${NAME}`): a numeric or boolean field reads it
    like a YAML literal."""


def _literal(value: str) -> Any:
    try:
        return yaml.load(value, Loader=RecipeLoader) if value.strip() else value
    except yaml.YAMLError:
        return value


def coerce(value: Any, tp: Any, path: str) -> Any:
    """Check `value` against annotation `tp`, converting only where lossless (int -> float, list -> tuple).

    Raises ConfigError naming `path`, the expected type and the value.
    """
    origin = typing.get_origin(tp)
    if isinstance(value, EnvValue) and strip_optional(tp) in (int, float, bool):
        value = _literal(value)
    bad = ConfigError(f"{path}: expected {type_name(tp)}, got {value!r} ({type(value).__name__})")
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise bad
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(value, a, path)
            except ConfigError as e:
                errors.append(e)
        # A single non-None alternative: its own (more precise) message.
        if len(errors) == 1:
            raise errors[0]
        raise bad
    if origin is Literal:
        if value in typing.get_args(tp) and not (isinstance(value, bool) and not any(
                isinstance(a, bool) for a in typing.get_args(tp))):
            return value
        hint = suggest(str(value), [str(a) for a in typing.get_args(tp)])
        raise ConfigError(f"{path}: must be one of {type_name(tp)}, got {value!r}{hint}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise bad
        return from_dict(tp, value, path)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise bad
        args = typing.get_args(tp)
        if origin is tuple:
            if len(args) == 2 and args[1] is Ellipsis:
                return tuple(coerce(v, args[0], f"{path}[{i}]") for i, v in enumerate(value))
            if len(args) != len(value):
                raise ConfigError(f"{path}: expected {len(args)} values ({type_name(tp)}), got {list(value)!r}")
            return tuple(coerce(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        (elem,) = args or (Any,)
        return [coerce(v, elem, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise bad
        kt, vt = typing.get_args(tp) or (Any, Any)
        return {coerce(k, kt, f"{path}.<key>"): coerce(v, vt, f"{path}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
            return int(value)  # 1e6 in YAML is a float
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"{path}: must be a finite number, got {value!r}")
            return float(value)
        raise bad
    if tp is str:
        if isinstance(value, str):
            return str(value)
        raise bad
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise bad


def from_dict(cls: type, data: Mapping[str, Any], path: str = "") -> Any:
    """Build dataclass `cls` from a mapping, strictly: unknown keys and wrong types raise ConfigError, then the
    dataclass's own checks (`__post_init__`, `validate()`) run and their ValueError becomes a ConfigError."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path or 'config'}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = _init_fields(cls)
    for key in data:
        if key not in names:
            raise unknown_key_error(path, str(key), names)
    kwargs = {name: coerce(data[name], hints[name], f"{path}.{name}" if path else name)
              for name in names if name in data}
    try:
        obj = cls(**kwargs)
        if callable(getattr(obj, "validate", None)):
            obj.validate()
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        msg = str(e)
        raise ConfigError(msg if not path or msg.startswith(path) else f"{path}: {msg}") from e
    return obj


def to_dict(obj: Any) -> Any:
    """Dataclass -> plain YAML-able structures (tuples become lists; fields with init=False are left out)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, Mapping):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, str):
        return str(obj)
    return obj


# ------------------------------------------------------------------------------------------ YAML + overrides
class RecipeLoader(yaml.SafeLoader):
    """yaml.SafeLoader that reads 3e-4 / 1e6 as floats and rejects a key written twice in one mapping.

    NOTE: PyYAML implements YAML 1.1, where a float needs a dot (3.0e-4); '3e-4' would silently stay a string,
    and learning rates are written exactly like that.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                where = f"lines {seen[key] + 1} and {key_node.start_mark.line + 1} of {key_node.start_mark.name}"
                raise ConfigError(
                    f"key {key!r} appears twice in one mapping ({where}); YAML would keep only the last: merge them"
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*)?(?:\.\d*)?[eE][-+]?\d+$"),
    list("-+0123456789."),
)

_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_SECRET_NAME = re.compile(r"KEY|SECRET|TOKEN|PASSW|CREDENTIAL|AUTH", re.IGNORECASE)


def is_secret_name(name: str) -> bool:
    """Whether an environment variable's name says it holds a credential."""
    return _SECRET_NAME.search(name) is not None


def expand_env(value: Any, path: str = "", refs: dict[str, str] | None = None) -> Any:
    """Expand ${NAME} and ${NAME:-default} in every string of a nested structure.

    `refs` (when given) receives {dotted path: original string} for every value that references a credential-like
    variable, so the saved config can write the reference instead of the secret it expanded to."""
    if isinstance(value, str):
        if not _ENV.search(value):
            return value

        def sub(m: re.Match) -> str:
            name, default = m.group(1), m.group(2)
            if name in os.environ:
                return os.environ[name]
            if default is not None:
                return default
            raise ConfigError(f"{path}: environment variable {name} is not set (or write ${{{name}:-default}})")

        out = _ENV.sub(sub, value)
        if refs is not None and any(is_secret_name(m.group(1)) for m in _ENV.finditer(value)):
            refs[path] = value
        return EnvValue(out) if _ENV.fullmatch(value) else out
    if isinstance(value, Mapping):
        return {k: expand_env(v, f"{path}.{k}" if path else str(k), refs) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_env(v, f"{path}[{i}]", refs) for i, v in enumerate(value)]
    return value


_PATH_PART = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def restore_env_refs(data: Any, refs: Mapping[str, str]) -> Any:
    """A copy of the plain dict `data` with every value named in `refs` replaced by its ${...} reference."""
    out = copy.deepcopy(data)
    for path, ref in refs.items():
        parts = [int(m.group(2)) if m.group(2) is not None else m.group(1) for m in _PATH_PART.finditer(path)]
        node = out
        try:
            for p in parts[:-1]:
                node = node[p]
            if isinstance(node, (dict, list)):
                node[parts[-1]] = ref
        except (KeyError, IndexError, TypeError):
            continue  # a value the schema dropped or reshaped: nothing to hide there
    return out


def deep_merge(base: dict, over: Mapping) -> dict:
    """`over` wins; mappings merge recursively; lists and scalars are replaced."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def load_yaml(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict:
    """Read a recipe, resolving `base:` (a path or a list of paths, relative to the file) first."""
    p = Path(path).resolve()
    if p in _seen:
        raise ConfigError(f"recipe {p} includes itself through base: {' -> '.join(map(str, _seen))}")
    if not p.is_file():
        raise ConfigError(f"recipe file not found: {path} (working directory {Path.cwd()})")
    try:
        with open(p) as f:
            data = yaml.load(f, Loader=RecipeLoader) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {one_line(e)}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of sections, got {type(data).__name__}")
    bases = data.pop("base", None)
    merged: dict = {}
    for b in [bases] if isinstance(bases, str) else (bases or []):
        merged = deep_merge(merged, load_yaml(p.parent / b, _seen + (p,)))
    return deep_merge(merged, data)


def parse_override(item: str) -> tuple[list[str], Any]:
    """'optim.lr=3e-4' -> (['optim', 'lr'], 0.0003). The value is parsed as YAML ('null', lists, numbers)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like dotted.key=value (e.g. optim.lr=3e-4)")
    key, raw = item.split("=", 1)
    key = key.strip().removeprefix("--")
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r}: empty key part")
    try:
        value = yaml.load(raw, Loader=RecipeLoader) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: value is not valid YAML: {one_line(e)}") from e
    return key.split("."), value


def set_dotted(data: dict, parts: list[str], value: Any, schema: type, root: str = "") -> None:
    """data[parts[0]][parts[1]]... = value, in place. Keys are checked against `schema` as they are set (an
    unknown one names the key under `root`, the section `data` stands for); the value is checked when the dict
    is parsed (from_dict)."""
    cls: Any = schema
    node = data
    for i, part in enumerate(parts):
        prefix = ".".join([root, *parts[:i]] if root else parts[:i])
        if cls is not None and dataclasses.is_dataclass(cls):
            names = _init_fields(cls)
            if part not in names:
                raise unknown_key_error(prefix, part, names)
            tp = strip_optional(typing.get_type_hints(cls)[part])
            cls = tp if dataclasses.is_dataclass(tp) else None
        if i == len(parts) - 1:
            node[part] = value
        else:
            nxt = node.get(part)
            if not isinstance(nxt, dict):
                nxt = {}
                node[part] = nxt
            node = nxt


def apply_overrides(data: dict, overrides: list[str], schema: type) -> dict:
    """Apply CLI overrides onto a raw recipe dict. Keys are checked against `schema` as they are set, so a
    typo names the override itself rather than a later parse failure."""
    out = copy.deepcopy(data)
    for item in overrides:
        set_dotted(out, *parse_override(item), schema)
    return out


# ------------------------------------------------------------------------------------------ field docs
def field_docs(cls: type) -> dict[str, str]:
    """Docstrings written under each dataclass field (read from the class source with ast)."""
    try:
        src = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    tree = ast.parse(src)
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    docs: dict[str, str] = {}
    for prev, node in zip(body, body[1:]):
        if (
            isinstance(prev, ast.AnnAssign)
            and isinstance(prev.target, ast.Name)
            and isinstance(node, ast.Expr)
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
        ):
            docs[prev.target.id] = inspect.cleandoc(node.value.value)
    return docs


def iter_fields(cls: type, prefix: str = ""):
    """Yield (dotted_key, type_name, default_repr, doc, is_section) for every field, depth first."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        inner = strip_optional(tp)
        if dataclasses.is_dataclass(inner):
            yield key, inner.__name__, "", docs.get(f.name, ""), True
            yield from iter_fields(inner, key + ".")
            continue
        args = typing.get_args(inner)
        if typing.get_origin(inner) is list and args and dataclasses.is_dataclass(args[0]):
            # A list of sub-sections (e.g. data.datasets): document the element's fields as key[].field.
            yield key, type_name(tp), "[]", docs.get(f.name, ""), True
            yield from iter_fields(args[0], key + "[].")
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = "(required)"
        yield key, type_name(tp), repr(to_dict(default)), docs.get(f.name, ""), False
