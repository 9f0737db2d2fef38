"""The refinement network's training plays each model's clicks with the scope the server gives
them (issue 31): a model's own reach and edit radius bound the click maps and where the loss counts."""

from __future__ import annotations

import numpy as np
import torch

from contourcl.models.networks import NetConfig
from contourcl.refine.encoding import reach_slices
from contourcl.training.refine.train import play


class Unchanged(torch.nn.Module):
    """A stand-in network whose correction is 0: the mask stays."""

    config = NetConfig(out_channels=1, in_channels=4, encoder="resnet10", width=8)

    def forward(self, x):
        return torch.zeros_like(x[:, :1])


def _episode() -> dict:
    shape = (48, 48, 40)
    ref = np.zeros(shape, dtype=bool)
    ref[14:34, 14:34, 5:35] = True
    mask = ref.copy()
    mask[14:34, 14:34, 15:25] = False  # a missed band of 10 slices: the first click lands at its centre
    image = np.random.default_rng(0).random(shape).astype(np.float32)
    return {"image": image, "ref": ref, "mask": mask, "spacing": np.array([3.0, 3.0, 2.5]),
            "valid": np.ones((1, 1, shape[2]), dtype=bool), "model": "gtv"}


def test_a_models_reach_and_edit_radius_bound_what_training_sees():
    for reach_mm, radius_mm in ((7.5, 20.0), (25.0, 40.0)):
        played = None
        for seed in range(20):  # one round: the click's own slices are trained on
            rng = np.random.default_rng(seed)
            if int(np.random.default_rng(seed).integers(1, 6)) == 1:
                played = play(Unchanged(), _episode(), rng, 64, torch.device("cpu"), edit_radius_mm=radius_mm, reach_mm=reach_mm)
                break
        assert played is not None
        inputs, target, weight = played
        reach = reach_slices(2.5, reach_mm)
        assert inputs.shape[0] == 2 * reach + 1, "every slice the click reaches, and no other"
        assert (inputs[:, 2].amax(dim=(1, 2)) > 0).all(), "the positive click's map on each of them"
        # the loss counts within the edit radius of the click (where its map peaks, 3 mm pixels)
        cy, cx = np.unravel_index(int(inputs[reach, 2].argmax()), inputs.shape[2:])
        ys, xs = np.nonzero(weight[reach].numpy())
        far = np.hypot((ys - cy) * 3.0, (xs - cx) * 3.0).max()
        assert radius_mm - 4.5 <= far <= radius_mm + 4.5, (radius_mm, far)
