"""Usage: compare.py RUN_A RUN_B [--same-step]. Exit 0 when both runs' last.pth hold identical
weights (torch.equal), else print the largest difference and exit 1."""

import sys
from pathlib import Path

import torch


def last(run: str) -> dict:
    return torch.load(Path(run) / "checkpoints" / "last.pth", map_location="cpu", weights_only=True)


def main() -> int:
    a, b = last(sys.argv[1]), last(sys.argv[2])
    if a["progress"]["global_step"] != b["progress"]["global_step"]:
        print(f"steps differ: {a['progress']['global_step']} vs {b['progress']['global_step']}")
        return 1
    worst = 0.0
    for key, tensor in a["model"].items():
        other = b["model"][key]
        if not torch.equal(tensor, other):
            worst = max(worst, (tensor.double() - other.double()).abs().max().item())
    if worst:
        print(f"max |dW| = {worst:.3g}")
        return 1
    print(f"{len(a['model'])} tensors identical at step {a['progress']['global_step']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
