"""`haulage dev --reload`: notice that the user's Python files changed, by polling their mtimes.

What is watched: the ``.py`` files directly in the current folder, and for
each module in HAULAGE_MODULES the file that defines it or, for a package, every
``.py`` file beneath the package's top folder. Modules are located on the
path without being imported (the supervisor must not run the user's code).
Polling needs no new dependency and a few hundred files cost well under a
millisecond a look.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

#: folders never walked into (virtualenvs, caches, VCS data)
_SKIP = {"__pycache__", "node_modules", "site-packages", ".venv", "venv", ".git", ".haulage"}


def _module_roots(modules: Iterable[str], path: list[str]) -> Iterator[Path]:
    """The file or top package folder of each module, found on ``path`` (first match wins)."""
    for name in modules:
        top = name.split(".")[0]
        for entry in path:
            base = Path(entry or ".")
            if (base / top).is_dir() and ((base / top / "__init__.py").is_file() or "." in name):
                yield base / top
                break
            if (base / f"{top}.py").is_file():
                yield base / f"{top}.py"
                break


def _py_files(root: Path) -> Iterator[Path]:
    if root.is_file():
        yield root
        return
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _SKIP and not d.startswith(".")]
        for f in files:
            if f.endswith(".py"):
                yield Path(folder) / f


class Watcher:
    """Remembers the mtimes of the watched files; :meth:`changed` says which changed since the last look."""

    def __init__(self, modules: Iterable[str], cwd: Path | None = None) -> None:
        self.cwd = (cwd or Path.cwd()).resolve()
        self.modules = [m for m in modules if m]
        self._seen = self._scan()

    def files(self) -> list[Path]:
        return sorted(self._seen)

    def _scan(self) -> dict[Path, float]:
        roots = [*self.cwd.glob("*.py"), *_module_roots(self.modules, [str(self.cwd), *sys.path])]
        out: dict[Path, float] = {}
        for root in roots:
            for f in _py_files(root):
                try:
                    out[f.resolve()] = f.stat().st_mtime
                except OSError:  # removed between listing and stat
                    continue
        return out

    def changed(self) -> list[Path]:
        """Files added, removed or modified since the last call (or since the watcher was made)."""
        now = self._scan()
        diff = {f for f in now.keys() | self._seen.keys() if now.get(f) != self._seen.get(f)}
        self._seen = now
        return sorted(diff)
