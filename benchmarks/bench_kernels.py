"""Question: how fast is the fused LoRA linear per format at Llama-3.1-8B's linear shapes, and how much
of its time is dequantization?

Per format (dense, NF4, GPTQ 4-bit g128, AWQ 4-bit g128, HQQ 4-bit g64), shape (out × in) and token
count: the dequantization alone, the fused op's forward, and its forward + backward (input gradient
included, as inside a model), r = 16, bf16; TFLOP/s over the base matmuls (2·t·in·out forward,
4·t·in·out forward + backward) and the share of the forward spent dequantizing. The packed weights
are random codes in each format's layout, built here, so no quantization library is needed: the
timings are those of this library's kernels (Triton on CUDA; on CPU the numba kernels or the twins).

    python benchmarks/bench_kernels.py --output benchmarks/results/gpu          # the GPU sweep
    python benchmarks/bench_kernels.py --device cpu --shapes 256x128 --tokens 1,16 --dtype fp32
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import torch

from qlora_inject.bench import machine, markdown_table, median_seconds, plot_bars, save_report
from qlora_inject.kernels.dequant_4bit import dequantize_4bit
from qlora_inject.kernels.dequant_gptq import dequantize_awq_gemm, dequantize_gptq
from qlora_inject.kernels.dequant_hqq import dequantize_hqq
from qlora_inject.kernels.fused_lora import AdapterTerm, fused_lora_linear
from qlora_inject.kernels.workspace import scratch

LLAMA_8B_SHAPES = "4096x4096,1024x4096,14336x4096,4096x14336"                # (out x in): q/o, k/v, gate/up, down
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def random_dequantizer(fmt: str, out_features: int, in_features: int, dtype: torch.dtype,
                       device: torch.device) -> Callable[[], torch.Tensor]:
    """A `dequantize()` over random packed codes of `fmt`, writing into the shared scratch."""
    def words(*shape: int) -> torch.Tensor:
        return torch.randint(-2**31, 2**31 - 1, shape, dtype=torch.int32, device=device)

    numel = out_features * in_features
    if fmt == "dense":
        weight = torch.randn(out_features, in_features, dtype=dtype, device=device) / in_features**0.5
        return lambda: weight
    if fmt == "nf4":
        packed = torch.randint(0, 256, (numel // 2,), dtype=torch.uint8, device=device)
        absmax = torch.rand(numel // 64, device=device)
        code = torch.linspace(-1, 1, 16, device=device)
        return lambda: dequantize_4bit(packed, absmax, code, 64, (out_features, in_features), dtype,
                                       out=scratch(numel, dtype, device))
    if fmt == "gptq":
        qweight, qzeros = words(in_features // 8, out_features), words(in_features // 128, out_features // 8)
        scales = torch.rand(in_features // 128, out_features, device=device).to(dtype) * 0.01
        g_idx = torch.arange(in_features, device=device, dtype=torch.int32) // 128
        return lambda: dequantize_gptq(qweight, qzeros, scales, g_idx, 4, in_features, out_features,
                                       out=scratch(numel, dtype, device))
    if fmt == "awq":
        qweight, qzeros = words(in_features, out_features // 8), words(in_features // 128, out_features // 8)
        scales = torch.rand(in_features // 128, out_features, device=device).to(dtype) * 0.01
        return lambda: dequantize_awq_gemm(qweight, qzeros, scales, 4, 128, out_features, True,
                                           out=scratch(numel, dtype, device))
    if fmt == "hqq":
        rows = numel // 64
        packed = torch.randint(0, 256, (rows // 2, 64), dtype=torch.uint8, device=device)
        meta = {"packing": "4bit_u8", "axis": 1, "group_size": 64, "shape": (out_features, in_features),
                "compute_dtype": dtype, "zero": torch.rand(rows, 1, device=device).to(dtype) * 15,
                "scale": torch.rand(rows, 1, device=device).to(dtype) * 0.01}
        return lambda: dequantize_hqq(packed, meta, out=scratch(numel, dtype, device))
    raise ValueError(f"unknown format {fmt!r}; choose from dense, nf4, gptq, awq, hqq")


def measure(fmt: str, out_features: int, in_features: int, tokens: int, dtype: torch.dtype, device: torch.device,
            repeat: int) -> dict[str, float]:
    """Seconds for the dequantization, the fused forward and the fused forward + backward."""
    dequantize = random_dequantizer(fmt, out_features, in_features, dtype, device)
    A = (torch.randn(16, in_features, device=device) / in_features**0.5).requires_grad_(True)
    B = (torch.randn(out_features, 16, device=device) * 0.01).requires_grad_(True)
    x = torch.randn(tokens, in_features, dtype=dtype, device=device, requires_grad=True)
    grad = torch.randn(tokens, out_features, dtype=dtype, device=device)
    adapters = [(A, B, AdapterTerm(2.0))]

    def forward() -> torch.Tensor:
        return fused_lora_linear(x, None, dequantize, dtype, adapters, True)

    def train_step() -> None:
        x.grad = A.grad = B.grad = None
        forward().backward(grad)

    return {"dequant": median_seconds(lambda: dequantize(), repeat), "fwd": median_seconds(forward, repeat),
            "fwd_bwd": median_seconds(train_step, repeat)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="fused LoRA linear per format at Llama-3.1-8B shapes")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--formats", default="dense,nf4,gptq,awq,hqq")
    parser.add_argument("--shapes", default=LLAMA_8B_SHAPES, help="comma-separated OUTxIN")
    parser.add_argument("--tokens", default="1,16,256,2048,8192")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--output", type=Path, default=None, help="folder for kernels.md")
    args = parser.parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    torch.manual_seed(0)
    rows = []
    for shape in args.shapes.split(","):
        out_features, in_features = (int(v) for v in shape.split("x"))
        for tokens in (int(t) for t in args.tokens.split(",")):
            dense = None
            for fmt in args.formats.split(","):
                times = measure(fmt, out_features, in_features, tokens, dtype, device, args.repeat)
                dense = dense or (times if fmt == "dense" else None)
                flops = 2 * tokens * in_features * out_features
                rows.append([f"{out_features}x{in_features}", tokens, fmt, f"{times['dequant'] * 1e3:.3f}",
                             f"{times['fwd'] * 1e3:.3f}", f"{times['fwd_bwd'] * 1e3:.3f}",
                             f"{flops / times['fwd'] / 1e12:.1f}", f"{2 * flops / times['fwd_bwd'] / 1e12:.1f}",
                             "—" if fmt == "dense" else f"{times['dequant'] / times['fwd']:.0%}",
                             "—" if dense is None else f"{times['fwd_bwd'] / dense['fwd_bwd']:.2f}"])
    text = "\n".join([
        f"machine: {machine()}",
        f"workload: fused LoRA linear, r=16, {args.dtype}, random 4-bit codes (GPTQ/AWQ g128, HQQ g64, NF4 "
        f"blocksize 64), median of {args.repeat}; TFLOP/s over the base matmuls",
        "",
        markdown_table(["out x in", "tokens", "format", "dequant ms", "fwd ms", "fwd+bwd ms", "fwd TFLOP/s",
                        "fwd+bwd TFLOP/s", "dequant share of fwd", "fwd+bwd / dense"], rows),
    ])
    print(text)
    if args.output is not None:
        most = max(int(t) for t in args.tokens.split(","))
        shapes = list(dict.fromkeys(r[0] for r in rows))
        series = {fmt: [float(r[9]) for r in rows if r[1] == most and r[2] == fmt and r[9] != "—"]
                  for fmt in args.formats.split(",") if fmt != "dense"}
        plot = None if "dense" not in args.formats.split(",") else lambda path: plot_bars(
            path, f"fused LoRA linear, forward + backward, {most} tokens", shapes, series, "time / dense",
            reference=(1.0, "dense"))
        save_report(args.output, "kernels", text, plot)


if __name__ == "__main__":
    main()
