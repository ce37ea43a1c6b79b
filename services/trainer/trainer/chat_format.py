"""
Conversations as token ids plus a loss mask, the format that SFT and RL train on and the engine samples in:

    <|bos|><|user_start|>Hi<|user_end|><|assistant_start|>Hello!<|assistant_end|><|user_start|>…

The mask is 1 on what the assistant must learn to produce — its text, its tool calls
(<|python_start|>code<|python_end|>) and <|assistant_end|> — and 0 on BOS, user turns,
<|assistant_start|> (always given to it) and tool outputs (<|output_start|>…<|output_end|>, written
by the sandbox, not the model).

There is no system role in the token format: a leading system message is merged into the first user
message ("<system text>\n\n<user text>"), as nanochat does, so a system prompt costs no new tokens.

A message is {"role": "system"|"user"|"assistant", "content": str}; an assistant's content may also
be a list of parts {"type": "text"|"python"|"python_output", "text": str}.
"""

from typing import Any

from trainer.tokenizer import Tokenizer

Message = dict[str, Any]
PART_TYPES = ("text", "python", "python_output")

# The same rendering as a Jinja template: the inference server hands it to clients that build prompts
# themselves, and exports carry it as the Hugging Face tokenizer's chat template.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% set ns = namespace(system='') %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% set ns.system = message['content'] + '\\n\\n' %}"
    "{% elif message['role'] == 'user' %}"
    "<|user_start|>{{ ns.system }}{{ message['content'] }}<|user_end|>{% set ns.system = '' %}"
    "{% elif not loop.last or not add_generation_prompt %}"
    "<|assistant_start|>{{ message['content'] }}<|assistant_end|>"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant_start|>{% endif %}"
)


class ConversationError(ValueError):
    """The messages do not form a valid conversation; the message says which one and why."""


def normalize(messages: list[Message]) -> list[Message]:
    """Check roles and content; return the conversation with a leading system message merged in."""
    if not messages:
        raise ConversationError("a conversation needs at least one message")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or set(message) - {"role", "content"} or "role" not in message:
            raise ConversationError(f"message {i}: expected {{'role': ..., 'content': ...}}, got {message!r}")
    offset = 0  # error messages count the caller's messages, system message included
    if messages[0]["role"] == "system":
        if len(messages) < 2 or messages[1]["role"] != "user":
            raise ConversationError("message 1: a system message must be followed by a user message")
        system, first, *rest = messages
        messages = [{"role": "user", "content": f"{system['content']}\n\n{first['content']}"}, *rest]
        offset = 1
    for i, message in enumerate(messages):
        expected = "user" if i % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise ConversationError(
                f"message {i + offset}: roles must alternate user/assistant starting with user; "
                f"expected {expected!r}, got {message['role']!r}"
            )
        content = message.get("content")
        if expected == "user" and not isinstance(content, str):
            raise ConversationError(f"message {i + offset}: user content must be a string")
        if expected == "assistant" and not (isinstance(content, str) or is_part_list(content)):
            raise ConversationError(
                f"message {i + offset}: assistant content must be a string or a list of "
                f"{{'type': {'|'.join(PART_TYPES)}, 'text': str}} parts"
            )
    return messages


def is_part_list(content: Any) -> bool:
    return isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") in PART_TYPES and isinstance(p.get("text"), str)
        for p in content
    )


def render_conversation(
    tokenizer: Tokenizer, messages: list[Message], max_tokens: int = 2048
) -> tuple[list[int], list[int]]:
    """(ids, mask), truncated to max_tokens; mask 1 marks the tokens the assistant is trained on."""
    ids: list[int] = []
    mask: list[int] = []

    def add(tokens: list[int], learn: bool) -> None:
        ids.extend(tokens)
        mask.extend([int(learn)] * len(tokens))

    special = tokenizer.encode_special
    add([tokenizer.bos_token_id], learn=False)
    for message in normalize(messages):
        if message["role"] == "user":
            add(
                [special("<|user_start|>"), *tokenizer.encode(message["content"]), special("<|user_end|>")],
                False,
            )
            continue
        add([special("<|assistant_start|>")], learn=False)
        content = message["content"]
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        for part in parts:
            text = tokenizer.encode(part["text"])
            if part["type"] == "text":
                add(text, learn=True)
            elif part["type"] == "python":
                add([special("<|python_start|>"), *text, special("<|python_end|>")], learn=True)
            else:  # python_output: produced by the tool at run time
                add([special("<|output_start|>"), *text, special("<|output_end|>")], learn=False)
        add([special("<|assistant_end|>")], learn=True)
    return ids[:max_tokens], mask[:max_tokens]


def render_for_completion(tokenizer: Tokenizer, messages: list[Message]) -> list[int]:
    """The prompt for the assistant's next turn: the conversation minus a final assistant reply, primed
    with <|assistant_start|>."""
    messages = normalize(messages)
    if messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    ids, _ = render_conversation(tokenizer, messages, max_tokens=10**9)
    return [*ids, tokenizer.encode_special("<|assistant_start|>")]
