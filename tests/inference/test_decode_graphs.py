"""Decode steps over fixed shapes (INFERENCE_CUDA_GRAPHS): padded batches and gathered widths compute
what the eager step does and never touch a row's keys; through the scheduler replies do not change.
On a CPU the fixed-shape step runs as it is; the gpu-marked tests capture and replay it as CUDA graphs."""

import asyncio
import copy

import pytest
import torch

from inference.decode_graphs import CaptureFailed, DecodeGraphs, FixedStep, sizes_up_to
from inference.metrics import Metrics
from inference.scheduler import SamplingParams, Scheduler, Submission
from tests.inference.conftest import prefilled_pool, random_prompt, tiny_tokenizer
from tests.inference.test_paged_cache import counter, reply, serve
from trainer.engine import Engine
from trainer.gpt import GPT

CUDA = pytest.param(
    "cuda",
    marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")],
)


@pytest.fixture
def on_device(model: GPT, monkeypatch: pytest.MonkeyPatch):
    """The tiny model on a device; on CUDA with TF32 off, so fp32 matmuls of other shapes round alike."""

    def place(device: str) -> GPT:
        if device == "cuda":
            monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
            monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
        return copy.deepcopy(model).to(device)

    return place


def test_sizes_are_powers_of_two_then_the_largest() -> None:
    assert sizes_up_to(1) == [1]
    assert sizes_up_to(8) == [1, 2, 4, 8]
    assert sizes_up_to(24) == [1, 2, 4, 8, 16, 24]


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_fixed_shape_steps_compute_what_the_eager_step_does(on_device, device: str) -> None:
    """Three rows (padded to a batch of 4) whose longest crosses from 4 blocks to 5 (read to 4, then 8):
    every step's logits equal the eager step's, and the rows' lengths advance alike."""
    model = on_device(device)
    prompts = [random_prompt(5, 1), random_prompt(60, 2), random_prompt(16, 3)]
    eager, fixed = prefilled_pool(model, prompts, 6, 24), prefilled_pool(model, prompts, 6, 24)
    graphs = DecodeGraphs(model, fixed, max_rows=6)
    with torch.inference_mode():
        for step in range(8):
            tokens = [step + 7 * row for row in range(3)]
            for cache in (eager, fixed):
                for row in range(3):
                    cache.reserve(row, cache.lengths[row] + 1)
            expected = model(torch.tensor(tokens, device=device)[:, None], kv_cache=eager.head(3))[:, -1]
            torch.testing.assert_close(graphs(tokens), expected, rtol=0, atol=1e-5)
    assert fixed.lengths == eager.lengths == [13, 68, 24, 0, 0, 0]
    assert sorted(graphs.steps) == [(4, 4), (4, 8)]
    assert all((step.graph is not None) == (device == "cuda") for step in graphs.steps.values())


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_replies_through_fixed_shape_steps_equal_the_eager_schedulers(on_device, device: str) -> None:
    """Six streams of different lengths leave one by one (batch 6 → 1, padded to 8, 4, 2, 1), greedy
    replies equal the engine's, and a seeded sampled reply equals the eager scheduler's."""
    model = on_device(device)
    engine = Engine(model, tiny_tokenizer())
    prompts = [random_prompt(10 + 9 * i, i) for i in range(5)]
    requests = [(p, SamplingParams(max_tokens=8 + 6 * i, temperature=0)) for i, p in enumerate(prompts)]
    requests.append((random_prompt(12, 9), SamplingParams(max_tokens=20, temperature=1.0, seed=3)))

    # with the server's other features on: 16-token prefill chunks and the prefix cache
    features = {"chunk_tokens": 16, "prefix_tokens": 4096}
    graphs = Scheduler(engine, 8, 8, Metrics(), "tiny", decode_graphs=True, **features)
    replies = serve(graphs, requests)
    assert replies == serve(Scheduler(engine, 8, 8, Metrics(), "tiny", **features), requests)
    for (ids, params), (tokens, reason) in zip(requests[:5], replies[:5], strict=True):
        (expected,) = engine.complete(ids, max_tokens=params.max_tokens, temperature=0)
        assert (tokens, reason) == ([t.id for t in expected], "length")
    assert {batch for batch, _ in graphs.graphs.steps} == {8, 4, 2, 1}
    assert graphs.cache.free_blocks == graphs.cache.num_blocks


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_replayed_graph_computes_what_its_step_does_uncaptured_in_bf16(model: GPT) -> None:
    """The graph replays the very kernels of the fixed-shape step: bitwise the same logits in bf16."""
    model = copy.deepcopy(model).to("cuda", torch.bfloat16)
    model.set_compute_dtype(torch.bfloat16)
    prompts = [random_prompt(30, 1), random_prompt(7, 2)]
    captured, plain = prefilled_pool(model, prompts, 4, 24), prefilled_pool(model, prompts, 4, 24)
    replayed = DecodeGraphs(model, captured, max_rows=4)
    uncaptured = DecodeGraphs(model, plain, max_rows=4)
    uncaptured.capture = None  # its steps run as they are
    with torch.inference_mode():
        for step in range(6):
            tokens = [step + 3, step + 11]
            for cache in (captured, plain):
                for row in range(2):
                    cache.reserve(row, cache.lengths[row] + 1)
            assert torch.equal(replayed(tokens), uncaptured(tokens))
    assert all(step.graph is not None for step in replayed.steps.values())


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_under_preemption_and_with_n_replies_through_fixed_shape_steps_do_not_change(
    on_device, device: str
) -> None:
    """A pool too small for every stream (preemptions: rows leave and come back) and a request for 2
    samples: the same replies as the eager scheduler's in the same pool."""
    engine = Engine(on_device(device), tiny_tokenizer())
    requests = [(random_prompt(20, seed), SamplingParams(max_tokens=40, temperature=0)) for seed in range(3)]
    sampled = (random_prompt(14, 7), SamplingParams(max_tokens=30, temperature=1.0, seed=11))

    def replies(decode_graphs: bool) -> tuple[list, float, list[int]]:
        scheduler = Scheduler(engine, 6, 8, Metrics(), "tiny", kv_tokens=10 * 16, decode_graphs=decode_graphs)

        async def together() -> list:
            greedy, n2 = [Submission(*r) for r in requests], Submission(*sampled, n=2)
            scheduler.submit([*greedy, n2])  # together: both runs admit them alike
            return await asyncio.gather(*(reply(s) for s in greedy), samples(n2))

        async def samples(submission: Submission) -> list[list[int]]:
            tokens, finished = {0: [], 1: []}, 0
            while finished < 2:
                event = await submission.events.get()
                tokens[event.index] += [score.token for score in event.tokens]
                finished += event.finish_reason is not None
            return [tokens[0], tokens[1]]

        try:
            result = asyncio.run(together())
        finally:
            scheduler.close()
        return result, counter(scheduler, "inference_preemptions_total"), sorted(scheduler.cache.free)

    with_graphs, preemptions, free = replies(True)
    assert (with_graphs, preemptions, free) == replies(False)
    assert preemptions >= 1 and len(free) == 10  # every block came back
    assert with_graphs[-1][0] != with_graphs[-1][1]  # two different samples


