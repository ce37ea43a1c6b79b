"""The web server's proxy under attack, against a private API, model server and web server on 127.0.0.1
with small limits: slow senders and greedy clients cannot take the UI down, and nothing proxied runs a
third-party script on the origin whose localStorage holds the token."""

import http.client
import secrets
import socket
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass

import httpx
import pytest

from support import PYTHON, Process, free_port, private_redis, service_env, wait_until

MAX_OPEN, PER_CLIENT = 4, 2  # open upstream requests in all, and per client address
MAX_BODY, BODY_SECONDS = 65_536, 2
MAX_UPLOADS = 2
SLOW_SENDERS = 110  # the reported attack: more than httpx's pool of 100 connections


@dataclass
class ProxyStack:
    web_port: int
    api_url: str
    inference_url: str
    token: str

    @property
    def web_url(self) -> str:
        return f"http://127.0.0.1:{self.web_port}"

    def client(self, address: str = "127.0.0.1") -> httpx.Client:
        """A browser at `address` (any 127.x.y.z reaches the loopback) with the token."""
        return httpx.Client(
            base_url=self.web_url,
            headers={"Authorization": f"Bearer {self.token}"},
            transport=httpx.HTTPTransport(local_address=address),
            timeout=30,
        )


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyStack]:
    workdir = tmp_path_factory.mktemp("proxy")
    ports = {name: free_port() for name in ("api", "inference", "web")}
    urls = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
    token = secrets.token_urlsafe(24)
    with private_redis(workdir) as redis_url:
        env = service_env(
            REDIS_URL=redis_url,
            API_TOKEN=token,
            API_PORT=str(ports["api"]),
            INFERENCE_PORT=str(ports["inference"]),
            NANOCHAT_BASE_DIR=str(workdir / "base"),  # no checkpoints: the model server serves nothing
            WEB_PORT=str(ports["web"]),
            WEB_API_URL=urls["api"],
            WEB_INFERENCE_URL=urls["inference"],
            WEB_MAX_UPSTREAM_REQUESTS=str(MAX_OPEN),
            WEB_MAX_UPSTREAM_REQUESTS_PER_CLIENT=str(PER_CLIENT),
            WEB_MAX_BODY_BYTES=str(MAX_BODY),
            WEB_BODY_TIMEOUT_SECONDS=str(BODY_SECONDS),
            WEB_MAX_UPLOADS=str(MAX_UPLOADS),
        )
        processes = [Process(name, [PYTHON, "-m", name], env, workdir) for name in urls]
        try:
            for process in processes:
                process.wait_healthy(f"{urls[process.name]}/health", timeout=60)
            yield ProxyStack(ports["web"], urls["api"], urls["inference"], token)
        finally:
            for process in processes:
                process.stop()


def start_slow_body(port: int) -> socket.socket:
    """A job submission whose chunked body starts and never goes on."""
    sender = socket.create_connection(("127.0.0.1", port))
    sender.sendall(
        b"POST /api/jobs HTTP/1.1\r\nHost: web\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n1\r\n{\r\n"
    )
    return sender


def test_slow_request_bodies_do_not_keep_others_out(stack: ProxyStack) -> None:
    with ExitStack() as senders:
        slow = [senders.enter_context(start_slow_body(stack.web_port)) for _ in range(SLOW_SENDERS)]
        time.sleep(1)  # every slow request has reached the web server
        started = time.monotonic()
        with stack.client() as browser:
            assert browser.get("/api/jobs").status_code == 200
        assert time.monotonic() - started < 3
        for sender in slow:  # and each slow sender is cut off at the deadline
            sender.settimeout(BODY_SECONDS + 10)
            assert sender.recv(64).startswith(b"HTTP/1.1 408 ")


def test_a_body_over_the_limit_is_refused_before_it_reaches_the_api(stack: ProxyStack) -> None:
    def chunks() -> Iterator[bytes]:  # chunked: no Content-Length announces the size
        yield b"x" * MAX_BODY
        yield b"x"

    with stack.client() as browser:
        reply = browser.post("/api/jobs", content=chunks(), headers={"Content-Type": "application/json"})
    assert reply.status_code == 413 and reply.json()["error"]["type"] == "proxy"


def upload(browser: httpx.Client, text: str) -> httpx.Response:
    return browser.post(
        "/api/files", data={"purpose": "pretrain"}, files={"file": ("corpus.txt", text.encode())}
    )


