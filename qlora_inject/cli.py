"""The `qlora-inject` command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qlora-inject", description="LoRA adapters for quantized models.")
    commands = parser.add_subparsers(dest="command", required=True)
    quick = commands.add_parser(
        "quickstart", help="the seed's LoraModel script on a built-in tiny 4-bit Llama, then a short training run")
    quick.add_argument("--steps", type=int, default=60, help="training steps (default: 60)")
    quick.add_argument("--output", type=Path, default=Path("runs/quickstart"), help="where to save the adapter")
    quick.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "quickstart":
        if args.steps < 1:
            print(f"qlora-inject: error: --steps {args.steps} must be at least 1", file=sys.stderr)
            return 2
        from qlora_inject.quickstart import run

        losses = run(steps=args.steps, output=args.output, seed=args.seed)
        return 0 if losses[-1] < losses[0] else 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
