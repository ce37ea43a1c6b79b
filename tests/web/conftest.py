"""The whole stack as real processes (Redis, API, worker, model server, web) over tiny checkpoints and
data of our own, and Debian's Chromium driven by Playwright."""

import json
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from matplotlib.figure import Figure
from playwright.sync_api import Browser, Page, sync_playwright

from tests.inference.conftest import SLOW_CONFIG, tiny_tokenizer, write_checkpoint
from tests.trainer.conftest import write_pretraining_kit
from trainer import report
from trainer.settings import TrainerSettings

from support import PYTHON, ROOT, Process, free_port, private_redis, service_env, wait_until

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
# Screenshots of every page are kept here (CI keeps them as artifacts).
SCREENSHOTS = Path(os.environ.get("NANOCHAT_SCREENSHOTS") or ROOT / "build" / "screenshots")
DESKTOP, PHONE = {"width": 1280, "height": 800}, {"width": 390, "height": 844}
CHAT_MODEL = "tiny-sft-000010"  # quick greedy replies that end by themselves
SLOW_MODEL = "slow-sft"  # replies that run to max_tokens, seconds long: room to press Stop


@dataclass
class WebStack:
    url: str
    token: str
    base_dir: Path
    inference_url: str
    processes: list[Process] = field(default_factory=list)

    def metric(self, name: str) -> float:
        lines = httpx.get(
            f"{self.inference_url}/metrics", headers={"Authorization": f"Bearer {self.token}"}
        ).text.splitlines()
        return sum(float(line.split()[-1]) for line in lines if line.startswith(name))


def write_report(base: Path, run: str) -> None:
    """A report card as trainer.report writes one (a stage's section, the markdown rebuilt from the sections,
    as every later program rebuilds it) and a chart."""
    folder = report.report_dir(TrainerSettings(base_dir=base), run)
    folder.mkdir(parents=True)
    (folder / "chat_sft.json").write_text(json.dumps({"val_bpb": 1.234}), encoding="utf-8")
    report.render(TrainerSettings(base_dir=base), run)
    figure = Figure(figsize=(4, 3))
    axes = figure.subplots()
    axes.plot([0, 10, 20], [3.0, 2.1, 1.7])
    axes.set_title("val bpb")
    figure.savefig(folder / "val_bpb.png")


@pytest.fixture(scope="session")
def web_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebStack]:
    """On a Redis of its own: its worker must not take jobs from other tests."""
    workdir = tmp_path_factory.mktemp("web-stack")
    with private_redis(workdir) as redis_url:
        yield from start_web_stack(workdir, redis_url)


def start_web_stack(workdir: Path, redis_url: str) -> Iterator[WebStack]:
    base, data = workdir / "base", workdir / "data"
    runs = base / "runs"
    tokenizer = tiny_tokenizer()
    for run in ("tiny", "slow", "job", "tour", "long", "staged"):
        tokenizer.save(runs / run / "tokenizer")
    write_checkpoint(runs, "tiny", "sft", 10, seed=10)
    write_checkpoint(runs, "slow", "sft", 1, seed=1, config=SLOW_CONFIG, never_stop=True)
    write_report(runs.parent, "tiny")
    write_pretraining_kit(data, seed=3)
    token = secrets.token_urlsafe(24)
    ports = {name: free_port() for name in ("api", "inference", "web")}
    urls = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
    env = service_env(
        REDIS_URL=redis_url,
        API_TOKEN=token,
        API_PORT=str(ports["api"]),
        INFERENCE_PORT=str(ports["inference"]),
        INFERENCE_DEFAULT_MODEL="tiny-sft",
        WEB_PORT=str(ports["web"]),
        WEB_API_URL=urls["api"],
        WEB_INFERENCE_URL=urls["inference"],
        NANOCHAT_BASE_DIR=str(base),
        NANOCHAT_DATA_DIR=str(data),
    )
    stack = WebStack(urls["web"], token, base, urls["inference"])
    try:
        for name in ("api", "worker", "inference", "web"):
            stack.processes.append(Process(name, [PYTHON, "-m", name], env, workdir))
        for name in ("api", "inference", "web"):
            process = next(p for p in stack.processes if p.name == name)
            process.wait_healthy(f"{urls[name]}/health", timeout=60)
        ready = f"{urls['inference']}/ready"
        auth = {"Authorization": f"Bearer {token}"}
        wait_until(lambda: httpx.get(ready, headers=auth).status_code == 200, 60, "the model server's /ready")
        yield stack
    finally:
        for process in stack.processes:
            process.stop()


@pytest.fixture(scope="session")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.fail(f"no Chromium at {CHROMIUM}: run `make setup` (it installs Debian's chromium)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


class ConsoleErrors(list):
    """The page's console errors and uncaught exceptions; a test that provokes one on purpose lists
    the text it expects in `expected`."""

    def __init__(self) -> None:
        super().__init__()
        self.expected: list[str] = []

    def unexpected(self) -> list[str]:
        return [e for e in self if not any(text in e for text in self.expected)]


@pytest.fixture
def console() -> ConsoleErrors:
    return ConsoleErrors()


@pytest.fixture
def page(browser: Browser, web_stack: WebStack, console: ConsoleErrors) -> Iterator[Page]:
    """A fresh browser profile whose token is already saved, as after the user entered it once."""
    context = browser.new_context(viewport=DESKTOP)
    context.add_init_script(
        f"if (!localStorage.getItem('nanochat.token')) localStorage.setItem('nanochat.token', "
        f"{json.dumps(web_stack.token)})"
    )
    page = context.new_page()
    page.on("console", lambda message: message.type == "error" and console.append(message.text))
    page.on("pageerror", lambda error: console.append(f"uncaught: {error}"))
    yield page
    context.close()
    assert not console.unexpected(), f"console errors: {console.unexpected()}"
