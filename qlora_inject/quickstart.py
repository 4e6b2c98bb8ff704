"""The built-in default job: the seed's script on a tiny 4-bit Llama, then a short LoRA training run.

Needs no download: a Llama-architecture model is built from a small `LlamaConfig` with random
weights, saved, loaded back through transformers with `BitsAndBytesConfig(load_in_4bit=True)` on
the CPU, wrapped with `LoraModel` exactly as in the seed's script, and trained on the corpus that
ships with the package, one byte per token.
"""

from __future__ import annotations

import tempfile
import time
from importlib import resources
from pathlib import Path

import torch

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def corpus_bytes() -> torch.Tensor:
    """The shipped corpus as a tensor of byte values (token ids 0–255)."""
    text = resources.files("qlora_inject.data").joinpath("corpus.txt").read_bytes()
    return torch.tensor(list(text), dtype=torch.long)


def build_tiny_llama(directory: Path, hidden: int = 128, layers: int = 2, seed: int = 0) -> Path:
    """Save a random-weight Llama-architecture model with a 256-token (byte) vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=hidden * 4,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


def load_4bit(directory: Path, quant_type: str = "nf4"):
    """Load a saved causal LM with bitsandbytes 4-bit weights on the CPU."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                      bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(directory, quantization_config=quantization, device_map="cpu")


def run(steps: int = 60, seq_len: int = 64, batch_size: int = 8, lr: float = 3e-3, output: Path | None = None,
        seed: int = 0) -> list[float]:
    """Run the default job; return the loss of every step."""
    from qlora_inject import LoraConfig, LoraModel

    with tempfile.TemporaryDirectory(prefix="qlora-inject-tiny-llama-") as tmp:
        model = load_4bit(build_tiny_llama(Path(tmp), seed=seed))

    # The seed's script, with only its import changed:
    config = LoraConfig(r=32, lora_alpha=16, target_modules=PROJECTIONS, lora_dropout=0.05, bias="none",
                        task_type="CAUSAL_LM")
    model = LoraModel(model, config, "default")
    model.print_trainable_parameters()
    print(model.reports["default"].backends(), "layers wrapped")

    data = corpus_bytes()
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses: list[float] = []
    start = time.perf_counter()
    for step in range(1, steps + 1):
        offsets = torch.randint(0, len(data) - seq_len - 1, (batch_size,), generator=generator)
        batch = torch.stack([data[o:o + seq_len] for o in offsets.tolist()])        # (batch, seq)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step == 1 or step % 10 == 0 or step == steps:
            rate = step * batch.numel() / (time.perf_counter() - start)
            print(f"step {step:4d}  loss {loss.item():.4f}  {rate:,.0f} tokens/s")
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f} over {steps} steps")
    if output is not None:
        model.save_pretrained(output)
        print(f"adapter saved to {output}")
    return losses


if __name__ == "__main__":
    run(output=Path("runs/quickstart"))
