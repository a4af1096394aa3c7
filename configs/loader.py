"""Building configs from dicts, YAML presets and key=value overrides, with checked keys and types.

A preset is a YAML file in this folder (or any path). Its top level is a RunConfig: ``model:`` (a mapping
with ``family:`` naming the model family), ``mesh:`` and the run's own fields. ``base: other_preset`` at
the top level deep-merges this file over another preset. Overrides are ``dotted.key=value`` strings whose
values are read as YAML 1.2 scalars (``parse_value``: 010 is ten, *.py a string), e.g.
``model.hidden_size=64 mesh.data=2 mesh.rules.d_inner=[tensor]``; a file's plain scalars read the same way.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml

from configs.schema import MODEL_CONFIGS, ConfigError, RunConfig

PRESET_DIR = Path(__file__).resolve().parent


def _nearest(name: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else f"; valid keys: {sorted(candidates)}"


def _describe(hint: Any) -> str:
    """A type hint in a message's words: int | Literal['auto'] | None is "an integer, 'auto' or null"."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        words = [_describe(option) for option in typing.get_args(hint)]
        return ", ".join(words[:-1]) + " or " + words[-1]
    if origin is Literal:
        return " or ".join(repr(value) for value in typing.get_args(hint))
    if origin in (list, tuple):
        return "a list"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null"}
    return names.get(hint, f"a mapping for {hint.__name__}" if dataclasses.is_dataclass(hint) else str(hint))


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Checks (and where lossless, converts) a value against a type hint; raises naming the key."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"config field {key!r}: expected {_describe(hint)}, got {value!r}")
    if origin is Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            raise ConfigError(f"config field {key!r}: expected one of {list(allowed)}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config field {key!r}: expected a list, got {value!r}")
        (item_hint, *_) = typing.get_args(hint) or (Any,)
        items = [_coerce(v, item_hint, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config field {key!r}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"config field {key!r}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"config field {key!r}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"config field {key!r}: expected a string, got {value!r}")
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"config field {key!r}: expected a mapping for {hint.__name__}, got {value!r}")
        return from_dict(hint, value, prefix=f"{key}.")
    return value


