"""
The request bodies of OpenAI's chat and completions APIs (and vLLM's tokenizer routes), with the
bounds we enforce, and OpenAI's error shape. Unknown fields are ignored as OpenAI-compatible servers
do (clients send fields such as `user` or `presence_penalty` that change nothing here).
"""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from trainer.engine import GREEDY_BELOW_TEMPERATURE

MAX_STOP_STRINGS = 16
MAX_N = 16


class OpenAIError(Exception):
    """Answered as {"error": {"message", "type", "param", "code"}} with this HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(Lenient):
    type: Literal["text"]
    text: str


class ChatMessage(Lenient):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(Lenient):
    include_usage: bool = False


class SamplingFields(Lenient):
    """What chat and completions requests share."""

    model: str = "default"
    temperature: float = Field(
        default=1.0, ge=0, le=2, description=f"below {GREEDY_BELOW_TEMPERATURE:g} (0 included): greedy"
    )
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=-1, description="extension: -1 or 0 turn it off")
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, le=2**62)
    n: int = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None

    @field_validator("stop")
    @classmethod
    def bounded_stop(cls, stop: str | list[str] | None) -> str | list[str] | None:
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > MAX_STOP_STRINGS or any(not s for s in stops):
            raise ValueError(f"at most {MAX_STOP_STRINGS} non-empty stop strings")
        return stop

    def stop_strings(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    def top_k_or_none(self) -> int | None:
        return self.top_k if self.top_k and self.top_k > 0 else None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int = Field(default=16, ge=0)
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=5)

    @field_validator("prompt")
    @classmethod
    def not_empty(cls, prompt: str | list) -> str | list:
        if isinstance(prompt, list) and (not prompt or any(isinstance(p, list) and not p for p in prompt)):
            raise ValueError("prompt must not be empty")
        return prompt

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: a string, or token ids."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if all(isinstance(p, int) for p in self.prompt):
            return [list(self.prompt)]
        return list(self.prompt)


class TokenizeRequest(Lenient):
    model: str = "default"
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(Lenient):
    model: str = "default"
    tokens: list[int]
