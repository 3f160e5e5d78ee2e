"""The CRM network: dilated ResNet encoder, 1x1 "ASPP" neck, LIIF implicit decoder.

Module and parameter names follow the authors' release (`feats`, `aspp_`, `imnet`) so that their checkpoint
loads without renaming. layer4 is not built: the release computes it and never uses it.

The decoder is evaluated in a factored but exact form. The MLP's first layer is linear, so
    W1 @ [feat(z), rel_coord, coord, rel_cell] = (W1_feat @ F)(z) + W1_rel @ rel_coord + W1_coord @ coord + c:
we project the 256-d feature map to 32-d once (`project`), gather 32-d vectors instead of 256-d ones, and add
the position terms, which depend on the query row or the query column only. See `decode_rows`.
"""
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .cpu import add_relu_, core_workers, fused_linear, linear_relu, per_core
from .inputs import resize_sources
from .kernels import checked_fused_ensemble, fused_decoder_available

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The four LIIF neighbours as (row, column) shifts, in the release's order; weights swap 0<->3 and 1<->2.
SHIFTS = ((-1, -1), (-1, 1), (1, -1), (1, 1))
TRUNK_BYTES_PER_PX_PER_WIDTH = 5  # peak inference activations of the trunk per input pixel, per unit of width
_EPS_SHIFT = 1e-6
# The fusion conv's row slabs (`encode_projected`): each slab's output is sized to a third of this (about 21 MB),
# so that it and the slab's other tensors stay under glibc's mmap threshold (at most 32 MB): freed slabs are then
# reused by the next one instead of being unmapped and page-faulted in again, which cost 10 % of the encoder at 2K
# (docs/benchmark.md).
FUSION_SLAB_BYTES = 64 << 20
# CPU inference (`CRM._ensemble_cpu`): activations per MLP layer call, 9216 rows of 32 floats, on one core (the
# refiner decodes a chunk per core, `crm_d2.cpu.per_core`). A 2K decode on two Zen 4 cores, one worker each:
# 0.82-0.84 s with these 1152 KB, 0.87-0.88 s with 576 KB, 0.86-0.91 s with 2304 KB, 0.99-1.02 s with 288 KB.
CPU_BLOCK_BYTES = 1152 << 10
MASK_GAIN_INIT = 3.0  # a fresh skip passes the mask through as p = sigmoid(+-3) = 0.95 / 0.05


@dataclass
class CRMConfig:
    """Architecture of a CRM network; the default is the released ResNet-50 model."""

    layers: tuple = (3, 4, 6)  # bottleneck blocks in layer1..layer3
    width: int = 64  # stem channels; layerK outputs 4 * width * 2**(K-1)
    hidden: int = 32  # MLP width
    depth: int = 4  # MLP hidden layers
    dropout: float = 0.5
    # Not in the release: add `mask_gain * mask` (the stage's input mask in [-1, 1] at each query point) to the
    # output logit, so that the network learns corrections to the mask rather than the mask itself.
    mask_skip: bool = False
    # Not in the release: channels of a small full-resolution head (`PixelHead`) that corrects the decoder's
    # logit from the image, the input mask and the decoded mask around each pixel (0 = none). The decoder's
    # features are at stride 2; this is the only part that sees single pixels.
    pixel_head: int = 0

    PRESETS = {
        "r50": dict(layers=(3, 4, 6), width=64),
        # A third of ResNet-50's convolution work and 3.0M parameters (6 MB in fp16): a GPU-trained default
        # that still runs on a CPU.
        "small": dict(layers=(2, 2, 3), width=48),
        # Narrow and shallow: a few MB, for CPU demos and fast tests.
        "tiny": dict(layers=(1, 1, 2), width=32),
    }

    def __post_init__(self):
        self.layers = tuple(int(n) for n in self.layers)
        if len(self.layers) != 3 or min(self.layers) < 1:
            raise ValueError(f"layers must be three positive block counts, got {self.layers}")
        if self.width < 4 or self.hidden < 1 or self.depth < 1 or self.pixel_head < 0:
            raise ValueError(f"invalid CRM config {self.to_dict()}")

    @classmethod
    def preset(cls, name):
        if name not in cls.PRESETS:
            raise ValueError(f"unknown CRM preset {name!r}; known: {sorted(cls.PRESETS)}")
        return cls(**cls.PRESETS[name])

    @classmethod
    def from_dict(cls, d):
        """A config from a dict of fields; a `preset` name gives the defaults that the other keys override."""
        d = dict(d)
        name = d.pop("preset", None)
        d = {**(cls.preset(name).to_dict() if name else {}), **d}
        unknown = set(d) - {f for f in cls.__dataclass_fields__}
        if unknown:
            raise ValueError(f"unknown CRM config keys: {sorted(unknown)}")
        return cls(**d)

    def to_dict(self):
        d = asdict(self)
        d["layers"] = list(self.layers)
        return d

    @property
    def feat_dim(self):
        return 4 * self.width



# ----------------------------------------------------------------------------------------------- encoder
class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, dilation=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        if not self.training and not torch.is_grad_enabled():
            return self._inference(x)
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)

    def _inference(self, x):
        """Same maths with BN applied in place and the shortcut added in place: at 6K the first block of layer1
        otherwise holds four 256-channel copies of a quarter-resolution map at once."""
        out = bn_(self.bn1, self.conv1(x)).relu_()
        out = bn_(self.bn2, self.conv2(out)).relu_()
        out = bn_(self.bn3, self.conv3(out))
        out += x if self.downsample is None else bn_(self.downsample[1], self.downsample[0](x))
        return out.relu_()

    def folded(self, x, consume_input=False):
        """`_inference` with every BN folded into the convolution before it (`conv_bn`): one pass over each
        activation fewer, the same result to float rounding. The refiner's encoder path.

        The shortcut's buffer becomes the output: conv3's product is accumulated onto it in place, so the block
        allocates no output of its own. Fresh memory costs page faults on the CPU (a fifth of the encoder's time
        at 2K before this); with `consume_input` the block's input is that buffer (`run_folded`: a block's input
        is the previous block's output, read by nothing else)."""
        out = conv_bn(self.conv1, self.bn1, x, relu=True)
        out = conv_bn(self.conv2, self.bn2, out, relu=True)
        if self.downsample is not None:
            identity = conv_bn(self.downsample[0], self.downsample[1], x)
        else:
            identity = x if consume_input else x.clone(memory_format=torch.channels_last)
        return conv_bn_into(self.conv3, self.bn3, out, identity).relu_()


