"""Our own packaging is clean: a fresh virtual environment's `pip install -e .` (what
scripts/serve and scripts/test do on first use) prints no warning from setuptools about this
project's metadata or layout, and the wheel carries the licence file."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.helpers import ROOT

#: What setuptools prints when it objects to a project (pip passes the build backend's output on).
PACKAGING_WARNINGS = ("BuildBackendWarning", "SetuptoolsDeprecationWarning", "SetuptoolsWarning")


def pip(*args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "pip", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    return output


@pytest.mark.timeout(600)
def test_editable_install_in_a_fresh_venv_prints_no_packaging_warning(tmp_path: Path) -> None:
    venv = tmp_path / "fresh"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    output = pip("--python", str(venv / "bin" / "python"), "install", "--no-deps", "-e", str(ROOT))
    complaints = [
        line for line in output.splitlines() if any(w in line for w in PACKAGING_WARNINGS)
    ]
    assert complaints == [], output
    assert "!!" not in output, output  # setuptools frames every warning with these
    installed = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import receiver, sys; print(receiver.__file__)"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=True,
    )
    assert Path(installed.stdout.strip()) == ROOT / "receiver" / "__init__.py"


@pytest.mark.timeout(600)
def test_wheel_has_the_licence_and_only_the_package(tmp_path: Path) -> None:
    output = pip("wheel", "--no-deps", "-w", str(tmp_path), str(ROOT))
    assert not any(w in output for w in PACKAGING_WARNINGS), output
    (wheel,) = tmp_path.glob("tap_receiver-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA")))
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), names
    assert b"License-Expression: MIT" in metadata
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"receiver"}, top
    assert "receiver/inspect/page/app.js" in names
