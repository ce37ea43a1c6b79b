"""A worker that cannot reach Redis says so and stops, without printing REDIS_URL's password (logs are
shared and kept; the password opens the whole queue)."""

import subprocess
import sys

from support import free_port, service_env


def test_a_worker_that_cannot_reach_redis_exits_naming_it_without_the_password() -> None:
    url = f"redis://:s3cret-Pa55@127.0.0.1:{free_port()}/0"  # nothing listens there
    result = subprocess.run(
        [sys.executable, "-m", "worker"],
        env=service_env(REDIS_URL=url),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert f"cannot reach Redis at redis://:***@127.0.0.1:{url.rsplit(':', 1)[1]}" in result.stderr
    assert "s3cret-Pa55" not in result.stderr + result.stdout
