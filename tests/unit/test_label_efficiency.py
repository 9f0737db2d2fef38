"""The label-efficiency benchmark: metrics, draws, aggregation, the task runner, and a tiny
end-to-end run of ``contourcl benchmark label-efficiency`` on an OpenKBP-like folder."""

from __future__ import annotations

import math

import numpy as np
import pytest

from contourcl.evaluation import contour_metrics, mean_se
from contourcl.testing import write_openkbp_like
from contourcl.training.experiments import label_efficiency as le
from contourcl.training.experiments.report import aggregate


# ------------------------------------------------------------------------------ metrics
def test_contour_metrics_against_hand_computed_values():
    ref = np.zeros((30, 30, 12), np.uint8)
    ref[5:15, 5:15, 2:10] = 1  # a 10 x 10 x 8 box
    ref[20:25, 20:25, 2:6] = 2
    pred = np.zeros_like(ref)
    pred[6:16, 5:15, 2:10] = 1  # shifted by one voxel along x (2.5 mm)
    m = contour_metrics(pred, ref, {"A": 1, "B": 2, "C": 3}, spacing=(2.5, 1.0, 3.0), tolerance_mm=3.0)
    assert m["A"]["dice"] == pytest.approx(0.9)  # overlap 9 x 10 x 8 of 800 + 800
    assert m["A"]["hd95"] == pytest.approx(2.5)  # x is the 2.5 mm axis
    assert m["A"]["surface_dice"] == pytest.approx(1.0)  # every boundary point within 3 mm
    strict = contour_metrics(pred, ref, {"A": 1}, spacing=(2.5, 1.0, 3.0), tolerance_mm=2.0)
    assert strict["A"]["surface_dice"] < 1.0
    # B is contoured but missed: Dice and surface Dice 0, HD95 undefined
    assert m["B"]["dice"] == 0.0 and m["B"]["surface_dice"] == 0.0 and math.isnan(m["B"]["hd95"])
    # C is not contoured in the reference: skipped
    assert all(math.isnan(v) for v in m["C"].values())


def test_contour_metrics_rejects_mismatched_grids():
    with pytest.raises(ValueError, match="shape"):
        contour_metrics(np.zeros((4, 4, 4)), np.zeros((4, 4, 5)), {"A": 1}, (1, 1, 1))
    with pytest.raises(ValueError, match="spacing"):
        contour_metrics(np.zeros((4, 4, 4)), np.zeros((4, 4, 4)), {"A": 1}, (1, 1))


def test_mean_se():
    mean, se, n = mean_se([1.0, 2.0, 3.0, float("nan")])
    assert (mean, n) == (2.0, 3)
    assert se == pytest.approx(1.0 / math.sqrt(3))


# ------------------------------------------------------------------------------ protocol
def test_draws_are_reproducible_subsets():
    cases = [{"id": f"pt_{i}"} for i in range(30)]
    a = le.draw_cases(cases, 5, 0)
    assert a == le.draw_cases(cases, 5, 0)
    assert a != le.draw_cases(cases, 5, 1)
    assert len({c["id"] for c in a}) == 5
    with pytest.raises(ValueError, match="cannot draw 31"):
        le.draw_cases(cases, 31, 0)


def _run(model, method, n, draw, cases):
    return {"model": model, "method": method, "n_labeled": n, "draw": draw, "tolerance_mm": 4.0, "cases": cases}


def _s(dice, hd=1.0, nsd=0.5):
    return {"dice": dice, "hd95": hd, "surface_dice": nsd}


NAN = {"dice": math.nan, "hd95": math.nan, "surface_dice": math.nan}


def test_aggregate_patient_wise_over_draws_and_structures():
    gtv = lambda d: {"GTV": _s(d)}  # noqa: E731
    runs = [
        _run("gtv", "random", 1, 0, {"p1": gtv(0.2), "p2": gtv(0.4)}),
        _run("gtv", "random", 1, 1, {"p1": gtv(0.4), "p2": gtv(0.8)}),
    ]
    rows = aggregate(runs)
    mean = next(r for r in rows if r["structure"] == "mean" and r["metric"] == "dice")
    # patients: p1 = 0.3, p2 = 0.6 (averaged over draws); mean 0.45, SE = sd/sqrt(2)
    assert mean["mean"] == pytest.approx(0.45)
    assert mean["se"] == pytest.approx(np.std([0.3, 0.6], ddof=1) / math.sqrt(2))
    assert mean["patients"] == 2 and mean["draws"] == 2
    assert mean["draw_means"] == "0.3000;0.6000"


