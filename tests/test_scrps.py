"""The scrps bundle: StyleGAN2's W+ layer mapping (4 x 4 and 5 x 4 constants), its losses and
training step, batched W+ inversion (lowers its loss, recovers a generated image, equals the
per-slice loop), the perceptual score A_per, the detector, the post-train repository workflow,
the committed demo model, and the bundle's workflows end to end through `run_bundle`."""

from __future__ import annotations

import json
import math

import pytest
import SimpleITK as sitk
import torch
from monai.bundle import ConfigParser

from medanomaly import io, scoring
from medanomaly.bundles import bundle_command, bundle_scripts, find_bundle, import_bundle_scripts, run_bundle
from medanomaly.data import load_datalist, preprocessing, write_datalist
from medanomaly.latent import LatentRepository
from medanomaly.metrics import ScoreHistogram

from checks import pixel_metrics

SCRPS = find_bundle("scrps")
_S = import_bundle_scripts("scrps")["scripts"]
Generator, Discriminator = _S.Generator, _S.Discriminator
LatentInverter, SCRPSMethod = _S.LatentInverter, _S.SCRPSMethod
StyleGAN2Step = _S.StyleGAN2Step

SMALL = {"channel_base": 128, "max_channels": 32, "n_mlp": 2}


def small_generator(size=(32, 32), seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    generator = Generator(size, **SMALL)
    with torch.no_grad():  # w_avg as training would leave it
        generator.mapping.w_avg.copy_(generator.mapping(torch.randn(2000, 512)).mean(0))
    return generator.eval().requires_grad_(False)


def _config(*names: str, **overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(SCRPS.config_file(n)) for n in names])
    parser.update(overrides)
    return parser


# --- StyleGAN2 ---------------------------------------------------------------------------------

@pytest.mark.parametrize("size, n_ws, constant", [((128, 128), 12, (4, 4)), ((160, 128), 12, (5, 4)),
                                                   ((64, 64), 10, (4, 4)), ((32, 32), 8, (4, 4))])
def test_w_plus_has_2_log2_res_minus_2_layers_and_the_right_constant(size, n_ws, constant):
    assert _S.num_ws(size) == n_ws and _S.constant_shape(size) == constant
    generator = Generator(size, **SMALL)
    assert generator.num_ws == n_ws and tuple(generator.const.shape[-2:]) == constant
    assert generator(torch.randn(2, 512)).shape == (2, 1, *size)
    discriminator = Discriminator(size, **{k: v for k, v in SMALL.items() if k != "n_mlp"})
    assert discriminator(torch.zeros(2, 1, *size)).shape == (2, 1)
    with pytest.raises(ValueError, match="W\\+"):
        generator.synthesis(torch.zeros(2, n_ws - 1, 512))
    with pytest.raises(ValueError, match="power of two"):
        _S.num_ws((100, 128))


def test_each_layer_reads_its_w_plus_vector():
    """The 4 x 4 conv reads w[0], its toRGB w[1]; block i reads w[1 + 2i], w[2 + 2i] and w[3 + 2i]."""
    size = (128, 128)
    expected = [("conv0", 0), ("to_rgb0", 1)]
    for i in range(5):
        expected += [(f"blocks.{i}.conv_up", 1 + 2 * i), (f"blocks.{i}.conv", 2 + 2 * i),
                     (f"blocks.{i}.to_rgb", 3 + 2 * i)]
    assert _S.layer_map(size) == expected and expected[-1][1] == 11
    generator = Generator(size, **SMALL)
    seen = {}
    for name, _ in expected:
        affine = generator.get_submodule(name).conv.affine
        affine.register_forward_hook(lambda module, args, out, name=name: seen.__setitem__(name, args[0]))
    ws = torch.randn(2, 12, 512)
    generator.synthesis(ws)
    for name, index in expected:
        torch.testing.assert_close(seen[name], ws[:, index], msg=name)
    # and only those: changing w[11] (the last toRGB) changes no feature map, only the output
    changed = ws.clone()
    changed[:, 11] += 1
    before, after = generator.synthesis(ws), generator.synthesis(changed)
    assert not torch.allclose(before, after)


