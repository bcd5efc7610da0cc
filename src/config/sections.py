"""Config sections as plain Python: the one place that turns OmegaConf nodes into dicts and flat keys.

Builders, trackers and scripts all need a section as a plain dict (to compare, copy, pass as keyword
arguments or log); they call these instead of each unpacking OmegaConf in its own way. OmegaConf is
only touched when the value is one of its nodes, so importing this module stays cheap.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from src.config.schema import TEMPLATE_KEYS
from src.errors import ConfigError


def to_plain(node: Any) -> Any:
    """Plain dicts/lists (interpolations resolved) from an OmegaConf node; a mapping becomes a fresh dict.

    Anything else (a name, a number, a list, None) comes back unchanged.
    """
    if hasattr(node, "_metadata"):  # an OmegaConf DictConfig or ListConfig, without importing OmegaConf
        from omegaconf import OmegaConf

        return OmegaConf.to_container(node, resolve=True)
    if isinstance(node, Mapping):
        return dict(node)
    return node


def section_args(section: Any, what: str) -> dict[str, Any]:
    """A component section as a fresh dict: None is empty, a bare name is `{name: ...}`."""
    if section is None:
        return {}
    if isinstance(section, str):
        return {"name": section}
    plain = to_plain(section)
    if not isinstance(plain, dict):
        raise ConfigError(f"the {what} section must be a mapping with a 'name', got {section!r}")
    return plain


def component_args(section: Any, kind: str) -> dict[str, Any]:
    """A component section without the keys the template consumes itself (`freeze`, `compile`, ...)."""
    return {k: v for k, v in section_args(section, kind).items() if k not in TEMPLATE_KEYS[kind]}


def flatten(node: Mapping[str, Any], prefix: str = "", keep_empty: bool = True) -> dict[str, Any]:
    """`{a: {b: 1}}` -> `{"a.b": 1}`; an empty nested mapping stays a `{}` leaf unless `keep_empty` is off."""
    out: dict[str, Any] = {}
    for key, value in node.items():
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{prefix}{key}.", keep_empty))
        elif not isinstance(value, Mapping) or keep_empty:
            out[f"{prefix}{key}"] = value
    return out
