"""dvc.yaml's deps are the code each stage runs: every module of pipeline/ a stage imports (transitively,
at the top or inside functions) is a dependency of that stage, so editing it makes `dvc status` list
the stage. Stages are read through DVC's own parser (foreach resolved for every task); modules are
followed with `ast`, plus the imports made by name (a task's source module, its topology's module). A
source's own code (Source.code_files: its module and the data modules it imports) is the one exception: it
is hashed into data/sources/<task>.json by the `sources` stage, and prepare@<task> depends on that file.
`python -m pipeline`'s dispatch (__main__.py) is not counted: it only picks the stage's function. Package
__init__ files count unless they hold nothing but a docstring."""

from __future__ import annotations

import ast
import shlex
from pathlib import Path

import pytest

from pipeline.config import load_params
from pipeline.sources import DATASETS_DIR, builtin_names, resolve
from pipeline.tasks import get_task
from pipeline.topologies import TOPOLOGIES

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "pipeline"


def module_file(name: str) -> Path | None:
    """pipeline.a.b -> pipeline/a/b.py or pipeline/a/b/__init__.py; None outside the package."""
    if name != "pipeline" and not name.startswith("pipeline."):
        return None
    base = REPO.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


class Module:
    """One file of the package, cut into units: "" (its top-level statements) and each top-level def or class.
    For every unit: the package modules it imports and the (module, name) pairs it names."""

    def __init__(self, path: Path):
        self.path = path
        tree = ast.parse(path.read_text(), str(path))
        self.defs = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
        aliases = self._aliases(n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom)))
        self.units: dict[str, tuple[set[Path], set[tuple[Path, str]]]] = {}
        top = [n for n in tree.body if n.__class__.__name__ not in ("FunctionDef", "AsyncFunctionDef", "ClassDef")]
        self.units[""] = self._unit(top, aliases)
        for node in tree.body:
            if node.__class__.__name__ in ("FunctionDef", "AsyncFunctionDef", "ClassDef"):
                self.units[node.name] = self._unit([node], aliases)

    @staticmethod
    def _aliases(nodes) -> dict[str, tuple[Path, str | None]]:
        """local name -> (module file, attribute or None) for imports from the package."""
        found = {}
        for node in nodes:
            if isinstance(node, ast.Import):
                for a in node.names:
                    if (f := module_file(a.name)) is not None:
                        found[a.asname or a.name.split(".")[0]] = (f, None)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                base = module_file(node.module)
                for a in node.names:
                    sub = module_file(f"{node.module}.{a.name}")
                    if sub is not None:  # from pipeline import tracking: a module
                        found[a.asname or a.name] = (sub, None)
                    elif base is not None:
                        found[a.asname or a.name] = (base, a.name)
        return found

    def _unit(self, nodes, aliases) -> tuple[set[Path], set[tuple[Path, str]]]:
        inner = [n for top in nodes for n in ast.walk(top) if isinstance(n, (ast.Import, ast.ImportFrom))]
        names = {**aliases, **self._aliases(inner)}
        modules: set[Path] = set()
        for node in inner:  # every package on the way runs its __init__
            for name in ([a.name for a in node.names] if isinstance(node, ast.Import) else
                         [node.module] if node.level == 0 and node.module else []):
                parts = name.split(".")
                modules |= {f for i in range(1, len(parts) + 1) if (f := module_file(".".join(parts[:i]))) is not None}
        modules |= {f for f, _ in names.values()}
        refs: set[tuple[Path, str]] = set()
        for top in nodes:
            for n in ast.walk(top):
                if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id in names:
                    f, attr = names[n.value.id]
                    if attr is None:
                        refs.add((f, n.attr))
                elif isinstance(n, ast.Name):
                    if n.id in names and names[n.id][1] is not None:
                        refs.add(names[n.id])
                    elif n.id in self.defs:
                        refs.add((self.path, n.id))
        for f, attr in names.values():  # `from m import f` imports f for use
            if attr is not None:
                refs.add((f, attr))
        return {m for m in modules if m in MODULE_FILES}, refs


MODULE_FILES = set(PACKAGE.rglob("*.py"))
_PARSED: dict[Path, Module] = {}


def parsed(path: Path) -> Module:
    if path not in _PARSED:
        _PARSED[path] = Module(path)
    return _PARSED[path]


def closure(entries: set[Path]) -> set[Path]:
    """The files whose code runs when the `entries` run as a whole: a module's top-level statements run when it
    is imported; a function or class of it only when some code that runs names it (imports inside functions
    that never run, e.g. tracking's model logging during training, do not count)."""
    todo = [(f, unit) for f in entries for unit in parsed(f).units]
    seen: set[tuple[Path, str]] = set()
    while todo:
        f, unit = todo.pop()
        if (f, unit) in seen or unit not in parsed(f).units:
            continue
        seen.add((f, unit))
        modules, refs = parsed(f).units[unit]
        todo.extend((m, "") for m in modules)
        todo.extend(refs)
    return {f for f, _ in seen}


