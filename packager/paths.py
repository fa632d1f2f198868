"""Where things live in the repository."""

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SUBMISSIONS = REPO / "submissions"
DIST = REPO / "dist"
INFERENCE = REPO / "docker" / "inference"  # the server's sources and its requirements lock
LOCK = INFERENCE / "requirements.lock"