def test_a_decode_graph_that_cannot_be_recorded_leaves_the_model_decoding_eagerly(
    model: GPT, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A step whose graph cannot be recorded (a kernel the capture refuses) fails no request: the model
    decodes without graphs from then on, with the same replies."""

    def refused(self: FixedStep, *args: object) -> None:
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(FixedStep, "__init__", refused)
    engine = Engine(model, tiny_tokenizer())
    scheduler = Scheduler(engine, 4, 4, Metrics(), "tiny", decode_graphs=True)
    ids = random_prompt(12, 4)
    ((tokens, reason),) = serve(scheduler, [(ids, SamplingParams(max_tokens=10, temperature=0))])
    (expected,) = engine.complete(ids, max_tokens=10, temperature=0)
    assert (tokens, reason) == ([t.id for t in expected], "length")
    assert scheduler.graphs is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_capture_that_fails_changes_nothing_and_leaves_the_default_stream(
    on_device, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A host sync inside the step (.item()) makes a real capture fail: CaptureFailed, the rows' lengths
    and smear state as they were, the thread back on its own stream, and an eager step right after."""
    model = on_device("cuda")
    prompts = [random_prompt(30, 1), random_prompt(7, 2)]
    cache, eager = prefilled_pool(model, prompts, 4, 24), prefilled_pool(model, prompts, 4, 24)
    real_forward = FixedStep.forward

    def syncing(self: FixedStep) -> torch.Tensor:
        self.tokens.sum().item()
        return real_forward(self)

    monkeypatch.setattr(FixedStep, "forward", syncing)
    graphs = DecodeGraphs(model, cache, max_rows=4)
    smear_state = cache.last_embedding.clone()
    with torch.inference_mode():
        for row in range(2):
            cache.reserve(row, cache.lengths[row] + 1)
            eager.reserve(row, eager.lengths[row] + 1)
        with pytest.raises(CaptureFailed):
            graphs([5, 9])
        assert torch.cuda.current_stream() == torch.cuda.default_stream()
        assert cache.lengths[:2] == [30, 7] and torch.equal(cache.last_embedding, smear_state)
        fed = torch.tensor([[5], [9]], device="cuda")
        expected = model(fed, kv_cache=eager.head(2))
        torch.testing.assert_close(model(fed, kv_cache=cache.head(2)), expected, rtol=0, atol=0)
