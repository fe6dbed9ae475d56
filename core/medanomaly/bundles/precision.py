"""Whether mixed precision pays on a device (the bundle configs' `amp` switch)."""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU runs bf16 natively (oneDNN's check: AVX512-BF16 or AMX)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def autocast_pays(device: torch.device | str) -> bool:
    """True on CUDA (fp16 autocast); on a CPU only with native bf16 (AVX512-BF16 / AMX), where bf16
    autocast made the cddpm demo's training step 1.5 x faster. An AVX2-only CPU emulates bf16: the
    same step ran 23 x slower than float32 there (docs/TRAINING_SPEED.md), so it stays float32."""
    device = torch.device(device)
    if device.type == "cuda":
        return True
    if device.type != "cpu":
        return False
    native = cpu_has_native_bf16()
    if not native:
        logger.warning("Mixed precision off: this CPU has no native bf16 (bf16 autocast would be several times "
                       "slower than float32 here); running in float32. Set amp to true to force it "
                       "(--amp True; medanomaly: --set amp=true).")
    return native
