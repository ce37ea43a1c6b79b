"""
Write .env from .env.example with a fresh API_TOKEN and REDIS_PASSWORD (both URL-safe), the two settings
`docker compose up` refuses to start without. Every other line is copied as it is, to edit afterwards.
An existing .env is never overwritten.

    python3 scripts/make_env.py            # .env beside compose.yaml
"""

import argparse
import re
import secrets
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SECRETS = {"API_TOKEN": 32, "REDIS_PASSWORD": 24}  # bytes of randomness, base64url-encoded


def filled_in(example: str) -> str:
    """The example's text with each secret's empty value replaced by a new random one."""
    for name, size in SECRETS.items():
        example, count = re.subn(rf"^{name}=$", f"{name}={secrets.token_urlsafe(size)}", example, flags=re.M)
        if count != 1:
            raise SystemExit(f"make_env: .env.example has no empty {name}= line to fill in")
    return example


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=ROOT / ".env", help="where to write (default: .env)")
    args = parser.parse_args(argv)
    if args.out.exists():
        sys.exit(f"make_env: {args.out} exists; it is kept as it is (delete it to make a new one)")
    args.out.write_text(filled_in((ROOT / ".env.example").read_text()))
    args.out.chmod(0o600)  # it holds the stack's secrets
    print(f"wrote {args.out} with a new API_TOKEN and REDIS_PASSWORD; the API token is in it")


if __name__ == "__main__":
    main()
