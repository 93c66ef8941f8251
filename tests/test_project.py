"""The packaging mirrors agree: nbdev 3 reads pyproject.toml, settings.ini must say the same."""
import configparser
import tomllib
from pathlib import Path

import tradelab

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
INI = configparser.ConfigParser()
INI.read(ROOT / "settings.ini")
CFG = INI["DEFAULT"]


def _reqs(key: str) -> set[str]:
    return set(CFG.get(key, "").split())


def test_names_paths_and_flags():
    nbdev = PYPROJECT["tool"]["nbdev"]
    assert PYPROJECT["project"]["name"] == CFG["lib_name"] == CFG["repo"]
    assert nbdev["lib_path"] == CFG["lib_path"] and nbdev["nbs_path"] == CFG["nbs_path"]
    assert nbdev["tst_flags"] == CFG["tst_flags"] and nbdev["readme_nb"] == CFG["readme_nb"]
    assert PYPROJECT["project"]["requires-python"] == ">=" + CFG["min_python"]


def test_version():
    assert tradelab.__version__ == CFG["version"]


def test_requirements():
    project = PYPROJECT["project"]
    extras = project["optional-dependencies"]
    assert set(project["dependencies"]) == _reqs("requirements")
    assert set(extras["train"]) == _reqs("train_requirements")
    assert set(extras["dev"]) - {"tradelab[train]"} == _reqs("dev_requirements")


def test_console_scripts():
    scripts = dict(s.split("=") for s in CFG["console_scripts"].split())
    assert PYPROJECT["project"]["scripts"] == scripts
