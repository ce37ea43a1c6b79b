"""The prefix cache: a chat's next turn reuses the KV of the turns before it, with the same greedy reply
as a full prefill, and the cache stays within its bound, least recently used out first."""

import asyncio
from functools import partial
from pathlib import Path

import httpx
import torch

from inference.metrics import Metrics
from inference.paged_cache import PagedKVCache, blocks_for
from inference.prefill import Prefill
from inference.prefix_cache import BLOCK_TOKENS, Hit, PrefixCache
from inference.scheduler import Output, SamplingParams, Scheduler, Submission
from tests.inference.conftest import AUTH_HEADER, prefilled_pool, write_checkpoint
from trainer.chat_format import render_for_completion
from trainer.engine import Engine
from trainer.tokenizer import Tokenizer


class StandIn:
    """Stand-in keys and values (1 layer, 1 head, 1 channel) that say which token made them, given from
    a start on as PrefixCache.store asks; `asked`: the starts it asked for."""

    def __init__(self, tokens: list[int]) -> None:
        self.keys = torch.tensor(tokens, dtype=torch.float32)[None, :, None, None]
        self.asked: list[int] = []

    def __call__(self, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.asked.append(start)
        return self.keys[:, start:], -self.keys[:, start:]


def found(hit: Hit) -> tuple[list[float], list[float]]:
    """The stand-in keys and values a hit holds, in order."""
    keys = torch.cat([block.keys for block in hit.blocks], dim=1)
    values = torch.cat([block.values for block in hit.blocks], dim=1)
    return keys.flatten().tolist(), values.flatten().tolist()


def test_a_prompt_continued_from_the_cache_gets_the_logits_of_a_full_prefill(tmp_path: Path) -> None:
    """The smear at the boundary included: the first new token mixes in the last reused one."""
    model = write_checkpoint(tmp_path / "runs", "m", "sft", 1, seed=4).eval()
    assert model.smear_lambda.abs().item() > 0.05  # a smear that matters
    torch.manual_seed(0)
    earlier = torch.randint(0, 500, (50,)).tolist()
    prompt = earlier[:40] + torch.randint(0, 500, (9,)).tolist()  # a next turn: shared start, new end
    prefix = PrefixCache(max_tokens=1024)
    with torch.inference_mode():
        first = prefilled_pool(model, [earlier], max_rows=1, num_blocks=blocks_for(len(earlier)))
        prefix.store(earlier, partial(first.row_kv, 0))
        hit = prefix.lookup(prompt)
        assert hit is not None and hit.length == 40  # two whole blocks and 8 tokens of the third
        pool = PagedKVCache(model, max_rows=1, num_blocks=blocks_for(len(prompt)))
        prefill = Prefill.start(model, pool, [prompt], [hit], [False], None, [0])
        spent, (ready,) = prefill.step()
        assert spent == len(prompt) - 40
        continued = ready.logits[-1]
        full = model(torch.tensor([prompt]))[0, -1]
    torch.testing.assert_close(continued, full, rtol=0, atol=1e-4)


async def chat(
    scheduler: Scheduler, tokenizer: Tokenizer, turns: int
) -> list[tuple[list[int], list[int], float]]:
    """A conversation of greedy turns, each re-sending the whole history: per turn its prompt, its reply
    and the prompt tokens found in the prefix cache so far."""
    messages, history = [], []
    for turn in range(turns):
        messages.append({"role": "user", "content": f"Tell me more about cats, part {turn}."})
        prompt = render_for_completion(tokenizer, messages)
        submission = Submission(prompt, SamplingParams(max_tokens=20, temperature=0))
        scheduler.submit([submission])
        reply = []
        while True:
            event = await submission.events.get()
            assert isinstance(event, Output), event
            reply += [score.token for score in event.tokens]
            if event.finish_reason:
                break
        hits = scheduler.metrics.registry.get_sample_value("inference_prefix_cache_hits_total")
        history.append((prompt, reply, hits))
        messages.append({"role": "assistant", "content": tokenizer.decode(reply)})
    return history


def test_each_chat_turn_prefills_only_its_new_tokens_and_replies_as_the_engine_does(
    served_base: Path, tmp_path: Path
) -> None:
    tokenizer = Tokenizer.load(served_base / "runs" / "tiny" / "tokenizer")
    model = write_checkpoint(tmp_path / "runs", "tiny", "sft", 1, seed=10).eval()
    engine = Engine(model, tokenizer)
    scheduler = Scheduler(engine, 4, 4, Metrics(), "tiny", prefix_tokens=4096)
    try:
        history = asyncio.run(chat(scheduler, tokenizer, turns=4))
    finally:
        scheduler.close()
    hits_so_far = 0.0  # the first turn has nothing to reuse
    for turn, (prompt, reply, hits) in enumerate(history):
        (expected,) = engine.complete(prompt, max_tokens=20, temperature=0)
        assert reply == [t.id for t in expected if t.id not in engine.stop_tokens], f"turn {turn}"
        # All of the previous turn's prompt came from the cache, its partial last block included.
        wanted = len(history[turn - 1][0]) if turn else 0
        assert hits - hits_so_far >= wanted, f"turn {turn} reused {hits - hits_so_far} tokens"
        hits_so_far = hits


def test_a_hit_needs_every_earlier_block_to_match() -> None:
    prefix = PrefixCache(max_tokens=1024)
    tokens = list(range(100, 150))
    prefix.store(tokens, StandIn(tokens))
    other_first_block = [7] * BLOCK_TOKENS + tokens[BLOCK_TOKENS:]
    assert prefix.lookup(other_first_block) is None  # its second block matches, but not after this start
    diverging = tokens[:20] + [7] * 30  # a whole block, then 4 tokens of the next
    hit = prefix.lookup(diverging)
    assert hit is not None and hit.length == 20
    assert found(hit) == (tokens[:20], [-t for t in tokens[:20]])
    exact = prefix.lookup(tokens[:48])  # the last token is always computed
    assert exact is not None and exact.length == 47


def test_a_sequences_partial_last_block_is_kept_for_the_prompt_that_continues_it() -> None:
    """50 tokens: 3 whole blocks and 2 more, kept as a block of 2. The next turn, which starts with all
    50, reuses all 50; once a longer sequence holds those 2 in a whole block, the block of 2 goes."""
    prefix = PrefixCache(max_tokens=1024)
    tokens = list(range(100, 150))
    prefix.store(tokens, StandIn(tokens))
    assert prefix.tokens == 50 and len(prefix.blocks) == 4
    hit = prefix.lookup([*tokens, 7, 8])
    assert hit is not None and hit.length == 50
    assert found(hit) == (tokens, [-t for t in tokens])
    longer = list(range(100, 170))  # the same sequence, grown: only its new blocks are fetched
    kv = StandIn(longer)
    prefix.store(longer, kv)
    assert kv.asked == [3 * BLOCK_TOKENS] and prefix.lookup([*longer, 1]).length == 70
    # its whole 4th block starts with the old partial one, which goes: 4 whole blocks and one of 6
    assert len(prefix.blocks) == 5 and prefix.tokens == 70
    again = StandIn(tokens)  # the 50 again: all of it is held, by whole blocks
    prefix.store(tokens, again)
    assert again.asked == [] and len(prefix.blocks) == 5 and prefix.lookup([*tokens, 7]).length == 50


def test_the_cache_keeps_its_bound_and_drops_the_least_recently_used() -> None:
    prefix = PrefixCache(max_tokens=4 * BLOCK_TOKENS)
    a, b, c = ([start + i for i in range(2 * BLOCK_TOKENS)] for start in (1000, 2000, 3000))
    prefix.store(a, StandIn(a))
    prefix.store(b, StandIn(b))
    assert prefix.lookup([*a, 1]) is not None  # a is now more recent than b
    prefix.store(c, StandIn(c))
    assert prefix.tokens == 4 * BLOCK_TOKENS
    assert prefix.lookup([*b, 1]) is None
    for kept in (a, c):
        hit = prefix.lookup([*kept, 1])
        assert hit is not None and hit.length == 2 * BLOCK_TOKENS
    assert PrefixCache(max_tokens=0).lookup(a) is None


def test_metrics_show_a_chat_turn_found_in_the_prefix_cache(server: str) -> None:
    def metric(name: str) -> float:
        lines = httpx.get(f"{server}/metrics", headers=AUTH_HEADER).text.splitlines()
        return sum(float(line.split()[-1]) for line in lines if line.startswith(name))

    messages = [{"role": "user", "content": "A first question that is long enough to fill a few blocks."}]
    body = {"model": "tiny-sft", "max_tokens": 8, "temperature": 0}
    hits, queries = (
        metric("inference_prefix_cache_hits_total"),
        metric("inference_prefix_cache_queries_total"),
    )
    for turn in range(2):
        response = httpx.post(
            f"{server}/v1/chat/completions", json={**body, "messages": messages}, headers=AUTH_HEADER
        )
        messages += [response.json()["choices"][0]["message"], {"role": "user", "content": f"And {turn}?"}]
    second_prompt = response.json()["usage"]["prompt_tokens"]
    assert metric("inference_prefix_cache_queries_total") - queries >= second_prompt
    assert metric("inference_prefix_cache_hits_total") - hits >= BLOCK_TOKENS
    assert metric("inference_prefix_cache_blocks") >= 1
    # the blocks hold every token of the replies' sequences but the last, partial blocks included
    assert (
        0 < metric("inference_prefix_cache_tokens") <= BLOCK_TOKENS * metric("inference_prefix_cache_blocks")
    )
