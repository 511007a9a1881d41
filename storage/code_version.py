"""The code version of a stage: a hash of the source its result depends on, symbol by symbol.

A stage's version covers its function and the project code that function refers to, followed
name by name through the source (`ast`), not module by module:

1. Start from the stage function's definition, decorators included (so the record types named
   in `@stage(outputs=...)` and in its annotations count).
2. Every name it loads is resolved in its module: a top-level function or class (its whole
   source: body, methods, bases, decorators, field annotations), a module-level assignment
   (the statement), or an import (at module level or inside a function; `from x import y`,
   `import x as z`, relative imports). An imported name is followed to where it is defined,
   through any chain of re-exports in package `__init__.py` files, so `from infra.engines import
   EngineConfig` covers the class `EngineConfig` and what it refers to, not the engines package.
   A module used as `mod.attr` (`formats.alpaca_prompt`) covers `attr` only.
3. What every covered symbol refers to is covered in turn, transitively.
4. Resources: prompt templates (`tasks/prompts/*.txt`), SQL (`storage/sql/*.sql`) and data files
   (`tasks/data/*`) whose file name or stem equals a string constant in a covered symbol's
   source (`"cot_fewshot"`, `"dedup_near"`, `"stop_words.txt"`).

The version is the sha256 (first 12 hex digits) of, for every covered symbol in order, its
module, its name, its source text and the import statements its names were resolved through,
then every resource file's path (relative to the project) and bytes.

Where the source does not say precisely what is used, the whole module counts (its text, and
everything it refers to): a module used as a value other than `mod.attr` (passed to `getattr`,
assigned), a star import written in covered code, a name that resolves nowhere (not defined or
imported in its module, nor by the module's star imports, nor a local or a builtin; or a call of
`globals()`), a target that is not a top-level function. A module's top-level statements that
bind no name (a call run at import) count with any symbol of that module. So the version
over-includes at worst, never under-includes: a name that is also a local variable is still
resolved, and a string constant that happens to equal a prompt's name covers that prompt.

Not followed: packages outside the project (the standard library, polars, torch: their versions
are pinned by the environment), modules that only orchestrate (`EXCLUDED_MODULES`: the stage
machinery, the dataset store, the catalog; the flows and entry points): they decide where rows
are written, not what the rows are; and the functions that open an engine (`EXCLUDED_SYMBOLS`,
what `ctx.engine(config)` calls): which engine answers is the engine's identity (model, weights,
precision), part of every request's cache key and of the `EngineConfig` fingerprint in the
stage's parameters, not code of the stage. So editing `infra/engines/vllm_engine.py` re-versions
no stage, and editing `tasks/solutions/answers.py` re-versions the stages that extract answers.

`coverage(target)` lists what a version covers; `code_version(target)` is its hash. A target is
`"module:function"` (a stage's function), `"module"` (the whole module) or a function object.
"""

from __future__ import annotations

import ast
import builtins
import contextlib
import functools
import hashlib
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from storage.settings import PROJECT_ROOT

# Top-level packages of the project; imports of anything else (the standard library, polars,
# torch) are not followed: their versions are pinned by the environment, not by this hash.
PROJECT_PACKAGES = ("flows", "tasks", "storage", "infra")
# Modules that never change what a stage writes (orchestration, persistence, entry points).
EXCLUDED_MODULES = frozenset(
    {
        "tasks.stage",
        "tasks.contracts",
        "storage.code_version",
        "storage.datasets",
        "storage.catalog",
        "storage.settings",
        "storage.errors",
        "storage.faults",
        "storage.locks",
    }
)
# Packages whose every module only orchestrates: the flows, and the executors that run stages.
EXCLUDED_PACKAGES = ("flows", "tasks.executors")
# Functions (module, name) that open an engine, as `ctx.engine(config)` does for a stage (see
# the module docstring). Without this a stage that can open an engine itself (a reward that
# reopens its judge after being pickled) covers every engine implementation through the lazy
# imports of the engine builder.
EXCLUDED_SYMBOLS = frozenset({("infra.engines", "open_engine"), ("infra.engines", "build_engine")})
RESOURCE_DIRS = (
    ("tasks/prompts", ".txt"),
    ("storage/sql", ".sql"),
    ("tasks/data", ""),
)
# The name of the symbol that stands for a whole module, and of a module's unnamed statements.
WHOLE = "*"
LOOSE = "<module>"
_KNOWN = frozenset(dir(builtins)) | {
    "__name__",
    "__file__",
    "__doc__",
    "__spec__",
    "__package__",
    "__loader__",
    "__path__",
    "__builtins__",
    "__annotations__",
    "__class__",
}