def test_aggregate_skips_structures_a_case_lacks_and_counts_hd95_misses():
    oar = {name: dict(NAN) for name in ("Brainstem", "SpinalCord", "Parotid_R", "Parotid_L", "Mandible", "Larynx", "Esophagus")}
    p1 = {**oar, "Mandible": _s(0.9, 2.0), "Larynx": _s(0.0, math.nan, 0.0)}  # larynx missed
    p2 = {**oar, "Mandible": _s(0.7, 4.0)}  # larynx not contoured
    rows = aggregate([_run("oar", "random", 5, 0, {"p1": p1, "p2": p2})])
    get = lambda s, m: next(r for r in rows if r["structure"] == s and r["metric"] == m)  # noqa: E731
    assert get("mean", "dice")["mean"] == pytest.approx(((0.9 + 0.0) / 2 + 0.7) / 2)
    assert get("Larynx", "dice")["patients"] == 1
    assert get("Brainstem", "dice")["patients"] == 0
    assert get("Larynx", "hd95")["hd95_missed"] == 1
    assert get("mean", "hd95")["mean"] == pytest.approx(3.0)  # p1: 2 (larynx missed, left out), p2: 4


# ------------------------------------------------------------------------------ runner
def _write(spec):
    from pathlib import Path

    Path(spec["out"]).write_text("ok")
    return {}


def _fail(spec):
    raise RuntimeError("boom")


def test_run_tasks_order_failures_and_resume(tmp_path):
    a, b, c, d = (tmp_path / x for x in "abcd")
    tasks = [
        le.Task("b", _write, {"out": str(b)}, b, deps=("a",)),
        le.Task("a", _write, {"out": str(a)}, a),
        le.Task("c", _fail, {}, c),
        le.Task("d", _write, {"out": str(d)}, d, deps=("c",)),
    ]
    failed = le.run_tasks(tasks, jobs=1, progress=False)
    assert a.exists() and b.exists() and not d.exists()
    assert sorted(failed) == ["c", "d"]
    a.write_text("kept")
    le.run_tasks(tasks[:2], jobs=1, progress=False)  # finished runs are not redone
    assert a.read_text() == "kept"


def test_run_tasks_makes_only_what_a_missing_result_needs(tmp_path):
    """A checkpoint whose fine-tuning is recorded is not pretrained again; a coarse model whose
    weights are gone is remade only for a pretraining a missing result needs."""
    f = {x: tmp_path / x for x in ("coarse_a.json", "coarse_a.pt", "coarse_b.json", "coarse_b.pt",
                                   "ckpt_a", "ckpt_b", "result_a", "result_b", "result_c")}
    for x in ("coarse_a.json", "coarse_b.json", "result_a"):
        f[x].write_text("kept")
    tasks = [
        le.Task("random/a", _write, {"out": str(f["coarse_a.pt"])}, f["coarse_a.json"], also=(f["coarse_a.pt"],)),
        le.Task("random/b", _write, {"out": str(f["coarse_b.pt"])}, f["coarse_b.json"], also=(f["coarse_b.pt"],)),
        le.Task("pretrain/a", _write, {"out": str(f["ckpt_a"])}, f["ckpt_a"], deps=("random/a",), intermediate=True),
        le.Task("pretrain/b", _write, {"out": str(f["ckpt_b"])}, f["ckpt_b"], deps=("random/b",), intermediate=True),
        le.Task("finetune/a", _write, {"out": str(f["result_a"])}, f["result_a"], deps=("pretrain/a",)),
        le.Task("finetune/b", _write, {"out": str(f["result_b"])}, f["result_b"], deps=("pretrain/b",)),
        le.Task("finetune/c", _write, {"out": str(f["result_c"])}, f["result_c"]),
    ]
    assert le.needed(tasks) == {"random/b", "pretrain/b", "finetune/b", "finetune/c"}
    assert le.run_tasks(tasks, jobs=1, progress=False) == []
    assert not f["ckpt_a"].exists() and not f["coarse_a.pt"].exists()  # nothing missing needs them
    assert f["result_a"].read_text() == "kept"
    assert all(f[x].exists() for x in ("coarse_b.pt", "ckpt_b", "result_b", "result_c"))
    assert f["coarse_b.json"].read_text() == "kept"  # remade weights, the record kept


