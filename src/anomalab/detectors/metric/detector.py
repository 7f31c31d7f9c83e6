"""Deep metric learning for defect detection (the "AnomalyTwin" write-up; docs/detectors/metric.md).

A pretrained backbone (EfficientNet-Lite0 here; ResNet-18 in the source) plus a linear embedding is trained
as a classifier with a metric-learning head (heads.py). For scoring the head is dropped: every normal
training image is embedded once, and a test image's score is its minimum cosine distance to them
(1 - max cosine similarity, one matrix product per batch). Higher = more anomalous.

Training modes (what the classifier learns to separate):
  multiclass    the good images of several categories, labels = train.classes (source's experiment 1)
  binary        good (label 0) vs a few real defect images (label 1) in the training set (experiment 2)
  anomaly_twin  every normal image twinned; the twin (label 1) gets a fresh random scar each epoch
                (experiment 3, self-supervised: uses no defect knowledge)
  tuned_twin    as anomaly_twin, but twins get defects shaped after the KNOWN defect modes
                (`tuned_defects`, each with the generator options of `defect_options`; experiment 4).
                Uses defect knowledge: not a fair anomaly detector.

CPU budget choices (ours, documented): input side `image_size` (default 128, the source used 224), only
the last `train_blocks` MBConv blocks + the head convolution + the embedding are trained, and all batch
norms keep their ImageNet statistics (eval mode) so small single-texture batches cannot overwrite them.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from anomalab.data.transforms import check_images, prepare, resize_maps
from anomalab.detector import BaseDetector
from anomalab.detectors.metric.heads import make_head
from anomalab.errors import ParameterError
from anomalab.generate.defects import DEFECTS, TEST_DEFECTS
from anomalab.nets.effnet_lite0 import LEVELS, make_backbone
from anomalab.progress import progress
from anomalab.train.loop import run_epochs, seed_everything
from anomalab.types import ImageSet

MODES = ("multiclass", "binary", "anomaly_twin", "tuned_twin")


def make_twins(images: Tensor, rng: np.random.Generator, defects: tuple[str, ...] = ("scar",),
               options: dict[str, dict] | None = None) -> Tensor:
    """A defective copy of every image (N, C, H, W): each gets one defect drawn from `defects`, made with
    the generator's keyword options `options[name]` (anomalab.generate.defects; default: its own)."""
    out = torch.empty_like(images)
    options = options or {}
    for i, img in enumerate(images):
        name = defects[int(rng.integers(len(defects)))]
        out[i] = DEFECTS[name](img, rng, **options.get(name, {}))[0]
    return out


def check_defect_options(defects: tuple[str, ...], options: dict | None, owner: str = "metric") -> None:
    """ParameterError unless every kind is a generator of DEFECTS and every option one of its keywords."""
    import inspect

    unknown = [d for d in defects if d not in DEFECTS]
    if unknown:
        raise ParameterError(f"{owner}: unknown tuned_defects {unknown}; known: {', '.join(DEFECTS)}")
    for kind, opts in (options or {}).items():
        if kind not in DEFECTS:
            raise ParameterError(f"{owner}: defect_options names an unknown defect '{kind}'; "
                                 f"known: {', '.join(DEFECTS)}")
        allowed = [k for k in inspect.signature(DEFECTS[kind]).parameters if k not in ("image", "rng")]
        bad = [k for k in opts if k not in allowed]
        if bad:
            raise ParameterError(f"{owner}: defect '{kind}' has no option {', '.join(bad)}; "
                                 f"its options: {', '.join(allowed)}")


