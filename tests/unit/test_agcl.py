"""AGCL: patches, paired augmentation, 2 -> 1 channel conversion, ASPP variant, label fusion, a tiny run."""

import numpy as np
import pytest
import torch

from contourcl.data import labels as label_names
from contourcl.models.encoder_checkpoint import load_encoder, save_encoder
from contourcl.models.networks import NetConfig, ResNetEncoder, build_network
from contourcl.training.finetune.agcl_segmenter import AGCLSegmenter, fuse_labels
from contourcl.training.pretrain.agcl import (
    AGCLPatchDataset,
    PairedAugment,
    extract_patch,
    find_label_file,
    load_coarse_labels,
    to_single_channel,
    two_channel_path,
)
from contourcl.training.pretrain.base import ConfigError, PretrainConfig
from contourcl.training.pretrain.volumes import Volume

torch.set_num_threads(1)


# ------------------------------------------------------------------------------- patches
def test_patch_is_centred_on_the_target_and_zero_padded():
    image = torch.arange(100, dtype=torch.float32).reshape(10, 10) + 1
    mask = torch.zeros(10, 10, dtype=torch.bool)
    mask[4:6, 2:4] = True  # bounding-box centre (5, 3)
    patch = extract_patch(image, mask, 4)
    assert patch.shape == (2, 4, 4)
    assert torch.equal(patch[0], image[3:7, 1:5])
    assert torch.equal(patch[1], mask[3:7, 1:5].float())
    corner = torch.zeros(10, 10, dtype=torch.bool)
    corner[0, 0] = True  # centre (0, 0) -> rows/cols -2..1: two rows and columns of padding
    p = extract_patch(image, corner, 4)
    assert (p[:, :2, :] == 0).all() and (p[:, :, :2] == 0).all()
    assert torch.equal(p[0, 2:, 2:], image[:2, :2])
    assert p[1].sum() == 1 and p[1, 2, 2] == 1
    with pytest.raises(ValueError):
        extract_patch(image, torch.zeros(10, 10, dtype=torch.bool), 4)


def test_paired_augmentation_keeps_the_mask_on_the_image():
    mask = torch.zeros(32, 32)
    mask[6:26, 8:14] = 1  # an L shape: misalignment of any rotation or crop would show
    mask[20:26, 8:28] = 1
    patch = torch.stack([mask.clone(), mask])  # the image is the mask itself
    aug = PairedAugment(32)
    changed = 0
    for seed in range(8):
        aug.set_random_state(seed)
        out = aug(patch)
        assert out.shape == (2, 32, 32)
        assert set(out[1].unique().tolist()) <= {0.0, 1.0}  # the mask stays binary
        img, msk = out[0] > 0.5, out[1] > 0.5
        iou = (img & msk).sum() / (img | msk).sum()
        assert iou > 0.9, f"seed {seed}: image and mask disagree (IoU {iou:.2f})"
        changed += int(not torch.equal(msk, mask > 0.5))
        # control: image and mask augmented with different draws would not overlap like this
        aug.set_random_state(seed + 100)
        other = aug(patch)[1] > 0.5
        assert (img & other).sum() / (img | other).sum() < 0.8
    assert changed == 8  # every draw really transforms the patch


