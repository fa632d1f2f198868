"""One stage of the day as a child process: its output to the terminal and to a log, signals passed on.

The child runs in its own process group, so a Ctrl-C (or a kill of the day: INT, TERM, HUP) reaches
it exactly once, forwarded by the day, and the stage stops the way it always does (a checkpoint, a
finished shard, exit 130). The day then records where it stopped in state.json, and a second run
starts over from the first stage: finished stages say "up to date" in seconds.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from packager.staging import StageRecord

from .stages import Stage, child_env


FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@dataclass
class Outcome:
    rc: int
    seconds: float
    signalled: int | None     # the signal the day passed on, if any

    @property
    def interrupted(self) -> bool:
        return self.signalled is not None or self.rc in (130, -signal.SIGINT, 143, -signal.SIGTERM)


def run_stage(stage: Stage, log: Path, state: "State") -> Outcome:
    """Run `stage`, copying its output (stdout and stderr, as they come) to ours and to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    got: list[int] = []
    child = subprocess.Popen(stage.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=child_env(stage),
                             process_group=0)
    state.set(running={"stage": stage.name, "pid": child.pid, "argv": stage.argv})  # a day killed outright leaves this behind

    def forward(signum, _frame) -> None:
        if not got:  # once: a second Ctrl-C while the stage saves must not cut its checkpoint short
            got.append(signum)
            try:  # to the stage's whole group, as a terminal would (make validate-N and what it runs)
                os.killpg(child.pid, signum)
            except ProcessLookupError:
                pass

    previous = {s: signal.signal(s, forward) for s in FORWARDED}
    try:
        with log.open("ab") as f:
            f.write(f"\n$ {' '.join(stage.argv)}\n".encode())
            out = sys.stdout.buffer
            while True:
                chunk = os.read(child.stdout.fileno(), 65536)
                if not chunk:
                    break
                out.write(chunk)
                out.flush()
                f.write(chunk)
        rc = child.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    state.set(running=None)
    return Outcome(rc, time.monotonic() - started, got[0] if got else None)


class State(StageRecord):
    """build/day/NAME/state.json: every attempt of every stage (start, seconds here, exit status)."""

    fresh = {"attempts": []}

    def record(self, name: str, command: list[str], outcome: Outcome, status: str) -> None:
        entry = self.stage(name)
        entry["command"] = command
        entry["status"] = status
        entry["attempts"].append({"ended": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rc": outcome.rc,
                                  "seconds": round(outcome.seconds, 1)})
        self.save()

    def set(self, **fields) -> None:
        self.data.update(fields)
        self.save()

    def still_running(self) -> str | None:
        """A stage a previous day left running (that day was killed outright): never two at once on one folder."""
        running = self.data.get("running")
        if not running:
            return None
        try:  # alive, and still that command (after a reboot the number may belong to another process)
            cmdline = Path(f"/proc/{running['pid']}/cmdline").read_bytes().split(b"\0")
            if [c.decode(errors="replace") for c in cmdline if c] != running.get("argv"):
                return None
        except FileNotFoundError:
            return None
        except OSError:  # no /proc: ask the kernel whether the process lives
            try:
                os.kill(running["pid"], 0)
            except ProcessLookupError:
                return None
            except PermissionError:
                pass
        return (f"{running['stage']} of a previous day is still running (pid {running['pid']}, its process group): "
                f"wait for it or stop it (kill -INT -- -{running['pid']}), then run the day again")

    def seconds(self, name: str) -> float:
        return sum(a["seconds"] for a in self.stage(name)["attempts"])
