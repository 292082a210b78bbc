"""Encoder shapes, view ordering, determinism, timm errors, and the global batch norm's parity with
nn.BatchNorm1d in a single process."""

import pytest
import torch
from torch import nn

from lejepa_platform.config import ModelConfig
from lejepa_platform.errors import UserError
from lejepa_platform.model import Encoder, GlobalBatchNorm1d, Projector, build_encoder, use_plain_attention

pytestmark = pytest.mark.unit

TINY_VIT = ModelConfig(backbone="vit_tiny_patch16_224",
                       backbone_kwargs={"img_size": 32, "patch_size": 8, "embed_dim": 96, "depth": 4, "num_heads": 3},
                       proj_hidden_dim=64, proj_layers=3, proj_dim=16)
TINY_RESNET = ModelConfig(backbone="resnet18", backbone_kwargs={"channels": [16, 32, 64, 128], "stem_width": 16},
                          proj_hidden_dim=64, proj_layers=3, proj_dim=16)


def _views(b=3, g=2, l=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(b, g, 3, 32, 32, generator=gen), torch.randn(b, l, 3, 16, 16, generator=gen)


@pytest.mark.parametrize("cfg,embed_dim", [(TINY_VIT, 96), (TINY_RESNET, 128)])
def test_multicrop_shapes_and_view_order(cfg, embed_dim):
    torch.manual_seed(0)
    enc = build_encoder(cfg).eval()
    assert enc.embed_dim == embed_dim
    glob, loc = _views()
    with torch.no_grad():
        out = enc(glob, loc)
        assert out.embeddings.shape == (8, 3, embed_dim)
        assert out.projections.shape == (8, 3, 16)
        # view v of image b is exactly the backbone applied to that crop alone
        assert torch.allclose(out.embeddings[1, 2], enc.embed(glob[2, 1][None])[0], atol=1e-5)
        assert torch.allclose(out.embeddings[2 + 4, 0], enc.embed(loc[0, 4][None])[0], atol=1e-5)
        # eval-mode projector is row-wise, so projections line up with embeddings
        assert torch.allclose(out.projections, enc.projector(out.embeddings.flatten(0, 1)).view(8, 3, 16), atol=1e-6)
        only_global = enc(glob)
        assert only_global.embeddings.shape == (2, 3, embed_dim)
        assert torch.allclose(only_global.embeddings, out.embeddings[:2], atol=1e-5)
        assert enc(glob, loc[:, :0]).projections.shape == (2, 3, 16)


def test_vit_gets_dynamic_img_size_and_resnet_is_built_without_it():
    vit = build_encoder(TINY_VIT).backbone
    assert vit.dynamic_img_size is True
    assert vit.pos_embed.shape[1] == 1 + (32 // 8) ** 2  # img_size from backbone_kwargs is honoured
    resnet = build_encoder(TINY_RESNET).backbone
    assert [m.out_channels for m in (resnet.layer1[-1].conv2, resnet.layer4[-1].conv2)] == [16, 128]


def test_user_can_turn_dynamic_img_size_off():
    cfg = ModelConfig(backbone=TINY_VIT.backbone,
                      backbone_kwargs={**TINY_VIT.backbone_kwargs, "dynamic_img_size": False})
    assert build_encoder(cfg).backbone.dynamic_img_size is False


def test_optional_kwargs_apply_only_where_accepted():
    torch.manual_seed(0)
    resnet = build_encoder(TINY_RESNET, optional_kwargs={"zero_init_last": False}).backbone
    assert resnet.layer1[0].bn2.weight.abs().sum() > 0  # default zero_init_last=True zeroes it
    assert build_encoder(TINY_RESNET).backbone.layer1[0].bn2.weight.abs().sum() == 0
    build_encoder(TINY_VIT, optional_kwargs={"zero_init_last": False})  # ViTs do not take it: dropped


def test_same_seed_same_weights_and_outputs():
    glob, loc = _views()
    outs = []
    for _ in range(2):
        torch.manual_seed(123)
        enc = build_encoder(TINY_VIT)
        outs.append(enc(glob, loc).projections)
    assert torch.equal(outs[0], outs[1])
    torch.manual_seed(124)
    assert not torch.equal(build_encoder(TINY_VIT)(glob, loc).projections, outs[0])


def test_plain_attention_computes_what_fused_attention_computes():
    torch.manual_seed(0)
    enc = build_encoder(TINY_VIT)
    glob, loc = _views()
    fused = enc(glob, loc)
    fused_grads = torch.autograd.grad(fused.projections.square().sum(), list(enc.backbone.parameters()))
    assert use_plain_attention(enc) == 4  # one attention block per ViT block
    assert all(block.attn.fused_attn is False for block in enc.backbone.blocks)
    plain = enc(glob, loc)
    plain_grads = torch.autograd.grad(plain.projections.square().sum(), list(enc.backbone.parameters()))
    assert torch.allclose(plain.projections, fused.projections, atol=1e-5)
    # float rounding only, relative to the largest gradient: some tensors' exact gradient is zero
    # (a bias that softmax cancels), where both paths hold rounding noise of different sign
    scale = max(b.abs().max() for b in fused_grads)
    for a, b in zip(plain_grads, fused_grads):
        assert (a - b).abs().max() <= 1e-5 * scale
    assert use_plain_attention(build_encoder(TINY_RESNET)) == 0


def test_unknown_backbone_suggests_close_timm_names():
    with pytest.raises(UserError, match=r"'resnt18' is not a timm model; did you mean: .*resnet18"):
        build_encoder(ModelConfig(backbone="resnt18"))


def test_bad_backbone_kwarg_is_named():
    cfg = ModelConfig(backbone="resnet18", backbone_kwargs={"stem_widht": 16})
    with pytest.raises(UserError, match=r"model.backbone_kwargs\['stem_widht'\] rejected by timm model 'resnet18'"):
        build_encoder(cfg)


@pytest.mark.parametrize("layers,norm,expected", [
    (1, "batchnorm", [nn.Linear]),
    (3, "batchnorm", [nn.Linear, GlobalBatchNorm1d, nn.GELU, nn.Linear, GlobalBatchNorm1d, nn.GELU, nn.Linear]),
    (2, "layernorm", [nn.Linear, nn.LayerNorm, nn.GELU, nn.Linear]),
    (2, "none", [nn.Linear, nn.Identity, nn.GELU, nn.Linear]),
])
def test_projector_layout(layers, norm, expected):
    proj = Projector(10, 32, 4, layers, norm)
    assert [type(m) for m in proj] == expected
    linears = [m for m in proj if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears][-1] == ((10 if layers == 1 else 32), 4)
    assert linears[-1].bias is not None
    assert all((m.bias is None) == (norm == "batchnorm") for m in linears[:-1])
    assert proj(torch.randn(5, 10)).shape == (5, 4)


def test_global_batchnorm_matches_torch_batchnorm_single_process():
    gen = torch.Generator().manual_seed(0)
    ours, ref = GlobalBatchNorm1d(7), nn.BatchNorm1d(7)
    with torch.no_grad():
        for bn in (ours, ref):
            bn.weight.copy_(torch.linspace(0.5, 2.0, 7))
            bn.bias.copy_(torch.linspace(-1.0, 1.0, 7))
    assert set(ours.state_dict()) == set(ref.state_dict())
    upstream = torch.randn(16, 7, generator=gen)
    for step in range(3):
        x = (torch.randn(16, 7, generator=gen) * 3 + 5).requires_grad_()
        x_ref = x.detach().clone().requires_grad_()
        y, y_ref = ours(x), ref(x_ref)
        assert torch.allclose(y, y_ref, atol=1e-5)
        (y * upstream).sum().backward()
        (y_ref * upstream).sum().backward()
        assert torch.allclose(x.grad, x_ref.grad, atol=1e-5)
    assert torch.allclose(ours.weight.grad, ref.weight.grad, atol=1e-4)
    assert torch.allclose(ours.bias.grad, ref.bias.grad, atol=1e-5)
    for name in ("running_mean", "running_var"):
        assert torch.allclose(getattr(ours, name), getattr(ref, name), atol=1e-5)
    assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked) == 3
    ours.eval(), ref.eval()
    x = torch.randn(4, 7, generator=gen)
    assert torch.allclose(ours(x), ref(x), atol=1e-5)


def test_global_batchnorm_loads_torch_batchnorm_state():
    ref = nn.BatchNorm1d(5)
    ref(torch.randn(8, 5) * 2 + 1)
    ours = GlobalBatchNorm1d(5)
    ours.load_state_dict(ref.state_dict())
    ours.eval(), ref.eval()
    x = torch.randn(3, 5)
    assert torch.allclose(ours(x), ref(x), atol=1e-6)


def test_global_batchnorm_is_not_swapped_by_convert_sync_batchnorm():
    proj = Projector(4, 8, 2, 2, "batchnorm")
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(proj)
    assert isinstance(converted[1], GlobalBatchNorm1d)


def test_encoder_is_a_plain_module_pair():
    enc = build_encoder(TINY_RESNET)
    assert isinstance(enc, Encoder)
    keys = enc.state_dict().keys()
    assert all(k.startswith(("backbone.", "projector.")) for k in keys)
