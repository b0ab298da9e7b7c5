"""The prompt bank: many prompt files on one loaded backbone, addressable by task name.

A served folder holds one file per task (task name = file stem), and a sub-folder per ensemble task (task name =
folder name): two or more prompt files trained for one task, served as one task whose answer combines theirs
(mean probability, or majority vote when the folder holds an ``ensemble.json`` saying ``{"combine": "vote"}``).

Entries are immutable and the table of them is copy-on-write: add/replace/remove build a new table under a lock and
swap it in, so readers (any thread, no lock) always see a whole table, and a request in flight keeps the entry it
started with. Each prompt is checked against the backbone's fingerprint when added. The prompt key/value cache
(the backbone runtime's prompt cache) is keyed by content hash, so a replaced prompt can never be served stale key/values; the
old prompt's key/values are dropped from the cache when nothing else uses them.
"""

from __future__ import annotations

import hashlib
import json
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
    members: tuple[TaskEntry, ...] = ()  # an ensemble task: its prompts (this entry's prompt is the first's)
    combine: str = "mean"

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
        """Add every *.safetensors file and every ensemble sub-folder; a bad one is refused and the others load."""
        folder = Path(folder)
        if not folder.is_dir():
            raise SoftPromptError(f"prompt folder {folder} does not exist")
        loaded, self.refused, self.folder = [], {}, folder
        for path in _sources(folder):
            try:
                _no_link(path)
                loaded.append(self._add_path(path.stem if path.is_file() else path.name, path).name)
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
        for path in _sources(folder):
            name = path.stem if path.is_file() else path.name
            present.add(name)
            try:
                _no_link(path)
                stamp = _stamp(path)
            except (SoftPromptError, OSError) as e:
                report["refused"][path.name] = str(e) if isinstance(e, SoftPromptError) else f"unreadable: {e}"
                continue
            if self._stamps.get(name) == stamp and name in self._entries:
                continue
            try:
                existed = name in self._entries
                self._add_path(name, path)
                report["replaced" if existed else "added"].append(name)
            except SoftPromptError as e:
                report["refused"][path.name] = str(e)
        for name, entry in list(self._entries.items()):
            if name not in present and entry.source and Path(entry.source).resolve().parent == folder.resolve():
                self.remove(name)
                report["removed"].append(name)
        self.refused, self.folder = report["refused"], folder
        return report

    def _add_path(self, name: str, path: Path) -> TaskEntry:
        if path.is_file():
            return self.add(name, path, replace=True)
        files = sorted(path.glob("*.safetensors"))
        for f in files:
            _no_link(f)
        how = path / "ensemble.json"
        combine = "mean"
        if how.exists():
            try:
                combine = json.loads(how.read_text()).get("combine", "mean")
            except (OSError, ValueError, AttributeError):
                raise SoftPromptError(f"{how} is not a JSON object like {{\"combine\": \"vote\"}}") from None
        return self.add_ensemble(name, files, combine, replace=True, stamp=_stamp(path))

    def _entry(self, name: str, source: str | Path | PromptFile) -> TaskEntry:
        pf = source if isinstance(source, PromptFile) else read_prompt(source)
        check_prompt(pf, self.backbone)  # NaN/Inf, width, backbone fingerprint
        method = from_file(pf, self.backbone.device)
        method.check_backbone(self.backbone)
        with torch.no_grad():
            prompt = method()
        return TaskEntry(name=name, prompt=prompt, digest=content_hash(prompt), metadata=pf.metadata,
                         source=str(getattr(pf, "path", "") or ""))

    def add(self, name: str, source: str | Path | PromptFile, replace: bool = False) -> TaskEntry:
        check_task_name(name)
        entry = self._entry(name, source)
        stamp = _stamp(Path(source)) if isinstance(source, (str, Path)) else None
        return self._put(entry, replace, stamp)

    def add_ensemble(self, name: str, sources: list, combine: str = "mean", replace: bool = False,
                     stamp: tuple | None = None) -> TaskEntry:
        """One task served as the ensemble of several prompts for it (paths or PromptFiles): every request is
        scored under each, in the same batch, and the members' label probabilities combined (``combine``: mean or
        vote, as ``softprompt eval --ensemble``)."""
        from ..ensemble import COMBINE

        check_task_name(name)
        if combine not in COMBINE:
            raise SoftPromptError(f"unknown ensemble combination {combine!r} for task {name!r}; use one of "
                                  f"{', '.join(COMBINE)}")
        if len(sources) < 2:
            raise SoftPromptError(f"ensemble task {name!r} needs at least two prompt files (found {len(sources)})")
        members = tuple(self._entry(name, s) for s in sources)
        first = members[0]
        spec = first.task or {}
        if not spec.get("verbalizer") and spec.get("modality") != "image":
            raise SoftPromptError(f"ensemble task {name!r}: its prompts are not for a classification task (an "
                                  "ensemble combines label scores)")
        for m in members[1:]:
            if (m.task or {}) != spec or m.num_virtual_tokens != first.num_virtual_tokens:
                raise SoftPromptError(f"ensemble task {name!r}: {Path(m.source).name} was trained for another task "
                                      f"or length than {Path(first.source).name}; put prompts of one task in it")
        digest = hashlib.sha256(f"ensemble:{combine}:{','.join(m.digest for m in members)}".encode()).hexdigest()
        entry = TaskEntry(name=name, prompt=first.prompt, digest=digest,
                          metadata={**first.metadata, "ensemble": {"members": len(members), "combine": combine}},
                          source=str(Path(first.source).parent) if first.source else "", members=members,
                          combine=combine)
        return self._put(entry, replace, stamp)

    def _put(self, entry: TaskEntry, replace: bool, stamp: tuple | None) -> TaskEntry:
        with self._lock:
            old = self._entries.get(entry.name)
            if old is not None and not replace:
                raise SoftPromptError(f"task {entry.name!r} already exists; replace it explicitly")
            self._entries = {**self._entries, entry.name: entry}
            if stamp is not None:
                self._stamps[entry.name] = stamp
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
        live = {d for e in self._entries.values() for d in (e.digest, *(m.digest for m in e.members))}
        for gone in (old, *old.members):
            if gone.digest not in live:
                runtime(self.backbone).cache.forget(gone.digest)


def _sources(folder: Path) -> list[Path]:
    """A served folder's tasks: its prompt files, and its sub-folders that hold prompt files (ensembles)."""
    return sorted([*folder.glob("*.safetensors"),
                   *(d for d in folder.iterdir() if d.is_dir() and any(d.glob("*.safetensors")))])


def _stamp(path: Path) -> tuple:
    """What tells a changed task from an unchanged one: a file's (mtime, size); a folder's, of each file in it."""
    if path.is_file():
        st = path.stat()
        return (st.st_mtime_ns, st.st_size)
    return tuple((p.name, *_stamp(p)) for p in sorted(path.iterdir()) if p.is_file())