def module_path(module: str, root: Path = PROJECT_ROOT) -> Path | None:
    """The source file of a project module (`tasks.seeds` → tasks/seeds.py), or None."""
    if module.split(".")[0] not in PROJECT_PACKAGES:
        return None
    base = root.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _excluded(module: str) -> bool:
    return module in EXCLUDED_MODULES or any(
        module == package or module.startswith(package + ".") for package in EXCLUDED_PACKAGES
    )


def _project(module: str) -> bool:
    return module.split(".")[0] in PROJECT_PACKAGES


def _absolute(module: str | None, level: int, package: str) -> str | None:
    if level == 0:
        return module
    parts = package.split(".") if package else []
    if level - 1 > len(parts):
        return None
    base = parts[: len(parts) - (level - 1)]
    return ".".join(base + ([module] if module else []))


# -- one module's index -------------------------------------------------------------------------


@dataclass(frozen=True)
class _Import:
    """What an import binds a name to: `module` itself (attr None) or `module.attr`."""

    module: str
    attr: str | None
    text: str


def _imports(node: ast.Import | ast.ImportFrom, package: str) -> Iterator[tuple[str, _Import]]:
    """(bound name, import) for each name an import statement binds; `*` for a star import."""
    text = ast.unparse(node)
    if isinstance(node, ast.Import):
        for alias in node.names:
            if alias.asname:
                yield alias.asname, _Import(alias.name, None, text)
            else:  # `import a.b.c` binds `a`; `a.b.c.f` is resolved attribute by attribute
                top = alias.name.split(".")[0]
                yield top, _Import(top, None, text)
        return
    base = _absolute(node.module, node.level, package)
    if base is None:
        return
    for alias in node.names:
        yield alias.asname or alias.name, _Import(base, alias.name, text)


_COMPREHENSIONS = (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)


def _bound_names(stmt: ast.stmt) -> set[str]:
    """Names a top-level statement binds in the module (not inside functions or classes)."""
    names: set[str] = set()

    def walk(node: ast.AST) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
            return
        if isinstance(node, (ast.Lambda, ast.Import, ast.ImportFrom, *_COMPREHENSIONS)):
            return  # a comprehension's variables are its own
        if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            names.add(node.id)
        elif isinstance(node, (ast.ExceptHandler, ast.MatchAs, ast.MatchStar)) and node.name:
            names.add(node.name)
        for child in ast.iter_child_nodes(node):
            walk(child)

    walk(stmt)
    return names


def _outside_definitions(node: ast.AST) -> Iterator[ast.AST]:
    """`node` and the nodes below it that are not inside a function, class or lambda: imports
    inside a definition belong to it, not to the module."""
    yield node
    for child in ast.iter_child_nodes(node):
        if not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            yield from _outside_definitions(child)


def _is_main_guard(stmt: ast.stmt) -> bool:
    """`if __name__ == "__main__":`: not run on import."""
    test = getattr(stmt, "test", None)
    return (
        isinstance(stmt, ast.If)
        and isinstance(test, ast.Compare)
        and isinstance(test.left, ast.Name)
        and test.left.id == "__name__"
        and any(isinstance(c, ast.Constant) and c.value == "__main__" for c in test.comparators)
    )


@dataclass
class _Module:
    name: str
    path: Path
    text: str
    tree: ast.Module
    package: str
    defs: dict[str, list[ast.stmt]] = field(default_factory=dict)
    imports: dict[str, list[_Import]] = field(default_factory=dict)
    stars: list[str] = field(default_factory=list)
    loose: list[ast.stmt] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)

    def source(self, nodes: Iterable[ast.stmt]) -> str:
        """The lines of `nodes`, each from its first decorator to its last line."""
        lines = self.lines
        parts = []
        for node in nodes:
            decorators = getattr(node, "decorator_list", [])
            start = min([node.lineno] + [d.lineno for d in decorators])
            parts.append("\n".join(lines[start - 1 : node.end_lineno]))
        return "\n".join(parts)


