"""Losses of both stages: soft-introspective VAE terms with RA's reversed-embedding loss, and
AOT-GAN's L1 + style + perceptual (VGG19) + SM-PatchGAN adversarial losses."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from medanomaly.scoring import imagenet_vgg_features, torchvision_weights_path


# --------------------------------------------------------------------------- stage 1
def reconstruction_error(x, y):
    """Sum of squared errors per image, shape (B,)."""
    return (x - y).pow(2).flatten(1).sum(1)


def kl_divergence(mu, logvar):
    """KL(q(z|x) || N(0, I)) per image, shape (B,)."""
    return -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(1)


def embedding_loss(features_a, features_b):
    """RA's reversed-embedding loss over the encoder levels: 0.5 * MSE + (1 - cosine similarity)
    of the flattened features, summed over levels, averaged over the batch."""
    loss = 0.0
    for a, b in zip(features_a, features_b):
        a, b = a.flatten(1), b.flatten(1)
        loss = loss + 0.5 * F.mse_loss(a, b) + (1 - F.cosine_similarity(a, b, dim=1)).mean()
    return loss


# --------------------------------------------------------------------------- stage 2
def vgg19_weights_path() -> Path:
    return torchvision_weights_path("VGG19_Weights")


class VGG19Features(nn.Module):
    """Frozen VGG19 trunk giving relu1_1 ... relu5_1 (AOT-GAN's perceptual / style layers) of
    grayscale images in [0, 1] (ImageNet normalisation). `backbone` "imagenet": the ImageNet
    weights must be in the torch hub cache; `allow_random_backbone=True` (or
    MEDANOMALY_ALLOW_RANDOM_BACKBONE=1) uses a seeded random trunk instead, with a loud warning:
    then the losses are NOT perceptual. "random": that random trunk chosen explicitly.
    "medanomaly": the first `n_layers` of the five levels of the project's own backbone
    (`medanomaly.perceptual`) in place of the VGG19 layers."""

    LAYERS = (1, 6, 11, 20, 29)  # relu1_1, relu2_1, relu3_1, relu4_1, relu5_1 in torchvision's vgg19.features

    def __init__(self, allow_random_backbone: bool = False, seed: int = 0, n_layers: int = 5,
                 backbone: str = "imagenet"):
        super().__init__()
        from medanomaly.perceptual import check_backbone, load_backbone

        self.backbone, self.layers = check_backbone(backbone), self.LAYERS[:n_layers]
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))
        if backbone == "medanomaly":
            self.trunk, self.random_backbone = load_backbone(), False
            self.requires_grad_(False)
            self.eval()
            return
        self.features, self.random_backbone = imagenet_vgg_features(
            "vgg19", self.layers[-1], "The PHANES inpainter's VGG19 style / perceptual losses",
            allow_random_backbone, seed, random=backbone == "random")
        self.backbone = "random" if self.random_backbone else "imagenet"
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):
        return super().train(False)

    def forward(self, x):
        if self.backbone == "medanomaly":
            return self.trunk(x)[:len(self.layers)]
        h = (x.expand(-1, 3, -1, -1) - self.mean) / self.std
        out = []
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in self.layers:
                out.append(h)
        return out


def _gram(f):
    b, c, h, w = f.shape
    f = f.flatten(2)
    return f @ f.transpose(1, 2) / (c * h * w)


def perceptual_loss(features_x, features_y):
    return sum(F.l1_loss(a, b) for a, b in zip(features_x, features_y))


def style_loss(features_x, features_y):
    return sum(F.l1_loss(_gram(a), _gram(b)) for a, b in zip(features_x, features_y))


def discriminator_loss(d_real, d_fake, mask):
    """Soft-mask PatchGAN (AOT-GAN), least squares: real patches -> 1, patches of the composed
    image -> 1 - the fraction of the patch that was inpainted (soft labels)."""
    label = 1 - F.adaptive_avg_pool2d(mask, d_fake.shape[-2:])
    return F.mse_loss(d_fake, label) + F.mse_loss(d_real, torch.ones_like(d_real))


def generator_adversarial_loss(d_fake, mask):
    """Least squares towards 'real' (1) on the inpainted patches, weighted by their masked fraction."""
    weight = F.adaptive_avg_pool2d(mask, d_fake.shape[-2:])
    return ((d_fake - 1).pow(2) * weight).sum() / weight.sum().clamp_min(1e-8)
