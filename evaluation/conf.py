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

# Requests HELM sends per instance, as data: data_augmentation=canonical adds four perturbed copies
# (mild_mix, dialect, gender, person_name) to each instance; max_train_instances=big_bench_few_shot_setting
# runs the entry once per shot count (0, 1, 2, 3).
AUGMENTATION_COPIES = {"canonical": 5}
SHOT_SETTINGS = {"big_bench_few_shot_setting": 4}

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

    @property
    def requests_per_instance(self) -> int:
        return (AUGMENTATION_COPIES.get(self.args.get("data_augmentation", ""), 1)
                * SHOT_SETTINGS.get(self.args.get("max_train_instances", ""), 1))

    def requests(self, default_instances: int) -> int:
        """Requests this entry makes when the command line's --max-eval-instances is `default_instances`."""
        return (self.max_eval_instances or default_instances) * self.requests_per_instance


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
