import pytest
import torch

from contourcl.models.encoder_checkpoint import load_encoder, save_encoder
from contourcl.models.networks import NetConfig, ResNetEncoder, build_network


@pytest.mark.parametrize("encoder,width", [("resnet10", 8), ("resnet18", 8), ("resnet50", 8)])
def test_unet_output_matches_input_size(encoder, width):
    net = build_network(NetConfig(out_channels=8, encoder=encoder, width=width)).eval()
    with torch.no_grad():
        out = net(torch.zeros(2, 1, 64, 96))
    assert out.shape == (2, 8, 64, 96)


def test_encoder_feature_pyramid_and_pooled_vector():
    enc = ResNetEncoder("resnet50", width=8)
    feats = enc(torch.zeros(1, 1, 64, 64))
    assert [f.shape[-1] for f in feats] == [32, 16, 8, 4, 2]
    assert [f.shape[1] for f in feats] == list(enc.out_channels)
    assert enc.feature_dim == 8 * 8 * 4  # bottleneck expansion, as ResNet-50's 2048 at width 64
    assert enc.pooled(torch.zeros(3, 1, 64, 64)).shape == (3, enc.feature_dim)


def test_pretrained_encoder_round_trip(tmp_path):
    enc = ResNetEncoder("resnet10", width=8)
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(1.0)
    save_encoder(enc, tmp_path / "enc.pt", method="test")
    net = build_network(NetConfig(out_channels=3, encoder="resnet10", width=8))
    assert load_encoder(net, tmp_path / "enc.pt") == {"method": "test"}
    for (k, a), b in zip(enc.state_dict().items(), net.encoder.state_dict().values(), strict=False):
        assert torch.equal(a, b), k


def test_encoder_mismatch_is_named(tmp_path):
    save_encoder(ResNetEncoder("resnet10", width=8), tmp_path / "enc.pt")
    net = build_network(NetConfig(out_channels=3, encoder="resnet18", width=8))
    with pytest.raises(ValueError, match="resnet10.*resnet18"):
        load_encoder(net, tmp_path / "enc.pt")
