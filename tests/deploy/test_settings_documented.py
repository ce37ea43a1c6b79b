""".env.example lists every variable the services read, and nothing they do not."""

import re
import subprocess
import sys

from api.config import Settings as ApiSettings
from inference.settings import InferenceSettings
from trainer.settings import TrainerSettings
from web.settings import WebSettings
from worker.settings import WorkerSettings

from support import ROOT, env_names

ALL_SETTINGS = [ApiSettings, WorkerSettings, TrainerSettings, InferenceSettings, WebSettings]


def test_env_example_lists_exactly_the_settings_and_compose_variables() -> None:
    example = (ROOT / ".env.example").read_text()
    listed = set(re.findall(r"^([A-Z_][A-Z0-9_]*)=", example, re.MULTILINE))
    read = set().union(*(env_names(s) for s in ALL_SETTINGS))
    compose_files = "".join(path.read_text() for path in ROOT.glob("compose*.yaml"))
    compose = set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)", compose_files))
    assert read - listed == set(), "read by a service but missing from .env.example"
    assert compose - listed == set(), "used by a compose file but missing from .env.example"
    assert listed - read - compose == set(), "in .env.example but read by nothing"


def test_every_variable_has_a_comment_line() -> None:
    lines = (ROOT / ".env.example").read_text().splitlines()
    for i, line in enumerate(lines):
        if re.match(r"^[A-Z_]+=", line):
            assert lines[i - 1].startswith("# "), f"{line!r} has no comment above it"


def test_readme_configuration_table_is_the_one_made_from_env_example() -> None:
    made = subprocess.run(
        [sys.executable, "scripts/config_table.py"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout
    readme = (ROOT / "README.md").read_text()
    assert made.strip() in readme, "README's table is stale: run python scripts/config_table.py --write"
    assert made.count("\n| ") == len(re.findall(r"^[A-Z_]+=", (ROOT / ".env.example").read_text(), re.M))


def test_make_env_writes_env_example_with_fresh_url_safe_secrets_and_never_overwrites(tmp_path) -> None:
    out = tmp_path / ".env"
    make = [sys.executable, "scripts/make_env.py", "--out", str(out)]
    subprocess.run(make, cwd=ROOT, check=True, capture_output=True)
    written, example = out.read_text().splitlines(), (ROOT / ".env.example").read_text().splitlines()
    changed = {a.split("=")[0]: a.split("=", 1)[1] for a, b in zip(written, example, strict=True) if a != b}
    assert set(changed) == {"API_TOKEN", "REDIS_PASSWORD"}  # every other line as in the example
    assert all(re.fullmatch(r"[A-Za-z0-9_-]{24,}", value) for value in changed.values())  # fits in REDIS_URL
    assert out.stat().st_mode & 0o077 == 0  # secrets: the owner's only
    again = subprocess.run(make, cwd=ROOT, capture_output=True, text=True)
    assert again.returncode != 0 and "exists" in again.stderr and out.read_text().splitlines() == written
