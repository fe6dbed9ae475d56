"""The sagan bundle's own code: SAGAN's windowed generator (position codes, attention gates,
multi-level fusion) and its thesis variants, the Brainomaly generator, the PatchGAN critic, the
WGAN-GP step, the healthy / unlabeled training sets, AUCp model selection and the detector."""

from pathlib import Path

from scripts.networks import (
    AttentionGate,
    BrainomalyGenerator,
    MultiHeadSelfAttention2d,
    PatchCritic,
    PositionCode,
    SaganGenerator,
    SwinGenerator,
    alibi_bias,
    alibi_slopes,
    binary_codes,
    build_generator,
    rope_2d,
    sinusoidal_codes,
    window_merge,
    window_split,
)
from scripts.sagan import (
    SaganMethod,
    SaganStep,
    SubjectScores,
    critic_loss,
    generator_for_weights,
    generator_loss,
    gradient_penalty,
    prepare_aucp_batch,
    recorded_switches,
    semi_supervised_sets,
    shipped_model_dir,
    training_sets,
    unlabeled_slices,
    validation_items,
    variant_name,
)

BUNDLE_ROOT = str(Path(__file__).resolve().parents[1])

__all__ = [
    "BUNDLE_ROOT", "AttentionGate", "BrainomalyGenerator", "MultiHeadSelfAttention2d", "PatchCritic", "PositionCode",
    "SaganGenerator", "SwinGenerator", "alibi_bias", "alibi_slopes", "binary_codes", "build_generator", "rope_2d",
    "sinusoidal_codes", "window_merge", "window_split", "SaganMethod", "SaganStep", "generator_for_weights",
    "recorded_switches",
    "critic_loss", "generator_loss", "gradient_penalty", "prepare_aucp_batch", "semi_supervised_sets",
    "shipped_model_dir", "SubjectScores", "training_sets", "unlabeled_slices", "validation_items", "variant_name",
]
