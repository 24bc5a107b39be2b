"""The networks' claims: the hand-written Swin and ResNet encoders are torchvision's, the shifted-window mask is the
published one, every network takes any input size and trains end to end. All on the CPU, nothing downloaded."""
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision

from models import DeepLabV3Plus, ResUNet, SwinUNet, WindowAttention, build_model, window_attention

# tiny widths: the claims below hold at any width, and the CPU is small
TINY = {
    "swinunet": dict(embed_dim=12, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4)),
    "resunet": dict(layers=(1, 1, 1, 1), widths=(8, 16, 32, 64)),
    "deeplabv3plus": dict(backbone="resnet18", head_width=32),
}


def torchvision_swin_t() -> torch.nn.Module:
    """A randomly initialised torchvision swin_t whose relative position biases and LayerNorms are far from their
    initial values (std 1 instead of 0.02, weights not all 1), so a wrong bias index or key mapping would show."""
    torch.manual_seed(0)
    model = torchvision.models.swin_t().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("relative_position_bias_table"):
                p.normal_(0, 1)
            elif p.ndim == 1 and ("norm" in name):
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("size", [(224, 224), (324, 260)])
def test_swin_encoder_matches_torchvision(size):
    """With the same weights, our 4 stage outputs are torchvision's features[1], [3], [5], [7] outputs. 324 x 260
    gives 81 x 65 tokens: odd maps and maps that are not whole windows, so both kinds of padding are exercised."""
    reference = torchvision_swin_t()
    ours = SwinUNet(num_classes=3).eval()
    ours.load_torchvision_swin(reference.state_dict())
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        stages, y = [], x
        for i, layer in enumerate(reference.features):
            y = layer(y)
            if i % 2 == 1:
                stages.append(y.permute(0, 3, 1, 2))  # (B, H, W, C) -> (B, C, H, W)
        encoded = ours.encode(x)
        _, bottleneck = ours(x, return_features=True)
    assert len(encoded) == 4
    for ours_stage, reference_stage in zip(encoded, stages):
        assert ours_stage.shape == reference_stage.shape
        assert (ours_stage - reference_stage).abs().max() < 1e-4
    # the bottleneck features are the last stage after torchvision's final LayerNorm
    assert (bottleneck - reference.norm(y).permute(0, 3, 1, 2)).abs().max() < 1e-4


def test_swin_loader_mirrors_encoder_blocks_into_decoder():
    """Swin-Unet's initialisation: each decoder stage starts from the encoder stage at its resolution."""
    ours = SwinUNet(num_classes=3)
    report = ours.load_torchvision_swin(torchvision_swin_t().state_dict())
    for up_stage, stage in zip(ours.up_stages, ours.stages):
        for (name, up_p), (_, p) in zip(up_stage.named_parameters(), stage.named_parameters()):
            assert torch.equal(up_p, p), name
    assert "head.weight" in report["skipped"] and "up_stages.2.5.mlp.fc2.weight" in report["loaded"]
    with pytest.raises(ValueError, match="swin_t"):
        ours.load_torchvision_swin(torchvision.models.resnet18().state_dict())


