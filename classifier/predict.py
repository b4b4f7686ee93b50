"""Predictor: a bundle turned into `image -> {class: probability}` for any PIL-readable image.

Preprocessing comes from the bundle alone (Bundle.eval_transform: input size, mean, std,
interpolation, crop), so the app never needs the training data, and it is the preprocessing the
model was validated and tested with (classifier.transforms). Probabilities are divided by the
bundle's fitted temperature, so a "90%" means right about nine times in ten on the validation data.
Nothing here imports training code or matplotlib: serving stays light.
"""

from __future__ import annotations

import os
from typing import Sequence

import torch
from PIL import Image

from classifier.bundle import Bundle, load_bundle
from classifier.cam import denormalize, grad_cam_tta, overlay
from classifier.images import ImageSource, open_image
from classifier.ood import energy, is_out_of_domain
from classifier.runtime import channels_last_pays
from classifier.transforms import decoded_side
from classifier.tta import tta_logits, tta_mode


class Predictor:
    """Load once, predict many times. `tta`: the test-time augmentation (classifier.tta), by default
    the one the bundle was evaluated with: its accuracy was measured and its temperature fitted on
    those logits, so neither holds for predictions made another way."""

    def __init__(self, bundle: Bundle | str | os.PathLike, device: str | torch.device = "cpu",
                 tta: bool | str | None = None):
        self.bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle, device=device)
        self.device = torch.device(device)
        self.model = self.bundle.model.to(self.device).eval()
        # NHWC where it pays: the shipped lite0's one-image forward pass takes 13.0 ms instead of
        # 16.1 ms on one CPU thread (benchmarks/app_latency.py).
        self.channels_last = channels_last_pays(self.device)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.labels = self.bundle.label_names
        self.transform = self.bundle.eval_transform()
        # Large JPEG uploads are decoded at reduced size, still well above what the transform keeps.
        self.decoded_side = decoded_side(self.bundle.pretrained_cfg, self.bundle.source_image_size)
        self.temperature = self.bundle.temperature
        self.tta = self.bundle.tta if tta is None else tta_mode(tta)
        # The energy below which an image is probably none of the classes (classifier.ood); None
        # for bundles evaluated before there was one, which then never flag anything.
        self.ood_threshold = self.bundle.ood_threshold

    def preprocess(self, image: ImageSource) -> torch.Tensor:
        """Open (safely: see classifier.images) and transform one image; raises ImageError."""
        pil = open_image(image, channels=self.bundle.in_chans, min_side=self.decoded_side)
        return self.transform(pil)

    def stack(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        """A batch of preprocessed images, for `probabilities` (OnnxPredictor's is a numpy array)."""
        return torch.stack(list(images))

    @torch.inference_mode()
    def calibrated_logits(self, batch: torch.Tensor) -> torch.Tensor:
        """The logits of a preprocessed batch, with the bundle's TTA, divided by its temperature."""
        batch = batch.to(self.device)
        if self.channels_last and batch.ndim == 4:
            batch = batch.contiguous(memory_format=torch.channels_last)
        logits = tta_logits(self.model, batch, self.tta)
        return (logits.float() / self.temperature).cpu()

    def probabilities(self, batch: torch.Tensor) -> torch.Tensor:
        return self.calibrated_logits(batch).softmax(-1)

    def scored_probabilities(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, classes) calibrated probabilities of a preprocessed batch and each image's
        out-of-distribution score, from one forward pass: the score (energy, classifier.ood) costs a
        logsumexp of the same logits."""
        logits = self.calibrated_logits(batch)
        return logits.softmax(-1), energy(logits)

    def predict_scored(self, image: ImageSource | Image.Image, top_k: int | None = None) -> tuple[dict[str, float], float]:
        """({class: probability} as predict gives it, the image's out-of-distribution score)."""
        probabilities, scores = self.scored_probabilities(self.preprocess(image).unsqueeze(0))
        return self.top_classes(probabilities[0], top_k), float(scores[0])

    def out_of_domain(self, score: float) -> bool:
        """Whether predict_scored's score says the image is probably none of the classes."""
        return is_out_of_domain(score, self.ood_threshold)

    def predict_batch(self, images: Sequence[ImageSource], top_k: int | None = None) -> list[dict[str, float]]:
        batch = self.stack([self.preprocess(image) for image in images])
        return [self.top_classes(p, top_k) for p in self.probabilities(batch)]

    def predict(self, image: ImageSource | Image.Image, top_k: int | None = None) -> dict[str, float]:
        """{class: probability}, most likely first; `top_k` keeps only the first k."""
        return self.predict_batch([image], top_k)[0]

    def top_classes(self, probs: torch.Tensor, top_k: int | None = None) -> dict[str, float]:
        """{class: probability} of one row of `probabilities`, most likely first, `top_k` of them."""
        k = min(top_k or len(self.labels), len(self.labels))
        top = probs.topk(k)
        return {self.labels[int(i)]: float(p) for p, i in zip(top.values, top.indices)}


    def explain(self, image: ImageSource | Image.Image, label: str | None = None) -> tuple[Image.Image, str]:
        """(the image the model saw with a Grad-CAM heatmap over it, the class explained): where it
        found the evidence for `label`, by default its top class. Computed on the same preprocessed
        tensor, with the same mirror averaging, as the prediction (classifier.cam); it costs a
        forward and a backward pass per view, so it is only run when asked. Raises ImageError, and
        classifier.errors.NoFeatureMap for a model without a convolutional feature map."""
        x = self.preprocess(image)
        if label is None:
            target = int(self.probabilities(x.unsqueeze(0))[0].argmax())
        elif label in self.labels:
            target = self.labels.index(label)
        else:
            raise ValueError(f"{label!r} is not a class of this model ({', '.join(self.labels)})")
        heatmap = grad_cam_tta(self.model, x.to(self.device), target, self.tta)
        seen = denormalize(x, self.bundle.pretrained_cfg["mean"], self.bundle.pretrained_cfg["std"])
        return overlay(seen, heatmap.cpu()), self.labels[target]
