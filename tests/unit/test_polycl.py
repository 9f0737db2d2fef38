"""PolyCL-O / PolyCL-S: Eq. 1 by hand, pair selection, and a tiny pretraining run of each."""

import math

import numpy as np
import pytest
import torch

from contourcl.models.encoder_checkpoint import load_encoder
from contourcl.models.networks import NetConfig, ResNetEncoder, build_network
from contourcl.training.pretrain.base import ConfigError, PretrainConfig
from contourcl.training.pretrain.polycl import (
    OrganSampler,
    PolyCLTripletDataset,
    ScanSampler,
    middle_slices,
    organ_presence,
    polycl_loss,
)
from contourcl.training.pretrain.trainer import pretrain
from contourcl.training.pretrain.volumes import SliceDataset, Volume

torch.set_num_threads(1)


# ------------------------------------------------------------------------------- the loss
def test_loss_matches_hand_value_with_paper_temperature():
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    z_pos = torch.tensor([[1.0, 1.0], [0.0, 2.0]])
    z_neg = torch.tensor([[-1.0, 0.0], [3.0, 0.0]])
    # M = 2 -> tau = 1/2. Anchor 0: cos+ = 1/sqrt(2), cos- = -1; anchor 1: cos+ = 1, cos- = 0.
    # -log(e^{a/tau} / (e^{a/tau} + e^{b/tau})) = log(1 + e^{(b - a)/tau})
    l0 = math.log(1 + math.exp((-1 - 1 / math.sqrt(2)) * 2))
    l1 = math.log(1 + math.exp((0 - 1) * 2))
    assert l1 == pytest.approx(0.126928, abs=1e-6)
    assert polycl_loss(z, z_pos, z_neg).item() == pytest.approx((l0 + l1) / 2, rel=1e-6)
    # a fixed temperature instead of 1/M
    l0 = math.log(1 + math.exp(-1 - 1 / math.sqrt(2)))
    l1 = math.log(1 + math.exp(-1))
    assert polycl_loss(z, z_pos, z_neg, temperature=1.0).item() == pytest.approx((l0 + l1) / 2, rel=1e-6)


def test_loss_is_log2_when_positive_and_negative_are_alike():
    z = torch.randn(5, 8)
    other = torch.randn(5, 8)
    assert polycl_loss(z, other, other).item() == pytest.approx(math.log(2), rel=1e-6)


# ------------------------------------------------------------------------------- pair selection
def draw_all(sampler, n: int, rng) -> tuple[np.ndarray, ...]:
    """The sampler's draw for each of ``n`` anchors (as :class:`PolyCLTripletDataset` makes them), one array per output."""
    return tuple(np.array([sampler(i, rng) for i in range(n)], dtype=np.int64).T)


def test_scan_based_pairs():
    scans = np.array([0, 0, 0, 1, 1, 2])
    rng = np.random.default_rng(0)
    for _ in range(20):
        pos, neg = draw_all(ScanSampler(scans), len(scans), rng)
        for i in range(5):
            assert pos[i] != i and scans[pos[i]] == scans[i]
            assert scans[neg[i]] != scans[i]
        assert pos[5] == -1 and neg[5] == -1  # a scan of one slice has no positive
    assert draw_all(ScanSampler(np.zeros(4, int)), 4, rng)[0].tolist() == [-1] * 4  # one scan: no negative


def test_organ_based_pairs():
    # organ 0 present in slices 0-2, organ 1 in slices 2-5
    presence = np.array([[1, 0], [1, 0], [1, 1], [0, 1], [0, 1], [0, 1]], dtype=bool)
    rng = np.random.default_rng(0)
    for organ in (0, 1):
        pos, neg, used = draw_all(OrganSampler(presence, organ), len(presence), rng)
        assert (used == organ).all()
        for i in range(6):
            assert pos[i] != i and presence[pos[i], organ] == presence[i, organ]
            assert presence[neg[i], organ] != presence[i, organ]
    seen = set()
    for _ in range(30):
        pos, neg, used = draw_all(OrganSampler(presence), len(presence), rng)
        for i in range(6):
            k = used[i]
            seen.add(int(k))
            assert presence[pos[i], k] == presence[i, k] and presence[neg[i], k] != presence[i, k]
    assert seen == {0, 1}  # a random organ per anchor
    # an organ present everywhere gives no negative
    assert OrganSampler(np.ones((3, 1), bool))(0, rng) == (-1, -1, -1)


def test_middle_slices_and_presence():
    index = np.array([(0, z) for z in range(10)] + [(1, z) for z in range(4)])
    keep = middle_slices(index, [10, 4], 0.3)
    assert index[keep].tolist() == [[0, 3], [0, 4], [0, 5], [1, 1], [1, 2]]
    assert middle_slices(index, [10, 4], 1.0).all()
    with pytest.raises(ConfigError):
        middle_slices(index, [10, 4], 0.0)
    lab = np.zeros((4, 4, 3), np.uint8)
    lab[0, 0, 0] = 3
    lab[1, 1, 2] = 5
    assert organ_presence(lab, [0, 1, 2], [3, 5]).tolist() == [[True, False], [False, False], [False, True]]


def _volumes(n: int, slices: int = 6, size: int = 32) -> list[Volume]:
    rng = np.random.default_rng(0)
    return [
        Volume(f"v{i}", rng.random((size, size, slices)).astype(np.float32), np.ones((size, size, slices), bool))
        for i in range(n)
    ]


