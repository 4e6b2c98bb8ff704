"""Mixed-batch calls from several threads at once: each call sees only its own adapter assignment."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from qlora_inject import LoraConfig, LoraModel
from qlora_inject.mixed_batch import assigned_adapters

from conftest import requires
from factories import LLAMA_PROJECTIONS, load_tiny_llama

pytestmark = requires("transformers")

# Eight requests, four samples each, mixing three adapters (one DoRA: the looped path) and the base.
REQUESTS = [
    ["default", "b", "c", "__base__"], ["b", "b", "b", "b"], ["__base__", "c", "default", "b"],
    ["c", "c", "__base__", "__base__"], ["default", "default", "default", "default"], ["b", "__base__", "c", "c"],
    ["__base__", "__base__", "__base__", "__base__"], ["c", "default", "b", "default"],
]


@pytest.fixture(scope="module")
def served():
    """A tiny Llama with three random adapters (and a head trained in full for one), in eval mode."""
    torch.manual_seed(0)
    settings = {"target_modules": LLAMA_PROJECTIONS, "init_lora_weights": False}
    model = LoraModel(load_tiny_llama("none"), LoraConfig(r=4, modules_to_save=["lm_head"], **settings))
    model.add_adapter("b", LoraConfig(r=2, lora_alpha=16, **settings))
    model.add_adapter("c", LoraConfig(r=4, use_dora=True, **settings))
    with torch.no_grad():
        model.model.lm_head.modules_to_save["default"].weight.mul_(1.5)
    input_ids = torch.randint(0, 128, (4, 12), generator=torch.Generator().manual_seed(1))
    return model.eval(), input_ids


def test_concurrent_mixed_batches_equal_the_single_threaded_results(served):
    model, input_ids = served
    with torch.no_grad():
        expected = [model(input_ids, adapter_names=names).logits for names in REQUESTS]
    # The requests differ from each other (else a leaked assignment could go unseen).
    assert all(not torch.equal(expected[0], other) for other in expected[1:])
    start = threading.Barrier(len(REQUESTS))

    def serve(i: int) -> list[torch.Tensor]:
        start.wait()
        with torch.no_grad():
            return [model(input_ids, adapter_names=REQUESTS[i]).logits for _ in range(4)]

    with ThreadPoolExecutor(len(REQUESTS)) as pool:
        results = list(pool.map(serve, range(len(REQUESTS))))
    wrong = [(REQUESTS[i], k) for i, outputs in enumerate(results) for k, output in enumerate(outputs)
             if not torch.equal(output, expected[i])]
    assert not wrong, f"{len(wrong)} of {len(REQUESTS) * 4} outputs differ from the single-threaded ones: {wrong[:3]}"


def test_the_assignment_belongs_to_the_call_and_ends_with_it(served):
    model, input_ids = served
    layer = model.model.model.layers[0].self_attn.q_proj
    seen = []
    hook = layer.register_forward_hook(lambda module, args, out: seen.append(assigned_adapters(module)))
    try:
        with torch.no_grad():
            model(input_ids, adapter_names=REQUESTS[0])
            with pytest.raises(ValueError, match=r"adapter_names has 3 entries but the batch has 4 samples"):
                model(input_ids, adapter_names=REQUESTS[0][:3])
            model(input_ids)
    finally:
        hook.remove()
    assert seen[0] == REQUESTS[0] and seen[-1] is None
    assert assigned_adapters(layer) is None and layer.batch_adapters is None


def test_concurrent_asyncio_tasks_keep_their_own_assignment(served):
    model, input_ids = served
    with torch.no_grad():
        expected = [model(input_ids, adapter_names=names).logits for names in REQUESTS[:3]]

    async def request(names: list[str]) -> torch.Tensor:
        with model.mixed_batch(names):
            await asyncio.sleep(0)                                    # the other tasks run here, inside theirs
            return model(input_ids).logits

    async def main() -> list[torch.Tensor]:
        return await asyncio.gather(*(request(names) for names in REQUESTS[:3]))

    # Grad mode is per thread, not per task: set it once around all of them, never across an await.
    with torch.no_grad():
        outputs = asyncio.run(main())
    assert torch.is_grad_enabled()
    for output, reference in zip(outputs, expected, strict=True):
        assert torch.equal(output, reference)
