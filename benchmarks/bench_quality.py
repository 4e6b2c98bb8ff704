"""Question: which format should I fine-tune in? The default job (SmolLM2-135M-Instruct on the date task)
in every format, scored the same way: what quantization cost, what the fine-tune reached, what a merge
keeps, how fast and in how much memory (see `qlora_inject/quality.py` for what each column measures).

    python benchmarks/bench_quality.py                         # every format, 30 steps each (10-15 min on 2 cores)
    python benchmarks/bench_quality.py --formats none,nf4 --steps 10

Writes quality.md, quality.png and quality.json into --output (default: benchmarks/results).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from qlora_inject.quality import QualityWorkload, benchmark, quality_formats


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--formats", default=",".join(quality_formats()), help="comma-separated (default: every one)")
    parser.add_argument("--steps", type=int, default=QualityWorkload.steps, help="training steps per format")
    parser.add_argument("--seed", type=int, default=QualityWorkload.seed)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads per run (default: torch's; 1 on a CPU other jobs share)")
    parser.add_argument("--parallel", type=int, default=1, help="formats run at once, each in its own process")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    workload = QualityWorkload(tuple(f.strip() for f in args.formats.split(",") if f.strip()), args.steps, args.seed,
                               threads=args.threads, parallel=args.parallel)
    print(benchmark(workload, args.output))
    print(f"\nwritten: {args.output / 'quality.md'}, {args.output / 'quality.png'}, {args.output / 'quality.json'}")


if __name__ == "__main__":
    main()