# ------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def openkbp_like(tmp_path_factory):
    return write_openkbp_like(tmp_path_factory.mktemp("openkbp"))


def test_plan_masks_come_from_the_same_draw(openkbp_like, tmp_path):
    scale = le.Scale("tiny", "resnet10", 8, 64, 2, 4, finetune_steps=4, finetune_epochs=2, finetune_batch=4,
                     samples_per_volume=2, pool=None, sizes=(1, 2), draws=2)
    p = le.plan(openkbp_like, tmp_path, scale, models=["oar"], methods=["random", "simclr", "agcl-unet"])
    keys = {t.key: t for t in p.tasks}
    assert "pretrain/simclr" in keys  # label-free: once for every draw
    agcl = keys["pretrain/agcl-unet/oar/n02-d1"]
    assert agcl.deps == ("finetune/random/oar/n02-d1",)
    assert agcl.spec["config"]["options"]["coarse_model"] == keys["finetune/random/oar/n02-d1"].spec["model_path"]
    assert keys["finetune/agcl-unet/oar/n02-d1"].deps == ("pretrain/agcl-unet/oar/n02-d1",)
    # the draw's labeled cases are the same for every method
    assert keys["finetune/simclr/oar/n02-d1"].spec["train"] == keys["finetune/random/oar/n02-d1"].spec["train"]
    # validation cases are never among the training cases
    val = {c["id"] for c in p.validation["oar"]}
    assert not val & {c["id"] for t in p.tasks if t.key.startswith("finetune/") for c in t.spec["train"]}
    with pytest.raises(ValueError, match="keep 'random'"):
        le.plan(openkbp_like, tmp_path, scale, models=["oar"], methods=["agcl-unet"])
    # AGCL on the single-structure gtv model: the GTV is contrasted against the OARs of the
    # oar model of the same draw (one class alone has no negative, issue 9)
    both = le.plan(openkbp_like, tmp_path, scale, models=["oar", "gtv"], methods=["random", "agcl-unet"])
    bk = {t.key: t for t in both.tasks}
    g = bk["pretrain/agcl-unet/gtv/n02-d1"]
    assert g.deps == ("finetune/random/oar/n02-d1", "finetune/random/gtv/n02-d1")
    opts = g.spec["config"]["options"]
    assert opts["coarse_model"] == [bk["finetune/random/oar/n02-d1"].spec["model_path"],
                                    bk["finetune/random/gtv/n02-d1"].spec["model_path"]]
    assert opts["targets"] == ["GTV"] and len(opts["negatives"]) == 7 and "GTV" not in opts["negatives"]
    with pytest.raises(ValueError, match="keep 'oar'"):
        le.plan(openkbp_like, tmp_path, scale, models=["gtv"], methods=["random", "agcl-unet"])
    with pytest.raises(ValueError, match="unknown method"):
        le.plan(openkbp_like, tmp_path, scale, methods=["nope"])


def test_the_agcl_row_is_the_papers_stage_3_on_the_shared_pretraining(openkbp_like, tmp_path):
    from contourcl.training.pretrain.agcl import two_channel_path

    scale = le.Scale("tiny", "resnet10", 8, 64, 2, 4, finetune_steps=4, finetune_epochs=2, finetune_batch=8,
                     samples_per_volume=2, pool=None, sizes=(1,), draws=2)
    for methods in (["random", "agcl", "agcl-unet"], ["random", "agcl"]):
        p = le.plan(openkbp_like, tmp_path, scale, models=["oar"], methods=methods)
        keys = {t.key: t for t in p.tasks}
        assert [t.key for t in p.tasks].count("pretrain/agcl-unet/oar/n01-d1") == 1, "one pretraining for both rows"
        pretraining = keys["pretrain/agcl-unet/oar/n01-d1"]
        stage3 = keys["finetune/agcl/oar/n01-d1"]
        assert stage3.fn is le.agcl_task
        assert set(stage3.deps) == {"pretrain/agcl-unet/oar/n01-d1", "finetune/random/oar/n01-d1"}
        assert stage3.spec["encoder_2ch"] == str(two_channel_path(pretraining.output))
        assert stage3.spec["coarse_model"] == keys["finetune/random/oar/n01-d1"].spec["model_path"]
        assert stage3.spec["train"] == keys["finetune/random/oar/n01-d1"].spec["train"]
        heads = stage3.spec["finetune"]
        assert (heads["lr"], heads["batch_size"], heads["weight_decay"]) == (1e-4, 4, 0.0), "the paper's Adam, 1e-4, batch 4"
        assert heads["steps_per_epoch"] * heads["max_epochs"] == 4, "the table's steps"
    assert keys["pretrain/agcl-unet/oar/n01-d1"].spec["config"]["method"] == "agcl"