class _EpochBatches:
    """Re-iterable (x, y) mini-batches; `make_epoch()` gives each pass its (images, labels), so twins are
    drawn afresh every epoch (the source's "new scar whenever an image is loaded")."""

    def __init__(self, make_epoch, n: int, batch_size: int, generator: torch.Generator):
        self.make_epoch, self.n, self.batch_size, self.generator = make_epoch, n, batch_size, generator

    def __len__(self) -> int:
        return -(-self.n // self.batch_size)

    def __iter__(self):
        x, y = self.make_epoch()
        order = torch.randperm(len(x), generator=self.generator)
        for i in range(0, len(x), self.batch_size):
            idx = order[i : i + self.batch_size]
            yield x[idx], y[idx]


class Metric(BaseDetector):
    """score(images (N, C, H, W) in [0, 1]) -> (N,) minimum cosine distance to the training embeddings,
    higher = more anomalous. score_map -> (N, H, W) Grad-CAM of that distance (captum)."""

    name = "metric"
    onnx_exportable = True  # scores only: see onnx_no_maps
    onnx_no_maps = "its maps are Grad-CAM, which needs gradients at scoring time: not a fixed graph"
    _fitted_tensors = ("train_embeddings_",)
    _fitted_json = ("history_", "num_classes_")
    score_batch_size = 16  # CPU: batches beyond ~16 get slower per image (memory-bound depthwise convs)
    progress: bool = True  # progress of feature extraction and training (anomalab.progress)

    def __init__(
        self,
        head: str = "arcface",  # softmax | l2_softmax | arcface | cosface | sphereface | center
        mode: str = "anomaly_twin",  # multiclass | binary | anomaly_twin | tuned_twin
        margin: float | None = None,  # m in the head's unit (heads.py); None = AnomalyTwin's setting
        scale: float | None = None,  # s, logit scale of arcface/cosface (None = 64)
        embedding_dim: int = 128,  # size of the embedding the distances are measured in
        image_size: int = 128,  # input side in pixels (source: 224)
        train_blocks: int = 2,  # last MBConv blocks trained (0-16) besides the head conv + embedding
        tuned_defects: tuple[str, ...] = TEST_DEFECTS,  # tuned_twin only: the known defect modes
        defect_options: dict | None = None,  # tuned_twin only: {defect: {generator keyword: value}}
        cam_level: int = 6,  # feature level (2-9) whose activations Grad-CAM weighs
        epochs: int = 8,
        batch_size: int = 32,
        lr: float = 1e-3,
        seed: int = 0,
        device: str = "cpu",
        backbone: str = "effnet_lite0",
        weights: str | None = "imagenet",  # "imagenet" = packaged weights, or a local checkpoint path
    ):
        self.head = head
        self.mode = mode
        self.margin = margin
        self.scale = scale
        self.embedding_dim = embedding_dim
        self.image_size = image_size
        self.train_blocks = train_blocks
        self.tuned_defects = tuned_defects
        self.defect_options = defect_options
        self.cam_level = cam_level
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.seed = seed
        self.device = device
        self.backbone = backbone
        self.weights = weights

    # ---- networks -------------------------------------------------------------------------------
    def _model_shape(self, data_shape=None) -> tuple[int, int, int]:
        return (3, int(self.image_size), int(self.image_size))

    def _nets(self) -> dict[str, nn.Module]:
        return {"backbone": self.backbone_, "embedding": self.embedding_, "head": self.head_}

    def _build(self, shape) -> None:
        seed_everything(int(self.seed))
        self.backbone_ = make_backbone(self.backbone, self.weights)
        self.embedding_ = nn.Linear(self.backbone_._conv_head.out_channels, int(self.embedding_dim))
        self.head_ = make_head(self.head, int(self.num_classes_), int(self.embedding_dim), self.margin,
                               self.scale)
        n_blocks = len(self.backbone_._blocks)
        if not 0 <= int(self.train_blocks) <= n_blocks:
            raise ParameterError(f"train_blocks must be in 0..{n_blocks}, got {self.train_blocks}")
        self.first_trained_ = n_blocks - int(self.train_blocks)
        self.backbone_.requires_grad_(False)
        for block in self.backbone_._blocks[self.first_trained_ :]:
            block.requires_grad_(True)
        self.backbone_._conv_head.requires_grad_(True)
        self.backbone_._bn1.requires_grad_(True)
        for net in self._nets().values():
            net.to(self.device_)

    def _frozen(self, x: Tensor) -> Tensor:
        """Prepared images -> activations after the last frozen block (no gradients)."""
        h = self.backbone_.stem(x)
        for block in self.backbone_._blocks[: self.first_trained_]:
            h = block(h)
        return h

    def _trained(self, h: Tensor) -> Tensor:
        """Frozen activations -> (N, embedding_dim) unnormalised embeddings through the trained part."""
        for block in self.backbone_._blocks[self.first_trained_ :]:
            h = block(h)
        return self.embedding_(self.backbone_.head(h).mean((2, 3)))

    def _embed_x(self, x: Tensor, grad_through_frozen: bool = False) -> Tensor:
        """Prepared (N, 3, S, S) -> (N, embedding_dim) unnormalised embeddings."""
        with torch.set_grad_enabled(grad_through_frozen and torch.is_grad_enabled()):
            h = self._frozen(x)
        return self._trained(h)

    def _frozen_batched(self, x: Tensor, desc: str | None = None) -> Tensor:
        """The frozen part's activations of x, batch by batch (with a progress display when desc is given)."""
        starts = range(0, len(x), self.score_batch_size)
        if desc is not None:
            starts = progress(starts, desc, unit="batch", enabled=self.progress)
        with torch.no_grad():  # not inference_mode: the result feeds the trained part under autograd
            return torch.cat([self._frozen(x[i : i + self.score_batch_size].to(self.device_)) for i in starts])

    # ---- fit ------------------------------------------------------------------------------------
    def _num_classes(self, train: ImageSet) -> int:
        if self.mode not in MODES:
            raise ParameterError(f"unknown mode '{self.mode}'; known: {', '.join(MODES)}")
        if self.mode == "multiclass":
            if train.classes is None or len(train.classes.unique()) < 2:
                raise ParameterError("mode 'multiclass' needs train.classes with at least 2 classes "
                                 "(e.g. the good images of several categories)")
            return int(len(train.classes.unique()))
        if self.mode == "binary":
            if train.labels is None or set(train.labels.unique().tolist()) != {0, 1}:
                raise ParameterError("mode 'binary' needs train.labels with good (0) and defect (1) images")
        return 2

    def fit(self, train: ImageSet | Tensor) -> Metric:
        """Train on `train` as the mode says (see the module docstring), then embed its normal images."""
        if not isinstance(train, ImageSet):
            check_images(train, what=f"{self.name}.fit")
            train = ImageSet(images=train)
        if self.mode == "tuned_twin":
            check_defect_options(tuple(self.tuned_defects), self.defect_options, self.name)
        if int(self.cam_level) not in LEVELS[1:]:
            raise ParameterError(f"cam_level must be in 2..9, got {self.cam_level}")
        self.num_classes_ = self._num_classes(train)
        return super().fit(train)

    def _fit(self, x: Tensor, train: ImageSet) -> None:
        generator = seed_everything(int(self.seed))
        rng = np.random.default_rng(int(self.seed))
        shape = self.input_shape_
        self.backbone_.eval()  # batch norms keep their ImageNet statistics (see the module docstring)
        # The frozen part's activations of the fixed images are computed once; only twins (new each
        # epoch) pass through it again. Training steps run the trained part only.
        if self.mode in ("multiclass", "binary"):
            if self.mode == "multiclass":
                y = torch.unique(train.classes, return_inverse=True)[1]
                reference = x
            else:
                y = train.labels
                reference = x[y == 0]
            h = self._frozen_batched(x, desc=f"{self.name} features")

            def epoch():
                return h, y
        else:
            defects = ("scar",) if self.mode == "anomaly_twin" else tuple(self.tuned_defects)
            options = None if self.mode == "anomaly_twin" else self.defect_options
            originals = train.images
            y = torch.cat([torch.zeros(len(x), dtype=torch.long), torch.ones(len(x), dtype=torch.long)])
            reference = x
            h_originals = self._frozen_batched(x, desc=f"{self.name} features")

            def epoch():
                twins = prepare(make_twins(originals, rng, defects, options), shape)
                return torch.cat([h_originals, self._frozen_batched(twins)]), y

        params = [p for net in self._nets().values() for p in net.parameters() if p.requires_grad]
        self.optimizer_ = torch.optim.Adam(params, lr=float(self.lr))
        for net in (self.embedding_, self.head_):
            net.train()
        loader = _EpochBatches(epoch, len(y), int(self.batch_size), generator)
        self.history_ = run_epochs(self._train_step, loader, int(self.epochs), progress=self.progress,
                                   desc=f"{self.name} {self.head}")
        self.train_embeddings_ = self._embed_reference(reference)

    def _loss(self, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, dict[str, float]]:
        """(frozen activations, labels) -> (head loss, logs)."""
        h, y = (t.to(self.device_) for t in batch)
        e = self._trained(h)
        loss = self.head_(e, y)
        with torch.no_grad():
            acc = (self.head_.logits(e).argmax(1) == y).float().mean()
        return loss, {"loss": loss.item(), "accuracy": acc.item()}

    def _train_step(self, batch: tuple[Tensor, Tensor]) -> dict[str, float]:
        self.optimizer_.zero_grad(set_to_none=True)
        loss, logs = self._loss(batch)
        loss.backward()
        self.optimizer_.step()
        return logs

    def _embed_reference(self, x: Tensor) -> Tensor:
        for net in self._nets().values():
            net.eval()
        out = []
        with torch.inference_mode():
            for i in progress(range(0, len(x), self.score_batch_size), f"{self.name} reference embeddings",
                              unit="batch", enabled=self.progress):
                out.append(F.normalize(self._embed_x(x[i : i + self.score_batch_size].to(self.device_)), dim=1))
        return torch.cat(out).clone()

    # ---- score ----------------------------------------------------------------------------------
    def _distance(self, x: Tensor, grad_through_frozen: bool = False) -> Tensor:
        e = F.normalize(self._embed_x(x, grad_through_frozen), dim=1)
        return 1.0 - (e @ self.train_embeddings_.T).max(1).values  # min cosine distance, one matmul

    def _score_batch(self, x: Tensor) -> Tensor:
        return self._distance(x)

    def embed(self, images: Tensor, batch_size: int | None = None) -> Tensor:
        """images (N, C, H, W) in [0, 1] -> (N, embedding_dim) L2-normalised embeddings."""
        return self._batched(lambda x: F.normalize(self._embed_x(x), dim=1), images, batch_size)

    def nearest(self, images: Tensor, batch_size: int | None = None) -> Tensor:
        """(N,) index of each image's nearest training image (in the order of the fit's normal images)."""
        return self._batched(lambda x: (F.normalize(self._embed_x(x), dim=1) @ self.train_embeddings_.T)
                             .argmax(1).float(), images, batch_size).long()

    def score_map(self, images: Tensor, batch_size: int | None = None) -> Tensor:
        """images (N, C, H, W) -> (N, H, W) Grad-CAM (captum LayerGradCam, ReLU) of the min cosine distance
        at feature level `cam_level`, upsampled to the input size."""
        from captum.attr import LayerGradCam

        self._check_fitted()
        check_images(images, what=f"{self.name}.score_map")
        net = self.backbone_
        layer = net._blocks[net.stage_ends[int(self.cam_level) - 2]] if int(self.cam_level) <= 8 else net._bn1
        for m in self._nets().values():
            m.eval()
        cam = LayerGradCam(lambda x: self._distance(x, grad_through_frozen=True), layer)
        bs = batch_size or self.score_batch_size
        out = []
        for i in range(0, len(images), bs):
            x = prepare(images[i : i + bs], self.input_shape_).to(self.device_).requires_grad_(True)
            with torch.enable_grad():
                out.append(cam.attribute(x, relu_attributions=True)[:, 0].detach().float().cpu())
        maps = torch.cat(out) if out else torch.empty(0)
        return resize_maps(maps, tuple(images.shape[-2:]))