def bn_(bn, x):
    """Eval-mode BatchNorm applied in place (inference only)."""
    scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
    shift = bn.bias - bn.running_mean * scale
    return x.mul_(scale.view(1, -1, 1, 1)).add_(shift.view(1, -1, 1, 1))


def conv_bn(conv, bn, x, relu=False):
    """conv(x) followed by eval-mode BatchNorm, as one convolution whose weights and bias carry the BN
    (inference); then a ReLU where asked, in the same pass where the backend can.

    Folding saves a read and a write of the convolution's output, which at full resolution is most of what the
    BN costs."""
    weight, bias = folded_conv_bn(conv, bn)
    if is_pointwise(conv) and x.is_contiguous(memory_format=torch.channels_last):
        return pointwise_conv(x, weight, bias, relu)
    out = F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    return out.relu_() if relu else out


def conv_bn_into(conv, bn, x, into):
    """into += conv_bn(conv, bn, x), in place (inference). For a 1x1 conv on channels_last tensors this is one
    GEMM that accumulates on `into`'s memory (beta = 1): no output is allocated."""
    weight, bias = folded_conv_bn(conv, bn)
    cl = torch.channels_last
    if is_pointwise(conv) and x.is_contiguous(memory_format=cl) and into.is_contiguous(memory_format=cl):
        flat = into.permute(0, 2, 3, 1).reshape(-1, into.shape[1])  # views: both are channels_last
        weight = weight.reshape(weight.shape[0], -1).t().to(into.dtype)  # in-place ops do not autocast
        flat.addmm_(x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]).to(into.dtype), weight)
        return into.add_(bias.view(1, -1, 1, 1))
    return into.add_(F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups))


def folded_conv_bn(conv, bn):
    """The weight and bias of `conv` followed by eval-mode `bn`, as one convolution.

    They are cached on the conv and made again whenever a parameter or running statistic of either module
    changes (their tensors' version counters: `load_state_dict` and in-place edits bump them), so the model
    itself stays as trained and saved. They are kept channels_last: with channels_last inputs oneDNN then runs
    without reordering activations between layers (docs/benchmark.md).
    """
    tensors = (conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var)
    key = tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors)
    cached = conv.__dict__.get("_folded")
    if cached is None or cached[0] != key:
        scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
        weight = (conv.weight * scale.view(-1, 1, 1, 1)).contiguous(memory_format=torch.channels_last)
        cached = (key, weight, bn.bias - bn.running_mean * scale)
        conv.__dict__["_folded"] = cached
    return cached[1], cached[2]


def is_pointwise(conv):
    """A 1x1 convolution with stride 1: a matrix product over the channels at every pixel."""
    return conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.groups == 1 and conv.padding in ((0, 0), 0)


def pointwise_conv(x, weight, bias, relu=False):
    """A 1x1, stride-1 convolution of a channels_last tensor as one matrix product on its NHWC memory, with the
    bias and a ReLU in the product's epilogue where oneDNN can (`fused_linear`).

    On the CPU torch sends 1x1 convolutions to its generic path, which copies a channels_last input to NCHW and
    back (about a quarter of the encoder's time at 2K); in NHWC memory the convolution is already one
    (pixels x channels) @ (channels x out) product. The result is a channels_last NCHW view, no copy."""
    y = fused_linear(x.permute(0, 2, 3, 1), weight.reshape(weight.shape[0], -1), bias, relu)
    return y.permute(0, 3, 1, 2)


def run_folded(layer, x):
    """A Sequential of Bottlenecks with their BNs folded (`Bottleneck.folded`)."""
    for k, block in enumerate(layer):
        x = block.folded(x, consume_input=k > 0)
    return x


class Encoder(nn.Module):
    """ResNet to layer3 at output stride 8 (layer3 dilated), 4 input channels (RGB + mask)."""

    def __init__(self, layers, width):
        super().__init__()
        self.inplanes = width
        self.conv1 = nn.Conv2d(4, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(width, layers[0])
        self.layer2 = self._make_layer(width * 2, layers[1], stride=2)
        # As released: the first block of a dilated layer is not dilated.
        self.layer3 = self._make_layer(width * 4, layers[2], dilation=2)

    def _make_layer(self, planes, blocks, stride=1, dilation=1):
        downsample = None
        if stride != 1 or self.inplanes != planes * 4:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * 4, 1, stride, bias=False), nn.BatchNorm2d(planes * 4)
            )
        mods = [Bottleneck(self.inplanes, planes, stride, 1, downsample)]
        self.inplanes = planes * 4
        mods += [Bottleneck(self.inplanes, planes, 1, dilation) for _ in range(1, blocks)]
        return nn.Sequential(*mods)

    def forward(self, x):
        x1 = self.relu(self.bn1(self.conv1(x)))  # stride 2
        x2 = self.layer1(self.maxpool(x1))  # stride 4
        x3 = self.layer3(self.layer2(x2))  # stride 8
        return x1, x2, x3


