"""LMSRR's parts: ViT sources, MSIDF fusion, the ARO drift penalty and its switches, one training step."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cli.errors import ConfigError
from datamodules.base import TaskStream
from lightning_modules import LMSRR
from lightning_modules.classification.lmsrr import aro_loss
from lightning_modules.nn import MSIDF, HFViT, MultiSourceFusion

STREAM = TaskStream(task_names=("a", "b"), classes_per_task=(2, 2), input_shape=(3, 32, 32))
TINY = {"name": "hf_vit", "args": {"preset": "tiny", "trainable_blocks": 3}}


def _lmsrr(**kwargs) -> LMSRR:
    torch.manual_seed(0)
    m = LMSRR(stream=STREAM, buffer_size=4, minibatch_size=2, **kwargs)
    m.log = lambda *a, **k: None
    return m


def _batch(n: int = 4, task: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(task)
    return {
        "x": torch.randn(n, 3, 32, 32, generator=g),
        "y": torch.randint(2 * task, 2 * task + 2, (n,), generator=g),
        "task": torch.full((n,), task),
    }


@pytest.mark.parametrize("num_sources", [2, 3])
def test_fusion_shapes_for_two_and_three_sources(num_sources):
    fusion = MultiSourceFusion((3, 32, 32), sources=[TINY] * num_sources)
    x = torch.randn(5, 3, 32, 32)
    out = fusion.forward_levels(x, reference=fusion.trainable_blocks())
    assert out.fused.shape == (5, 32)
    assert len(out.levels) == len(out.reference_levels) == 3 * num_sources
    assert all(z.shape == (5, 17, 32) for z in out.levels)  # CLS + 16 patches of 8x8, width 32
    assert [conv.weight.shape for conv in fusion.fusion.branches] == [(1, num_sources, 3), (1, num_sources, 5)]
    # The reference run on the shared frozen prefix equals a full pass of the same blocks.
    assert all(torch.allclose(a, b) for a, b in zip(out.levels, out.reference_levels, strict=True))


def test_msidf_is_the_softmax_weighted_sum_of_its_conv_branches():
    torch.manual_seed(0)
    faithful, fixed = MSIDF(2, (3, 5), "faithful"), MSIDF(2, (3, 5), "normalized")
    assert faithful.weights.numel() == 3 and float(faithful.branch_weights().detach().sum()) == pytest.approx(2 / 3)
    assert fixed.weights.numel() == 2 and float(fixed.branch_weights().detach().sum()) == pytest.approx(1.0)
    z = torch.randn(4, 2, 10)
    with torch.no_grad():
        faithful.weights.copy_(torch.tensor([0.0, 1.0, 2.0]))
    pi = torch.tensor([0.0, 1.0, 2.0]).softmax(0)
    b1, b2 = faithful.branches
    expected = pi[0] * F.conv1d(z, b1.weight, b1.bias, padding=1) + pi[1] * F.conv1d(z, b2.weight, b2.bias, padding=2)
    assert torch.allclose(faithful(z), expected.squeeze(1), atol=1e-6)
    assert torch.all(b1.bias == 0.1)
    with pytest.raises(ConfigError, match="odd"):
        MSIDF(2, (4,))


def test_aro_loss_is_the_switch_weighted_mean_of_the_level_drifts():
    levels = [torch.ones(2, 3), torch.zeros(2, 3)]
    reference = [torch.zeros(2, 3), torch.full((2, 3), 2.0)]  # drifts 1 and 4
    switches = torch.tensor([0.25, 0.75], requires_grad=True)
    loss = aro_loss(levels, reference, switches)
    assert float(loss) == pytest.approx((0.25 * 1 + 0.75 * 4) / 1.0)
    loss.backward()
    # d/ds_k of sum(s d)/sum(s) = (d_k - L) / sum(s): the drift-heavier level's switch is pushed down.
    assert torch.allclose(switches.grad, torch.tensor([1 - 3.25, 4 - 3.25]))


def test_only_the_last_blocks_train_and_the_frozen_ones_stay_unchanged_after_a_step():
    m = _lmsrr()
    source = m.backbone.sources[0]
    frozen = {n: p.detach().clone() for n, p in source.vit.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in source.vit.named_parameters() if p.requires_grad}
    assert all(n.split(".")[1] in {"1", "2", "3"} for n in trainable)  # blocks 1..3 of 4
    assert any(".0." in n for n in frozen) and any("embeddings" in n for n in frozen) and "layernorm.weight" in frozen
    opt = torch.optim.SGD(m.trainable_parameters(), lr=0.5)
    m.on_task_start(1)
    m.training_step(_batch(task=1), 0).backward()
    opt.step()
    after = dict(source.vit.named_parameters())
    assert all(torch.equal(after[n], v) for n, v in frozen.items())
    assert any(not torch.equal(after[n], v) for n, v in trainable.items())
    assert all(not p.requires_grad for p in m.reference.parameters())


def test_drift_is_zero_at_task_start_and_the_switches_receive_gradients():
    m = _lmsrr(alpha=1.0, beta=0.0)
    m.training_step(_batch(task=0), 0)  # task 0: no drift term, the switches get an exact zero
    m.on_task_start(1)
    batch = _batch(task=1)
    out = m.backbone.forward_levels(batch["x"], reference=m.reference.module)
    drift = aro_loss(out.levels, out.reference_levels, m.switches())
    assert float(drift) == pytest.approx(0.0, abs=1e-12)
    # After the blocks move, the drift is positive and the switch logits get a non-zero gradient.
    with torch.no_grad():
        for p in m.backbone.trainable_blocks().parameters():
            p.add_(0.05 * torch.randn_like(p))
    m.zero_grad()
    m.training_step(batch, 0).backward()
    assert m.switch_logits.grad is not None and float(m.switch_logits.grad.abs().sum()) > 0
    assert m.switch_logits.shape == (6, 2)  # (backbone, level) pairs x two logits


def test_step_loss_is_ce_plus_alpha_aro_plus_beta_logit_mse():
    m = _lmsrr(alpha=0.5, beta=2.0)
    m.on_task_start(1)
    with torch.no_grad():
        for p in m.backbone.trainable_blocks().parameters():
            p.add_(0.05 * torch.randn_like(p))
    mx, mz = torch.rand(2, 3, 32, 32), torch.randn(2, 4)
    m.buffer.add(x=mx, y=torch.tensor([0, 1]), logits=mz, task=torch.zeros(2, dtype=torch.long))
    batch = _batch(task=1)
    torch.manual_seed(1)
    loss = m.training_step(batch, 0)
    torch.manual_seed(1)  # the same Gumbel noise
    out = m.backbone.forward_levels(batch["x"], reference=m.reference.module)
    expected = (
        F.cross_entropy(m.head(out.fused), batch["y"])
        + 0.5 * aro_loss(out.levels, out.reference_levels, m.switches())
        + 2.0 * F.mse_loss(m(mx), mz)
    )
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)


def test_a_saved_vit_folder_loads_with_its_weights(tmp_path):
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(3)
    saved = ViTModel(
        ViTConfig(
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=32,
            image_size=16,
            patch_size=4,
        ),
        add_pooling_layer=False,
    )
    saved.save_pretrained(tmp_path / "vit")
    (tmp_path / "vit" / "preprocessor_config.json").write_text(
        '{"image_mean": [0.1, 0.2, 0.3], "image_std": [1, 1, 1]}'
    )
    source = HFViT((3, 16, 16), path=str(tmp_path / "vit"), trainable_blocks=1)
    for name, p in saved.state_dict().items():
        assert torch.equal(source.vit.state_dict()[name], p), name
    assert source.model_stats == ((0.1, 0.2, 0.3), (1, 1, 1)) and source.out_features == 16
    x = torch.randn(2, 3, 16, 16)
    assert torch.allclose(source(x), saved(pixel_values=x).last_hidden_state[:, 0], atol=1e-6)
    with pytest.raises(ConfigError, match="config.json"):
        HFViT((3, 16, 16), path=str(tmp_path / "nowhere"))


def test_inputs_are_made_rgb_resized_and_optionally_renormalised():
    stats = ((0.2,), (0.5,))
    faithful = HFViT((1, 8, 8), preset="tiny", input_stats=stats)
    fixed = HFViT((1, 8, 8), preset="tiny", input_norm="model", input_stats=stats)
    plain = HFViT((1, 8, 8), preset="tiny", input_stats=stats, resize_antialias=False)
    raw = torch.rand(2, 1, 8, 8)
    normalised = (raw - 0.2) / 0.5

    def bicubic(x, antialias=True):  # torchvision's Resize on tensors (0.17+): antialiased bicubic
        return F.interpolate(x.expand(-1, 3, -1, -1), size=(32, 32), mode="bicubic", antialias=antialias)

    assert torch.allclose(faithful.prepare(normalised), bicubic(normalised), atol=1e-6)  # data normalisation kept
    assert torch.allclose(fixed.prepare(normalised), (bicubic(raw) - 0.5) / 0.5, atol=1e-5)  # the ViT's own 0.5/0.5
    assert torch.allclose(plain.prepare(normalised), bicubic(normalised, antialias=False), atol=1e-6)
    assert not torch.allclose(plain.prepare(normalised), faithful.prepare(normalised), atol=1e-3)  # a real change


def test_sources_of_different_width_are_fused_through_feature_dim(tmp_path):
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, image_size=16)
    ViTModel(config, add_pooling_layer=False).save_pretrained(tmp_path / "narrow")
    narrow = {"name": "hf_vit", "args": {"path": str(tmp_path / "narrow"), "trainable_blocks": 1}}
    with pytest.raises(ConfigError, match=r"widths \[32, 16\].*feature_dim"):
        MultiSourceFusion((3, 32, 32), sources=[TINY, narrow])
    fusion = MultiSourceFusion((3, 32, 32), sources=[TINY, narrow], feature_dim=24)
    out = fusion.forward_levels(torch.randn(2, 3, 32, 32))
    assert out.fused.shape == (2, 24) and len(out.levels) == 3 + 1
    with pytest.raises(ConfigError, match="not a ViT"):
        MultiSourceFusion((3, 32, 32), sources=[TINY, {"name": "mlp"}])
    with pytest.raises(ConfigError, match="trainable_blocks=9"):
        HFViT((3, 32, 32), trainable_blocks=9)


def _timm_importable() -> bool:
    try:
        import timm  # noqa: F401
    except Exception:  # absent, or a torchvision that does not match this torch
        return False
    return True


def test_timm_source_without_a_working_timm_is_one_clear_line():
    if _timm_importable():
        pytest.skip("timm works here; the error path is for installs without it")
    with pytest.raises(ConfigError, match="backbone timm: timm could not be imported"):
        MultiSourceFusion((3, 32, 32), sources=[TINY, {"name": "timm", "args": {"model_name": "vit_tiny_patch16_224"}}])


@pytest.mark.skipif(not _timm_importable(), reason="timm needs a torchvision built for this torch")
def test_timm_source_loads_a_local_weight_file_and_mixes_with_an_hf_vit(tmp_path):
    import timm
    from safetensors.torch import save_file

    args = {"img_size": 32, "patch_size": 8, "depth": 4, "embed_dim": 32, "num_heads": 2}
    reference = timm.create_model("vit_tiny_patch16_224", pretrained=False, **args)
    save_file(reference.state_dict(), str(tmp_path / "vit.safetensors"))  # with its head, as published
    source = {
        "name": "timm",
        "args": {
            "model_name": "vit_tiny_patch16_224",
            "checkpoint": str(tmp_path / "vit.safetensors"),
            "model_args": args,
            "trainable_blocks": 2,
        },
    }
    fusion = MultiSourceFusion((3, 32, 32), sources=[TINY, source])
    timm_source = fusion.sources[1]
    for name, p in timm_source.model.state_dict().items():
        assert torch.equal(p, reference.state_dict()[name]), name
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(
        timm_source(x), reference.forward_head(reference.forward_features(x), pre_logits=True), atol=1e-5
    )
    out = fusion.forward_levels(x)
    assert out.fused.shape == (2, 32) and len(out.levels) == 3 + 2
