"""The one builder of the projection and prediction heads of every contrastive method.

A head is a stack of fully connected layers, described by its widths and where batch norm goes,
as lightly's ``ProjectionHead(blocks=[(in, out, batch_norm, non_linearity), ...])``. Each method
states its paper's head in these terms: SimSiam/SepaReg (:mod:`~contourcl.training.pretrain.simsiam`),
SimCLR, AGCL, PolyCL, and the voxel heads of :mod:`contourcl.training.finetune.voxel_siamese`.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn


def mlp_head(dims: Sequence[int], batch_norm: bool = True, last_bn: bool = False) -> nn.Sequential:
    """Fully connected layers ``dims[0] -> dims[1] -> ... -> dims[-1]`` as one flat ``nn.Sequential``.

    Each hidden layer is ``Linear`` - ``BatchNorm1d`` (if ``batch_norm``) - ``ReLU``; the output
    layer is ``Linear`` - ``BatchNorm1d`` (if ``last_bn``), without ReLU. A ``Linear`` followed by
    batch norm has no bias (the norm's shift replaces it), as in SimSiam's and lightly's heads.

    ``mlp_head([d, h, o])`` is Linear-BN-ReLU-Linear; ``mlp_head([d, h, o], batch_norm=False)``
    is SimCLR's Linear-ReLU-Linear; ``mlp_head([d, o])`` a single Linear.
    """
    dims = [int(d) for d in dims]
    if len(dims) < 2:
        raise ValueError(f"a head needs an input and an output width, not {dims}")
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:], strict=False)):
        last = i == len(dims) - 2
        bn = last_bn if last else batch_norm
        layers.append(nn.Linear(d_in, d_out, bias=not bn))
        if bn:
            layers.append(nn.BatchNorm1d(d_out))
        if not last:
            layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)
