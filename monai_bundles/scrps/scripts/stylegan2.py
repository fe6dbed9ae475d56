"""StyleGAN2 (Karras et al., CVPR 2020) for single-channel axial slices, written for this bundle.

The generator follows the StyleGAN2 layout: a mapping network (pixel norm, 8 equalised-lr
layers with lr multiplier 0.01) turns z into w; the synthesis network starts from a learned
constant (4 x 4 for square slices, 5 x 4 for 160 x 128) and doubles the resolution in each
block with weight-modulated, demodulated 3 x 3 convolutions and skip toRGB outputs. It is driven
by a W+ code of `L = 2 * log2(min(H, W)) - 2` vectors (12 at 128): the constant's conv uses
w[0] and its toRGB w[1]; block i uses w[1 + 2i], w[2 + 2i] for its convs and w[3 + 2i] for its
toRGB. Noise inputs are fixed to zero (SCRPS), so they are left out. Simplifications against
the reference implementation: up / down sampling is bilinear / average pooling instead of the
FIR-filtered transposed convolution, and modulation is applied to the activations (the
"non-fused" form, mathematically the same as modulating the weights).

Images live in [-1, 1] inside the networks; `to_unit` / `from_unit` convert to the pipeline's [0, 1].
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

SQRT2 = math.sqrt(2.0)


def _size(size: int | Sequence[int]) -> tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def num_upsamplings(size: int | Sequence[int]) -> int:
    """Synthesis blocks after the constant: log2 of the shorter side, minus 2 (4 pixels)."""
    h, w = _size(size)
    n = int(round(math.log2(min(h, w)))) - 2
    if n < 1 or 2 ** (n + 2) != min(h, w) or h % 2**n or w % 2**n:
        raise ValueError(f"StyleGAN2 needs a shorter side that is a power of two >= 8 and a longer side that is a "
                         f"multiple of shorter side / 4 (e.g. 128 x 128, 160 x 128, 64 x 64); got {h} x {w}.")
    return n


def num_ws(size: int | Sequence[int]) -> int:
    """Number of W+ vectors: 2 * log2(min(H, W)) - 2 (12 at 128, 10 at 64)."""
    return 2 * num_upsamplings(size) + 2


def constant_shape(size: int | Sequence[int]) -> tuple[int, int]:
    """The learned constant's spatial shape: 4 x 4 for square slices, 5 x 4 for 160 x 128."""
    h, w = _size(size)
    n = num_upsamplings(size)
    return h // 2**n, w // 2**n


def layer_map(size: int | Sequence[int]) -> list[tuple[str, int]]:
    """(layer name, index of the W+ vector it reads) in synthesis order."""
    layers = [("conv0", 0), ("to_rgb0", 1)]
    for i in range(num_upsamplings(size)):
        layers += [(f"blocks.{i}.conv_up", 1 + 2 * i), (f"blocks.{i}.conv", 2 + 2 * i),
                   (f"blocks.{i}.to_rgb", 3 + 2 * i)]
    return layers


