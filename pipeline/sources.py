"""Where a task's data come from: a built-in source (a module in pipeline/datasets/) or the user's files.

A task's `data.source` in params.yaml is either

- a built-in source's name: a module `pipeline/datasets/<name>.py` that declares itself with
      TOPOLOGY = "one_to_one"              # the topology its data feed
      class Data(SplitData): ...           # its `data` section (pipeline.config.DataSection subclass)
      def build(cfg: Data, seed: int) -> Prepared
      def example() -> object              # optional: the logged model's input example
  Adding one is that module and a params.yaml section: nothing else names it.
- a path to the user's file or folder, read by pipeline/datasets/files.py (`schema(topology)`,
  `build(cfg, seed, path)`, optional `example(cfg, path)`). Relative paths are under data/own/ (OWN_DATA),
  which the `sources` stage depends on: see `fingerprint`.

numpy only, like `prepare`: nothing here imports torch or Lightning.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import ModuleType

from pipeline.config import ConfigError, DataSection, PipelineError

DATASETS = "pipeline.datasets"
DATASETS_DIR = Path(__file__).resolve().parent / "datasets"
FILES_MODULE = f"{DATASETS}.files"
# modules of pipeline/datasets/ that are no source (datamodule imports Lightning: never import it here)
NOT_SOURCES = frozenset({"__init__", "common", "prepared", "datamodule", "files"})
OWN_DATA = Path("data/own")  # users' files: relative `source` paths are under it (the `sources` stage's dep)
SOURCES_ROOT = Path("data/sources")  # <task>.json: what each task's data come from (prepare@<task>'s dep)


@cache
def _builtin_module(name: str) -> ModuleType | None:
    if not name.isidentifier() or name in NOT_SOURCES or not (DATASETS_DIR / f"{name}.py").is_file():
        return None
    module = importlib.import_module(f"{DATASETS}.{name}")
    return module if isinstance(getattr(module, "TOPOLOGY", None), str) and hasattr(module, "build") else None


def is_builtin(name: str) -> bool:
    return isinstance(name, str) and _builtin_module(name) is not None


def builtin_names() -> list[str]:
    """Every built-in source, sorted: the modules of pipeline/datasets/ that declare a TOPOLOGY and build()."""
    return sorted(p.stem for p in DATASETS_DIR.glob("*.py") if is_builtin(p.stem))


def _files_module() -> ModuleType:
    try:
        return importlib.import_module(FILES_MODULE)
    except ModuleNotFoundError as err:
        if err.name != FILES_MODULE:
            raise
        raise ConfigError(f"file sources need {FILES_MODULE}, which this install lacks") from None


@dataclass(frozen=True)
class Source:
    """One `data.source`: `name` as params.yaml writes it; `module` the built-in module or the files reader."""

    name: str
    module: ModuleType
    builtin: bool

    @property
    def topology(self) -> str | None:
        """The topology a built-in source feeds; None for files (the task section names it)."""
        return self.module.TOPOLOGY if self.builtin else None

    @property
    def variant(self) -> str | None:
        """"module:object" of a topology object the built-in source declares (VARIANT) in place of its
        topology's own: a subclass instance with its own evaluation, key metric or predict; None: the topology's."""
        return getattr(self.module, "VARIANT", None) if self.builtin else None

    def schema(self, topology: str, data: dict | None = None) -> type[DataSection]:
        """The pydantic model of the `data` section (`data`: the raw section, which a file source reads to tell
        its formats apart) for `topology`; ConfigError if the source cannot feed it."""
        if not self.builtin:
            return self.module.schema(topology, data)
        if topology != self.module.TOPOLOGY:
            raise ConfigError(f"the built-in source {self.name!r} feeds {self.module.TOPOLOGY}, not {topology}")
        return self.module.Data

    def path(self) -> Path | None:
        """The user's file or folder (relative paths under OWN_DATA, from the working directory); None: built-in."""
        if self.builtin:
            return None
        path = Path(self.name).expanduser()
        return path if path.is_absolute() else OWN_DATA / path

    def build(self, cfg: DataSection, seed: int):
        """The task's Prepared data."""
        if self.builtin:
            return self.module.build(cfg, seed)
        path = self.path()
        if not path.exists():
            raise PipelineError(f"{path}: no such file or folder (data.source {self.name!r}; relative paths are "
                                f"under {OWN_DATA}/)")
        return self.module.build(cfg, seed, path.resolve())

    def example(self, cfg: DataSection):
        """An input example for the logged model, as its pyfunc predict takes it; None where the source has none."""
        if self.builtin:
            return self.module.example() if hasattr(self.module, "example") else None
        if hasattr(self.module, "example"):
            return self.module.example(cfg, self.path().resolve())
        return None

    def describe(self) -> str:
        """What reads the data: "pipeline.datasets.digits", or "pipeline.datasets.files: data/own/my.txt"."""
        return self.module.__name__ if self.builtin else f"{self.module.__name__}: {self.path().as_posix()}"

    def code_files(self) -> list[Path]:
        """The reader's code: its module (a package: every module in it) and the modules of pipeline/datasets/ it
        imports, transitively, anywhere in their code; common.py and prepared.py are prepare's own deps."""
        import ast

        def files_of(name: str) -> list[Path]:
            target = DATASETS_DIR / name
            if target.is_dir():
                return sorted(target.rglob("*.py"))
            return [target.with_suffix(".py")] if target.with_suffix(".py").is_file() else []

        todo, seen = files_of(self.module.__name__.split(".")[2]), []
        while todo:
            path = todo.pop()
            if path in seen:
                continue
            seen.append(path)
            for node in ast.walk(ast.parse(path.read_text())):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                         [node.module] + [f"{node.module}.{a.name}" for a in node.names]
                         if isinstance(node, ast.ImportFrom) and node.module and not node.level else [])
                for name in names:
                    if name.startswith(f"{DATASETS}.") and name.split(".")[2] not in ("common", "prepared"):
                        todo.extend(files_of(name.split(".")[2]))
        return sorted(set(seen))

    def fingerprint(self) -> dict:
        """What the task's data depend on beyond params: the sha256 of the reader's code and of every user file
        (a folder: each file under it, by relative path). The `sources` stage writes it to
        data/sources/<task>.json, prepare@<task>'s dependency: so a changed file reruns only its task."""
        root = DATASETS_DIR.parent.parent
        code = {p.relative_to(root).as_posix(): _sha256(p) for p in self.code_files()}
        out = {"source": self.name, "builtin": self.builtin, "code": code}
        path = self.path()
        if path is not None:
            if path.is_dir():
                files = {p.relative_to(path).as_posix(): _sha256(p) for p in sorted(path.rglob("*")) if p.is_file()}
            elif path.is_file():
                files = {path.name: _sha256(path)}
            else:
                files = None  # prepare says what is missing
            out |= {"path": path.as_posix(), "files": files}
        return out


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def resolve(name: str) -> Source:
    """The Source a `data.source` value names: a built-in one, else a file source (ConfigError if none reads files)."""
    module = _builtin_module(name)
    if module is not None:
        return Source(name, module, True)
    return Source(name, _files_module(), False)


def write_fingerprint(task: str, params, root: Path = SOURCES_ROOT) -> str:
    """Stage `sources@<task>`: data/sources/<task>.json, the task's topology and its source's fingerprint (the
    hashes of its reader's code and of its files). Same inputs, same bytes: DVC then sees the same hash, and
    prepare@<task> does not rerun."""
    from pipeline.atomic import write_file_atomic

    section = params.task(task)
    fingerprint = {"task": task, "topology": section.topology, **resolve(section.data.source).fingerprint()}
    path = root / f"{task}.json"
    write_file_atomic(path, json.dumps(fingerprint, indent=1, sort_keys=True) + "\n")
    files = fingerprint.get("files")
    what = (f"{len(files)} file(s) under {fingerprint['path']}" if files else
            f"missing: {fingerprint['path']}" if "path" in fingerprint else f"built-in source {section.data.source}")
    return f"{task}: {what}; wrote {path}"
