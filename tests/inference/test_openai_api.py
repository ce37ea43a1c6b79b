"""The model server as OpenAI's own client sees it: a real `python -m inference` over tiny checkpoints."""

import codecs
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import jinja2
import openai
import pytest
import torch

from inference.completions import TextOffsets
from tests.inference.conftest import TOKEN, write_checkpoint
from tests.support import ends_inside_a_character
from trainer.chat_format import render_for_completion
from trainer.checkpoint import load_model
from trainer.engine import Engine
from trainer.tokenizer import Tokenizer

AUTH = {"Authorization": f"Bearer {TOKEN}"}
HELLO = [{"role": "user", "content": "Hello, who are you?"}]


@pytest.fixture
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key=TOKEN, max_retries=0, timeout=60)


def greedy(client: openai.OpenAI, content: str, max_tokens: int = 24) -> str:
    reply = client.chat.completions.create(
        model="tiny-sft",
        messages=[{"role": "user", "content": content}],
        max_tokens=max_tokens,
        temperature=0,
    )
    return reply.choices[0].message.content


def model_logprobs(base: Path, ids: list[int]) -> torch.Tensor:
    """log p(ids[t] | ids[:t]) for t ≥ 1 from the checkpoint's own forward pass, in this process."""
    model, _ = load_model(base / "runs" / "tiny" / "sft", 10, torch.device("cpu"), torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0]
    return torch.log_softmax(logits[:-1], dim=-1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


def test_models_list_every_checkpoint_with_aliases_and_see_new_ones(
    client: openai.OpenAI, served_base: Path
) -> None:
    ids = {m.id: m for m in client.models.list().data}
    assert {"tiny-sft-000005", "tiny-sft-000010", "tiny-sft", "tiny-base-000003", "tiny-base"} <= set(ids)
    assert ids["tiny-sft"].root == "tiny-sft-000010"  # the stage alias is its latest step
    assert ids["default"].root == "tiny-sft-000010"  # the newest chat checkpoint, not the base one
    write_checkpoint(served_base / "runs", "tiny", "rl", 7, seed=7)
    ids = {m.id: m for m in client.models.list().data}  # no restart
    assert ids["tiny-rl-000007"].root == "tiny-rl-000007"
    reply = client.chat.completions.create(model="tiny-rl-000007", messages=HELLO, max_tokens=3)
    assert reply.model == "tiny-rl-000007"


def test_chat_completion_with_usage_that_counts_the_rendered_prompt(
    client: openai.OpenAI, server: str
) -> None:
    reply = client.chat.completions.create(model="tiny-sft", messages=HELLO, max_tokens=12, temperature=0)
    choice = reply.choices[0]
    assert reply.object == "chat.completion" and choice.message.role == "assistant"
    prompt = httpx.post(
        f"{server}/tokenize", json={"model": "tiny-sft", "messages": HELLO}, headers=AUTH
    ).json()
    assert reply.usage.prompt_tokens == prompt["count"]
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    if choice.finish_reason == "length":
        assert reply.usage.completion_tokens == 12
    else:
        assert choice.finish_reason == "stop" and reply.usage.completion_tokens < 12


def test_streaming_sends_the_role_first_then_the_text_then_the_reason_and_usage(
    client: openai.OpenAI,
) -> None:
    chunks = list(
        client.chat.completions.create(
            model="tiny-sft",
            messages=HELLO,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    *content_chunks, last_choice, usage_chunk = chunks
    assert last_choice.choices[0].finish_reason in ("stop", "length")
    assert usage_chunk.choices == [] and usage_chunk.usage.completion_tokens >= 1
    streamed = "".join(c.choices[0].delta.content or "" for c in content_chunks)
    assert streamed == greedy(client, HELLO[0]["content"], max_tokens=12)


def test_n_samples_are_the_seeded_single_samples(client: openai.OpenAI) -> None:
    options = {"model": "tiny-sft", "messages": HELLO, "max_tokens": 10, "temperature": 1.0}
    together = client.chat.completions.create(n=3, seed=7, **options)
    alone = [
        client.chat.completions.create(seed=7 + i, **options).choices[0].message.content for i in range(3)
    ]
    assert [c.message.content for c in sorted(together.choices, key=lambda c: c.index)] == alone
    assert len(set(alone)) > 1


def test_a_vanishing_temperature_answers_greedily_and_spoils_no_other_stream(client: openai.OpenAI) -> None:
    """temperature=1e-45 once made NaN probabilities that failed every row decoding beside it (and
    1e-46, 0 in float32, still did until temperatures below 1e-5 became greedy)."""
    options = {"model": "tiny-sft", "messages": HELLO, "max_tokens": 12}
    with ThreadPoolExecutor(2) as pool:
        tiny = pool.submit(client.chat.completions.create, temperature=1e-46, **options)
        other = pool.submit(client.chat.completions.create, temperature=1.0, seed=3, **options)
        assert tiny.result().choices[0].message.content == greedy(client, HELLO[0]["content"], max_tokens=12)
        assert other.result().choices[0].finish_reason in ("stop", "length")


def test_a_stop_string_ends_the_reply_before_it(client: openai.OpenAI) -> None:
    full = greedy(client, "Tell me a story", max_tokens=40)
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    first = full.index(stop)
    reply = client.chat.completions.create(
        model="tiny-sft",
        messages=[{"role": "user", "content": "Tell me a story"}],
        max_tokens=40,
        temperature=0,
        stop=[stop],
    )
    assert reply.choices[0].message.content == full[:first]
    assert reply.choices[0].finish_reason == "stop"


def test_a_reply_cut_inside_a_character_ends_before_it_without_a_replacement_character(
    client: openai.OpenAI,
) -> None:
    # Find a greedy reply and a length at which its bytes end partway through a character.
    for number in range(20):
        messages = [{"role": "user", "content": f"Question {number}: what now?"}]
        reply = client.chat.completions.create(
            model="tiny-sft", messages=messages, max_tokens=40, temperature=0, logprobs=True
        )
        pieces = [bytes(entry.bytes) for entry in reply.choices[0].logprobs.content]
        cuts = [k for k in range(1, len(pieces)) if ends_inside_a_character(b"".join(pieces[:k]))]
        if cuts:
            break
    else:
        pytest.fail("no greedy reply split a character: the test needs one")
    cut_bytes = b"".join(pieces[: cuts[0]])
    complete = codecs.getincrementaldecoder("utf-8")(errors="replace").decode(cut_bytes)  # the tail held
    assert cut_bytes.decode("utf-8", errors="replace") == complete + "\ufffd"

    stream = client.chat.completions.create(
        model="tiny-sft", messages=messages, max_tokens=cuts[0], temperature=0, stream=True
    )
    chunks = [c.choices[0] for c in stream if c.choices]
    assert "".join(c.delta.content or "" for c in chunks) == complete
    assert chunks[-1].finish_reason == "length"
    whole = client.chat.completions.create(
        model="tiny-sft", messages=messages, max_tokens=cuts[0], temperature=0
    )
    assert whole.choices[0].message.content == complete


def test_chat_logprobs_are_the_models_own(client: openai.OpenAI, server: str, served_base: Path) -> None:
    reply = client.chat.completions.create(
        model="tiny-sft", messages=HELLO, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3
    )
    content = reply.choices[0].logprobs.content
    # the same greedy reply, decoded in this process from the checkpoint
    tokenizer = Tokenizer.load(served_base / "runs" / "tiny" / "tokenizer")
    model, _ = load_model(served_base / "runs" / "tiny" / "sft", 10, torch.device("cpu"), torch.float32)
    prompt = render_for_completion(tokenizer, HELLO)
    (reply_tokens,) = Engine(model, tokenizer).complete(prompt, max_tokens=8, temperature=0)
    ids = [t.id for t in reply_tokens]
    assert [bytes(e.bytes) for e in content] == [tokenizer.decode_bytes([i]) for i in ids]
    expected = model_logprobs(served_base, prompt + ids)[len(prompt) - 1 :]
    assert [e.logprob for e in content] == pytest.approx(expected.tolist(), abs=1e-4)
    for entry in content:  # greedy: the chosen token is the likeliest one
        assert len(entry.top_logprobs) == 3
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
        assert bytes(entry.bytes).decode("utf-8", errors="replace") == entry.token


def test_completions_echo_scores_the_prompt_as_the_forward_pass_does(
    client: openai.OpenAI, served_base: Path
) -> None:
    tokenizer = Tokenizer.load(served_base / "runs" / "tiny" / "tokenizer")
    ids = tokenizer.encode("doc0042: kato miru gra", prepend=tokenizer.bos_token_id)
    reply = client.completions.create(model="tiny-sft", prompt=ids, max_tokens=0, echo=True, logprobs=2)
    logprobs = reply.choices[0].logprobs
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    assert logprobs.token_logprobs[1:] == pytest.approx(model_logprobs(served_base, ids).tolist(), abs=1e-4)
    assert all(len(top) <= 2 for top in logprobs.top_logprobs[1:])
    text = reply.choices[0].text
    for token, offset in zip(logprobs.tokens, logprobs.text_offset, strict=True):
        assert text[offset : offset + len(token)] == token
    assert reply.usage.prompt_tokens == len(ids) and reply.usage.completion_tokens == 0


def test_text_offsets_stay_on_the_text_when_characters_span_tokens(
    client: openai.OpenAI, served_base: Path
) -> None:
    tokenizer = Tokenizer.load(served_base / "runs" / "tiny" / "tokenizer")
    ids = tokenizer.encode("東京 🚀 and then café", prepend=tokenizer.bos_token_id)
    pieces = [tokenizer.decode_bytes(ids[: k + 1]) for k in range(len(ids))]
    assert any(ends_inside_a_character(p) for p in pieces), "the test needs a character split across tokens"
    options = {
        "model": "tiny-base",
        "prompt": ids,
        "max_tokens": 6,
        "temperature": 0,
        "echo": True,
        "logprobs": 0,
    }
    whole = client.completions.create(**options)
    text, logprobs = whole.choices[0].text, whole.choices[0].logprobs
    assert len(logprobs.text_offset) == len(ids) + 6
    assert logprobs.text_offset == sorted(logprobs.text_offset) and logprobs.text_offset[-1] <= len(text)
    for token, offset in zip(logprobs.tokens, logprobs.text_offset, strict=True):
        if "\ufffd" not in token:  # a piece of a character reads as U+FFFD alone, not in the text
            assert text[offset : offset + len(token)] == token
    streamed = [c.choices[0].logprobs for c in client.completions.create(**options, stream=True)]
    assert [o for chunk in streamed if chunk for o in chunk.text_offset] == logprobs.text_offset


class ByteTokens:
    """A tokenizer whose token i is the bytes pieces[i]."""

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = pieces

    def decode_bytes(self, tokens: list[int]) -> bytes:
        return b"".join(self.pieces[t] for t in tokens)


@pytest.mark.parametrize(
    ("pieces", "offsets"),
    [
        ([b"\xe6\x9d", b"\xb1a"], [0, 0]),  # 東 split: both pieces start at it
        ([b"\xe6", b"mika"], [0, 1]),  # a lead byte nothing continues is a U+FFFD of its own
        ([b"\xef\xbf", b"\xbd", b"a"], [0, 0, 1]),  # a real U+FFFD split across tokens
        ([b"\xed\xa0", b"\x80x"], [0, 2]),  # an encoded surrogate: a U+FFFD per byte
    ],
)
def test_text_offsets_count_the_characters_before_each_tokens_first_byte(
    pieces: list[bytes], offsets: list[int]
) -> None:
    tokens = list(range(len(pieces)))
    text = b"".join(pieces).decode("utf-8", errors="replace")
    assert TextOffsets(0).advance(ByteTokens(pieces), tokens) == offsets
    assert all(offset <= len(text) for offset in offsets)
    streamed = TextOffsets(0)  # a token at a time, as chunks come
    assert [streamed.advance(ByteTokens(pieces), [t])[0] for t in tokens] == offsets


def test_completions_take_several_prompts_and_stream(client: openai.OpenAI) -> None:
    reply = client.completions.create(
        model="tiny-base", prompt=["doc0001: ka", "doc0002: mi"], max_tokens=5, n=2
    )
    assert sorted(c.index for c in reply.choices) == [0, 1, 2, 3]
    streamed: dict[int, str] = {}
    for chunk in client.completions.create(
        model="tiny-base", prompt="doc0001: ka", max_tokens=6, temperature=0, stream=True, echo=True
    ):
        for choice in chunk.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + choice.text
    whole = client.completions.create(
        model="tiny-base", prompt="doc0001: ka", max_tokens=6, temperature=0, echo=True
    )
    assert streamed[0] == whole.choices[0].text and whole.choices[0].text.startswith("<|bos|>doc0001: ka")


def test_tokenize_round_trip_and_the_chat_template_renders_like_the_server(
    server: str, served_base: Path
) -> None:
    text = "naïve café 東京 🚀 x = 42"
    tokens = httpx.post(
        f"{server}/tokenize", json={"prompt": text, "add_special_tokens": False}, headers=AUTH
    )
    body = tokens.json()
    assert body["count"] == len(body["tokens"]) and body["max_model_len"] == 256
    back = httpx.post(f"{server}/detokenize", json={"tokens": body["tokens"]}, headers=AUTH).json()
    assert back["prompt"] == text
    info = httpx.get(f"{server}/tokenizer_info", headers=AUTH).json()
    assert (info["bos_token"], info["eos_token"]) == ("<|bos|>", "<|assistant_end|>")
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 12*7?"},
        {
            "role": "assistant",
            "content": "<|python_start|>12*7<|python_end|><|output_start|>84<|output_end|>84",
        },
        {"role": "user", "content": "Thanks!"},
    ]
    rendered = jinja2.Template(info["chat_template"]).render(
        messages=messages, bos_token=info["bos_token"], add_generation_prompt=True
    )
    tokens = httpx.post(f"{server}/tokenize", json={"messages": messages}, headers=AUTH).json()["tokens"]
    decoded = httpx.post(f"{server}/detokenize", json={"tokens": tokens}, headers=AUTH).json()["prompt"]
    assert decoded == rendered
    # the tool markers of a reply sent back as history are the tool's special tokens, not text
    tokenizer = Tokenizer.load(served_base / "runs" / "tiny" / "tokenizer")
    assert tokenizer.encode_special("<|python_start|>") in tokens
    assert tokenizer.encode_special("<|output_end|>") in tokens


@pytest.mark.parametrize(
    ("call", "status", "param", "code"),
    [
        ({"model": "nope", "messages": HELLO}, 404, "model", "model_not_found"),
        ({"model": "tiny-sft", "messages": HELLO, "temperature": 5}, 400, "temperature", None),
        ({"model": "tiny-sft", "messages": [{"role": "robot", "content": "x"}]}, 400, "messages", None),
        ({"model": "tiny-sft", "messages": HELLO * 2}, 400, "messages", None),  # two user turns in a row
        (
            {"model": "tiny-sft", "messages": [{"role": "user", "content": "ka " * 400}]},
            400,
            "messages",
            "context_length_exceeded",
        ),
    ],
)
def test_errors_have_openais_shape(
    server: str, call: dict, status: int, param: str, code: str | None
) -> None:
    response = httpx.post(f"{server}/v1/chat/completions", json=call, headers=AUTH, timeout=30)
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["param"], error["code"]) == (param, code) and error["message"]
    if code == "context_length_exceeded":
        assert "256" in error["message"]


def test_a_body_over_the_size_limit_is_refused_whether_announced_or_chunked(server: str) -> None:
    body = json.dumps({"model": "default", "messages": [{"role": "user", "content": "ka " * 400_000}]})
    url = f"{server}/v1/chat/completions"
    headers = {**AUTH, "Content-Type": "application/json"}
    announced = httpx.post(url, content=body, headers=headers, timeout=30)  # with Content-Length
    pieces = (body[i : i + 65536].encode() for i in range(0, len(body), 65536))
    chunked = httpx.post(url, content=pieces, headers=headers, timeout=30)  # no length up front
    for response in (announced, chunked):
        assert response.status_code == 413
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_sixteen_concurrent_greedy_streams_equal_sixteen_serial_requests(client: openai.OpenAI) -> None:
    prompts = [f"Question {i}: {'ka to mi ' * (i % 5)}what comes next?" for i in range(16)]
    serial = [greedy(client, p, max_tokens=32) for p in prompts]

    def streamed(prompt: str) -> str:
        stream = client.chat.completions.create(
            model="tiny-sft",
            messages=[{"role": "user", "content": prompt}],
            max_tokens=32,
            temperature=0,
            stream=True,
        )
        return "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)

    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(streamed, prompts))
    assert together == serial


