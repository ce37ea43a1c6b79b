"""compose.yaml (and the CPU override) are valid Compose files with the stack's guarantees."""

import json
import re
from importlib import resources
from pathlib import Path

import jsonschema
import pytest
import yaml

from api.config import Settings as ApiSettings
from inference.settings import InferenceSettings
from trainer.settings import TrainerSettings
from web.settings import WebSettings
from worker.settings import WorkerSettings

from support import ROOT, env_names

# The Compose Specification's JSON schema, as vendored by check-jsonschema (vendor.compose-spec).
SCHEMA = json.loads(
    (resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json").read_text()
)
ENV = {"API_TOKEN": "a-test-token-of-sufficient-length", "REDIS_PASSWORD": "a-redis-password"}
MULTINODE = {**ENV, "REDIS_HOST": "10.0.0.5", "SHARED_STORAGE_DIR": "/mnt/nfs/nanochat"}
APP_SERVICES = ("api", "worker", "cpu-worker", "inference", "web")


class Reset:
    """YAML `!reset` (Compose merge: drop the value from the files before)."""


class ComposeLoader(yaml.SafeLoader):
    pass


ComposeLoader.add_constructor("!reset", lambda loader, node: Reset())


def interpolate(value, env: dict[str, str]):
    """Compose's ${VAR}, ${VAR:-default}, ${VAR:?error} and ${VAR:+replacement} substitution."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match) -> str:
        name, op, arg = match.group(1), match.group(2), match.group(3)
        if op == ":+":
            return arg if env.get(name) else ""
        if env.get(name):
            return env[name]
        if op == ":?":
            raise ValueError(f"{name}: {arg}")
        return arg or ""

    return re.sub(r"\$\{(\w+)(?:(:-|:\?|:\+)([^}]*))?\}", substitute, value)


def merge(base, override, key: str = ""):
    """Compose's merge of an override file: mappings merge key by key, !reset removes, a volume replaces
    the one mounted at the same path, other lists are appended to."""
    if isinstance(override, Reset):
        return None
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for name, value in override.items():
            merged[name] = merge(base.get(name), value, name)
        return {k: v for k, v in merged.items() if v is not None}
    if key == "volumes" and isinstance(base, list):
        targets = {volume.split(":")[1] for volume in override}
        return [v for v in base if v.split(":")[1] not in targets] + override
    if isinstance(base, list):
        return base + override
    return override


def load(*files: str, env: dict[str, str] = ENV) -> dict:
    """As compose reads files: each one interpolated, then merged over the ones before."""
    config: dict = {}
    for name in files:
        config = merge(config, interpolate(yaml.load((ROOT / name).read_text(), Loader=ComposeLoader), env))
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
    for name in ("api", "worker", "cpu-worker"):  # the services reach it with the password
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
    assert set(services["worker"]["depends_on"]) == {"redis"} == set(services["cpu-worker"]["depends_on"])
    assert set(services["web"]["depends_on"]) == {"api", "inference"}


def test_ml_services_reserve_gpus_and_share_the_base_dir_volume(compose: dict) -> None:
    for name in ("worker", "inference", "trainer"):
        service = compose["services"][name]
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["capabilities"] == ["gpu"] and device["driver"] == "nvidia"
        assert service["build"]["args"]["TORCH_VARIANT"] == "cuda"
        assert {"nanochat-data:/data/nanochat", "nanochat-data:/data/nanochat:ro"} & set(service["volumes"])
        assert service["environment"]["NANOCHAT_BASE_DIR"] == "/data/nanochat"


@pytest.mark.parametrize("override", [None, "compose.cpu.yaml", "compose.multinode.yaml"])
def test_the_model_server_reads_the_data_volume_only_and_writes_to_its_own(override: str | None) -> None:
    """Nothing a request does to the model server can change checkpoints or what jobs run with."""
    compose = load("compose.yaml", *[override] if override else [], env=MULTINODE)
    inference = compose["services"]["inference"]
    data = [v for v in inference["volumes"] if v.split(":")[1] == "/data/nanochat"]
    assert len(data) == 1 and data[0].endswith(":/data/nanochat:ro"), data
    # The FA3 kernel it downloads on first use lands in a volume of its own, which its user can write.
    cache = inference["environment"]["KERNELS_CACHE"]
    (volume,) = [v for v in inference["volumes"] if cache.startswith(v.split(":")[1] + "/")]
    name, target = volume.split(":")
    assert name in compose["volumes"] and not cache.startswith("/data/nanochat")
    dockerfile = (ROOT / inference["build"]["dockerfile"]).read_text()
    assert f"mkdir {target} && chown nanochat {target}" in dockerfile


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
            folder = "worker" if name == "cpu-worker" else name  # the worker's image, with CPU torch
            assert service["build"]["context"] == "."
            assert Path(ROOT / service["build"]["dockerfile"]) == ROOT / "services" / folder / "Dockerfile"


@pytest.mark.parametrize("override", [None, "compose.cpu.yaml", "compose.multinode.yaml"])
def test_a_worker_of_cpu_jobs_alone_runs_beside_the_worker_with_its_settings(override: str | None) -> None:
    """Exports, imports and file validations never wait for a training job: the cpu-worker takes them,
    with everything the worker's jobs read, on no GPU."""
    services = load("compose.yaml", *[override] if override else [], env=MULTINODE)["services"]
    cpu, worker = services["cpu-worker"], services["worker"]
    assert cpu["environment"]["WORKER_QUEUES"] == "cpu" and worker["environment"]["WORKER_QUEUES"] == ""
    shared = {
        k: v for k, v in worker["environment"].items() if not k.startswith(("WORKER_", "NCCL_", "GLOO_"))
    }
    if override == "compose.multinode.yaml":  # the first machine's: it reaches Redis on the compose network
        shared["REDIS_URL"] = "redis://:a-redis-password@redis:6379/0"
    assert shared.items() <= cpu["environment"].items()
    assert cpu["volumes"] == worker["volumes"]  # the same runs and data kit
    assert "deploy" not in cpu and cpu["build"]["args"] == {"TORCH_VARIANT": "cpu"}
    assert cpu["healthcheck"]["test"] == worker["healthcheck"]["test"]


def test_published_ports_bind_to_the_loopback_unless_told_otherwise() -> None:
    for env, address in [(ENV, "127.0.0.1"), ({**ENV, "BIND_ADDRESS": "0.0.0.0"}, "0.0.0.0")]:
        services = load("compose.yaml", env=env)["services"]
        published = [port for service in services.values() for port in service.get("ports", [])]
        assert len(published) == 3 and all(port.startswith(f"{address}:") for port in published)


def test_every_service_runs_an_init_and_the_worker_has_time_to_checkpoint(compose: dict) -> None:
    assert all(service.get("init") is True for service in compose["services"].values())
    grace = compose["services"]["worker"]["stop_grace_period"]
    defaults = WorkerSettings.model_fields
    job_grace, lease = defaults["cancel_grace_seconds"].default, defaults["job_lease_seconds"].default
    # SIGTERM → checkpoint (then SIGKILL), and for a multi-node job the other nodes' too, plus a lease.
    assert grace.endswith("m") and int(grace[:-1]) * 60 > 2 * job_grace + lease


# Which settings each container reads: its service's, and for the worker its jobs' programs' too.
READS = {
    "api": [ApiSettings],
    "worker": [WorkerSettings, TrainerSettings],
    "inference": [InferenceSettings],
    "web": [WebSettings],
    "trainer": [TrainerSettings],
}
# NCCL's and gloo's own settings, which the worker hands to its jobs' programs.
PASSED_TO_PROGRAMS = {"NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME", "NCCL_IB_DISABLE", "NCCL_DEBUG"}
# Settings a container does not take from .env, and why.
SET_BY_COMPOSE = {
    "API_HOST": "the image listens on 0.0.0.0; BIND_ADDRESS picks the host's interface",
    "INFERENCE_HOST": "the image listens on 0.0.0.0; BIND_ADDRESS picks the host's interface",
    "WEB_HOST": "the image listens on 0.0.0.0; BIND_ADDRESS picks the host's interface",
    "API_PORT": "the container listens on 8000; API_PORT is the host port it is published on",
    "INFERENCE_PORT": "the container listens on 8001; INFERENCE_PORT is the host port it is published on",
    "WEB_PORT": "the container listens on 8080; WEB_PORT is the host port it is published on",
    "REDIS_URL": "compose's own Redis, with REDIS_PASSWORD",
    "NANOCHAT_BASE_DIR": "the nanochat-data volume, mounted at /data/nanochat",
    "WEB_API_URL": "the api container, by its service name",
    "WEB_INFERENCE_URL": "the inference container, by its service name",
    "WEB_NODE_MODULES": "where the web image installed the browser libraries",
    "DEV_MODE": "compose always requires API_TOKEN: DEV_MODE is for local processes only",
}


def raw_compose() -> dict:
    return yaml.load((ROOT / "compose.yaml").read_text(), Loader=ComposeLoader)


@pytest.mark.parametrize("service", sorted(READS))
def test_every_setting_reaches_the_containers_that_read_it(service: str) -> None:
    environment = raw_compose()["services"][service]["environment"]
    read = set().union(*(env_names(settings) for settings in READS[service]))
    if service in ("worker", "trainer"):
        read |= PASSED_TO_PROGRAMS
    for name in sorted(read - set(SET_BY_COMPOSE)):
        assert f"${{{name}" in str(environment.get(name)), f"{service} does not get {name} from .env"


def test_every_env_example_setting_is_used_by_compose_or_set_by_it() -> None:
    listed = set(re.findall(r"^([A-Z_][A-Z0-9_]*)=", (ROOT / ".env.example").read_text(), re.MULTILINE))
    files = "".join(path.read_text() for path in ROOT.glob("compose*.yaml"))
    used = set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)", files))
    assert listed - used - set(SET_BY_COMPOSE) == set()


