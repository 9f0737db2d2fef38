"""The pretraining framework: config, the methods' table, image discovery, body mask, resume, CLI, DDP."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch

from contourcl.cli import main as cli_main
from contourcl.data.datasets import find_ct_images
from contourcl.errors import InvalidImageError
from contourcl.models.encoder_checkpoint import load_encoder
from contourcl.models.networks import NetConfig, build_network
from contourcl.training.pretrain import trainer
from contourcl.training.pretrain.base import ConfigError, PretrainConfig, PretrainMethod, Stage
from contourcl.training.pretrain.trainer import available_methods, get_method, pretrain
from contourcl.training.pretrain.volumes import SliceDataset, body_mask, load_volumes, write_synthetic_cts

torch.set_num_threads(1)

TINY = dict(encoder="resnet10", width=8, image_size=32, batch_size=4, num_workers=0, progress=False)
TINY_SIMSIAM = {"proj_hidden": 32, "pred_hidden": 32, "proj_dim": 16}


# ---------------------------------------------------------------------------------------------
# configuration and the methods' table


def test_config_file_with_overrides(tmp_path):
    path = tmp_path / "pretrain.yaml"
    path.write_text("method: separeg\niterations: 500\nbatch_size: 16\noptions:\n  num_clusters: 4\n  region_mode: resize\n")
    cfg = PretrainConfig.from_file(path, iterations=7, options={"num_clusters": 3}, lr=None)
    assert (cfg.method, cfg.iterations, cfg.batch_size) == ("separeg", 7, 16)
    assert cfg.options == {"num_clusters": 3, "region_mode": "resize"}
    assert cfg.state_path.name == "pretrained.pt.state.pt"
    json_path = tmp_path / "c.json"
    json_path.write_text(json.dumps({"pretrain": {"method": "simclr", "width": 16}}))
    assert PretrainConfig.from_file(json_path).width == 16
    path.write_text("iteration: 5\n")
    with pytest.raises(ConfigError, match="iteration"):
        PretrainConfig.from_file(path)
    with pytest.raises(ConfigError, match="optimizer"):
        PretrainConfig(optimizer="lbfgs")


def test_method_table_and_method_options(monkeypatch):
    assert available_methods() == ["agcl", "polycl-o", "polycl-s", "separeg", "simclr", "simsiam"]
    for name in available_methods():
        assert get_method(name).name == name
    with pytest.raises(ConfigError, match="unknown pretraining method"):
        get_method("nope")

    class Dummy(PretrainMethod):
        name = "test-dummy"
        default_options = {"alpha": 1}

    monkeypatch.setitem(trainer.METHODS, "test-dummy", Dummy)
    assert get_method("test-dummy") is Dummy
    from contourcl.models.networks import ResNetEncoder

    m = Dummy(ResNetEncoder("resnet10", 8), PretrainConfig(options={"alpha": 2}))
    assert m.options == {"alpha": 2} and m.resolve_lr() == 0.05
    with pytest.raises(ConfigError, match="beta"):
        Dummy(ResNetEncoder("resnet10", 8), PretrainConfig(options={"beta": 2}))


# ---------------------------------------------------------------------------------------------
# images and volumes


def test_find_ct_images_flat_and_openkbp_layouts(tmp_path):
    flat = tmp_path / "flat"
    write_synthetic_cts(flat, 2, shape=(16, 16, 3))
    for name in ("case0_label.nii.gz", "case0_seg.nii.gz", "notes.txt"):
        (flat / name).write_bytes(b"x")
    (flat / "labels" / "final").mkdir(parents=True)
    (flat / "labels" / "final" / "case0.nii.gz").write_bytes(b"x")
    assert [p.name for p in find_ct_images(flat)] == ["case0.nii.gz", "case1.nii.gz"]

    kbp = tmp_path / "train-pats"
    for case in ("pt_1", "pt_2"):
        write_synthetic_cts(kbp / case, 1, shape=(16, 16, 3))
        (kbp / case / "case0.nii.gz").rename(kbp / case / "ct.nii.gz")
        for other in ("oar.nii.gz", "target.nii.gz", "possible_dose_mask.nii.gz"):
            (kbp / case / other).write_bytes(b"x")
    (kbp / "manifest.json").write_text("{}")
    found = find_ct_images([kbp])
    assert [p.relative_to(kbp).as_posix() for p in found] == ["pt_1/ct.nii.gz", "pt_2/ct.nii.gz"]
    vols = load_volumes(found, num_workers=2)
    assert [v.case for v in vols] == ["pt_1", "pt_2"] and vols[0].image.shape == (16, 16, 3)
    with pytest.raises(InvalidImageError):
        find_ct_images(tmp_path / "missing")


def test_body_mask_fills_holes_and_drops_the_couch():
    img = np.zeros((40, 40, 3), np.float32)
    yy, xx = np.mgrid[:40, :40]
    body = (yy - 18) ** 2 + (xx - 20) ** 2 < 12**2
    img[body] = 0.4
    img[(yy - 18) ** 2 + (xx - 20) ** 2 < 3**2] = 0.0  # airway: a hole in every slice
    img[36:38, 5:35] = 0.4  # couch, not touching the body
    mask = body_mask(img, threshold=0.1)
    assert np.array_equal(mask, np.repeat(body[..., None], 3, axis=2))


def test_volumes_are_windowed_with_body_and_slices(tmp_path):
    paths = write_synthetic_cts(tmp_path / "imgs", 1, shape=(40, 32, 4))
    v1 = load_volumes(paths, cache_dir=tmp_path / "cache")[0]
    v2 = load_volumes(paths, cache_dir=tmp_path / "cache")[0]  # from the cache: the same values
    assert np.array_equal(v1.image, v2.image) and np.array_equal(v1.body, v2.body)
    assert v1.image.min() >= 0 and v1.image.max() <= 1 and 0.2 < v1.body.mean() < 0.9
    ds = SliceDataset([v1], image_size=32)
    assert len(ds) == 4 and ds[0].shape == (1, 32, 32)


def test_the_volume_cache_follows_the_file_content_not_its_time(tmp_path):
    """A corrected copy of a dataset (OpenKBP's slices reversed, 2026-11-26) can keep each file's
    name, size and modification time: the cache must not serve the old volume."""
    import nibabel as nib

    gz = write_synthetic_cts(tmp_path / "imgs", 1, shape=(40, 32, 6))[0]
    path = tmp_path / "ct.nii"  # uncompressed: the corrected file has exactly the old one's size
    nib.save(nib.load(str(gz)), str(path))
    before = load_volumes([path], cache_dir=tmp_path / "cache")[0].image
    st = os.stat(path)
    img = nib.load(str(path))
    reversed_data = np.ascontiguousarray(np.asarray(img.dataobj)[..., ::-1])
    nib.save(nib.Nifti1Image(reversed_data, img.affine, img.header), str(path))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(path).st_size == st.st_size
    after = load_volumes([path], cache_dir=tmp_path / "cache")[0].image
    assert not np.array_equal(after, before)
    assert np.array_equal(after, before[..., ::-1])

# ---------------------------------------------------------------------------------------------
# the loop


def simsiam_config(tmp_path, **kw) -> PretrainConfig:
    settings = dict(method="simsiam", images=[str(tmp_path / "imgs")], out=str(tmp_path / "out.pt"), iterations=6, lr=0.05,
                    checkpoint_every=2, cache_dir=str(tmp_path / "cache"), options=TINY_SIMSIAM, **TINY)
    return PretrainConfig(**{**settings, **kw})


def test_schedule_is_monai_warmup_cosine_and_resumes_at_the_saved_step():
    def opt():
        return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)

    def lrs(scheduler, n):
        out = []
        for _ in range(n):
            out.append(scheduler.get_last_lr()[0])
            scheduler.optimizer.step()
            scheduler.step()
        return out

    # no warm-up: the cosine of the hand-written schedule it replaces, 0.5 (1 + cos(pi t / T))
    assert lrs(trainer.build_scheduler(opt(), 10, 0, "cosine"), 10) == pytest.approx([0.05 * (1 + math.cos(math.pi * t / 10)) for t in range(10)])
    assert lrs(trainer.build_scheduler(opt(), 10, 0, "constant"), 10) == pytest.approx([0.1] * 10)
    warm = lrs(trainer.build_scheduler(opt(), 10, 4, "cosine"), 6)
    assert warm == pytest.approx([0.0, 0.025, 0.05, 0.075, 0.1, 0.05 * (1 + math.cos(math.pi / 6))])
    # resumed after 4 of 10 steps with 20 iterations now: the saved step, this run's length
    first = trainer.build_scheduler(opt(), 10, 0, "cosine")
    lrs(first, 4)
    second = trainer.build_scheduler(opt(), 20, 0, "cosine")
    trainer.resume_scheduler(second, first.state_dict())
    second.step()
    assert second.last_epoch == 5 and second.get_last_lr()[0] == pytest.approx(0.05 * (1 + math.cos(math.pi * 5 / 20)))
    # a state of the LambdaLR used before resumes too
    old = torch.optim.lr_scheduler.LambdaLR(opt(), lambda t: 0.5 * (1 + math.cos(math.pi * t / 10)))
    lrs(old, 3)
    third = trainer.build_scheduler(opt(), 10, 0, "cosine")
    trainer.resume_scheduler(third, old.state_dict())
    third.step()
    assert third.last_epoch == 4 and third.get_last_lr()[0] == pytest.approx(0.05 * (1 + math.cos(math.pi * 4 / 10)))


def test_resume_continues_where_it_stopped(tmp_path):
    write_synthetic_cts(tmp_path / "imgs", 2, shape=(40, 40, 4))
    full = pretrain(simsiam_config(tmp_path, out=str(tmp_path / "full.pt")))
    reference = torch.load(tmp_path / "full.pt", weights_only=False)["encoder"]

    cfg = simsiam_config(tmp_path)
    first = pretrain(cfg, stop_after=3)
    assert first["interrupted"] and not os.path.exists(cfg.out)
    state = torch.load(cfg.state_path, weights_only=False)
    assert state["step"] == 3 and state["optimizer"] is not None and "rng" in state
    second = pretrain(cfg, resume=True)
    assert [s for s, _ in second["history"]["main"]] == list(range(1, 7))
    assert [v for _, v in second["history"]["main"]] == pytest.approx([v for _, v in full["history"]["main"]], abs=1e-5)
    resumed = torch.load(cfg.out, weights_only=False)
    assert resumed["meta"]["iterations"] == 6
    for name, value in reference.items():
        assert torch.allclose(value.float(), resumed["encoder"][name].float(), atol=1e-5), name
    with pytest.raises(ConfigError, match="width"):  # another architecture cannot resume this state
        pretrain(simsiam_config(tmp_path, width=16), resume=True)


def test_cli_with_config_file(tmp_path, capsys):
    write_synthetic_cts(tmp_path / "imgs", 2, shape=(40, 40, 4))
    cfg = tmp_path / "pretrain.yaml"
    cfg.write_text("iterations: 3\nbatch_size: 4\nencoder: resnet10\nwidth: 8\nimage_size: 32\nnum_workers: 0\noptions:\n  proj_dim: 16\n")
    out = tmp_path / "ckpt" / "simclr.pt"
    rc = cli_main(["pretrain", "simclr", "--images", str(tmp_path / "imgs"), "--out", str(out), "--config", str(cfg),
                   "--iterations", "4", "--cache-dir", str(tmp_path / "cache"), "--no-progress", "--set", "proj_hidden=32", "--set", "temperature=0.2"])
    assert rc == 0 and "simclr: wrote" in capsys.readouterr().out
    meta = load_encoder(build_network(NetConfig(out_channels=8, encoder="resnet10", width=8)), out)
    assert meta["iterations"] == 4 and meta["config"]["options"] == {"proj_dim": 16, "proj_hidden": 32, "temperature": 0.2}
    # an input error reaches the user as one line on stderr and a non-zero exit
    assert cli_main(["pretrain", "nope", "--images", str(tmp_path / "imgs"), "--out", str(out)]) == 2
    assert "contourcl pretrain: error: unknown pretraining method 'nope'" in capsys.readouterr().err


def test_multi_stage_protocol_and_on_end(tmp_path, monkeypatch):
    """A two-stage method: the second stage sees the first's result, on_end runs, stage names logged."""

    class TwoStage(PretrainMethod):
        name = "two-stage"

        def __init__(self, encoder, config):
            super().__init__(encoder, config)
            self.head = torch.nn.Linear(encoder.feature_dim, 2)
            self.events = []

        def loss(self, batch):
            out = self.head(self.encoder.pooled(batch)).pow(2).mean()
            return out, {"loss": out.item()}

        def stages(self, volumes, ctx):
            ds = SliceDataset(volumes, self.config.image_size)
            yield Stage("a", self, ds, 2, on_end=lambda: self.events.append("a done"))
            self.events.append(f"after a: {len(self.events)}")
            yield Stage("b", self, ds, 3, batch_size=2)

    write_synthetic_cts(tmp_path / "imgs", 1, shape=(40, 40, 4))
    monkeypatch.setitem(trainer.METHODS, "two-stage", TwoStage)
    result = pretrain(PretrainConfig(method="two-stage", images=[str(tmp_path / "imgs")], out=str(tmp_path / "o.pt"), iterations=9,
                                     cache_dir=str(tmp_path / "cache"), **TINY))
    assert result["method"].events == ["a done", "after a: 1"]
    assert {k: len(v) for k, v in result["history"].items()} == {"a": 2, "b": 3}
    assert result["meta"]["stages"]["b"]["iterations"] == 3


def test_the_pretraining_spacing_is_a_command_line_option():
    """The shipped recipes train at 3 mm: an encoder for them is pretrained at 3 mm too (issue 32)."""
    import argparse

    from contourcl.cli.pretrain import add_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    given = config_from_args(parser.parse_args(["separeg", "--images", "x", "--out", "y.pt", "--spacing", "3"]))
    assert tuple(given.spacing) == (3.0, 3.0)
    assert tuple(config_from_args(parser.parse_args(["separeg", "--images", "x", "--out", "y.pt"])).spacing) == (4.0, 4.0)