def brute_force_window_attention(attn: WindowAttention, x, window, shift):
    """The attention of one (S)W-MSA module computed token by token in image coordinates, without rolling.

    After the roll by -shift the windows start at rows shift, shift + wh, ... (mod H) of the image. A query attends
    to the keys of its shifted window that are less than a window away from it in the image: the rest of that
    window was wrapped round from the opposite border. The bias of a pair is the table's row for its offset.
    """
    B, H, W, C = x.shape
    heads, table_window = attn.num_heads, attn.window_size
    d = C // heads
    q, k, v = attn.qkv(x).view(B, H, W, 3, heads, d).unbind(3)  # each B, H, W, heads, d
    rows, cols = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    out = torch.zeros(B, H, W, heads, d)
    for r in range(H):
        for c in range(W):
            keys = (((rows - shift[0]) % H) // window[0] == ((r - shift[0]) % H) // window[0]) \
                & (((cols - shift[1]) % W) // window[1] == ((c - shift[1]) % W) // window[1]) \
                & ((rows - r).abs() < window[0]) & ((cols - c).abs() < window[1])
            offsets = (r - rows[keys] + table_window - 1) * (2 * table_window - 1) + (c - cols[keys] + table_window - 1)
            bias = attn.relative_position_bias_table[offsets].T  # heads, M
            scores = torch.einsum("bhd,bmhd->bhm", q[:, r, c], k[:, keys]) / math.sqrt(d) + bias
            out[:, r, c] = torch.einsum("bhm,bmhd->bhd", scores.softmax(-1), v[:, keys])
    return attn.proj(out.flatten(-2))


@pytest.mark.parametrize("size, module_shift, window, shift", [
    ((14, 21), 0, (7, 7), (0, 0)),  # W-MSA
    ((14, 21), 3, (7, 7), (3, 3)),  # SW-MSA: the mask must keep wrapped tokens apart
    ((5, 14), 3, (5, 7), (0, 3)),  # rows fit in one window: it shrinks to 5 rows and does not shift along them
])
def test_shifted_window_attention_matches_brute_force(size, module_shift, window, shift):
    torch.manual_seed(0)
    attn = WindowAttention(dim=8, num_heads=2, window_size=7, shift=module_shift)
    with torch.no_grad():
        attn.relative_position_bias_table.normal_(0, 1)
        x = torch.randn(2, *size, 8)
        expected = brute_force_window_attention(attn, x, window, shift)
        assert (attn(x) - expected).abs().max() < 1e-5


def test_window_attention_in_bf16_on_the_cpu_is_sdpa_within_bf16_rounding():
    """On a CPU in bf16 the windows attend through explicit products instead of SDPA (faster there): the output
    and the gradients, the learned bias's included, are SDPA's in fp32 within bf16's rounding (2 % of the
    largest value; a wrong scale, softmax axis or bias would be off by far more)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(12, 2, 49, 16) for _ in range(3))
    bias = torch.randn(2, 49, 49)
    grads = []
    for dtype in (torch.float32, torch.bfloat16):
        inputs = [t.clone().requires_grad_() for t in (q, k, v, bias)]
        low = [t.to(dtype) for t in inputs]
        out = window_attention(*low[:3], low[3][None])
        assert out.dtype == dtype
        out.float().pow(2).sum().backward()
        grads.append([out.detach().float()] + [t.grad for t in inputs])
    for reference, ours in zip(*grads):
        assert (ours - reference).abs().max() <= 0.02 * reference.abs().max()
    assert torch.allclose(grads[0][0], F.scaled_dot_product_attention(q, k, v, attn_mask=bias[None]), atol=1e-6)


def tiny(name: str, num_classes: int = 5):
    torch.manual_seed(0)
    return build_model(name, num_classes, **TINY[name])


@pytest.mark.parametrize("name", ["swinunet", "resunet", "deeplabv3plus"])
@pytest.mark.parametrize("size", [(224, 224), (321, 321), (97, 131), (64, 64)])
def test_logits_have_the_input_size_for_any_input(name, size):
    model = tiny(name).eval()
    with torch.no_grad():
        logits, features = model(torch.randn(2, 3, *size), return_features=True)
    assert logits.shape == (2, 5, *size)
    assert features.ndim == 4 and features.shape[0] == 2
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", ["swinunet", "resunet", "deeplabv3plus"])
def test_backward_reaches_every_parameter(name):
    """Train mode (stochastic depth and dropout on), an odd size so every kind of padding is in the graph."""
    model = tiny(name).train()
    logits = model(torch.randn(2, 3, 97, 131))
    F.cross_entropy(logits, torch.randint(0, 5, (2, 97, 131))).backward()
    for param_name, p in model.named_parameters():
        assert p.grad is not None, f"{param_name} gets no gradient"
        assert torch.isfinite(p.grad).all(), f"{param_name} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{param_name} has a zero gradient"


@pytest.mark.parametrize("size", [(224, 224), (321, 257)])
def test_resunet_encoder_matches_torchvision(size):
    torch.manual_seed(0)
    reference = torchvision.models.resnet34().eval()
    with torch.no_grad():  # move BatchNorm off its initial identity, so a mis-mapped one would show
        for m in reference.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    ours = ResUNet(num_classes=3).eval()
    report = ours.load_torchvision_resnet(reference.state_dict())
    assert report["skipped"] == ["fc.bias", "fc.weight"]
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        y = reference.maxpool(reference.relu(reference.bn1(reference.conv1(x))))
        layers = []
        for layer in (reference.layer1, reference.layer2, reference.layer3, reference.layer4):
            y = layer(y)
            layers.append(y)
        encoded = ours.encode(x)
    for ours_layer, reference_layer in zip(encoded[-4:], layers):
        assert ours_layer.shape == reference_layer.shape
        assert (ours_layer - reference_layer).abs().max() < 1e-4
    with pytest.raises(ValueError, match="resnet34"):
        ours.load_torchvision_resnet(torchvision.models.swin_t().state_dict())


def test_deeplab_loads_a_local_torchvision_backbone(tmp_path):
    torch.manual_seed(0)
    weights = torchvision.models.resnet18().state_dict()
    torch.save(weights, tmp_path / "resnet18.pth")
    model = DeepLabV3Plus(5, backbone="resnet18", pretrained=str(tmp_path / "resnet18.pth"), head_width=32)
    for key in ("conv1.weight", "layer4.1.conv2.weight", "layer3.0.bn1.running_var"):
        assert torch.equal(model.backbone.state_dict()[key], weights[key])


@pytest.mark.parametrize("backbone", ["resnet18", "resnet50"])
@pytest.mark.parametrize("output_stride", [8, 16])
def test_deeplab_output_stride(backbone, output_stride):
    model = DeepLabV3Plus(5, backbone=backbone, output_stride=output_stride, head_width=32).eval()
    with torch.no_grad():
        logits, features = model(torch.randn(1, 3, 64, 96), return_features=True)
    assert logits.shape == (1, 5, 64, 96)
    assert features.shape[-2:] == (64 // output_stride, 96 // output_stride)
    assert model.aspp.branches[1][0].dilation == ((6, 6) if output_stride == 16 else (12, 12))


@pytest.mark.parametrize("output_stride, dilate", [(16, [False, False, True]), (8, [False, True, True])])
def test_dilated_backbone_matches_torchvision_replace_stride_with_dilation(output_stride, dilate):
    """Our stride-to-dilation conversion (written out so ResNet-18/34 can use it) is torchvision's for ResNet-50."""
    torch.manual_seed(0)
    reference = torchvision.models.resnet50(replace_stride_with_dilation=dilate).eval()
    model = DeepLabV3Plus(5, backbone="resnet50", output_stride=output_stride, head_width=32).eval()
    model.backbone.load_state_dict({k: v for k, v in reference.state_dict().items() if not k.startswith("fc.")})
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        _, features = model(x, return_features=True)
        r = reference
        expected = r.layer4(r.layer3(r.layer2(r.layer1(r.maxpool(r.relu(r.bn1(r.conv1(x))))))))
    assert (features - expected).abs().max() < 1e-4


def test_build_model_names_the_allowed_networks():
    assert isinstance(build_model("resunet", 3, **TINY["resunet"]), ResUNet)
    with pytest.raises(ValueError, match="deeplabv3plus.*resunet.*swinunet"):
        build_model("unet", 3)
