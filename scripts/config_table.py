"""
README's configuration table, made from .env.example (which a test keeps equal to what the services
read): a row per variable with its default and its comment, under the section it belongs to.

    python scripts/config_table.py           print the table
    python scripts/config_table.py --write   put it into README.md between its markers
"""

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BEGIN = "<!-- configuration table: made by scripts/config_table.py from .env.example -->"
END = "<!-- end of configuration table -->"


def table(env_example: str) -> str:
    rows, comment, section = [], [], ""
    for line in env_example.splitlines():
        if heading := re.fullmatch(r"# --- (.+) ---", line):
            section, comment = heading[1], []
        elif line.startswith("# "):
            comment.append(line[2:])
        elif variable := re.fullmatch(r"([A-Z_][A-Z0-9_]*)=(.*)", line):
            default = f"`{variable[2]}`" if variable[2] else ""
            text = " ".join(comment).replace("|", "\\|")
            rows.append(f"| {section} | `{variable[1]}` | {default} | {text} |")
            comment = []
        else:
            comment = []
    return "\n".join(["| part | variable | default | what it does |", "|---|---|---|---|", *rows])


def readme_with_table(readme: str, rendered: str) -> str:
    before, rest = readme.split(BEGIN, 1)
    _, after = rest.split(END, 1)
    return f"{before}{BEGIN}\n{rendered}\n{END}{after}"


def main() -> None:
    rendered = table((ROOT / ".env.example").read_text())
    if sys.argv[1:] == ["--write"]:
        readme = ROOT / "README.md"
        readme.write_text(readme_with_table(readme.read_text(), rendered))
    else:
        print(rendered)


if __name__ == "__main__":
    main()
