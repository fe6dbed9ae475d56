"""PHANES networks: the RA soft-introspective VAE (stage 1) and the AOT-GAN inpainter with its
spectral-norm patch discriminator (stage 2). Written from the papers (Bercea et al. MICCAI 2023
"Reversing the abnormal"; Daniel & Tamar CVPR 2021 Soft-IntroVAE; Zeng et al. TVCG 2022 AOT-GAN)."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


# --------------------------------------------------------------------------- stage 1: soft-intro VAE
class ResidualBlock(nn.Module):
    """conv3-BN-LeakyReLU(0.2)-conv3-BN (+ 1x1 projection on the skip), LeakyReLU after the sum."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.skip = (nn.Identity() if in_channels == out_channels else
                     nn.Conv2d(in_channels, out_channels, 1, bias=False))
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels),
        )
        self.act = nn.LeakyReLU(0.2, inplace=True)

    def forward(self, x):
        return self.act(self.body(x) + self.skip(x))


class VAEEncoder(nn.Module):
    """5x5 conv stem, then one residual block + 2x average pooling per level; FC to (mu, logvar).
    `forward(x, return_features=True)` also returns the output of each of the len(channels) levels
    (for the reversed-embedding loss)."""

    def __init__(self, in_channels: int, channels: Sequence[int], zdim: int, image_size: int):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, channels[0], 5, padding=2, bias=False),
                                  nn.BatchNorm2d(channels[0]), nn.LeakyReLU(0.2, inplace=True), nn.AvgPool2d(2))
        levels, previous = [], channels[0]
        for ch in channels[1:]:
            levels.append(nn.Sequential(ResidualBlock(previous, ch), nn.AvgPool2d(2)))
            previous = ch
        self.levels = nn.ModuleList(levels)
        self.last = ResidualBlock(previous, previous)
        self.feature_size = image_size // 2 ** len(channels)
        self.fc = nn.Linear(previous * self.feature_size ** 2, 2 * zdim)

    def forward(self, x, return_features: bool = False):
        h = self.stem(x)
        features = [h]
        for level in self.levels:
            h = level(h)
            features.append(h)
        h = self.last(h)
        mu, logvar = self.fc(h.flatten(1)).chunk(2, dim=1)
        return (mu, logvar, features) if return_features else (mu, logvar)


class VAEDecoder(nn.Module):
    """FC to the coarsest grid, residual blocks + 2x upsampling back to the image, 5x5 conv out and
    a sigmoid, as the reference: reconstructions lie in [0, 1] like the images."""

    def __init__(self, out_channels: int, channels: Sequence[int], zdim: int, image_size: int):
        super().__init__()
        self.feature_size = image_size // 2 ** len(channels)
        top = channels[-1]
        self.fc = nn.Sequential(nn.Linear(zdim, top * self.feature_size ** 2), nn.ReLU(inplace=True))
        blocks, previous = [ResidualBlock(top, top)], top
        for ch in reversed(channels[:-1]):
            blocks += [nn.Upsample(scale_factor=2, mode="nearest"), ResidualBlock(previous, ch)]
            previous = ch
        blocks += [nn.Upsample(scale_factor=2, mode="nearest"), ResidualBlock(previous, previous),
                   nn.Conv2d(previous, out_channels, 5, padding=2), nn.Sigmoid()]
        self.main = nn.Sequential(*blocks)
        self.top = top

    def forward(self, z):
        h = self.fc(z).view(z.shape[0], self.top, self.feature_size, self.feature_size)
        return self.main(h)


class SoftIntroVAE(nn.Module):
    """The RA soft-introspective VAE. `forward(x)` returns the deterministic reconstruction D(mu)."""

    def __init__(self, in_channels: int = 1, channels: Sequence[int] = (64, 128, 256, 512, 512), zdim: int = 128,
                 image_size: int = 128):
        super().__init__()
        if image_size % 2 ** len(channels):
            raise ValueError(f"image_size {image_size} must be divisible by 2**{len(channels)}.")
        self.zdim = zdim
        self.encoder = VAEEncoder(in_channels, channels, zdim, image_size)
        self.decoder = VAEDecoder(in_channels, channels, zdim, image_size)

    @staticmethod
    def reparameterize(mu, logvar):
        return mu + torch.randn_like(mu) * (0.5 * logvar).exp()

    def encode(self, x, return_features: bool = False):
        return self.encoder(x, return_features)

    def decode(self, z):
        return self.decoder(z)

    def sample(self, n: int, device=None):
        return self.decode(torch.randn(n, self.zdim, device=device))

    def forward(self, x):
        mu, _ = self.encode(x)
        return self.decode(mu)


