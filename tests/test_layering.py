"""The architecture's rules, read from the source with `ast` (every import, lazy ones included):

- the math (distopt/soap.py, fop.py, fold.py, plan.py) never imports torch.distributed, the
  communication modules or the launcher;
- distopt never imports model_zoo, launcher or benchmarks; model_zoo never imports launcher or distopt;
- no import circles inside distopt;
- every name imported from the project exists (benchmarks and scripts run outside the tests, and a
  lazy import of a name that moved fails only when its line runs);
- interfaces are declared, not guessed: no hasattr() and no getattr(<optimizer-ish>, name, default) in
  distopt/ or launcher/ outside distopt/protocols.py;
- the optimizer never looks behind the distributor interface: outside distopt/distributors/, no module
  imports a concrete distributor (only the package: its factory and its base type);
- SOAP's math (distopt/soap.py) imports nothing of the project; the rest of the pure math only the math;
- no class in distopt is longer than 250 lines (a class that does everything is a room to split).
A violation fails with the file, the line and the import.
"""

import ast
import importlib
import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PURE_MATH = ("soap", "fop", "fold", "plan")
COMMUNICATION = ("torch.distributed", "distopt.comm", "distopt.distributor", "distopt.deepspeed_glue",
                 "distopt.checkpoint", "launcher")


def imports(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """(line, module) of every import statement in the file, relative ones resolved."""
    package = ".".join(path.relative_to(root).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return found


def violations(files, forbidden, root: Path = ROOT):
    out = []
    for path in files:
        for line, module in imports(path, root):
            if any(module == f or module.startswith(f + ".") for f in forbidden):
                out.append(f"{path.relative_to(root)}:{line} imports {module}")
    return out


def test_the_math_never_communicates():
    files = [ROOT / "distopt" / f"{name}.py" for name in PURE_MATH]
    assert not violations(files, COMMUNICATION), violations(files, COMMUNICATION)


@pytest.mark.parametrize("package,forbidden", [
    ("distopt", ("model_zoo", "launcher", "benchmarks")),
    ("model_zoo", ("launcher", "distopt", "benchmarks")),
])
def test_packages_stay_on_their_floor(package, forbidden):
    found = violations(sorted((ROOT / package).rglob("*.py")), forbidden)
    assert not found, found


def test_no_import_circles_inside_distopt():
    modules = {p.stem: p for p in (ROOT / "distopt").glob("*.py") if p.stem != "__init__"}
    edges = {name: {m.split(".")[1] for _, m in imports(path)
                    if m.startswith("distopt.") and m.split(".")[1] in modules}
             for name, path in modules.items()}

    def cycle_from(start, node, seen):
        for nxt in edges[node]:
            if nxt == start:
                return seen + [nxt]
            if nxt not in seen:
                found = cycle_from(start, nxt, seen + [nxt])
                if found:
                    return found
        return None

    for name in modules:
        found = cycle_from(name, name, [name])
        assert found is None, "import circle: " + " -> ".join(found)


def test_the_checker_sees_a_violation(tmp_path):
    """A lazy import inside a function breaks the rule too (the checker is not vacuous)."""
    text = (ROOT / "distopt" / "fold.py").read_text()
    fake = tmp_path / "distopt" / "fold.py"
    fake.parent.mkdir()
    fake.write_text(text + "\n\ndef _late():\n    import torch.distributed as dist\n")
    line = text.count("\n") + 4
    assert violations([fake], COMMUNICATION, tmp_path) == [f"distopt/fold.py:{line} imports torch.distributed"]


PROJECT = ("distopt", "launcher", "model_zoo", "repro")


def missing_names(path: Path) -> list[str]:
    """`from <project module> import name` statements (lazy ones included) whose name does not exist."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and not node.level and node.module and node.module.split(".")[0] in PROJECT:
            module = importlib.import_module(node.module)
            for alias in node.names:
                if not hasattr(module, alias.name) and importlib.util.find_spec(f"{node.module}.{alias.name}") is None:
                    out.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {alias.name} from {node.module}")
    return out


def test_every_imported_project_name_exists(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # the benchmarks import their `repro` helper
    folders = ("distopt", "launcher", "model_zoo", "benchmarks", "scripts")
    files = [p for d in folders for p in sorted((ROOT / d).rglob("*.py"))]
    found = [m for path in files for m in missing_names(path)]
    assert not found, found


PROBED = re.compile(r"(opt|optimizer|base|distributor)$")


def probes(path: Path, root: Path = ROOT) -> list[str]:
    """hasattr(...) calls, and getattr(x, name, default) on an optimizer-ish x, with their lines."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("hasattr", "getattr"):
            target = ast.unparse(node.args[0]) if node.args else ""
            if node.func.id == "hasattr" or (len(node.args) == 3 and PROBED.search(target)):
                out.append(f"{path.relative_to(root)}:{node.lineno} {ast.unparse(node)}")
    return out


def test_interfaces_are_declared_not_probed():
    files = [p for d in ("distopt", "launcher") for p in sorted((ROOT / d).rglob("*.py"))
             if p != ROOT / "distopt" / "protocols.py"]
    found = [x for path in files for x in probes(path)]
    assert not found, found


def test_the_probe_checker_sees_a_probe(tmp_path):
    fake = tmp_path / "launcher" / "loop.py"
    fake.parent.mkdir()
    fake.write_text("def f(opt, module):\n    a = hasattr(opt, 'stats')\n    b = getattr(module, 'x', None)\n"
                    "    return getattr(opt.base, 'counters', {})\n")
    assert probes(fake, tmp_path) == ["launcher/loop.py:2 hasattr(opt, 'stats')",
                                      "launcher/loop.py:4 getattr(opt.base, 'counters', {})"]


CONCRETE_DISTRIBUTORS = ("distopt.distributors.local", "distopt.distributors.owner", "distopt.distributors.fsdp2")


def test_the_optimizer_imports_no_concrete_distributor():
    files = [p for p in sorted((ROOT / "distopt").rglob("*.py")) if "distributors" not in p.parts]
    found = violations(files, CONCRETE_DISTRIBUTORS)
    assert not found, found


def test_soap_math_imports_nothing_of_the_project():
    math_modules = tuple(f"distopt.{name}" for name in PURE_MATH)
    found = [f"distopt/soap.py:{line} imports {m}" for line, m in imports(ROOT / "distopt" / "soap.py")
             if m.split(".")[0] in PROJECT]
    found += [f"distopt/{name}.py:{line} imports {m}" for name in PURE_MATH for line, m in
              imports(ROOT / "distopt" / f"{name}.py")
              if m.split(".")[0] in PROJECT and not any(m == x or m.startswith(x + ".") for x in math_modules)]
    assert not found, found


def test_no_class_in_distopt_is_longer_than_250_lines():
    long = []
    for path in sorted((ROOT / "distopt").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.ClassDef):
                continue
            assert node.end_lineno is not None  # ast.parse sets it
            if node.end_lineno - node.lineno + 1 > 250:
                long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {node.end_lineno - node.lineno + 1}")
    assert not long, long