def test_only_health_is_open_without_the_token(server: str) -> None:
    assert httpx.get(f"{server}/health").status_code == 200
    for path in ("/v1/models", "/metrics", "/ready", "/tokenizer_info"):
        response = httpx.get(f"{server}{path}")
        assert response.status_code == 401, path
        assert response.json()["error"]["code"] == "invalid_api_key"
    wrong = openai.OpenAI(base_url=f"{server}/v1", api_key="wrong-token-wrong-token", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()


def test_cors_admits_only_the_web_origin(server: str) -> None:
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    allowed = httpx.options(
        f"{server}/v1/chat/completions", headers={"Origin": "http://web.example", **preflight}
    )
    assert allowed.headers.get("access-control-allow-origin") == "http://web.example"
    other = httpx.options(
        f"{server}/v1/chat/completions", headers={"Origin": "http://evil.example", **preflight}
    )
    assert "access-control-allow-origin" not in other.headers


def test_ready_after_warm_up_and_metrics_in_prometheus_format(server: str, client: openai.OpenAI) -> None:
    deadline = time.monotonic() + 30
    while httpx.get(f"{server}/ready", headers=AUTH).status_code != 200:
        assert time.monotonic() < deadline, "/ready never turned 200"
        time.sleep(0.2)
    greedy(client, "hi", max_tokens=4)
    text = httpx.get(f"{server}/metrics", headers=AUTH).text
    for name in (
        "inference_requests_total{",
        "inference_prompt_tokens_total",
        "inference_generation_tokens_total",
        "inference_queue_depth{",
        "inference_running_sequences{",
        "inference_time_to_first_token_seconds_bucket",
        "inference_time_per_output_token_seconds_bucket",
    ):
        assert name in text, name
    assert 'route="/v1/chat/completions",status="200"' in text