def test_noise_is_zero_so_synthesis_is_deterministic():
    generator = small_generator()
    ws = generator.mean_ws(2)
    torch.testing.assert_close(generator.synthesis(ws), generator.synthesis(ws))


def test_one_d_step_and_one_g_step_lower_their_losses_on_a_fixed_batch():
    torch.manual_seed(0)
    generator, discriminator = Generator((32, 32), **SMALL), Discriminator((32, 32), channel_base=128, max_channels=32)
    g_opt = torch.optim.Adam(generator.parameters(), lr=1e-3, betas=(0.0, 0.99))
    d_opt = torch.optim.Adam(discriminator.parameters(), lr=1e-3, betas=(0.0, 0.99))
    real = torch.rand(8, 1, 32, 32) * 2 - 1
    z = torch.randn(8, 512)

    def d_loss():
        with torch.no_grad():
            return float(_S.discriminator_loss(discriminator(real), discriminator(generator(z))))

    def g_loss():
        with torch.no_grad():
            return float(_S.generator_loss(discriminator(generator(z))))

    before = d_loss()
    d_opt.zero_grad()
    _S.discriminator_loss(discriminator(real), discriminator(generator(z).detach())).backward()
    d_opt.step()
    assert d_loss() < before
    before = g_loss()
    g_opt.zero_grad()
    _S.generator_loss(discriminator(generator(z))).backward()
    g_opt.step()
    assert g_loss() < before


def test_training_step_runs_r1_path_length_and_ema():
    torch.manual_seed(0)
    generator, discriminator = Generator((32, 32), **SMALL), Discriminator((32, 32), channel_base=128, max_channels=32)
    ema = _S.ema_copy(generator)
    before = {name: p.detach().clone() for name, p in ema.named_parameters()}
    step = StyleGAN2Step(discriminator, torch.optim.Adam(discriminator.parameters(), 2e-3, betas=(0.0, 0.99)), ema,
                         r1_interval=1, pl_weight=2.0, pl_interval=1, ema_kimg=10.0, ema_rampup=0.5)
    g_opt = torch.optim.Adam(generator.parameters(), 2e-3, betas=(0.0, 0.99))
    out = step.step(generator, g_opt, torch.rand(4, 1, 32, 32) * 2 - 1, iteration=1)
    assert {"loss", "loss_d", "r1", "path_length"} <= set(out)
    assert all(torch.isfinite(out[k]) for k in ("loss", "loss_d"))
    assert float(step.pl_mean) > 0 and step.images_seen == 4
    # EMA: ema = beta * ema + (1 - beta) * generator, half-life min(10 kimg, 0.5 x 4 images seen) = 2 images
    beta = 0.5 ** (4 / 2.0)
    trained = dict(generator.named_parameters())
    for name, p in ema.named_parameters():
        torch.testing.assert_close(p, beta * before[name] + (1 - beta) * trained[name].detach(), rtol=1e-5, atol=1e-6)
    assert not torch.equal(ema.const, before["const"]) and not torch.equal(ema.const, generator.const)
    assert float(generator.mapping.w_avg.abs().sum()) > 0  # w_avg is tracked in training
    assert all(not p.requires_grad for p in ema.parameters())


# --- losses, lazy regularisation and EMA against hand computations ---------------------------------

class LinearCritic(torch.nn.Module):
    """D(x) = <w, x> + b: its input gradient is w for every image, so R1 = |w|^2."""

    def __init__(self, weight: torch.Tensor, bias: float = 0.0):
        super().__init__()
        self.weight = torch.nn.Parameter(weight.clone().reshape(1, 1, *weight.shape))
        self.bias = torch.nn.Parameter(torch.tensor([bias]))

    def forward(self, x):
        return (x * self.weight).sum((1, 2, 3))[:, None] + self.bias


class ConstantGenerator(torch.nn.Module):
    """A generator stub: every latent maps to the same learnable image; one buffer (copied, not averaged, by EMA)."""

    style_dim = 512

    def __init__(self, image: torch.Tensor):
        super().__init__()
        self.image = torch.nn.Parameter(image.clone().reshape(1, 1, *image.shape))
        self.register_buffer("counter", torch.tensor(7.0))

    def forward(self, z, mixing_prob=0.0):
        return self.image.expand(z.shape[0], -1, -1, -1)


