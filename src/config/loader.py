"""Load a run's configuration: schema defaults < `__base__` chain < the file < `key=value` overrides.

Every layer is checked against the schema before it is merged, so an unknown key is reported with
the file (or the command line) that wrote it. Nothing here builds a component or touches the disk
beyond reading YAML.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from src.arguments import NO_FIT, conform
from src.config.schema import (
    ALIASES,
    CHOICES,
    COMPONENT_SECTIONS,
    PRECISIONS,
    RANGES,
    TEMPLATE_KEYS,
    RootConfig,
)
from src.errors import ConfigError, did_you_mean

CLI = "the command line"


class _Loader(yaml.SafeLoader):
    """Safe YAML that also reads `1e-4` as a float (YAML 1.1 alone would make it a string)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*)?(?:\.\d*)?[eE][-+]?\d+$|^[-+]?\d[\d_]*\.\d*$|^[-+]?\.\d+$"),
    list("-+0123456789."),
)


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """The validated, merged configuration of `path` with `overrides` applied."""
    cfg, _ = load_config_with_sources(path, overrides)
    return cfg


def load_config_with_sources(
    path: str | Path, overrides: list[str] | tuple[str, ...] = ()
) -> tuple[DictConfig, dict[str, str]]:
    """Like `load_config`, plus which file (or the command line) set each leaf key."""
    path = Path(path)
    merged: dict[str, Any] = dataclasses.asdict(RootConfig())
    sources = {key: "default" for key in _leaves(merged)}
    files = _file_layers(path, ())
    layers = [*files, (check_run_dir(parse_overrides(overrides), path, files), CLI)]
    for layer, origin in layers:
        layer = _normalise(layer, origin)
        check_keys(layer, origin)
        _merge(merged, layer)
        for key in _leaves(layer):
            parts = key.split(".")
            for depth in range(1, len(parts) + 1):  # `tag=a: b` sets tag.a; an error about 'tag' names it too
                sources[".".join(parts[:depth])] = origin
    _check_interpolations(merged, sources)
    check_values(merged, sources)
    _check_privacy_intent(merged, sources, ["default", *(origin for _, origin in layers)])
    return OmegaConf.create(merged), sources


def _check_privacy_intent(cfg: dict[str, Any], sources: dict[str, str], order: list[str]) -> None:
    """A privacy setting written after the layer that last set `enabled: false` means privacy was wanted.

    Training without it while the user believes the run is private is the one outcome worse than a
    refusal. An explicit `enabled: false` in the same layer (or a later one) is a deliberate choice,
    which is how the template's own defaults and a saved run's config.yaml write the section.
    """
    privacy = cfg["training"]["privacy"]
    if privacy.get("enabled"):
        return
    rank = {origin: i for i, origin in enumerate(order)}  # later layers rank higher
    enabled_at = rank.get(sources.get("training.privacy.enabled", "default"), 0)
    for key in privacy:
        name = f"training.privacy.{key}"
        origin = sources.get(name, "default")
        if key != "enabled" and rank.get(origin, 0) > enabled_at:
            raise ConfigError(
                f"'{name}' is set (in {origin}) but training.privacy.enabled is not true: the run would train "
                "without differential privacy; add training.privacy.enabled=true, or write "
                "training.privacy.enabled: false beside it to train without privacy on purpose"
            )


def _check_interpolations(merged: dict[str, Any], sources: dict[str, str]) -> None:
    """Resolve `${...}` interpolations once now, so a broken one is a config error, not a crash mid-run."""
    from omegaconf.errors import OmegaConfBaseException

    try:
        OmegaConf.to_container(OmegaConf.create(merged), resolve=True)
    except OmegaConfBaseException as err:
        key = str(getattr(err, "full_key", "") or "?")
        reason = str(getattr(err, "msg", "") or err).splitlines()[0]
        raise ConfigError(
            f"cannot resolve '{key}' (from {sources.get(key, 'default')}): {reason}; "
            "fix the ${...} interpolation, or quote a literal '$' as '\\${'"
        ) from None


