"""HELM run-spec confs as data: which runs a conf asks for and how many instances each.

A conf is HOCON (`entries: [{description: "scenario:key=value,...", priority: 1}, ...]`);
HELM parses it with pyhocon inside its own venv. The toolkit needs only the entries, so a
strict pattern reads them here, refusing a file it would misread.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

CONFS = Path(__file__).resolve().parent / "confs"
CHALLENGE_SAMPLE = CONFS / "challenge_sample.conf"
OFFLINE = CONFS / "offline.conf"

_ENTRY = re.compile(r'\{\s*description\s*:\s*"(?P<description>[^"]+)"\s*,\s*priority\s*:\s*(?P<priority>\d+)\s*\}')


class ConfError(ValueError):
    """A conf that cannot be read; the message names the file and the fix."""


@dataclass(frozen=True)
class RunEntry:
    description: str  # "scenario:key=value,..."
    priority: int

    @property
    def scenario(self) -> str:
        return self.description.split(":", 1)[0]

    @property
    def args(self) -> dict[str, str]:
        _, _, rest = self.description.partition(":")
        return dict(part.split("=", 1) for part in rest.split(",") if "=" in part)

    @property
    def max_eval_instances(self) -> int | None:
        value = self.args.get("max_eval_instances")
        return int(value) if value else None


def read_conf(path: Path) -> list[RunEntry]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfError(f"{path}: cannot read the run-spec conf ({e.strerror}); give CONF=<an existing .conf file>") from None
    body = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    entries = [RunEntry(m["description"], int(m["priority"])) for m in _ENTRY.finditer(body)]
    if not entries or "entries" not in body:
        raise ConfError(f'{path}: no run entries found; a conf reads entries: [{{description: "simple_mcqa:'
                        'model=neurips/local", priority: 1}}]')
    for entry in entries:
        if "model=neurips/local" not in entry.description:
            raise ConfError(f"{path}: run {entry.description!r} does not name model=neurips/local, the model a "
                            "submission is evaluated as; add it to the description")
    return entries