def test_r1_penalty_is_the_squared_input_gradient_norm_averaged_over_the_batch():
    """R1 of a linear critic D(x) = <w, x> + b is |w|^2 = 1 + 4 + 9 + 0.25 = 14.25 for any batch; of the
    quadratic critic D(x) = |x|^2 / 2 (gradient x) the batch mean of |x|^2: (4 + 16 + 0) / 3 = 20 / 3. The
    penalty is differentiable in D's parameters (dR1/dw = 2w), as the lazy R1 step needs."""
    critic = LinearCritic(torch.tensor([[1.0, -2.0], [3.0, 0.5]]), bias=5.0)
    real = torch.rand(3, 1, 2, 2).requires_grad_(True)
    r1 = _S.r1_penalty(critic(real), real)
    assert float(r1.detach()) == pytest.approx(14.25)
    r1.backward()
    torch.testing.assert_close(critic.weight.grad, 2 * critic.weight.detach())
    real = torch.stack([torch.full((1, 2, 2), 1.0), torch.full((1, 2, 2), -2.0), torch.zeros(1, 2, 2)])
    real.requires_grad_(True)
    assert float(_S.r1_penalty(0.5 * real.pow(2).sum((1, 2, 3))[:, None], real).detach()) == pytest.approx(20 / 3)


def test_lazy_r1_step_scales_the_critic_gradient_by_gamma_over_2_times_the_interval():
    """With SGD (lr 0.01), gamma 10 and r1_interval 4, the R1 step of a linear critic is
    w <- w - lr * gamma / 2 * interval * dR1/dw = (1 - lr * gamma * interval) w = 0.6 w after the
    logistic step (the bias has no R1 gradient), only on iterations divisible by the interval; the
    reported r1 is |w|^2 after the logistic step."""
    def run(iteration: int, r1_gamma: float):
        torch.manual_seed(0)
        critic = LinearCritic(torch.tensor([[1.0, -2.0], [3.0, 0.5]]), bias=0.2)
        generator = ConstantGenerator(torch.tensor([[0.5, -0.5], [0.25, 0.0]]))
        step = StyleGAN2Step(critic, torch.optim.SGD(critic.parameters(), lr=0.01), None, r1_gamma=r1_gamma,
                             r1_interval=4, pl_weight=0.0, mixing_prob=0.0)
        real = torch.tensor([[[[0.9, 0.1], [-0.3, 0.4]]], [[[0.2, -0.8], [0.6, 0.0]]]])
        out = step.step(generator, torch.optim.SGD(generator.parameters(), lr=0.0), real, iteration)
        return critic.weight.detach().clone(), critic.bias.detach().clone(), out

    w_plain, b_plain, out = run(4, 0.0)
    assert "r1" not in out
    w_r1, b_r1, out = run(4, 10.0)
    torch.testing.assert_close(w_r1, (1 - 0.01 * 10.0 * 4) * w_plain)
    torch.testing.assert_close(b_r1, b_plain)
    assert float(out["r1"]) == pytest.approx(float(w_plain.pow(2).sum()), rel=1e-6)
    w_off, _, out = run(3, 10.0)  # not an R1 iteration
    torch.testing.assert_close(w_off, w_plain)
    assert "r1" not in out


class LinearSynthesis:
    """A synthesis stub linear in a W+ code of 2 layers x 1 dimension: the image (2 x 2 pixels, a and
    c read row by row) of code (u, v) is u * a + v * c, so J_w^T y = (y . a, y . c)."""

    def __init__(self):
        self.a = torch.tensor([1.0, 2.0, 0.0, -1.0], requires_grad=True)
        self.c = torch.tensor([0.5, 0.0, 3.0, 1.0], requires_grad=True)

    def __call__(self, ws):
        return (ws[:, 0, :1] * self.a + ws[:, 1, :1] * self.c).reshape(-1, 1, 2, 2)