def check_run_dir(cli: dict[str, Any], path: Path, files: list[tuple[dict[str, Any], str]]) -> dict[str, Any]:
    """`run_dir` marks a run's own saved config.yaml: running that file resumes the run in place.

    Set anywhere else it would turn a folder of the user's (and the user's own config file) into a
    result directory, so it counts only in the one file run, when that file has no `__base__`
    (a saved config is self-contained) and sits in a result directory; a `__base__` (say, another
    run's config.yaml reused as a starting point) lends its settings, never its location.
    Returns `cli`, checked.
    """
    resume = "resume a run with python train.py <run>/config.yaml, or start a new one elsewhere with output=<folder>"
    if "run_dir" in cli:
        raise ConfigError(f"run_dir cannot be set on the command line: the template writes it into a run's own "
                          f"config.yaml; {resume}")  # fmt: skip
    for layer, _ in files[:-1]:
        layer.pop("run_dir", None)
    top = files[-1][0]
    if top.get("run_dir") and (len(files) > 1 or not is_result_dir(path.parent)):
        raise ConfigError(
            f"{path} sets run_dir, but only a run's own config.yaml in its result directory may (this folder has "
            f"no train.log, metrics.jsonl or checkpoints/); delete the run_dir line to start a new run from this "
            f"file, or {resume}"
        )
    return cli


def is_result_dir(folder: Path) -> bool:
    """Whether `folder` holds a run's files: a train.log, a metrics.jsonl or a checkpoints/ folder."""
    return any((folder / name).exists() for name in ("train.log", "metrics.jsonl", "checkpoints"))


def parse_overrides(overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """`a.b=1 c=[1,2]` -> nested dict, values parsed as YAML (so `1e-3` is a float, `0,1` a string)."""
    result: dict[str, Any] = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part.isidentifier() for part in key.split(".")):
            raise ConfigError(f"malformed override '{item}': write key=value, e.g. optimizer.lr=0.01")
        try:
            value = yaml.load(text, Loader=_Loader) if text.strip() else ""
        except yaml.YAMLError as err:
            hint = "" if _refused_tag(err) else "; quote text, e.g. 'tag=\"a: b\"'"
            raise ConfigError(f"override {item!r}: {_yaml_problem(err)}{hint}") from None
        _refuse_cycles(value, f"override {item!r}", tuple(key.split(".")))
        if key == "tag" and value is not None and not isinstance(value, (str, dict, list)):
            value = text.strip()  # a tag is a name: `tag=1e3` stays "1e3", not 1000.0
        node = result
        *parents, leaf = key.split(".")
        if not parents and leaf in COMPONENT_SECTIONS and isinstance(value, str):
            value = {"name": value}  # `dataset=CIFAR10 dataset.root=data` in either order
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with another override of '{part}'")
        if isinstance(node.get(leaf), dict) and isinstance(value, dict):
            node[leaf].update(value)
        else:
            node[leaf] = value
    return result


def read_yaml(path: Path) -> dict[str, Any]:
    """A YAML file as a dict; a missing file or a syntax error is one line with the file and line."""
    if path.is_dir():
        inside = sorted(p.name for p in path.glob("*.y*ml"))
        if "config.yaml" in inside:  # a result directory: its config.yaml resumes the run
            inside.insert(0, "config.yaml")
        example = f", e.g. {path / inside[0]}" if inside else ""
        raise ConfigError(f"config path {path} is a directory, not a YAML file; pass a file{example}")
    if not path.is_file():
        near = ""
        if path.parent.is_dir():
            from src.errors import did_you_mean

            near = did_you_mean(path.name, [p.name for p in path.parent.glob("*.y*ml")])
        raise ConfigError(f"config file not found: {path}{near}")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read config file {path}: {err}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        kind = "unsafe YAML" if _refused_tag(err) else "YAML syntax error"
        raise ConfigError(f"{kind} in {where}: {_yaml_problem(err)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of keys, not {type(data).__name__}")
    _refuse_cycles(data, str(path))
    if data.get("tag") is not None and not isinstance(data["tag"], (str, dict, list)):
        raw = _raw_scalar(path.read_text(encoding="utf-8"), "tag")  # `tag: 1e3` stays "1e3"
        data["tag"] = data["tag"] if raw is None else raw
    return data


