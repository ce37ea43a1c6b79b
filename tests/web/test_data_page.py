"""The Data page in a real browser, as a new user goes: a ShareGPT file with two broken lines dropped on
the page is reported line by line and offers no training; the fixed file is ready with its statistics
and sample rows; "Fine-tune a model on this file" starts an SFT job that trains a model on it."""

import json
import re

import pytest
from playwright.sync_api import Page, expect

from tests.inference.conftest import tiny_tokenizer, write_checkpoint
from tests.web.conftest import SCREENSHOTS, ConsoleErrors, WebStack

MODEL = "mine-base-000005"  # a base model to fine-tune, with the batch and LRs a chat stage inherits
SHAREGPT = {
    "conversations": [{"from": "human", "value": "What is 2+2?"}, {"from": "gpt", "value": "2+2 is 4."}]
}
UNKNOWN_ROLE = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "bot", "value": "Hello"}]}


def jsonl(*rows: object) -> str:
    return "".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows)


@pytest.fixture(scope="module")
def base_model(web_stack: WebStack) -> str:
    runs = web_stack.base_dir / "runs"
    tiny_tokenizer().save(runs / "mine" / "tokenizer")
    write_checkpoint(runs, "mine", "base", 5, seed=5)
    meta_path = runs / "mine" / "base" / "step_000005" / "meta.json"
    meta = json.loads(meta_path.read_text())
    batch = {"max_seq_len": 128, "device_batch_size": 2, "total_batch_size": 256, "lr_scale": 1.0}
    meta["recipe"] = {
        **batch,
        "matrix_lr": 0.02,
        "embedding_lr": 0.3,
        "unembedding_lr": 0.008,
        "scalar_lr": 0.5,
    }
    meta_path.write_text(json.dumps(meta))
    return MODEL


def drop(page: Page, name: str, text: str) -> None:
    """Drag a file onto the drop zone, as from a file manager."""
    transfer = page.evaluate_handle(
        "([name, text]) => { const t = new DataTransfer(); t.items.add(new File([text], name)); return t; }",
        [name, text],
    )
    page.dispatch_event("#drop-zone", "drop", {"dataTransfer": transfer})


def test_a_broken_file_is_named_line_by_line_and_the_fixed_one_fine_tunes_a_model(
    page: Page, web_stack: WebStack, base_model: str
) -> None:
    page.goto(f"{web_stack.url}/#/data")
    page.select_option("#upload-purpose", "conversations")
    page.select_option("#upload-tokenizer", "mine")
    drop(page, "chats.jsonl", jsonl(SHAREGPT, '{"conversations": [', SHAREGPT, UNKNOWN_ROLE))
    expect(page).to_have_url(re.compile(r"#/data/file-[0-9a-f]{24}$"))
    expect(page.locator("#file-summary .status")).to_have_text("invalid", timeout=60_000)
    problems = page.locator("#problems tbody tr")
    expect(problems).to_have_count(2)
    expect(problems.nth(0)).to_contain_text("line 2")
    expect(problems.nth(0)).to_contain_text("bad JSON")
    expect(problems.nth(1)).to_contain_text("line 4")
    expect(problems.nth(1)).to_contain_text("unknown role 'bot'")
    expect(page.locator("#finetune-form")).to_have_count(0)  # nothing of it is trained on

    page.click("text=← Data")
    expect(page.locator("#files-body tr[data-file]")).to_have_count(1)
    page.select_option("#upload-tokenizer", "mine")
    page.fill("#upload-val", "0.2")
    page.set_input_files("#upload-input", files=[{"name": "chats.jsonl", "mimeType": "application/jsonl",
                                                  "buffer": jsonl(*[SHAREGPT] * 10).encode()}])  # fmt: skip
    expect(page.locator("#file-summary .status")).to_have_text("ready", timeout=60_000)
    expect(page.locator("#statistics")).to_contain_text("train rows")
    expect(page.locator("#statistics")).to_contain_text("assistant tokens")
    expect(page.locator("#histogram .bar-row")).to_have_count(9)
    expect(page.locator("#samples .message.user .bubble").first).to_have_text("What is 2+2?")
    expect(page.locator("#samples .message.assistant .bubble").first).to_have_text("2+2 is 4.")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=SCREENSHOTS / "data-file-desktop.png", full_page=True)

    page.select_option("#ft-model", base_model)
    expect(page.locator("#ft-run")).to_have_value("mine-ft")
    page.fill("#ft-epochs", "2")
    page.fill("#ft-steps", "2")
    page.click("#ft-submit")
    expect(page).to_have_url(re.compile(r"#/jobs/[0-9a-f]{32}$"), timeout=60_000)
    expect(page.locator("#job-summary")).to_contain_text("chat_sft · mine-ft")
    expect(page.locator("#job-summary .status")).to_have_text("finished", timeout=180_000)
    expect(page.locator("#log")).to_contain_text("train: file ×2 16 = 16 conversations")  # the upload, twice
    expect(page.locator("#produced a", has_text="mine-ft-sft-000002")).to_be_visible()


def test_a_file_of_the_wrong_kind_is_refused_in_the_banner(
    page: Page, web_stack: WebStack, console: ConsoleErrors
) -> None:
    console.expected = ["415"]  # the browser logs the refused request
    page.goto(f"{web_stack.url}/#/data")
    page.select_option("#upload-purpose", "conversations")
    drop(page, "weights.bin", "not a conversation")
    expect(page.locator("#banner")).to_contain_text("weights.bin: a conversations file is .jsonl")
    expect(page).to_have_url(re.compile(r"#/data$"))
