"""Write a small raw/<class>/<image>.png tree from the synthetic dataset, for trying the workflows.

    python script/make_demo_images.py data/demo [--classes 3] [--per-class 20] [--size 8]

Images are SyntheticClassification items (a class prototype plus noise) saved as PNG, so a model
can learn them in an epoch or two on a CPU.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("root", type=Path, help="dataset folder; images go to <root>/raw/<class>/")
    parser.add_argument("--classes", type=int, default=3)
    parser.add_argument("--per-class", type=int, default=20)
    parser.add_argument("--size", type=int, default=8, help="image height and width in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--noise", type=float, default=1.5, help="noise around each class pattern; higher is harder"
    )
    args = parser.parse_args(argv)
    if args.classes < 1 or args.per_class < 1 or args.size < 1:
        print("error: --classes, --per-class and --size must be at least 1", file=sys.stderr)
        return 2

    import torch
    from torchvision.transforms.v2.functional import to_pil_image

    from src.data.datasets import SyntheticClassification

    data = SyntheticClassification(
        "train",
        num_classes=args.classes,
        input_shape=(3, args.size, args.size),
        train_size=args.classes * args.per_class,
        noise=args.noise,
        seed=args.seed,
    )
    raw = args.root / "raw"
    for index in range(len(data)):
        x, label = data[index]
        image = torch.sigmoid(x)  # any real value to (0, 1), keeping the class pattern
        folder = raw / data.classes[label]
        folder.mkdir(parents=True, exist_ok=True)
        to_pil_image(image).save(folder / f"{index:05d}.png")
    print(f"wrote {len(data)} images in {args.classes} classes under {raw}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
