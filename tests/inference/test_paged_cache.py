"""The paged KV cache: attention over a row's gathered blocks computes what the contiguous cache does;
a pool too small for every stream preempts and recomputes without changing a reply; memory follows the
tokens held; a request the pool can never hold fails with the reason."""

import asyncio
from pathlib import Path

import httpx
import pytest
import torch

from inference.metrics import Metrics
from inference.paged_cache import OutOfBlocks, PagedKVCache, blocks_for
from inference.pool import memory_estimate
from inference.prefill import Prefill
from inference.prefix_cache import BLOCK_TOKENS
from inference.scheduler import Failure, Output, SamplingParams, Scheduler, Submission
from tests.inference.conftest import (
    AUTH_HEADER,
    prefilled_pool,
    random_prompt,
    start_server,
    tiny_tokenizer,
)
from tests.support import wait_until
from trainer.engine import Engine, KVCache
from trainer.gpt import GPT


async def reply(submission: Submission) -> tuple[list[int], str | None]:
    """The tokens a submitted submission gets and its finish reason (a Failure's message instead)."""
    tokens = []
    while True:
        event = await submission.events.get()
        if isinstance(event, Failure):
            return tokens, event.message
        if isinstance(event, Output):
            tokens += [score.token for score in event.tokens]
            if event.finish_reason:
                return tokens, event.finish_reason


Request = tuple[list[int], SamplingParams]


def serve(
    scheduler: Scheduler, requests: list[Request], close: bool = True
) -> list[tuple[list[int], str | None]]:
    """Submit every request together (the first step sees them all, so a run is the same every time)
    and collect their replies; the scheduler closes after (unless told not to)."""

    async def together() -> list[tuple[list[int], str | None]]:
        submissions = [Submission(*request) for request in requests]
        scheduler.submit(submissions)
        return await asyncio.gather(*(reply(submission) for submission in submissions))

    try:
        return asyncio.run(together())
    finally:
        if close:
            scheduler.close()


def counter(scheduler: Scheduler, name: str) -> float:
    return scheduler.metrics.registry.get_sample_value(name) or 0.0


def record_give_ups(scheduler: Scheduler, names: dict[int, str]) -> tuple[list[str], list[list[str]]]:
    """Record, by the names of their requests (id(submission) → name), the sequences the scheduler
    preempts and the prefills it puts back."""
    victims: list[str] = []
    put_back: list[list[str]] = []
    real_preempt, real_put_back = scheduler.preempt, scheduler.put_back_prefill

    def preempt(row: int) -> None:
        victims.append(names[id(scheduler.running[row].submission)])
        real_preempt(row)

    def put_back_prefill() -> None:
        entries = [e for e in scheduler.group if e is not None]
        put_back.append([names[id(e if isinstance(e, Submission) else e.submission)] for e in entries])
        real_put_back()

    scheduler.preempt, scheduler.put_back_prefill = preempt, put_back_prefill
    return victims, put_back


def step_until_idle(scheduler: Scheduler) -> None:
    """Run the scheduler's steps (its lock held) until nothing is left: every block is back then."""
    while scheduler.busy:
        scheduler.step()
    assert scheduler.cache.free_blocks == scheduler.cache.num_blocks


def queued_tokens(submission: Submission) -> list[int]:
    """The tokens of the events already handed to this loop."""
    tokens = []
    while not submission.events.empty():
        tokens += [score.token for score in submission.events.get_nowait().tokens]
    return tokens


