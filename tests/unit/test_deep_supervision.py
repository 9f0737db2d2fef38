"""Deep supervision (training/finetune/deep_supervision.py): the auxiliary outputs, the loss
against a hand computation, and a trained model file that is the plain U-Net."""

import pytest
import torch
from test_finetune import cases, tiny_config

from contourcl.errors import ConfigError
from contourcl.models.checkpoint import load_model
from contourcl.models.networks import NetConfig, build_network
from contourcl.training.finetune.deep_supervision import DeepSupervisedNet, PartialLabelDeepSupervisionLoss
from contourcl.training.finetune.engine import finetune, save_finetuned
from contourcl.training.finetune.partial_label_loss import PartialLabelDiceCELoss


def test_outputs_are_the_network_s_own_then_halving_resolutions():
    torch.manual_seed(0)
    net = build_network(NetConfig(out_channels=4, encoder="resnet10", width=8)).eval()
    deep = DeepSupervisedNet(net, levels=2).eval()
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        outs = deep(x)
        assert torch.equal(outs[0], net(x)), "the full-resolution output is exactly the served network's"
    assert [tuple(o.shape) for o in outs] == [(2, 4, 64, 64), (2, 4, 32, 32), (2, 4, 16, 16)]
    with pytest.raises(ValueError, match="levels"):
        DeepSupervisedNet(net, levels=5)


def test_loss_is_the_weighted_sum_over_levels_with_the_label_subsampled():
    torch.manual_seed(0)
    outs = [torch.randn(2, 3, 8, 8), torch.randn(2, 3, 4, 4), torch.randn(2, 3, 2, 2)]
    target = torch.randint(0, 3, (2, 1, 8, 8))
    present = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    seg = PartialLabelDiceCELoss(lambda_ce=0.1)
    # by hand: nearest ("exact", pixel centres) subsampling by 2 and 4 keeps pixels 1, 3, 5, 7 and 2, 6
    expected = (seg(outs[0], target, present) + 0.5 * seg(outs[1], target[..., 1::2, 1::2], present)
                + 0.25 * seg(outs[2], target[..., 2::4, 2::4], present))
    got = PartialLabelDeepSupervisionLoss(seg, weight_mode="exp")(outs, target, present)
    assert float(got) == pytest.approx(float(expected), rel=1e-6)


def test_a_deeply_supervised_model_file_is_the_plain_u_net(tmp_path):
    data = cases(tmp_path, 2)
    cfg = tiny_config(max_epochs=2, deep_supervision=2)
    result = finetune(data[:1], data[1:], cfg, progress=False)
    assert all(h["loss"] > 0 for h in result.history)
    plain = build_network(cfg.net_config())
    assert result.network.state_dict().keys() == plain.state_dict().keys(), "the auxiliary heads are not kept"
    net, meta = load_model(save_finetuned(tmp_path / "oar.pt", cfg, result))
    assert meta.model == "oar"
    with pytest.raises(ConfigError, match="deep supervision"):
        finetune(data[:1], [], tiny_config(max_epochs=1, deep_supervision=1, voxel_siamese=True), progress=False)
