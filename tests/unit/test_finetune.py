import json

import numpy as np
import pytest
import torch

from contourcl.data.transforms import StructurePresenced
from contourcl.models.checkpoint import load_model
from contourcl.models.encoder_checkpoint import save_encoder
from contourcl.models.networks import ResNetEncoder
from contourcl.testing import blob_case, write_nifti
from contourcl.training.finetune.engine import FinetuneConfig, evaluate, finetune, save_finetuned


def cases(tmp_path, n, first_seed=0):
    out = []
    for i in range(n):
        ct, lab, affine = blob_case(seed=first_seed + i)
        out.append({"id": f"c{i}", "image": write_nifti(tmp_path / f"ct{i}.nii.gz", ct, affine), "label": write_nifti(tmp_path / f"lab{i}.nii.gz", lab, affine)})
    return out


def tiny_config(**kw):
    base = dict(model="oar", net={"encoder": "resnet10", "width": 8}, roi=(64, 64), max_epochs=6, batch_size=8, samples_per_volume=8, lr=5e-3)
    return FinetuneConfig(**{**base, **kw})


def test_structure_presence_marks_contoured_structures():
    lab = torch.zeros(1, 4, 4, 2)
    lab[0, 0, 0, 0] = 2
    assert StructurePresenced("label", 4)({"label": lab})["present"].tolist() == [1.0, 0.0, 1.0, 0.0]


def test_finetune_learns_and_writes_a_servable_model(tmp_path):
    data = cases(tmp_path, 3)
    cfg = tiny_config(max_epochs=15, samples_per_volume=16)
    result = finetune(data[:2], data[2:], cfg, progress=False)
    losses = [h["loss"] for h in result.history]
    assert losses[-1] < losses[0]
    assert set(result.per_structure) == {"Brainstem", "Mandible"}, "only the structures the cases contour are scored"
    assert result.best_dice > 0.3
    path = save_finetuned(tmp_path / "oar.pt", cfg, result, train_ids=["c0", "c1"])
    net, meta = load_model(path)
    assert meta.model == "oar" and meta.labels["Mandible"] == 5 and meta.metrics["val_dice"] == pytest.approx(result.best_dice)
    assert evaluate(net, data[2:], cfg)[0] == pytest.approx(result.best_dice, abs=1e-4)


def test_encoder_initialised_from_a_pretraining_checkpoint(tmp_path):
    data = cases(tmp_path, 2)
    enc = ResNetEncoder("resnet10", width=8)
    with torch.no_grad():
        enc.resnet.conv1.weight.fill_(0.01)
    save_encoder(enc, tmp_path / "pre.pt", method="test")
    cfg = tiny_config(max_epochs=0, init=str(tmp_path / "pre.pt"))
    result = finetune(data[:1], [], cfg, progress=False)
    assert torch.allclose(result.network.encoder.resnet.conv1.weight, torch.full_like(enc.resnet.conv1.weight, 0.01))


def test_voxel_siamese_option_trains(tmp_path, monkeypatch):
    """The option computes the feature loss at every step and adds it to the loss the optimiser
    sees: the encoder ends elsewhere than with lambda = 0 (same seed, same batches, same random
    draws). Fails when the option is ignored or its loss is not added."""
    from contourcl.training.finetune import voxel_siamese

    data = cases(tmp_path, 2)
    seen: list[float] = []
    forward = voxel_siamese.VoxelSiameseLoss.forward

    def spy(self, *args, **kwargs):
        value = forward(self, *args, **kwargs)
        seen.append(float(value.detach()))
        return value

    monkeypatch.setattr(voxel_siamese.VoxelSiameseLoss, "forward", spy)
    on = finetune(data[:1], [], tiny_config(max_epochs=2, steps_per_epoch=3, voxel_siamese=True), progress=False)
    assert all(np.isfinite(h["loss"]) for h in on.history)
    assert len(seen) == 6 and all(np.isfinite(v) and v != 0.0 for v in seen), f"feature loss per step: {seen}"
    assert not any("feature_loss" in k or k.startswith("heads") for k in on.network.state_dict()), "only the U-Net is kept"
    # the same run with lambda = 0: the same batches and random draws, only the loss's weight differs
    zero = finetune(data[:1], [], tiny_config(max_epochs=2, steps_per_epoch=3, voxel_siamese=True, voxel_siamese_lambda=0.0),
                    progress=False)
    weight = "encoder.resnet.layer4.0.conv1.weight"
    assert not torch.allclose(on.network.state_dict()[weight], zero.network.state_dict()[weight]), \
        "the feature loss did not reach the encoder: the option's loss is not added"


