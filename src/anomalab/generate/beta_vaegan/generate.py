"""Pseudo-anomalies from a saved beta-VAEGAN: encode normal images, set the added dimension to the chosen
degree (0 .. 1 over the added dimension's trained range), decode, write PNGs (what `anomalab generate RUN_DIR
--images DIR --degree 0.5 --out DIR` runs)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from anomalab.data.folder import load_folder
from anomalab.generate.beta_vaegan._base import META_FILE
from anomalab.generate.beta_vaegan.model import BetaVAEGAN

MODEL_DIRS = ("", "model", "student_g1_s0")  # where a run folder may hold the saved student


def load_generator(run_dir: str | Path) -> BetaVAEGAN:
    """The student saved in `run_dir` (a model folder, or a run folder holding `model/`)."""
    run_dir = Path(run_dir)
    for sub in MODEL_DIRS:
        if (run_dir / sub / META_FILE).is_file():
            return BetaVAEGAN.load(run_dir / sub)
    raise FileNotFoundError(f"no saved beta_vaegan model in {run_dir} (expected {META_FILE} and "
                            "weights.safetensors there or in model/)")


def output_names(names: list[str]) -> list[str]:
    """One distinct PNG name per input: `<stem>.png`, or `<file name>.png` where two inputs share a stem
    (a.png and a.jpg -> a.png.png and a.jpg.png), so no output overwrites another."""
    files = [Path(n).name for n in names]
    stems = [Path(f).stem for f in files]
    shared = {s for s in stems if stems.count(s) > 1}
    return [f"{f}.png" if s in shared else f"{s}.png" for f, s in zip(files, stems)]


def generate_folder(run_dir: str | Path, images: str | Path, degree: float, out: str | Path
                    ) -> tuple[list[Path], np.ndarray, dict]:
    """Write one pseudo-anomaly of `degree` (0 = as the normal images .. 1 = the strongest trained level,
    `BetaVAEGAN.degree_code`) per image of the folder `images` into `out` (same file stem, .png, 64x64
    RGB); returns the written paths, the images' own codes on the added dim and {"code", "range"}."""
    model = load_generator(run_dir)
    code = model.degree_code(degree)  # a bad degree or a model without a range: one line, nothing read
    data = load_folder(images, size=64, channels=3, on_error="raise")
    if len(data) == 0:
        raise FileNotFoundError(f"no images in {images}")
    own = model.encode(data.images)[:, model.added_dim].numpy()
    fakes = model.generate(data.images, code)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, img in zip(output_names(data.names), fakes):
        path = out / name
        Image.fromarray((img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(path)
        paths.append(path)
    return paths, own, {"code": code, "range": list(model.degree_range_)}
