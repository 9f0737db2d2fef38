"""The heads builder and every method's head, checked against the papers' descriptions.

The expected layer lists are written out by hand from the papers, not derived from
:func:`contourcl.training.pretrain.heads.mlp_head`.
"""

from __future__ import annotations

import pytest
import torch

from contourcl.models.networks import ResNetEncoder
from contourcl.training.finetune.voxel_siamese import VoxelFeatureHead
from contourcl.training.pretrain.agcl import AGCL
from contourcl.training.pretrain.base import PretrainConfig
from contourcl.training.pretrain.heads import mlp_head
from contourcl.training.pretrain.polycl import PolyCLScan
from contourcl.training.pretrain.simclr import SimCLRMethod
from contourcl.training.pretrain.simsiam import SimSiamModel

torch.set_num_threads(1)


def layers(head) -> list[str]:
    return [type(m).__name__ for m in head]


def test_simsiam_papers_heads():
    # SimSiam (Chen & He, Sec. 3, baseline settings): "The projection MLP ... has BN applied to each fully-connected
    # (fc) layer, including its output fc. Its output fc has no ReLU. ... This MLP has 3 layers."
    projector = mlp_head([16, 32, 32, 32], last_bn=True)
    assert layers(projector) == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d"]
    # "The prediction MLP ... has BN applied to its hidden fc layers. Its output fc does not have
    # BN or ReLU. This MLP has 2 layers."
    predictor = mlp_head([32, 8, 32])
    assert layers(predictor) == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    # a Linear followed by BN has no bias; the predictor's output fc has one
    assert [m.bias is None for m in projector if isinstance(m, torch.nn.Linear)] == [True, True, True]
    assert [m.bias is None for m in predictor if isinstance(m, torch.nn.Linear)] == [True, False]


def test_builder_parameters_and_keys():
    head = mlp_head([4, 8, 3])  # Linear(4, 8, no bias) 32 + BN(8) 16 + Linear(8, 3) 27
    assert sum(p.numel() for p in head.parameters()) == 75
    assert list(head.state_dict()) == [
        "0.weight", "1.weight", "1.bias", "1.running_mean", "1.running_var", "1.num_batches_tracked", "3.weight", "3.bias",
    ]
    assert layers(mlp_head([4, 3])) == ["Linear"]
    with pytest.raises(ValueError):
        mlp_head([4])


def test_every_methods_head_is_its_papers():
    enc = ResNetEncoder("resnet10", 8)
    d = enc.feature_dim
    # SepaReg (Wang et al.): projector Linear-BN-ReLU-Linear, predictor "the same architecture"
    simsiam = SimSiamModel(enc, proj_hidden=32, proj_dim=16, pred_hidden=32)
    assert layers(simsiam.projector) == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert layers(simsiam.predictor) == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert sum(p.numel() for p in simsiam.projector.parameters()) == d * 32 + 2 * 32 + 32 * 16 + 16
    # SimCLR (Chen et al., Sec. 2.1): "a MLP with one hidden layer", W2 relu(W1 h)
    simclr = SimCLRMethod(enc, PretrainConfig(method="simclr", encoder="resnet10", width=8, options={"proj_hidden": 32, "proj_dim": 16}))
    assert layers(simclr.head) == ["Linear", "ReLU", "Linear"]
    assert sum(p.numel() for p in simclr.head.parameters()) == d * 32 + 32 + 32 * 16 + 16
    # AGCL (Lee et al.): Linear(d, d)-ReLU-Linear(d, 256)
    agcl = AGCL(ResNetEncoder("resnet10", 8), PretrainConfig(method="agcl", encoder="resnet10", width=8))
    assert layers(agcl.projection) == ["Linear", "ReLU", "Linear"]
    d2 = agcl.encoder.feature_dim
    assert sum(p.numel() for p in agcl.projection.parameters()) == d2 * d2 + d2 + d2 * 256 + 256
    # PolyCL (Moseley & Imran): one Linear(feature_dim, 256)
    polycl = PolyCLScan(ResNetEncoder("resnet10", 8), PretrainConfig(method="polycl-s", encoder="resnet10", width=8))
    assert layers(polycl.projection) == ["Linear"]
    assert sum(p.numel() for p in polycl.projection.parameters()) == d * 256 + 256
    # voxel-level Siamese (Lee, Chung & Shin): SimSiam's shape, projector with BN on its output
    voxel = VoxelFeatureHead(4, hidden=8)
    assert layers(voxel.projector) == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d"]
    assert layers(voxel.predictor) == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    # the keys the training states were written with before the builder
    assert list(voxel.state_dict()) == [
        "projector.0.weight", "projector.1.weight", "projector.1.bias", "projector.1.running_mean", "projector.1.running_var",
        "projector.1.num_batches_tracked", "projector.3.weight", "projector.4.weight", "projector.4.bias", "projector.4.running_mean",
        "projector.4.running_var", "projector.4.num_batches_tracked",
        "predictor.0.weight", "predictor.1.weight", "predictor.1.bias", "predictor.1.running_mean", "predictor.1.running_var",
        "predictor.1.num_batches_tracked", "predictor.3.weight", "predictor.3.bias",
    ]


def test_polycl_reads_training_states_of_the_bare_linear_projection():
    method = PolyCLScan(ResNetEncoder("resnet10", 8), PretrainConfig(method="polycl-s", encoder="resnet10", width=8))
    old = {k.replace("projection.0.", "projection."): v + 1 for k, v in method.state_dict().items() if v.is_floating_point()}
    old.update({k: v for k, v in method.state_dict().items() if not v.is_floating_point()})
    assert "projection.weight" in old
    method.load_state_dict(old)  # strict
    assert torch.equal(method.projection[0].weight, old["projection.weight"])