def test_validation_scores_what_the_gate_scores(tmp_path):
    """The engine's model selection, the retraining gate and ``contourcl evaluate`` give one figure."""
    from contourcl.serving.retrain import gate_dice

    data = cases(tmp_path, 3)
    cfg = tiny_config(max_epochs=3, samples_per_volume=16, largest_component=True)
    result = finetune(data[:2], data[2:], cfg, progress=False)
    path = save_finetuned(tmp_path / "oar.pt", cfg, result)
    assert gate_dice(path, data[2:])[0] == pytest.approx(result.best_dice, abs=1e-6)


def test_an_interrupted_run_resumes_to_the_same_weights(tmp_path):
    data = cases(tmp_path, 2)
    cfg = tiny_config(max_epochs=2, ema=0.9)
    whole = finetune(data[:1], data[1:], cfg, progress=False, state_path=tmp_path / "whole.pt")

    class Stopped(Exception):
        pass

    def stop(record, network):  # the run is stopped after its first epoch
        raise Stopped

    with pytest.raises(Stopped):
        finetune(data[:1], data[1:], cfg, progress=False, state_path=tmp_path / "cut.pt", on_epoch=stop)
    state = torch.load(tmp_path / "cut.pt", weights_only=True)
    assert state["epoch"] == 1
    resumed = finetune(data[:1], data[1:], cfg, progress=False, state_path=tmp_path / "cut.pt")
    assert len(resumed.history) == 2 and resumed.history[0] == whole.history[0]
    for (name, a), b in zip(whole.network.state_dict().items(), resumed.network.state_dict().values(), strict=False):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), name


def test_refit_chooses_on_the_inner_split_then_trains_on_every_case(tmp_path):
    from contourcl.errors import ConfigError
    from contourcl.training.finetune.refit import select_and_refit

    data = cases(tmp_path, 3)
    cfg = tiny_config(max_epochs=2, ema=0.9, tta_flip=None)
    summary = select_and_refit(data[:2], data[2:], cfg, tmp_path / "oar.pt", tmp_path / "state")
    net, meta = load_model(tmp_path / "oar.pt")
    assert set(summary["choices"]["tta_flip"]) == {"off", "on"} and meta.tta_flip == summary["tta_flip"]
    # the flip doubles the inference time: kept only for a gain of at least 0.005 mean Dice
    flip = summary["choices"]["tta_flip"]
    assert summary["tta_flip"] == (flip["on"] - flip["off"] >= 0.005)
    assert summary["choices"]["kept"] in ("ema", "raw") and 1 <= summary["epochs"] <= 2
    assert meta.provenance["inner_val_ids"] == ["c2"] and meta.metrics["choices"]["inner_val_dice"] == summary["inner_val_dice"]
    with pytest.raises(ConfigError, match="another configuration"):
        select_and_refit(data[:2], data[2:], tiny_config(max_epochs=3), tmp_path / "oar.pt", tmp_path / "state")

    def forget(key: str) -> None:
        """Make the state look written before the setting ``key`` existed."""
        stored = json.loads((tmp_path / "state" / "config.json").read_text())
        del stored["config"][key]
        (tmp_path / "state" / "config.json").write_text(json.dumps(stored))

    forget("deep_supervision")  # left at its default: the same configuration, resumed
    assert select_and_refit(data[:2], data[2:], cfg, tmp_path / "oar.pt", tmp_path / "state")["epochs"] == summary["epochs"]
    forget("deep_supervision")  # set: another configuration
    with pytest.raises(ConfigError, match="another configuration"):
        select_and_refit(data[:2], data[2:], tiny_config(max_epochs=2, ema=0.9, tta_flip=None, deep_supervision=1), tmp_path / "oar.pt", tmp_path / "state")


