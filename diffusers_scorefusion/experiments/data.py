"""Real data for the digits experiment: scikit-learn's bundled 8x8 digits, split once, never leaking the test images.

Each image has 64 pixels with 17 grey levels (integers 0..16). Per digit class the images are shuffled with a fixed
split seed and cut, in this order, into

- ``test``: the held-out test images (test NLL and denoising loss only; never used to train anything),
- ``target``: the pool the n target samples are drawn from (as many per class as the largest n needs),
- ``auxiliary``: everything else, the pool the auxiliary populations are drawn from (as large as the data allows).

The three parts are disjoint, so the fused auxiliaries never saw a target image or a test image. Validation images
are held out inside a part (`holdout`): the auxiliaries' from the auxiliary pool, the target models' from the n
target images.
"""

from dataclasses import dataclass
from typing import Dict, Sequence, Tuple

import numpy as np
import torch

NUM_LEVELS = 17  # grey levels 0..16 in sklearn's digits
SPLIT_NAMES = ("test", "target", "auxiliary")


@dataclass(frozen=True)
class DigitSplit:
    """Indices into ``load_digits().images`` per split name and digit class: ``indices[split][digit]``."""

    digits: Tuple[int, ...]
    indices: Dict[str, Dict[int, np.ndarray]]

    def images(self, pixels: np.ndarray, split: str, digit: int) -> np.ndarray:
        """The `(m, 8, 8)` integer images of one split and class."""
        if split not in self.indices:
            raise ValueError(f"split must be one of {SPLIT_NAMES}, got {split!r}")
        if digit not in self.indices[split]:
            raise ValueError(f"digit must be one of {self.digits}, got {digit!r}")
        return pixels[self.indices[split][digit]]


def load_digit_pixels() -> Tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits (no download): integer images `(1797, 8, 8)` in 0..16 and labels `(1797,)`."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images.astype(np.int64), bunch.target.astype(np.int64)


def split_digits(
    labels: np.ndarray, digits: Sequence[int], test_size: int, target_sizes: Sequence[int], split_seed: int = 0
) -> DigitSplit:
    """Shuffles each class with ``split_seed`` and cuts it into test / target / auxiliary (the rest).

    `test_size` images per class go to ``test``, ``target_sizes[c]`` of class ``digits[c]`` to ``target``.
    """
    if len(set(digits)) != len(digits) or len(digits) < 2:
        raise ValueError(f"digits must be at least two distinct classes, got {list(digits)}")
    if len(target_sizes) != len(digits) or min(target_sizes) < 1 or test_size < 1:
        raise ValueError(f"need test_size >= 1 and one target size >= 1 per digit {list(digits)}, got test_size="
                         f"{test_size}, target_sizes={list(target_sizes)}")  # fmt: skip
    rng = np.random.default_rng(split_seed)
    indices: Dict[str, Dict[int, np.ndarray]] = {name: {} for name in SPLIT_NAMES}
    for digit, target_size in zip(digits, target_sizes):
        members = np.flatnonzero(labels == digit)
        needed = test_size + target_size + 2
        if members.size < needed:
            raise ValueError(f"digit {digit} has {members.size} images, need at least {needed} (test {test_size}, "
                             f"target {target_size}, auxiliary >= 2)")  # fmt: skip
        members = members[rng.permutation(members.size)]
        indices["test"][digit] = np.sort(members[:test_size])
        indices["target"][digit] = np.sort(members[test_size : test_size + target_size])
        indices["auxiliary"][digit] = np.sort(members[test_size + target_size :])
    return DigitSplit(digits=tuple(digits), indices=indices)


