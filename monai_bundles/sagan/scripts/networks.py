"""SAGAN's networks: the windowed generator with positional condition encoding, attention gates
and multi-level fusion; its thesis variants (other position codes, a bottleneck self-attention
block with RoPE / ALiBi / learned relative bias, a Swin-transformer generator); the Brainomaly
generator; and the PatchGAN critic.

Every generator takes a whole slice `(B, 1, H, W)` in [-1, 1] and returns `tanh(x + map)` (or,
with `map_base: identity`, `tanh(atanh(x) + map)`), the additive map coming from the network; in
training mode a Bernoulli(`mix_probability`) pixel mask keeps the map at most pixels and puts the
input pixel in its place elsewhere (SAGAN). SAGAN cuts the slice into `windows` x `windows`
windows, runs them as one batch, tells each window where it is with a position code, and merges
the outputs back (`window_split` / `window_merge`, exact inverses).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

ABSOLUTE_CODES = ("binary", "sinusoidal", "learned")
RELATIVE_CODES = ("rope", "alibi", "attention_bias")
POSITIONAL_ENCODINGS = (*ABSOLUTE_CODES, *RELATIVE_CODES)
MODELS = ("sagan", "brainomaly")
GENERATORS = ("cnn", "swin")


# --------------------------------------------------------------------------- windows
def window_split(x: torch.Tensor, n: int) -> torch.Tensor:
    """`(B, C, H, W)` -> `(B * n * n, C, H / n, W / n)`; window k = row * n + column, images outermost."""
    b, c, h, w = x.shape
    if h % n or w % n:
        raise ValueError(f"A {h} x {w} image cannot be cut into {n} x {n} equal windows: use an image size "
                         f"divisible by {n}.")
    return x.reshape(b, c, n, h // n, n, w // n).permute(0, 2, 4, 1, 3, 5).reshape(b * n * n, c, h // n, w // n)


def window_merge(windows: torch.Tensor, n: int) -> torch.Tensor:
    """The inverse of `window_split`."""
    bn, c, h, w = windows.shape
    return windows.reshape(bn // (n * n), n, n, c, h, w).permute(0, 3, 1, 4, 2, 5).reshape(-1, c, n * h, n * w)


# --------------------------------------------------------------------------- absolute position codes
def binary_code_bits(n_windows: int) -> int:
    """ceil(log2(N * N) + 1) bits (SAGAN: 3 bits for 2 x 2 windows)."""
    return int(math.ceil(math.log2(n_windows) + 1))


def binary_codes(n_windows: int) -> torch.Tensor:
    """`(n_windows, bits)`: window index k in binary, most significant bit first."""
    bits = binary_code_bits(n_windows)
    k = torch.arange(n_windows)[:, None]
    return ((k >> torch.arange(bits - 1, -1, -1)[None]) & 1).float()


def sinusoidal_codes(n: int, channels: int) -> torch.Tensor:
    """`(n * n, channels)`: 2D sinusoidal code of each window's (row, column) -- half the channels
    sin / cos of the row at geometric frequencies, half of the column (Transformer style)."""
    if channels % 4:
        raise ValueError(f"A 2D sinusoidal code needs a multiple of 4 channels, got {channels}.")
    quarter = channels // 4
    frequencies = 1.0 / (10000.0 ** (torch.arange(quarter).float() / quarter))
    rows, cols = torch.meshgrid(torch.arange(n).float(), torch.arange(n).float(), indexing="ij")

    def encode(pos):
        angles = pos.reshape(-1, 1) * frequencies
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(rows), encode(cols)], dim=1)


class PositionCode(nn.Module):
    """The constant code channels of each window: `binary`, `sinusoidal` or `learned` embeddings."""

    def __init__(self, kind: str, n: int, channels: int | None = None):
        super().__init__()
        if kind not in ABSOLUTE_CODES:
            raise ValueError(f"positional_encoding '{kind}' is not an absolute window code "
                             f"({', '.join(ABSOLUTE_CODES)}).")
        self.kind, self.n = kind, n
        if kind == "binary":
            self.register_buffer("table", binary_codes(n * n), persistent=False)
        elif kind == "sinusoidal":
            self.register_buffer("table", sinusoidal_codes(n, channels or 8), persistent=False)
        else:
            self.table = nn.Parameter(torch.randn(n * n, channels or 8))

    @property
    def channels(self) -> int:
        return self.table.shape[1]

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        """`(B * n * n, C, h, w)` -> `(B * n * n, C + channels, h, w)`: the code appended as constant maps."""
        bn, _, h, w = windows.shape
        code = self.table.to(windows.dtype).repeat(bn // (self.n * self.n), 1)
        return torch.cat([windows, code[:, :, None, None].expand(-1, -1, h, w)], dim=1)


# --------------------------------------------------------------------------- relative positions in attention
def grid_positions(height: int, width: int, device=None) -> torch.Tensor:
    """`(height * width, 2)` (row, column) of the tokens of a grid, row-major."""
    rows, cols = torch.meshgrid(torch.arange(height, device=device), torch.arange(width, device=device), indexing="ij")
    return torch.stack([rows.reshape(-1), cols.reshape(-1)], dim=1)


def rope_2d(x: torch.Tensor, positions: torch.Tensor, base: float = 100.0) -> torch.Tensor:
    """Axial 2D rotary embedding of `x` `(..., L, d)` at integer `positions` `(L, 2)`: the first half
    of the channels is rotated by the row, the second by the column, in pairs (2i, 2i + 1) at angle
    pos * base^(-2i / (d / 2)). Then q(p) . k(p') depends on p - p' only."""
    d = x.shape[-1]
    if d % 4:
        raise ValueError(f"2D RoPE needs a head dimension divisible by 4, got {d}.")
    half = d // 2
    frequencies = base ** (-torch.arange(0, half, 2, device=x.device, dtype=torch.float32) / half)
    out = []
    for axis, part in enumerate(x.split(half, dim=-1)):
        angles = positions[:, axis].float()[:, None] * frequencies  # (L, half / 2)
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        even, odd = part[..., 0::2], part[..., 1::2]
        out.append(torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2))
    return torch.cat(out, dim=-1)


def alibi_slopes(heads: int) -> torch.Tensor:
    """m_h = 2^(-8 h / H), h = 1..H (Press et al.)."""
    return 2.0 ** (-8.0 * torch.arange(1, heads + 1).float() / heads)


def alibi_bias(positions: torch.Tensor, heads: int) -> torch.Tensor:
    """`(heads, L, L)`: -m_h * Manhattan distance between the tokens."""
    distance = (positions[:, None, :] - positions[None, :, :]).abs().sum(-1).float()
    return -alibi_slopes(heads).to(positions.device)[:, None, None] * distance


class MultiHeadSelfAttention2d(nn.Module):
    """Pre-norm transformer block (self-attention + MLP, both residual) over the tokens of a feature
    map, with the position given as `rope`, `alibi` or a learned relative `attention_bias` (a table
    over the (2 H - 1)(2 W - 1) offsets, as in Swin), or none (`None`)."""

    def __init__(self, channels: int, heads: int = 8, position: str | None = "rope", grid: tuple[int, int] = (8, 8),
                 mlp_ratio: float = 2.0, rope_base: float = 100.0):
        super().__init__()
        if channels % heads:
            raise ValueError(f"{channels} channels cannot be split into {heads} heads.")
        if position not in (None, *RELATIVE_CODES):
            raise ValueError(f"attention position must be one of {RELATIVE_CODES} or None, got {position!r}.")
        self.heads, self.position, self.grid, self.rope_base = heads, position, tuple(grid), rope_base
        self.norm1, self.norm2 = nn.LayerNorm(channels), nn.LayerNorm(channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)
        self.mlp = nn.Sequential(nn.Linear(channels, int(channels * mlp_ratio)), nn.GELU(),
                                 nn.Linear(int(channels * mlp_ratio), channels))
        if position == "attention_bias":
            gh, gw = self.grid
            self.bias_table = nn.Parameter(torch.zeros((2 * gh - 1) * (2 * gw - 1), heads))
            pos = grid_positions(gh, gw)
            offset = pos[:, None, :] - pos[None, :, :] + torch.tensor([gh - 1, gw - 1])
            self.register_buffer("bias_index", offset[..., 0] * (2 * gw - 1) + offset[..., 1], persistent=False)

    def attention_bias(self, positions: torch.Tensor) -> torch.Tensor | None:
        """The additive `(heads, L, L)` logit bias of this block (None for RoPE / no position)."""
        if self.position == "alibi":
            return alibi_bias(positions, self.heads)
        if self.position == "attention_bias":
            return self.bias_table[self.bias_index].permute(2, 0, 1)
        return None

    def attend(self, tokens: torch.Tensor, positions: torch.Tensor, return_weights: bool = False):
        b, length, c = tokens.shape
        q, k, v = self.qkv(tokens).reshape(b, length, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        if self.position == "rope":
            q, k = rope_2d(q, positions, self.rope_base), rope_2d(k, positions, self.rope_base)
        bias = self.attention_bias(positions)
        logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        if bias is not None:
            logits = logits + bias.to(logits.dtype)
        weights = logits.softmax(dim=-1)
        out = (weights @ v).transpose(1, 2).reshape(b, length, c)
        return (self.proj(out), weights) if return_weights else self.proj(out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        if self.position == "attention_bias" and (h, w) != self.grid:
            raise ValueError(f"The learned attention bias was built for a {self.grid} token grid, got {(h, w)}: "
                             "set image_size to the size the model was built for.")
        tokens = x.flatten(2).transpose(1, 2)
        tokens = tokens + self.attend(self.norm1(tokens), grid_positions(h, w, x.device))
        tokens = tokens + self.mlp(self.norm2(tokens))
        return tokens.transpose(1, 2).reshape(b, c, h, w)


# --------------------------------------------------------------------------- building blocks
def _norm(channels: int) -> nn.Module:
    # per-image statistics in training and inference alike (no running statistics)
    return nn.InstanceNorm2d(channels, affine=True)


def conv_block(cin: int, cout: int, kernel: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, padding=(kernel - stride + 1) // 2, bias=False),
                         _norm(cout), nn.ReLU(inplace=True))


def up_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.ConvTranspose2d(cin, cout, 4, 2, 1, bias=False), _norm(cout), nn.ReLU(inplace=True))


class ResidualBlock(nn.Module):
    """x + IN(conv3(ReLU(IN(conv3(x))))) (StarGAN / Brainomaly bottleneck)."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, channels, 3, 1, 1, bias=False), _norm(channels),
                                  nn.ReLU(inplace=True), nn.Conv2d(channels, channels, 3, 1, 1, bias=False),
                                  _norm(channels))

    def forward(self, x):
        return x + self.body(x)


