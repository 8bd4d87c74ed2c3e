"""The package's layering, as a user of ``vsmmu serve`` and a reader of the code meet it.

* ``vsmmu serve`` loads neither the harness nor the guest image builder
  (they provision and boot guests; the service needs neither);
* the import graph of ``vsmmu`` has no circle (DESIGN.md §2: imports only
  point down), counting every import statement, function-level ones too.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import vsmmu

PACKAGE = Path(vsmmu.__file__).parent


def test_serve_imports_neither_harness_nor_guest_images() -> None:
    probe = ("import sys, vsmmu.cli; "
             "print(sorted(m for m in sys.modules "
             "if m.split('.')[0] in ('qmp_harness', 'guest_images')))")
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True,
                         text=True).stdout
    assert out.strip() == "[]"


def _module_graph() -> dict[str, set[str]]:
    modules: dict[str, Path] = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    edges: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*parent, *([base] if base else [])])
                targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                # A module importing its own package (or the package its submodules) is
                # not a layering edge.
                if target and target != name and not name.startswith(target + "."):
                    edges[name].add(target)
    return edges


def test_vsmmu_import_graph_has_no_circle() -> None:
    edges = _module_graph()
    circles = []
    for start in edges:
        seen: set[str] = set()
        todo = list(edges[start])
        while todo:
            module = todo.pop()
            if module == start:
                circles.append(start)
                break
            if module not in seen:
                seen.add(module)
                todo.extend(edges[module])
    assert circles == []
