"""beta-VAEGAN with knowledge distillation for controllable pseudo-anomaly generation (METHODS.md section 5).

Not a registered detector: it is a generator trained on normal AND added (anomalous) data with a
teacher, so it does not fit the detector contract (fit on normal images only). It has its own
save/load (weights.safetensors + model.json) and the `anomalab generate` command.
"""

from anomalab.detectors.beta_vaegan.model import BetaVAEGAN
from anomalab.detectors.beta_vaegan.teacher import BetaVAE

__all__ = ["BetaVAE", "BetaVAEGAN"]
