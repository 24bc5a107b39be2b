"""The three networks of IGL-DT: the Swin-UNet teacher G, the ResUNet teacher L and the DeepLabV3+ student S.

Every network maps images (B, in_chans, H, W) of any size to logits (B, num_classes, H, W). Called with
``return_features=True`` it returns ``(logits, features)``, features being its deepest feature map (B, C, h, w).

SwinUNet and ResUNet are written out here piece by piece. Their encoders load torchvision's ``swin_t`` and
``resnet34`` state dicts and then reproduce torchvision's stage outputs (tests/test_models.py checks this), which
shows that the code here is the published architecture. DeepLabV3Plus uses torchvision's ResNet as its backbone.

Inside the Swin-UNet, tensors are channels-last, (B, H, W, C), like torchvision's Swin: every Linear and
LayerNorm then acts on the last axis. ``encode`` and the outputs are (B, C, H, W) like every other network.
"""
import functools

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.ops import StochasticDepth

# ------------------------------------------------------------------------------------------------------------------
# Swin-UNet (Cao et al. 2021), built from the Swin Transformer blocks of Liu et al. 2021
# ------------------------------------------------------------------------------------------------------------------


def window_partition(x: torch.Tensor, window: tuple[int, int]) -> torch.Tensor:
    """(B, H, W, C) -> (B, num_windows, wh * ww, C), windows in row-major order; H, W are whole windows."""
    B, H, W, C = x.shape
    x = x.view(B, H // window[0], window[0], W // window[1], window[1], C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(B, -1, window[0] * window[1], C)


def window_reverse(windows: torch.Tensor, window: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """(B, num_windows, wh * ww, C) -> (B, H, W, C): the inverse of ``window_partition``."""
    (H, W), B, C = size, windows.shape[0], windows.shape[-1]
    x = windows.view(B, H // window[0], W // window[1], window[0], window[1], C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(B, H, W, C)


@functools.lru_cache(maxsize=64)  # a constant of the window: built once per window and device, never modified
def relative_position_index(window: tuple[int, int], table_window: int, device=None) -> torch.Tensor:
    """(N, N), N = wh * ww: for each (query, key) pair of a window, the row of their offset in the bias table.

    The table has a row per offset (dy, dx) in [-(table_window - 1), table_window - 1]^2, row-major. A window smaller
    than ``table_window`` (on a feature map smaller than the window) uses the table's central rows.
    """
    ys, xs = torch.meshgrid(torch.arange(window[0], device=device), torch.arange(window[1], device=device),
                            indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    dy = ys[:, None] - ys[None, :] + table_window - 1  # shifted to start at 0
    dx = xs[:, None] - xs[None, :] + table_window - 1
    return dy * (2 * table_window - 1) + dx


@functools.lru_cache(maxsize=64)  # likewise, once per map size, window, shift and device
def shifted_window_mask(size, window, shift, device=None) -> torch.Tensor:
    """Additive attention mask (num_windows, N, N) for SW-MSA on a map of ``size`` rolled by ``-shift``.

    The cyclic roll moves the top rows (left columns) to the bottom (right), so the last row (column) of windows
    holds tokens from opposite borders of the image. Each token is labelled by its region before the roll, along
    each axis: 0 = never in the last window, 1 = in the last window and not wrapped, 2 = wrapped. Tokens attend only
    to tokens of their own label; other pairs get -100, not -inf, as in Swin and torchvision.
    """

    def regions(n, w, s):  # (n,) region of each row (column)
        i = torch.arange(n, device=device)
        return (i >= n - w).long() + (i >= n - s).long()  # s = 0: no token wraps

    labels = regions(size[0], window[0], shift[0])[:, None] * 3 + regions(size[1], window[1], shift[1])[None, :]
    labels = window_partition(labels[None, :, :, None], window)[0, :, :, 0]  # num_windows, N
    return (labels[:, :, None] != labels[:, None, :]).float() * -100.0


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + bias) v, each window's tokens attending to each other: (..., N, d) -> (..., N, d).

    SDPA, except in bf16 or fp16 on a CPU, which takes `explicit_window_attention`, the same product written out."""
    if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16):
        return explicit_window_attention(q, k, v, bias)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


def explicit_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Equivalent to F.scaled_dot_product_attention(q, k, v, attn_mask=bias), within the low precision's rounding
    (tests/test_models.py holds them so). Used in bf16 or fp16 on a CPU: there, for windows of a few dozen tokens,
    SDPA's CPU kernels are slower than oneDNN's low-precision batched products, and with a learned bias that needs
    a gradient SDPA falls back to its unfused math path (bench/speed.py --compare amp). This is the original Swin's
    form under mixed precision: scores and weights in the low precision, the softmax accumulating in fp32 inside its
    kernel."""
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1) + bias
    return scores.softmax(dim=-1) @ v


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows (W-MSA), or inside shifted windows (SW-MSA) when ``shift > 0``,
    with a learned relative position bias. (B, H, W, C) -> (B, H, W, C), any H and W.

    As in torchvision's ``shifted_window_attention``, the map is zero-padded (right, bottom) to whole windows and
    cropped back. Along an axis no longer than the window the map is a single window: the window shrinks to the map
    and does not shift (the rule of the original Swin, per axis; torchvision pads such a map up to the window).
    """

    def __init__(self, dim: int, num_heads: int, window_size: int = 7, shift: int = 0):
        super().__init__()
        self.num_heads, self.window_size, self.shift = num_heads, window_size, shift
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        # one learned bias per head and per relative offset (dy, dx) between two tokens of a window
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        window = (min(self.window_size, H), min(self.window_size, W))
        shift = (self.shift if H > self.window_size else 0, self.shift if W > self.window_size else 0)
        x = F.pad(x, (0, 0, 0, -W % window[1], 0, -H % window[0]))
        size = x.shape[1:3]
        if any(shift):
            x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))

        windows = window_partition(x, window)  # B, nW, N, C
        nW, N = windows.shape[1:3]
        # Windows are the batch of attention: 4-D (B * nW, heads, N, d) inputs, the shape SDPA's fused GPU kernels
        # take (a 5-D call falls back to explicit matrix products).
        qkv = self.qkv(windows.flatten(0, 1)).unflatten(-1, (3, self.num_heads, C // self.num_heads))
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each B * nW, heads, N, d
        index = relative_position_index(window, self.window_size, x.device)
        mask = self.relative_position_bias_table[index].permute(2, 0, 1)  # heads, N, N
        if any(shift):  # each window has its own mask: one per window of every image
            mask = mask + shifted_window_mask(size, window, shift, x.device)[:, None]  # nW, heads, N, N
            mask = mask.to(q.dtype).expand(B, nW, -1, N, N).flatten(0, 1)  # B * nW, heads, N, N
        else:
            mask = mask.to(q.dtype)[None]  # the same for every window
        out = window_attention(q, k, v, mask)  # B * nW, heads, N, d
        out = self.proj(out.transpose(1, 2).flatten(-2)).unflatten(0, (B, nW))  # B, nW, N, C

        x = window_reverse(out, window, size)
        if any(shift):
            x = torch.roll(x, shifts=shift, dims=(1, 2))
        return x[:, :H, :W]


class Mlp(nn.Module):
    """Linear -> GELU -> Linear on the channels, (..., C) -> (..., C)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwinBlock(nn.Module):
    """Pre-norm transformer block with window attention: x + attn(norm1(x)), then x + mlp(norm2(x)).
    (B, H, W, C) -> (B, H, W, C). Stochastic depth drops a sample's whole residual branch."""

    def __init__(self, dim, num_heads, window_size=7, shift=0, mlp_ratio=4.0, drop_path=0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, window_size, shift)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = StochasticDepth(drop_path, "row")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def swin_stage(dim, depth, num_heads, window_size, mlp_ratio, drop_paths) -> nn.Sequential:
    """``depth`` Swin blocks, alternating W-MSA and SW-MSA (shift = half a window) so information crosses windows."""
    return nn.Sequential(*[
        SwinBlock(dim, num_heads, window_size, 0 if i % 2 == 0 else window_size // 2, mlp_ratio, drop_paths[i])
        for i in range(depth)
    ])


class PatchEmbed(nn.Module):
    """Image (B, in_chans, H, W) -> tokens (B, ceil(H / p), ceil(W / p), dim): a p x p stride-p conv, then LayerNorm.
    The image is zero-padded to whole patches (torchvision's conv would drop the remainder)."""

    def __init__(self, in_chans: int, dim: int, patch_size: int = 4):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[-2:]
        x = F.pad(x, (0, -W % self.patch_size, 0, -H % self.patch_size))
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class PatchMerging(nn.Module):
    """Downsample x2: concatenate each 2x2 neighbourhood, LayerNorm, Linear 4C -> 2C.
    (B, H, W, C) -> (B, ceil(H / 2), ceil(W / 2), 2C); odd maps are zero-padded first, as in torchvision."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[1:3]
        x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
        # this order of the four neighbours is the one the pretrained reduction weights expect
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x))


class PatchExpand(nn.Module):
    """Upsample x``scale``: Linear C -> scale^2 * out_dim, each token's channels spread over a scale x scale patch,
    LayerNorm. (B, H, W, C) -> (B, scale * H, scale * W, out_dim). Swin-Unet's inverse of patch merging."""

    def __init__(self, dim: int, out_dim: int, scale: int = 2):
        super().__init__()
        self.scale, self.out_dim = scale, out_dim
        self.expand = nn.Linear(dim, scale * scale * out_dim, bias=False)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, _ = x.shape
        s = self.scale
        x = self.expand(x).view(B, H, W, s, s, self.out_dim).permute(0, 1, 3, 2, 4, 5)  # B, H, s, W, s, out_dim
        return self.norm(x.reshape(B, H * s, W * s, self.out_dim))


class SwinUNet(nn.Module):
    """Swin-Unet: a Swin Transformer encoder, a mirrored Swin decoder joined to it by skip connections, 4x patches.

    Encoder: patch embedding (H/4, C), then stages of Swin blocks at C, 2C, 4C, 8C channels (H/4 ... H/32) with
    patch merging between them; the last stage is Swin-Unet's bottleneck. Decoder, from the bottleneck up: patch
    expanding x2, concatenation with the encoder stage output at that resolution (the skip), Linear 2C -> C, Swin
    blocks of the same depth as that encoder stage. Then LayerNorm, a final x4 patch expanding and a 1x1 classifier.

    The skips are the encoder stage outputs (the figure of Cao et al.); their code takes the inputs of the stages.
    """

    def __init__(self, num_classes, in_chans=3, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24),
                 window_size=7, mlp_ratio=4.0, drop_path_rate=0.1):
        super().__init__()
        n = len(depths)
        dims = [embed_dim * 2**i for i in range(n)]
        # stochastic depth grows linearly with depth; a decoder block drops as often as its encoder mirror
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        rates = [rates[sum(depths[:i]):sum(depths[:i + 1])] for i in range(n)]

        def stage(i):  # the Swin blocks of encoder stage i, or of its decoder mirror
            return swin_stage(dims[i], depths[i], num_heads[i], window_size, mlp_ratio, rates[i])

        self.patch_embed = PatchEmbed(in_chans, embed_dim, patch_size=4)
        self.stages = nn.ModuleList([stage(i) for i in range(n)])
        self.merges = nn.ModuleList([PatchMerging(dims[i]) for i in range(n - 1)])
        self.norm = nn.LayerNorm(dims[-1])
        # decoder, indexed by the resolution it works at (run from i = n - 2 down to 0): expands[i] brings
        # dims[i + 1] at H / 2^(i + 3) to dims[i] at H / 2^(i + 2), where up_stages[i] mirrors stages[i]
        self.expands = nn.ModuleList([PatchExpand(dims[i + 1], dims[i], 2) for i in range(n - 1)])
        self.skip_projs = nn.ModuleList([nn.Linear(2 * dims[i], dims[i]) for i in range(n - 1)])
        self.up_stages = nn.ModuleList([stage(i) for i in range(n - 1)])
        self.norm_up = nn.LayerNorm(dims[0])
        self.final_expand = PatchExpand(dims[0], dims[0], 4)
        self.classifier = nn.Conv2d(dims[0], num_classes, kernel_size=1, bias=False)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def _encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.patch_embed(x)
        outputs = []
        for i, stage in enumerate(self.stages):
            x = stage(x if i == 0 else self.merges[i - 1](x))
            outputs.append(x)
        return outputs  # channels-last

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Stage outputs [(B, C * 2^i, ~H / 2^(i + 2), ~W / 2^(i + 2)) for each stage i], before patch merging.

        These are torchvision's ``swin_t().features[1], [3], [5], [7]`` outputs: the last one is *before* the final
        LayerNorm ``norm``, which ``forward`` applies to the bottleneck.
        """
        return [f.permute(0, 3, 1, 2) for f in self._encode(x)]

    def forward(self, images: torch.Tensor, return_features: bool = False):
        """(B, in_chans, H, W) -> logits (B, num_classes, H, W) [, bottleneck (B, 8C, ~H / 32, ~W / 32)]."""
        H, W = images.shape[-2:]
        *skips, x = self._encode(images)
        x = bottleneck = self.norm(x)
        for i in reversed(range(len(skips))):
            skip = skips[i]
            # odd maps were padded before patch merging: crop the expanded map back to the skip's size
            x = self.expands[i](x)[:, :skip.shape[1], :skip.shape[2]]
            x = self.up_stages[i](self.skip_projs[i](torch.cat([x, skip], dim=-1)))
        x = self.final_expand(self.norm_up(x))  # B, 4 * ~H / 4, 4 * ~W / 4, C
        logits = self.classifier(x.permute(0, 3, 1, 2))[..., :H, :W]  # crop the padding of the patch embedding
        return (logits, bottleneck.permute(0, 3, 1, 2)) if return_features else logits

    @torch.no_grad()
    def load_torchvision_swin(self, state_dict: dict) -> dict:
        """Load a torchvision ``swin_t`` state dict into the encoder, and each decoder stage from the encoder stage
        at its resolution (Swin-Unet's practice: ``up_stages[i]`` gets ``stages[i]``'s blocks where shapes match).

        Key mapping: features.0.{0,2} -> patch_embed.{proj,norm}; features.(2i+1).b -> stages.i.b (and up_stages.i.b);
        features.(2i+2) -> merges.i; norm -> norm; inside a block mlp.{0,3} -> mlp.{fc1,fc2}. The classification
        head and the relative position index buffers (computed here) are not used.
        Returns {"loaded": our keys that were set, "skipped": torchvision keys that were not used}.
        """
        if not any(k.startswith("features.1.0.attn.") for k in state_dict):
            held = f"a torchvision {resnet_name(state_dict)}" if resnet_layout(state_dict) else \
                f"keys like {', '.join(list(state_dict)[:3])}"
            raise ValueError(f"the weights hold {held}; expected a torchvision swin_t state dict "
                             f"('features.1.0.attn.qkv.weight', ...)")
        theirs = swin_layout(state_dict)
        ours = (self.patch_embed.proj.out_channels, tuple(len(stage) for stage in self.stages))
        if theirs != ours:
            raise ValueError(f"the weights are a Swin of width {theirs[0]} and depths {theirs[1]}, this SwinUNet's "
                             f"are {ours[0]} and {ours[1]}: build it with theirs (train.py: --swin-dim {theirs[0]} "
                             f"--swin-depths {' '.join(map(str, theirs[1]))})")
        own = self.state_dict()
        loaded, skipped = {}, []
        for key, value in state_dict.items():
            targets = _our_swin_keys(key)
            if not targets:
                skipped.append(key)
                continue
            encoder_key, *mirror_keys = targets
            if encoder_key not in own or own[encoder_key].shape != value.shape:
                raise ValueError(f"torchvision key {key} {tuple(value.shape)} does not fit this SwinUNet's "
                                 f"{encoder_key}: build it with the widths and depths of that Swin")
            loaded[encoder_key] = value
            loaded.update({k: value for k in mirror_keys if k in own and own[k].shape == value.shape})
        missing = [k for k in own if k.split(".")[0] in ("patch_embed", "stages", "merges", "norm") and k not in loaded]
        if missing:
            raise ValueError(f"the state dict leaves encoder weights unset: {missing[:5]}")
        self.load_state_dict(loaded, strict=False)
        return {"loaded": sorted(loaded), "skipped": skipped}


def _our_swin_keys(key: str) -> list[str]:
    """Our keys for one torchvision swin_t key: [encoder key, decoder mirror keys...], or [] if it is not used."""
    parts = key.split(".")
    if parts[0] == "norm":
        return [key]
    if parts[0] != "features" or parts[-1] == "relative_position_index":
        return []  # the classification head; index buffers are computed, not loaded
    index, rest = int(parts[1]), ".".join(parts[2:]).replace("mlp.0.", "mlp.fc1.").replace("mlp.3.", "mlp.fc2.")
    if index == 0:  # Sequential(Conv2d, Permute, LayerNorm)
        return [{"0": "patch_embed.proj.", "2": "patch_embed.norm."}[parts[2]] + parts[3]]
    if index % 2 == 0:
        return [f"merges.{index // 2 - 1}.{rest}"]
    stage = index // 2
    return [f"stages.{stage}.{rest}", f"up_stages.{stage}.{rest}"]  # the last stage has no mirror: dropped later


# ------------------------------------------------------------------------------------------------------------------
# ResUNet: a ResNet-34 encoder and a residual U-Net decoder
# ------------------------------------------------------------------------------------------------------------------


def conv_bn_relu(in_ch: int, out_ch: int, kernel_size: int = 3, dilation: int = 1) -> nn.Sequential:
    """Conv (no bias, 'same' padding) -> BatchNorm -> ReLU."""
    padding = dilation * (kernel_size // 2)
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, kernel_size, padding=padding, dilation=dilation, bias=False),
                         nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True))


class BasicBlock(nn.Module):
    """ResNet's basic residual block, relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)), with torchvision's names.
    (B, in_ch, H, W) -> (B, out_ch, ceil(H / stride), ceil(W / stride)); the shortcut is a 1x1 conv + BN projection
    when the shape changes."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.downsample = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + shortcut)


class ResNetEncoder(nn.Module):
    """ResNet-34's trunk, laid out and named as torchvision's (conv1, bn1, relu, maxpool, layer1..layer4).

    forward: (B, in_chans, H, W) -> [stem (H/2), layer1 (H/4), layer2 (H/8), layer3 (H/16), layer4 (H/32)],
    with widths[0], widths[0], widths[1], widths[2], widths[3] channels.
    """

    def __init__(self, in_chans=3, layers=(3, 4, 6, 3), widths=(64, 128, 256, 512)):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, widths[0], kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        in_ch = widths[0]
        for i, (depth, width) in enumerate(zip(layers, widths)):
            blocks = [BasicBlock(in_ch if b == 0 else width, width, 2 if b == 0 and i > 0 else 1) for b in range(depth)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            in_ch = width

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        stem = self.relu(self.bn1(self.conv1(x)))
        outputs = [stem]
        x = self.maxpool(stem)
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            outputs.append(x)
        return outputs


class UpBlock(nn.Module):
    """Decoder stage: bilinear upsampling to the skip's size (not blindly x2, so odd sizes work), concatenation
    with the skip, a residual block. (B, in_ch, h, w), skip (B, skip_ch, H, W) -> (B, out_ch, H, W)."""

    def __init__(self, in_ch: int, skip_ch: int, out_ch: int):
        super().__init__()
        self.block = BasicBlock(in_ch + skip_ch, out_ch)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.block(torch.cat([x, skip], dim=1))


class ResUNet(nn.Module):
    """U-Net with a ResNet-34 encoder: four up stages (layer4 -> layer3 -> layer2 -> layer1 -> stem, H/32 -> H/2),
    then x2 to the input size and a 1x1 classifier. Decoder widths: widths[2], widths[1], widths[0], widths[0] / 2."""

    def __init__(self, num_classes, in_chans=3, layers=(3, 4, 6, 3), widths=(64, 128, 256, 512)):
        super().__init__()
        self.encoder = ResNetEncoder(in_chans, layers, widths)
        skip_chs = (widths[2], widths[1], widths[0], widths[0])  # layer3, layer2, layer1, stem
        out_chs = (widths[2], widths[1], widths[0], widths[0] // 2)
        in_chs = (widths[3],) + out_chs[:-1]
        self.decoder = nn.ModuleList([UpBlock(i, s, o) for i, s, o in zip(in_chs, skip_chs, out_chs)])
        self.classifier = nn.Conv2d(out_chs[-1], num_classes, kernel_size=1)
        for m in self.modules():  # torchvision's ResNet initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """[stem (B, w0, H/2, W/2), layer1 (H/4), layer2 (H/8), layer3 (H/16), layer4 (B, w3, H/32, W/32)]."""
        return self.encoder(x)

    def forward(self, images: torch.Tensor, return_features: bool = False):
        """(B, in_chans, H, W) -> logits (B, num_classes, H, W) [, layer4 output (B, widths[3], ~H/32, ~W/32)]."""
        *skips, deepest = self.encoder(images)
        x = deepest
        for up, skip in zip(self.decoder, reversed(skips)):
            x = up(x, skip)
        # classifying at H/2 and then upsampling equals upsampling then classifying (both are linear), and is cheaper
        logits = F.interpolate(self.classifier(x), size=images.shape[-2:], mode="bilinear", align_corners=False)
        return (logits, deepest) if return_features else logits

    @torch.no_grad()
    def load_torchvision_resnet(self, state_dict: dict) -> dict:
        """Load a torchvision ``resnet34`` state dict into the encoder: key k -> encoder.k; fc.* is not used.
        Returns {"loaded": our keys that were set, "skipped": torchvision keys that were not used}."""
        if not resnet_layout(state_dict):
            raise ValueError("load_torchvision_resnet expects a torchvision resnet34 state dict ('conv1.weight', "
                             f"'layer1.0.conv1.weight', ...); got keys like {list(state_dict)[:3]}")
        block, depths, widths = resnet_layout(state_dict)
        own_depths = tuple(len(getattr(self.encoder, f"layer{i}")) for i in range(1, 5))
        own_widths = tuple(getattr(self.encoder, f"layer{i}")[0].conv1.out_channels for i in range(1, 5))
        if (block, depths) != ("BasicBlock", own_depths):
            own = RESNETS.get(("BasicBlock", own_depths), f"ResNet of BasicBlocks {own_depths}")
            raise ValueError(f"the weights are a torchvision {resnet_name(state_dict)}, this ResUNet's encoder a "
                             f"{own}: expected {own} weights")
        if widths != own_widths:
            raise ValueError(f"the weights are a resnet34 of widths {widths}, this ResUNet's are {own_widths}: build "
                             f"it with widths={widths} (train.py: --res-width {widths[0]})")
        trunk = {k: v for k, v in state_dict.items() if not k.startswith("fc.")}
        load_weights(self.encoder, trunk, "the resnet34 weights")
        return {"loaded": sorted("encoder." + k for k in trunk), "skipped": sorted(set(state_dict) - set(trunk))}


# ------------------------------------------------------------------------------------------------------------------
# DeepLabV3+ (Chen et al. 2018) on a torchvision ResNet
# ------------------------------------------------------------------------------------------------------------------


def dilate_layer(layer: nn.Sequential, dilation: int, previous_dilation: int) -> None:
    """Trade a ResNet layer's stride 2 for dilation, in place, so the output stride stops growing.

    All convs get stride 1; the first 3x3 conv keeps ``previous_dilation`` and every later one gets ``dilation``.
    This is torchvision's ``replace_stride_with_dilation`` for Bottleneck nets (tested), written out so it also
    applies to BasicBlock nets (ResNet-18/34), for which torchvision refuses dilation.
    """
    first = True
    for m in layer.modules():
        if isinstance(m, nn.Conv2d):
            m.stride = (1, 1)
            if m.kernel_size == (3, 3):
                d = previous_dilation if first else dilation
                m.dilation, m.padding, first = (d, d), (d, d), False


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: a 1x1 branch, three 3x3 branches of growing dilation and an image-pooling
    branch, concatenated and projected. (B, in_ch, h, w) -> (B, out_ch, h, w)."""

    def __init__(self, in_ch: int, out_ch: int, rates=(6, 12, 18)):
        super().__init__()
        self.branches = nn.ModuleList([conv_bn_relu(in_ch, out_ch, 1)] +
                                      [conv_bn_relu(in_ch, out_ch, 3, dilation=r) for r in rates])
        self.image_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), conv_bn_relu(in_ch, out_ch, 1))
        self.project = nn.Sequential(conv_bn_relu((len(rates) + 2) * out_ch, out_ch, 1), nn.Dropout(0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.image_pool(x).expand(-1, -1, *x.shape[-2:])  # global context, the same at every position
        return self.project(torch.cat([branch(x) for branch in self.branches] + [pooled], dim=1))


class DeepLabV3Plus(nn.Module):
    """DeepLabV3+: a dilated ResNet (output stride 16, or 8), ASPP on layer4, and a decoder that joins the ASPP
    output, upsampled to H/4, with layer1's features projected to 48 channels; two 3x3 convs, a 1x1 classifier.

    The ResNet trunk is ``self.backbone`` (the trainer gives ``backbone.*`` the backbone learning rate and every
    other parameter the head's). ``head_width`` (ASPP and decoder channels) is 256 in the paper; tests shrink it.
    """

    backbones = ("resnet18", "resnet34", "resnet50", "resnet101")

    def __init__(self, num_classes, backbone="resnet50", output_stride=16, pretrained=False, head_width=256):
        super().__init__()
        if backbone not in self.backbones:
            raise ValueError(f"unknown backbone {backbone!r}; choose one of {self.backbones}")
        if output_stride not in (8, 16):
            raise ValueError(f"output_stride must be 8 or 16, got {output_stride}")
        trunk = getattr(torchvision.models, backbone)(weights=None)
        high_ch = trunk.fc.in_features  # layer4's channels: 512 (BasicBlock) or 2048 (Bottleneck)
        low_ch = high_ch // 8  # layer1's channels
        del trunk.avgpool, trunk.fc  # the classification head is not used (and would get no gradient)
        if pretrained:
            load_backbone(trunk, torchvision_state_dict(pretrained, backbone), backbone)
        if output_stride == 16:
            dilate_layer(trunk.layer4, dilation=2, previous_dilation=1)
        else:
            dilate_layer(trunk.layer3, dilation=2, previous_dilation=1)
            dilate_layer(trunk.layer4, dilation=4, previous_dilation=2)
        self.backbone = trunk

        rates = (6, 12, 18) if output_stride == 16 else (12, 24, 36)  # the same field of view at either stride
        self.aspp = ASPP(high_ch, head_width, rates)
        self.reduce = conv_bn_relu(low_ch, 48, 1)  # few low-level channels, so the ASPP context dominates
        self.fuse = nn.Sequential(conv_bn_relu(head_width + 48, head_width), conv_bn_relu(head_width, head_width))
        self.classifier = nn.Conv2d(head_width, num_classes, kernel_size=1)

    def forward(self, images: torch.Tensor, return_features: bool = False):
        """(B, 3, H, W) -> logits (B, num_classes, H, W) [, layer4 output (B, 512 or 2048, ~H/os, ~W/os)]."""
        r = self.backbone
        low = r.layer1(r.maxpool(r.relu(r.bn1(r.conv1(images)))))  # H/4
        deepest = r.layer4(r.layer3(r.layer2(low)))  # H/16 (or H/8)
        x = F.interpolate(self.aspp(deepest), size=low.shape[-2:], mode="bilinear", align_corners=False)
        x = self.fuse(torch.cat([x, self.reduce(low)], dim=1))
        logits = F.interpolate(self.classifier(x), size=images.shape[-2:], mode="bilinear", align_corners=False)
        return (logits, deepest) if return_features else logits


# ------------------------------------------------------------------------------------------------------------------
# Weights from files: read safely, loaded whole or refused in one sentence
# ------------------------------------------------------------------------------------------------------------------


def read_weights(path) -> dict:
    """The state dict that torch.save wrote to `path`, read with weights_only=True (a file holds tensors, never code
    to run). ValueError, one sentence naming the path, if it is missing, unreadable or not a dict of tensors."""
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except Exception as error:  # a text file, a truncated download, a pickle of other objects: torch's advice to
        # load it with weights_only=False would run whatever code the file holds, so only its kind is said
        raise ValueError(f"{path} is not a file of tensors saved with torch.save ({type(error).__name__}); expected "
                         f"a state dict such as torchvision's .pth files") from None
    if not isinstance(state_dict, dict) or not state_dict or \
            not all(isinstance(value, torch.Tensor) for value in state_dict.values()):
        keys = f" of keys like {', '.join(map(str, list(state_dict)[:3]))}" if isinstance(state_dict, dict) else ""
        raise ValueError(f"{path} holds a {type(state_dict).__name__}{keys}; expected a state dict, parameter name -> "
                         f"tensor (a training checkpoint holds one: save that alone)")
    return state_dict


def load_weights(module: nn.Module, state_dict: dict, what: str = "the weights") -> None:
    """``module.load_state_dict(state_dict)`` when every key and shape matches; else ValueError, one sentence naming
    how many keys are missing, unexpected or of another shape, with the first of each (not torch's page of them)."""
    own = module.state_dict()
    shape = lambda value: tuple(getattr(value, "shape", ()))
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    reshaped = [k for k in own if k in state_dict and shape(own[k]) != shape(state_dict[k])]
    problems = [f"{len(missing)} key(s) missing (such as {missing[0]})" if missing else "",
                f"{len(unexpected)} key(s) unexpected (such as {unexpected[0]})" if unexpected else "",
                f"{len(reshaped)} key(s) of another shape (such as {reshaped[0]}: {shape(state_dict[reshaped[0]])} "
                f"in the weights, {shape(own[reshaped[0]])} here)" if reshaped else ""]
    if any(problems):
        raise ValueError(f"{what} do not fit this {type(module).__name__}: "
                         + "; ".join(problem for problem in problems if problem))
    module.load_state_dict(state_dict)


RESNETS = {("BasicBlock", (2, 2, 2, 2)): "resnet18", ("BasicBlock", (3, 4, 6, 3)): "resnet34",
           ("Bottleneck", (3, 4, 6, 3)): "resnet50", ("Bottleneck", (3, 4, 23, 3)): "resnet101",
           ("Bottleneck", (3, 8, 36, 3)): "resnet152"}


def resnet_layout(state_dict: dict):
    """(block, blocks per layer, widths of layer1..layer4) of a torchvision ResNet state dict, such as
    ("BasicBlock", (3, 4, 6, 3), (64, 128, 256, 512)) for resnet34; None if it holds no ResNet."""
    if not all(f"layer{i}.0.conv1.weight" in state_dict for i in range(1, 5)):
        return None
    block = "Bottleneck" if "layer1.0.conv3.weight" in state_dict else "BasicBlock"
    depths = tuple(len({k.split(".")[1] for k in state_dict if k.startswith(f"layer{i}.")}) for i in range(1, 5))
    widths = tuple(state_dict[f"layer{i}.0.conv1.weight"].shape[0] for i in range(1, 5))
    return block, depths, widths


def resnet_name(state_dict: dict):
    """torchvision's name of the ResNet a state dict holds ("resnet18", ...), its layout in words if it has none,
    None if it holds no ResNet."""
    layout = resnet_layout(state_dict)
    return layout and RESNETS.get(layout[:2], f"ResNet of {layout[0]}s {layout[1]}")


def swin_layout(state_dict: dict) -> tuple:
    """(embedding width, blocks per stage) of a torchvision Swin state dict: (96, (2, 2, 6, 2)) for swin_t."""
    stages = sorted({int(k.split(".")[1]) for k in state_dict if k.startswith("features.")} - {0})[::2]
    depths = tuple(len({k.split(".")[2] for k in state_dict if k.startswith(f"features.{i}.")}) for i in stages)
    return state_dict["features.0.0.weight"].shape[0], depths


def load_backbone(trunk: nn.Module, state_dict: dict, arch: str) -> None:
    """Load a torchvision ResNet state dict (fc.* unused) into `trunk`, torchvision's `arch` without its head;
    ValueError in one sentence if the weights hold another network."""
    found = resnet_name(state_dict)
    if found != arch:
        held = f"a torchvision {found}" if found else f"keys like {', '.join(list(state_dict)[:3])}"
        other = f", or the backbone {found} (train.py: --backbone {found})" if found in DeepLabV3Plus.backbones else ""
        raise ValueError(f"the weights hold {held}, this network a {arch} backbone: expected {arch} weights{other}")
    load_weights(trunk, {k: v for k, v in state_dict.items() if not k.startswith("fc.")}, f"the {arch} weights")


def torchvision_state_dict(weights, arch: str) -> dict:
    """A torchvision model's state dict: ImageNet through torchvision's weights API (``weights=True`` downloads the
    arch's DEFAULT weights), a local file (``weights="path.pth"``, see read_weights), or a state dict already loaded
    (returned as is)."""
    if weights is True:
        return torchvision.models.get_model_weights(arch).DEFAULT.get_state_dict(progress=True)
    if isinstance(weights, dict):
        return weights
    return read_weights(weights)


# ------------------------------------------------------------------------------------------------------------------

MODELS = {"swinunet": SwinUNet, "resunet": ResUNet, "deeplabv3plus": DeepLabV3Plus}


def build_model(name: str, num_classes: int, **kwargs) -> nn.Module:
    """``build_model("swinunet", 21)``; keyword arguments go to the network's constructor."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    return MODELS[name](num_classes, **kwargs)
