"""beta-VAEGAN with knowledge distillation for controllable pseudo-anomaly generation (Akita & Taguchi;
docs/beta_vaegan.md).

A generator, not a detector: it trains on normal AND added (anomalous) data with a teacher, so it does
not fit the detector contract (fit on normal images only). It has its own save/load
(weights.safetensors + model.json) and the `anomalab generate` command.
"""

from anomalab.generate.beta_vaegan.model import BetaVAEGAN
from anomalab.generate.beta_vaegan.teacher import BetaVAE

__all__ = ["BetaVAE", "BetaVAEGAN"]