def test_triplet_dataset_fixed_and_resampled():
    slices = SliceDataset(_volumes(2), image_size=32)
    scans = slices.index[:, 0]
    ds = PolyCLTripletDataset(slices, ScanSampler(scans), seed=0)
    assert len(ds) == 12
    a = ds[3]
    b = ds[3]
    assert set(a) == {"anchor", "positive", "negative"} and a["anchor"].shape == (1, 32, 32)
    assert all(torch.equal(a[k], b[k]) for k in a)  # chosen once (the paper's protocol)
    i, p, n = ds.anchors[3], *ds.pairs[3]
    assert scans[p] == scans[i] and p != i and scans[n] != scans[i]
    ds_r = PolyCLTripletDataset(slices, ScanSampler(scans), seed=0, resample=True)
    torch.manual_seed(0)
    draws = {tuple(ds_r[0]["positive"].flatten()[:4].tolist()) for _ in range(10)}
    assert len(draws) > 1


# ------------------------------------------------------------------------------- tiny runs


def tiny_config(tmp_path, data, method, **kw) -> PretrainConfig:
    return PretrainConfig(
        method=method, images=[str(data)], out=str(tmp_path / f"{method}.pt"), encoder="resnet10", width=8,
        spacing=(4.0, 4.0), image_size=64, batch_size=8, iterations=30, lr=1e-3, num_workers=0, device="cpu",
        cache_dir=str(tmp_path / "cache"), progress=False, checkpoint_every=0, log_every=1000, amp=False, seed=0, **kw,
    )


@pytest.mark.parametrize("method", ["polycl-s", "polycl-o"])
def test_tiny_pretraining_lowers_the_loss_and_loads_into_the_app_network(tmp_path, phantoms, method, monkeypatch):
    from contourcl.training.pretrain import trainer

    built = []
    real = trainer.build_scheduler
    monkeypatch.setattr(trainer, "build_scheduler", lambda *a, **k: built.append(real(*a, **k)) or built[-1])
    cfg = tiny_config(tmp_path, phantoms, method, options={"slice_fraction": 1.0})
    result = pretrain(cfg)
    # the run used the paper's warm restarts: 10 cycles of 3 of its 30 steps
    assert [type(s).__name__ for s in built] == ["CosineAnnealingWarmRestarts"] and built[0].T_0 == 3
    losses = [v for _, v in result["history"]["main"]]
    assert len(losses) == 30
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])

    net = build_network(NetConfig(out_channels=8, encoder="resnet10", width=8))
    before = {k: v.clone() for k, v in net.encoder.state_dict().items()}
    meta = load_encoder(net, cfg.out)
    assert meta["method"] == method
    ckpt = torch.load(cfg.out, map_location="cpu", weights_only=False)
    after = net.encoder.state_dict()
    assert all(torch.equal(after[k], ckpt["encoder"][k]) for k in after)
    assert not torch.equal(after["resnet.conv1.weight"], before["resnet.conv1.weight"])
    # changed from the random initialisation the run started from (seed 0: its first draw)
    torch.manual_seed(cfg.seed)
    init = ResNetEncoder("resnet10", 8, 1).state_dict()
    for key in ("resnet.conv1.weight", "resnet.layer4.0.conv2.weight"):
        assert (after[key] - init[key]).abs().max() > 1e-3
    assert after["resnet.bn1.num_batches_tracked"] > 0


def test_polycl_o_needs_labels_and_polycl_s_two_scans(tmp_path, phantoms):
    empty = tmp_path / "no-labels"
    empty.mkdir()
    with pytest.raises(ConfigError):
        pretrain(tiny_config(tmp_path, phantoms, "polycl-o", options={"labels": str(empty)}))
    with pytest.raises(ConfigError):
        pretrain(tiny_config(tmp_path, phantoms, "polycl-s", max_cases=1))


def test_middle_slices_are_those_of_the_whole_scan_not_of_the_body_slices():
    """Docstring and code agree (issue 9): the middle 30 % of ALL slices, then body slices only.

    A 20-slice scan whose body slices are 5..14: the middle 30 % of all 20 is 20 * 0.35 = 7 <= z + 0.5
    < 13, i.e. z = 7..12 (6 slices); the middle 30 % of the 10 body slices would be z = 8..10.
    """
    body_rows = np.array([(0, z) for z in range(5, 15)])
    keep = middle_slices(body_rows, [20], 0.3)
    assert body_rows[keep][:, 1].tolist() == [7, 8, 9, 10, 11, 12]


def test_polycl_anneals_with_warm_restarts_every_tenth_of_the_run():
    """The paper: "cosine-annealing learn rate scheduler with warm restarts after every 10 epochs"
    (of 100): ten cycles; torch's CosineAnnealingWarmRestarts, the rate back at its base each restart."""
    from contourcl.training.pretrain.polycl import PolyCLOrgan, PolyCLScan
    from contourcl.training.pretrain.trainer import build_scheduler

    assert PolyCLScan.default_schedule == PolyCLOrgan.default_schedule == "cosine-restarts"
    assert PolyCLScan.restart_cycles == 10
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1e-4)
    sched = build_scheduler(opt, 300, 0, "cosine-restarts", 10)
    assert isinstance(sched, torch.optim.lr_scheduler.CosineAnnealingWarmRestarts) and sched.T_0 == 30
    rates = []
    for _ in range(300):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert rates[0] == rates[30] == rates[270] == pytest.approx(1e-4)  # a restart every 30 steps
    assert rates[15] == pytest.approx(0.5e-4) and rates[29] < 0.01e-4  # half way down, then near 0
    assert sum(r == pytest.approx(1e-4) for r in rates) == 10
