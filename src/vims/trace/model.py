"""Behaviour models: what an application's system calls looked like in a clean run.

A model holds, per application, the n-grams (a sliding window over each
thread's own call sequence, so interleaving threads do not matter) and
assertions on arguments learned from the training trace: the programs it
executed, the files it opened (exactly, or a directory once it opened several
different files in it), and the addresses it connected or bound to. Enforcing
flags any window, call or argument the model never saw — a reverse shell in a
web server reads as ``socket, connect, dup2, execve`` from a server that never
connected out or executed a shell.

Models are JSON files (``vims-behaviour-model/1``) an analyst can read and
edit; the REM-S policy names one by the SHA-256 of its canonical form, so the
A-VM enforces exactly the model the verifier expects.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import posixpath
from collections import defaultdict, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from vims.errors import VimsError
from vims.trace.tracer import SyscallEvent

MODEL_FORMAT = "vims-behaviour-model/1"
MAX_MODEL_BYTES = 16 << 20
MAX_NGRAMS = 200_000
MAX_ITEMS = 20_000
MAX_VIOLATIONS = 1000
MAX_WINDOWS = 8192  # threads with a live window


class ModelError(VimsError):
    """A model file is missing, malformed or not the one the policy names."""


Name = Annotated[str, Field(min_length=1, max_length=256)]


class AppModel(BaseModel):
    model_config = ConfigDict(extra="forbid")

    comm: Annotated[list[Name], Field(min_length=1, max_length=32)]
    syscalls: Annotated[list[Name], Field(max_length=1024)] = []
    ngrams: Annotated[list[list[Name]], Field(max_length=MAX_NGRAMS)] = []
    exec: Annotated[list[Name], Field(max_length=MAX_ITEMS)] = []
    open: Annotated[list[Name], Field(max_length=MAX_ITEMS)] = []  # paths, or dir/* globs
    connect: Annotated[list[Name], Field(max_length=MAX_ITEMS)] = []
    bind: Annotated[list[Name], Field(max_length=MAX_ITEMS)] = []


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: str = MODEL_FORMAT
    n: Annotated[int, Field(ge=1, le=16)] = 3
    kernel: str = ""
    training: dict[str, Any] = {}
    apps: Annotated[dict[Name, AppModel], Field(min_length=1, max_length=64)]

    def canonical(self) -> bytes:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True,
                          separators=(",", ":")).encode()

    @property
    def digest(self) -> str:
        """``sha256:<hex>`` of the canonical encoding: how a policy names the model."""
        return "sha256:" + hashlib.sha256(self.canonical()).hexdigest()

    def save(self, path: Path) -> None:
        tmp = path.with_name(path.name + ".partial")
        tmp.write_text(json.dumps(self.model_dump(mode="json"), indent=1, sort_keys=True) + "\n")
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> Model:
        try:
            if path.stat().st_size > MAX_MODEL_BYTES:
                raise ModelError(f"model {path} is larger than {MAX_MODEL_BYTES >> 20} MiB")
            model = cls.model_validate_json(path.read_bytes())
        except FileNotFoundError as exc:
            raise ModelError(f"model {path} does not exist") from exc
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise ModelError(f"model {path} is not a behaviour model: {where}: "
                             f"{first['msg']}") from exc
        if model.format != MODEL_FORMAT:
            raise ModelError(f"model {path} has format {model.format!r}, not {MODEL_FORMAT}")
        return model


def normalise_digest(digest: str) -> str:
    digest = digest.strip().lower()
    if not digest.startswith("sha256:"):
        digest = "sha256:" + digest
    hexpart = digest[len("sha256:"):]
    if len(hexpart) != 64 or any(c not in "0123456789abcdef" for c in hexpart):
        raise ModelError(f"{digest!r} is not a sha256 digest")
    return digest


def find_model(models_dir: Path, digest: str) -> Model:
    """The model in ``models_dir`` whose digest is ``digest`` (its content is verified)."""
    want = normalise_digest(digest)
    if not models_dir.is_dir():
        raise ModelError(f"models directory {models_dir} does not exist")
    for path in sorted(models_dir.glob("*.json"))[:1024]:
        try:
            model = Model.load(path)
        except ModelError:
            continue
        if model.digest == want:
            return model
    raise ModelError(f"no model with digest {want} in {models_dir}")


class _Windows:
    """The last n calls of each thread, bounded in threads."""

    def __init__(self, n: int) -> None:
        self.n = n
        self._by_tid: dict[int, deque[str]] = {}

    def push(self, event: SyscallEvent) -> tuple[str, ...] | None:
        win = self._by_tid.get(event.pid)
        if win is None:
            if len(self._by_tid) >= MAX_WINDOWS:
                self._by_tid.pop(next(iter(self._by_tid)))
            win = self._by_tid[event.pid] = deque(maxlen=self.n)
        win.append(event.name)
        done = event.name in ("exit", "exit_group")
        gram = tuple(win) if len(win) == self.n else None
        if done:
            del self._by_tid[event.pid]
        return gram


def _arg_kind(name: str) -> str | None:
    if name in ("execve", "execveat"):
        return "exec"
    if name in ("open", "openat", "openat2", "creat"):
        return "open"
    if name in ("connect", "sendto"):
        return "connect"
    if name == "bind":
        return "bind"
    return None


class Learner:
    """Builds a model from the events of a clean training run."""

    def __init__(self, apps: dict[str, list[str]], n: int = 3, generalise: int = 3) -> None:
        self.apps = apps
        self.n = n
        self.generalise = generalise
        self._windows = _Windows(n)
        self._calls: dict[str, set[str]] = defaultdict(set)
        self._grams: dict[str, set[tuple[str, ...]]] = defaultdict(set)
        self._args: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
        self.events = 0

    def feed(self, event: SyscallEvent) -> None:
        self.events += 1
        self._calls[event.app].add(event.name)
        gram = self._windows.push(event)
        if gram is not None and len(self._grams[event.app]) < MAX_NGRAMS:
            self._grams[event.app].add(gram)
        kind = _arg_kind(event.name)
        if kind and event.arg and event.arg != "?":
            items = self._args[event.app][kind]
            if len(items) < MAX_ITEMS:
                items.add(event.arg)

    def _opens(self, paths: set[str]) -> list[str]:
        """Exact paths, with a directory's files folded into ``dir/*`` once it had several."""
        if self.generalise <= 0:
            return sorted(paths)
        by_dir: dict[str, set[str]] = defaultdict(set)
        for p in paths:
            by_dir[posixpath.dirname(p)].add(p)
        out: set[str] = set()
        for d, files in by_dir.items():
            if len(files) >= self.generalise and d not in ("", "/"):
                out.add(posixpath.join(d, "*"))
            else:
                out |= files
        return sorted(out)

    def model(self, kernel: str = "", training: dict[str, Any] | None = None) -> Model:
        if not self.events:
            raise ModelError("the training run saw no system call of the selected "
                             "applications: nothing to learn")
        apps = {}
        for app, globs in self.apps.items():
            args = self._args.get(app, {})
            apps[app] = AppModel(
                comm=globs, syscalls=sorted(self._calls.get(app, ())),
                ngrams=[list(g) for g in sorted(self._grams.get(app, ()))],
                exec=sorted(args.get("exec", ())), open=self._opens(args.get("open", set())),
                connect=sorted(args.get("connect", ())), bind=sorted(args.get("bind", ())))
        return Model(n=self.n, kernel=kernel, training=training or {}, apps=apps)


