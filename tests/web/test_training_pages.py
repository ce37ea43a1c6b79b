"""The jobs and models pages in a real browser: a job started from the form generated from the API's
schema, its live log and chart, and a model's report card."""

import re

import httpx
from playwright.sync_api import Page, expect

from tests.web.conftest import WebStack

# A base_train run that ends in seconds on a CPU: 6 steps of depth 2, evaluated every 3.
TINY_TRAINING = {
    "depth": "2",
    "max_seq_len": "64",
    "device_batch_size": "2",
    "total_batch_size": "128",
    "num_iterations": "6",
    "eval_every": "3",
    "eval_tokens": "256",
    "core_metric_every": "-1",
    "sample_every": "0",
}


def test_a_job_started_from_the_form_shows_its_log_and_chart_live(page: Page, web_stack: WebStack) -> None:
    page.goto(f"{web_stack.url}/#/jobs")
    page.click("#new-job-button")
    page.select_option("#job-kind", "base_train")
    page.fill("#job-run", "job")
    depth = page.locator("[data-path='config.depth']")
    expect(depth).to_have_attribute("min", "1")  # bounds come from the schema
    softcap_help = page.locator("label:has([data-path='config.softcap']) small")
    expect(softcap_help).to_contain_text("> 0 … 1000")  # a strict minimum is shown as one
    for name, value in TINY_TRAINING.items():
        page.fill(f"[data-path='config.{name}']", value)
    page.click("#submit-job")
    expect(page).to_have_url(re.compile(r"#/jobs/[0-9a-f]+$"))
    expect(page.locator("#log")).to_contain_text("python -m trainer.base_train --run job", timeout=60_000)
    loss_chart = page.locator(".chart[data-metric=loss]")
    expect(loss_chart).to_have_attribute("data-points", re.compile(r"^[1-9]"), timeout=120_000)
    expect(loss_chart.locator("canvas")).to_be_visible()
    expect(page.locator("#job-summary .status")).to_have_text("finished", timeout=120_000)
    expect(page.locator("#produced a").first).to_contain_text("job-base-")
    # the list shows it, finished, at 100%
    page.goto(f"{web_stack.url}/#/jobs")
    row = page.locator("#jobs-body tr").first
    expect(row).to_contain_text("base_train")
    expect(row.locator(".status")).to_have_text("finished")


def test_a_preset_fills_the_form_with_the_tiny_demo_pipeline(page: Page, web_stack: WebStack) -> None:
    page.goto(f"{web_stack.url}/#/jobs")
    page.click("#new-job-button")
    page.select_option("#job-preset", "tiny CPU demo pipeline")
    expect(page.locator("#job-kind")).to_have_value("pipeline")
    expect(page.locator("[data-path='config.recipe']")).to_have_value("current")
    expect(page.locator("[data-path='config.base_train.depth']")).to_have_value("2")
    expect(page.locator("[data-skip=chat_eval]")).to_be_checked()
    expect(page.locator("[data-skip=chat_sft]")).not_to_be_checked()


def test_a_models_report_card_and_chat_with_it(page: Page, web_stack: WebStack) -> None:
    page.goto(f"{web_stack.url}/#/models")
    link = page.locator("a", has_text="tiny-sft-000010")
    link.click()
    report = page.locator("#report")
    expect(report.locator("table", has_text="val_bpb")).to_contain_text("1.234")
    image = report.locator("img[alt='val_bpb.png']")
    expect(image).to_be_visible()
    assert image.evaluate("img => img.naturalWidth") > 0  # fetched with the token
    page.click("#chat-with-model")
    expect(page.locator("#model-select")).to_have_value("tiny-sft-000010")


