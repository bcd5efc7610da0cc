"""List every registry and the names registered in it: python script/show_registers.py [--imports pkg ...]"""

import argparse
import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "registry", nargs="?", help="show only this registry (model, dataset, optimizer, ...)"
    )
    parser.add_argument("--imports", nargs="*", default=[], help="your modules that register components")
    args = parser.parse_args()
    import src

    for module in args.imports:
        importlib.import_module(module)
    if args.registry:
        from src.errors import did_you_mean

        valid = [getattr(src, attr).name for attr in src.REGISTRIES]
        if args.registry.lower() not in valid + [a.lower() for a in src.REGISTRIES]:
            print(
                f"error: no registry '{args.registry}'{did_you_mean(args.registry, valid)}; "
                f"choose one of: {', '.join(valid)}",
                file=sys.stderr,
            )
            return 2
    for attr in src.REGISTRIES:
        registry = getattr(src, attr)
        if args.registry and args.registry.lower() not in (registry.name, attr.lower()):
            continue
        print(f"{attr} ({len(registry)}):")
        names = registry.names()
        width = max(len(n) for n in names) + 2 if names else 0
        per_line = max(1, 100 // max(width, 1))
        for i in range(0, len(names), per_line):
            print("  " + "".join(n.ljust(width) for n in names[i : i + per_line]).rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
