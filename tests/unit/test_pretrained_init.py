"""The parts of ``contourcl benchmark pretrained-init`` (issue 32, item 6) in-process: the stage-1
command built from the shipped recipe, and the pairs with their corrected intervals and verdicts.
End to end: ``tests/integration/test_pretrained_init_command.py``."""

from __future__ import annotations

from pathlib import Path

import pytest

from contourcl.training.experiments.pretrained_init import NOT_WORSE, compare, report, stage1_argv
from contourcl.training.recipes import load_recipe


def test_stage_one_is_the_shipped_recipe_without_its_refit():
    argv = stage1_argv("oar", Path("/d/train-pats"), Path("/o/models/oar-separeg.pt"), "/ckpt/separeg.pt")
    assert argv[0] == "finetune" and "--refit" not in argv
    recipe = load_recipe("oar")
    assert recipe["refit"] is True  # the shipped command refits; its first stage does not
    for key, value in recipe.items():
        flag = "--" + key.replace("_", "-")
        if key == "refit":
            continue
        assert flag in argv, flag
        if value is not True:
            assert argv[argv.index(flag) + 1] == str(value)
    assert argv[argv.index("--init") + 1] == "/ckpt/separeg.pt"
    assert argv[argv.index("--state") + 1] == "/o/models/oar-separeg.pt.state"
    plain = stage1_argv("gtv", Path("/d/train-pats"), Path("/o/g.pt"), overrides={"epochs": 1})
    assert "--init" not in plain and plain[plain.index("--epochs") + 1] == "1"


def _run(deltas: list[float], base: float = 0.5) -> tuple[dict, dict]:
    cases = {f"p{i}": {"A": {"dice": base + d}} for i, d in enumerate(deltas)}
    return {"cases": cases}, {"cases": {f"p{i}": {"A": {"dice": base}} for i in range(len(deltas))}}


@pytest.mark.parametrize("delta, verdict", [(NOT_WORSE + 0.001, True), (NOT_WORSE - 0.001, False), (0.02, True), (-0.03, False)])
def test_a_checkpoint_is_not_worse_only_when_the_lower_end_clears_the_margin(delta, verdict):
    arm, random = _run([delta] * 6)
    rows = compare({"oar": {"random": random, "separeg": arm}})
    mean = next(r for r in rows if r["scope"] == "mean")
    assert mean["difference"] == pytest.approx(delta) and mean["ci_low"] == pytest.approx(delta)
    assert mean["not_worse"] is verdict


def test_the_intervals_are_corrected_for_every_pair_made():
    spread = [0.04, -0.03, 0.02, -0.01, 0.05, -0.02, 0.03, 0.0, -0.04, 0.01]
    one = compare({"oar": dict(zip(("separeg", "random"), _run(spread), strict=True))})
    arm, random = _run(spread)
    four = compare({m: {"random": random, "separeg": arm, "simclr": arm} for m in ("oar", "gtv")})
    first = next(r for r in one if r["scope"] == "mean")
    same = next(r for r in four if r["scope"] == "mean" and r["model"] == "oar" and r["arm"] == "separeg")
    assert first["level"] == pytest.approx(0.95) and same["level"] == pytest.approx(1 - 0.05 / 4)
    assert same["ci_low"] < first["ci_low"] and same["ci_high"] > first["ci_high"]  # wider: corrected for 4 pairs
    assert {(r["model"], r["arm"]) for r in four} == {("oar", "separeg"), ("oar", "simclr"), ("gtv", "separeg"), ("gtv", "simclr")}


def test_a_checkpoint_pretrained_on_other_images_is_named():
    from contourcl.models.encoder_checkpoint import input_mismatch

    meta = {"spacing": [4.0, 4.0], "window": [-500.0, 800.0]}
    assert input_mismatch(meta, (4.0, 4.0), (-500, 800)) is None
    assert input_mismatch(meta, (3.0, 3.0), (-500, 800)) == "in-plane spacing [4.0, 4.0] mm (here [3.0, 3.0])"
    assert "window [-500.0, 800.0] HU (here [-1000.0, 1000.0])" in input_mismatch(meta, (4.0, 4.0), (-1000, 1000))
    assert input_mismatch({}, (3.0, 3.0), (-500, 800)) is None  # a checkpoint that does not say


def test_the_report_names_the_call_that_made_each_arm(tmp_path):
    arm, random = _run([0.01, -0.02, 0.03])
    for run in (arm, random):
        for case in run["cases"].values():
            case["A"].update(hd95=5.0, surface_dice=0.5)
    first = "contourcl benchmark pretrained-init --models oar --encoder separeg=a.pt"
    runs = {"oar": {"random": {**random, "command": first}, "separeg": {**arm, "command": first}},
            "gtv": {"random": random, "simclr": {**arm, "command": "contourcl benchmark pretrained-init --models gtv"}}}
    text = report(tmp_path, runs, "contourcl benchmark pretrained-init --report-only").read_text()
    assert f"- oar/random, oar/separeg: `{first}`" in text
    assert "- gtv/simclr: `contourcl benchmark pretrained-init --models gtv`" in text
    assert "- gtv/random: its record does not say" in text
    assert "--report-only" not in text  # this call made no arm
