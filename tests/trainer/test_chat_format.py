"""Conversations render to ids with a mask that is 1 exactly on what the assistant must learn."""

import pytest

from trainer.chat_format import ConversationError, render_conversation, render_for_completion
from trainer.tokenizer import Tokenizer


def learned_text(tokenizer: Tokenizer, ids: list[int], mask: list[int]) -> list[str]:
    """The decoded runs of consecutive mask-1 tokens."""
    runs, current = [], []
    for token, m in zip(ids, mask, strict=True):
        if m:
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    return runs + ([tokenizer.decode(current)] if current else [])


def test_multi_turn_masks_only_the_assistant_replies(tiny_tokenizer: Tokenizer) -> None:
    messages = [
        {"role": "user", "content": "hello there"},
        {"role": "assistant", "content": "hi! how can I help?"},
        {"role": "user", "content": "tell me 2+2"},
        {"role": "assistant", "content": "it is 4"},
    ]
    ids, mask = render_conversation(tiny_tokenizer, messages)
    assert len(ids) == len(mask)
    assert tiny_tokenizer.decode(ids) == (
        "<|bos|><|user_start|>hello there<|user_end|><|assistant_start|>hi! how can I help?<|assistant_end|>"
        "<|user_start|>tell me 2+2<|user_end|><|assistant_start|>it is 4<|assistant_end|>"
    )
    assert mask[0] == 0  # BOS
    assert learned_text(tiny_tokenizer, ids, mask) == [
        "hi! how can I help?<|assistant_end|>",
        "it is 4<|assistant_end|>",
    ]


def test_tool_calls_are_learned_and_tool_outputs_are_not(tiny_tokenizer: Tokenizer) -> None:
    messages = [
        {"role": "user", "content": "what is 123*45?"},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Let me compute. "},
                {"type": "python", "text": "123*45"},
                {"type": "python_output", "text": "5535"},
                {"type": "text", "text": " So it is 5535."},
            ],
        },
    ]
    ids, mask = render_conversation(tiny_tokenizer, messages)
    assert learned_text(tiny_tokenizer, ids, mask) == [
        "Let me compute. <|python_start|>123*45<|python_end|>",
        " So it is 5535.<|assistant_end|>",
    ]
    assert "<|output_start|>5535<|output_end|>" in tiny_tokenizer.decode(ids)


def test_system_message_is_merged_into_the_first_user_turn(tiny_tokenizer: Tokenizer) -> None:
    with_system = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
    ]
    merged = [{"role": "user", "content": "Be brief.\n\nhi"}, {"role": "assistant", "content": "hello"}]
    assert render_conversation(tiny_tokenizer, with_system) == render_conversation(tiny_tokenizer, merged)


@pytest.mark.parametrize(
    ("messages", "error"),
    [
        ([], "at least one message"),
        ([{"role": "assistant", "content": "hi"}], "message 0: roles must alternate"),
        (
            [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
            "message 1: roles must alternate",
        ),
        (
            [
                {"role": "system", "content": "s"},
                {"role": "user", "content": "a"},
                {"role": "system", "content": "s"},
            ],
            "message 2: roles must alternate",
        ),
        ([{"role": "system", "content": "s"}], "followed by a user message"),
        ([{"role": "user", "content": ["not", "text"]}], "user content must be a string"),
        (
            [
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": [{"type": "shell", "text": "ls"}]},
            ],
            "assistant content must be a string or a list",
        ),
        ([{"role": "user", "text": "a"}], "expected {'role'"),
    ],
)
def test_invalid_conversations_fail_with_a_clear_error(
    tiny_tokenizer: Tokenizer, messages, error: str
) -> None:
    with pytest.raises(ConversationError, match=error.replace("{", r"\{").replace("(", r"\(")):
        render_conversation(tiny_tokenizer, messages)


def test_truncation_keeps_ids_and_mask_aligned(tiny_tokenizer: Tokenizer) -> None:
    messages = [{"role": "user", "content": "word " * 50}, {"role": "assistant", "content": "reply " * 50}]
    full_ids, full_mask = render_conversation(tiny_tokenizer, messages)
    ids, mask = render_conversation(tiny_tokenizer, messages, max_tokens=20)
    assert (ids, mask) == (full_ids[:20], full_mask[:20])


def test_completion_prompt_drops_the_reply_and_primes_the_assistant(tiny_tokenizer: Tokenizer) -> None:
    messages = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    prompt = render_for_completion(tiny_tokenizer, messages)
    assert tiny_tokenizer.decode(prompt) == "<|bos|><|user_start|>2+2?<|user_end|><|assistant_start|>"
    assert render_for_completion(tiny_tokenizer, messages[:1]) == prompt
