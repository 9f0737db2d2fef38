"""Slice context for the refinement network (issue 31): a network that also sees the CT and the
current mask on the slices below and above gets exactly those slices, in RAS order whatever the
grid's order, from the served Refiner and from the training alike; a network widened to take them
answers as before until trained."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from contourcl.models.checkpoint import ModelMeta
from contourcl.models.networks import NetConfig
from contourcl.refine.encoding import reach_slices
from contourcl.refine.network import (
    CONTEXT_CHANNELS,
    INPUT_CHANNELS,
    from_shipped,
    has_context,
    refine_meta,
    with_context,
)
from contourcl.refine.refiner import Orientation, Refiner, windowed
from contourcl.testing import tiny_model_file
from contourcl.training.refine.train import episode_inputs

# feet-first, axial axis first: RAS slice z is voxel axis 0 run backwards
FEET_FIRST = np.array([[0, 1.2, 0, 0], [0, 0, -1.2, 0], [-3.0, 0, 0, 0], [0, 0, 0, 1.0]])
WINDOW = (-500.0, 800.0)


class Recorder(torch.nn.Module):
    """A stand-in network with slice context that keeps its inputs and leaves the mask as it is."""

    def __init__(self):
        super().__init__()
        self.config = NetConfig(out_channels=1, in_channels=len(INPUT_CHANNELS) + len(CONTEXT_CHANNELS), encoder="resnet10", width=8)
        self.seen: list[torch.Tensor] = []

    def forward(self, x):
        self.seen.append(x.clone())
        return torch.zeros_like(x[:, :1])


def test_the_served_context_is_the_ct_and_mask_of_the_neighbouring_slices():
    shape = (12, 32, 32)  # 12 axial slices on voxel axis 0, feet first
    orient = Orientation.of(FEET_FIRST)
    ct = np.zeros(shape, dtype=np.float32)
    mask = np.zeros(shape, dtype=bool)
    ras_ct, ras_mask = orient.view(ct), orient.view(mask)
    for z in range(shape[0]):
        ras_ct[:, :, z] = 50.0 * z - 300.0  # each RAS slice its own value inside the window
    ras_mask[8:20, 8:20, 3] = True  # the structure on RAS slices 3 and 6 only
    ras_mask[8:20, 8:20, 6] = True
    network = Recorder()
    meta = ModelMeta(model="refine", labels={"structure": 1}, net={}, spacing=(3.6, 3.6), window=WINDOW)
    refiner = Refiner(network, meta)
    assert refiner.context
    click = orient.points(np.array([[4, 10, 10]]), shape)  # an image voxel, in RAS order
    assert click[0, 2] == 7, "voxel 4 of a feet-first axis of 12 is RAS slice 7"
    refiner(ct, FEET_FIRST, mask, np.array([[4, 10, 10]]), np.zeros((0, 3)), edit_radius_mm=None, reach_mm=7.5)
    inputs = torch.cat(network.seen)
    reach = reach_slices(3.0, 7.5)
    zs = np.arange(7 - reach, 7 + reach + 1)
    assert inputs.shape[:2] == (len(zs), 8)

    def level(z):
        return float(windowed(torch.tensor(50.0 * z - 300.0), WINDOW))

    inside = inputs[:, :, 16, 16]  # the network's input is zero-padded to 32 pixels: its centre is the CT's
    for row, z in enumerate(zs):
        assert inside[row, 0] == pytest.approx(level(z)), "the slice's own CT"
        assert inside[row, 4] == pytest.approx(level(z - 1)), f"the CT below slice {z}"
        assert inside[row, 5] == pytest.approx(level(z + 1)), f"the CT above slice {z}"
        assert bool(inputs[row, 6].any()) == (z - 1 in (3, 6)), f"the mask below slice {z}"
        assert bool(inputs[row, 7].any()) == (z + 1 in (3, 6)), f"the mask above slice {z}"


def test_the_grids_ends_give_the_slice_itself():
    shape = (32, 32, 4)
    ct = np.broadcast_to(np.arange(4, dtype=np.float32) * 100.0, shape).copy()
    network = Recorder()
    refiner = Refiner(network, ModelMeta(model="refine", labels={"structure": 1}, net={}, spacing=(3.0, 3.0), window=WINDOW))
    refiner(ct, np.diag([3.0, 3.0, 3.0, 1.0]), np.zeros(shape, bool), np.array([[16, 16, 0]]), np.zeros((0, 3)),
            edit_radius_mm=None, reach_mm=20.0)
    inputs = torch.cat(network.seen)
    assert torch.equal(inputs[0, 4], inputs[0, 0]), "below the first slice: the first slice"
    assert torch.equal(inputs[-1, 5], inputs[-1, 0]), "above the last slice: the last slice"


def test_training_gives_the_network_the_same_context():
    rng = np.random.default_rng(0)
    shape = (24, 24, 10)
    ep = {"image": rng.random(shape).astype(np.float32), "spacing": np.array([3.0, 3.0, 2.5])}
    mask = rng.random(shape) > 0.5
    zs = np.array([0, 4, 9])
    plain = episode_inputs(ep, mask, [[12, 12, 4]], [], zs)
    inputs = episode_inputs(ep, mask, [[12, 12, 4]], [], zs, context=True)
    assert plain.shape[1] == 4 and inputs.shape[1] == 8
    assert torch.equal(inputs[:, :4], plain)
    below, above = np.array([0, 3, 8]), np.array([1, 5, 9])
    assert np.array_equal(inputs[:, 4].numpy(), np.moveaxis(ep["image"][:, :, below], 2, 0))
    assert np.array_equal(inputs[:, 5].numpy(), np.moveaxis(ep["image"][:, :, above], 2, 0))
    assert np.array_equal(inputs[:, 6].numpy(), np.moveaxis(mask[:, :, below], 2, 0).astype(np.float32))
    assert np.array_equal(inputs[:, 7].numpy(), np.moveaxis(mask[:, :, above], 2, 0).astype(np.float32))


def test_a_network_widened_to_take_context_answers_as_before(tmp_path):
    network, base = from_shipped(str(tiny_model_file(tmp_path / "oar.pt", model="oar")))
    torch.manual_seed(0)
    with torch.no_grad():  # a network with an answer of its own, not the untrained one's "keep the mask"
        for p in network.head.parameters():
            p.normal_(0, 1.0)
        network.encoder.resnet.conv1.weight[:, 1:].normal_(0, 0.5)
    wider = with_context(network)
    assert not has_context(network) and has_context(wider)
    meta = refine_meta(network, base, edit_radius_mm=None)
    shape = (12, 40, 36)
    ct = np.random.default_rng(1).normal(0, 300, shape).astype(np.float32)
    mask = np.zeros(shape, dtype=bool)
    mask[3:9, 10:30, 8:28] = True
    clicks = (np.array([[6, 12, 12]]), np.array([[5, 25, 20]]))
    before = Refiner(network, meta)(ct, FEET_FIRST, mask, *clicks)
    after = Refiner(wider.eval(), meta)(ct, FEET_FIRST, mask, *clicks)
    assert (before != mask).any(), "the network changes the mask: the comparison means something"
    assert np.array_equal(before, after)


def test_a_file_that_is_no_refinement_network_is_refused_by_name(tmp_path):
    segmentation = tiny_model_file(tmp_path / "oar.pt", model="oar")  # 1 input, 8 outputs
    with pytest.raises(ValueError, match=r"oar\.pt is not a refinement model file: .*input channels, not 1"):
        Refiner.from_file(segmentation)
    network, base = from_shipped(str(segmentation))
    from contourcl.models.checkpoint import save_model

    save_model(tmp_path / "ok.pt", network, refine_meta(network, base, edit_radius_mm=None))
    assert not Refiner.from_file(tmp_path / "ok.pt").context
    wider = with_context(network)
    save_model(tmp_path / "wide.pt", wider, refine_meta(wider, base, edit_radius_mm=None))
    assert Refiner.from_file(tmp_path / "wide.pt").context
