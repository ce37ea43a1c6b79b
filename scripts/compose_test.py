"""
`make compose-test`: the CPU stack built and run in real containers, with podman and podman-compose
(no Docker engine needed), from compose.yaml + compose.cpu.yaml as users run them.

    build the images (api, worker, inference, web) on stand-in bases → `podman-compose up` with the
    data kit given as NANOCHAT_DATA_DIR, as a user would → wait for health → the tiny demo pipeline
    through the API inside the containers, its base training compiled (torch.compile builds C++ kernels
    in the worker image); while it trains, a file uploaded is validated by the cpu-worker container;
    then its worker container restarted in the middle (the job must resume from its checkpoint) → chat with
    the result through the web container's /v1 proxy → a job with nnodes: 2 on the two worker
    containers (`--scale worker=2`), which meet in torchrun's rendezvous over the container network →
    everything taken down, even on failure

No image registry is reachable offline, so the bases are stand-ins built here once (debootstrap, then
Debian's python / nodejs / redis) and handed to the Dockerfiles through their base-image build
arguments; the CPU torch wheel comes from the local wheelhouse (TORCH_WHEELHOUSE). Needs root (for
debootstrap), podman, runc and debootstrap (apt), and the data kit (NANOCHAT_DATA_DIR).
"""

import argparse
import hashlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
from pathlib import Path

from local_stack import api_call, demo_preset, free_port  # beside this script

ROOT = Path(__file__).resolve().parent.parent
STANDIN = "localhost/nanochat-standin"
IMAGES = "localhost/nanochat-test"
SERVICES = ("api", "worker", "inference", "web")
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")  # carries the registries' TLS proxy CA
# podman here: runc (crun fails on hybrid cgroups) and no ulimit raising (not permitted).
CONTAINERS_CONF = '[containers]\ndefault_ulimits = []\n[engine]\nruntime = "runc"\n'
STANDINS = {  # image name → Dockerfile body on the debootstrap base
    # Like the official python image: Python's headers too (torch.compile builds against them).
    "python": """RUN apt-get update -qq && apt-get install -y -qq --no-install-recommends python3 \\
    python3-dev python3-pip ca-certificates && rm -rf /var/lib/apt/lists/* \\
    && ln -sf /usr/bin/python3 /usr/local/bin/python && rm -f /usr/lib/python3*/EXTERNALLY-MANAGED
COPY ca.crt /etc/ssl/certs/ca-certificates.crt""",
    "node": """RUN apt-get update -qq && apt-get install -y -qq --no-install-recommends nodejs npm \\
    ca-certificates && rm -rf /var/lib/apt/lists/*
COPY ca.crt /etc/ssl/certs/ca-certificates.crt
ENV NPM_CONFIG_CAFILE=/etc/ssl/certs/ca-certificates.crt""",
    "redis": """RUN apt-get update -qq && apt-get install -y -qq --no-install-recommends redis-server \\
    redis-tools && rm -rf /var/lib/apt/lists/*""",
}


def run(*command: str, quiet: bool = False, **options) -> subprocess.CompletedProcess:
    print("+", " ".join(command), flush=True)
    output = subprocess.DEVNULL if quiet else None
    return subprocess.run(command, check=True, stdout=output, **options)