# ----------------------------------------------------------------------------------------------- neck
class _ConvBN(nn.Module):
    """1x1 conv + BN + ReLU with the release's parameter names (`atrous_conv`, `bn`)."""

    def __init__(self, cin, cout):
        super().__init__()
        self.atrous_conv = nn.Conv2d(cin, cout, 1, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return F.relu(self.bn(self.atrous_conv(x)), inplace=True)


class Neck(nn.Module):
    """Fuses the three encoder levels into one feature map at stride 2 (the release's `ASPP_no4level`).

    Attribute names carry the released model's channel counts (128/256/1024) whatever the width, so that
    every variant shares one key layout.
    """

    def __init__(self, width, dropout):
        super().__init__()
        w = width
        self.aspp1_128 = _ConvBN(w, w)
        self.aspp1_256 = _ConvBN(4 * w, w)
        self.aspp1_1024 = _ConvBN(16 * w, 2 * w)
        self.bn1_128 = nn.BatchNorm2d(w)
        self.bn1_256 = nn.BatchNorm2d(w)
        self.bn1_1024 = nn.BatchNorm2d(2 * w)
        self.dropout = nn.Dropout(dropout)
        self.last_conv = nn.Sequential(
            nn.Conv2d(4 * w, 4 * w, 3, padding=1, bias=False),
            nn.BatchNorm2d(4 * w),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
        )

    def branch(self, x, conv, bn):
        if not self.training and not torch.is_grad_enabled():  # in place: these maps are GBs at 6K
            return bn_(bn, bn_(conv.bn, conv.atrous_conv(x)).relu_()).relu_()
        return self.dropout(F.relu(bn(conv(x)), inplace=True))

    def folded_branch(self, x, conv, bn):
        """`branch` in inference with the conv's own BN folded (`conv_bn`); the outer BN follows a ReLU and
        stays a separate (in-place) pass."""
        return bn_(bn, conv_bn(conv.atrous_conv, conv.bn, x, relu=True)).relu_()

    def folded_fusion_parts(self):
        """`last_conv`'s weights with its BN folded (`folded_conv_bn`; dropout is the identity in inference),
        split by the part of its input they read (b1, b2, b3), and its bias."""
        weight, bias = folded_conv_bn(self.last_conv[0], self.last_conv[1])
        w = self.aspp1_128.atrous_conv.out_channels
        parts = (weight[:, :w], weight[:, w : 2 * w], weight[:, 2 * w :])  # slices: made contiguous once here,
        return (*(p.contiguous(memory_format=torch.channels_last) for p in parts), bias)  # not by every slab's conv

    def forward(self, x1, x2, x3):
        b1 = self.branch(x1, self.aspp1_128, self.bn1_128)
        size = b1.shape[-2:]
        b2 = F.interpolate(self.branch(x2, self.aspp1_256, self.bn1_256), size, mode="bilinear", align_corners=True)
        b3 = F.interpolate(self.branch(x3, self.aspp1_1024, self.bn1_1024), size, mode="bilinear", align_corners=True)
        return self.last_conv(torch.cat((b1, b2, b3), 1))


class PixelHead(nn.Module):
    """A logit correction from 3x3 convolutions at the decoded grid, confined to the decoder's boundary.

    Input per pixel: the ImageNet-normalised RGB, the stage's input mask and the decoded mask (both in [-1, 1]).
    Its output is added to the decoder's logit only within BAND px of the decoded boundary: the head moves the
    boundaries the decoder placed and cannot draw new regions. A local view has no idea of objects; unconfined,
    it turned dark image edges and skin next to a pet into foreground. The last convolution starts at zero, so
    a head added to a trained model leaves its output unchanged until the head is trained (`crm-d2 train` with
    model.freeze).
    """

    HALO = 5  # rows of context one output reads: the convolutions' radius (dilations 1, 1, 2, 1) >= BAND
    BAND = 3

    def __init__(self, channels):
        super().__init__()
        c = channels
        self.body = nn.Sequential(
            nn.Conv2d(5, c, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(c, c, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(c, c, 3, padding=2, dilation=2), nn.ReLU(inplace=True),
            nn.Conv2d(c, 1, 3, padding=1),
        )
        nn.init.zeros_(self.body[-1].weight)
        nn.init.zeros_(self.body[-1].bias)

    def forward(self, logits, image, prior):
        """logits, prior: B x 1 x H x W; image: B x 3 x H x W (normalised) -> corrected logits."""
        fg = (logits > 0).float()
        k, r = 2 * self.BAND + 1, self.BAND
        band = F.max_pool2d(fg, k, 1, r) != -F.max_pool2d(-fg, k, 1, r)
        out = self.body(torch.cat((image, prior, torch.sigmoid(logits) * 2 - 1), 1))
        return logits + out * band

    def apply_rows(self, logits, image, prior, budget=256 << 20):
        """`forward` on B x H x W logits in row slabs (with a HALO-row margin) whose activations fit `budget`
        bytes; image: B or 1 x 3 x H x W, prior: B x H x W. Equal to the one-shot result."""
        B, H, W = logits.shape
        out = torch.empty_like(logits)
        rows = max(1, budget // (B * W * 4 * 3 * self.body[0].out_channels))
        h = self.HALO
        for r0 in range(0, H, rows):
            r1 = min(H, r0 + rows)
            lo, hi = max(0, r0 - h), min(H, r1 + h)
            im = image[:, :, lo:hi].expand(B, -1, -1, -1)
            y = self(logits[:, None, lo:hi], im, prior[:, None, lo:hi])
            out[:, r0:r1] = y[:, 0, r0 - lo : r1 - lo]
        return out


class MLP(nn.Module):
    def __init__(self, in_dim, hidden, depth):
        super().__init__()
        mods, last = [], in_dim
        for _ in range(depth):
            mods += [nn.Linear(last, hidden), nn.ReLU()]
            last = hidden
        mods.append(nn.Linear(last, 1))
        self.layers = nn.Sequential(*mods)

    def forward(self, x):
        return self.layers(x)


# ----------------------------------------------------------------------------------------------- coordinates
def make_coord(n, device=None):
    """Centres of n equal cells spanning (-1, 1), computed as LIIF does so indices round identically."""
    r = 1.0 / n
    return -1 + r + (2 * r) * torch.arange(n, device=device, dtype=torch.float32)


def axis_neighbours(q, n_feat, offset=0, n_local=None):
    """Per-axis LIIF neighbour lookup of query coordinates q (L,) on a feature axis of n_feat cells over (-1, 1).

    Returns, for the shifts -1 and +1, the nearest feature indices (2, L) and rel = (q - cell centre) * n_feat
    (2, L). Rows and columns are independent, which is what lets the decoder work on separable terms instead of
    per-pixel coordinate tensors. `offset`/`n_local` index into a crop of the feature axis (tiled decoding).
    """
    rad = 1.0 / n_feat
    idx, rel = [], []
    for v in (-1, 1):
        qs = (q + (v * rad + _EPS_SHIFT)).clamp_(-1 + 1e-6, 1 - 1e-6)
        # grid_sample(mode="nearest", align_corners=False): unnormalise, then round half to even.
        i = torch.round(((qs + 1) * n_feat - 1) / 2).long().clamp_(0, n_feat - 1)
        rel.append((q - (-1 + rad + (2 * rad) * i.float())) * n_feat)
        idx.append((i - offset).clamp_(0, (n_local or n_feat) - 1))
    return torch.stack(idx), torch.stack(rel)


# ----------------------------------------------------------------------------------------------- model
def ensemble_weights(area_y, area_x):
    """LIIF's local ensemble weights from the neighbours' |rel| per row (2 x R) and per column (2 x C): each
    neighbour's weight is the area of the diagonally opposite one, as R x 2 x 2 x C (row shift, column shift), and
    their sum R x C (with the release's 1e-9 per neighbour)."""
    opposite = area_y.flip(0).t()[:, :, None, None] * area_x.flip(0)[None, None] + 1e-9
    total = (area_y[0] + area_y[1])[:, None] * (area_x[0] + area_x[1])[None] + 4e-9
    return opposite, total


class CRM(nn.Module):
    def __init__(self, cfg=None):
        super().__init__()
        self.cfg = cfg = cfg or CRMConfig()
        self.feats = Encoder(cfg.layers, cfg.width)
        self.aspp_ = Neck(cfg.width, cfg.dropout)
        self.imnet = MLP(cfg.feat_dim + 6, cfg.hidden, cfg.depth)
        if cfg.mask_skip:
            self.mask_gain = nn.Parameter(torch.tensor(MASK_GAIN_INIT))
        if cfg.pixel_head:
            self.pixel_head = PixelHead(cfg.pixel_head)

    def mask_logit(self, prior):
        """The skip's share of the logit for a mask in [-1, 1] at the query points, or None without a skip."""
        return self.mask_gain * prior if self.cfg.mask_skip else None

    @contextmanager
    def mask_gain_times(self, factor):
        """Within the block the skip's gain is `factor` times its own: below 1 the model trusts its input mask
        less and corrects more (the GrabCut gate's second look at masks it finds coarse, `crm_d2.grabcut`)."""
        if not self.cfg.mask_skip:
            raise ValueError("this model has no mask skip, so there is no gain to scale")
        gain = self.mask_gain.detach().clone()
        with torch.no_grad():
            self.mask_gain.mul_(float(factor))
        try:
            yield self
        finally:
            with torch.no_grad():
                self.mask_gain.copy_(gain)

    def encode(self, x):
        """x: Bx4xhxw (normalised RGB + mask in [-1, 1]) -> feature map Bx(4*width)xceil(h/2)xceil(w/2)."""
        return self.aspp_(*self.feats(x))

    def encode_projected(self, x, budget=256 << 20, trunk_budget=None):
        """`project(encode(x))` without ever holding the 256-channel stride-2 feature map, and with the neck's
        fusion conv computed in a cheaper, equal form.

        At 6K that map alone is 6 GB; here the fusion conv runs over row slabs sized from `budget` bytes, and
        each slab is projected to the MLP width at once. When the trunk's activations would exceed
        `trunk_budget` bytes, the trunk runs over row tiles (`branches`).

        The fusion conv is a 3x3 conv over [b1, up(b2), up(b3)]: the stride-4 and stride-8 branches bilinearly
        upsampled to stride 2. It is linear in each part, so it is summed part by part; the upsampled parts
        never exist (`UpsampledConv`), which takes 60 % of the conv's multiply-adds away.
        """
        n = self.aspp_
        x = x.contiguous(memory_format=torch.channels_last)
        stem, b2, b3 = self.branches(x, trunk_budget)
        B, Hf, Wf = x.shape[0], (x.shape[-2] + 1) // 2, (x.shape[-1] + 1) // 2
        out = x.new_empty(B, Hf, Wf, self.cfg.hidden)
        w = self.imnet.layers[0].weight[:, : self.cfg.feat_dim]
        w1, w2, w3, bias = n.folded_fusion_parts()
        cpu = x.device.type == "cpu"
        cap = min(budget, FUSION_SLAB_BYTES) if cpu else budget  # glibc's threshold: CPU only
        rows = max(1, cap // (B * Wf * self.cfg.feat_dim * 4 * 3))
        # On the CPU, a map of two slabs or more per core is fused as one row range per core (`per_core`): the
        # slabs' products are small and their passes memory-bound, so a core on its own rows waits for no other
        # (a 2K exact refine 1-6 % faster, docs/benchmark.md); fast mode's small crops gain nothing and stay serial.
        # Slabs shrink so that all those in flight keep under `cap`. Not after a tiled trunk: each slab then
        # recomputes its stem rows with a halo, which smaller slabs pay more often (6000x4000: 3-8 % slower, and
        # 0.56 GB more at the peak, in the workers' malloc arenas).
        threads = core_workers()
        workers = threads if cpu and stem is not None and Hf >= 2 * threads * rows else 1
        autocast = torch.is_autocast_enabled(x.device.type)  # the product is then bfloat16, `out` float32
        rows = max(1, rows // workers)

        def fuse(part):
            up2, up3 = UpsampledConv(b2, w2, (Hf, Wf)), UpsampledConv(b3, w3, (Hf, Wf))
            for r0 in range(part[0], part[1], rows):
                r1 = min(part[1], r0 + rows)
                lo, hi = max(0, r0 - 1), min(Hf, r1 + 1)
                if stem is None:
                    part1 = self._stem_branch_rows(x, lo, hi)
                else:
                    part1 = n.folded_branch(stem[:, :, lo:hi], n.aspp1_128, n.bn1_128)
                if lo > r0 - 1 or hi < r1 + 1:  # zero rows where the slab meets the map's edge: the conv's padding
                    part1 = F.pad(part1, (0, 0, lo - (r0 - 1), (r1 + 1) - hi))
                pre = F.conv2d(part1.contiguous(memory_format=torch.channels_last), w1, bias, padding=(0, 1))
                up2.add_rows(pre, r0)
                up3.add_rows(pre, r0)
                features, rows_out = pre.relu_().permute(0, 2, 3, 1), out[:, r0:r1]
                if rows_out.is_contiguous() and not autocast:  # one image: the product is written in place
                    torch.matmul(features, w.t(), out=rows_out)
                else:
                    rows_out.copy_(torch.matmul(features, w.t()))

        bounds = [Hf * k // workers for k in range(workers + 1)]
        parts = [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]
        per_core(fuse, parts)
        return out

    def branches(self, x, budget=None):
        """The stem's map and the neck's 1x1 branches of the two deeper levels (inference), row tile by row tile
        when needed.

        The stride-2 branch is applied to the stem's map slab by slab in `encode_projected`, where its rows are
        still in cache: as a whole map it is one more 4 x width bytes per stride-2 pixel, made fresh (page faults)
        and read back from memory. Each deeper level is reduced by its branch and freed as soon as it has been
        used. If the trunk's activations
        (about TRUNK_BYTES_PER_PX_PER_WIDTH x width bytes per input pixel) exceed `budget`, the input is cut
        into row tiles, each run with `trunk_halo()` extra rows of context on both sides, and only the tiles'
        own rows are kept: the result equals the untiled one (to float rounding), at a bounded peak. Tiled,
        the stem's map is returned as None (see below).
        """
        B, _, H, W = x.shape
        per_row = B * W * TRUNK_BYTES_PER_PX_PER_WIDTH * self.cfg.width
        halo = self.trunk_halo()
        if budget is None or H * per_row <= budget:
            return self._branches(x)
        step = max(8, (budget // per_row - 2 * halo) // 8 * 8)  # multiples of the trunk's stride: grids align
        out = None
        for a in range(0, H, step):
            b = min(H, a + step)
            c0, c1 = max(0, a - halo), min(H, b + halo)
            parts = self._branches(x[:, :, c0:c1], keep_stem=False)[1:]
            if out is None:
                out = [p.new_empty(*p.shape[:2], -(-H // s), p.shape[-1]) for p, s in zip(parts, (4, 8))]
            for o, p, s in zip(out, parts, (4, 8)):
                lo, hi = a // s, -(-b // s)
                o[:, :, lo:hi] = p[:, :, lo - c0 // s : hi - c0 // s]
            del parts
        # The stem's map is the largest (64 bytes per input pixel for ResNet-50, 1.5 GB at 6K) and cheap to
        # compute: it is recomputed, with its branch, row slab by row slab when fused (`_stem_branch_rows`).
        return (None, *out)

    def _stem_branch_rows(self, x, lo, hi):
        """Rows lo..hi of the stride-2 branch, from the input rows they depend on (the 7x7 stem: 3 rows)."""
        n = self.aspp_
        c0, c1 = max(0, 2 * lo - 8), min(x.shape[-2], 2 * hi + 8)  # even start: the stride-2 grid aligns
        y = self._stem(x[:, :, c0:c1])
        return n.folded_branch(y, n.aspp1_128, n.bn1_128)[:, :, lo - c0 // 2 : hi - c0 // 2]

    def _stem(self, x):
        return conv_bn(self.feats.conv1, self.feats.bn1, x, relu=True)

    def _branches(self, x, keep_stem=True):
        """(stem map, b2, b3); the stem's map is None with keep_stem=False (row tiles: it is recomputed per fusion
        slab instead)."""
        n, f = self.aspp_, self.feats
        stem = self._stem(x)
        x = f.maxpool(stem)
        if not keep_stem:  # freed before the trunk: held through it, a 6000x4000 refine peaked 0.4 GB higher
            stem = None
        x = run_folded(f.layer1, x)
        b2 = n.folded_branch(x, n.aspp1_256, n.bn1_256)
        x = run_folded(f.layer3, run_folded(f.layer2, x))
        return stem, b2, n.folded_branch(x, n.aspp1_1024, n.bn1_1024)

    def trunk_halo(self):
        """Input rows on each side that one trunk output depends on (its receptive-field radius), with a stride
        of slack, rounded up to 32."""
        l1, l2, l3 = self.cfg.layers
        # conv1 7x7 (3 px), max-pool at stride 2 (2), layer1 3x3 at stride 4, layer2 (the first at stride 4,
        # then 8), layer3 (the first undilated at stride 8, then dilation 2).
        radius = 3 + 2 + 4 * l1 + 4 + 8 * (l2 - 1) + 8 + 16 * (l3 - 1)
        return -(-(radius + 8) // 32) * 32

    def project(self, feat):
        """Apply the feature part of the MLP's first layer once per feature cell: BxCxhxw -> Bxhxwx hidden."""
        w = self.imnet.layers[0].weight[:, : self.cfg.feat_dim]
        return torch.einsum("bchw,kc->bhwk", feat, w)

    def decode_rows(self, proj, out_size, rows, cols=None):
        """Logits of the query pixels rows x cols of an out_size grid (the release's decoding, exactly).

        proj: B x Hf x Wf x hidden (from `project`); rows/cols: (start, stop) ranges of the out_size grid
        (cols None = all). Returns B x R x C logits.
        """
        H, W = out_size
        c0, c1 = cols if cols is not None else (0, W)
        qy = make_coord(H, proj.device)[rows[0] : rows[1]]
        qx = make_coord(W, proj.device)[c0:c1]
        return self.decode(proj, qy, qx, cell=(2.0 / H, 2.0 / W))

    def decode(self, proj, qy, qx, cell, feat_grid=None, offset=(0, 0)):
        """Logits at the query coordinates qy x qx (in (-1, 1)) with LIIF's local ensemble.

        cell: the query cell size (2/H_out, 2/W_out). feat_grid: the size of the whole feature map when `proj`
        is only a crop of it starting at cell `offset` (tiled decoding); default: proj is the whole map.
        """
        rows, cols = self.query_terms(proj, qy, qx, cell, feat_grid, offset)
        return self.ensemble(proj, rows, cols)

    def query_terms(self, proj, qy, qx, cell, feat_grid=None, offset=(0, 0)):
        """Everything the decoder needs from the query positions, per row and per column.

        Returns (iy, row_term, area_y) and (ix, col_term, area_x): nearest feature indices (2, L) for the shifts
        -1/+1, the first MLP layer's position terms (2, L, hidden) and |rel| (2, L). Slicing the row triple along
        its second axis gives the terms of a chunk of rows.
        """
        Hl, Wl = proj.shape[1:3]
        Hf, Wf = feat_grid or (Hl, Wl)
        wpos, const = self._position_weights(proj.dtype, cell, (Hf, Wf))
        iy, ry = axis_neighbours(qy, Hf, offset[0], Hl)
        ix, rx = axis_neighbours(qx, Wf, offset[1], Wl)
        row_term = ry[..., None] * wpos[:, 0] + (qy[:, None] * wpos[:, 2] + const)[None]
        col_term = rx[..., None] * wpos[:, 1] + (qx[:, None] * wpos[:, 3])[None]
        return (iy, row_term, ry.abs()), (ix, col_term, rx.abs())

    def _position_weights(self, dtype, cell, feat_grid):
        """The first MLP layer's columns after the feature (rel y, rel x, coord y, coord x, cell y, cell x), and
        its bias plus the cell term, which is the same for every query of a grid."""
        first = self.imnet.layers[0]
        wpos = first.weight[:, self.cfg.feat_dim :].to(dtype)
        return wpos, first.bias + wpos[:, 4] * (cell[0] * feat_grid[0]) + wpos[:, 5] * (cell[1] * feat_grid[1])

    @staticmethod
    def _blend(logits, weights):
        """LIIF's local ensemble: each neighbour's logit weighted by the area of the diagonally opposite one."""
        total = weights[0] + weights[1] + weights[2] + weights[3]
        out = 0
        for k in range(4):
            out = out + logits[k] * (weights[3 - k] / total)
        return out

    def ensemble(self, proj, rows, cols):
        """B x R x C logits: the MLP on each of the 4 neighbours, blended by opposite areas (on logits).

        In inference on CUDA this runs as one fused Triton kernel (`crm_d2.kernels`) when Triton is installed and
        CRM_D2_TRITON=1 opts in (docs/benchmark.md, "GPU").
        """
        if not torch.is_grad_enabled() and fused_decoder_available(proj, self.cfg.hidden):
            return checked_fused_ensemble(proj, rows, cols, self.imnet.layers,
                                          lambda: self._ensemble_torch(proj, rows, cols))
        return self._ensemble_torch(proj, rows, cols)

    def _ensemble_torch(self, proj, rows, cols):
        """`_blend` of the four neighbours' logits in torch: `_ensemble_cpu` for float32 inference on the CPU,
        else `_ensemble_plain` (training, autograd; CUDA, whose chunks the memory budget sizes for it)."""
        weight = self.imnet.layers[0].weight
        if proj.device.type == "cpu" and proj.dtype == weight.dtype == torch.float32 and not torch.is_grad_enabled():
            return self._ensemble_cpu(proj, rows, cols)
        return self._ensemble_plain(proj, rows, cols)

    def _ensemble_plain(self, proj, rows, cols):
        """`_blend` of the four neighbours' logits: the feature rows of a row shift are gathered once, with their
        row term added at the feature grid's width, and shared by both column shifts; each logit is accumulated
        into the blend as soon as it exists. Same sums as `_blend`, other order."""
        (iy, row_term, area_y), (ix, col_term, area_x) = rows, cols
        opposite, total = ensemble_weights(area_y, area_x)
        out = None
        for a in (0, 1):
            by_row = proj[:, iy[a]]  # B x R x Wf x hidden
            by_row += row_term[a][None, :, None]
            for b in (0, 1):
                h = by_row[:, :, ix[b]]  # B x R x C x hidden: gathered 32-d projections
                h += col_term[b][None, None]
                logit = self._mlp_tail(h)
                out = logit.mul_(opposite[:, a, b]) if out is None else out.addcmul_(logit, opposite[:, a, b])
        return out.div_(total)

    def _ensemble_cpu(self, proj, rows, cols):
        """`_ensemble_plain` for CPU inference with its overheads taken out: the same sums, to float rounding.

        The work goes in blocks of whole query rows of one batch item. In a block the four neighbours are one
        batch of MLP rows, so that each layer is one matrix product, over slices of about CPU_BLOCK_BYTES of
        activations. The first layer's inputs come from a gather of the two row shifts' feature rows (their row
        terms added at the feature grid's width) and a gather of whole hidden-d rows by flat index
        (`index_select` of contiguous rows: advanced indexing along a middle dimension costs several times as
        much) into a buffer that every block reuses (fresh multi-MB allocations cost page faults); the column
        terms are added and the ReLU applied in one pass. The hidden layers run as oneDNN's linear with the bias
        and the ReLU fused (`linear_relu`). The logits are blended once per call.
        """
        (iy, row_term, area_y), (ix, col_term, area_x) = rows, cols
        B, _, Wl, K = proj.shape
        R, C = iy.shape[1], ix.shape[1]
        if B * R * C == 0:
            return self._ensemble_plain(proj, rows, cols)
        last = self.imnet.layers[-1]
        col = col_term.reshape(2 * C * K)
        block = CPU_BLOCK_BYTES // (4 * K)  # MLP rows per layer call
        step = min(R, max(1, block // (4 * C)))  # query rows per block

        def gather_index(n):  # (r, a, b, c) -> row a*n + r, column ix[b, c] of a block's n x 2 feature rows
            first = torch.arange(2 * n, device=proj.device).view(2, n, 1, 1).transpose(0, 1) * Wl
            return (first + ix.reshape(1, 1, 2, C)).reshape(-1)

        logits = proj.new_empty(B, R, 4, C)  # (b, r, row shift, column shift, c)
        h_all = proj.new_empty(step * 4 * C, K)
        index = gather_index(step)
        for r0 in range(0, R, step):
            n = min(step, R - r0)
            if n != step:
                index = gather_index(n)
            m = n * 4 * C
            size = -(-m // -(-m // block))  # m in equal slices of at most `block` rows
            terms = row_term[:, r0 : r0 + n].reshape(2 * n, 1, K)
            for b in range(B):
                by_row = proj[b].index_select(0, iy[:, r0 : r0 + n].reshape(-1)).add_(terms)  # 2n x Wl x K
                h = torch.index_select(by_row.view(-1, K), 0, index, out=h_all[:m])
                add_relu_(h.view(-1, 2 * C * K), col)
                out = logits[b, r0 : r0 + n].view(-1)
                for s in range(0, m, size):
                    torch.mv(self._hidden(h[s : s + size]), last.weight[0], out=out[s : s + size])
        logits += last.bias
        opposite, total = ensemble_weights(area_y, area_x)
        return (logits * opposite.reshape(R, 4, C)).sum(2).div_(total)

    def _mlp_tail(self, h):
        """The MLP after its first layer's product: ReLU, the hidden layers, the output layer -> logits."""
        last = self.imnet.layers[-1]
        return F.linear(self._hidden(h.relu_()), last.weight, last.bias)[..., 0]

    def _hidden(self, h):
        """The MLP's hidden layers after the first, each with its ReLU (`linear_relu`: fused on the CPU)."""
        layers = self.imnet.layers
        for i in range(2, len(layers) - 1, 2):
            h = linear_relu(h, layers[i])
        return h

    def decode_points(self, proj, qy, qx, cell):
        """Logits at B x N scattered query points (qy, qx: B x N coordinates in (-1, 1)), for training losses
        that need only a sample of the pixels. Same maths as `decode` (which works on row x column grids)."""
        B, Hf, Wf, C = proj.shape
        wpos, const = self._position_weights(proj.dtype, cell, (Hf, Wf))
        iy, ry = (t.view(2, B, -1) for t in axis_neighbours(qy.reshape(-1), Hf))
        ix, rx = (t.view(2, B, -1) for t in axis_neighbours(qx.reshape(-1), Wf))
        pos = qy[..., None] * wpos[:, 2] + qx[..., None] * wpos[:, 3] + const
        flat = proj.reshape(B, Hf * Wf, C)
        logits, weights = [], []
        for vy, vx in SHIFTS:
            a, b = (vy + 1) // 2, (vx + 1) // 2
            h = torch.gather(flat, 1, (iy[a] * Wf + ix[b])[..., None].expand(-1, -1, C))
            h = h + ry[a][..., None] * wpos[:, 0] + rx[b][..., None] * wpos[:, 1] + pos
            logits.append(self._mlp_tail(h))
            weights.append(ry[a].abs() * rx[b].abs() + 1e-9)
        return self._blend(logits, weights)

    def forward(self, x, out_size=None, prior=None, sample=None, image=None):
        """Training use: logits Bx1xHxW for every pixel of out_size (default: the input's size).

        prior: the input mask in [-1, 1] at out_size (B x 1 x H x W), for the mask skip and the pixel head.
        image: the normalised RGB at out_size, for the pixel head. sample: a `QuerySample` to decode only some
        pixels (then returns (patch logits B x 1 x h x w, point logits B x N)).
        """
        out_size = tuple(out_size or x.shape[-2:])
        if (self.cfg.mask_skip or self.cfg.pixel_head) and prior is None:
            raise ValueError("this CRM has a mask skip or a pixel head: forward() needs the prior mask at the "
                             "output size")
        if self.cfg.pixel_head and (image is None or sample is not None):
            raise ValueError("this CRM has a pixel head: forward() needs the image at the output size and decodes "
                             "every pixel (sampling.points=0)")
        proj = self.project(self.encode(x))
        H, W = out_size
        cell = (2.0 / H, 2.0 / W)
        if sample is None:
            out = self.decode_rows(proj, out_size, (0, H))[:, None]
            if self.cfg.mask_skip:
                out = out + self.mask_logit(prior)
            return self.pixel_head(out, image, prior) if self.cfg.pixel_head else out
        (y0, y1), (x0, x1) = sample.patch
        qy, qx = make_coord(H, x.device), make_coord(W, x.device)
        patch = self.decode(proj, qy[y0:y1], qx[x0:x1], cell)[:, None]
        points = self.decode_points(proj, qy[sample.rows], qx[sample.cols], cell)
        if self.cfg.mask_skip:
            patch = patch + self.mask_logit(prior[:, :, y0:y1, x0:x1])
            points = points + self.mask_logit(sample.take(prior))
        return patch, points


@dataclass
class QuerySample:
    """Which pixels a training step decodes: one dense patch (for the gradient loss, which needs neighbours)
    and N scattered points per sample (for the pointwise losses). rows/cols: B x N pixel indices; `tile`: the
    part of the patch the loss scores (the rest is context); `weights`: B x N per-point loss weights when the
    points were not drawn uniformly (None = uniform). See `crm_d2.train.losses.draw_sample`."""

    patch: tuple  # ((y0, y1), (x0, x1))
    rows: torch.Tensor
    cols: torch.Tensor
    tile: tuple = None
    weights: torch.Tensor = None

    def take(self, maps):
        """B x 1 x H x W maps -> B x N values at the points."""
        B, _, H, W = maps.shape
        return torch.gather(maps.reshape(B, H * W), 1, self.rows * W + self.cols)

    def crop(self, maps):
        (y0, y1), (x0, x1) = self.patch
        return maps[:, :, y0:y1, x0:x1]


def interpolation_rows(h, H, device=None):
    """Which input rows (i0, i1) and weight t of i1 each of H output rows takes in
    F.interpolate(mode="bilinear", align_corners=True) from h rows: row Y = (1 - t) x[i0] + t x[i1]."""
    pos = resize_sources(H, h, device)
    i0 = pos.floor().long().clamp_(0, h - 1)
    return i0, (i0 + 1).clamp_(max=h - 1), pos - i0.float()


Y_MATMUL_ROWS = 8  # CPU: output rows per product in `UpsampledConv.add_rows`: the band of input rows stays narrow


class UpsampledConv:
    """conv3x3(up(low), weight, padding=1) added to row slabs of an output, where up = F.interpolate(size,
    bilinear, align_corners=True) from a map 2x or 4x smaller; low: B x c x h x w channels_last.

    Equal in exact arithmetic, with 2-4x fewer multiply-adds (docs/benchmark.md, issue 32). Bilinear upsampling
    is separable, up = Uy (Ux low), and the conv is linear, so
        conv(up(low))[Y] = sum over dy of  sum_i Uy[Y + dy, i] * T_dy[i],   T_dy = conv1x3(Ux low; weight row dy),
    with Uy[Y + dy] = 0 where Y + dy falls outside (the conv's zero padding). The 1x3 convs run on the low map's
    rows (h instead of H rows), each row once however the output is sliced: the rows a slab shares with the
    next are kept. The sum over i is a small matrix product per few output rows, in place.
    """

    def __init__(self, low, weight, size):
        self.low, self.size = low, size
        self.rows = [weight[:, :, k : k + 1].contiguous(memory_format=torch.channels_last) for k in range(3)]
        i0, i1, t = interpolation_rows(low.shape[-2], size[0], low.device)
        self.first, self.last = i0.tolist(), i1.tolist()
        # Uy with a zero row above and below (the conv's padding): rows Y + dy of Uy are rows Y + dy + 1 here
        H, h = size[0], low.shape[-2]
        self.uy = torch.zeros(H + 2, h, dtype=torch.promote_types(low.dtype, torch.float32), device=low.device)
        t, out_rows = t.to(self.uy.dtype), torch.arange(1, H + 1, device=low.device)
        self.uy.index_put_((out_rows, i0), 1 - t, accumulate=True)
        self.uy.index_put_((out_rows, i1), t, accumulate=True)
        self.kept = []  # pieces of T_dy that the next slab may share (`bands`)

    def bands(self, ilo, ihi):
        """T_dy for the low rows ilo..ihi, as pieces (first row, [T_dy as B x rows x (W * C) for dy = -1, 0, 1])
        that cover them in order: the rows kept from the last call, then the rows computed now."""
        pieces = [(p0, [t[:, max(0, ilo - p0) :] for t in T]) for p0, T in self.kept if p0 + T[0].shape[1] > ilo]
        pieces = [(max(p0, ilo), T) for p0, T in pieces]
        if pieces and pieces[0][0] > ilo:  # the slabs went backwards: nothing kept is of use
            pieces = []
        done = pieces[-1][0] + pieces[-1][1][0].shape[1] if pieces else ilo
        if done < ihi:
            W = self.size[1]
            across = F.interpolate(self.low[:, :, done:ihi], size=(ihi - done, W), mode="bilinear",
                                   align_corners=True).contiguous(memory_format=torch.channels_last)
            T = [F.conv2d(across, w, padding=(0, 1)) for w in self.rows]
            pieces.append((done, [t.permute(0, 2, 3, 1).reshape(t.shape[0], ihi - done, -1) for t in T]))
        self.kept = pieces
        return pieces

    def add_rows(self, out, r0):
        """out += rows r0 .. r0 + n of the conv; out: B x C x n x W channels_last."""
        B, C, n, W = out.shape
        H = self.size[0]
        ilo, ihi = self.first[max(0, r0 - 1)], self.last[min(H, r0 + n + 1) - 1] + 1
        acc = out.permute(0, 2, 3, 1).reshape(B, n, W * C)  # a view: out is channels_last
        if acc.data_ptr() != out.data_ptr():
            raise ValueError("UpsampledConv.add_rows needs a channels_last output")
        pieces = self.bands(ilo, ihi)
        for k, dy in enumerate((-1, 0, 1)):
            mix = self.uy[r0 + dy + 1 : r0 + n + dy + 1, ilo:ihi]  # the rows of Uy that this slab reads, shifted by dy
            rows = [min(max(r, 0), H - 1) for r in range(r0 + dy, r0 + n + dy)]  # shifted, clamped to the map
            first, last = [self.first[r] - ilo for r in rows], [self.last[r] - ilo for r in rows]  # low rows read
            step = Y_MATMUL_ROWS if out.device.type == "cpu" else n  # one product per slab on a GPU: fewer launches
            for s0 in range(0, n, step):
                s1 = min(n, s0 + step)
                for p0, T in pieces:  # the columns of mix that this piece's rows stand for
                    c0, c1 = max(first[s0], p0 - ilo), min(last[s1 - 1] + 1, p0 - ilo + T[k].shape[1])
                    if c0 < c1:
                        m = mix[None, s0:s1, c0:c1].expand(B, -1, -1).to(T[k].dtype)
                        acc[:, s0:s1].baddbmm_(m, T[k][:, c0 - (p0 - ilo) : c1 - (p0 - ilo)])
        return out


def normalize_image(image):
    """Bx3xhxw RGB in [0, 1] -> ImageNet-normalised."""
    mean, std = _imagenet_stats(image)
    return (image - mean) / std


def normalize_image_(image):
    """`normalize_image` in place: the same bits, and no new map (at 4K each one is 100 MB of fresh pages)."""
    mean, std = _imagenet_stats(image)
    return image.sub_(mean).div_(std)


def _imagenet_stats(image):
    return image.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1), image.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)


def normalize_input(image, mask):
    """image: Bx3xhxw RGB in [0, 1]; mask: Bx1xhxw in [0, 1] -> Bx4xhxw network input."""
    return torch.cat((normalize_image(image), (mask - 0.5) / 0.5), 1)


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())
