"""Print the Markdown table of every server setting: CLI flag, environment variable, default, meaning.

The README's configuration table is this script's output (tests/service/test_config.py checks it).
Run: .venv/bin/python scripts/settings_table.py
"""

from convray.service.cli import SERVE_FLAGS, env_var
from convray.service.config import Settings


def settings_table() -> str:
    """The table, one row per Settings field, in the order of the CLI flags."""
    rows = ["| flag | environment variable | default | meaning |", "|---|---|---|---|"]
    for flag, (group, field) in SERVE_FLAGS.items():
        info = Settings.model_fields[group].annotation.model_fields[field]
        default = "unset" if info.default is None else f"`{info.default}`"
        env = env_var(group, field)
        rows.append(f"| `{flag}` | `{env}` | {default} | {(info.description or '').replace(chr(10), ' ')} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(settings_table())
