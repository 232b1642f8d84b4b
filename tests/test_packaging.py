"""One import namespace (`fedrec`), and layers that only import downwards.

Layers, bottom to top: the core (the `fedrec/` folder: data model, model, federation, metrics,
privacy) < `fedrec.datasets` < `fedrec.serving` < `fedrec.training` (which holds the CLI).
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OLD_TOP_LEVEL = ("datasets", "serving", "training")
# folder -> the fedrec subpackages it must never import (anything above it)
FORBIDDEN = {
    "fedrec": ("fedrec.datasets", "fedrec.serving", "fedrec.training"),
    "datasets": ("fedrec.serving", "fedrec.training"),
    "serving": ("fedrec.datasets", "fedrec.training"),
    "training": (),
}


def imported_modules(path: Path) -> list[str]:
    """Every absolute module name a file imports, wherever the import statement is."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
            names += [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            raise AssertionError(f"{path}: relative import; use the absolute fedrec.* name")
    return names


def violations(folder: str) -> list[str]:
    found = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        for name in imported_modules(path):
            top = name.split(".")[0]
            if top in OLD_TOP_LEVEL:
                found.append(f"{path.relative_to(ROOT)} imports {name} (old top-level name)")
            for banned in FORBIDDEN[folder]:
                if name == banned or name.startswith(banned + "."):
                    found.append(f"{path.relative_to(ROOT)} imports {name} (a layer above {folder}/)")
    return found


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_layers_import_only_downwards(folder):
    assert violations(folder) == []


def test_layer_check_catches_an_upward_import(tmp_path, monkeypatch):
    """The check itself can fail: a core module importing the CLI is reported."""
    fake_root = tmp_path
    (fake_root / "fedrec").mkdir()
    (fake_root / "fedrec" / "model.py").write_text("def f():\n    from fedrec.training.cli import app\n")
    (fake_root / "fedrec" / "old.py").write_text("import serving.app\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", fake_root)
    found = violations("fedrec")
    assert any("model.py imports fedrec.training.cli" in v for v in found)
    assert any("old.py imports serving.app (old top-level name)" in v for v in found)


def test_tests_and_docs_use_the_new_names():
    assert violations_in_tests() == []
    stale = [
        f"{p.relative_to(ROOT)}: {line.strip()}"
        for p in [ROOT / "README.md", ROOT / "Makefile", *ROOT.glob("*/README.md")]
        for line in p.read_text(encoding="utf-8").splitlines()
        for old in OLD_TOP_LEVEL
        if f"-m {old}." in line or f"from {old} import" in line or f"import {old}." in line
    ]
    assert stale == []


def violations_in_tests() -> list[str]:
    return [
        f"{p.name} imports {name}"
        for p in sorted((ROOT / "tests").glob("*.py"))
        for name in imported_modules(p)
        if name.split(".")[0] in OLD_TOP_LEVEL
    ]


def test_wheel_holds_one_top_level_package(tmp_path):
    """Build the wheel as a user would (`pip wheel .`), read its file list, and run it installed."""
    # Built from a copy of the sources: setuptools leaves build/ behind in the tree it builds.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for folder in ("fedrec", "datasets", "serving", "training"):
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__", "generated"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), src],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("fedrec-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"fedrec"}
    for expected in (
        "fedrec/datasets/synthetic.py",
        "fedrec/serving/app.py",
        "fedrec/serving/static/index.html",
        "fedrec/training/cli.py",
        "fedrec/training/configs/synthetic.toml",
        "fedrec/training/configs/movielens-100k.toml",
        "fedrec/training/flower_app/pyproject.toml",  # the Flower App that `fedrec federation run` submits
        "fedrec/federated/local.py",
    ):
        assert expected in names
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "fedrec = fedrec.training.cli:app" in zipfile.ZipFile(wheel).read(entry).decode()

    # Installed (not editable), away from the source tree: package data resolve from the install.
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
        check=True,
        capture_output=True,
    )
    probe = (
        "import fedrec.training.cli as cli, fedrec.serving.app as app;"
        "from importlib import resources;"
        "assert cli.default_config_path('synthetic').is_file(), 'config';"
        "assert resources.files('fedrec.serving').joinpath('static/index.html').is_file(), 'static';"
        "print(cli.__file__)"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, env={"PYTHONPATH": str(site)}, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().startswith(str(site))


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation but '-' and '_' dropped, spaces to '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_link_within_the_readme_names_a_heading():
    """The contents line and any other '#...' link stay true when a heading is renamed."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)  # a '#' line in a code block is no heading
    anchors = {github_anchor(h) for h in re.findall(r"^#{1,6} (.+)$", prose, flags=re.M)}
    links = re.findall(r"\]\(#([^)]+)\)", text)
    assert len(links) >= 10  # the contents line
    assert [link for link in links if link not in anchors] == []