def test_empty_settings_leave_the_services_their_own_defaults(compose: dict) -> None:
    worker = compose["services"]["worker"]["environment"]
    assert worker["JOB_LEASE_SECONDS"] == "" and worker["NANOCHAT_PRETRAIN_URL"] == ""  # ignored when empty
    settings = {**ENV, "JOB_LEASE_SECONDS": "12", "NANOCHAT_PRETRAIN_URL": "http://mirror.lan/shards"}
    worker = load("compose.yaml", env=settings)["services"]["worker"]["environment"]
    assert (
        worker["JOB_LEASE_SECONDS"] == "12" and worker["NANOCHAT_PRETRAIN_URL"] == "http://mirror.lan/shards"
    )


def test_a_local_data_kit_is_mounted_read_only_where_the_programs_look(compose: dict) -> None:
    for name in ("worker", "cpu-worker", "trainer"):
        service = compose["services"][name]
        assert service["environment"]["NANOCHAT_DATA_DIR"] == ""  # unset: the programs download
        assert "data-kit-unset:/data/kit:ro" in service["volumes"] and "data-kit-unset" in compose["volumes"]
        kit = load("compose.yaml", env={**ENV, "NANOCHAT_DATA_DIR": "/srv/kit"})["services"][name]
        assert kit["environment"]["NANOCHAT_DATA_DIR"] == "/data/kit"
        assert "/srv/kit:/data/kit:ro" in kit["volumes"]