def containers(project: str, service: str | None = None) -> list[str]:
    """The ids of a compose project's containers (of one service), scaled replicas included: podman-compose
    1.6 starts `--scale` replicas, but its `restart` and `down` only know the first one."""
    labels = [f"label=io.podman.compose.project={project}"]
    if service:
        labels.append(f"label=com.docker.compose.service={service}")
    found = subprocess.run(
        ["podman", "ps", "-a", "-q", *(f"--filter={label}" for label in labels)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return found.stdout.split()


def standin(name: str) -> str:
    """A stand-in's image name, tagged by its Dockerfile body: a changed recipe builds a new one."""
    return f"{STANDIN}/{name}:bookworm-{hashlib.sha256(STANDINS[name].encode()).hexdigest()[:8]}"


def image_exists(name: str) -> bool:
    return subprocess.run(["podman", "image", "exists", name]).returncode == 0


def build_standins(work: Path) -> None:
    """The base images, once: kept between runs under localhost/nanochat-standin/."""
    if all(image_exists(standin(name)) for name in STANDINS):
        return
    if not image_exists(f"{STANDIN}/debian:bookworm"):
        rootfs = work / "rootfs"
        run(
            "debootstrap",
            "--variant=minbase",
            "bookworm",
            str(rootfs),
            "http://deb.debian.org/debian",
            quiet=True,
        )
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        run("podman", "import", "-", f"{STANDIN}/debian:bookworm", stdin=tar.stdout, quiet=True)
        tar.wait()
        shutil.rmtree(rootfs)
    shutil.copy(HOST_CA_BUNDLE, work / "ca.crt")
    for name, body in STANDINS.items():
        (work / f"{name}.Dockerfile").write_text(f"FROM {STANDIN}/debian:bookworm\n{body}\n")
        run("podman", "build", "--network=host", "--pull=never", "-q", "-f", str(work / f"{name}.Dockerfile"),
            "-t", standin(name), str(work), quiet=True)  # fmt: skip


def build_images(wheelhouse: Path) -> None:
    for service in SERVICES:
        run(
            "podman", "build", "--network=host", "--pull=never", "-q",
            "--build-arg", f"PYTHON_IMAGE={standin('python')}",
            "--build-arg", f"NODE_IMAGE={standin('node')}",
            "--build-arg", "TORCH_VARIANT=cpu",
            "--build-arg", "TORCH_WHEELHOUSE=/wheels", "-v", f"{wheelhouse}:/wheels:ro",
            "-f", f"services/{service}/Dockerfile", "-t", f"{IMAGES}/{service}:latest", ".",
            cwd=ROOT, quiet=True,
        )  # fmt: skip


def wait_for(what: str, check, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (urllib.error.URLError, OSError, KeyError):
            pass
        time.sleep(2)
    raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")


def scenario(compose: list[str], project: str, ports: dict[str, int], token: str) -> None:
    api, web = f"http://127.0.0.1:{ports['api']}", f"http://127.0.0.1:{ports['web']}"
    wait_for(
        "the API and the web UI",
        lambda: api_call(api, token, "/health")["redis"] == "ok" and api_call(web, token, "/health"),
        300,
    )
    spec = demo_preset()["spec"]  # base training long enough, with checkpoints often enough, to be cut
    spec["config"]["base_train"] |= {"num_iterations": 600, "save_every": 50, "compile": True}
    pipeline = api_call(api, token, "/jobs", spec)
    print(f"pipeline {pipeline['id']} submitted", flush=True)
    base_id = pipeline["stages"][1]

    def base_train_under_way() -> bool:
        percent = (api_call(api, token, f"/jobs/{base_id}").get("progress") or {}).get("percent", 0)
        print(f"  base training {percent}% done", flush=True)
        return percent >= 30

    wait_for("base training to get 30% done", base_train_under_way, 900)
    validated_while_training(api, token, base_id, project)
    # The job's worker is told to stop mid-run: its program checkpoints and the job is re-queued.
    workers = containers(project, "worker")
    assert len(workers) == 2, f"--scale worker=2 started {len(workers)} worker containers"
    run("podman", "restart", "--time", "180", *workers, quiet=True)  # stop_grace_period
    pipeline_status = lambda: api_call(api, token, f"/jobs/{pipeline['id']}")["status"]  # noqa: E731
    wait_for("the pipeline to finish", lambda: pipeline_status() in ("finished", "failed", "canceled"), 1500)
    status = pipeline_status()
    base = api_call(api, token, f"/jobs/{base_id}")
    assert status == "finished", f"the pipeline ended {status}"
    first, *later = base["attempts"]
    assert first["end_reason"] == "worker shut down", f"the restart did not re-queue the job: {first}"
    resumed = [a["resumed_from_step"] for a in later]
    assert resumed and resumed[0], f"base training did not resume from a checkpoint: {base['attempts']}"
    print(f"base training resumed from step {resumed[0]} after the worker restart", flush=True)
    log = api_call(api, token, f"/jobs/{base_id}/logs", text=True)
    assert "torch.compile: a trial kernel built" in log and "--compile = True" in log, "not compiled"
    assert "data: the local corpus /data/kit/pretrain holds" in log, "the kit did not reach the worker"
    print("base training ran compiled, on the data kit mounted from NANOCHAT_DATA_DIR", flush=True)
    reply = api_call(
        web,
        token,
        "/v1/chat/completions",
        {"model": "demo-sft", "messages": [{"role": "user", "content": "Hi!"}], "max_tokens": 16},
        timeout=120,
    )
    assert reply["choices"][0]["message"]["content"] is not None
    print(f"chat through the web container: {reply['choices'][0]['message']['content']!r}", flush=True)
    two_node_job(api, token)


def validated_while_training(api: str, token: str, training_id: str, project: str) -> None:
    """A file uploaded while a training job runs is validated meanwhile, by the cpu-worker container (the
    worker containers take GPU jobs alone here: WORKER_QUEUES=gpu)."""
    boundary = secrets.token_hex(8)
    text = b"A short story about a cat who learned to read.\n\n" * 200
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\npretrain\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="story.txt"\r\n'
            "Content-Type: text/plain\r\n\r\n"
        ).encode()
        + text
        + f"\r\n--{boundary}--\r\n".encode()
    )
    request = urllib.request.Request(
        f"{api}/files",
        data=body,
        headers={
            "Authorization": f"Bearer {token}",
            "Content-Type": f"multipart/form-data; boundary={boundary}",
        },
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        upload = json.load(response)
    wait_for(
        "the upload's validation",
        lambda: api_call(api, token, f"/files/{upload['id']}")["status"] != "validating",
        180,
    )
    report = api_call(api, token, f"/files/{upload['id']}")
    assert report["status"] == "ready", f"the upload was not validated: {report}"
    training = api_call(api, token, f"/jobs/{training_id}")["status"]
    assert training == "started", f"base training was {training} once the upload was validated, not started"
    (cpu_worker,) = containers(project, "cpu-worker")
    inspect = ["podman", "inspect", "-f", "{{.Config.Hostname}}", cpu_worker]
    host = subprocess.run(inspect, check=True, capture_output=True, text=True).stdout.strip()
    worker = api_call(api, token, f"/jobs/{upload['job_id']}")["attempts"][-1]["worker"]
    assert worker.startswith(f"nanochat-{host}-"), (
        f"the validation ran on {worker}, not the cpu-worker ({host})"
    )
    print("a file uploaded during base training was validated meanwhile, by the cpu-worker", flush=True)


def two_node_job(api: str, token: str) -> None:
    """base_train on both worker containers at once: one hosts the rendezvous, the other joins it."""
    stages = demo_preset()["spec"]["config"]
    for kind, config in (
        ("tokenizer", stages["tokenizer"]),
        # Half the rows per process: the batch stays a multiple of rows × length × 2 processes.
        ("base_train", stages["base_train"] | {"nnodes": 2, "num_iterations": 20, "device_batch_size": 4}),
    ):
        job = api_call(api, token, "/jobs", {"kind": kind, "run": "nodes", "config": config})
        path = f"/jobs/{job['id']}"
        ended = lambda path=path: api_call(api, token, path)["status"] not in ("queued", "started")  # noqa: E731
        wait_for(f"the {kind} job of run nodes to end", ended, 600)
        record = api_call(api, token, path)
        if record["status"] != "finished":
            log = api_call(api, token, f"{path}/logs?tail=60", text=True)
            raise AssertionError(f"the {kind} job of run nodes ended {record['status']}; its log:\n{log}")
    log = api_call(api, token, f"{path}/logs", text=True)
    assert "[node 1] " in log and "2 process(es)" in log, f"not both nodes in the log:\n{log[-3000:]}"
    print("a 2-node job ran on the two worker containers", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--wheelhouse", type=Path, default=Path("/opt/wheels"), help="holds the CPU torch wheel"
    )
    args = parser.parse_args()
    missing = [tool for tool in ("podman", "runc", "debootstrap") if shutil.which(tool) is None]
    if missing:
        sys.exit(f"compose-test needs {', '.join(missing)}: apt-get install podman runc debootstrap")
    data_kit = Path(os.environ.get("NANOCHAT_DATA_DIR") or ROOT.parent / "shared" / "data").resolve()
    if not (data_kit / "pretrain").is_dir():
        sys.exit(f"compose-test needs the data kit: set NANOCHAT_DATA_DIR (no kit at {data_kit})")
    work = Path(tempfile.mkdtemp(prefix="nanochat-compose-test-"))
    (work / "containers.conf").write_text(CONTAINERS_CONF)
    os.environ["CONTAINERS_CONF"] = str(work / "containers.conf")
    build_standins(work)
    build_images(args.wheelhouse)
    project, token = f"nanochat-ct-{secrets.token_hex(3)}", secrets.token_urlsafe(24)
    ports = {name: free_port() for name in ("api", "inference", "web")}
    override = {"services": {name: {"image": f"{IMAGES}/{name}:latest"} for name in SERVICES}}
    override["services"]["cpu-worker"] = {
        "image": f"{IMAGES}/worker:latest"
    }  # built alike under the CPU file
    (work / "compose.test.yaml").write_text(json.dumps(override))
    env = {  # settings as a user's .env gives them
        **os.environ,
        "API_TOKEN": token,
        "REDIS_PASSWORD": secrets.token_urlsafe(16),
        "REDIS_IMAGE": standin("redis"),
        "NANOCHAT_DATA_DIR": str(data_kit),
        "JOB_LEASE_SECONDS": "10",
        "WORKER_QUEUES": "gpu",  # the worker containers leave file validations to the cpu-worker
        **{f"{name.upper()}_PORT": str(port) for name, port in ports.items()},
    }
    compose = [sys.executable, "-m", "podman_compose", "-p", project, "-f", "compose.yaml",
               "-f", "compose.cpu.yaml", "-f", str(work / "compose.test.yaml")]  # fmt: skip
    os.environ.update(env)
    os.chdir(ROOT)
    try:
        run(*compose, "up", "-d", "--no-build", "--scale", "worker=2", quiet=True)
        scenario(compose, project, ports, token)
        print("compose-test passed", flush=True)
        return 0
    except (AssertionError, RuntimeError, subprocess.CalledProcessError) as error:
        print(f"compose-test FAILED: {error}", flush=True)
        subprocess.run([*compose, "logs", "--tail", "40"])
        return 1
    finally:
        subprocess.run([*compose, "down", "-v", "-t", "5"], stdout=subprocess.DEVNULL)
        if leftovers := containers(project):  # the replicas `down` does not know; then their volumes
            subprocess.run(["podman", "rm", "-f", "-t", "5", *leftovers], stdout=subprocess.DEVNULL)
            subprocess.run([*compose, "down", "-v"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
