"""The engine: cached decoding equals full forward passes, rows are independent, tools are forced in,
and streamed text never splits a character."""

import pytest
import torch

from trainer.engine import Engine, KVCache, TextStream, sample
from trainer.gpt import GPT, GPTConfig
from trainer.tokenizer import Tokenizer


def random_model(vocab_size: int, seed: int = 0) -> GPT:
    """A small model whose zero-initialised parts are not zero, so every path carries signal."""
    torch.manual_seed(seed)
    config = GPTConfig(sequence_len=64, vocab_size=vocab_size, n_layer=3, n_head=4, n_kv_head=2, n_embd=64)
    model = GPT(config)
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def test_greedy_generation_equals_argmax_of_full_forward_passes(tiny_tokenizer: Tokenizer) -> None:
    model = random_model(tiny_tokenizer.vocab_size)
    prompt = tiny_tokenizer.encode("ka to mi", prepend=tiny_tokenizer.bos_token_id)
    (completion,) = Engine(model, tiny_tokenizer).complete(prompt, max_tokens=12, temperature=0)
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(len(completion)):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert [t.id for t in completion] == ids[len(prompt) :] and len(completion) > 0


def test_samples_from_one_prefill_equal_separate_runs_with_their_seeds(tiny_tokenizer: Tokenizer) -> None:
    model = random_model(tiny_tokenizer.vocab_size)
    engine = Engine(model, tiny_tokenizer)
    prompt = tiny_tokenizer.encode("ne ru sa", prepend=tiny_tokenizer.bos_token_id)
    settings = {"max_tokens": 10, "temperature": 1.0, "top_k": 50}
    together = engine.complete(prompt, num_samples=3, seed=7, **settings)
    alone = [engine.complete(prompt, num_samples=1, seed=7 + i, **settings)[0] for i in range(3)]
    assert together == alone
    assert len({tuple(t.id for t in row) for row in together}) > 1  # the rows really differ


def test_rows_of_different_lengths_decode_together_as_they_would_alone() -> None:
    model = random_model(300)
    prompts = [torch.randint(0, 300, (1, 9)), torch.randint(0, 300, (1, 23))]
    continuation = torch.randint(0, 300, (2, 5))
    batch = KVCache(model, batch_size=2, max_len=40)
    with torch.no_grad():
        for row, prompt in enumerate(prompts):  # each prefilled on its own, then copied in
            single = KVCache(model, batch_size=1, max_len=prompt.size(1))
            model(prompt, kv_cache=single)
            batch.copy_rows(single, 0, [row])
        steps = [model(continuation[:, t : t + 1], kv_cache=batch)[:, -1] for t in range(5)]
        for row, prompt in enumerate(prompts):
            full = model(torch.cat([prompt, continuation[row : row + 1]], dim=1))[0, -5:]
            assert torch.allclose(torch.stack([s[row] for s in steps]), full, atol=1e-4)


class ScriptedModel(GPT):
    """Always predicts the next token of a script from the token it was just fed."""

    def __init__(self, vocab_size: int, script: dict[int, int]) -> None:
        config = GPTConfig(
            sequence_len=64, vocab_size=vocab_size, n_layer=1, n_head=1, n_kv_head=1, n_embd=64
        )
        super().__init__(config)
        self.script = script

    def forward(self, idx, targets=None, kv_cache=None, loss_reduction="mean"):
        logits = torch.zeros(idx.size(0), idx.size(1), self.config.vocab_size)
        for b in range(idx.size(0)):
            logits[b, -1, self.script.get(int(idx[b, -1]), 0)] = 10.0
        return logits


def test_a_calculator_call_has_its_result_forced_into_the_row(tiny_tokenizer: Tokenizer) -> None:
    special = tiny_tokenizer.encode_special
    two, plus, three, five = (tiny_tokenizer.encode(c)[0] for c in "2+35")
    start, end = special("<|python_start|>"), special("<|python_end|>")
    script = {
        special("<|assistant_start|>"): start,
        start: two,
        two: plus,
        plus: three,
        three: end,
        special("<|output_end|>"): special("<|assistant_end|>"),
    }
    engine = Engine(ScriptedModel(tiny_tokenizer.vocab_size, script), tiny_tokenizer)
    prompt = [tiny_tokenizer.bos_token_id, special("<|assistant_start|>")]
    (completion,) = engine.complete(prompt, max_tokens=20, temperature=0)
    expected = [start, two, plus, three, end, special("<|output_start|>"), five, special("<|output_end|>")]
    assert [t.id for t in completion] == expected
    assert [t.forced for t in completion] == [False] * 5 + [True] * 3


def test_streamed_text_never_splits_a_character(tiny_tokenizer: Tokenizer) -> None:
    text = "Grüße, 東京! привет 🚀 naïve café"
    ids = tiny_tokenizer.encode(text)
    partial = [i for i in ids if not is_utf8(tiny_tokenizer.decode_bytes([i]))]
    assert partial, "the test needs a character that spans several tokens"
    stream = TextStream(tiny_tokenizer)
    pieces = [stream.push(i) for i in ids]
    assert "".join(pieces) + stream.flush() == text
    assert "\ufffd" not in "".join(pieces)


def is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@pytest.mark.parametrize(("top_k", "top_p"), [(1, None), (None, 0.05)])
def test_top_k_one_and_a_tiny_top_p_are_greedy(top_k, top_p) -> None:
    logits = torch.tensor([0.1, 2.0, 1.9, -1.0])
    generator = torch.Generator().manual_seed(0)
    assert {sample(logits, 1.0, top_k, top_p, generator) for _ in range(50)} == {1}


@pytest.mark.parametrize("temperature", [1e-6, 1e-30, 1e-45, 1e-46, 5e-324])  # the last two are 0 in float32
def test_a_vanishing_temperature_samples_the_argmax_instead_of_failing(temperature: float) -> None:
    logits = torch.tensor([0.1, 2.0, 1.9, -1.0, float("-inf")])
    generator = torch.Generator().manual_seed(0)
    assert {sample(logits, temperature, None, None, generator) for _ in range(20)} == {1}
    assert sample(logits, temperature, 2, 0.9, generator) == 1


def test_top_p_samples_only_from_the_nucleus() -> None:
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    generator = torch.Generator().manual_seed(0)
    drawn = {sample(logits, 1.0, None, 0.7, generator) for _ in range(300)}
    assert drawn == {0, 1}  # 0.5 + 0.3 ≥ 0.7: the two most likely tokens only