class ProjectionResidualBlock(nn.Module):
    """Channel-changing residual block of the SAGAN decoder: y = ReLU(IN(conv3(x))); y + IN(conv3(y))."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.project = conv_block(cin, cout, 3)
        self.body = nn.Sequential(nn.Conv2d(cout, cout, 3, 1, 1, bias=False), _norm(cout))

    def forward(self, x):
        y = self.project(x)
        return y + self.body(y)


class AttentionGate(nn.Module):
    """alpha = sigmoid(C3(ReLU(C1(f) + C2(g)))) on the skip features f, gated by the decoder features g
    (Attention U-Net); returns alpha * f."""

    def __init__(self, skip_channels: int, gate_channels: int, coefficients: int | None = None):
        super().__init__()
        coefficients = coefficients or max(skip_channels // 2, 1)
        self.skip = nn.Sequential(nn.Conv2d(skip_channels, coefficients, 1), nn.InstanceNorm2d(coefficients))
        self.gate = nn.Sequential(nn.Conv2d(gate_channels, coefficients, 1), nn.InstanceNorm2d(coefficients))
        self.alpha = nn.Conv2d(coefficients, 1, 1)

    def coefficients(self, skip: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.alpha(F.relu(self.skip(skip) + self.gate(gate))))

    def forward(self, skip: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return skip * self.coefficients(skip, gate)


class PositionInjection(nn.Module):
    """Appends the window code and maps back: 1x1 conv + InstanceNorm + ReLU (identity without a code)."""

    def __init__(self, channels: int, code: PositionCode | None):
        super().__init__()
        self.code = code
        self.fuse = None if code is None else nn.Sequential(nn.Conv2d(channels + code.channels, channels, 1),
                                                            _norm(channels), nn.ReLU(inplace=True))

    def forward(self, x):
        return x if self.code is None else self.fuse(self.code(x))


# --------------------------------------------------------------------------- generators
MAP_BASES = ("input", "identity")
_ATANH_LIMIT = 1.0 - 1e-3  # atanh(+-1) is infinite; the background (-1) maps to -3.8


class AdditiveGenerator(nn.Module):
    """G(x) = tanh(base(x) + map(x)); in training, a Bernoulli(mix_probability) pixel mask m mixes
    the map with the input pixels (SAGAN; None: no mixing, Brainomaly).

    `map_base` "input" (the papers' code): base(x) = x, mixing map <- m * map + (1 - m) * x. The map
    starts at zero, so G starts as tanh(x), which dims bright pixels (tanh(1) = 0.76): until training
    learns map = atanh(x) - x, |x - G(x)| is largest on the brightest tissue (CSF on T2w).
    "identity": base(x) = atanh(x), the same family of generators written relative to the identity:
    G starts as exactly x, the map is what G changes, and mixing (map <- m * map) passes the input
    pixel through unchanged."""

    map_base = "input"

    def __init__(self, mix_probability: float | None = None):
        super().__init__()
        self.mix_probability = mix_probability

    @staticmethod
    def zero_init(layer: nn.Module) -> None:
        """The layer that outputs the map starts at zero: G starts as tanh(base(x))."""
        for parameter in layer.parameters():
            nn.init.zeros_(parameter)

    def additive_map(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.additive_map(x)
        identity = self.map_base == "identity"
        if self.training and self.mix_probability is not None and self.mix_probability < 1:
            keep = torch.bernoulli(torch.full_like(residual[:, :1], float(self.mix_probability)))
            residual = keep * residual + (0.0 if identity else (1.0 - keep) * x)
        base = torch.atanh(x.clamp(-_ATANH_LIMIT, _ATANH_LIMIT)) if identity else x
        return torch.tanh(base + residual)


class SaganGenerator(AdditiveGenerator):
    """The SAGAN generator (Zhang et al., MICCAI 2024).

    Each window: conv7 (d) -> conv4 s2 (2d) -> conv4 s2 (4d) -> conv4 s2 (8d); the window code is
    appended after each stride-2 level (then 1x1 conv + IN + ReLU); `n_residual` residual blocks.
    Decoder, three stages: attention gate on the skip of the same level, concatenation, residual
    block, ConvTranspose x2. Multi-level fusion: the three stage outputs upsampled to the window,
    concatenated, residual block, conv7 -> 1 channel (the additive map).

    `positional_encoding`: `binary` (paper), `sinusoidal` or `learned` window codes, or `rope`,
    `alibi`, `attention_bias`: no code channels; instead a multi-head self-attention block in the
    bottleneck attends over the tokens of all windows of the slice (merged back into one grid),
    with that relative position scheme. None: no position at all.
    """

    def __init__(self, in_channels: int = 1, conv_dim: int = 64, n_residual: int = 6, windows: int = 2,
                 positional_encoding: str | None = "binary", code_channels: int | None = None,
                 attention_gates: bool = True, fusion: bool = True, mix_probability: float | None = 0.95,
                 heads: int = 8, image_size: int = 64, rope_base: float = 100.0):
        super().__init__(mix_probability)
        if positional_encoding not in (None, *POSITIONAL_ENCODINGS):
            raise ValueError(f"positional_encoding must be one of {', '.join(POSITIONAL_ENCODINGS)} (or None), "
                             f"got {positional_encoding!r}.")
        if image_size % (windows * 8):
            raise ValueError(f"image_size {image_size} must be divisible by 8 x windows = {8 * windows}.")
        self.windows, self.positional_encoding = windows, positional_encoding
        d = conv_dim
        code = (PositionCode(positional_encoding, windows, code_channels)
                if positional_encoding in ABSOLUTE_CODES else None)
        self.code = code
        self.stem = conv_block(in_channels, d, 7)
        self.down = nn.ModuleList([conv_block(d, 2 * d, 4, 2), conv_block(2 * d, 4 * d, 4, 2),
                                   conv_block(4 * d, 8 * d, 4, 2)])
        self.inject = nn.ModuleList([PositionInjection(c, code) for c in (2 * d, 4 * d, 8 * d)])
        grid = image_size // 8
        self.attention = (MultiHeadSelfAttention2d(8 * d, heads, positional_encoding, (grid, grid), rope_base=rope_base)
                          if positional_encoding in RELATIVE_CODES else None)
        self.bottleneck = nn.Sequential(*[ResidualBlock(8 * d) for _ in range(n_residual)])
        skips = (8 * d, 4 * d, 2 * d)
        self.gates = nn.ModuleList([AttentionGate(c, c) for c in skips]) if attention_gates else None
        self.merge = nn.ModuleList([ProjectionResidualBlock(2 * c, c) for c in skips])
        self.up = nn.ModuleList([up_block(c, c // 2) for c in skips])
        if fusion:
            self.fuse_up = nn.ModuleList([nn.Sequential(up_block(4 * d, 2 * d), up_block(2 * d, d)),
                                          up_block(2 * d, d)])
            self.fuse = ProjectionResidualBlock(3 * d, d)
        else:
            self.fuse_up, self.fuse = None, None
        self.head = nn.Conv2d(d, 1, 7, 1, 3, bias=False)
        self.zero_init(self.head)

    def _global_attention(self, y: torch.Tensor) -> torch.Tensor:
        # tokens of all windows of one slice attend to each other at their places in the slice
        return window_split(self.attention(window_merge(y, self.windows)), self.windows)

    def additive_map(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(window_split(x, self.windows))
        skips = []
        for down, inject in zip(self.down, self.inject):
            y = inject(down(y))
            skips.append(y)
        if self.attention is not None:
            y = self._global_attention(y)
        y = self.bottleneck(y)
        stages = []
        for level, skip in enumerate(reversed(skips)):
            if self.gates is not None:
                skip = self.gates[level](skip, y)
            y = self.up[level](self.merge[level](torch.cat([y, skip], dim=1)))
            stages.append(y)
        if self.fuse is not None:
            y = self.fuse(torch.cat([self.fuse_up[0](stages[0]), self.fuse_up[1](stages[1]), stages[2]], dim=1))
        return window_merge(self.head(y), self.windows)


class BrainomalyGenerator(AdditiveGenerator):
    """Brainomaly (Siddiquee et al., WACV 2024): conv7 (d) -> 2 x conv4 s2 -> residual blocks ->
    2 x ConvTranspose -> conv7 -> the additive map, on the whole slice."""

    def __init__(self, in_channels: int = 1, conv_dim: int = 64, n_residual: int = 6,
                 mix_probability: float | None = None):
        super().__init__(mix_probability)
        d = conv_dim
        self.main = nn.Sequential(conv_block(in_channels, d, 7), conv_block(d, 2 * d, 4, 2),
                                  conv_block(2 * d, 4 * d, 4, 2),
                                  *[ResidualBlock(4 * d) for _ in range(n_residual)], up_block(4 * d, 2 * d),
                                  up_block(2 * d, d), nn.Conv2d(d, 1, 7, 1, 3, bias=False))
        self.zero_init(self.main[-1])

    def additive_map(self, x):
        return self.main(x)


class SwinGenerator(AdditiveGenerator):
    """Thesis variant: MONAI's SwinUNETR (2D) as the generator of each window (windows of at least
    64 px), the window's code given as constant input channels (`binary`, `sinusoidal` or `learned`;
    None: no code). At the paper's 64 px, one window: the whole slice (see `build_generator`)."""

    def __init__(self, in_channels: int = 1, windows: int = 2, positional_encoding: str | None = "binary",
                 code_channels: int | None = None, feature_size: int = 24, depths=(2, 2, 2, 2),
                 num_heads=(3, 6, 12, 24), attention_window: int = 4, mix_probability: float | None = 0.95,
                 image_size: int = 64):
        super().__init__(mix_probability)
        from monai.networks.nets import SwinUNETR

        if positional_encoding not in (None, *ABSOLUTE_CODES):
            raise ValueError(f"The Swin generator takes an absolute window code ({', '.join(ABSOLUTE_CODES)}) or "
                             f"none; got {positional_encoding!r} (relative codes belong to the CNN's bottleneck).")
        if (image_size // windows) % 32 or image_size // windows < 64:
            raise ValueError(f"SwinUNETR needs windows of at least 64 pixels and a multiple of 32: image_size "
                             f"{image_size} / {windows} windows does not give that.")
        self.windows, self.positional_encoding = windows, positional_encoding
        self.code = PositionCode(positional_encoding, windows, code_channels) if positional_encoding else None
        extra = self.code.channels if self.code is not None else 0
        self.net = SwinUNETR(in_channels=in_channels + extra, out_channels=1, feature_size=feature_size, depths=depths,
                             num_heads=num_heads, window_size=attention_window, spatial_dims=2)
        self.zero_init(self.net.out)

    def additive_map(self, x):
        y = window_split(x, self.windows)
        if self.code is not None:
            y = self.code(y)
        return window_merge(self.net(y), self.windows)


def build_generator(model: str = "sagan", generator: str = "cnn", positional_encoding: str | None = "binary",
                    conv_dim: int = 64, n_residual: int = 6, windows: int = 2, attention_gates: bool = True,
                    fusion: bool = True, mix_probability: float | None = 0.95, heads: int = 8,
                    image_size: int = 64, code_channels: int | None = None, swin_feature_size: int = 24,
                    swin_depths=(2, 2, 2, 2), swin_heads=(3, 6, 12, 24), brainomaly_residual: int | None = None,
                    in_channels: int = 1, map_base: str = "input") -> AdditiveGenerator:
    """The generator of one configuration: `model` sagan | brainomaly, `generator` cnn | swin,
    `positional_encoding` binary | sinusoidal | learned | rope | alibi | attention_bias,
    `map_base` input | identity (`AdditiveGenerator`).
    Brainomaly ignores the SAGAN-only settings (windows, position code, gates, fusion, mixing)."""
    if map_base not in MAP_BASES:
        raise ValueError(f"map_base must be one of {', '.join(MAP_BASES)}, got {map_base!r}.")
    if model not in MODELS:
        raise ValueError(f"model must be one of {', '.join(MODELS)}, got {model!r}.")
    if generator not in GENERATORS:
        raise ValueError(f"generator must be one of {', '.join(GENERATORS)}, got {generator!r}.")
    if model == "brainomaly":
        if generator != "cnn":
            raise ValueError("model 'brainomaly' has only the CNN generator (generator: cnn).")
        network = BrainomalyGenerator(in_channels, conv_dim,
                                      n_residual if brainomaly_residual is None else brainomaly_residual)
    elif generator == "swin":
        # SwinUNETR halves the input five times and instance-normalises the last 1 x 1 map, which fails in
        # training: windows under 64 px are not possible, so at 64 px the Swin generator sees the whole
        # slice, and position comes from its own relative position bias (no window code).
        swin_windows = windows if image_size // windows >= 64 else 1
        network = SwinGenerator(in_channels, swin_windows, positional_encoding if swin_windows > 1 else None,
                                code_channels, swin_feature_size, swin_depths, swin_heads,
                                mix_probability=mix_probability, image_size=image_size)
    else:
        network = SaganGenerator(in_channels, conv_dim, n_residual, windows, positional_encoding, code_channels,
                                 attention_gates, fusion, mix_probability, heads, image_size)
    network.map_base = map_base
    return network


class PatchCritic(nn.Module):
    """WGAN critic (PatchGAN, StarGAN style): `n_layers` conv4 stride-2 layers doubling the channels
    from `conv_dim` (LeakyReLU 0.01), then conv3 -> 1 channel of patch scores."""

    def __init__(self, in_channels: int = 1, conv_dim: int = 64, n_layers: int = 6):
        super().__init__()
        layers, c = [nn.Conv2d(in_channels, conv_dim, 4, 2, 1), nn.LeakyReLU(0.01)], conv_dim
        for _ in range(1, n_layers):
            layers += [nn.Conv2d(c, 2 * c, 4, 2, 1), nn.LeakyReLU(0.01)]
            c *= 2
        self.main = nn.Sequential(*layers)
        self.score = nn.Conv2d(c, 1, 3, 1, 1, bias=False)

    def forward(self, x):
        return self.score(self.main(x))
