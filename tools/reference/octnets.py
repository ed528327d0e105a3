"""PyTorch reference models for octserve (parity fixtures and training).

Octave convolution follows d-li14/octconv.pytorch (same semantics and parameter
names), with one extension so that spatial sizes need not be multiples of 2:

* every 2x2 average pool uses ``ceil_mode=True``; with padding 0 PyTorch divides
  an overhanging window by the number of cells it actually covers;
* every x2 nearest upsample (low -> high) is cropped to the high branch's size.

For even sizes both are exactly d-li14's operations.  The invariant that makes
the branches line up is ``H_low == ceil(H_high / 2)``.

Vanilla ResNets come from torchvision (names unchanged); ``build()`` maps the
architecture names used by octserve to constructors.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models import resnet as tvr


# --------------------------------------------------------------------------- octave conv


def _pool(x):
    return F.avg_pool2d(x, 2, 2, ceil_mode=True)


def _split(c, alpha):
    """(high, low) channel counts exactly as d-li14: low = int(alpha * c)."""
    low = int(alpha * c)
    return c - low, low


class OctaveConv(nn.Module):
    def __init__(self, in_channels, out_channels, kernel_size, alpha_in=0.5, alpha_out=0.5,
                 stride=1, padding=0, groups=1, bias=False):
        super().__init__()
        assert stride in (1, 2), "stride must be 1 or 2"
        assert 0 <= alpha_in <= 1 and 0 <= alpha_out <= 1
        self.stride, self.alpha_in, self.alpha_out = stride, alpha_in, alpha_out
        self.is_dw = groups == in_channels
        in_h, in_l = _split(in_channels, alpha_in)
        out_h, out_l = _split(out_channels, alpha_out)

        def conv(cin, cout, g):
            # Octave convs are always stride 1: stride 2 is done by pooling first.
            return nn.Conv2d(cin, cout, kernel_size, 1, padding, 1, g, bias)

        self.conv_l2l = None if alpha_in == 0 or alpha_out == 0 else \
            conv(in_l, out_l, math.ceil(alpha_in * groups))
        self.conv_l2h = None if alpha_in == 0 or alpha_out == 1 or self.is_dw else \
            conv(in_l, out_h, groups)
        self.conv_h2l = None if alpha_in == 1 or alpha_out == 0 or self.is_dw else \
            conv(in_h, out_l, groups)
        self.conv_h2h = None if alpha_in == 1 or alpha_out == 1 else \
            conv(in_h, out_h, math.ceil(groups - alpha_in * groups))

    def forward(self, x):
        x_h, x_l = x if isinstance(x, tuple) else (x, None)
        if self.stride == 2:
            x_h = _pool(x_h)
        y_h = self.conv_h2h(x_h)
        y_h2l = self.conv_h2l(_pool(x_h)) if self.alpha_out > 0 and not self.is_dw else None
        if x_l is None:
            return y_h, y_h2l
        y_l2l = None
        if self.alpha_out > 0:
            y_l2l = self.conv_l2l(_pool(x_l) if self.stride == 2 else x_l)
        if self.is_dw:
            return y_h, y_l2l
        y_l2h = self.conv_l2h(x_l)
        if self.stride == 1:
            # With stride 2 the un-pooled low input already has the pooled high size.
            y_l2h = F.interpolate(y_l2h, scale_factor=2, mode="nearest")
            y_l2h = y_l2h[..., : y_h.shape[-2], : y_h.shape[-1]]
        y_l = y_h2l + y_l2l if y_h2l is not None and y_l2l is not None else None
        return y_h + y_l2h, y_l


class Conv_BN(nn.Module):
    def __init__(self, in_channels, out_channels, kernel_size, alpha_in=0.5, alpha_out=0.5,
                 stride=1, padding=0, groups=1, bias=False):
        super().__init__()
        self.conv = OctaveConv(in_channels, out_channels, kernel_size, alpha_in, alpha_out,
                               stride, padding, groups, bias)
        out_h, out_l = _split(out_channels, alpha_out)
        # d-li14 sizes bn_h as int(C * (1 - alpha)); C - int(alpha * C) is the same for its
        # alphas and always equals the conv's output width.
        self.bn_h = None if alpha_out == 1 else nn.BatchNorm2d(out_h)
        self.bn_l = None if alpha_out == 0 else nn.BatchNorm2d(out_l)

    def forward(self, x):
        x_h, x_l = self.conv(x)
        return self.bn_h(x_h), (self.bn_l(x_l) if x_l is not None else None)


class Conv_BN_ACT(Conv_BN):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.act = nn.ReLU(inplace=True)  # parameter-free, matches d-li14's module tree

    def forward(self, x):
        x_h, x_l = super().forward(x)
        return self.act(x_h), (self.act(x_l) if x_l is not None else None)


def _residual(out, identity):
    """Branch-wise add + ReLU."""
    (y_h, y_l), (i_h, i_l) = out, identity
    y_h = F.relu(y_h + i_h)
    y_l = F.relu(y_l + i_l) if y_l is not None else None
    return y_h, y_l


def _as_pair(x):
    return x if isinstance(x, tuple) else (x, None)


# --------------------------------------------------------------------------- octave resnets


class OctBottleneck(nn.Module):
    """d-li14's Bottleneck with configurable alphas.

    conv1: 1x1 alpha_in -> alpha_out; conv2: 3x3 (stride) and conv3: 1x1 at alpha_out.
    d-li14's layer4 block0 (output=True) is alpha_in=a, alpha_out=0.
    """
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, alpha_in=0.5, alpha_out=0.5):
        super().__init__()
        a = alpha_out
        self.conv1 = Conv_BN_ACT(inplanes, planes, 1, alpha_in, a)
        self.conv2 = Conv_BN_ACT(planes, planes, 3, a, a, stride=stride, padding=1)
        self.conv3 = Conv_BN(planes, planes * self.expansion, 1, a, a)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        out = self.conv3(self.conv2(self.conv1(x)))
        identity = self.downsample(x) if self.downsample is not None else _as_pair(x)
        return _residual(out, identity)


class OctResNet(nn.Module):
    def __init__(self, layers, alpha=0.5, in_channels=3, num_classes=1000, base_channels=64):
        super().__init__()
        b = base_channels
        self.inplanes = b
        self.conv1 = nn.Conv2d(in_channels, b, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(b)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(b, layers[0], 1, 0.0, alpha, alpha)
        self.layer2 = self._make_layer(2 * b, layers[1], 2, alpha, alpha, alpha)
        self.layer3 = self._make_layer(4 * b, layers[2], 2, alpha, alpha, alpha)
        self.layer4 = self._make_layer(8 * b, layers[3], 2, alpha, 0.0, 0.0)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(8 * b * OctBottleneck.expansion, num_classes)
        _init(self)

    def _make_layer(self, planes, blocks, stride, a_in, a_out, a_rest):
        """Block0 goes a_in -> a_out; the others a_rest -> a_rest."""
        out = planes * OctBottleneck.expansion
        downsample = None
        if stride != 1 or self.inplanes != out:
            downsample = nn.Sequential(Conv_BN(self.inplanes, out, 1, a_in, a_out, stride=stride))
        layers = [OctBottleneck(self.inplanes, planes, stride, downsample, a_in, a_out)]
        self.inplanes = out
        layers += [OctBottleneck(out, planes, 1, None, a_rest, a_rest) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x_h, _ = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x_h), 1))


def oct_resnet26(**kw): return OctResNet([2, 2, 2, 2], **kw)
def oct_resnet50(**kw): return OctResNet([3, 4, 6, 3], **kw)
def oct_resnet101(**kw): return OctResNet([3, 4, 23, 3], **kw)
def oct_resnet152(**kw): return OctResNet([3, 8, 36, 3], **kw)


class OctBasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, a_in=0.5, a_mid=0.5, a_out=0.5):
        super().__init__()
        self.conv1 = Conv_BN_ACT(inplanes, planes, 3, a_in, a_mid, stride=stride, padding=1)
        self.conv2 = Conv_BN(planes, planes, 3, a_mid, a_out, padding=1)
        self.downsample = None
        if stride != 1 or inplanes != planes or a_in != a_out:
            self.downsample = nn.Sequential(Conv_BN(inplanes, planes, 1, a_in, a_out, stride=stride))

    def forward(self, x):
        out = self.conv2(self.conv1(x))
        identity = self.downsample(x) if self.downsample is not None else _as_pair(x)
        return _residual(out, identity)


class OctResNetSmall(nn.Module):
    """3-stage octave ResNet for 28x28 / 32x32 inputs (CIFAR-style)."""

    def __init__(self, depth, alpha=0.5, in_channels=1, num_classes=10, base_channels=16):
        super().__init__()
        assert (depth - 2) % 6 == 0
        n, b = (depth - 2) // 6, base_channels
        self.conv1 = nn.Conv2d(in_channels, b, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(b)
        self.relu = nn.ReLU(inplace=True)
        a = alpha
        # (stride, a_in, a_mid, a_out) per block; the last block goes back to a single
        # full-resolution map for the classifier.
        specs = []
        for stage in range(3):
            specs.append([(1 if stage == 0 else 2, a, a, a)] + [(1, a, a, a)] * (n - 1))
        specs[0][0] = (1, 0.0, a, a)
        specs[2][-1] = (specs[2][-1][0], a, a, 0.0)
        inplanes = b
        for stage, blocks in enumerate(specs):
            planes = b << stage
            mods = []
            for s, ai, am, ao in blocks:
                mods.append(OctBasicBlock(inplanes, planes, s, ai, am, ao))
                inplanes = planes
            setattr(self, f"layer{stage + 1}", nn.Sequential(*mods))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(4 * b, num_classes)
        _init(self)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x_h, _ = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x_h), 1))


def _init(model):
    # Same initialisation as d-li14 / torchvision (matters only for training).
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# --------------------------------------------------------------------------- vanilla resnets


class ResNet(tvr.ResNet):
    """torchvision ResNet with configurable input channels and widths.

    Re-runs the body of torchvision's __init__ with the stem width and stage widths
    scaled by base_channels / 64; module names, _make_layer and forward are torchvision's.
    For base_channels=64, in_channels=3 this is tvr.ResNet(block, layers, num_classes).
    """

    def __init__(self, block, layers, in_channels=3, num_classes=1000, base_channels=64):
        nn.Module.__init__(self)
        b = base_channels
        self._norm_layer = nn.BatchNorm2d
        self.inplanes, self.dilation, self.groups, self.base_width = b, 1, 1, 64
        self.conv1 = nn.Conv2d(in_channels, b, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(b)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, b, layers[0])
        self.layer2 = self._make_layer(block, 2 * b, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 4 * b, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 8 * b, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(8 * b * block.expansion, num_classes)
        _init(self)


class ResNetSmall(tvr.ResNet):
    """3-stage CIFAR-style ResNet-(6n+2) built from torchvision's BasicBlock."""

    def __init__(self, depth, in_channels=1, num_classes=10, base_channels=16):
        nn.Module.__init__(self)
        assert (depth - 2) % 6 == 0
        n, b = (depth - 2) // 6, base_channels
        self._norm_layer = nn.BatchNorm2d
        self.inplanes, self.dilation, self.groups, self.base_width = b, 1, 1, 64
        self.conv1 = nn.Conv2d(in_channels, b, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(b)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(tvr.BasicBlock, b, n)
        self.layer2 = self._make_layer(tvr.BasicBlock, 2 * b, n, stride=2)
        self.layer3 = self._make_layer(tvr.BasicBlock, 4 * b, n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(4 * b, num_classes)
        _init(self)

    def _forward_impl(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# --------------------------------------------------------------------------- registry

_BIG = {  # arch -> (block or None for octave, layers)
    "resnet18": (tvr.BasicBlock, [2, 2, 2, 2]),
    "resnet34": (tvr.BasicBlock, [3, 4, 6, 3]),
    "resnet26": (tvr.Bottleneck, [2, 2, 2, 2]),
    "resnet50": (tvr.Bottleneck, [3, 4, 6, 3]),
    "resnet101": (tvr.Bottleneck, [3, 4, 23, 3]),
    "resnet152": (tvr.Bottleneck, [3, 8, 36, 3]),
    "oct-resnet26": (None, [2, 2, 2, 2]),
    "oct-resnet50": (None, [3, 4, 6, 3]),
    "oct-resnet101": (None, [3, 4, 23, 3]),
    "oct-resnet152": (None, [3, 8, 36, 3]),
}
_SMALL = {"resnet20": 20, "resnet32": 32, "resnet56": 56,
          "oct-resnet20": 20, "oct-resnet32": 32, "oct-resnet56": 56}
ARCHS = list(_BIG) + list(_SMALL)


def build(arch, alpha=0.5, in_channels=3, num_classes=1000, base_channels=None):
    """Build a model by octserve architecture name (alpha is ignored for vanilla nets)."""
    octave = arch.startswith("oct-")
    if arch in _BIG:
        block, layers = _BIG[arch]
        b = base_channels or 64
        if octave:
            return OctResNet(layers, alpha, in_channels, num_classes, b)
        return ResNet(block, layers, in_channels, num_classes, b)
    if arch in _SMALL:
        b = base_channels or 16
        if octave:
            return OctResNetSmall(_SMALL[arch], alpha, in_channels, num_classes, b)
        return ResNetSmall(_SMALL[arch], in_channels, num_classes, b)
    raise ValueError(f"unknown arch {arch!r}; known: {' '.join(ARCHS)}")
