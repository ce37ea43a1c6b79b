""".env.example lists every variable the services read, and nothing they do not."""

import re
import subprocess
import sys

from pydantic_settings import BaseSettings

from api.config import Settings as ApiSettings
from inference.settings import InferenceSettings
from trainer.settings import TrainerSettings
from web.settings import WebSettings
from worker.settings import WorkerSettings

from support import ROOT

ALL_SETTINGS = [ApiSettings, WorkerSettings, TrainerSettings, InferenceSettings, WebSettings]


def env_names(settings: type[BaseSettings]) -> set[str]:
    prefix = settings.model_config.get("env_prefix", "")
    names = set()
    for field_name, field in settings.model_fields.items():
        alias = field.validation_alias
        names |= set(alias.choices) if alias is not None else {f"{prefix}{field_name}".upper()}
    return names


def test_env_example_lists_exactly_the_settings_and_compose_variables() -> None:
    example = (ROOT / ".env.example").read_text()
    listed = set(re.findall(r"^([A-Z_][A-Z0-9_]*)=", example, re.MULTILINE))
    read = set().union(*(env_names(s) for s in ALL_SETTINGS))
    compose = set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)", (ROOT / "compose.yaml").read_text()))
    assert read - listed == set(), "read by a service but missing from .env.example"
    assert compose - listed == set(), "used by compose.yaml but missing from .env.example"
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