def test_path_length_penalty_and_its_running_mean_by_hand():
    """lengths_b = sqrt(((y_b . a)^2 + (y_b . c)^2) / 2) (mean over the 2 W+ layers of the squared
    gradient), y ~ N(0, I) / sqrt(H W) = N(0, I) / 2; running mean a <- a + decay (mean_b lengths - a)
    (0 -> m1 -> m2 over two calls, detached); penalty = mean_b (lengths_b - a)^2, differentiable in
    the generator."""
    synthesis = LinearSynthesis()
    ws = torch.tensor([[[0.3], [-1.2]], [[2.0], [0.7]], [[-0.5], [0.1]]], requires_grad=True)
    mean = torch.zeros(())
    for seed, decay in ((1, 0.01), (2, 0.01), (3, 0.5)):
        torch.manual_seed(seed)
        penalty, new_mean = _S.path_length_penalty(synthesis(ws), ws, mean, decay=decay)
        torch.manual_seed(seed)  # the same noise, drawn again
        y = (torch.randn(3, 1, 2, 2) / 2).reshape(3, 4).tolist()
        a, c = synthesis.a.tolist(), synthesis.c.tolist()
        lengths = [math.sqrt((sum(p * q for p, q in zip(yb, a)) ** 2 + sum(p * q for p, q in zip(yb, c)) ** 2) / 2)
                   for yb in y]
        expected_mean = float(mean) + decay * (sum(lengths) / 3 - float(mean))
        assert float(new_mean) == pytest.approx(expected_mean, rel=1e-5) and not new_mean.requires_grad
        assert float(penalty.detach()) == pytest.approx(sum((x - expected_mean) ** 2 for x in lengths) / 3, rel=1e-5)
        # differentiable in the generator: the gradient of the hand formula, written with torch
        (grad_a,) = torch.autograd.grad(penalty, synthesis.a)
        y_t = torch.tensor(y)
        lengths_t = (((y_t @ synthesis.a) ** 2 + (y_t @ synthesis.c) ** 2) / 2).sqrt()
        (expected_a,) = torch.autograd.grad((lengths_t - expected_mean).pow(2).mean(), synthesis.a)
        torch.testing.assert_close(grad_a, expected_a)
        mean = new_mean


@pytest.mark.parametrize("ema_kimg, ema_rampup, after_one, after_two", [
    (10.0, 0.5, 0.75, 0.875),     # ramp-up: half-life 0.5 x 4 = 2 images (beta 1/4), then 4 images (beta 1/2)
    (0.002, 0.5, 0.75, 0.9375),   # half-life capped at 2 images by ema_kimg: beta 1/4 twice
    (0.004, None, 0.5, 0.75),     # no ramp-up: half-life 4 images, beta 1/2 twice
])
def test_ema_after_one_and_two_updates_by_hand(ema_kimg, ema_rampup, after_one, after_two):
    """ema <- beta ema + (1 - beta) G with beta = 0.5 ** (batch / half_life), half_life =
    min(ema_kimg * 1000, ema_rampup * images seen) (batch 4). From ema = 0 and a fixed generator G
    (lr 0): ema = (1 - beta1) G, then (1 - beta1 beta2) G. Buffers are copied, not averaged."""
    image = torch.tensor([[1.0, -2.0], [4.0, 0.5]])
    generator = ConstantGenerator(image)
    ema = _S.ema_copy(generator)
    with torch.no_grad():
        ema.image.zero_()
        ema.counter.zero_()
    critic = LinearCritic(torch.ones(2, 2))
    step = StyleGAN2Step(critic, torch.optim.SGD(critic.parameters(), lr=0.01), ema, r1_gamma=0.0, pl_weight=0.0,
                         mixing_prob=0.0, ema_kimg=ema_kimg, ema_rampup=ema_rampup)
    g_opt = torch.optim.SGD(generator.parameters(), lr=0.0)
    real = torch.zeros(4, 1, 2, 2)
    step.step(generator, g_opt, real, iteration=1)
    torch.testing.assert_close(ema.image[0, 0], after_one * image)
    assert float(ema.counter) == 7.0
    step.step(generator, g_opt, real, iteration=2)
    torch.testing.assert_close(ema.image[0, 0], after_two * image)
    assert step.images_seen == 8


