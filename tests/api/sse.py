"""A small Server-Sent Events reader for the tests (the wire format, parsed by hand on purpose)."""

from dataclasses import dataclass

import httpx


@dataclass
class Event:
    event: str
    data: str
    id: str | None


def read_events(client: httpx.Client, url: str, headers: dict[str, str] | None = None) -> list[Event]:
    """All events of a stream, until the server closes it."""
    events, fields = [], {}
    with client.stream("GET", url, headers=headers, timeout=120) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if not line:
                if "data" in fields:
                    events.append(Event(fields.get("event", "message"), fields["data"], fields.get("id")))
                fields = {}
            elif not line.startswith(":"):
                key, _, value = line.partition(": ")
                fields[key] = value
    return events
