"""Print the resolved config of an experiment: python script/show_config.py CONFIG [key=value ...] [--sources]

--sources shows, beside each value, the file (or the command line, or the schema default) that set it.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--sources", action="store_true", help="show which file or override set each value")
    args = parser.parse_args()
    from omegaconf import OmegaConf

    from src.config import load_config_with_sources
    from src.config.sections import flatten, to_plain
    from src.errors import ConfigError

    try:
        cfg, sources = load_config_with_sources(args.config, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not args.sources:
        print(OmegaConf.to_yaml(cfg, resolve=True), end="")
        return 0
    flat = flatten(to_plain(cfg))
    width = max(len(k) for k in flat)
    for key, value in flat.items():
        print(f"{key.ljust(width)}  {value!s:<30}  # {sources.get(key, 'default')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