def test_training_config_uses_stylegan2s_ema_half_life_and_ramp_up():
    """train.yaml's step: 10 kimg half-life (ema_kimg) and the default ramp-up of 0.05 x images seen."""
    import inspect

    step = _config("train").get("train#step")
    assert step["ema_kimg"] == "@ema_kimg" and _config("train").get("ema_kimg") == 10.0 and "ema_rampup" not in step
    assert inspect.signature(StyleGAN2Step).parameters["ema_rampup"].default == 0.05


def test_paper_defaults_are_the_configs_defaults():
    train = _config("train")
    assert train.get_parsed_content("gan_size") == [128, 128] and train.get("learning_rate") == 0.002
    assert train.get("num_iterations") == 12000 and train.get("style_dim") == 512 and train.get("n_mlp") == 8
    assert train.get("rotation_degrees") == 15.0
    inference = _config("inference")
    assert [inference.get(k) for k in ("inversion_steps", "inversion_lr", "lambda_mse", "l1", "k1", "k2", "l2")] == \
        [2000, 0.01, 10.0, 6, 100, 20, 9]
    assert inference.get("score") == "perceptual" and inference.get("coarse_to_fine") is True
    assert inference.get("network_def") == train.get("network_def")  # one architecture for both
    assert inference.get("allow_random_backbone") is False  # the offline rule is loud at paper scale


# --- inversion ---------------------------------------------------------------------------------

def test_inversion_lowers_its_loss_and_recovers_a_generated_image_from_its_own_code():
    generator = small_generator()
    torch.manual_seed(1)
    with torch.no_grad():
        true_ws = generator.ws_from_z(torch.randn(2, 512), truncation=0.7)
        target = _S.to_unit(generator.synthesis(true_ws)).clamp(0, 1)
    perceptual = scoring.PerceptualDistance("vgg", allow_random_backbone=True)
    inverter = LatentInverter(generator, perceptual, steps=40, lr=0.05, lambda_mse=10.0)
    codes, history = inverter.invert(target, record=True)
    assert history.shape == (40, 2) and codes.shape == (2, 8, 512)
    assert torch.all(history[-1] < 0.3 * history[0])
    with torch.no_grad():
        restored = _S.to_unit(generator.synthesis(codes))
        start = _S.to_unit(generator.synthesis(generator.mean_ws(2)))
    error, baseline = (restored - target).pow(2).mean((1, 2, 3)), (start - target).pow(2).mean((1, 2, 3))
    assert torch.all(error < 0.1 * baseline)  # measured: about 0.05 x