def channels_at(width: int, channel_base: int, max_channels: int) -> int:
    """Feature channels at a level whose shorter side is `width` pixels (StyleGAN2's rule)."""
    return int(min(max_channels, max(1, channel_base // width)))


def to_unit(image: torch.Tensor) -> torch.Tensor:
    return (image + 1) / 2


def from_unit(image: torch.Tensor) -> torch.Tensor:
    return image * 2 - 1


class EqualLinear(nn.Module):
    """Linear layer with equalised learning rate (weights scaled at run time)."""

    def __init__(self, in_features: int, out_features: int, bias_init: float = 0.0, lr_mul: float = 1.0,
                 activation: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / lr_mul)
        self.bias = nn.Parameter(torch.full((out_features,), float(bias_init)))
        self.scale, self.lr_mul, self.activation = lr_mul / math.sqrt(in_features), lr_mul, activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight * self.scale, self.bias * self.lr_mul)
        return F.leaky_relu(out, 0.2) * SQRT2 if self.activation else out


class EqualConv2d(nn.Module):
    """Conv layer with equalised learning rate; optional leaky ReLU (gain sqrt 2)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, bias: bool = True,
                 activation: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.scale, self.padding = 1 / math.sqrt(in_channels * kernel_size**2), kernel_size // 2
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.conv2d(x, self.weight * self.scale, self.bias, padding=self.padding)
        return F.leaky_relu(out, 0.2) * SQRT2 if self.activation else out


class MappingNetwork(nn.Module):
    """z -> w: pixel norm, then `n_layers` equalised-lr layers (lr multiplier `lr_mul`). Tracks
    the running mean of w (`w_avg`), the starting point of inversion and of truncation."""

    def __init__(self, style_dim: int = 512, n_layers: int = 8, lr_mul: float = 0.01, w_avg_beta: float = 0.995):
        super().__init__()
        self.style_dim, self.w_avg_beta = style_dim, w_avg_beta
        self.net = nn.Sequential(*[EqualLinear(style_dim, style_dim, lr_mul=lr_mul, activation=True)
                                   for _ in range(n_layers)])
        self.register_buffer("w_avg", torch.zeros(style_dim))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        z = z * torch.rsqrt(z.pow(2).mean(dim=1, keepdim=True) + 1e-8)
        w = self.net(z)
        if self.training:
            with torch.no_grad():
                self.w_avg.copy_(w.detach().mean(0).lerp(self.w_avg, self.w_avg_beta))
        return w


class ModulatedConv2d(nn.Module):
    """Weight-modulated convolution: the style (an affine map of w, bias 1) scales the input
    channels, demodulation rescales each output channel to unit expected variance."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, style_dim: int,
                 demodulate: bool = True, upsample: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.scale, self.padding = 1 / math.sqrt(in_channels * kernel_size**2), kernel_size // 2
        self.affine = EqualLinear(style_dim, in_channels, bias_init=1.0)
        self.demodulate, self.upsample = demodulate, upsample

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        style = self.affine(w)  # (B, in)
        if self.upsample:
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        weight = self.weight * self.scale
        out = F.conv2d(x * style[:, :, None, None], weight, padding=self.padding)
        if self.demodulate:
            demod = torch.rsqrt(style.pow(2) @ weight.pow(2).sum(dim=(2, 3)).t() + 1e-8)  # (B, out)
            out = out * demod[:, :, None, None]
        return out


class StyledConv(nn.Module):
    """Modulated conv + bias + leaky ReLU (gain sqrt 2); the noise input is fixed to zero."""

    def __init__(self, in_channels: int, out_channels: int, style_dim: int, upsample: bool = False):
        super().__init__()
        self.conv = ModulatedConv2d(in_channels, out_channels, 3, style_dim, upsample=upsample)
        self.bias = nn.Parameter(torch.zeros(out_channels))

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(self.conv(x, w) + self.bias[None, :, None, None], 0.2) * SQRT2


class ToRGB(nn.Module):
    """1 x 1 modulated conv (no demodulation) to one channel, added to the upsampled skip image."""

    def __init__(self, in_channels: int, style_dim: int, out_channels: int = 1):
        super().__init__()
        self.conv = ModulatedConv2d(in_channels, out_channels, 1, style_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(out_channels))

    def forward(self, x: torch.Tensor, w: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        out = self.conv(x, w) + self.bias[None, :, None, None]
        if skip is not None:
            out = out + F.interpolate(skip, scale_factor=2, mode="bilinear", align_corners=False)
        return out


class SynthesisBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, style_dim: int, image_channels: int):
        super().__init__()
        self.conv_up = StyledConv(in_channels, out_channels, style_dim, upsample=True)
        self.conv = StyledConv(out_channels, out_channels, style_dim)
        self.to_rgb = ToRGB(out_channels, style_dim, image_channels)


class Generator(nn.Module):
    """StyleGAN2 generator for `size` = (H, W) slices (128 x 128: 4 x 4 constant, W+ of 12 x 512).

    `forward(z)` maps z (B, style_dim) to w, broadcasts it to W+ (with style mixing when
    `mixing_prob` > 0 in training) and synthesises (B, 1, H, W) images in [-1, 1];
    `synthesis(ws)` takes a W+ code (B, L, style_dim) directly (inversion, retrieval, swap).
    """

    def __init__(self, size: int | Sequence[int] = (128, 128), style_dim: int = 512, n_mlp: int = 8,
                 channel_base: int = 16384, max_channels: int = 512, lr_mlp: float = 0.01, image_channels: int = 1):
        super().__init__()
        self.size, self.style_dim = _size(size), style_dim
        self.num_ws, self.layers = num_ws(size), layer_map(size)
        n_up = num_upsamplings(size)
        base = constant_shape(size)
        widths = [min(base) * 2**i for i in range(n_up + 1)]  # shorter side at each level
        channels = [channels_at(r, channel_base, max_channels) for r in widths]
        self.mapping = MappingNetwork(style_dim, n_mlp, lr_mlp)
        self.const = nn.Parameter(torch.randn(1, channels[0], *base))
        self.conv0 = StyledConv(channels[0], channels[0], style_dim)
        self.to_rgb0 = ToRGB(channels[0], style_dim, image_channels)
        self.blocks = nn.ModuleList([SynthesisBlock(channels[i], channels[i + 1], style_dim, image_channels)
                                     for i in range(n_up)])

    @property
    def mean_w(self) -> torch.Tensor:
        return self.mapping.w_avg

    def mean_ws(self, batch_size: int = 1) -> torch.Tensor:
        """The average W+ code (w_avg at every layer), (batch_size, L, style_dim)."""
        return self.mean_w.detach()[None, None].expand(batch_size, self.num_ws, -1).clone()

    def synthesis(self, ws: torch.Tensor) -> torch.Tensor:
        if ws.ndim != 3 or ws.shape[1] != self.num_ws or ws.shape[2] != self.style_dim:
            raise ValueError(f"Expected a W+ code (B, {self.num_ws}, {self.style_dim}), got {tuple(ws.shape)}.")
        x = self.conv0(self.const.expand(ws.shape[0], -1, -1, -1), ws[:, 0])
        image = self.to_rgb0(x, ws[:, 1])
        for i, block in enumerate(self.blocks):
            x = block.conv_up(x, ws[:, 1 + 2 * i])
            x = block.conv(x, ws[:, 2 + 2 * i])
            image = block.to_rgb(x, ws[:, 3 + 2 * i], image)
        return image

    def ws_from_z(self, z: torch.Tensor, mixing_prob: float = 0.0, generator: torch.Generator | None = None,
                  truncation: float = 1.0) -> torch.Tensor:
        w = self.mapping(z)
        if truncation != 1.0:
            w = self.mean_w.lerp(w, truncation)
        ws = w[:, None].repeat(1, self.num_ws, 1)
        if mixing_prob > 0 and z.shape[0] > 0:
            rand = torch.rand((), generator=generator, device=z.device) if generator else torch.rand(())
            if float(rand) < mixing_prob:
                z2 = torch.randn(z.shape, generator=generator, device=z.device) if generator else torch.randn_like(z)
                w2 = self.mapping(z2)
                cut = int(torch.randint(1, self.num_ws, ()).item())
                ws[:, cut:] = w2[:, None]
        return ws

    def forward(self, z: torch.Tensor, mixing_prob: float = 0.0, truncation: float = 1.0, return_ws: bool = False):
        """Images of z; with `return_ws`, (images, their W+ code) (the path-length regulariser's
        input, taken through forward so that a DistributedDataParallel wrapper sees the pass)."""
        ws = self.ws_from_z(z, mixing_prob, truncation=truncation)
        images = self.synthesis(ws)
        return (images, ws) if return_ws else images


class DiscriminatorBlock(nn.Module):
    """Residual block: two 3 x 3 convs, 2 x average-pool downsampling, 1 x 1 skip; output / sqrt 2."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv1 = EqualConv2d(in_channels, in_channels, 3)
        self.conv2 = EqualConv2d(in_channels, out_channels, 3)
        self.skip = EqualConv2d(in_channels, out_channels, 1, bias=False, activation=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(F.avg_pool2d(self.conv1(x), 2))
        return (out + self.skip(F.avg_pool2d(x, 2))) / SQRT2


class Discriminator(nn.Module):
    """StyleGAN2 residual discriminator with minibatch standard deviation; logits (B, 1)."""

    def __init__(self, size: int | Sequence[int] = (128, 128), channel_base: int = 16384, max_channels: int = 512,
                 mbstd_group: int = 4, image_channels: int = 1):
        super().__init__()
        n_down = num_upsamplings(size)
        base = constant_shape(size)
        widths = [min(base) * 2**i for i in range(n_down, -1, -1)]  # from the image down to the base
        channels = [channels_at(r, channel_base, max_channels) for r in widths]
        self.from_rgb = EqualConv2d(image_channels, channels[0], 1)
        self.blocks = nn.Sequential(*[DiscriminatorBlock(channels[i], channels[i + 1]) for i in range(n_down)])
        self.mbstd_group = mbstd_group
        self.final_conv = EqualConv2d(channels[-1] + 1, channels[-1], 3)
        self.final_linear = EqualLinear(channels[-1] * base[0] * base[1], channels[-1], activation=True)
        self.out = EqualLinear(channels[-1], 1)

    def _minibatch_std(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        group = min(self.mbstd_group, b)
        while b % group:
            group -= 1
        y = x.reshape(group, -1, c, h, w)
        std = torch.sqrt(y.var(dim=0, unbiased=False) + 1e-8).mean(dim=(1, 2, 3))  # (B / group,)
        std = std.reshape(-1, 1, 1, 1).repeat(group, 1, h, w)
        return torch.cat([x, std], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.from_rgb(x))
        x = self.final_conv(self._minibatch_std(x))
        return self.out(self.final_linear(x.flatten(1)))


# --------------------------------------------------------------------------- losses
def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Logistic loss of the discriminator: softplus(D(fake)) + softplus(-D(real))."""
    return F.softplus(fake_logits).mean() + F.softplus(-real_logits).mean()


def generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss: softplus(-D(G(z)))."""
    return F.softplus(-fake_logits).mean()


def r1_penalty(real_logits: torch.Tensor, real_images: torch.Tensor) -> torch.Tensor:
    """R1: squared gradient norm of D at real images (mean over the batch); `real_images` must
    require grad and be the input of `real_logits`."""
    (grad,) = torch.autograd.grad(real_logits.sum(), real_images, create_graph=True)
    return grad.pow(2).flatten(1).sum(1).mean()


def path_length_penalty(images: torch.Tensor, ws: torch.Tensor, mean_length: torch.Tensor, decay: float = 0.01):
    """Path-length regulariser: (|J_w^T y| - a)^2 with y ~ N(0, I) / sqrt(H W) and `a` the
    running mean of the lengths. Returns (penalty, new running mean)."""
    noise = torch.randn_like(images) / math.sqrt(images.shape[2] * images.shape[3])
    (grad,) = torch.autograd.grad((images * noise).sum(), ws, create_graph=True)
    lengths = grad.pow(2).sum(2).mean(1).sqrt()
    new_mean = mean_length + decay * (lengths.mean().detach() - mean_length)
    return (lengths - new_mean).pow(2).mean(), new_mean