def test_attention_over_gathered_blocks_computes_what_the_contiguous_cache_does(model: GPT) -> None:
    """Prompts prefilled together on the pool (padded to the longest) and joined to the batch; then
    decode steps: the logits equal the contiguous cache's."""
    # inside a block, across two, exactly one
    prompts = [random_prompt(5, 1), random_prompt(37, 2), random_prompt(16, 3)]
    paged = prefilled_pool(model, prompts, max_rows=3, num_blocks=12)
    contiguous = KVCache(model, 3, 64)
    with torch.inference_mode():
        for row, ids in enumerate(prompts):
            single = KVCache(model, 1, len(ids))
            model(torch.tensor([ids]), kv_cache=single)
            contiguous.copy_rows(single, 0, [row])
        assert paged.lengths[:3] == [5, 37, 16]
        assert paged.free_blocks == 12 - (1 + 3 + 1)
        for step in range(20):  # decode: rows cross into new blocks at different steps
            fed = torch.tensor([[step + 7 * row] for row in range(3)])
            for row in range(3):
                paged.reserve(row, paged.lengths[row] + 1)
            expected = model(fed, kv_cache=contiguous)
            torch.testing.assert_close(model(fed, kv_cache=paged.head(3)), expected, rtol=0, atol=1e-5)
    assert paged.lengths == [25, 57, 36]
    assert paged.free_blocks == 12 - sum(blocks_for(n) for n in (25, 57, 36))
    for row in range(3):
        paged.release(row)
    assert paged.free_blocks == 12


def test_cpu_forwards_gather_into_buffers_kept_until_the_scheduler_is_idle(model: GPT) -> None:
    """Decode steps gather every row's keys and values into buffers the next step reuses (a fresh
    tensor of that size costs page faults on every step), with room for rows that grow a position a
    step; the replies are the engine's, and the buffers' memory goes back once nothing runs."""
    engine = Engine(model, tiny_tokenizer())
    scheduler = Scheduler(engine, 4, 4, Metrics(), "tiny")
    gathered_into: list[torch.Tensor] = []  # held, so that no two buffers can share an id
    real_decode = scheduler.decode

    def decode() -> None:
        real_decode()
        gathered_into.append(scheduler.cache.gather_buffers["keys"])

    scheduler.decode = decode
    prompts = [random_prompt(20, 1), random_prompt(33, 2)]
    replies = serve(
        scheduler, [(p, SamplingParams(max_tokens=12, temperature=0)) for p in prompts], close=False
    )
    try:
        for prompt, (tokens, reason) in zip(prompts, replies, strict=True):
            (expected,) = engine.complete(prompt, max_tokens=12, temperature=0)
            assert (tokens, reason) == ([t.id for t in expected], "length")
        assert len(gathered_into) == 11 and len({id(b) for b in gathered_into}) <= 2
        wait_until(lambda: not scheduler.cache.gather_buffers, 10, "the idle scheduler to drop its buffers")
    finally:
        scheduler.close()


def test_the_memory_estimate_covers_the_gather_buffers_at_their_largest(model: GPT) -> None:
    """Two rows grow to the model's whole context: the kept buffers grow with them, and the model's
    memory estimate (which the server's budget for loaded models sums) still covers all it holds."""
    scheduler = Scheduler(Engine(model, tiny_tokenizer()), 2, 2, Metrics(), "tiny")
    largest = [0]
    real_decode = scheduler.decode

    def decode() -> None:
        real_decode()
        buffers = scheduler.cache.gather_buffers.values()
        largest[0] = max(largest[0], sum(b.numel() * b.element_size() for b in buffers))

    scheduler.decode = decode
    prompt_tokens = model.config.sequence_len - 40
    params = SamplingParams(max_tokens=40, temperature=0)
    replies = serve(scheduler, [(random_prompt(prompt_tokens, seed), params) for seed in (1, 2)])
    assert [reason for _, reason in replies] == ["length", "length"]
    cache = scheduler.cache
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    pool = 2 * cache.keys.numel() * cache.keys.element_size()
    assert largest[0] > 0 and weights + pool + largest[0] <= memory_estimate(model, cache)


