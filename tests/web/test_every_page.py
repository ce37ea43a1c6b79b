"""Every page at a desktop and a phone size, light and dark: it renders without console errors,
nothing spills past the screen's width, and a screenshot of it is kept (NANOCHAT_SCREENSHOTS, default
build/screenshots)."""

import httpx
import pytest
from playwright.sync_api import Page, expect

from tests.web.conftest import CHAT_MODEL, DESKTOP, PHONE, SCREENSHOTS, WebStack
from tests.web.test_training_pages import TINY_TRAINING

from support import wait_until


@pytest.fixture(scope="module")
def finished_job(web_stack: WebStack) -> str:
    """A tiny training job run to its end through the proxied API, so its page has a log and charts."""
    config = {name: int(value) for name, value in TINY_TRAINING.items()}
    headers = {"Authorization": f"Bearer {web_stack.token}"}
    with httpx.Client(base_url=f"{web_stack.url}/api", headers=headers, timeout=30) as api:
        job_id = api.post("/jobs", json={"kind": "base_train", "run": "tour", "config": config}).json()["id"]
        wait_until(lambda: api.get(f"/jobs/{job_id}").json()["status"] == "finished", 120, "the tour's job")
    return job_id


def pages(stack: WebStack, job_id: str) -> dict[str, tuple[str, str]]:
    """Each page's hash route and an element that shows it has loaded."""
    return {
        "chat": (f"#/chat?model={CHAT_MODEL}", ".message.assistant .facts"),
        "jobs": ("#/jobs", "#jobs-body tr"),
        "job": (f"#/jobs/{job_id}", ".chart[data-metric=loss] canvas"),
        "models": ("#/models", "tr[data-model]"),
        "model": (f"#/models/{CHAT_MODEL}", "#report img"),
        "data": ("#/data", "#drop-zone"),
    }


@pytest.mark.parametrize("size", ["desktop", "phone"])
def test_every_page_renders_cleanly_and_is_captured(
    page: Page, web_stack: WebStack, finished_job: str, size: str
) -> None:
    viewport = DESKTOP if size == "desktop" else PHONE
    page.set_viewport_size(viewport)
    page.goto(f"{web_stack.url}/#/chat?model={CHAT_MODEL}")
    page.fill("#composer", "Write a haiku about **tokens**, then some code.")
    page.press("#composer", "Enter")
    expect(page.locator(".message.assistant .facts")).to_contain_text("tokens", timeout=30_000)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    for theme in ("light", "dark"):
        page.evaluate(f"localStorage.setItem('nanochat.theme', '{theme}')")
        for name, (route, loaded) in pages(web_stack, finished_job).items():
            page.goto(f"{web_stack.url}/{route}")
            page.reload()  # a fresh start of the app on this page, theme applied from the start
            expect(page.locator(loaded).first).to_be_visible(timeout=30_000)
            overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
            assert overflow <= 0, f"{name} is {overflow}px wider than a {size} screen"
            page.screenshot(path=SCREENSHOTS / f"{name}-{size}-{theme}.png", full_page=True)