def test_patch_dataset_labels_are_modality_times_targets_plus_target():
    rng = np.random.default_rng(0)
    vols, labs = [], []
    for i in range(3):
        vols.append(Volume(f"case{i}", rng.random((40, 40, 3)).astype(np.float32), np.ones((40, 40, 3), bool)))
        lab = np.zeros((40, 40, 3), np.uint8)
        lab[5:10, 5:10, 0] = label_names.STORED_LABELS["Brainstem"]
        lab[20:30, 20:25, 1] = label_names.STORED_LABELS["Parotid_L"]
        lab[0:1, 0:2, 2] = label_names.STORED_LABELS["Mandible"]  # 2 pixels: below min_pixels
        labs.append(lab)
    labs[2] = None  # no coarse segmentation: skipped
    ds = AGCLPatchDataset(vols, labs, label_names.OAR_NAMES, {"case0": "GE", "case1": "Siemens"}, size=32, min_pixels=4)
    assert ds.modality_names == ["GE", "Siemens"]
    assert ds.index.tolist() == [[0, 0, 0], [0, 1, 3], [1, 0, 0], [1, 1, 3]]
    item = ds[3]
    assert item["views"].shape == (2, 2, 32, 32)
    assert item["label"].item() == 1 * 7 + 3  # modality Siemens (1), target Parotid_L (index 3)
    assert ds[0]["label"].item() == 0
    single = AGCLPatchDataset(vols, labs, label_names.OAR_NAMES, None, size=32)
    assert single.modality_names == ["unknown"] and single[3]["label"].item() == 3
    with pytest.raises(ConfigError):
        AGCLPatchDataset(vols, [None, None, None], label_names.OAR_NAMES)


# ------------------------------------------------------------------------------- channels
def test_single_channel_conversion_equals_a_zero_mask():
    torch.manual_seed(0)
    enc2 = ResNetEncoder("resnet10", 8, 2).eval()
    enc1 = to_single_channel(enc2).eval()
    assert enc1.config.in_channels == 1
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        for a, b in zip(enc2(torch.cat([x, torch.zeros_like(x)], 1)), enc1(x), strict=False):
            assert torch.allclose(a, b, atol=1e-6)


def test_single_channel_checkpoint_loads_into_the_app_network(tmp_path):
    torch.manual_seed(0)
    enc2 = ResNetEncoder("resnet10", 8, 2)
    save_encoder(enc2, tmp_path / "agcl.2ch.pt", method="agcl")
    net = build_network(NetConfig(out_channels=8, encoder="resnet10", width=8))
    with pytest.raises(ValueError):
        load_encoder(net, tmp_path / "agcl.2ch.pt")  # 2 channels: refused as is
    save_encoder(to_single_channel(enc2), tmp_path / "agcl.pt", method="agcl")  # what AGCL's run writes at --out
    meta = load_encoder(net, tmp_path / "agcl.pt")
    assert meta["method"] == "agcl"
    assert torch.equal(net.encoder.resnet.conv1.weight, enc2.resnet.conv1.weight[:, :1])
    assert torch.equal(net.encoder.resnet.layer4[0].conv2.weight, enc2.resnet.layer4[0].conv2.weight)
    assert two_channel_path("runs/agcl.pt").as_posix() == "runs/agcl.2ch.pt"


# ------------------------------------------------------------------------------- ASPP variant
def test_label_fusion_by_hand():
    fg = torch.tensor(
        [[[[0.9, 0.2], [0.3, 0.1]],  # target 1
          [[0.6, 0.7], [0.4, 0.2]],  # target 2
          [[0.1, 0.8], [0.45, 0.55]]]]  # target 3
    )
    # (0,0): 0.9 -> 1; (0,1): 0.8 -> 3; (1,0): all < 0.5 -> background; (1,1): 0.55 -> 3
    assert fuse_labels(fg).tolist() == [[[1, 3], [0, 3]]]
    assert fuse_labels(fg, threshold=0.85).tolist() == [[[1, 0], [0, 0]]]


