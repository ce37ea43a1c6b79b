"""A request the model cannot go on with (its row's logits are NaN) fails alone: the requests decoding
beside it in the same batch finish as if it had never come."""

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.inference.conftest import AUTH_HEADER, SLOW_CONFIG, start_server, write_checkpoint

BROKEN_TOKEN = 300  # an ordinary token whose embedding is NaN: prompts that hold it break the model
MODEL = "broken-sft"


@pytest.fixture(scope="module")
def broken_server(slow_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The slow model (its replies take seconds), broken for BROKEN_TOKEN, as the only model."""
    base = tmp_path_factory.mktemp("inference-broken")
    shutil.copytree(slow_base / "runs" / "slow" / "tokenizer", base / "runs" / "broken" / "tokenizer")
    write_checkpoint(
        base / "runs", "broken", "sft", 1, seed=1, config=SLOW_CONFIG, never_stop=True, nan_token=BROKEN_TOKEN
    )
    process, url = start_server(base, tmp_path_factory.mktemp("inference-broken-run"))
    yield url
    process.stop()


def completion(client: httpx.Client, prompt: list[int], **options) -> httpx.Response:
    return client.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 4, **options})


def test_a_request_the_model_breaks_on_fails_alone_and_its_neighbours_go_on(broken_server: str) -> None:
    """Sampling from NaN probabilities once raised in the batch's step and failed every request in it."""
    good = {"model": MODEL, "prompt": [5, 6, 7], "max_tokens": 150, "temperature": 0}
    with httpx.Client(base_url=broken_server, headers=AUTH_HEADER, timeout=120) as client:
        alone = client.post("/v1/completions", json=good).json()["choices"][0]["text"]
        with client.stream("POST", "/v1/completions", json={**good, "stream": True}) as stream:
            lines = (line for line in stream.iter_lines() if line.startswith("data: "))
            streamed = [next(lines)]  # from here on the good request holds a batch row
            sampled = completion(client, [5, BROKEN_TOKEN])
            greedy = completion(client, [BROKEN_TOKEN], temperature=0)
            streamed += list(lines)
    assert streamed[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in streamed[:-1]]
    assert all("error" not in chunk for chunk in chunks), chunks[-1]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert "".join(chunk["choices"][0]["text"] for chunk in chunks) == alone
    for response in (sampled, greedy):  # either way: an error, never a reply made of NaN
        assert response.status_code == 500, response.text
        assert "not finite" in response.json()["error"]["message"]
