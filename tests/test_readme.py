"""The README's promise: its two commands are where .ci/run reads them, and its main job runs."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

from typer.testing import CliRunner

from dreamlm.cli import app

ROOT = Path(__file__).resolve().parents[1]


def readme_command(marker: str) -> str:
    lines = (ROOT / "README.md").read_text().splitlines()
    i = lines.index(f"<!-- ci:{marker} -->")
    assert lines[i + 1].startswith("```")
    return lines[i + 2]


def test_ci_reads_the_readme_commands():
    script = (ROOT / ".ci" / "run").read_text()
    assert "ci:install" in script and "ci:test" in script
    install, test = readme_command("install"), readme_command("test")
    assert "pip install torch==2.13.0 ." in install and "dreamlm " in install
    assert "pytest" in test and ".[test]" in test
    awk = subprocess.run(["awk", "/<!-- ci:install -->/{getline; getline; print; exit}", "README.md"], cwd=ROOT,
                         capture_output=True, text=True)
    assert awk.stdout.strip() == install


def test_readme_main_job_runs():
    install = readme_command("install")
    args = shlex.split(install.split("&& dreamlm ", 1)[1]) + ["--delay", "0", "--n", "20"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "masks left" in res.output and "valid solution" in res.output and "diffusion vs AR" in res.output
