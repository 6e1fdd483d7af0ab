"""A model's generations, to look at and to measure: images for captions (a user's corpus: the sample
grid), and for each digit, judged by a digit classifier that says which digit each image shows.

The judge is a multinomial logistic regression (scikit-learn) fitted on the image tokenizer's
reconstructions of the training digits, the same kind of picture the model can produce; its
accuracy on reconstructions of the validation digits is the ceiling a perfect generator would reach.
"""

from __future__ import annotations

import datasets
import torch
from sklearn.linear_model import LogisticRegression

from model_zoo.data import fit_images
from model_zoo.digits import caption
from model_zoo.unified import UnifiedModel

PER_PROMPT = 4  # images per prompt in a sample grid: one row per digit or caption


class DigitJudge:
    def __init__(self, train: datasets.Dataset, val: datasets.Dataset, images):
        self.images = images
        self.classifier = LogisticRegression(max_iter=2000).fit(self._reconstructed(train), train["digit"])
        self.ceiling = float(self.classifier.score(self._reconstructed(val), val["digit"]))

    def _features(self, pixels: torch.Tensor):
        """[N, C, S, S] in [0, 1] -> [N, 64]: back to one channel at 8x8, the digits' own resolution."""
        return fit_images(pixels.float(), 1, 8).reshape(len(pixels), -1).numpy()

    def _reconstructed(self, data: datasets.Dataset):
        pixels = torch.tensor(data["image"], dtype=torch.float32).reshape(-1, 1, 8, 8)
        pixels = fit_images(pixels, self.images.channels, self.images.image_size)
        return self._features(self.images.decode(self.images.encode(pixels)))

    def accuracy(self, images: torch.Tensor, digits: torch.Tensor) -> float:
        """Share of images [N, C, S, S] classified as their intended digit."""
        predicted = self.classifier.predict(self._features(images))
        return float((torch.from_numpy(predicted) == digits).float().mean())


@torch.no_grad()
def generate_digits(model: UnifiedModel, layout, images, per_digit: int, text_format: str = "plain",
                    seed: int = 0, temperature: float = 1.0,
                    guidance: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(images [10 * per_digit, C, S, S], digits): per_digit samples for each digit 0..9, each from its own
    prompt (templates drawn as for samples 10,000 + j, outside the data set's indices), at `temperature`
    with classifier-free `guidance`."""
    gen = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    codes = [model.generate_images(layout, layout.vocab.text(caption(d, 10_000 + j, text_format, "generation")), 1,
                                   temperature, gen, guidance) for d in range(10) for j in range(per_digit)]
    model.train(was_training)
    return images.decode(torch.cat(codes)), torch.arange(10).repeat_interleave(per_digit)


@torch.no_grad()
def generate_captioned(model: UnifiedModel, layout, images, captions: list[str], per_caption: int,
                       seed: int = 0, temperature: float = 1.0, guidance: float = 1.0) -> torch.Tensor:
    """Images [len(captions) * per_caption, C, S, S], caption by caption: each caption tokenized as
    training tokenizes it, sampled at `temperature` with classifier-free `guidance` (> 1: an
    unconditioned stream beside, model.generate_images), decoded by the image tokenizer."""
    gen = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    codes = [model.generate_images(layout, layout.vocab.text(c), per_caption, temperature, gen, guidance)
             for c in captions]
    model.train(was_training)
    return images.decode(torch.cat(codes))