@functools.lru_cache(maxsize=4096)
def _parse(path: str, size: int, mtime_ns: int, module: str, package: str) -> _Module:
    text = Path(path).read_text(encoding="utf-8")
    tree = ast.parse(text, filename=path)
    index = _Module(module, Path(path), text, tree, package, lines=text.splitlines())
    for i, stmt in enumerate(tree.body):
        if i == 0 and isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant):
            continue  # the docstring
        if _is_main_guard(stmt):
            continue
        imported = False
        for node in _outside_definitions(stmt):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                imported = True
                for name, imp in _imports(node, package):
                    if name == "*":
                        index.stars.append(imp.module)
                    else:
                        index.imports.setdefault(name, []).append(imp)
        names = _bound_names(stmt)
        for name in names:
            index.defs.setdefault(name, []).append(stmt)
        if not names and not imported:
            index.loose.append(stmt)
    return index


# -- what a symbol refers to ------------------------------------------------------------------


def _annotation_strings(node: ast.expr) -> Iterator[str]:
    """The strings in an annotation that are forward references (not `Literal["a", "b"]`)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        yield node.value
    elif isinstance(node, ast.Subscript):
        base = node.value
        name = base.attr if isinstance(base, ast.Attribute) else getattr(base, "id", "")
        if name != "Literal":
            yield from _annotation_strings(node.slice)
    elif isinstance(node, (ast.Tuple, ast.List)):
        for element in node.elts:
            yield from _annotation_strings(element)
    elif isinstance(node, ast.BinOp):
        yield from _annotation_strings(node.left)
        yield from _annotation_strings(node.right)


class _References(ast.NodeVisitor):
    """The names and `name.attr...` chains a piece of source loads, the names it binds locally,
    its imports (inside functions), its short string constants, and whether it reads
    `globals()`."""

    def __init__(self, package: str):
        self.package = package
        self.loads: list[tuple[str, tuple[str, ...]]] = []
        self.stores: set[str] = set()
        self.imports: dict[str, list[_Import]] = {}
        self.stars: list[str] = []
        self.strings: set[str] = set()
        self.dynamic = False

    def visit_Attribute(self, node: ast.Attribute) -> None:
        chain: list[str] = []
        current: ast.expr = node
        while isinstance(current, ast.Attribute):
            chain.append(current.attr)
            current = current.value
        if isinstance(current, ast.Name):
            self.loads.append((current.id, tuple(reversed(chain))))
        else:
            self.visit(current)

    def visit_Name(self, node: ast.Name) -> None:
        if isinstance(node.ctx, ast.Load):
            self.loads.append((node.id, ()))
        else:
            self.stores.add(node.id)

    def visit_Constant(self, node: ast.Constant) -> None:
        if isinstance(node.value, str) and 0 < len(node.value) <= 80:
            self.strings.add(node.value)

    def visit_Call(self, node: ast.Call) -> None:
        if isinstance(node.func, ast.Name) and node.func.id == "globals":
            self.dynamic = True
        self.generic_visit(node)

    def _annotation(self, node: ast.expr | None) -> None:
        """Visit an annotation; one written as a string is parsed and visited as code."""
        if node is None:
            return
        self.visit(node)
        for text in _annotation_strings(node):
            with contextlib.suppress(SyntaxError):  # not code: a plain string
                self.visit(ast.parse(text, mode="eval"))

    def _function(self, node: ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) -> None:
        if not isinstance(node, ast.Lambda):
            self.stores.add(node.name)
            for decorator in node.decorator_list:
                self.visit(decorator)
            self._annotation(node.returns)
        args = node.args
        for arg in [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg]:
            if arg is not None:
                self.stores.add(arg.arg)
                self._annotation(arg.annotation)
        for default in [*args.defaults, *args.kw_defaults]:
            if default is not None:
                self.visit(default)
        body = [node.body] if isinstance(node, ast.Lambda) else node.body
        for stmt in body:
            self.visit(stmt)

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self.stores.add(node.name)
        self.generic_visit(node)

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        self.visit(node.target)
        self._annotation(node.annotation)
        if node.value is not None:
            self.visit(node.value)

    def visit_arg(self, node: ast.arg) -> None:
        self.stores.add(node.arg)
        self._annotation(node.annotation)

    def visit_Import(self, node: ast.Import | ast.ImportFrom) -> None:
        for name, imp in _imports(node, self.package):
            if name == "*":
                self.stars.append(imp.module)
            else:
                self.imports.setdefault(name, []).append(imp)
                self.stores.add(name)

    visit_ImportFrom = visit_Import

    def visit_ExceptHandler(self, node: ast.ExceptHandler) -> None:
        if node.name:
            self.stores.add(node.name)
        self.generic_visit(node)

    def visit_MatchAs(self, node: ast.MatchAs) -> None:
        if node.name:
            self.stores.add(node.name)
        self.generic_visit(node)

    def visit_MatchStar(self, node: ast.MatchStar) -> None:
        if node.name:
            self.stores.add(node.name)

    def visit_MatchMapping(self, node: ast.MatchMapping) -> None:
        if node.rest:
            self.stores.add(node.rest)
        self.generic_visit(node)


# -- resolution -------------------------------------------------------------------------------

# A resolved reference: ("sym", module, name) a top-level symbol; ("mod", module, "") a module
# object (narrowed by the attributes that follow it); ("whole", module, "") a whole module;
# ("ext", "", "") something not followed (outside the project, or orchestration).
_Target = tuple[str, str, str]
_EXTERNAL: _Target = ("ext", "", "")


class _Resolver:
    def __init__(self, root: Path):
        self.root = root

    def module(self, name: str) -> _Module | None:
        path = module_path(name, self.root)
        if path is None:
            return None
        stat = os.stat(path)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        return _parse(str(path), stat.st_size, stat.st_mtime_ns, name, package)

    def module_target(self, name: str) -> list[_Target]:
        if not _project(name) or _excluded(name) or module_path(name, self.root) is None:
            return [_EXTERNAL]
        return [("mod", name, "")]

    def attribute(self, module: str, attr: str, seen: frozenset[tuple[str, str]]) -> list[_Target]:
        """What `module.attr` is, following re-exports to the definition."""
        if not _project(module) or _excluded(module) or (module, attr) in seen:
            return [_EXTERNAL]
        seen = seen | {(module, attr)}
        index = self.module(module)
        if index is None:
            # a folder without __init__.py: a namespace package, only submodules
            submodule = f"{module}.{attr}"
            return self.module_target(submodule) if module_path(submodule, self.root) else []
        targets: list[_Target] = []
        if (module, attr) in EXCLUDED_SYMBOLS:
            return [_EXTERNAL]
        if attr in index.defs:
            targets.append(("sym", module, attr))
        for imp in index.imports.get(attr, ()):
            targets += self.imported(imp, seen)
        if targets:
            return targets
        submodule = f"{module}.{attr}"
        if module_path(submodule, self.root) is not None:
            return self.module_target(submodule)
        for star in index.stars:
            if not _project(star):
                targets.append(_EXTERNAL)  # could come from there: not followed
            else:
                targets += [t for t in self.attribute(star, attr, seen) if t[0] != "whole"]
        return targets or [("whole", module, "")]

    def imported(
        self, imp: _Import, seen: frozenset[tuple[str, str]] = frozenset()
    ) -> list[_Target]:
        if imp.attr is None:
            return self.module_target(imp.module)
        if not _project(imp.module):
            return [_EXTERNAL]
        return self.attribute(imp.module, imp.attr, seen)

    def chain(self, targets: list[_Target], attrs: tuple[str, ...]) -> list[_Target]:
        """Narrow module targets by the attribute chain after the name; a module left without
        an attribute is used as a value, and counts whole."""
        out: list[_Target] = []
        for target in targets:
            if target[0] != "mod":
                out.append(target)
            elif not attrs:
                out.append(("whole", target[1], ""))
            else:
                out += self.chain(self.attribute(target[1], attrs[0], frozenset()), attrs[1:])
        return out


@dataclass(frozen=True)
class Coverage:
    """What a code version covers: symbols as `module:name` (`module:*` for a whole module,
    `module:<module>` for a module's unnamed top-level statements), the .py files holding
    them, and the resource files they name."""

    target: str
    symbols: tuple[str, ...]
    files: tuple[Path, ...]
    resources: tuple[Path, ...]
    version: str
    referrers: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    def why(self, symbol: str) -> list[str]:
        """The chain of references from the target to `symbol` ("module:name"), target first."""
        chain = [symbol]
        while chain[-1] in self.referrers:
            chain.append(self.referrers[chain[-1]])
        return chain[::-1]


def _target_name(target: str | Callable[..., Any]) -> str:
    if isinstance(target, str):
        return target
    fn = getattr(target, "fn", target)  # a Stage holds its function
    return f"{fn.__module__}:{fn.__qualname__}"


def coverage(target: str | Callable[..., Any], root: Path = PROJECT_ROOT) -> Coverage:
    """The symbols, files and resources the code version of `target` covers, and the version
    (see the module docstring). `target`: "module:function", "module", or a function."""
    name = _target_name(target)
    module, _, qualname = name.partition(":")
    resolver = _Resolver(root)
    index = resolver.module(module)
    start: list[tuple[str, str]] = []
    if index is not None and not _excluded(module):
        symbol = qualname if qualname in index.defs else WHOLE
        start.append((module, symbol))
    sources: dict[tuple[str, str], str] = {}
    referrers: dict[tuple[str, str], tuple[str, str]] = {}
    strings: set[str] = set()
    todo = list(start)
    while todo:
        key = todo.pop()
        if key in sources:
            continue
        mod, symbol = key
        index = resolver.module(mod)
        if index is None:
            continue
        if symbol == WHOLE:
            nodes: list[ast.stmt] = list(index.tree.body)
            text = index.text
        else:
            nodes = index.loose if symbol == LOOSE else index.defs.get(symbol, [])
            text = index.source(nodes)
        refs = _References(index.package)
        for node in nodes:
            refs.visit(node)
        strings |= refs.strings
        used_imports: set[str] = set()
        found: list[_Target] = []
        if refs.dynamic:
            found.append(("whole", mod, ""))
        for star in refs.stars:
            if resolver.module_target(star) != [_EXTERNAL]:
                found.append(("whole", star, ""))
        for ref, attrs in refs.loads:
            targets: list[_Target] = []
            for imp in refs.imports.get(ref, ()):
                targets += resolver.imported(imp)
            if (mod, ref) in EXCLUDED_SYMBOLS:
                targets.append(_EXTERNAL)
            elif ref in index.defs:
                targets.append(("sym", mod, ref))
            for imp in index.imports.get(ref, ()):
                used_imports.add(imp.text)
                targets += resolver.imported(imp)
            if not targets and ref not in refs.stores and ref not in _KNOWN:
                for star in index.stars:  # from a star import, if one defines it
                    if not _project(star):
                        targets.append(_EXTERNAL)
                    else:
                        found_in = resolver.attribute(star, ref, frozenset())
                        targets += [t for t in found_in if t[0] != "whole"]
                targets = targets or [("whole", mod, "")]
            found += resolver.chain(targets, attrs)
        sources[key] = f"{text}\n\0{chr(10).join(sorted(used_imports))}"
        for kind, target_module, target_name in found:
            if kind == "ext":
                continue
            symbols = [(target_module, target_name if kind == "sym" else WHOLE)]
            if (loose := resolver.module(target_module)) is not None and loose.loose:
                symbols.append((target_module, LOOSE))
            for symbol in symbols:
                referrers.setdefault(symbol, key)
                todo.append(symbol)
    # a whole module covers its symbols: drop them, their text is in the module's
    wholes = {m for m, s in sources if s == WHOLE}
    covered = sorted(k for k in sources if k[1] == WHOLE or k[0] not in wholes)
    files = sorted({p for m, _ in covered if (p := module_path(m, root)) is not None})
    found_resources = _resources(strings, root)
    digest = hashlib.sha256()
    for mod, symbol in covered:
        digest.update(f"{mod}:{symbol}\0".encode())
        digest.update(sources[(mod, symbol)].encode() + b"\0")
    for path in found_resources:
        digest.update(_relative(path, root).encode() + b"\0")
        digest.update(_bytes_hash(*_file_key(path)).encode())
    return Coverage(
        target=name,
        symbols=tuple(f"{m}:{s}" for m, s in covered),
        files=tuple(files),
        resources=tuple(found_resources),
        version=digest.hexdigest()[:12],
        referrers={f"{m}:{s}": f"{r[0]}:{r[1]}" for (m, s), r in referrers.items() if (m, s) != r},
    )


def _resources(names: set[str], root: Path) -> list[Path]:
    """Prompt, SQL and data files whose name or stem is one of `names`."""
    found: set[Path] = set()
    for folder, suffix in RESOURCE_DIRS:
        directory = root / folder
        if not directory.is_dir():
            continue
        for file in directory.iterdir():
            named = file.name in names or (suffix and file.stem in names)
            if file.is_file() and named and (not suffix or file.suffix == suffix):
                found.add(file)
    return sorted(found)


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        return path.name


def _file_key(path: Path) -> tuple[str, int, int]:
    stat = os.stat(path)
    return str(path), stat.st_size, stat.st_mtime_ns


@functools.lru_cache(maxsize=4096)
def _bytes_hash(path: str, size: int, mtime_ns: int) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def code_version(target: str | Callable[..., Any], root: Path = PROJECT_ROOT) -> str:
    """The code version of `target` ("module:function", "module" or a function; see the module
    docstring)."""
    return coverage(target, root).version
