"""Pseudo-anomaly generation: images of a chosen kind and degree, not scores.

- `anomalab.generate.defects`: synthetic defects painted onto normal images, with masks (scratches, scars,
  blobs, missing patches, intensity shifts).
- `anomalab.generate.beta_vaegan`: beta-VAEGAN with knowledge distillation, a generator trained on normal
  and added data (not a detector: it is not fitted on normal images alone and is not in the detector
  registry); `anomalab generate`, docs/beta_vaegan.md.
"""
