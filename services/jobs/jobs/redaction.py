"""
Secrets kept out of what the services print and store. Each service calls hide_secrets() once its
settings are read: from then on its stdout and stderr (every logging handler, uvicorn's access log,
tracebacks) mask the secrets it knows (API_TOKEN, REDIS_URL's password, WANDB_API_KEY, HF_TOKEN) and,
whoever's they are, a URL's password and a credential in a query string. redact() does the same for
text that goes elsewhere: a job's log, a job's error.
"""

import os
import re
import sys
from typing import TextIO
from urllib.parse import unquote, urlsplit

from pydantic import SecretStr, ValidationError

MASK = "***"
# The stack's own secrets, and those the worker hands its jobs for wandb and the Hugging Face hub.
SECRET_VARIABLES = (
    "API_TOKEN",
    "REDIS_PASSWORD",
    "REDIS_URL",
    "WANDB_API_KEY",
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
)
# scheme://user:password@host: a mirror's URL in a download error, requests' "... for url: ...".
URL_PASSWORD = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^\s/@:]*:)[^\s/@]+@")
# A token a client put in the URL (EventSource cannot send headers): the access log prints the query.
QUERY_CREDENTIAL = re.compile(r"(?i)([?&](?:access_token|api_key|token)=)[^&\s\"']+")

known: set[str] = set()  # this process's secrets, as hide_secrets() found them


def hide_secrets(*values: str | SecretStr | None) -> None:
    """Mask these values and the environment's secrets (a URL: its password) in redact() and in
    everything this process prints from now on."""
    for value in (*values, *(os.environ.get(name) for name in SECRET_VARIABLES)):
        plain = value.get_secret_value() if isinstance(value, SecretStr) else value
        if plain:
            known.update(secret_parts(plain))
    for name in ("stdout", "stderr"):
        if not isinstance(getattr(sys, name), RedactingStream):
            setattr(sys, name, RedactingStream(getattr(sys, name)))


def secret_parts(value: str) -> set[str]:
    """What to mask of a secret: a URL's password (as written and percent-decoded), else all of it."""
    if "://" not in value:
        return {value}
    try:
        password = urlsplit(value).password
    except ValueError:  # not a URL after all
        return {value}
    return {password, unquote(password)} if password else set()


def redact(text: str) -> str:
    text = URL_PASSWORD.sub(rf"\1{MASK}@", text)
    text = QUERY_CREDENTIAL.sub(rf"\1{MASK}", text)
    for secret in sorted(known, key=len, reverse=True):  # a secret within a longer one goes with it
        text = text.replace(secret, MASK)
    return text


class RedactingStream:
    """stdout or stderr, masking secrets in each write (logging writes a whole record at once; print
    writes each argument whole)."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        self.stream.write(redact(text))
        return len(text)

    def __getattr__(self, name: str) -> object:  # flush, fileno, isatty, encoding, ...
        return getattr(self.stream, name)


def settings_error(error: ValidationError) -> str:
    """What is wrong with a service's settings, without their values: pydantic's own message quotes
    the input, secrets included."""
    reasons = []
    for problem in error.errors():
        reason = problem["msg"].removeprefix("Value error, ")
        where = ".".join(str(part) for part in problem["loc"])
        reasons.append(f"{where}: {reason}" if where else reason)
    return "; ".join(reasons)
