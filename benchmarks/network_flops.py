"""What a bigger encoder, a wider network or a finer in-plane spacing costs at inference.

Usage::

    python benchmarks/network_flops.py

Floating-point operations of one forward pass of the 2D U-Net on one axial slice (PyTorch's
``FlopCounterMode``: counted, not timed, so the figures do not depend on a busy machine) and the
number of weights, for the shipped network (ResNet-18 encoder, width 32, a 128-pixel slice at
4 mm: OpenKBP's 512 mm field of view, padded as inference pads it) and the alternatives of the recipe. Inference time of the
network part grows about in proportion; the shipped network's total time is in
``benchmarks/bench_serving.py``.
"""

from __future__ import annotations

import math

import torch
from torch.utils.flop_counter import FlopCounterMode

from contourcl.data.labels import model_labels
from contourcl.inference import whole_slice_roi
from contourcl.models.networks import NetConfig, build_network

FIELD_MM = 512.0  # the in-plane field of view the slice covers


def main() -> None:
    out_channels = len(model_labels("oar")) + 1
    variants = [
        ("shipped: resnet18, width 32, 4 mm", "resnet18", 32, 4.0),
        ("resnet34 encoder", "resnet34", 32, 4.0),
        ("width 48", "resnet18", 48, 4.0),
        ("3 mm in-plane", "resnet18", 32, 3.0),
    ]
    base = None
    print("| network | slice (px) | GFLOP per slice | relative | weights (M) |")
    print("|---|---|---|---|---|")
    for name, encoder, width, spacing in variants:
        net = build_network(NetConfig(out_channels=out_channels, encoder=encoder, width=width)).eval()
        n = math.ceil(FIELD_MM / spacing)
        px = whole_slice_roi((n, n))[0]  # as inference pads a slice (multiples of 32)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            net(torch.zeros(1, 1, px, px))
        flops = counter.get_total_flops() / 1e9
        base = base or flops
        weights = sum(p.numel() for p in net.parameters()) / 1e6
        print(f"| {name} | {px} | {flops:.2f} | {flops / base:.2f}x | {weights:.1f} |")


if __name__ == "__main__":
    main()