def test_stop_retry_and_delete_a_job_from_the_list(page: Page, web_stack: WebStack) -> None:
    long_run = {**{k: int(v) for k, v in TINY_TRAINING.items()}, "num_iterations": 100_000}
    headers = {"Authorization": f"Bearer {web_stack.token}"}
    with httpx.Client(base_url=f"{web_stack.url}/api", headers=headers, timeout=30) as api:
        job_id = api.post("/jobs", json={"kind": "base_train", "run": "long", "config": long_run}).json()[
            "id"
        ]
    page.goto(f"{web_stack.url}/#/jobs")
    row = page.locator(f"tr[data-job='{job_id}']")
    expect(row.locator(".status")).to_have_text("started", timeout=60_000)
    expect(row.locator("[role=progressbar]")).to_be_visible(timeout=60_000)  # progress as it trains
    # Who runs it: the stack's one worker takes both queues, and is busy.
    expect(page.locator("#workers [data-queue=gpu]")).to_have_text(
        "model training and evaluation: 1 worker, 0 free"
    )
    expect(page.locator("#workers [data-queue=cpu]")).to_have_text(
        "tokenizers, exports, imports and file checks: 1 worker, 0 free"
    )
    row.get_by_role("button", name="Stop").click()
    expect(row.locator(".status")).to_have_text("stopped", timeout=60_000)
    row.get_by_role("button", name="Retry").click()
    expect(row.locator(".status")).to_have_text(re.compile("queued|started"))
    row.get_by_role("button", name="Stop").click()
    expect(row.locator(".status")).to_have_text("stopped", timeout=60_000)
    row.get_by_role("button", name="Delete").click()
    expect(row).to_have_count(0)


def test_a_pipelines_page_lists_its_stages_and_leads_to_each(page: Page, web_stack: WebStack) -> None:
    stages = ["tokenizer", "base_train", "mid_train", "chat_sft", "chat_rl", "base_eval", "chat_eval"]
    config = {
        "base_train": {k: int(v) for k, v in TINY_TRAINING.items()},
        "skip": [s for s in stages if s != "base_train"],
    }
    headers = {"Authorization": f"Bearer {web_stack.token}"}
    with httpx.Client(base_url=f"{web_stack.url}/api", headers=headers, timeout=30) as api:
        spec = {"kind": "pipeline", "run": "staged", "config": config}
        pipeline_id = api.post("/jobs", json=spec).json()["id"]
    page.goto(f"{web_stack.url}/#/jobs/{pipeline_id}")
    stage = page.locator("#stages tr")
    expect(stage).to_have_count(1)
    expect(stage.locator(".status")).to_have_text("finished", timeout=60_000)
    assert page.locator("#log").count() == 0  # a pipeline's log and curves are its stages'
    stage.get_by_role("link", name="base_train").click()
    expect(page.locator("#log")).to_contain_text("trainer.base_train --run staged")
    expect(page.get_by_role("link", name=f"pipeline {pipeline_id[:8]}")).to_be_visible()


def test_jobs_that_no_worker_takes_say_how_to_start_one(page: Page, web_stack: WebStack) -> None:
    """A queue with jobs waiting and no live worker (a stopped cpu-worker, say) is named on the Jobs page:
    its jobs would stay queued for ever."""
    headers = {"Authorization": f"Bearer {web_stack.token}"}
    with httpx.Client(base_url=f"{web_stack.url}/api", headers=headers, timeout=30) as api:
        overview = api.get("/workers").json()  # the real shape, with the cpu-worker gone and 2 jobs waiting
    overview["workers"] = [{**overview["workers"][0], "queues": ["gpu"]}]
    overview["queues"] = [
        {"name": "gpu", "waiting": 0, "workers": 1},
        {"name": "cpu", "waiting": 2, "workers": 0},
    ]
    page.route("**/api/workers", lambda route: route.fulfill(json=overview))
    page.goto(f"{web_stack.url}/#/jobs")
    stuck = page.locator("#workers [data-queue=cpu]")
    expect(stuck).to_have_text(
        "tokenizers, exports, imports and file checks: 0 workers, 2 queued — no live worker takes these: "
        "start one (docker compose up -d cpu-worker, or make up)"
    )
    expect(stuck).to_have_class("stuck")
    expect(page.locator("#workers [data-queue=gpu]")).not_to_have_class("stuck")
