"""The wheel holds every package and every bundled file: setup.cfg lists packages by hand
(setuptools cannot discover them across package_dir mappings), so the tree is the truth."""

from __future__ import annotations

import configparser
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA_FOLDERS = ("saisa_edge/assets", "saisa_edge/serve/static")
"""Bundled files (not modules) that setup.cfg's package_data must carry into the wheel."""


def _setup() -> configparser.ConfigParser:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    return cfg


def _mapping() -> dict[str, Path]:
    """Import name -> source folder, from setup.cfg's package_dir."""
    lines = [line.split("=") for line in _setup()["options"]["package_dir"].strip().splitlines()]
    return {name.strip(): ROOT / folder.strip() for name, folder in lines}


def _tree_packages() -> dict[str, Path]:
    """Every package folder (with __init__.py) under the mapped folders, by import name."""
    found = {}
    for name, folder in _mapping().items():
        for init in folder.rglob("__init__.py"):
            rel = init.parent.relative_to(folder).parts
            found[".".join((name, *rel))] = init.parent
    return found


def test_setup_cfg_lists_every_package_folder():
    listed = set(_setup()["options"]["packages"].split())
    assert listed == set(_tree_packages())


def test_package_data_covers_every_bundled_file():
    globs = {f"{pkg.replace('.', '/')}/{g.strip()}" for pkg, line in _setup()["options.package_data"].items()
             for g in line.split(",")}
    files = {f.relative_to(ROOT) for data in DATA_FOLDERS for f in (ROOT / data).rglob("*") if f.is_file()}
    assert files and {f for f in files if not any(f.match(g) for g in globs)} == set()


@pytest.mark.slow
def test_wheel_holds_every_module_and_asset(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(ROOT)], check=True)
    (wheel,) = tmp_path.glob("saisa_edge-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"{pkg.replace('.', '/')}/{f.name}" for pkg, folder in _tree_packages().items()
                for f in folder.glob("*.py")}
    for data in DATA_FOLDERS:
        expected |= {f.relative_to(ROOT).as_posix() for f in (ROOT / data).rglob("*") if f.is_file()}
    assert expected - names == set()
