"""Bundled models: each loads, records how it was trained, and the Sudoku solver solves the README's puzzle."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dreamlm.solver import Solver, bundled_model_dir
from dreamlm.tasks import get_task

ASSETS = Path(bundled_model_dir("x")).parent
PLANNING = sorted(p.name for p in ASSETS.iterdir() if (p / "dreamlm_task.json").is_file())


def test_there_is_a_bundled_solver():
    assert "sudoku4-diffusion" in PLANNING


@pytest.mark.parametrize("name", PLANNING)
def test_bundled_planning_model_loads_and_records_its_command(name):
    meta = json.loads((ASSETS / name / "dreamlm_task.json").read_text())
    assert meta["command"].startswith("dreamlm train recipes/planning/")
    solver = Solver(ASSETS / name)
    assert solver.model.config.causal == name.endswith("-ar")
    assert get_task(meta["task"]).name == meta["task"]
    assert (ASSETS / name / "model.safetensors").stat().st_size < 30 * 2**20


def test_sudoku_solver_solves_the_readme_puzzle():
    [sol] = Solver(ASSETS / "sudoku4-diffusion").solve(["0042\n2031\n4023\n3214"])
    assert sol.valid and sol.output == "1342\n2431\n4123\n3214"
