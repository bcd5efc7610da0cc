"""Configuration: the schema of every fixed key and the loader that merges and checks the layers.

May import errors and arguments only: everything else reads its settings from here.
"""

from src.config.loader import load_config, load_config_with_sources, parse_overrides
from src.config.schema import COMPONENT_SECTIONS, TEMPLATE_KEYS, RootConfig

__all__ = [
    "COMPONENT_SECTIONS",
    "TEMPLATE_KEYS",
    "RootConfig",
    "load_config",
    "load_config_with_sources",
    "parse_overrides",
]