def test_batched_inversion_equals_the_per_slice_loop():
    generator = small_generator()
    images = torch.rand(3, 1, 32, 32) * 0.8
    inverter = LatentInverter(generator, None, steps=15, lr=0.05, lpips_weight=0.0)
    batched = inverter.invert(images)
    batched_losses = inverter.last_losses
    looped = inverter.invert_per_slice(images)
    torch.testing.assert_close(batched, looped, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(batched_losses, inverter.last_losses, atol=1e-4, rtol=1e-4)


def test_inversion_cache_returns_the_same_codes(tmp_path):
    generator = small_generator()
    images = torch.rand(2, 1, 32, 32)
    inverter = LatentInverter(generator, None, steps=5, lr=0.05, lpips_weight=0.0, cache_dir=str(tmp_path))
    first = inverter.invert(images)
    (cache_file,) = tmp_path.glob("*.pt")
    torch.testing.assert_close(torch.load(cache_file, weights_only=True)["codes"], first)
    # inversion is deterministic, so only a marked cache entry shows that the second call read it
    state = torch.load(cache_file, weights_only=True)
    torch.save({**state, "codes": state["codes"] + 1.0}, cache_file)
    torch.testing.assert_close(inverter.invert(images), first + 1.0)
    inverter.invert(images[:1])  # another batch: another entry
    assert len(list(tmp_path.glob("*.pt"))) == 2
    inverter.steps = 6  # other settings: not the cached codes
    assert not torch.allclose(inverter.invert(images), first + 1.0)


def test_lr_schedule_ramps_up_and_down():
    lrs = [_S.learning_rate(s, 100, 0.01) for s in range(100)]
    assert lrs[0] == 0 and max(lrs) == pytest.approx(0.01) and lrs[50] == pytest.approx(0.01) and lrs[-1] < 1e-3


# --- the perceptual score A_per (medanomaly.scoring.FeatureResidualMap) -------------------------

def test_perceptual_score_is_zero_without_residual_and_high_where_the_residual_is():
    score = scoring.FeatureResidualMap(allow_random_backbone=True)
    x = torch.rand(2, 1, 64, 64) * 0.5
    y = x.clone()
    y[:, :, 10:26, 30:46] += 0.4
    a = score(x, y)
    assert a.shape == x.shape and torch.all(a >= 0)
    assert torch.all(score(x, x) == 0)
    assert a[:, :, 14:22, 34:42].mean() > 3 * a[:, :, 40:60, 0:20].mean()
    one = score(torch.ones(1, 1, 64, 64), torch.zeros(1, 1, 64, 64))
    assert float(one.mean()) == pytest.approx(1.0, rel=1e-4)
    at_32 = scoring.FeatureResidualMap(allow_random_backbone=True, size=32)(x, y)
    assert at_32.shape == x.shape


def test_perceptual_score_follows_the_offline_weights_rule(monkeypatch):
    monkeypatch.delenv(scoring.RANDOM_BACKBONE_ENV, raising=False)
    if scoring.torchvision_weights_path("VGG16_Weights").is_file():
        pytest.skip("the ImageNet VGG16 weights are installed here")
    with pytest.raises(scoring.PerceptualWeightsMissing, match="vgg16"):
        scoring.FeatureResidualMap()
    with pytest.raises(ValueError, match="layers"):
        scoring.FeatureResidualMap(layers=("relu9_9",), allow_random_backbone=True)


# --- the detector ------------------------------------------------------------------------------

def test_method_inverts_retrieves_swaps_and_scores_inside_the_brain():
    generator = small_generator()
    repository = LatentRepository(generator.mean_ws(1) + 0.1 * torch.randn(30, 8, 512))
    inverter = LatentInverter(generator, None, steps=5, lr=0.05, lpips_weight=0.0)
    x = torch.rand(3, 1, 64, 64) * 0.8  # pipeline size 64, GAN size 32
    mask = torch.zeros_like(x)
    mask[:2, :, 8:56, 8:56] = 1  # third slice: no brain
    method = SCRPSMethod(generator, repository, inverter, score="residual", l1=4, k1=10, k2=5, l2=8)
    out = method(torch.cat([x, mask], 1))
    assert out.shape == (3, 2, 64, 64) and torch.all(out[2] == 0)
    assert torch.all(out[:, 0][mask[:, 0] == 0] == 0) and torch.all(out[:, 0] >= 0)
    # l2 = L keeps the whole test code: the pseudo-healthy image is the plain inversion
    codes = torch.randn(2, 8, 512)
    torch.testing.assert_close(method.pseudo_healthy_codes(codes), codes)
    method.l2 = 0  # no swap: the combined repository code only
    torch.testing.assert_close(method.pseudo_healthy_codes(codes), repository.combined(codes, 4, 10, 5))
    with pytest.raises(ValueError, match="rebuild"):
        SCRPSMethod(generator, LatentRepository(torch.zeros(3, 12, 512)), inverter, score="residual")


def test_post_train_workflow_builds_the_repository_before_calibration(monkeypatch):
    assert SCRPS.post_train_workflows == ["build_repository"]
    command = bundle_command("scrps", "build_repository", {"model_dir": "m"})
    configs = command[command.index("--config_file") + 1]
    assert "inference.yaml" in configs and "build_repository.yaml" in configs
    assert find_bundle("dae").post_train_workflows == []
    with pytest.raises(ValueError, match="Unknown workflow"):
        bundle_command("dae", "build_repository")

    import medanomaly.cli as cli

    calls = []
    monkeypatch.setattr(cli, "run_workflow", lambda bundle, workflow, overrides, demo, **kw: calls.append(
        (workflow, overrides.get("model_dir"))))
    cli.main(["train", "scrps", "--demo", "--datalist", "tiny", "--output-dir", "/tmp/x"])
    assert [c[0] for c in calls] == ["train", "build_repository", "calibrate"]
    assert calls[1][1] == calls[2][1] == "/tmp/x/models"


# --- the committed demo model -------------------------------------------------------------------

def _slices_with_labels(item: dict):
    """Preprocessed image, brain mask and lesion label `(Z, 1, H, W)` of one datalist item (the
    label goes through the image pipeline with the same brain mask, so the same crop)."""
    volume = preprocessing()({"image": item["image"], "mask": item["mask"]})
    label = preprocessing()({"image": item["label"], "mask": item["mask"]})["image"] > 0.5
    image, mask = (volume[k][0].permute(2, 0, 1)[:, None].as_tensor() for k in ("image", "mask"))
    return image, mask, label[0].permute(2, 0, 1)[:, None].as_tensor()


@pytest.fixture(scope="module")
def demo_method():
    if not SCRPS.has_weights or not (SCRPS.model_dir / "repository.pt").is_file():
        pytest.skip("the scrps bundle's demo weights and repository are not committed yet")
    parser = _config("inference", "demo", device="cpu")
    with bundle_scripts("scrps"):  # the config's `import scripts`
        return parser.get_parsed_content("method").eval()


def test_shipped_demo_model_and_repository_fit_the_demo_overlay(demo_method):
    info = SCRPS.model_info
    assert info["variant"] == "demo" and info["threshold"] > 0 and info["num_ws"] == 10
    assert len(demo_method.repository) == info["repository_size"] > 50
    assert demo_method.repository.num_layers == demo_method.generator.num_ws == 10


# The shipped weights (T2w, 2,000 CPU iterations at 64 px) give blurry pseudo-healthy slices: the
# residual, and so A_per, covers all brain structure and the lesions are not singled out (pixel AUROC
# 0.50 on the demo cohort, docs/README.md). Strict: the test fails as soon as weights that pass it are
# shipped, so the mark is removed then.
@pytest.mark.xfail(strict=True, reason="the demo generator is too blurry to single out lesions (docs/README.md)")
def test_demo_model_scores_tiny_cohort_lesions_above_healthy_brain(demo_method, tiny):
    """The committed model on the three most affected slices of each lesion volume of the tiny
    cohort: lesion pixels score above the other brain pixels (AUROC and AP over chance)."""
    histogram = ScoreHistogram(n_bins=2000, value_range=(0.0, 2.0))
    for item in load_datalist(tiny, "test_lesion"):
        image, mask, label = _slices_with_labels(item)
        most = label.flatten(1).sum(1).argsort(descending=True)[:3]
        with torch.no_grad():
            maps = demo_method(torch.cat([image[most], mask[most]], 1))[:, :1]
        histogram.update(maps.numpy(), label[most].numpy(), mask[most].numpy() > 0)
    prevalence = histogram.n_pos / (histogram.n_pos + histogram.n_neg)
    assert histogram.auroc() > 0.6
    assert histogram.average_precision() > 1.5 * prevalence


# --- the bundle end to end ------------------------------------------------------------------------

def _small_datalist(tiny, folder) -> str:
    """The tiny cohort cut to one volume per split (two training volumes), so each workflow runs in seconds."""
    splits = {key: load_datalist(tiny, key)[: 2 if key == "training" else 1]
              for key in ("training", "validation_healthy", "test_lesion", "test_healthy")}
    return str(write_datalist(folder / "datalist.json", splits))


@pytest.mark.slow  # with `e2e`: run by `make test` (and CI) after the default suite
@pytest.mark.e2e
def test_bundle_trains_builds_its_repository_calibrates_infers_and_evaluates(tiny, tmp_path, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    run, datalist = tmp_path / "run", _small_datalist(tiny, tmp_path)
    common = {"datalist": datalist, "device": "cpu", "num_workers": 0, "inversion_steps": 2, "channel_base": 128,
              "max_channels": 32, "n_mlp": 2}
    run_bundle("scrps", "train", {**common, "output_dir": str(run), "num_iterations": 4, "epoch_length": 2},
               demo=True)
    model_dir = run / "models"
    info = json.loads((model_dir / "model_info.json").read_text())
    assert (model_dir / "model.pt").is_file() and (model_dir / "checkpoint.pt").is_file()
    assert info["variant"] == "demo" and info["iterations_done"] == 4 and info["num_ws"] == 10

    run_bundle("scrps", "build_repository", {**common, "model_dir": str(model_dir), "repository_fraction": 0.1},
               demo=True)
    repository = LatentRepository.load(model_dir / "repository.pt")
    info = json.loads((model_dir / "model_info.json").read_text())
    assert len(repository) == info["repository_size"] > 5 and repository.codes.shape[1:] == (10, 512)
    assert all(source.startswith("sub-") for source in repository.sources)

    run_bundle("scrps", "calibrate", {**common, "model_dir": str(model_dir)}, demo=True)
    threshold = json.loads((model_dir / "model_info.json").read_text())["threshold"]
    assert 0 < threshold < 50  # the demo's map range (A_per with the medanomaly backbone)

    subject = load_datalist(datalist, "test_lesion")[0]
    sitk.WriteImage(io.read_volume(subject["image"]), str(tmp_path / "scan.nrrd"))
    run_bundle("scrps", "inference", {**common, "input": str(tmp_path / "scan.nrrd"), "model_dir": str(model_dir),
                                      "output_dir": str(tmp_path / "out"), "output_ext": ".nrrd"}, demo=True)
    heatmap = io.read_volume(tmp_path / "out" / "scan_heatmap.nrrd", allow_constant=True)
    assert heatmap.GetSize() == io.read_volume(tmp_path / "scan.nrrd").GetSize()
    assert (tmp_path / "out" / "scan_anomaly.seg.nrrd").is_file()

    run_bundle("scrps", "evaluate", {**common, "model_dir": str(model_dir), "output_dir": str(run / "eval"),
                                     "n_bootstrap": 10, "l2": 6, "coarse_to_fine": False}, demo=True)
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert metrics["n_lesion_volumes"] == 1 and metrics["n_healthy_volumes"] == 1


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="the demo generator is too blurry to single out lesions (docs/README.md)")
def test_demo_weights_find_lesions_better_than_chance_on_whole_volumes(tiny, tmp_path):
    """The committed demo model and repository on the tiny cohort's test split (3 lesion + 2 healthy scans)."""
    if not SCRPS.has_weights:
        pytest.skip("the scrps bundle's demo weights are not committed yet")
    run_bundle("scrps", "evaluate", {"datalist": str(tiny), "device": "cpu", "output_dir": str(tmp_path),
                                     "n_bootstrap": 0, "save_outputs": False})
    pixel, prevalence = pixel_metrics(tmp_path / "metrics.json")
    # weak (see docs/README.md): on the demo cohort pixel AUROC 0.61, AP 1.35 x the prevalence
    assert pixel["auroc"] > 0.55
    assert pixel["ap"] > 1.1 * prevalence


@pytest.mark.slow  # ~4 min: 16 FLAIR demo volumes, each inverted slice by slice
def test_flair_weights_separate_lesion_from_healthy_flair_volumes(tmp_path):
    """FLAIR scans get models/FLAIR/ (generator and its own repository). Measured on the FLAIR demo
    test split (docs/README.md): volume AUROC 0.771 (12 lesion x 4 healthy volumes; one swapped pair
    moves it 0.02), while per voxel the maps stay near chance (pixel AUROC 0.61). Limit: six pairs below."""
    from medanomaly.data import ensure_cohort

    run_bundle("scrps", "evaluate", {"datalist": str(ensure_cohort("demo", contrast="FLAIR")), "contrast": "FLAIR",
                                     "device": "cpu", "output_dir": str(tmp_path), "n_bootstrap": 10,
                                     "save_outputs": False})
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["model_info"]["contrast"] == "FLAIR"
    assert metrics["volume"]["auroc"] > 0.65
