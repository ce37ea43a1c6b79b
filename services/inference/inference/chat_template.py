"""
OpenAI messages ↔ our chat token format (trainer.chat_format).

The model's tool calls travel inside the assistant's text with the special tokens' own spellings, so
any OpenAI client shows them and a UI can set them apart:

    The answer is <|python_start|>12*7<|python_end|><|output_start|>84<|output_end|> 84.

When a client sends such a reply back as history, the markers become the tool parts they stand for
(as tokens, not as text). trainer.chat_format.CHAT_TEMPLATE is the same rendering as a Jinja template
(GET /tokenizer_info), for clients that build prompts themselves.
"""

import re

from inference.protocol import ChatMessage
from trainer.chat_format import Message

TOOL_PART = re.compile(
    r"<\|python_start\|>(?P<python>.*?)<\|python_end\|>|<\|output_start\|>(?P<output>.*?)<\|output_end\|>",
    re.DOTALL,
)


def assistant_parts(text: str) -> str | list[dict]:
    """An assistant reply as message parts: text, python calls and their outputs."""
    if "<|" not in text:
        return text
    parts, position = [], 0
    for match in TOOL_PART.finditer(text):
        if match.start() > position:
            parts.append({"type": "text", "text": text[position : match.start()]})
        if match.group("python") is not None:
            parts.append({"type": "python", "text": match.group("python")})
        else:
            parts.append({"type": "python_output", "text": match.group("output")})
        position = match.end()
    if position < len(text):
        parts.append({"type": "text", "text": text[position:]})
    return parts


def to_conversation(messages: list[ChatMessage]) -> list[Message]:
    return [
        {"role": m.role, "content": assistant_parts(m.text()) if m.role == "assistant" else m.text()}
        for m in messages
    ]