def test_multinode_workers_use_the_host_network_the_shared_storage_and_the_first_machines_redis() -> None:
    services = load("compose.yaml", "compose.multinode.yaml", env=MULTINODE)["services"]
    worker = services["worker"]
    assert worker["network_mode"] == "host"  # NCCL, gloo and the rendezvous open ports of their own
    assert worker["environment"]["REDIS_URL"] == "redis://:a-redis-password@10.0.0.5:6379/0"
    assert "NCCL_SOCKET_IFNAME" in worker["environment"] and "GLOO_SOCKET_IFNAME" in worker["environment"]
    assert services["redis"]["ports"] == ["10.0.0.5:6379:6379"]  # the private address only, with a password
    for name in ("worker", "cpu-worker", "api", "inference", "trainer"):  # everyone sees the same runs
        mounts = [v for v in services[name]["volumes"] if v.split(":")[1] == "/data/nanochat"]
        assert mounts in (["/mnt/nfs/nanochat:/data/nanochat"], ["/mnt/nfs/nanochat:/data/nanochat:ro"]), name


@pytest.mark.parametrize("missing", ["REDIS_HOST", "SHARED_STORAGE_DIR"])
def test_multinode_needs_the_redis_address_and_the_shared_storage(missing: str) -> None:
    with pytest.raises(ValueError, match=missing):
        load(
            "compose.yaml", "compose.multinode.yaml", env={k: v for k, v in MULTINODE.items() if k != missing}
        )