@dataclass(frozen=True)
class Violation:
    """Behaviour the model never saw, with the event that showed it."""

    app: str
    kind: str  # sequence | syscall | exec | open | connect | bind
    detail: str
    event: SyscallEvent
    window: tuple[str, ...] = ()

    def summary(self) -> str:
        who = f"{self.event.comm} ({self.event.pid})"
        if self.kind == "sequence":
            return f"{who} of {self.app}: call sequence {' > '.join(self.window)} not in the model"
        if self.kind == "syscall":
            return f"{who} of {self.app}: system call {self.detail} not in the model"
        return f"{who} of {self.app}: {self.kind} {self.detail} not in the model"

    def public(self) -> dict[str, Any]:
        out = {"app": self.app, "kind": self.kind, "detail": self.detail,
               "event": self.event.public()}
        if self.window:
            out["window"] = list(self.window)
        return out


class Enforcer:
    """Checks events against a model; a process's distinct violations are reported once."""

    def __init__(self, model: Model) -> None:
        self.model = model
        self._windows = _Windows(model.n)
        self._grams = {a: {tuple(g) for g in m.ngrams} for a, m in model.apps.items()}
        self._calls = {a: set(m.syscalls) for a, m in model.apps.items()}
        self._seen: dict[tuple[int, str, str], None] = {}  # per process, oldest first
        self.events = 0

    @property
    def apps(self) -> dict[str, list[str]]:
        return {a: list(m.comm) for a, m in self.model.apps.items()}

    def gap(self) -> None:
        """Calls were missed (tracing resumed after a pause in it): no window spans that."""
        self._windows = _Windows(self.model.n)

    def _allowed(self, app: AppModel, kind: str, value: str) -> bool:
        items: list[str] = getattr(app, kind)
        if kind == "open":
            return any(fnmatch.fnmatchcase(value, p) if p.endswith("/*") else value == p
                       for p in items)
        return value in items

    def feed(self, event: SyscallEvent) -> list[Violation]:
        self.events += 1
        app = self.model.apps.get(event.app)
        if app is None:
            return []
        out = []
        gram = self._windows.push(event)
        if event.name not in self._calls[event.app]:
            out.append(Violation(event.app, "syscall", event.name, event))
        elif gram is not None and gram not in self._grams[event.app]:
            out.append(Violation(event.app, "sequence", " ".join(gram), event, gram))
        kind = _arg_kind(event.name)
        if kind and event.arg and event.arg != "?" and not self._allowed(app, kind, event.arg):
            out.append(Violation(event.app, kind, event.arg, event))
        fresh = []
        for v in out:
            key = (event.tgid, v.kind, v.detail)
            if key not in self._seen:
                self._seen[key] = None
                if len(self._seen) > MAX_VIOLATIONS:
                    del self._seen[next(iter(self._seen))]
                fresh.append(v)
        return fresh