def test_segmenter_keeps_the_encoder_frozen():
    torch.manual_seed(0)
    enc = ResNetEncoder("resnet10", 8, 2)
    seg = AGCLSegmenter(enc, n_targets=3, channels=16).train()
    assert not seg.encoder.training  # batch-norm statistics stay those of pretraining
    frozen = {k: v.clone() for k, v in enc.state_dict().items()}
    image = torch.rand(2, 1, 64, 64)
    coarse = torch.zeros(2, 64, 64, dtype=torch.long)
    coarse[:, 10:20, 10:20] = 1
    coarse[:, 30:40, 30:50] = 3
    logits = seg(image, coarse)
    assert logits.shape == (2, 3, 2, 64, 64)
    targets = (coarse[:, None] == torch.arange(1, 4)[None, :, None, None]).long()  # (B, T, H, W): each binary model's truth
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(0, 1))
    loss.backward()
    assert all(p.grad is None for p in seg.encoder.parameters())
    assert all(h.classifier.weight.grad is not None for h in seg.heads)
    opt = torch.optim.Adam([p for p in seg.parameters() if p.requires_grad], lr=1e-2)
    opt.step()
    assert all(torch.equal(v, enc.state_dict()[k]) for k, v in frozen.items())
    pred = fuse_labels(seg.eval().attended_probabilities(image, coarse, 32), 0.5)
    assert pred.shape == (2, 64, 64) and int(pred.min()) >= 0 and int(pred.max()) <= 3
    plain = AGCLSegmenter(enc, n_targets=1, channels=8, low_level=False)
    assert plain(image, coarse).shape == (2, 1, 2, 64, 64)
    with pytest.raises(ValueError):
        AGCLSegmenter(ResNetEncoder("resnet10", 8, 1), n_targets=1)


# ------------------------------------------------------------------------------- tiny run


def tiny_config(tmp_path, data, **kw) -> PretrainConfig:
    return PretrainConfig(
        method="agcl", images=[str(data)], out=str(tmp_path / "agcl.pt"), encoder="resnet10", width=8,
        spacing=(4.0, 4.0), image_size=64, batch_size=8, iterations=40, lr=3e-3, num_workers=0, device="cpu",
        cache_dir=str(tmp_path / "cache"), progress=False, checkpoint_every=0, log_every=1000, amp=False, seed=0, **kw,
    )


def test_labels_are_found_in_the_monai_label_layout(phantoms, tmp_path):
    image = phantoms / "case0.nii.gz"
    assert find_label_file(image) == phantoms / "labels" / "final" / "case0.nii.gz"
    assert find_label_file(image, phantoms / "labels" / "final") == phantoms / "labels" / "final" / "case0.nii.gz"
    assert find_label_file(image, tmp_path) is None


def test_coarse_labels_from_an_oar_model(phantoms, tmp_path):
    from contourcl.models.checkpoint import ModelMeta, save_model
    from contourcl.training.pretrain.volumes import load_volume

    torch.manual_seed(0)
    net_cfg = NetConfig(out_channels=8, encoder="resnet10", width=8)
    model = tmp_path / "oar.pt"
    save_model(model, build_network(net_cfg), ModelMeta("oar", label_names.model_labels("oar"), net_cfg.to_dict(), roi=(64, 64)))
    vol = load_volume(phantoms / "case0.nii.gz", (4.0, 4.0))
    cfg = tiny_config(tmp_path, phantoms)
    (lab,) = load_coarse_labels([vol], cfg, {"coarse_model": str(model)})
    assert lab.shape == vol.image.shape
    assert set(np.unique(lab).tolist()) <= set(range(8))  # stored numbering of the OARs
    (from_file,) = load_coarse_labels([vol], cfg, {})
    assert from_file.shape == vol.image.shape and from_file.max() > 0