def test_rescore_marks_set_aside_references_not_contoured():
    """A stored run's figures under the reference check: the set-aside structures become not
    contoured (NaN), every other figure stays (its contour and reference did not change)."""
    nan = float("nan")
    cases = {"pt_1": {"SpinalCord": {"dice": 0.07, "hd95": 30.0, "surface_dice": 0.1}, "Mandible": {"dice": 0.8, "hd95": 5.0, "surface_dice": 0.9}},
             "pt_2": {"SpinalCord": {"dice": 0.7, "hd95": 4.0, "surface_dice": 0.8}, "Mandible": {"dice": nan, "hd95": nan, "surface_dice": nan}}}
    out = le.without_set_aside(cases, {"pt_1": {"SpinalCord": "median cross-section 18.0 cm²"}})
    assert all(np.isnan(v) for v in out["pt_1"]["SpinalCord"].values())
    assert out["pt_1"]["Mandible"] == cases["pt_1"]["Mandible"] and out["pt_2"]["SpinalCord"] == cases["pt_2"]["SpinalCord"]
    assert cases["pt_1"]["SpinalCord"]["dice"] == 0.07  # the stored figures are not changed in place


def test_paper_scale_is_the_seeds_configuration(openkbp_like, tmp_path):
    from dataclasses import replace

    tiny_sizes = replace(le.SCALES["paper"], sizes=(1, 2))  # the fixture has 4 training cases
    p = le.plan(openkbp_like, tmp_path, tiny_sizes, models=["oar"], methods=["random", "separeg"])
    config = next(t for t in p.tasks if t.key == "pretrain/separeg").spec["config"]
    assert (config["encoder"], config["width"], config["image_size"], config["iterations"], config["batch_size"]) == ("resnet50", 64, 128, 100_000, 32)
    assert len(config["images"]) == 4  # every training CT (no pool subset)
    ft = next(t for t in p.tasks if t.key.startswith("finetune/separeg/")).spec["finetune"]
    assert ft["net"] == {"encoder": "resnet50", "width": 64}


@pytest.mark.parametrize("scale_name, budget", [("cpu", 300), ("paper", 100_000)])
def test_every_method_gets_the_same_pretraining_budget(openkbp_like, tmp_path, scale_name, budget):
    """Issue 9: SepaReg's "100k iterations in total". Each pretraining run of the plan, whatever
    its stages, plans the scale's budget in total (SepaReg at the old per-stage budget: 1100 steps
    at the CPU scale against 300)."""
    from dataclasses import replace

    from contourcl.training.pretrain.base import PretrainConfig
    from contourcl.training.pretrain.trainer import get_method

    scale = replace(le.SCALES[scale_name], sizes=(1, 2))  # the fixture has 4 training cases
    methods = ["random", "simclr", "simsiam", "separeg", "agcl-unet", "polycl-o", "polycl-s", "separeg-grid", "separeg-none"]
    p = le.plan(openkbp_like, tmp_path, scale, models=["oar", "gtv"], methods=methods)
    configs = {t.key: PretrainConfig.from_dict(t.spec["config"]) for t in p.tasks if t.key.startswith("pretrain/")}
    assert {c.method for c in configs.values()} == {"simclr", "simsiam", "separeg", "agcl", "polycl-o", "polycl-s"}
    totals = {}
    for key, config in configs.items():
        stages = get_method(config.method).planned_iterations(config)
        assert all(n >= 1 for n in stages.values()), (key, stages)
        totals[key] = sum(stages.values())
    assert set(totals.values()) == {budget}, totals
    separeg = get_method("separeg").planned_iterations(configs["pretrain/separeg"])
    assert set(separeg) == {"inter", "intra", "distill"}  # split over its stages, not run per stage
    assert p.settings()["pretrain_steps"]["separeg"] == separeg  # recorded in settings.json


