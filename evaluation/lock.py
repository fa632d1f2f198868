"""`make helm-lock`: re-resolve HELM's venv lock from crfm-helm's own declared requirements.

crfm-helm declares torch and torchvision, which no offline scenario needs (gigabytes): they are left
out; everything else it declares is installed into a scratch venv and frozen, pinned.

    python -m evaluation.lock requirements/helm-eval.lock
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

HELM = "crfm-helm==0.5.16"
LEFT_OUT = ("torch", "torchvision")  # no scenario or metric of the offline profile imports them
HEADER = """# HELM's own venv (.venv-helm/, make helm-venv): crfm-helm 0.5.16 and its declared requirements without
# torch and torchvision (no scenario or metric of the offline profile needs them), pinned as installed.
# Installed with --no-deps. Regenerate: make helm-lock (needs PyPI).
"""


def declared(python: str) -> list[str]:
    code = ("from importlib.metadata import requires; import re; "
            "print('\\n'.join(r for r in requires('crfm-helm') if 'extra ==' not in r))")
    names = subprocess.run([python, "-c", code], check=True, capture_output=True, text=True).stdout.split("\n")
    return [r for r in names if r and not r.split()[0].lower().startswith(LEFT_OUT)]


def main(argv: list[str] | None = None) -> int:
    out = Path((argv or sys.argv[1:] or ["requirements/helm-eval.lock"])[0])
    with tempfile.TemporaryDirectory() as scratch:
        python = f"{scratch}/bin/python"
        pip = [python, "-m", "pip", "--disable-pip-version-check", "install", "-q"]
        subprocess.run([sys.executable, "-m", "venv", scratch], check=True)
        subprocess.run([*pip, "--no-deps", HELM], check=True)
        subprocess.run([*pip, *declared(python), "pillow"], check=True)  # pillow: helm-summarize imports it
        frozen = subprocess.run([python, "-m", "pip", "freeze"], check=True, capture_output=True, text=True).stdout
    pins = [line for line in frozen.splitlines() if line and not line.lower().startswith("crfm-helm")]
    tmp = out.with_suffix(".tmp")
    tmp.write_text(HEADER + HELM + "\n" + "\n".join(pins) + "\n", encoding="utf-8")
    tmp.replace(out)
    print(f"{out}: {len(pins) + 1} pins")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