def test_small_stem_layer4_map_and_transfer(tmp_path):
    """Issue 9: on 32 px patches the ImageNet stem (7x7 stride 2 + max-pool) leaves 32 / 32 = 1 px
    at layer 4; the small stem (3x3 stride 1, no max-pool) 32 / 8 = 4 px. A small-stem checkpoint
    loads into the U-Net with all but the stem; another width is still refused."""
    x = torch.zeros(1, 2, 32, 32)
    with torch.no_grad():
        assert ResNetEncoder("resnet10", 8, 2).eval()(x)[-1].shape[-2:] == (1, 1)
        small = ResNetEncoder("resnet10", 8, 2, "small").eval()
        assert [tuple(f.shape[-2:]) for f in small(x)] == [(32, 32), (32, 32), (16, 16), (8, 8), (4, 4)]
    assert small.resnet.conv1.kernel_size == (3, 3) and small.resnet.conv1.stride == (1, 1)
    torch.manual_seed(0)
    enc = to_single_channel(small)
    save_encoder(enc, tmp_path / "small.pt", method="agcl")
    net = build_network(NetConfig(out_channels=8, encoder="resnet10", width=8))
    stem_before = net.encoder.resnet.conv1.weight.detach().clone()
    meta = load_encoder(net, tmp_path / "small.pt")
    assert "resnet.conv1.weight" in meta["not_transferred"]
    assert torch.equal(net.encoder.resnet.conv1.weight, stem_before) and net.encoder.resnet.conv1.kernel_size == (7, 7)
    assert torch.equal(net.encoder.resnet.layer3[0].conv1.weight, enc.resnet.layer3[0].conv1.weight)
    save_encoder(to_single_channel(ResNetEncoder("resnet10", 16, 2, "small")), tmp_path / "wide.pt")
    with pytest.raises(ValueError):
        load_encoder(net, tmp_path / "wide.pt")


def test_agcl_heads_fine_tune_and_fuse_on_phantoms(phantoms, tmp_path):
    """The fine-tuning variant end to end: frozen 2-channel encoder, per-target ASPP heads, fusion."""
    from contourcl.data.datasets import labeled_cases
    from contourcl.data.labels import model_labels
    from contourcl.models.checkpoint import ModelMeta, save_model
    from contourcl.models.encoder_checkpoint import save_encoder
    from contourcl.models.networks import NetConfig, build_network
    from contourcl.training.finetune.agcl_segmenter import finetune_agcl, perturbed_coarse
    from contourcl.training.finetune.engine import FinetuneConfig

    enc = ResNetEncoder("resnet10", 8, 2)
    save_encoder(enc, tmp_path / "agcl.2ch.pt")
    coarse = build_network(NetConfig(out_channels=8, encoder="resnet10", width=8))
    save_model(tmp_path / "oar.pt", coarse, ModelMeta(model="oar", labels=model_labels("oar"), net=coarse.config.to_dict()))
    cases = labeled_cases(phantoms, "oar")
    cfg = FinetuneConfig(model="oar", roi=(64, 64), max_epochs=3, batch_size=8, samples_per_volume=8, lr=1e-2)
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    result = finetune_agcl(cases[:2], cases[2:], tmp_path / "agcl.2ch.pt", tmp_path / "oar.pt", cfg, progress=False)
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    for k, v in result.segmenter.encoder.state_dict().items():
        assert torch.equal(v, before[k]), f"encoder weight {k} changed: it must stay frozen"
    # a figure for every structure the validation case contours, none for the others (an empty
    # result, no validation, must fail)
    from contourcl.data.volumes import read_nifti

    contoured = {name for name, value in model_labels("oar").items()
                 if any((read_nifti(c["label"])[0] == value).any() for c in cases[2:])}
    assert contoured and set(result.val_dice) == contoured, f"validation figures {result.val_dice} for {sorted(contoured)}"
    assert all(0 <= d <= 1 for d in result.val_dice.values())
    # the coarse masks it trains on are the references made imperfect: grown, shrunk and shifted by
    # up to 2 voxels (always grown by 2, the heads learned to shrink every mask by 2)
    lab = torch.zeros(1, 1, 40, 40)
    lab[0, 0, 10:30, 12:28] = 2
    lab[0, 0, 2:5, 2:5] = 5  # a small one: drawn last, never emptied
    sizes, moved = set(), 0
    for seed in range(20):
        coarse = perturbed_coarse(lab, np.random.default_rng(seed))
        big = coarse[0] == 2
        sizes.add(int(big.sum()))
        rows = torch.nonzero(big.any(dim=1)).flatten()
        moved += (int(rows[0]) + int(rows[-1])) // 2 != 19  # the reference's rows 10-29: centre 19
        assert (coarse[0] == 5).any()
    assert min(sizes) < 320 < max(sizes), f"grown and shrunk: {sorted(sizes)}"
    assert moved > 0


