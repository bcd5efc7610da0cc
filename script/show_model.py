"""Print a config's model as a tree of layers with their parameter counts.

    python script/show_model.py CONFIG [key=value ...] [--depth N]

The model is built as train.py builds it, so `model.*` overrides apply. The class count comes from
model.num_classes or evaluator.num_classes when given, else from the train split of the dataset.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def num_classes(cfg) -> int | None:
    from src.data import build_dataset
    from src.engine.build import num_classes_of
    from src.errors import ConfigError

    given = cfg.model.get("num_classes") or cfg.evaluator.get("num_classes")
    if given:
        return int(given)
    try:
        dataset = build_dataset(cfg.dataset, split="train", transform=None)
    except Exception as err:
        raise ConfigError(
            f"could not load dataset '{cfg.dataset.name}' to count its classes ({type(err).__name__}: {err}); "
            "add model.num_classes=N"
        ) from None
    return num_classes_of(cfg, dataset)


def count(module, trainable_only: bool = False) -> int:
    """Parameters of a module and its children; a tensor shared by two layers counts once."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def rows(model, depth: int) -> list[tuple[str, str, int, int]]:
    """(indented name, class, parameters, trainable) for every module down to `depth` (0: all)."""
    out = []
    for name, module in model.named_modules():
        level = name.count(".") + 1 if name else 0
        if depth and level > depth:
            continue
        label = "  " * level + (name.rsplit(".", 1)[-1] if name else "(model)")
        out.append((label, type(module).__name__, count(module), count(module, trainable_only=True)))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*", help="key=value settings, as for train.py")
    parser.add_argument("--depth", type=int, default=3, help="levels of sub-modules to list; 0 lists all")
    args = parser.parse_intermixed_args()

    import src  # noqa: F401  (registers the built-in components)
    from src.config import load_config
    from src.errors import TemplateError
    from src.models.build import build_model
    from src.user_modules import import_user_modules

    try:
        cfg = load_config(args.config, args.overrides)
        import_user_modules(list(cfg.imports))
        privacy = (cfg.get("training") or {}).get("privacy")
        model = build_model(cfg.model, num_classes(cfg), privacy=privacy)
    except TemplateError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code

    table = rows(model, args.depth)
    width = max(len(r[0]) for r in table)
    kind = max(len(r[1]) for r in table)
    print(f"{'layer'.ljust(width)}  {'type'.ljust(kind)}  {'params':>13}  {'trainable':>13}")
    for label, cls, params, trainable in table:
        mark = "  frozen" if params and not trainable else "  partly frozen" if trainable < params else ""
        print(f"{label.ljust(width)}  {cls.ljust(kind)}  {params:>13,}  {trainable:>13,}{mark}")
    total, trainable = count(model), count(model, trainable_only=True)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    size += sum(b.numel() * b.element_size() for b in model.buffers())
    print(f"\nmodel: {cfg.model.name} ({type(model).__module__}.{type(model).__name__})")
    print(f"total parameters: {total:,}")
    print(f"trainable parameters: {trainable:,} (frozen {total - trainable:,})")
    print(f"size of parameters and buffers: {size / 2**20:.2f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
