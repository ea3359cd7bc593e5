"""Checks that need a fresh interpreter (what an import loads, a warning torch gives once a process, settings read
at start-up): a module starts all of its interpreters when its first test runs and each test reads its own, so on two
cores they run side by side instead of one after the other (each is mostly one core's imports)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class FreshPythons:
    """Interpreters by name: `commands` maps a name to its arguments after `python`, or to (arguments, env)."""

    def __init__(self, commands: dict[str, list[str] | tuple[list[str], dict[str, str]]]):
        self.procs: dict[str, subprocess.Popen] = {}
        for name, spec in commands.items():
            args, env = spec if isinstance(spec, tuple) else (spec, None)
            self.procs[name] = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, text=True,
                                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.done: dict[str, tuple[str, str]] = {}

    def output(self, name: str, timeout: float = 300) -> str:
        """What `name`'s interpreter printed; it must have exited 0 (its stderr's end is the failure message)."""
        if name not in self.done:
            self.done[name] = self.procs[name].communicate(timeout=timeout)
        out, err = self.done[name]
        assert self.procs[name].returncode == 0, err[-3000:]
        return out

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(30)