def holdout(indices: np.ndarray, fraction: float, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """Splits image indices of one class into ``(train, validation)``: ``max(1, round(fraction * m))`` validation."""
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    if indices.size < 2:
        raise ValueError(f"need at least 2 images to hold one out, got {indices.size}")
    num_val = min(indices.size - 1, max(1, int(round(fraction * indices.size))))
    shuffled = indices[np.random.default_rng(seed).permutation(indices.size)]
    return np.sort(shuffled[num_val:]), np.sort(shuffled[:num_val])


def class_counts(n: int, proportions: Sequence[float]) -> Tuple[int, ...]:
    """Per-class counts of a stratified sample of size n: rounded ``n * p`` for all but the last class."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if abs(sum(proportions) - 1) > 1e-9 or min(proportions) < 0:
        raise ValueError(f"proportions must be >= 0 and sum to 1, got {list(proportions)}")
    counts = [int(round(n * p)) for p in proportions[:-1]]
    return tuple(counts + [n - sum(counts)])


def max_target_size(split: DigitSplit, proportions: Sequence[float]) -> int:
    """The largest n whose stratified sample fits in the target pool ("all available")."""
    pool = [split.indices["target"][digit].size for digit in split.digits]
    n = sum(pool)
    while n > 0 and any(c > size for c, size in zip(class_counts(n, proportions), pool)):
        n -= 1
    return n


def draw_target_indices(split: DigitSplit, n: int, proportions: Sequence[float], seed: int) -> np.ndarray:
    """Indices of n target training images: a stratified draw without replacement from the target pool."""
    counts = class_counts(n, proportions)
    rng = np.random.default_rng(seed)
    chosen = []
    for digit, count in zip(split.digits, counts):
        pool = split.indices["target"][digit]
        if count > pool.size:
            raise ValueError(f"n={n} needs {count} images of digit {digit}; the target pool has {pool.size}")
        chosen.append(rng.choice(pool, size=count, replace=False))
    return np.sort(np.concatenate(chosen))


class MixtureSampler:
    """Draws minibatches from a mixture of image pools: class ``c`` with probability ``proportions[c]``."""

    def __init__(self, pools: Sequence[np.ndarray], proportions: Sequence[float]):
        if len(pools) != len(proportions):
            raise ValueError(f"need one proportion per pool, got {len(proportions)} for {len(pools)} pools")
        if abs(sum(proportions) - 1) > 1e-9 or min(proportions) < 0:
            raise ValueError(f"proportions must be >= 0 and sum to 1, got {list(proportions)}")
        kept = [(pool, p) for pool, p in zip(pools, proportions) if p > 0]
        if any(pool.shape[0] == 0 for pool, _ in kept):
            raise ValueError("a pool with a positive proportion is empty")
        self.pools = [torch.as_tensor(pool, dtype=torch.float32) for pool, _ in kept]
        self.probs = torch.tensor([p for _, p in kept], dtype=torch.float64)

    def __call__(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """A `(batch_size, 8, 8)` float batch of integer grey levels."""
        classes = torch.multinomial(self.probs, batch_size, replacement=True, generator=generator)
        batch = torch.empty((batch_size,) + tuple(self.pools[0].shape[1:]))
        for c, pool in enumerate(self.pools):
            rows = (classes == c).nonzero().flatten()
            picks = torch.randint(0, pool.shape[0], (rows.numel(),), generator=generator)
            batch[rows] = pool[picks]
        return batch


def dequantize(pixels: torch.Tensor, generator: torch.Generator, num_levels: int = NUM_LEVELS) -> torch.Tensor:
    """Uniform dequantisation to [-1, 1]: grey level ``g`` becomes ``2 (g + u) / num_levels - 1``, u ~ U[0, 1)."""
    if pixels.min() < 0 or pixels.max() > num_levels - 1:
        raise ValueError(f"pixels must be grey levels in [0, {num_levels - 1}], got range "
                         f"[{pixels.min().item()}, {pixels.max().item()}]")  # fmt: skip
    noise = torch.rand(pixels.shape, generator=generator, dtype=torch.float32)
    return 2 * (pixels.to(torch.float32) + noise) / num_levels - 1


def quantize(sample: torch.Tensor, num_levels: int = NUM_LEVELS) -> torch.Tensor:
    """Inverse of `dequantize` up to the noise: values in [-1, 1] to integer grey levels 0..num_levels-1."""
    levels = torch.floor((sample.clamp(-1, 1) + 1) / 2 * num_levels)
    return levels.clamp(0, num_levels - 1).to(torch.int64)
