"""Models in and out in a real browser: Export for Hugging Face, Download and Delete export on a model's
page, the Import form on the Models page; each job followed on its page, a refused one explained in the
banner."""

import re
import tarfile

import httpx
import pytest
from playwright.sync_api import Page, expect

from tests.web.conftest import CHAT_MODEL, ConsoleErrors, WebStack

from support import wait_until

EXPORT = f"runs/tiny/exports/{CHAT_MODEL}"  # where the export of run tiny's checkpoint goes


def test_a_model_is_exported_from_its_page_and_downloaded(page: Page, web_stack: WebStack, tmp_path) -> None:
    page.goto(f"{web_stack.url}/#/models/{CHAT_MODEL}")
    expect(page.locator("#export-model")).to_have_text("Export for Hugging Face")
    expect(page.locator("#download-model")).to_have_count(0)  # nothing to download yet
    page.click("#export-model")
    page.click("#export-job")  # the job's page: progress, log, errors
    expect(page).to_have_url(re.compile(r"#/jobs/[0-9a-f]+$"))
    expect(page.locator("#log")).to_contain_text("python -m trainer.export --run tiny", timeout=60_000)
    expect(page.locator("#job-summary .status")).to_have_text("finished", timeout=180_000)
    page.locator("#produced a", has_text=CHAT_MODEL).click()

    expect(page.locator("#export-model")).to_have_text("Export again")
    with page.expect_download() as downloading:
        page.click("#download-model")
    download = downloading.value
    assert download.suggested_filename == f"{CHAT_MODEL}.tar"
    saved = tmp_path / download.suggested_filename
    download.save_as(saved)
    with tarfile.open(saved) as archive:
        names = set(archive.getnames())
    assert {f"{CHAT_MODEL}/config.json", f"{CHAT_MODEL}/model.safetensors"} <= names
    expect(page.locator("#export-status")).to_contain_text(f"saved {CHAT_MODEL}.tar")


@pytest.fixture
def exported(web_stack: WebStack) -> str:
    """Run tiny's checkpoint exported (by the test above, else here through the API): a folder to import."""
    if not (web_stack.base_dir / EXPORT).is_dir():
        headers = {"Authorization": f"Bearer {web_stack.token}"}
        with httpx.Client(base_url=f"{web_stack.url}/api", headers=headers, timeout=30) as api:
            job_id = api.post(f"/models/{CHAT_MODEL}/export").json()["id"]
            wait_until(lambda: api.get(f"/jobs/{job_id}").json()["status"] == "finished", 180, "the export")
    return EXPORT


def test_the_import_form_starts_a_job_whose_model_is_then_listed(
    page: Page, web_stack: WebStack, exported: str
) -> None:
    page.goto(f"{web_stack.url}/#/models")
    expect(page.locator("#import-form")).to_be_hidden()
    page.click("#import-button")
    page.fill("#import-source", exported)
    page.fill("#import-run", "imported")
    expect(page.locator("#import-stage")).to_have_value("sft")
    page.click("#submit-import")
    expect(page).to_have_url(re.compile(r"#/jobs/[0-9a-f]+$"))
    expect(page.locator("#job-summary")).to_contain_text("import · imported")
    expect(page.locator("#job-summary .status")).to_have_text("finished", timeout=180_000)
    model = page.locator("#produced a", has_text="imported-sft-")
    expect(model).to_be_visible()
    page.goto(f"{web_stack.url}/#/models")
    expect(page.locator("tr[data-model^='imported-sft-']")).to_have_count(1)


def test_a_refused_import_is_explained_in_the_page(
    page: Page, web_stack: WebStack, console: ConsoleErrors
) -> None:
    console.expected = ["422"]  # the browser logs the refused request
    page.goto(f"{web_stack.url}/#/models")
    page.click("#import-button")
    page.fill("#import-source", "/etc")
    page.fill("#import-run", "nowhere")
    page.click("#submit-import")
    expect(page.locator("#banner")).to_contain_text("must be a path inside the base dir")
    expect(page).to_have_url(re.compile(r"#/models$"))


def test_an_export_is_deleted_from_its_page_and_the_checkpoint_stays(
    page: Page, web_stack: WebStack, exported: str
) -> None:
    page.goto(f"{web_stack.url}/#/models/{CHAT_MODEL}")
    dialogs: list[str] = []
    page.once("dialog", lambda dialog: dialogs.append(dialog.message) or dialog.dismiss())
    page.click("#delete-export")  # dismissed: nothing happens
    expect(page.locator("#download-model")).to_be_visible()
    assert (web_stack.base_dir / exported).is_dir() and "The checkpoint stays" in dialogs[0]
    page.once("dialog", lambda dialog: dialog.accept())
    page.click("#delete-export")
    expect(page.locator("#export-status")).to_have_text("export deleted")
    expect(page.locator("#download-model")).to_have_count(0)
    expect(page.locator("#export-model")).to_have_text("Export for Hugging Face")
    assert not (web_stack.base_dir / exported).exists()
    assert not (web_stack.base_dir / f"{exported}.tar").exists()
    page.reload()  # the checkpoint is still there, with nothing to download
    expect(page.locator("#chat-with-model")).to_be_visible()
    expect(page.locator("#download-model")).to_have_count(0)


def test_an_export_whose_checkpoint_is_gone_is_found_downloaded_and_deleted_on_the_models_page(
    page: Page, web_stack: WebStack, tmp_path
) -> None:
    exports = web_stack.base_dir / "runs" / "old" / "exports"  # run old and its checkpoint are long gone
    (exports / "old-sft-000003").mkdir(parents=True)
    (exports / "old-sft-000003.tar").write_bytes(b"the old model" * 1000)
    page.goto(f"{web_stack.url}/#/models")
    row = page.locator("#exports tr[data-export='old-sft-000003']")
    expect(row).to_contain_text("checkpoint deleted")
    expect(row).to_contain_text("13.0 kB")
    expect(row.locator("a")).to_have_count(0)  # no model page to go to
    with page.expect_download() as downloading:
        row.locator("[data-action=download]").click()
    downloading.value.save_as(tmp_path / "old.tar")
    assert (tmp_path / "old.tar").read_bytes() == b"the old model" * 1000

    dialogs: list[str] = []
    page.once("dialog", lambda dialog: dialogs.append(dialog.message) or dialog.accept())
    row.locator("[data-action=delete]").click()
    expect(row).to_have_count(0)
    assert "nothing of this model will be left" in dialogs[0]
    assert list(exports.iterdir()) == []
    page.reload()
    expect(page.locator("#exports tr[data-export='old-sft-000003']")).to_have_count(0)
