"""A tiny AGCL pretraining run on phantoms (about 15 s on 2 cores). The rest of AGCL in-process:
``tests/unit/test_agcl.py``.
"""

import numpy as np
import torch

from contourcl.models.encoder_checkpoint import load_encoder
from contourcl.models.networks import NetConfig, ResNetEncoder, build_network
from contourcl.training.finetune.agcl_segmenter import AGCLSegmenter
from contourcl.training.pretrain.agcl import (
    to_single_channel,
    two_channel_path,
)
from contourcl.training.pretrain.base import PretrainConfig
from contourcl.training.pretrain.trainer import pretrain

torch.set_num_threads(1)


def tiny_config(tmp_path, data, **kw) -> PretrainConfig:
    return PretrainConfig(
        method="agcl", images=[str(data)], out=str(tmp_path / "agcl.pt"), encoder="resnet10", width=8,
        spacing=(4.0, 4.0), image_size=64, batch_size=8, iterations=40, lr=3e-3, num_workers=0, device="cpu",
        cache_dir=str(tmp_path / "cache"), progress=False, checkpoint_every=0, log_every=1000, amp=False, seed=0, **kw,
    )


def test_tiny_agcl_pretraining(tmp_path, phantoms):
    # 100 steps: with the small stem (the default) 40 steps of batch 8 are within the noise
    cfg = tiny_config(tmp_path, phantoms, options={"modalities": {"case0": "GE"}})
    cfg.iterations = 100
    result = pretrain(cfg)
    losses = [v for _, v in result["history"]["main"]]
    assert len(losses) == 100
    assert np.mean(losses[-16:]) < 0.9 * np.mean(losses[:16])

    # --out is the 1-channel encoder that the app's U-Net loads; AGCL's small stem (3x3 stride 1,
    # no max-pool) is not the U-Net's (7x7 stride 2 + max-pool): all but the stem is transferred
    net = build_network(NetConfig(out_channels=8, encoder="resnet10", width=8))
    before = {k: v.detach().clone() for k, v in net.encoder.state_dict().items()}
    meta = load_encoder(net, cfg.out)
    assert meta["method"] == "agcl" and meta["modalities"] == ["GE", "unknown"] and meta["stem"] == "small"
    assert sorted(meta["not_transferred"]) == sorted(k for k in before if k.startswith(("resnet.conv1.", "resnet.bn1.")))
    after = net.encoder.state_dict()
    for k in before:
        if k.startswith(("resnet.conv1.", "resnet.bn1.")):
            assert torch.equal(after[k], before[k])  # the U-Net's stem keeps its initialisation
    saved = torch.load(cfg.out, weights_only=True)
    assert saved["encoder_config"]["stem"] == "small" and saved["encoder"]["resnet.conv1.weight"].shape[-2:] == (3, 3)
    # changed from the random initialisation of AGCL's 2-channel small-stem encoder
    torch.manual_seed(cfg.seed)
    ResNetEncoder("resnet10", 8, 1)
    init = to_single_channel(ResNetEncoder("resnet10", 8, 2, "small")).state_dict()
    for key in ("resnet.layer1.0.conv1.weight", "resnet.layer4.0.conv2.weight"):
        assert torch.equal(after[key], saved["encoder"][key])
        assert (after[key] - init[key]).abs().max() > 1e-3
    assert after["resnet.layer1.0.bn1.num_batches_tracked"] > 0

    # the 2-channel encoder (small stem) is kept for the ASPP variant
    two = two_channel_path(cfg.out)
    seg = AGCLSegmenter.from_checkpoint(two, n_targets=7, channels=8)
    assert seg.encoder.config.stem == "small"
    assert torch.equal(seg.encoder.resnet.conv1.weight[:, :1], saved["encoder"]["resnet.conv1.weight"])
    assert seg(torch.rand(1, 1, 64, 64), torch.zeros(1, 64, 64, dtype=torch.long)).shape == (1, 7, 2, 64, 64)