def _refuse_cycles(node: Any, origin: str, path: tuple[str, ...] = (), parents: tuple[int, ...] = ()) -> None:
    """A YAML alias inside the anchor it names (`m: &m {self: *m}`) is a cycle: refuse it before a
    merge or a copy recurses through it without end."""
    if not isinstance(node, (dict, list)):
        return
    if id(node) in parents:
        where = ".".join(path) or "the top level"
        raise ConfigError(
            f"recursive YAML anchor in {origin}: '{where}' refers to a mapping or list that contains it; "
            "a config is a tree: write the values out, or point the alias at a sibling"
        )
    items = node.items() if isinstance(node, dict) else enumerate(node)
    for key, value in items:
        _refuse_cycles(value, origin, (*path, str(key)), (*parents, id(node)))


def _raw_scalar(text: str, key: str) -> Any:
    """The text of a top-level key's scalar value as written, e.g. "1e3" rather than 1000.0."""
    root = yaml.compose(text, Loader=_Loader)
    for key_node, value_node in getattr(root, "value", []):
        if getattr(key_node, "value", None) == key and isinstance(value_node, yaml.ScalarNode):
            return value_node.value
    return None


def _file_layers(path: Path, chain: tuple[Path, ...]) -> list[tuple[dict[str, Any], str]]:
    """The file's `__base__` layers (oldest first) followed by the file itself."""
    path = path.resolve() if path.is_absolute() else path
    key = path.resolve()
    if key in chain:
        cycle = " -> ".join(str(p) for p in (*chain, key))
        raise ConfigError(f"cyclic __base__: {cycle}")
    data = read_yaml(path)
    if not data and not chain:  # an empty file given by the user would train the schema's defaults
        raise ConfigError(
            f"config file {path} is empty, which would train the built-in defaults; write your experiment "
            "in it (config/dummy.yaml is an example), or pass config/dummy.yaml"
        )
    layers: list[tuple[dict[str, Any], str]] = []
    for base in _file_names(data.pop("__base__", None), "__base__", path):
        base_path = path.parent / str(base)
        if not base_path.is_file():
            raise ConfigError(f"__base__ '{base}' in {path} not found (looked for {base_path})")
        layers += _file_layers(base_path, (*chain, key))
    layers.append((_expand_imports(data, path), str(path)))
    return layers


def _file_names(value: Any, key: str, path: Path) -> list[str]:
    """`__base__`/`__import__` as a list of file names: one name, or a list of names."""
    if value is None:
        return []
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(i, str) and i for i in items):
        raise ConfigError(f"{key} in {path} must be a file name or a list of file names, got {value!r}")
    return items


def _expand_imports(node: Any, path: Path, section: str | None = None) -> Any:
    """Replace `__import__: file` inside any mapping by that file's content, local keys winning."""
    if not isinstance(node, dict):
        return node
    node = {k: _expand_imports(v, path, k) for k, v in node.items()}
    imported = node.pop("__import__", None)
    if imported is None:
        return node
    result: dict[str, Any] = {}
    for item in _file_names(imported, "__import__", path):
        file = path.parent / str(item)
        if not file.is_file():
            raise ConfigError(f"__import__ '{item}' in {path} not found (looked for {file})")
        content = _expand_imports(read_yaml(file), file)
        if (
            section is not None and section in content
        ):  # a file holding `section: {...}` (maybe beside others)
            content = content[section]
        if not isinstance(content, dict):
            raise ConfigError(f"__import__ '{item}' in {path} must hold a mapping, got {content!r}")
        _merge(result, content)
    _merge(result, node)
    return result


def _normalise(layer: dict[str, Any], origin: str) -> dict[str, Any]:
    """Bare component names become `{name: ...}` and aliases move to their canonical key."""
    layer = copy.deepcopy(layer)
    for section in COMPONENT_SECTIONS:
        value = layer.get(section)
        if isinstance(value, str) or (value is None and section in layer and section == "lr_scheduler"):
            layer[section] = {"name": value}
        elif section in layer and not isinstance(value, dict):
            raise ConfigError(
                f"'{section}' in {origin} must be a name or a mapping with 'name', got {value!r}"
            )
    for alias, canonical in ALIASES.items():
        a_section, a_key = alias.split(".")
        if not isinstance(layer.get(a_section), dict) or a_key not in layer[a_section]:
            continue
        value = layer[a_section].pop(a_key)
        c_section, c_key = canonical.split(".")
        target = layer.setdefault(c_section, {})
        if c_key in target and target[c_key] != value:
            raise ConfigError(
                f"{origin} sets both '{alias}' ({value}) and '{canonical}' ({target[c_key]}); keep one"
            )
        target[c_key] = value
    return layer