def test_refit_returns_stage_one_memory_before_caching_every_case(tmp_path, monkeypatch):
    """The refit caches every case again: stage 1's freed cache is handed back to the system first
    (otherwise both stages' caches were resident: 17.1 GB against 10.8 GB for the `oar` command,
    ``benchmarks/finetune_memory.py``)."""
    import contourcl.training.finetune.refit as refit
    from contourcl.training.finetune.engine import return_freed_memory

    calls = []

    def finetune(train, val, cfg, **kwargs):
        calls.append(f"finetune on {len(train)} cases")
        return real_finetune(train, val, cfg, **kwargs)

    def returned() -> bool:
        calls.append("memory returned")
        return return_freed_memory()

    real_finetune = refit.finetune
    monkeypatch.setattr(refit, "finetune", finetune)
    monkeypatch.setattr(refit, "return_freed_memory", returned)
    data = cases(tmp_path, 3)
    refit.select_and_refit(data[:2], data[2:], tiny_config(max_epochs=1), tmp_path / "oar.pt", tmp_path / "state")
    assert calls == ["finetune on 2 cases", "memory returned", "finetune on 3 cases"]
    assert isinstance(return_freed_memory(), bool)


def test_the_shipped_recipes_are_the_shipped_commands():
    """``--recipe oar`` is the 17-flag command the shipped oar.pt was trained with; the command line wins over it."""
    import argparse

    from contourcl.cli import finetune as cli

    def parsed(*argv):
        parser = argparse.ArgumentParser()
        cli.add_arguments(parser)
        return cli.apply_recipe(parser.parse_args(list(argv)))

    common = ["--data", "D", "--out", "O"]
    for model, epochs, interval in (("oar", "48", "8"), ("gtv", "24", "2")):
        flags = parsed(*common, "--model", model, "--val-fraction", "0.12", "--seed", "0", "--encoder", "resnet18", "--width", "32",
                       "--roi", "96", "--epochs", epochs, "--steps-per-epoch", "250", "--batch-size", "16", "--samples-per-volume", "4",
                       "--lr", "1e-3", "--warmup-steps", "200", "--val-interval", interval, "--ema", "0.999", "--tta-flip", "auto",
                       "--deep-supervision", "2", "--spacing", "3", "--refit", "--half")
        recipe = parsed(*common, "--recipe", model)
        assert {k: v for k, v in vars(recipe).items() if k != "recipe"} == {k: v for k, v in vars(flags).items() if k != "recipe"}
    assert parsed(*common, "--recipe", "oar", "--epochs", "3").epochs == 3
    with pytest.raises(FileNotFoundError, match="one of"):
        parsed(*common, "--recipe", "liver")


def test_voxel_siamese_lambda_is_chosen_on_the_inner_split(tmp_path, monkeypatch):
    """Issue 32: lambda among the choices, each scored on the held-out inner cases (last epoch),
    never on a case it trained on; one labeled case has no inner split and keeps the default."""
    from contourcl.training.finetune import engine, voxel_siamese

    data = cases(tmp_path, 3)
    cfg = tiny_config(max_epochs=1, steps_per_epoch=2, voxel_siamese=True)
    seen = []
    real = engine.finetune

    def spy(train, val, trial, **kw):
        seen.append(([c["id"] for c in train], [c["id"] for c in val], trial.voxel_siamese_lambda))
        return real(train, val, trial, **kw)

    monkeypatch.setattr(engine, "finetune", spy)
    chosen = voxel_siamese.select_lambda(data, cfg, choices=(0.3, 10.0), seed=0)
    assert [lam for *_, lam in seen] == [0.3, 10.0]
    assert all(len(v) == 1 and not set(v) & set(t) and len(t) == 2 for t, v, _ in seen)
    assert chosen["inner_val_ids"] == seen[0][1] and set(chosen["scores"]) == {0.3, 10.0}
    assert chosen["lambda"] == max(chosen["scores"], key=lambda k: (chosen["scores"][k], -k))
    alone = voxel_siamese.select_lambda(data[:1], cfg)
    assert alone["lambda"] == cfg.voxel_siamese_lambda and alone["scores"] == {} and len(seen) == 2
    assert voxel_siamese.LAMBDA_CHOICES == (0.3, 1.0, 3.0, 10.0)