# --------------------------------------------------------------------------- stage 2: AOT-GAN
def _aot_layer_norm(feat: torch.Tensor) -> torch.Tensor:
    mean = feat.mean((2, 3), keepdim=True)
    std = feat.std((2, 3), keepdim=True) + 1e-9
    return 5 * (2 * (feat - mean) / std - 1)


class AOTBlock(nn.Module):
    """Aggregated contextual transformations: split into len(rates) dilated 3x3 branches of
    dim/len(rates) channels, fuse, and gate (x * (1 - g) + fused * g)."""

    def __init__(self, dim: int, rates: Sequence[int] = (1, 2, 4, 8)):
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Sequential(nn.ReflectionPad2d(r), nn.Conv2d(dim, dim // len(rates), 3, dilation=r),
                          nn.ReLU(inplace=True)) for r in rates)
        self.fuse = nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(dim // len(rates) * len(rates), dim, 3))
        self.gate = nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3))

    def forward(self, x):
        out = self.fuse(torch.cat([b(x) for b in self.branches], dim=1))
        g = torch.sigmoid(_aot_layer_norm(self.gate(x)))
        return x * (1 - g) + out * g


class UpConv(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True))


class AOTGenerator(nn.Module):
    """Input: masked image (holes = 1) in [-1, 1] ++ mask; output tanh image in [-1, 1].
    7x7 stem, two stride-2 convs to `dim` channels at 1/4 resolution, `n_blocks` AOT blocks,
    two bilinear up-convs, 3x3 conv out."""

    def __init__(self, in_channels: int = 1, dim: int = 256, n_blocks: int = 8,
                 rates: Sequence[int] = (1, 2, 4, 8)):
        super().__init__()
        d4, d2 = max(dim // 4, 1), max(dim // 2, 1)
        self.encoder = nn.Sequential(
            nn.ReflectionPad2d(3), nn.Conv2d(in_channels + 1, d4, 7), nn.ReLU(inplace=True),
            nn.Conv2d(d4, d2, 4, stride=2, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(d2, dim, 4, stride=2, padding=1), nn.ReLU(inplace=True))
        self.middle = nn.Sequential(*[AOTBlock(dim, rates) for _ in range(n_blocks)])
        self.decoder = nn.Sequential(UpConv(dim, d2), nn.ReLU(inplace=True), UpConv(d2, d4), nn.ReLU(inplace=True),
                                     nn.Conv2d(d4, in_channels, 3, padding=1))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, masked, mask):
        return torch.tanh(self.decoder(self.middle(self.encoder(torch.cat([masked, mask], dim=1)))))


class PatchDiscriminator(nn.Module):
    """Spectral-norm patch discriminator (AOT-GAN's): 4x4 convs, strides 2-2-2-1-1, LeakyReLU(0.2)."""

    def __init__(self, in_channels: int = 1, channels: Sequence[int] = (64, 128, 256, 512)):
        super().__init__()
        sn = nn.utils.spectral_norm
        layers, previous = [], in_channels
        for i, ch in enumerate(channels):
            stride = 2 if i < len(channels) - 1 else 1
            layers += [sn(nn.Conv2d(previous, ch, 4, stride=stride, padding=1, bias=False)),
                       nn.LeakyReLU(0.2, inplace=True)]
            previous = ch
        layers.append(nn.Conv2d(previous, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)

    def forward(self, x):
        return self.main(x)


class Inpainter(nn.Module):
    """The AOT-GAN generator on [0, 1] images: holes filled with `fill` (1), mapped to [-1, 1],
    output mapped back to [0, 1]. `forward(x, m)` returns G's raw fill (not yet composed)."""

    def __init__(self, in_channels: int = 1, dim: int = 256, n_blocks: int = 8, rates: Sequence[int] = (1, 2, 4, 8),
                 fill: float = 1.0):
        super().__init__()
        self.generator = AOTGenerator(in_channels, dim, n_blocks, rates)
        self.fill = fill

    def masked_input(self, x, mask):
        return x * (1 - mask) + self.fill * mask

    def forward(self, x, mask):
        out = self.generator(self.masked_input(x, mask) * 2 - 1, mask)
        return (out + 1) / 2


class PHANES(nn.Module):
    """Both stages in one module (one state dict: `vae.*`, `inpainter.*`)."""

    def __init__(self, vae: SoftIntroVAE, inpainter: Inpainter):
        super().__init__()
        self.vae, self.inpainter = vae, inpainter