def from_dict(cls: type, data: Mapping[str, Any], prefix: str = "") -> Any:
    """Builds dataclass ``cls`` from a mapping; unknown keys fail naming the nearest valid key."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"config section {prefix.rstrip('.') or '<root>'!r}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if cls is RunConfig and key == "model":  # a mapping, or a model config already built (replace)
            kwargs["model"] = (value if type(value) in MODEL_CONFIGS.values() else
                               model_config_from_dict(value, prefix=f"{prefix}model."))
            continue
        if key == "family" and cls in MODEL_CONFIGS.values():
            if value != cls.family:
                raise ConfigError(f"config field {prefix}family: expected {cls.family!r}, got {value!r}")
            continue
        if key not in names:
            raise ConfigError(f"unknown config key {prefix + key!r}{_nearest(key, names)}")
        kwargs[key] = _coerce(value, hints[key], prefix + key)
    try:
        return cls(**kwargs)
    except ConfigError as err:
        if prefix and "config field '" in str(err):
            raise ConfigError(str(err).replace("config field '", f"config field '{prefix}", 1)) from None
        raise


def model_config_from_dict(data: Mapping[str, Any], prefix: str = "model.") -> Any:
    if not isinstance(data, Mapping):
        raise ConfigError(f"config section {prefix.rstrip('.')!r}: expected a mapping, got {data!r}")
    family = data.get("family")
    if family not in MODEL_CONFIGS:
        raise ConfigError(
            f"config field {prefix}family: expected one of {sorted(MODEL_CONFIGS)}, got {family!r}"
            + (_nearest(str(family), list(MODEL_CONFIGS)) if isinstance(family, str) else ""))
    return from_dict(MODEL_CONFIGS[family], data, prefix=prefix)


def to_dict(config: Any) -> dict[str, Any]:
    """A plain dict (YAML/JSON-ready: tuples as lists) that ``from_dict`` turns back into an equal config; derived
    fields hold their values (dump_config writes them null)."""
    out: dict[str, Any] = {}
    if type(config) in MODEL_CONFIGS.values():
        out["family"] = config.family
    for f in dataclasses.fields(config):
        if not f.init:  # bookkeeping such as FalconConfig.derived, not a setting
            continue
        value = getattr(config, f.name)
        out[f.name] = (to_dict(value) if dataclasses.is_dataclass(value) else
                       list(value) if isinstance(value, tuple) else value)
    return out


def dump_config(config: Any) -> str:
    """YAML text that load_config / load_preset_dict read back as ``config``: the run's config.yaml. The model
    fields the config derived from others (``derived``: intermediate_size, time_step_rank, ffn_hidden_size,
    num_kv_heads... left null) are written null, their value in a comment: a file that takes this one as its
    ``base:``, or an override, changing hidden_size derives them anew, as it would over the preset (written as
    values, they kept the old model's sizes). A field set explicitly is written as its value and stays set."""
    data = to_dict(config)
    is_run = isinstance(config, RunConfig)
    model, section = (config.model, data["model"]) if is_run else (config, data)
    values = {}
    if type(model) in MODEL_CONFIGS.values():
        for name in model.derived:
            values[name], section[name] = section[name], None
    indent = "  " if is_run else ""
    lines, top = [], None
    for line in yaml.dump(data, Dumper=_Yaml12Dumper, sort_keys=False).splitlines():
        top = line.partition(":")[0] if not line.startswith(" ") else top
        name = line[len(indent):].partition(":")[0]
        if (top == "model" or not is_run) and line == f"{indent}{name}: null" and values.get(name) is not None:
            line += f"  # derived: {values[name]}"
        lines.append(line)
    return "\n".join(lines) + "\n"


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _preset_path(name_or_path: str | Path) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        return path
    candidate = PRESET_DIR / f"{name_or_path}.yaml"
    if not candidate.is_file():
        raise ConfigError(f"unknown preset {str(name_or_path)!r}{_nearest(str(name_or_path), list_presets())}")
    return candidate


def _deep_merge(base: dict, top: Mapping) -> dict:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _deep_merge(dict(merged[key]), value)
        else:
            merged[key] = value
    return merged


def _yaml_problem(err: yaml.YAMLError) -> str:
    """yaml's error on one line: what is wrong and where (line and column, 1-based)."""
    if not isinstance(err, yaml.MarkedYAMLError) or err.problem_mark is None:
        return " ".join(str(err).split())
    mark = err.problem_mark
    context = f"{err.context}: " if err.context else ""
    return f"{context}{err.problem} at line {mark.line + 1}, column {mark.column + 1}"


_INT = re.compile(r"[-+]?[0-9]+(_[0-9]+)*")
_FLOAT = re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?|[-+]?\.(inf|Inf|INF)|\.(nan|NaN|NAN)")
_WORDS = {"~": None, "null": None, "Null": None, "NULL": None, "true": True, "True": True, "TRUE": True,
          "false": False, "False": False, "FALSE": False}


class _RepeatedKey(Exception):
    """A key written twice in one YAML mapping."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key repeated in one mapping: safe_load keeps the last one silently, so a
    second ``model:`` section replaced the first whole and ``hidden_size: 64`` written twice kept the later one.
    Keys a ``<<`` merge brings in may still be overridden (that is what a merge is for)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
            try:
                if key in first:
                    raise _RepeatedKey(f"each key once in a mapping, got {key!r} at line {first[key]} and again at "
                                       f"line {line}")
                first[key] = line
            except TypeError:  # an unhashable key: SafeLoader's own error names it
                continue
        return super().construct_mapping(node, deep=deep)


def _yaml12_scalars(loader: type[yaml.SafeLoader] | type[yaml.SafeDumper]) -> None:
    """Plain scalars in files read as in overrides (parse_value), YAML 1.2's way: SafeLoader keeps YAML 1.1's, so
    ``seed: 010`` was 8 in a file and 10 on the command line, ``1:30`` was 90, ``yes`` / ``off`` booleans and
    ``1e-5`` a string. A dumper given the same resolvers quotes the strings they would read otherwise."""
    replaced = {"tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"}
    loader.yaml_implicit_resolvers = {first: [(tag, regexp) for tag, regexp in resolvers if tag not in replaced]
                                      for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    words = "|".join(re.escape(word) for word, value in _WORDS.items() if isinstance(value, bool))
    for tag, pattern, first in (("bool", words, "tTfF"), ("int", _INT.pattern, "-+0123456789"),
                                ("float", _FLOAT.pattern, "-+0123456789.")):
        loader.add_implicit_resolver(f"tag:yaml.org,2002:{tag}", re.compile(f"(?:{pattern})$"), list(first))
    if issubclass(loader, yaml.SafeDumper):
        return
    loader.add_constructor("tag:yaml.org,2002:int",
                           lambda self, node: parse_value(self.construct_scalar(node), node.value))
    loader.add_constructor("tag:yaml.org,2002:float",
                           lambda self, node: parse_value(self.construct_scalar(node), node.value))


class _Yaml12Dumper(yaml.SafeDumper):
    """yaml.SafeDumper whose plain scalars _UniqueKeyLoader reads back as written, and which writes a value shared
    by several fields (mesh.rules' axis lists) in full each time, not as an anchor (&id001) and its aliases."""

    def ignore_aliases(self, data):
        return True


_yaml12_scalars(_UniqueKeyLoader)
_yaml12_scalars(_Yaml12Dumper)


def load_preset_dict(name_or_path: str | Path, _seen: tuple[str, ...] = ()) -> dict[str, Any]:
    path = _preset_path(name_or_path)
    if str(path) in _seen:
        raise ConfigError(f"preset {str(path)!r}: 'base' chain loops through {list(_seen)}")
    with open(path) as fh:
        try:
            data = yaml.load(fh, Loader=_UniqueKeyLoader)  # safe, YAML 1.2 scalars, repeated keys refused
        except _RepeatedKey as err:
            raise ConfigError(f"preset {str(path)!r}: expected {err}") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"preset {str(path)!r}: expected YAML, got {_yaml_problem(err)}") from None
    if data is None:  # a config.yaml cut to 0 bytes read as every default (hidden_size 4096...)
        raise ConfigError(f"preset {str(path)!r}: expected a mapping at the top level, got an empty document "
                          "(write {} for every default)")
    if not isinstance(data, dict):
        raise ConfigError(f"preset {str(path)!r}: expected a mapping at the top level, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is not None:  # a preset name, or a path relative to this file (else to the working directory)
        beside = path.parent / str(base)
        data = _deep_merge(load_preset_dict(beside if beside.is_file() else base, _seen + (str(path),)), data)
    return data


def parse_value(raw: str, item: str) -> Any:
    """An override's value, as YAML 1.2 reads a scalar: decimal integers (010 is 10, not YAML 1.1's octal 8;
    1:30 a string, not base-60 90), floats, null, true / false, anything else a string (*.py included);
    a value opening with [ { " ' is YAML (lists, mappings, quoted strings)."""
    if raw[:1] in ('[', '{', '"', "'"):
        try:
            return yaml.load(raw, Loader=_UniqueKeyLoader)
        except _RepeatedKey as err:
            raise ConfigError(f"override {item!r}: expected {err}") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: expected a YAML list, mapping or quoted string, got {raw!r} "
                              f"({str(err).splitlines()[0]})") from None
    if _INT.fullmatch(raw):
        return int(raw.replace("_", ""))
    if _FLOAT.fullmatch(raw):
        text = raw.lower()
        return float(text.replace(".", "", 1) if text.lstrip("+-") in (".inf", ".nan") else raw)
    return _WORDS.get(raw, raw)


def parse_overrides(overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """['a.b=1', 'c=x'] -> {'a': {'b': 1}, 'c': 'x'}; values read by parse_value. Later overrides win; a mapping
    value merges into the section earlier ones set."""
    nested: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        if not key:
            raise ConfigError(f"override {item!r}: empty key")
        parts = key.split(".")
        if "" in parts:  # 'model..hidden_size' was reported as an unknown key 'model.'
            raise ConfigError(f"override {item!r}: expected a dotted key of non-empty names (model.hidden_size), "
                              f"got {key!r}")
        value = parse_value(raw, item)
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is set both as a value and as a section")
        last = parts[-1]
        # a mapping deep-merges over what earlier overrides set there, as every override merges over the preset
        # (model.hidden_size=64 then model={num_hidden_layers: 2} dropped the hidden_size)
        both = isinstance(value, Mapping) and isinstance(node.get(last), dict)
        node[last] = _deep_merge(node[last], value) if both else value
    return nested


def load_config(name_or_path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """A RunConfig from a preset name or YAML path, with key=value overrides applied on top."""
    data = _deep_merge(load_preset_dict(name_or_path), parse_overrides(overrides))
    return from_dict(RunConfig, data)


def load_model_config(name_or_path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Any:
    """The model part of a preset; overrides are model keys (``hidden_size=64``)."""
    data = load_preset_dict(name_or_path)
    model = data.get("model", data)
    return model_config_from_dict(_deep_merge(dict(model), parse_overrides(overrides)))


def replace(config: Any, **changes: Any) -> Any:
    """dataclasses.replace with the same key checks and nearest-name messages as the loader. Fields the config
    derived from others (FalconConfig's num_kv_heads, ffn_hidden_size, ... left None) are derived again from the
    changed ones, unless changed themselves."""
    data = to_dict(config)
    for key in changes:
        if key not in data:
            raise ConfigError(f"unknown config key {key!r}{_nearest(key, list(data))}")
    data.update({name: None for name in getattr(config, "derived", ())})
    data.update(changes)
    if type(config) in MODEL_CONFIGS.values():
        return model_config_from_dict(data, prefix="")
    return from_dict(type(config), data)
