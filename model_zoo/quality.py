"""Image quality of a model's generations, measured: prompt it for each digit, decode the sampled
codes with the VQ tokenizer, and let a digit classifier say which digit each image shows.

The judge is a multinomial logistic regression (scikit-learn) fitted on VQ reconstructions of the
training images, the same kind of picture the model can produce; its accuracy on reconstructions
of the validation images is the ceiling a perfect generator would reach.
"""

from __future__ import annotations

import datasets
import torch
from sklearn.linear_model import LogisticRegression

from model_zoo.data import Vocab, caption
from model_zoo.emu3 import Emu3Model
from model_zoo.vq import SIDE, VQTokenizer


class DigitJudge:
    def __init__(self, train: datasets.Dataset, val: datasets.Dataset, vq: VQTokenizer):
        self.vq = vq
        x, y = self._reconstructed(train), train["digit"]
        self.classifier = LogisticRegression(max_iter=2000).fit(x, y)
        self.ceiling = float(self.classifier.score(self._reconstructed(val), val["digit"]))

    def _reconstructed(self, data: datasets.Dataset):
        images = torch.tensor(data["image"], dtype=torch.float32).reshape(-1, SIDE, SIDE)
        return self.vq.decode(self.vq.encode(images)).reshape(len(images), -1).numpy()

    def accuracy(self, images: torch.Tensor, digits: torch.Tensor) -> float:
        """Share of images [N, 8, 8] classified as their intended digit."""
        predicted = self.classifier.predict(images.reshape(len(images), -1).numpy())
        return float((torch.from_numpy(predicted) == digits).float().mean())


def prompt(model: torch.nn.Module, vocab: Vocab, text: str) -> torch.Tensor:
    """The generation prompt of `text`: Emu3 reads `[BOS] caption [SOV] meta [SOT]`, Janus the caption."""
    ids = vocab.text(text)
    if isinstance(model, Emu3Model):
        ids = vocab.sequence("generation", ids, [])[:-2]  # up to [SOT]
    return torch.tensor(ids)


@torch.no_grad()
def generate_digits(model: torch.nn.Module, vocab: Vocab, vq: VQTokenizer, per_digit: int, text_format: str = "plain",
                    seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(images [10 * per_digit, 8, 8], digits): per_digit samples for each digit 0..9, each from its own
    prompt (templates drawn as for samples 10,000 + j, outside the data set's indices)."""
    gen = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    codes = [model.generate_images(prompt(model, vocab, caption(d, 10_000 + j, text_format, "generation")), 1, 1.0, gen)
             for d in range(10) for j in range(per_digit)]
    model.train(was_training)
    return vq.decode(torch.cat(codes)), torch.arange(10).repeat_interleave(per_digit)
