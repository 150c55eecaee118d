"""Top-level names collide with PyPI packages (HF `kernels`, `profiler`, `estimator`, `conf`, `data`):
prove every import resolves to this repository, and that sim/estimator stay free of torch."""
import ast
import importlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["profiler", "kernels", "estimator", "sim", "conf"])
def test_package_resolves_to_this_repo(name):
    mod = importlib.import_module(name)
    assert Path(mod.__file__).resolve().is_relative_to(REPO), f"{name} imported from {mod.__file__}"


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("package", ["sim", "estimator", "conf"])
def test_no_torch_or_profiler_runtime_in_cpu_packages(package):
    forbidden = {"torch", "flash_attn", "vllm", "kernels"} | ({"profiler"} if package == "sim" else set())
    for path in (REPO / package).rglob("*.py"):
        bad = _imports(path) & forbidden
        assert not bad, f"{path.relative_to(REPO)} imports {sorted(bad)}"
