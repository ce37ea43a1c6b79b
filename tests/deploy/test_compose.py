"""compose.yaml (and the CPU override) are valid Compose files with the stack's guarantees."""

import json
import re
from importlib import resources
from pathlib import Path

import jsonschema
import pytest
import yaml

from support import ROOT

# The Compose Specification's JSON schema, as vendored by check-jsonschema (vendor.compose-spec).
SCHEMA = json.loads(
    (resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json").read_text()
)
ENV = {"API_TOKEN": "a-test-token-of-sufficient-length", "REDIS_PASSWORD": "a-redis-password"}
APP_SERVICES = ("api", "worker", "inference", "web")


class Reset:
    """YAML `!reset` (Compose merge: drop the value from the files before)."""


class ComposeLoader(yaml.SafeLoader):
    pass


ComposeLoader.add_constructor("!reset", lambda loader, node: Reset())


def interpolate(value, env: dict[str, str]):
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?error} substitution."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match) -> str:
        name, op, arg = match.group(1), match.group(2), match.group(3)
        if env.get(name):
            return env[name]
        if op == ":?":
            raise ValueError(f"{name}: {arg}")
        return arg or ""

    return re.sub(r"\$\{(\w+)(?:(:-|:\?)([^}]*))?\}", substitute, value)


def merge(base, override):
    """Compose's merge of an override file: mappings merge key by key, !reset removes."""
    if isinstance(override, Reset):
        return None
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            merged[key] = merge(base.get(key), value)
        return {k: v for k, v in merged.items() if v is not None}
    return override


def load(*files: str, env: dict[str, str] = ENV) -> dict:
    config: dict = {}
    for name in files:
        config = merge(config, yaml.load((ROOT / name).read_text(), Loader=ComposeLoader))
    config = interpolate(config, env)
    jsonschema.validators.validator_for(SCHEMA)(SCHEMA).validate(config)
    return config


@pytest.fixture(scope="module")
def compose() -> dict:
    return load("compose.yaml")


def test_compose_file_is_valid_and_has_the_stack(compose: dict) -> None:
    assert set(compose["services"]) == {"redis", *APP_SERVICES, "trainer"}
    assert compose["services"]["trainer"]["profiles"] == ["tools"]  # one-off runs, not part of `up`


def test_redis_persists_never_evicts_and_stays_private(compose: dict) -> None:
    redis = compose["services"]["redis"]
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command and "--maxmemory-policy noeviction" in command
    assert "--maxmemory 1gb" in command and "--requirepass a-redis-password" in command
    assert redis["environment"]["REDISCLI_AUTH"] == "a-redis-password"  # for its healthcheck
    for name in ("api", "worker"):  # the services reach it with the password
        assert (
            compose["services"][name]["environment"]["REDIS_URL"] == "redis://:a-redis-password@redis:6379/0"
        )
    volume, target = redis["volumes"][0].split(":")
    assert volume in compose["volumes"] and target == "/data"
    assert "ports" not in redis
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]


def test_services_have_healthchecks_and_wait_for_healthy_dependencies(compose: dict) -> None:
    services = compose["services"]
    for name in ("redis", *APP_SERVICES):
        check = services[name]["healthcheck"]
        assert check["test"] and check["start_period"], name
    for name, service in services.items():
        for dependency, condition in service.get("depends_on", {}).items():
            assert condition == {"condition": "service_healthy"}, (name, dependency)
    assert set(services["api"]["depends_on"]) == {"redis"}
    assert set(services["worker"]["depends_on"]) == {"redis"}
    assert set(services["web"]["depends_on"]) == {"api", "inference"}


def test_ml_services_reserve_gpus_and_share_the_base_dir_volume(compose: dict) -> None:
    for name in ("worker", "inference", "trainer"):
        service = compose["services"][name]
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["capabilities"] == ["gpu"] and device["driver"] == "nvidia"
        assert service["build"]["args"]["TORCH_VARIANT"] == "cuda"
        assert "nanochat-data:/data/nanochat" in service["volumes"]
        assert service["environment"]["NANOCHAT_BASE_DIR"] == "/data/nanochat"


@pytest.mark.parametrize("secret", ["API_TOKEN", "REDIS_PASSWORD"])
def test_the_api_token_and_the_redis_password_are_required(secret: str) -> None:
    with pytest.raises(ValueError, match=secret):
        load("compose.yaml", env={k: v for k, v in ENV.items() if k != secret})


def test_cpu_override_builds_cpu_torch_without_gpu_reservations() -> None:
    compose = load("compose.yaml", "compose.cpu.yaml")
    for name in ("worker", "inference", "trainer"):
        service = compose["services"][name]
        assert "deploy" not in service
        assert service["build"]["args"]["TORCH_VARIANT"] == "cpu"
        assert service["build"]["dockerfile"] == f"services/{name}/Dockerfile"  # the rest is kept
    assert "healthcheck" in compose["services"]["worker"]


def test_every_build_uses_its_service_folder_dockerfile(compose: dict) -> None:
    for name, service in compose["services"].items():
        if "build" in service:
            assert service["build"]["context"] == "."
            assert Path(ROOT / service["build"]["dockerfile"]) == ROOT / "services" / name / "Dockerfile"


def test_published_ports_bind_to_the_loopback_unless_told_otherwise() -> None:
    for env, address in [(ENV, "127.0.0.1"), ({**ENV, "BIND_ADDRESS": "0.0.0.0"}, "0.0.0.0")]:
        services = load("compose.yaml", env=env)["services"]
        published = [port for service in services.values() for port in service.get("ports", [])]
        assert len(published) == 3 and all(port.startswith(f"{address}:") for port in published)


def test_every_service_runs_an_init_and_the_worker_has_time_to_checkpoint(compose: dict) -> None:
    assert all(service.get("init") is True for service in compose["services"].values())
    grace = compose["services"]["worker"]["stop_grace_period"]
    worker_env = compose["services"]["worker"]["environment"]
    job_grace, lease = int(worker_env["JOB_CANCEL_GRACE_SECONDS"]), int(worker_env["JOB_LEASE_SECONDS"])
    # SIGTERM → checkpoint (then SIGKILL), and for a multi-node job the other nodes' too, plus a lease.
    assert grace.endswith("m") and int(grace[:-1]) * 60 > 2 * job_grace + lease