def test_a_prefill_padded_past_the_most_gathers_without_keeping_its_buffer(
    model: GPT, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whole prompts prefilled together (a pool with room for both), one mostly found in the prefix
    cache: each row reads as far as the cached part plus the longest new part, 880 slots, past every
    row at the full context (512). That gather is not kept: the buffers stay within the estimate."""
    scheduler = Scheduler(
        Engine(model, tiny_tokenizer()), 2, 2, Metrics(), "tiny", prefix_tokens=1024, kv_tokens=16 * 256
    )
    largest = [0]
    real_gather = PagedKVCache.gather

    def gather(self: PagedKVCache, name: str, pool: torch.Tensor) -> torch.Tensor:
        gathered = real_gather(self, name, pool)
        largest[0] = max([largest[0], *(b.size(0) for b in (self.gather_buffers or {}).values())])
        return gathered

    monkeypatch.setattr(PagedKVCache, "gather", gather)
    context = model.config.sequence_len
    cached, params = random_prompt(context - 56, 1), SamplingParams(max_tokens=1, temperature=0)
    serve(scheduler, [(cached, params)], close=False)
    replies = serve(
        scheduler, [(cached + random_prompt(40, 2), params), (random_prompt(context - 16, 3), params)]
    )
    assert [reason for _, reason in replies] == ["length", "length"]
    assert 0 < largest[0] <= scheduler.cache.most_gathered


def test_a_forward_outside_inference_mode_after_one_inside_computes_the_same(model: GPT) -> None:
    """The kept gather buffers are inference tensors; a forward under no_grad on the same pool (a
    script's, not the server's) gathers into fresh ones and gets the same logits."""
    pool = PagedKVCache(model, max_rows=2, num_blocks=4)
    for row in range(2):
        pool.reserve(row, 20)
    tokens = torch.tensor([random_prompt(5, 1), random_prompt(5, 2)])
    with torch.inference_mode():
        inside = model(tokens, kv_cache=pool)
    assert set(pool.gather_buffers) == {"keys", "values"}
    pool.lengths[:2] = [0, 0]  # the same tokens again, from the start
    pool.last_embedding.zero_()
    with torch.no_grad():
        torch.testing.assert_close(model(tokens, kv_cache=pool), inside, rtol=0, atol=0)


def test_prompts_prefilled_together_padded_on_the_pool_get_the_logits_each_gets_alone(model: GPT) -> None:
    """Two prompts in one forward, the short one padded at the end: every position's logits are those
    of the prompt alone (the pads land past its length and count for nothing)."""
    prompts = [random_prompt(9, 1), random_prompt(23, 2)]
    pool = PagedKVCache(model, max_rows=2, num_blocks=4)
    with torch.inference_mode():
        prefill = Prefill.start(model, pool, prompts, [None, None], [True, True], None, [0, 0])
        _, ready = prefill.step()
        assert prefill.cache.lengths == [9, 23]
        for r in ready:
            alone = model(torch.tensor([prompts[r.row]]))[0]
            torch.testing.assert_close(r.logits, alone, rtol=0, atol=1e-4)
    assert sorted(r.row for r in ready) == [0, 1]


def test_the_samples_of_one_prompt_share_its_whole_blocks_and_copy_its_partial_last_one(model: GPT) -> None:
    """n = 3 of a 40-token prompt: its 2 whole blocks held by all three rows, its third copied for the
        two others (5 blocks, where copies of the prompt would take 9), and each row decodes its own tokens
    as the prompt alone would."""
    prompt = random_prompt(40, 1)
    pool = PagedKVCache(model, max_rows=3, num_blocks=9)
    with torch.inference_mode():
        prefill = Prefill.start(model, pool, [prompt], [None], [False], None, [2])
        assert pool.free_blocks == 9 - 3 - 2
        prefill.step()
        pool.take_row(prefill.cache, 0, [0, 1, 2], prefill.spare[0])
        whole = pool.tables[0][:2]
        assert [table[:2] for table in pool.tables] == [whole] * 3 and len({t[2] for t in pool.tables}) == 3
        assert [pool.holders[block] for block in whole] == [3, 3]
        fed: list[list[int]] = [[], [], []]
        for step in range(12):  # each row its own tokens, into a fourth block of its own
            for row in range(3):
                pool.reserve(row, pool.lengths[row] + 1)
                fed[row].append(step + 100 * row)
            logits = model(torch.tensor([[tokens[-1]] for tokens in fed]), kv_cache=pool.head(3))[:, -1]
            alone = [model(torch.tensor([prompt + tokens]))[0, -1] for tokens in fed]
            torch.testing.assert_close(logits, torch.stack(alone), rtol=0, atol=1e-4)
    assert pool.free_blocks == 9 - 2 - 3 * 2
    for row in range(3):
        pool.release(row)
    assert pool.free_blocks == 9 and pool.holders == [0] * 10


def test_a_pool_too_small_for_every_stream_preempts_and_replies_as_with_room_for_all(model: GPT) -> None:
    """Four streams that end at 60 positions each (4 blocks) in a pool of 9 blocks: the newest are
    preempted and prefilled again, greedy replies equal the engine's, and a sampled one keeps its seed's
    tokens (its generator survives the preemption)."""
    engine = Engine(model, tiny_tokenizer())
    prompts = [random_prompt(20, seed) for seed in range(4)]

    requests = [(p, SamplingParams(max_tokens=40, temperature=0)) for p in prompts[:3]]
    requests.append((prompts[3], SamplingParams(max_tokens=40, temperature=1.0, seed=5)))

    tight = Scheduler(engine, 4, 8, Metrics(), "tiny", kv_tokens=9 * BLOCK_TOKENS)
    replies = serve(tight, requests)
    roomy = Scheduler(engine, 4, 8, Metrics(), "tiny")
    assert replies == serve(roomy, requests)
    assert counter(tight, "inference_preemptions_total") >= 1
    assert counter(roomy, "inference_preemptions_total") == 0
    for ids, (tokens, reason) in zip(prompts[:3], replies[:3], strict=True):
        (expected,) = engine.complete(ids, max_tokens=40, temperature=0)
        assert (tokens, reason) == ([t.id for t in expected], "length")
    assert tight.cache.free_blocks == tight.cache.num_blocks  # every block came back


def test_a_preempted_sequence_is_prefilled_again_in_chunks(model: GPT, monkeypatch) -> None:
    """With INFERENCE_PREFILL_CHUNK_TOKENS=16 and no prefix cache, a preempted sequence's recompute
    (its prompt and up to ~40 tokens) goes 16 tokens per step like a new prompt, so the running streams
    wait one chunk at a time; greedy replies stay the engine's."""
    engine = Engine(model, tiny_tokenizer())
    prompts = [random_prompt(20, seed) for seed in range(4)]
    spent = []
    real_step = Prefill.step

    def step(self: Prefill) -> tuple[int, list]:
        tokens, ready = real_step(self)
        spent.append(tokens)
        return tokens, ready

    monkeypatch.setattr(Prefill, "step", step)
    tight = Scheduler(engine, 4, 8, Metrics(), "tiny", kv_tokens=9 * BLOCK_TOKENS, chunk_tokens=16)
    replies = serve(tight, [(p, SamplingParams(max_tokens=40, temperature=0)) for p in prompts])
    assert counter(tight, "inference_preemptions_total") >= 1
    assert max(spent) <= 16
    for ids, (tokens, reason) in zip(prompts, replies, strict=True):
        (expected,) = engine.complete(ids, max_tokens=40, temperature=0)
        assert (tokens, reason) == ([t.id for t in expected], "length")


@pytest.mark.parametrize("resumed", ["A", "B"])
def test_when_blocks_run_out_the_latest_admitted_gives_its_up_a_prefill_under_way_included(
    model: GPT, resumed: str
) -> None:
    """A (first come) and B run in a 5-block pool until it is full; one of them is preempted and
    prefilled again 4 tokens a step, holding the blocks of its prompt from the start. Meanwhile the
    other grows into a new block and none is free. If B is the one being prefilled, it is the latest
    admitted: its prefill is put back, and A is not preempted. If A is, B is preempted and A's prefill
    goes on. Either way both replies are the engine's and every block comes back. The test runs the
    scheduler's steps itself, holding its lock, so the order of events is fixed."""
    engine = Engine(model, tiny_tokenizer())
    lengths = {"A": 15, "B": 30} if resumed == "B" else {"A": 30, "B": 15}
    prompts = {name: random_prompt(length, seed) for seed, (name, length) in enumerate(lengths.items())}
    given_up = []

    async def run() -> dict[str, list[int]]:
        scheduler = Scheduler(engine, 4, 4, Metrics(), "tiny", kv_tokens=5 * BLOCK_TOKENS)
        a, b = (Submission(prompts[k], SamplingParams(max_tokens=30, temperature=0)) for k in "AB")
        given_up.extend(record_give_ups(scheduler, {id(a): "A", id(b): "B"}))
        try:
            # Its thread waits for the lock (or in wait(), which nothing wakes) while this one steps.
            with scheduler.wake, torch.inference_mode():
                scheduler.waiting.extend([a, b])
                for _ in range(10):
                    scheduler.step()
                assert scheduler.cache.free_blocks == 0
                scheduler.preempt("AB".index(resumed))
                scheduler.chunk_tokens = 4
                step_until_idle(scheduler)
        finally:
            scheduler.close()
        await asyncio.sleep(0)  # the steps' events, handed to this loop
        return {"A": queued_tokens(a), "B": queued_tokens(b)}

    replies = asyncio.run(run())
    victims, put_back = given_up
    if resumed == "B":
        assert put_back == [["B"]] and victims == ["B"]  # B's prefill gave its blocks up; A ran on
    else:
        assert put_back == [] and victims == ["A", "B"]  # B, the later, made room for A's prefill
    for name, ids in prompts.items():
        (expected,) = engine.complete(ids, max_tokens=30, temperature=0)
        assert replies[name] == [t.id for t in expected]


@pytest.mark.parametrize("prefix_tokens", [0, 1024])
def test_a_new_prompt_holds_its_blocks_while_prefilled_and_gives_them_up_to_an_older_stream(
    model: GPT, monkeypatch: pytest.MonkeyPatch, prefix_tokens: int
) -> None:
    """A runs alone in a 5-block pool, 3 of them its own; C arrives and is prefilled 4 tokens a step,
    holding the 2 blocks of its prompt from its first chunk (the pool counts it: nothing is left). A
    then grows into a 4th block: C's prefill gives its blocks up and waits, and A is not preempted
    (a prompt that joined whenever it was complete used to evict A). C is served once A ends, from
    where its first prefill stopped when the prefix cache is on; both replies are the engine's, and
    C's prompt is counted once. The test runs the scheduler's steps itself, holding its lock."""
    engine = Engine(model, tiny_tokenizer())
    prompts = {"A": random_prompt(45, 1), "C": random_prompt(20, 2)}
    given_up, computed, starts = [], [], []
    real_start = Prefill.start

    def start(model: GPT, pool: PagedKVCache, prompts: list[list[int]], hits: list, *rest) -> Prefill:
        starts.append([0 if hit is None else hit.length for hit in hits])
        return real_start(model, pool, prompts, hits, *rest)

    monkeypatch.setattr(Prefill, "start", start)

    async def run() -> dict[str, list[int]]:
        scheduler = Scheduler(
            engine, 4, 4, Metrics(), "tiny", kv_tokens=5 * BLOCK_TOKENS, prefix_tokens=prefix_tokens
        )
        a, c = (Submission(prompts[k], SamplingParams(max_tokens=10, temperature=0)) for k in "AC")
        given_up.extend(record_give_ups(scheduler, {id(a): "A", id(c): "C"}))
        recorded_put_back = scheduler.put_back_prefill

        def put_back_prefill() -> None:
            computed.append(scheduler.prefilling.cache.lengths[0])
            recorded_put_back()

        scheduler.put_back_prefill = put_back_prefill
        try:
            # Its thread waits for the lock (or in wait(), which nothing wakes) while this one steps.
            with scheduler.wake, torch.inference_mode():
                scheduler.waiting.append(a)
                scheduler.step()
                assert scheduler.cache.free_blocks == 2  # A: 45 positions and the next, 3 blocks
                scheduler.waiting.append(c)
                scheduler.chunk_tokens = 4
                scheduler.step()
                assert scheduler.prefilling is not None and scheduler.cache.free_blocks == 0
                step_until_idle(scheduler)
                assert counter(scheduler, "inference_prompt_tokens_total") == 45 + 20
        finally:
            scheduler.close()
        await asyncio.sleep(0)  # the steps' events, handed to this loop
        return {"A": queued_tokens(a), "C": queued_tokens(c)}

    replies = asyncio.run(run())
    victims, put_back = given_up
    assert put_back == [["C"]] and victims == []
    assert 0 < computed[0] < len(prompts["C"])
    assert starts[-1] == [computed[0] if prefix_tokens else 0]  # C's second prefill
    for name, ids in prompts.items():
        (expected,) = engine.complete(ids, max_tokens=10, temperature=0)
        assert replies[name] == [t.id for t in expected]


def test_a_prefill_that_cannot_take_every_block_it_needs_takes_none(model: GPT) -> None:
    pool = PagedKVCache(model, max_rows=4, num_blocks=3)
    prompts, none = [random_prompt(10, 1), random_prompt(10, 2)], [None, None]
    with pytest.raises(OutOfBlocks):  # a block each, then 5 for the second one's 5 more samples
        Prefill.start(model, pool, prompts, none, [False, False], None, [0, 5])
    assert pool.free_blocks == 3


def test_a_prompt_whose_client_leaves_while_prefilled_gives_its_blocks_back_at_once(model: GPT) -> None:
    """Two 40-token prompts prefilled together, 4 tokens a step, hold 3 blocks each. One client goes:
    its blocks come back at the next step, while the other prompt is still being prefilled; the other
    reply is the engine's. The test runs the scheduler's steps itself, holding its lock."""
    engine = Engine(model, tiny_tokenizer())
    prompts = [random_prompt(40, 1), random_prompt(40, 2)]

    async def run() -> tuple[list[int], list[int]]:
        scheduler = Scheduler(engine, 4, 4, Metrics(), "tiny", kv_tokens=8 * BLOCK_TOKENS, chunk_tokens=8)
        kept, left = (Submission(p, SamplingParams(max_tokens=6, temperature=0)) for p in prompts)
        try:
            with scheduler.wake, torch.inference_mode():
                scheduler.waiting.extend([kept, left])
                scheduler.step()
                assert scheduler.cache.free_blocks == 8 - 2 * 3
                left.cancelled = True  # as the event loop does when its client disconnects
                scheduler.step()
                assert scheduler.prefilling is not None and scheduler.cache.free_blocks == 8 - 3
                step_until_idle(scheduler)
        finally:
            scheduler.close()
        await asyncio.sleep(0)  # the steps' events, handed to this loop
        return queued_tokens(kept), queued_tokens(left)

    kept_tokens, left_tokens = asyncio.run(run())
    (expected,) = engine.complete(prompts[0], max_tokens=6, temperature=0)
    assert kept_tokens == [t.id for t in expected] and left_tokens == []


def test_preempted_sequences_resume_in_the_order_they_were_admitted(model: GPT) -> None:
    """The last admitted is preempted first, then an earlier one: the earlier one comes back first."""
    scheduler = Scheduler(Engine(model, tiny_tokenizer()), 4, 4, Metrics(), "tiny")

    async def run() -> tuple[list[Submission], list[Submission], list[Submission]]:
        params = SamplingParams(max_tokens=20, temperature=0)  # greedy: the model never stops
        submissions = [Submission(random_prompt(10, seed), params) for seed in range(3)]
        try:
            with scheduler.wake, torch.inference_mode():
                for submission in submissions:  # admitted one a step: in this order
                    scheduler.waiting.append(submission)
                    scheduler.step()
                scheduler.preempt(2)
                scheduler.preempt(1)
                preempted = [s.submission for s in scheduler.preempted]
                return submissions, preempted, [s.submission for s in scheduler.take_resume()[0]]
        finally:
            scheduler.close()

    submissions, preempted, resumed = asyncio.run(run())
    assert preempted == [submissions[2], submissions[1]] and resumed == [submissions[1]]


def test_a_join_that_fails_gives_every_block_back(model: GPT, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both samples of an n=2 request got their blocks, then the join failed: the request fails, and
    the rows it left past the running ones hold nothing."""
    scheduler = Scheduler(Engine(model, tiny_tokenizer()), 4, 4, Metrics(), "tiny")
    real_take_row = PagedKVCache.take_row

    def take_row(self: PagedKVCache, *args) -> None:
        real_take_row(self, *args)
        raise RuntimeError("out of memory")

    monkeypatch.setattr(PagedKVCache, "take_row", take_row)

    async def run() -> tuple[tuple[list[int], str | None], int]:
        submission = Submission(random_prompt(40, 1), SamplingParams(max_tokens=4, temperature=0), n=2)
        scheduler.submit([submission])
        return await reply(submission), scheduler.cache.free_blocks

    try:
        (tokens, message), free = asyncio.run(run())
    finally:
        scheduler.close()
    assert tokens == [] and "out of memory" in message
    assert free == scheduler.cache.num_blocks


def test_rows_take_blocks_for_the_tokens_they_hold_not_the_longest_row(model: GPT) -> None:
    """One long prompt among seven short ones: all eight run at once in a pool a fifth of what a
    contiguous batch cache (every row as long as the longest) needs for them."""
    engine = Engine(model, tiny_tokenizer())
    prompts = [random_prompt(200, 0), *(random_prompt(10, seed) for seed in range(1, 8))]
    kv_tokens = blocks_for(200 + 8) * BLOCK_TOKENS + 7 * BLOCK_TOKENS
    assert 5 * kv_tokens < 8 * (200 + 8)
    scheduler = Scheduler(engine, 8, 8, Metrics(), "tiny", kv_tokens=kv_tokens, chunk_tokens=None)
    peak = []
    real_decode = scheduler.decode

    def decode() -> None:
        peak.append(len(scheduler.running))
        real_decode()

    scheduler.decode = decode
    replies = serve(scheduler, [(p, SamplingParams(max_tokens=6, temperature=0)) for p in prompts])
    assert max(peak) == 8 and counter(scheduler, "inference_preemptions_total") == 0
    assert all(reason == "length" and len(tokens) == 6 for tokens, reason in replies)


def test_a_request_the_whole_pool_cannot_hold_fails_with_the_reason(model: GPT) -> None:
    scheduler = Scheduler(
        Engine(model, tiny_tokenizer()), 4, 4, Metrics(), "tiny", kv_tokens=2 * BLOCK_TOKENS
    )
    fits = (random_prompt(10, 1), SamplingParams(max_tokens=4, temperature=0))
    too_long = (random_prompt(40, 2), SamplingParams(max_tokens=4, temperature=0))
    (short, _), (nothing, message) = serve(scheduler, [fits, too_long])
    assert len(short) == 4 and nothing == []
    # 40 prompt tokens and one generated take 3 blocks: 48 positions
    assert "48 positions of KV cache" in message and "INFERENCE_KV_CACHE_TOKENS" in message


def test_a_sequence_that_fills_the_whole_pool_alone_ends_with_length(model: GPT) -> None:
    engine = Engine(model, tiny_tokenizer())
    ids = random_prompt(10, 3)
    scheduler = Scheduler(engine, 4, 4, Metrics(), "tiny", kv_tokens=2 * BLOCK_TOKENS)
    ((tokens, reason),) = serve(scheduler, [(ids, SamplingParams(max_tokens=100, temperature=0))])
    # 32 positions: the prompt's 10 and 22 fed tokens; the 23rd chosen token has no room to be fed.
    (expected,) = engine.complete(ids, max_tokens=23, temperature=0)
    assert reason == "length" and tokens == [t.id for t in expected]


def test_a_sequence_preempted_while_it_holds_the_whole_pool_comes_back_and_ends_with_length(
    model: GPT,
) -> None:
    """A sequence preempted while it holds every block (its KV at the pool's 64 positions) cannot grow
    once back, so it must not wait for a 5th block that will never be: it is prefilled again into the
    4 and ends at its next token with "length", as the engine's tokens.
    Meanwhile the model is busy: the memory budget's eviction passes it by. The test runs the
    scheduler's steps itself, holding its lock."""
    engine = Engine(model, tiny_tokenizer())
    ids = random_prompt(10, 3)

    async def run() -> tuple[list[int], str | None]:
        scheduler = Scheduler(engine, 4, 4, Metrics(), "tiny", kv_tokens=4 * BLOCK_TOKENS)
        submission = Submission(ids, SamplingParams(max_tokens=100, temperature=0))
        try:
            # Its thread waits for the lock (or in wait(), which nothing wakes) while this one steps.
            with scheduler.wake, torch.inference_mode():
                scheduler.waiting.append(submission)
                while scheduler.cache.lengths[0] < 4 * BLOCK_TOKENS:
                    scheduler.step()
                assert scheduler.cache.free_blocks == 0
                scheduler.preempt(0)
                assert not scheduler.close_if_idle()  # a preempted sequence keeps its model loaded
                for _ in range(10):
                    if not scheduler.busy:
                        break
                    scheduler.step()
                assert not scheduler.busy
        finally:
            scheduler.close()
        await asyncio.sleep(0)  # the steps' events, handed to this loop
        tokens, reason = [], None
        while not submission.events.empty():
            event = submission.events.get_nowait()
            tokens += [score.token for score in event.tokens]
            reason = event.finish_reason or reason
        return tokens, reason

    tokens, reason = asyncio.run(run())
    (expected,) = engine.complete(ids, max_tokens=4 * BLOCK_TOKENS - 10 + 1, temperature=0)
    assert reason == "length" and tokens == [t.id for t in expected]


def test_the_api_answers_400_for_what_the_kv_cache_cannot_hold_and_caps_a_reply_at_it(
    served_base: Path, tmp_path: Path
) -> None:
    """With INFERENCE_KV_CACHE_TOKENS=64 (4 blocks): a prompt past it, or n replies whose prompts do not
    fit together, get 400 with the reason; a reply that may grow is cut where the cache is full."""
    process, url = start_server(served_base, tmp_path, INFERENCE_KV_CACHE_TOKENS="64")
    try:
        with httpx.Client(base_url=url, headers=AUTH_HEADER, timeout=60) as client:

            def chat(content: str, **fields: object) -> httpx.Response:
                messages = [{"role": "user", "content": content}]
                body = {"model": "tiny-sft", "messages": messages, "temperature": 0, **fields}
                return client.post("/v1/chat/completions", json=body)

            long = chat("tell me " * 10)  # ~90 tokens: within the context (256), past the cache
            assert long.status_code == 400 and "INFERENCE_KV_CACHE_TOKENS" in long.json()["error"]["message"]
            assert long.json()["error"]["code"] == "context_length_exceeded"
            several = chat("hi there", n=8)
            assert several.status_code == 400, several.text
            assert "INFERENCE_KV_CACHE_TOKENS" in several.json()["error"]["message"]
            capped = chat("hi there", max_tokens=200).json()
            assert capped["usage"]["prompt_tokens"] + capped["usage"]["completion_tokens"] <= 64
    finally:
        process.stop()