def test_the_separation_ablation_rows_differ_from_separeg_only_in_the_separation(openkbp_like, tmp_path):
    from dataclasses import replace

    scale = replace(le.SCALES["cpu"], sizes=(1,), draws=2)
    p = le.plan(openkbp_like, tmp_path, scale, models=["oar"], methods=["random", "separeg", "separeg-grid", "separeg-none"])
    configs = {t.key: t.spec["config"] for t in p.tasks if t.key.startswith("pretrain/")}
    base = configs["pretrain/separeg"]
    for name, separation in (("separeg-grid", "grid"), ("separeg-none", "none")):
        config = configs[f"pretrain/{name}"]
        assert config["options"] == {**base["options"], "separation": separation}
        assert {k: v for k, v in config.items() if k not in ("options", "out")} == {k: v for k, v in base.items() if k not in ("options", "out")}
    # fine-tuned on the same draws as every other row
    train = {t.key: [c["id"] for c in t.spec["train"]] for t in p.tasks if t.key.startswith("finetune/")}
    for d in (0, 1):
        assert train[f"finetune/separeg-grid/oar/n01-d{d}"] == train[f"finetune/random/oar/n01-d{d}"] == train[f"finetune/separeg/oar/n01-d{d}"]


def test_per_size_draws_are_the_same_for_every_method(openkbp_like, tmp_path):
    from collections import Counter
    from dataclasses import replace

    scale = replace(le.SCALES["cpu"], sizes=(1, 2, 3), draws=(5, 5, 3))  # the cpu scale's 5, 5, 3
    p = le.plan(openkbp_like, tmp_path, scale, models=["oar"], methods=["random", "simclr", "agcl-unet"])
    runs = Counter((t.key.split("/")[1], t.key.rsplit("/n", 1)[1].split("-")[0]) for t in p.tasks if t.key.startswith("finetune/"))
    assert runs == {(m, n): d for m in ("random", "simclr", "agcl-unet") for n, d in (("01", 5), ("02", 5), ("03", 3))}
    train = {t.key: [c["id"] for c in t.spec["train"]] for t in p.tasks if t.key.startswith("finetune/")}
    for key, ids in train.items():
        assert ids == train["finetune/random/" + key.split("/", 2)[2]]  # every row fine-tunes on random init's draw
    # random init first, then the smallest size's draws, each draw's pretraining before its fine-tunes
    order = [t.key for t in p.tasks]
    assert all(k.startswith("finetune/random/") for k in order[:13])
    assert order.index("pretrain/agcl-unet/oar/n01-d0") < order.index("finetune/agcl-unet/oar/n01-d0") < order.index("finetune/simclr/oar/n02-d0")


def test_pretraining_seeds_are_planned_at_the_chosen_sizes(openkbp_like, tmp_path):
    """Issue 32: each method pretrained with 3 seeds; every seed's encoder fine-tuned on the draws of
    one labeled patient, the same draws (and fine-tuning seed) as random init; seed 0 keeps its names."""
    scale = le.Scale("tiny", "resnet10", 8, 64, 2, 4, finetune_steps=4, finetune_epochs=2, finetune_batch=4,
                     samples_per_volume=2, pool=None, sizes=(1, 2), draws=2)
    p = le.plan(openkbp_like, tmp_path, scale, models=["oar"], methods=["random", "simclr", "agcl-unet"], pretrain_seeds=3)
    keys = {t.key: t for t in p.tasks}
    assert [keys[f"pretrain/simclr{s}"].spec["config"]["seed"] for s in ("", "-s1", "-s2")] == [0, 1, 2]
    run = keys["finetune/simclr/oar/n01-d1-s2"]
    assert run.deps == ("pretrain/simclr-s2",) and run.spec["pretrain_seed"] == 2
    assert run.output.name == "n01-d1-s2.json" and keys["finetune/simclr/oar/n01-d1"].output.name == "n01-d1.json"
    assert run.spec["train"] == keys["finetune/random/oar/n01-d1"].spec["train"]
    assert run.spec["finetune"]["seed"] == keys["finetune/random/oar/n01-d1"].spec["finetune"]["seed"]
    assert keys["pretrain/agcl-unet/oar/n01-d0-s1"].spec["config"]["seed"] == 1
    assert "finetune/simclr/oar/n02-d0-s1" not in keys and "finetune/random/oar/n01-d0-s1" not in keys
    assert p.settings()["pretrain_seeds"] == 3
    order = [t.key for t in p.tasks]
    assert order.index("finetune/simclr/oar/n01-d1-s2") < order.index("finetune/simclr/oar/n02-d0")  # smallest size first