def test_stage3_served_as_one_network_gives_the_fusion_rule():
    """AGCL's stage 3 through the served path: the argmax of the softmax the served path takes of
    AGCLStage3's output is fuse_labels' map (background where every target is below 0.5), the
    coarse model's argmax is the mask each head sees, and a coarse model of another numbering is refused."""
    from contourcl.training.finetune.agcl_segmenter import AGCLStage3

    torch.manual_seed(0)
    segmenter = AGCLSegmenter(ResNetEncoder("resnet10", 8, 2), n_targets=3).eval()
    coarse = build_network(NetConfig(out_channels=4, encoder="resnet10", width=8)).eval()
    seen = []
    probs = torch.tensor([[0.2, 0.4, 0.1], [0.6, 0.9, 0.1], [0.3, 0.2, 0.55], [0.5, 0.1, 0.1], [0.49, 0.49, 0.49]])
    fixed = probs[torch.arange(32) % 5].t().reshape(1, 3, 1, 32).expand(2, 3, 32, 32)  # (B, T, H, W): the five cases along W

    def heads(image, mask, size):
        seen.append(mask)
        return fixed

    segmenter.attended_probabilities = heads
    stage3 = AGCLStage3(segmenter, coarse, 32)
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        out = torch.softmax(stage3(x), dim=1).argmax(dim=1)
        expected_coarse = coarse(x).argmax(dim=1)
    assert torch.equal(out, fuse_labels(fixed))
    assert out[0, 0, :5].tolist() == [0, 2, 3, 1, 0]
    assert torch.equal(seen[0], expected_coarse)
    assert stage3.config.in_channels == 1 and stage3.config.out_channels == 4
    with pytest.raises(ValueError, match="structures"):
        AGCLStage3(segmenter, build_network(NetConfig(out_channels=8, encoder="resnet10", width=8)), 32)


def test_each_head_answers_on_a_patch_centred_on_its_coarse_mask_only():
    """The paper's attention: a target is answered on the patch centred on its coarse mask, and
    nowhere on a slice whose coarse mask lacks it (trained heads mark foreground far from it)."""
    torch.manual_seed(0)
    segmenter = AGCLSegmenter(ResNetEncoder("resnet10", 8, 2), n_targets=3).eval()
    image = torch.rand(2, 1, 96, 128)
    coarse = torch.zeros(2, 96, 128, dtype=torch.long)
    coarse[0, 40:50, 60:70] = 2  # target 2 on slice 0 only; its box's centre (45, 65)
    coarse[1, 2:6, 2:6] = 3  # target 3 at slice 1's corner: its patch runs past the edge
    out = segmenter.attended_probabilities(image, coarse, 32)
    assert not out[:, 0].any(), "target 1 has no coarse mask: nothing"
    assert not out[1, 1].any() and not out[0, 2].any(), "no target where its slice's coarse mask lacks it"
    x = torch.cat([image[:1], (coarse[:1] == 2).float()[:, None]], dim=1)[..., 29:61, 49:81]
    with torch.no_grad():
        expected = torch.softmax(segmenter.heads[1](segmenter.encoder(x), (32, 32)), dim=1)[0, 1]
    assert torch.allclose(out[0, 1, 29:61, 49:81], expected, atol=1e-6)
    outside = torch.ones(96, 128, dtype=torch.bool)
    outside[29:61, 49:81] = False
    assert not out[0, 1][outside].any(), "nothing outside the patch"
    assert out[1, 2, :20, :20].gt(0).all() and not out[1, 2, 20:].any() and not out[1, 2, :, 20:].any(), "the corner patch, clipped"


