"""The dependencies are declared once (pyproject.toml); the lists that must repeat them stay equal."""
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _requirements(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines()
            if line.strip() and not line.lstrip().startswith(("#", "-"))]


def test_the_space_installs_what_pyproject_declares():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    space = _requirements(ROOT / "spaces" / "requirements.txt")
    assert sorted(space) == sorted(declared), set(space) ^ set(declared)


def _lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]


def test_requirement_files_install_the_package_and_nothing_else():
    assert _lines(ROOT / "requirements.txt") == ["-e ."]
    assert _lines(ROOT / "requirements-dev.txt") == ["-e .[dev]"]
    dev = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["dev"]
    assert any(d.startswith("pytest") for d in dev)
