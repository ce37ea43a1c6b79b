"""The RL step: groups of sampled replies, advantages against the group mean, and a policy-gradient
update that makes rewarded replies likelier; only what the policy sampled is trained on, never the stop
token that ended a reply."""

import argparse
from collections.abc import Iterator

import pytest
import torch
from test_engine import random_model

from trainer import training
from trainer.chat_rl import policy_gradient_backward, sample_group
from trainer.engine import Engine, GeneratedToken
from trainer.tokenizer import Tokenizer


def letter_probability(model, tokenizer: Tokenizer, prompt: list[int]) -> float:
    """The chance that the reply starts with a letter, exactly (the toy task's expected reward)."""
    with torch.no_grad():
        probs = torch.softmax(model(torch.tensor([prompt]))[0, -1], dim=-1)
    rewarded = [t for t in range(tokenizer.vocab_size) if tokenizer.decode([t])[:1].isalpha()]
    return probs[rewarded].sum().item()


@pytest.mark.parametrize("rewarded", [True, False])
def test_one_policy_gradient_step_moves_the_mean_reward_its_way(
    tiny_tokenizer: Tokenizer, rewarded: bool
) -> None:
    """Toy task: reward 1 for a reply starting with a letter (or, flipped, for one that does not)."""
    model = random_model(tiny_tokenizer.vocab_size)
    engine = Engine(model, tiny_tokenizer)
    prompt = [tiny_tokenizer.bos_token_id]
    args = argparse.Namespace(
        num_samples=32, device_batch_size=8, max_new_tokens=1, temperature=1.0, top_k=None
    )
    group = sample_group(engine, prompt, lambda reply: reply[:1].isalpha() == rewarded, args, seed=0)
    assert group.inputs.shape == (32, 1) and 0 < group.rewards.mean() < 1
    assert torch.allclose(group.advantages.sum(), torch.zeros(()), atol=1e-5)

    before = letter_probability(model, tiny_tokenizer, prompt)
    lrs = training.LearningRates(matrix_lr=0.02, embedding_lr=0.3, unembedding_lr=0.008, scalar_lr=0.5)
    optimizer = training.build_optimizer(model.train(), lrs, weight_decay=0.0, lr_frac=0.1)
    policy_gradient_backward(model, group, batch_size=8, normalizer=4)
    optimizer.step()
    after = letter_probability(model.eval(), tiny_tokenizer, prompt)
    # One small step: the probability moves by about half a percentage point, in the rewarded direction.
    assert (after - before if rewarded else before - after) > 0.003, (before, after)


class ScriptedEngine(Engine):
    """Replays fixed token streams as the model would sample them, stop token included (and what the tool
    forced marked); the engine's own complete() makes replies of them."""

    def __init__(self, tokenizer: Tokenizer, streams: list[list[GeneratedToken]]) -> None:
        super().__init__(random_model(tokenizer.vocab_size), tokenizer)
        self.streams = streams

    def generate(self, prompt: list[int], num_samples: int = 1, **kwargs) -> Iterator[list]:
        streams = self.streams[:num_samples]
        for i in range(max(len(stream) for stream in streams)):
            yield [stream[i] if i < len(stream) else None for stream in streams]


def test_only_sampled_tokens_are_trained_on_not_the_stop_token(tiny_tokenizer: Tokenizer) -> None:
    special, encode = tiny_tokenizer.encode_special, tiny_tokenizer.encode
    stop = special("<|assistant_end|>")
    sampled = [special("<|python_start|>"), *encode("2+3"), special("<|python_end|>")]
    forced = [special("<|output_start|>"), *encode("5"), special("<|output_end|>")]
    answer = encode(" #### 5")
    tool_reply = [
        *(GeneratedToken(t, False) for t in sampled),
        *(GeneratedToken(t, True) for t in forced),
        *(GeneratedToken(t, False) for t in [*answer, stop]),
    ]
    short = encode(" #### 4")
    short_reply = [GeneratedToken(t, False) for t in [*short, stop]]
    engine = ScriptedEngine(tiny_tokenizer, [tool_reply, short_reply])
    prompt = [tiny_tokenizer.bos_token_id, *encode("2+3?")]
    args = argparse.Namespace(
        num_samples=2, device_batch_size=2, max_new_tokens=32, temperature=1.0, top_k=None
    )
    group = sample_group(engine, prompt, lambda reply: reply.endswith("#### 5"), args, seed=0)

    assert group.rewards.tolist() == [1.0, 0.0] and group.advantages.tolist() == [0.5, -0.5]
    p = len(prompt) - 1  # targets[i] is token i + 1
    expected = [-1] * p + sampled + [-1] * len(forced) + answer
    assert group.targets[0].tolist() == expected  # the reply's sampled tokens, and no stop token
    assert group.targets[1].tolist() == [-1] * p + short + [-1] * (len(expected) - p - len(short))
    assert stop not in group.targets.flatten().tolist()
