"""The bearer-token rule shared by every service that checks API_TOKEN (the API and the model server)."""

import secrets

from pydantic import SecretStr


def token_accepted(expected: SecretStr | None, given: str | None) -> bool:
    """True when no token is set (dev mode) or `given` is exactly it (compared in constant time)."""
    if expected is None:
        return True
    return secrets.compare_digest((given or "").encode(), expected.get_secret_value().encode())
