"""Regenerate the field table of docs/porting-from-trl.md from GRPOConfig itself:
``python docs/gen_porting.py`` (tests/test_trl_config.py checks the page is current)."""

import json
import sys
from pathlib import Path

import attrs

import grpo  # noqa: F401
from grpo.config import GRPOConfig

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "porting-from-trl.md"
TRL = ROOT / "tests" / "data" / "trl_1_16_grpo_fields.json"
START, END = "<!-- trl-fields:start -->", "<!-- trl-fields:end -->"


def _cell(value) -> str:
    return f"`{json.dumps(list(value) if isinstance(value, tuple) else value)}`"


def table() -> str:
    trl = {r["name"]: r["default"] for r in json.loads(TRL.read_text())["fields"]}
    ours = attrs.fields_dict(GRPOConfig)
    lines = ["| field | TRL 1.16 default | mlx-grpo default | status |", "|---|---|---|---|"]
    for name in sorted(set(trl) | set(ours)):
        f = ours.get(name)
        if f is None:
            status = "not accepted yet"
        elif f.metadata.get("ignored"):
            status = f"accepted, no effect: {f.metadata['ignored']}"
        elif f.metadata.get("script"):
            status = "read by your script (as in transformers)"
        else:
            status = "wired: " + f.metadata.get("help", "").replace("|", "\\|")
        if name not in trl:
            status = "mlx-grpo only; " + status
        theirs = _cell(trl[name]) if name in trl else ""
        mine = "" if f is None else _cell(f.default)
        lines.append(f"| `{name}` | {theirs} | {mine} | {status} |")
    return "\n".join(lines)


def render(text: str) -> str:
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{table()}\n{END}{tail}"


if __name__ == "__main__":
    new = render(PAGE.read_text())
    if "--check" in sys.argv:
        sys.exit(0 if new == PAGE.read_text() else 1)
    PAGE.write_text(new)
