"""``contourcl benchmark paired`` as a user runs it, on two evaluations' JSON files. The statistics
in-process: ``tests/unit/test_paired.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from contourcl.training.experiments.paired import compare_evaluations


def test_two_evaluations_are_paired_by_patient_per_structure_and_on_the_mean(tmp_path):
    # evaluate --json of two model files on the same five patients; p4's reference has no B
    a = {"model": "a.pt", "cases": {f"p{i}": {"A": {"dice": 0.5 + 0.1 * i}, "B": {"dice": 0.4}} for i in range(5)}}
    b = {"model": "b.pt", "cases": {f"p{i}": {"A": {"dice": 0.5}, "B": {"dice": 0.3}} for i in range(5)}}
    a["cases"]["p4"]["B"]["dice"] = b["cases"]["p4"]["B"]["dice"] = float("nan")
    rows = {r["scope"]: r for r in compare_evaluations(a, b)}
    assert list(rows) == ["mean", "A", "B"]
    # A: differences 0, .1, .2, .3, .4 over 5 patients; B: +0.1 on the 4 patients that have it
    assert rows["A"]["difference"] == pytest.approx(0.2) and rows["A"]["patients"] == 5
    assert rows["B"]["difference"] == pytest.approx(0.1) and rows["B"]["patients"] == 4
    # mean over structures per patient: p0..p3 (A diff + 0.1) / 2, p4 the A diff alone
    assert rows["mean"]["difference"] == pytest.approx((0.05 + 0.1 + 0.15 + 0.2 + 0.4) / 5)
    assert rows["B"]["ci_low"] == pytest.approx(0.1) and rows["B"]["ci_high"] == pytest.approx(0.1)
    assert rows["A"]["ci_low"] < 0.2 < rows["A"]["ci_high"]
    # the command reads the two files and prints the table
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "b.json").write_text(json.dumps(b))
    out = subprocess.run([str(Path(sys.executable).parent / "contourcl"), "benchmark", "paired", str(tmp_path / "a.json"), str(tmp_path / "b.json")],
                         capture_output=True, text=True, check=True).stdout
    assert "| A | +0.200 |" in out and "| B | +0.100 | [+0.100, +0.100] |" in out
    (tmp_path / "bad.json").write_text("[1, 2]")
    bad = subprocess.run([str(Path(sys.executable).parent / "contourcl"), "benchmark", "paired", str(tmp_path / "bad.json"), str(tmp_path / "b.json")],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "not `contourcl evaluate --json` output" in bad.stderr