def test_an_upload_over_the_body_limit_streams_through(stack: ProxyStack) -> None:
    with stack.client() as browser:
        reply = upload(browser, "a line of a pretraining corpus\n" * (2 * MAX_BODY // 30))
    assert reply.status_code == 201, reply.text


def start_slow_upload(port: int, token: str) -> socket.socket:
    """An upload (with the token) whose file stops arriving after its first bytes."""
    sender = socket.create_connection(("127.0.0.1", port))
    sender.sendall(
        f"POST /api/files HTTP/1.1\r\nHost: web\r\nAuthorization: Bearer {token}\r\n"
        "Content-Type: multipart/form-data; boundary=b\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
    )
    part = (
        b'--b\r\nContent-Disposition: form-data; name="purpose"\r\n\r\npretrain\r\n'
        b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.txt"\r\n\r\nthe first line\n'
    )
    sender.sendall(b"%x\r\n%s\r\n" % (len(part), part))
    return sender


def test_a_stalled_upload_holds_only_its_own_lane_and_is_cut_off(stack: ProxyStack) -> None:
    with start_slow_upload(stack.web_port, stack.token) as stalled, stack.client() as browser:
        time.sleep(0.5)  # the stalled upload holds its sender's place in the upload lane
        started = time.monotonic()
        assert upload(browser, "another corpus\n").status_code == 429  # at once, not after the stall
        assert browser.get("/api/jobs").status_code == 200  # the rest of the UI is served
        assert time.monotonic() - started < 3
        stalled.settimeout(BODY_SECONDS + 10)
        assert stalled.recv(64).startswith(b"HTTP/1.1 408 ")
        wait_until(lambda: upload(browser, "a corpus\n").status_code == 201, 5, "the upload lane")


def follow_logs(browser: httpx.Client, job_id: str) -> AbstractContextManager[httpx.Response]:
    """An open log stream (the job stays queued: no worker), as the job page keeps one."""
    return browser.stream("GET", f"/api/jobs/{job_id}/logs", params={"follow": "true"})


@pytest.fixture(scope="module")
def queued_job(stack: ProxyStack) -> str:
    with stack.client() as browser:
        reply = browser.post("/api/jobs", json={"kind": "tokenizer", "run": "proxy"})
    assert reply.status_code == 201, reply.text
    return reply.json()["id"]


def test_one_client_cannot_hold_every_upstream_connection(stack: ProxyStack, queued_job: str) -> None:
    with stack.client("127.0.0.1") as greedy, stack.client("127.0.0.2") as other:
        with ExitStack() as streams:
            for _ in range(PER_CLIENT):
                assert streams.enter_context(follow_logs(greedy, queued_job)).status_code == 200
            refused = greedy.get("/api/jobs")
            assert refused.status_code == 429 and refused.json()["error"]["type"] == "proxy"
            started = time.monotonic()
            assert other.get("/api/jobs").status_code == 200
            assert time.monotonic() - started < 3
        # Closed streams give their places back.
        wait_until(lambda: greedy.get("/api/jobs").status_code == 200, 5, "the greedy client's slots")


def test_a_full_proxy_refuses_at_once_instead_of_hanging(stack: ProxyStack, queued_job: str) -> None:
    addresses = [f"127.0.0.{i}" for i in range(2, 2 + MAX_OPEN // PER_CLIENT)]
    with stack.client("127.0.0.9") as late:
        with ExitStack() as streams:
            for address in addresses:
                browser = streams.enter_context(stack.client(address))
                for _ in range(PER_CLIENT):
                    assert streams.enter_context(follow_logs(browser, queued_job)).status_code == 200
            started = time.monotonic()
            busy = late.get("/api/jobs")
            assert busy.status_code == 503 and busy.headers["retry-after"]
            assert time.monotonic() - started < 3
        wait_until(lambda: late.get("/api/jobs").status_code == 200, 5, "the streams' slots")


def status_of(port: int, target: str) -> int:
    """The status of GET `target` sent as written (httpx would resolve the dot segments)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("GET", target)
        return connection.getresponse().status
    finally:
        connection.close()


def test_no_docs_page_loads_third_party_scripts_but_the_schema_stays(stack: ProxyStack) -> None:
    pages = ["/api/docs", "/api/redoc", "/v1/../docs", "/v1/../redoc", "/v1/%2e%2e/docs"]
    assert {page: status_of(stack.web_port, page) for page in pages} == dict.fromkeys(pages, 404)
    for service in (stack.api_url, stack.inference_url):  # nor on their own ports
        assert httpx.get(f"{service}/docs").status_code == 404
        assert httpx.get(f"{service}/redoc").status_code == 404
    # The OpenAPI schema stays for tools (clients generated from it, a Swagger UI of one's own).
    schemas = [
        httpx.get(f"{stack.web_url}/api/openapi.json"),
        httpx.get(f"{stack.inference_url}/openapi.json"),
    ]
    titles = [schema.json()["info"]["title"] for schema in schemas]
    assert titles == ["nanochat-stack API", "nanochat-stack inference"]


def test_proxied_responses_carry_the_security_headers(stack: ProxyStack) -> None:
    with stack.client() as browser:
        replies = [browser.get("/api/jobs"), browser.get("/api/openapi.json"), browser.get("/v1/models")]
    for reply in replies:
        assert reply.status_code == 200, reply.url
        # Whatever a service answers, it cannot run a script on this origin or be framed.
        policy = reply.headers.get("content-security-policy", "")
        assert "default-src 'none'" in policy and "sandbox" in policy and "frame-ancestors 'none'" in policy
        assert reply.headers.get("x-content-type-options") == "nosniff"
        assert reply.headers.get("referrer-policy") == "no-referrer"


def test_upstream_redirects_point_at_the_proxy_paths(stack: ProxyStack) -> None:
    with stack.client() as browser:
        redirect = browser.get("/api/jobs/", params={"status": "queued"})
        assert redirect.status_code == 307
        assert redirect.headers["location"] == "/api/jobs?status=queued"
        assert browser.get(redirect.headers["location"]).status_code == 200