def runs_nothing(path: Path) -> bool:
    body = ast.parse(path.read_text()).body
    return len(body) <= 1 and all(isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant) for s in body)


def stages(root: Path = REPO) -> list:
    """(address, cmd, dep paths relative to the repo) for every stage of root's dvc.yaml, foreach resolved."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return [(s.name, s.cmd, [Path(d.fs_path).relative_to(root) for d in s.deps]) for s in repo.index.stages]


PARAMS = load_params(REPO / "params.yaml")


def topology_file(name: str) -> Path:
    return REPO.joinpath(*TOPOLOGIES[name].split(".")).with_suffix(".py")


def source_files() -> set[Path]:
    """Every source module: the built-in ones and the files reader (where it exists)."""
    files = {DATASETS_DIR / f"{name}.py" for name in builtin_names()}
    return files | {p for p in (DATASETS_DIR / "files.py", DATASETS_DIR / "files" / "__init__.py") if p.is_file()}


def entry_files(cmd: str) -> set[Path]:
    """What `python -m pipeline <stage> [task]` runs: pipeline/<stage>.py and the modules imported by name for
    that stage (prepare: the task's source module; train/evaluate: its topology's module; register: every
    topology's and every source's, as it reloads each model and logs its input example; sources: the task's
    source, whose code it hashes)."""
    args = shlex.split(cmd)
    assert args[:3] == ["python", "-m", "pipeline"], cmd
    stage, task = args[3], (args[4] if len(args) > 4 else None)
    files = {PACKAGE / f"{stage}.py"}
    if stage == "prepare":
        files.add(Path(get_task(task, PARAMS).source.module.__file__))
    elif stage in ("train", "evaluate"):
        files.add(topology_file(PARAMS.task(task).topology))
    elif stage == "register":
        files |= {topology_file(t) for t in TOPOLOGIES} | source_files()
    elif stage == "sources":
        files.add(Path(get_task(task, PARAMS).source.module.__file__))
    return files


def hashed_by_sources(cmd: str) -> set[Path]:
    """prepare@<task>'s source code, which data/sources/<task>.json hashes instead of a direct dependency."""
    args = shlex.split(cmd)
    if args[3] != "prepare":
        return set()
    return set(resolve(PARAMS.task(args[4]).data.source).code_files())


def covered(path: Path, deps: list[Path]) -> bool:
    rel = path.relative_to(REPO)
    return any(rel == d or d in rel.parents for d in deps)


STAGES = stages()


def test_every_stage_is_checked():
    names = {address.split("@")[0] for address, _, _ in STAGES}
    assert names == {"sources", "prepare", "train", "evaluate", "register", "longrange"}
    assert len(STAGES) == 4 * len(PARAMS.tasks) + 2


@pytest.mark.parametrize("address, cmd, deps", STAGES, ids=[s[0] for s in STAGES])
def test_deps_hold_every_module_the_stage_imports(address, cmd, deps):
    needed = {f for f in closure(entry_files(cmd)) if not (f.name == "__init__.py" and runs_nothing(f))}
    needed -= hashed_by_sources(cmd)
    missing = sorted(str(f.relative_to(REPO)) for f in needed if not covered(f, deps))
    assert not missing, f"dvc.yaml stage {address} runs these modules but does not depend on them: {missing}"


@pytest.mark.parametrize("task", PARAMS.tasks)
def test_prepare_depends_on_its_source_through_the_sources_stage(task):
    """prepare@<task> depends on data/sources/<task>.json, whose hashes cover its source's code (and files);
    the `sources` stage that writes it depends on every module it hashes."""
    deps = {address: d for address, _, d in STAGES}
    assert Path(f"data/sources/{task}.json") in deps[f"prepare@{task}"]
    source = resolve(PARAMS.task(task).data.source)
    code = source.code_files()
    assert Path(source.module.__file__) in code
    assert set(source.fingerprint()["code"]) == {p.relative_to(REPO).as_posix() for p in code}
    assert all(covered(f, deps[f"sources@{task}"]) for f in code)


def test_the_walk_follows_imports_inside_functions():
    # evaluate imports gates and the data module inside evaluate(); register reaches pyfunc_model via tracking
    assert PACKAGE / "gates.py" in closure({PACKAGE / "evaluate.py"})
    assert PACKAGE / "datasets" / "datamodule.py" in closure({PACKAGE / "evaluate.py"})
    assert PACKAGE / "pyfunc_model.py" in closure({PACKAGE / "register.py"})
    assert PACKAGE / "lstm.py" in closure({PACKAGE / "longrange.py"})
    assert PACKAGE / "__main__.py" not in closure({PACKAGE / f"{s}.py" for s in ("prepare", "train", "evaluate")})
