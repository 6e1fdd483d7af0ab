"""What makes a benchmark's table the same on every rerun of the same command on the same code.

- Threads: fixed (`--threads`, default 1) for torch's intra-op pool and for the BLAS libraries numpy
  and scikit-learn load (their pools are sized from the environment when first imported, so `pin`
  runs before anything imports torch or numpy). A different thread count sums in another order.
- Kernels: `torch.use_deterministic_algorithms(True)`: an op without a deterministic implementation
  raises instead of silently varying.
- Seeds: every run seeds Python's `random`, numpy's global generator and torch's (`seed_all`); the
  training loop's own sources (initialisation, batch order, augmentation) and generation-time
  sampling are seeded from the run seed, and the split and VQ codebook from the data seed.
- Cached artifacts: the VQ codebook and the text tokenizer are cached across runs, so their content
  is printed as a hash: a table made with other artifacts says so. (The text tokenizer used to be
  trained by Hugging Face's nondeterministic WordPiece trainer: see model_zoo/wordpiece.py.)
- Versions of Python and of every library in the path, and the git commit, are printed with the table.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import random
import subprocess
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PACKAGES = ("torch", "deepspeed", "transformers", "peft", "tokenizers", "datasets", "numpy", "scikit-learn")


def pin(threads: int) -> None:
    """Fix thread counts and deterministic kernels; call before torch or numpy is imported."""
    if threads < 1:
        raise ValueError(f"--threads={threads} is invalid: must be >= 1")
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(var, "1")
    import torch

    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)


def seed_all(seed: int) -> None:
    """Python's, numpy's and torch's global generators (the loop reseeds torch itself)."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _git() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + (" (with uncommitted changes)" if dirty else "")


def environment(cache_dir: str | os.PathLike, codebook_size: int = 64, data_seed: int = 0) -> dict:
    """Versions, threads, commit, and content hashes of the cached VQ codebook and text tokenizer."""
    import torch

    from model_zoo import build_image_tokenizer, build_vocab
    from model_zoo.config import DataConfig, ModelConfig
    from model_zoo.vq import VQTokenizer

    data = DataConfig(cache_dir=str(cache_dir), seed=data_seed, codebook_size=codebook_size)
    vocab, vq = build_vocab(data, ModelConfig()), build_image_tokenizer(data, ModelConfig())
    assert isinstance(vq, VQTokenizer)  # DataConfig's default image tokenizer: the digits VQ
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
    tokens = json.dumps(vocab.tokenizer.get_vocab(), sort_keys=True).encode()
    return {"versions": versions, "threads": torch.get_num_threads(),
            "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(), "commit": _git(),
            "text_tokenizer_sha1": hashlib.sha1(tokens).hexdigest()[:12],
            "vq_codebook_sha1": hashlib.sha1(vq.codebook.double().numpy().tobytes()).hexdigest()[:12]}


def describe(env: dict) -> str:
    """One markdown paragraph of `environment`'s facts."""
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
    return (f"Environment: commit {env['commit']}; {env['threads']} thread(s), deterministic algorithms "
            f"{'on' if env['deterministic_algorithms'] else 'off'}; text tokenizer {env['text_tokenizer_sha1']}, "
            f"VQ codebook {env['vq_codebook_sha1']} (content hashes); {versions}.")


def write_results(name: str, command: str, table: str, rows: list) -> None:
    """benchmarks/results/<name>.md (the command that made it, then the table) and <name>.json (the rows)."""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.md").write_text(f"# `{command}`\n\n{table}")
    (RESULTS / f"{name}.json").write_text(json.dumps(rows, indent=1))