# ------------------------------------------------------------------------------- single structure (issue 9)
def test_supcon_on_an_all_positive_batch_is_minimised_by_collapse():
    """The degenerate optimum the code must not allow, by hand: all labels equal, all z equal.

    Each anchor's M - 1 logits are all 1/T, each positive's probability 1/(M - 1): the loss is
    M * log(M - 1) (265.16 for M = 64), below that of random embeddings.
    """
    from contourcl.training.pretrain.supcon import supcon_loss

    m = 64
    labels = torch.zeros(m, dtype=torch.long)
    collapsed = supcon_loss(torch.ones(m, 16), labels, temperature=0.1)
    assert collapsed.item() == pytest.approx(m * np.log(m - 1), rel=1e-5)
    assert m * np.log(m - 1) == pytest.approx(265.16, abs=0.01)
    torch.manual_seed(0)
    z = torch.nn.functional.normalize(torch.randn(m, 16), dim=1)
    # the same loss written out independently: -1/(M-1) sum_l log(exp(s_kl/T) / sum_{j!=k} exp(s_kj/T))
    s = (z @ z.t() / 0.1).double()
    total = 0.0
    for k in range(m):
        others = [j for j in range(m) if j != k]
        denom = torch.logsumexp(s[k, others], 0)
        total += float(-(s[k, others] - denom).mean())
    assert supcon_loss(z, labels, temperature=0.1).item() == pytest.approx(total, rel=1e-4)
    assert total > m * np.log(m - 1)  # random embeddings lose more: collapse is the optimum


def _single_target_data():
    rng = np.random.default_rng(0)
    vols, labs = [], []
    for i in range(2):
        vols.append(Volume(f"case{i}", rng.random((40, 40, 3)).astype(np.float32), np.ones((40, 40, 3), bool)))
        lab = np.zeros((40, 40, 3), np.uint8)
        lab[5:12, 5:12, :] = label_names.STORED_LABELS["GTV"]
        labs.append(lab)
    return vols, labs


def test_a_single_class_dataset_is_refused():
    vols, labs = _single_target_data()
    with pytest.raises(ConfigError, match="one class"):
        AGCLPatchDataset(vols, labs, ["GTV"], None, size=32)
    # with the OARs as negatives but no OAR in the coarse masks: still one class, still refused
    with pytest.raises(ConfigError, match="negative"):
        AGCLPatchDataset(vols, labs, ["GTV", "Brainstem", "Parotid_L"], None, size=32)
    # an OAR in the coarse masks gives the GTV its negatives
    labs[0][20:30, 20:30, 1] = label_names.STORED_LABELS["Parotid_L"]
    ds = AGCLPatchDataset(vols, labs, ["GTV", "Brainstem", "Parotid_L"], None, size=32)
    assert sorted({ds[i]["label"].item() for i in range(len(ds))}) == [0, 2]  # GTV (0) and Parotid_L (2)


def test_single_target_agcl_contrasts_against_the_oars_and_skips_one_class_batches(tmp_path):
    from contourcl.training.pretrain.agcl import AGCL

    cfg = PretrainConfig(method="agcl", encoder="resnet10", width=8, out=str(tmp_path / "a.pt"), device="cpu",
                         options={"targets": ["GTV"]})
    method = AGCL(ResNetEncoder("resnet10", 8, 1), cfg)
    assert method.class_names() == ["GTV", *label_names.OAR_NAMES]  # by default, the OARs are the negatives
    explicit = AGCL(ResNetEncoder("resnet10", 8, 1), PretrainConfig(
        method="agcl", encoder="resnet10", width=8, device="cpu", options={"targets": ["GTV"], "negatives": ["Mandible"]}))
    assert explicit.class_names() == ["GTV", "Mandible"]
    # a batch of one class: no gradient (no pull to collapse)
    batch = {"views": torch.rand(4, 2, 2, 32, 32), "label": torch.zeros(4, dtype=torch.long)}
    loss, logs = method.loss(batch)
    assert loss.item() == 0.0
    loss.backward()
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in method.parameters())
    # two classes: a real loss
    method.zero_grad()
    batch["label"] = torch.tensor([0, 1, 0, 1])
    loss, _ = method.loss(batch)
    assert loss.item() > 0