def check_keys(layer: dict[str, Any], origin: str) -> None:
    """Refuse keys the schema does not know, naming the closest valid one."""
    _check_dataclass_keys(layer, RootConfig, "", origin)


def _check_dataclass_keys(layer: Mapping[str, Any], cls: type, prefix: str, origin: str) -> None:
    hints = typing.get_type_hints(cls)
    for key, value in layer.items():
        if key not in hints:
            valid = [prefix + k for k in hints]
            raise ConfigError(
                f"unknown key '{prefix}{key}' in {origin}{did_you_mean(prefix + str(key), valid)}"
            )
        if dataclasses.is_dataclass(hints[key]):
            if not isinstance(value, dict):
                raise ConfigError(f"'{prefix}{key}' in {origin} must be a mapping, got {value!r}")
            _check_dataclass_keys(value, hints[key], f"{prefix}{key}.", origin)
        elif key == "transform" and not prefix:
            if not isinstance(value, dict):
                raise ConfigError(f"'transform' in {origin} must map train/val/test to lists")
            for split, items in value.items():
                if split not in ("train", "val", "test"):
                    raise ConfigError(
                        f"unknown key 'transform.{split}' in {origin}{did_you_mean(str(split), ['train', 'val', 'test'])}"
                    )
                _check_transform_list(items, f"transform.{split}", origin)


def _check_transform_list(items: Any, key: str, origin: str) -> None:
    """A split's transforms: null, or a list of names and {name: ..., **kwargs} mappings."""
    if items is None:
        return
    if not isinstance(items, list):
        raise ConfigError(f"'{key}' in {origin} must be a list of transforms, got {items!r}")
    for item in items:
        name = item.get("name") if isinstance(item, dict) else item
        if not isinstance(name, str) or not name:
            raise ConfigError(
                f"'{key}' in {origin}: each transform is a name or {{name: ..., arguments}}, got {item!r}"
            )


def check_values(cfg: dict[str, Any], sources: dict[str, str]) -> None:
    """Types, choices and ranges of the merged configuration."""
    _check_types(cfg, RootConfig, "", sources)
    for key, choices in CHOICES.items():
        value = _get(cfg, key)
        if value is None:
            continue
        text = str(value).lower()
        if text not in choices:
            raise ConfigError(
                f"invalid value {value!r} for '{key}' (from {sources.get(key, 'default')}); "
                f"choose one of: {', '.join(choices)}"
            )
    workers = _get(cfg, "dataloader.num_workers")
    if isinstance(workers, str) and workers.strip().lower() != "auto":
        raise ConfigError(
            f"invalid value {workers!r} for 'dataloader.num_workers' (from "
            f"{sources.get('dataloader.num_workers', 'default')}); use a number of workers or auto"
        )
    for key, (low, high, low_inclusive) in RANGES.items():
        value = _get(cfg, key)
        if value is None or isinstance(value, str):
            continue
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ConfigError(f"'{key}' must be a number, got {value!r} (from {sources.get(key, 'default')})")
        too_low = value < low if low_inclusive else value <= low
        if too_low or value > high:
            bound = f"{'>=' if low_inclusive else '>'} {_number(low)}" + (
                f" and <= {_number(high)}" if high != float("inf") else ""
            )
            raise ConfigError(f"'{key}' must be {bound}, got {value} (from {sources.get(key, 'default')})")
    _check_stop_signals(cfg["training"]["stop_signals"], sources.get("training.stop_signals", "default"))
    for section, keys in TEMPLATE_KEYS.items():
        for key, default in keys.items():
            value = cfg[section].get(key, default)
            if isinstance(default, bool) and not isinstance(value, bool):
                raise ConfigError(f"'{section}.{key}' must be true or false, got {value!r}")
    for section in COMPONENT_SECTIONS:
        name = cfg[section].get("name")
        if name is not None and not isinstance(name, str):
            raise ConfigError(
                f"'{section}.name' must be a registered name (a string), got {name!r} "
                f"(from {sources.get(section + '.name', 'default')})"
            )
    if not cfg["model"].get("name") or not cfg["dataset"].get("name"):
        raise ConfigError(
            "the config must name a model and a dataset, e.g. model: resnet18, dataset: CIFAR10"
        )


