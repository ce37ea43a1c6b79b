"""A python tool call in a served reply: the scheduler runs the calculator and streams the call and its
forced result as text a client can show, next to a plain reply in the same batch."""

import asyncio
import itertools

import torch

from inference.metrics import Metrics
from inference.scheduler import Output, SamplingParams, Scheduler, Submission
from tests.inference.conftest import CONFIG, tiny_tokenizer
from trainer.engine import Engine
from trainer.gpt import GPT


class ScriptedGPT(GPT):
    """A real model (its KV cache fills as usual) whose next token is taken from a table keyed by the
    token just fed, where the table has one: a reply that is known in advance."""

    def __init__(self, next_token: dict[int, int]) -> None:
        super().__init__(CONFIG)
        self.init_weights()
        self.next_token = next_token

    def forward(self, idx, targets=None, kv_cache=None, loss_reduction: str = "mean") -> torch.Tensor:
        logits = super().forward(idx, kv_cache=kv_cache)
        for token, following in self.next_token.items():
            scripted = logits.new_full((logits.size(-1),), -1e9)
            scripted[following] = 0.0
            logits[idx == token] = scripted
        return logits


async def reply(scheduler: Scheduler, prompt: list[int]) -> tuple[str, str | None]:
    submission = Submission(prompt, SamplingParams(max_tokens=30, temperature=0))
    scheduler.submit([submission])
    text = []
    while True:
        event = await submission.events.get()
        assert isinstance(event, Output), event
        text.append(event.text)
        if event.finish_reason:
            return "".join(text), event.finish_reason


def test_a_calculator_call_streams_with_its_result_and_the_reply_goes_on() -> None:
    tokenizer = tiny_tokenizer()
    special = tokenizer.encode_special
    expression = tokenizer.encode("7*6")
    answer = tokenizer.encode(" ok")
    assert len(set(expression + answer)) == len(expression + answer)  # a chain keyed by distinct tokens
    # <|assistant_start|> → the call → (the tool forces <|output_start|>42<|output_end|>) → " ok" → end
    chain = [
        special("<|assistant_start|>"),
        special("<|python_start|>"),
        *expression,
        special("<|python_end|>"),
    ]
    next_token = dict(itertools.pairwise(chain))
    after_output = [special("<|output_end|>"), *answer, special("<|assistant_end|>")]
    next_token |= dict(itertools.pairwise(after_output))
    torch.manual_seed(0)
    model = ScriptedGPT(next_token).eval()
    scheduler = Scheduler(Engine(model, tokenizer), 4, 4, Metrics(), "scripted")
    with_tool = [*tokenizer.encode("go", prepend=tokenizer.bos_token_id), special("<|assistant_start|>")]
    plain = tokenizer.encode("hi there", prepend=tokenizer.bos_token_id)  # no script: free-running

    async def alone_then_together() -> tuple[tuple[str, str | None], ...]:
        alone = await reply(scheduler, plain)
        return alone, *await asyncio.gather(reply(scheduler, with_tool), reply(scheduler, plain))

    try:
        plain_alone, (text, reason), plain_beside = asyncio.run(alone_then_together())
    finally:
        scheduler.close()
    assert text == "<|python_start|>7*6<|python_end|><|output_start|>42<|output_end|> ok"
    assert reason == "stop"
    assert plain_beside == plain_alone  # the forced tokens went into their own row only
