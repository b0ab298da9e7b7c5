"""The prompt bank: many prompt files on one loaded backbone, addressable by task name.

Entries are immutable and the table of them is copy-on-write: add/replace/remove build a new table under a lock and
swap it in, so readers (any thread, no lock) always see a whole table, and a request in flight keeps the entry it
started with. Each prompt is checked against the backbone's fingerprint when added. The prompt key/value cache
(the backbone runtime's prompt cache) is keyed by content hash, so a replaced prompt can never be served stale key/values; the
old prompt's key/values are dropped from the cache when nothing else uses them.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import SoftPromptError
from ..files import PromptFile, check_prompt, read_prompt
from ..methods import from_file
from ..prompts import Prompt, content_hash
from ..runtime import runtime

TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class UnknownTask(SoftPromptError):
    """No task of that name in the bank (HTTP 404)."""


@dataclass(frozen=True)
class TaskEntry:
    name: str
    prompt: Prompt  # typed (embeddings or per-layer key/values), float32 on the backbone's device
    digest: str  # content hash: the key of its cached key/values
    metadata: dict = field(default_factory=dict)
    source: str = ""

    @property
    def task(self) -> dict | None:
        return self.metadata.get("task")

    @property
    def num_virtual_tokens(self) -> int:
        return self.prompt.num_virtual_tokens


def _no_link(path: Path) -> None:
    """A served folder holds files, not links: a link could point anywhere on the machine (and a reload would
    follow it)."""
    if path.is_symlink():
        raise SoftPromptError(f"{path.name} is a symbolic link; copy the prompt file into the folder instead")


def check_task_name(name: str) -> str:
    if not isinstance(name, str) or not TASK_NAME.match(name) or ".." in name:
        raise SoftPromptError(f"invalid task name {name!r}: use letters, digits, '.', '_' or '-' (no path "
                              "characters), at most 64")
    return name


class PromptBank:
    def __init__(self, backbone: Any, folder: str | Path | None = None):
        self.backbone = backbone
        self._entries: dict[str, TaskEntry] = {}
        self._lock = threading.Lock()
        self.folder: Path | None = None  # the folder last loaded or synced (what /admin/reload rescans)
        self.refused: dict[str, str] = {}  # file -> why, from the last load_folder
        self._stamps: dict[str, tuple[int, int]] = {}  # task -> (mtime_ns, size) of the file it came from
        if folder is not None:
            self.load_folder(folder)

    def load_folder(self, folder: str | Path) -> list[str]:
        """Add every *.safetensors file (task name = file stem); a bad file is refused and the others load."""
        folder = Path(folder)
        if not folder.is_dir():
            raise SoftPromptError(f"prompt folder {folder} does not exist")
        loaded, self.refused, self.folder = [], {}, folder
        for path in sorted(folder.glob("*.safetensors")):
            try:
                _no_link(path)
                loaded.append(self.add(path.stem, path, replace=True).name)
            except SoftPromptError as e:
                self.refused[path.name] = str(e)
        return loaded

    def sync_folder(self, folder: str | Path) -> dict:
        """Bring the bank in line with the folder at run time: new files added, changed files replaced, tasks
        whose file is gone removed; a bad file is refused (and a task it would replace keeps its old prompt)."""
        folder = Path(folder)
        if not folder.is_dir():
            raise SoftPromptError(f"prompt folder {folder} does not exist")
        report: dict = {"added": [], "replaced": [], "removed": [], "refused": {}}
        present = set()
        for path in sorted(folder.glob("*.safetensors")):
            name = path.stem
            present.add(name)
            try:
                _no_link(path)
                st = path.stat()
            except (SoftPromptError, OSError) as e:
                report["refused"][path.name] = str(e) if isinstance(e, SoftPromptError) else f"unreadable: {e}"
                continue
            stamp = (st.st_mtime_ns, st.st_size)
            if self._stamps.get(name) == stamp and name in self._entries:
                continue
            try:
                existed = name in self._entries
                self.add(name, path, replace=True)
                report["replaced" if existed else "added"].append(name)
            except SoftPromptError as e:
                report["refused"][path.name] = str(e)
        for name, entry in list(self._entries.items()):
            if name not in present and entry.source and Path(entry.source).resolve().parent == folder.resolve():
                self.remove(name)
                report["removed"].append(name)
        self.refused, self.folder = report["refused"], folder
        return report

    def add(self, name: str, source: str | Path | PromptFile, replace: bool = False) -> TaskEntry:
        check_task_name(name)
        pf = source if isinstance(source, PromptFile) else read_prompt(source)
        check_prompt(pf, self.backbone)  # NaN/Inf, width, backbone fingerprint
        method = from_file(pf, self.backbone.device)
        method.check_backbone(self.backbone)
        with torch.no_grad():
            prompt = method()
        entry = TaskEntry(name=name, prompt=prompt, digest=content_hash(prompt), metadata=pf.metadata,
                          source=str(getattr(pf, "path", "") or ""))
        with self._lock:
            old = self._entries.get(name)
            if old is not None and not replace:
                raise SoftPromptError(f"task {name!r} already exists; replace it explicitly")
            self._entries = {**self._entries, name: entry}
            if isinstance(source, (str, Path)):
                st = Path(source).stat()
                self._stamps[name] = (st.st_mtime_ns, st.st_size)
        if old is not None:
            self._forget(old)
        return entry

    def remove(self, name: str) -> None:
        with self._lock:
            old = self._entries.get(name)
            self._entries = {k: v for k, v in self._entries.items() if k != name}
            self._stamps.pop(name, None)
        if old is None:
            raise UnknownTask(f"unknown task {name!r}")
        self._forget(old)

    def get(self, name: str) -> TaskEntry:
        entries = self._entries  # one snapshot: the table is replaced, never changed in place
        entry = entries.get(name)
        if entry is None:
            raise UnknownTask(f"unknown task {name!r}; known tasks: {', '.join(sorted(entries)) or 'none'}")
        return entry

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def _forget(self, old: TaskEntry) -> None:
        in_use = any(e.digest == old.digest for e in self._entries.values())
        if not in_use:
            runtime(self.backbone).cache.forget(old.digest)