def _number(bound: float) -> str:
    """A range bound as a reader writes it: 4294967295, not 4.29497e+09."""
    return str(int(bound)) if float(bound).is_integer() and abs(bound) < 1e18 else f"{bound:g}"


def _check_stop_signals(names: list[Any], origin: str) -> None:
    """Each stop signal must exist and be catchable (SIGKILL and SIGSTOP never reach a handler)."""
    import signal

    for name in names:
        sig = getattr(signal, str(name).upper(), None) if str(name).upper().startswith("SIG") else None
        if not isinstance(sig, signal.Signals) or sig in (signal.SIGKILL, signal.SIGSTOP):
            caught = "cannot be caught, so no checkpoint could be saved on it"
            why = caught if isinstance(sig, signal.Signals) else "is not a signal"
            raise ConfigError(
                f"training.stop_signals: {name!r} (from {origin}) {why}; "
                "use catchable signals, e.g. [SIGTERM, SIGINT, SIGUSR1]"
            )


def _check_types(node: dict[str, Any], cls: type, prefix: str, sources: dict[str, str]) -> None:
    for key, hint in typing.get_type_hints(cls).items():
        value, name = node.get(key), prefix + key
        if dataclasses.is_dataclass(hint):
            _check_types(value, hint, name + ".", sources)
            continue
        fixed = conform(value, hint, "coerce")  # made to fit where that is lossless (1 -> 1.0, 16 -> "16")
        if fixed is NO_FIT:
            expected = _type_name(hint)
            raise ConfigError(
                f"'{name}' must be {expected}, got {value!r} (from {sources.get(name, 'default')})"
            )
        bounded = RANGES.get(name, (0, float("inf")))[1] != float("inf")  # its range names the limit itself
        if isinstance(fixed, int) and not bounded and not -(2**63) <= fixed < 2**63:  # torch counts in int64
            raise ConfigError(
                f"'{name}' is too large: {fixed} (from {sources.get(name, 'default')}) does not fit in 64 bits"
            )
        node[key] = fixed


def _type_name(hint: Any) -> str:
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is list:
        return "a list"
    if args:
        return " or ".join(names.get(a, getattr(a, "__name__", str(a))) for a in args) + " or null"
    return names.get(hint, str(hint))


def _merge(base: dict[str, Any], layer: Mapping[str, Any]) -> None:
    """Deep-merge `layer` into `base`; a component whose name changes drops the old arguments."""
    for key, value in layer.items():
        old = base.get(key)
        renamed = isinstance(value, dict) and "name" in value and value["name"] != (old or {}).get("name")
        if key in COMPONENT_SECTIONS and isinstance(old, dict) and renamed:
            kept = {k: v for k, v in old.items() if k in TEMPLATE_KEYS[key]}
            base[key] = kept
            old = kept
        if isinstance(old, dict) and isinstance(value, dict):
            _merge(old, value)
        else:
            base[key] = copy.deepcopy(value)


def _leaves(node: Mapping[str, Any], prefix: str = "") -> list[str]:
    keys: list[str] = []
    for key, value in node.items():
        if isinstance(value, dict) and value:
            keys += _leaves(value, f"{prefix}{key}.")
        else:
            keys.append(f"{prefix}{key}")
    return keys


def _get(cfg: Mapping[str, Any], dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _refused_tag(err: yaml.YAMLError) -> bool:
    """A `!!python/...` (or other unknown) tag that safe loading will not construct."""
    return isinstance(err, yaml.constructor.ConstructorError) and "constructor for the tag" in str(
        err.problem
    )


def _yaml_problem(err: yaml.YAMLError) -> str:
    """What went wrong in a YAML text, without PyYAML's multi-line excerpt of it."""
    if not isinstance(err, yaml.MarkedYAMLError):
        return " ".join(str(err).split())[:200]
    problem = str(err.problem or err.context or "invalid YAML")
    if _refused_tag(err):
        tag = problem.split("tag", 1)[1].strip(" '").replace("tag:yaml.org,2002:", "!!")
        return (
            f"the tag '{tag}' is refused: configs are plain data (no Python objects) and load with safe YAML"
        )
    if err.context and err.problem:
        at = f" at line {err.context_mark.line + 1}" if err.context_mark else ""
        problem = f"{problem} ({err.context}{at})"
    return " ".join(problem.split())


def normalise_precision(value: str | None) -> str | None:
    return None if value is None else PRECISIONS[str(value).lower()]
