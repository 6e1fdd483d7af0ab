"""Image tokenizers. The digits VQ on scikit-learn's real digits: quality against independent
references (the mean image, scikit-learn's KMeans, brute-force nearest codes) and the cache. A
checkpoint's VQ-VAE (tiny random Emu3VQVAE / JanusVQVAE saved with save_pretrained): read back alone
from the checkpoint, it tokenizes exactly as the model's own."""

import pytest
import torch
from sklearn.cluster import KMeans

from model_zoo.build import build_image_tokenizer
from model_zoo.config import DataConfig, ModelConfig
from model_zoo.vq import CheckpointVQ, VQTokenizer, digits, from_patches, to_patches


@pytest.fixture(scope="module")
def images():
    return digits()[0]


@pytest.fixture(scope="module")
def cached(digits_cache):
    return digits_cache, VQTokenizer.load_or_train(digits_cache, codebook_size=64, seed=0)


def test_reconstruction_beats_the_mean_image_and_improves_with_codebook_size(images, cached):
    baseline = float((images - images.mean(0)).square().mean())
    def mse_of(vq):
        return float((vq.decode(vq.encode(images)) - images).square().mean())

    mse = {k: mse_of(VQTokenizer.fit(images, k, seed=0)) for k in (4, 16)} | {64: mse_of(cached[1])}
    assert mse[64] < 0.1 * baseline, (mse, baseline)
    assert baseline > mse[4] > mse[16] > mse[64]


def test_kmeans_matches_scikit_learn_inertia(images, cached):
    x = to_patches(images).reshape(-1, 4).double()
    ours = float(torch.cdist(x, cached[1].codebook.double()).min(1).values.square().sum())
    ref = KMeans(64, n_init=1, random_state=0, max_iter=100).fit(x.numpy()).inertia_
    assert ours < 1.05 * ref


def test_encode_picks_the_nearest_code_and_decode_inverts_patching(images, cached):
    vq = cached[1]
    codes = vq.encode(images[:50])
    assert codes.shape == (50, 16) and codes.dtype == torch.long
    brute = torch.cdist(to_patches(images[:50]), vq.codebook.expand(50, -1, -1)).argmin(-1)
    assert torch.equal(codes, brute)
    out = vq.decode(codes)
    assert out.shape == (50, 1, 8, 8) and out.dtype == torch.float32
    assert torch.equal(out[:, 0, :2, :2].reshape(50, 4), vq.codebook[codes[:, 0]])  # code 0 is the top-left patch
    assert torch.equal(from_patches(to_patches(images)), images)


def test_fit_is_deterministic_per_seed(images):
    a, b, c = (VQTokenizer.fit(images[:300], 16, seed=s) for s in (1, 1, 2))
    assert torch.equal(a.codebook, b.codebook) and not torch.equal(a.codebook, c.codebook)


def test_cache_round_trip_is_bit_identical_and_not_refitted(cached, tmp_path):
    cache, vq = cached
    assert not [p.name for p in cache.iterdir() if p.name.startswith(".")], "no temp file left behind"
    (path,) = cache.glob("vq-digits-k64-seed0-*.pt")
    mtime = path.stat().st_mtime_ns
    again = VQTokenizer.load_or_train(cache, codebook_size=64, seed=0)
    assert torch.equal(again.codebook, vq.codebook) and path.stat().st_mtime_ns == mtime
    vq.save(tmp_path / "vq.pt")
    assert torch.equal(VQTokenizer.load(tmp_path / "vq.pt").codebook, vq.codebook)


def test_corrupt_cache_names_the_file_and_the_fix(cached, tmp_path):
    name = next(cached[0].glob("vq-digits-*.pt")).name
    (tmp_path / name).write_bytes(b"not a codebook")
    with pytest.raises(ValueError, match=f"(?s){name}.*corrupt.*delete it to retrain"):
        VQTokenizer.load_or_train(tmp_path, codebook_size=64, seed=0)


def test_bad_input_names_the_argument(images, cached, tmp_path):
    vq = cached[1]
    with pytest.raises(ValueError, match=r"images must be a FloatTensor\[N, 1, 8, 8\]"):
        vq.encode(images.reshape(-1, 64))
    with pytest.raises(ValueError, match="codes"):
        vq.decode(torch.full((1, 16), 64))
    with pytest.raises(ValueError, match="codebook_size"):
        VQTokenizer.fit(images[:2], 100)
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="cache_dir"):
        VQTokenizer.load_or_train(tmp_path / "file" / "sub", codebook_size=4)




@pytest.mark.parametrize("family", ["emu3", "janus"])
def test_a_checkpoints_vq_vae_read_alone_tokenizes_as_the_models_own(family, images, tmp_path):
    from transformers import Emu3VQVAE, JanusVQVAE

    from test_models import emu3, janus

    model = {"emu3": emu3, "janus": janus}[family]()
    model.save_pretrained(str(tmp_path))
    m, d = ModelConfig(family=family, pretrained=str(tmp_path)), DataConfig(image_tokenizer="pretrained", image_size=8)
    alone = build_image_tokenizer(d, m)                       # the VQ-VAE's tensors only, from the safetensors
    own = CheckpointVQ(model.vqmodel(), 8)
    assert alone.grid == own.grid == (4, 4) and alone.codebook_size == 32 and alone.channels == 1
    assert isinstance(alone, CheckpointVQ)
    assert not any(p.requires_grad for p in alone.vqmodel.parameters())
    codes = alone.encode(images[:6])
    assert codes.shape == (6, 16) and torch.equal(codes, own.encode(images[:6]))
    direct = model.vqmodel()                                  # the transformers class's own encode, by hand
    x = images[:6] * 2 - 1
    if family == "emu3":
        assert isinstance(direct, Emu3VQVAE)
        ref = torch.stack(direct.encode(x, torch.tensor([[8, 8]] * 6)).image_tokens).reshape(6, -1)
    else:
        assert isinstance(direct, JanusVQVAE)
        ref = direct.encode(x).image_tokens.reshape(6, -1)
    assert torch.equal(codes, ref)
    pictures = alone.decode(codes)
    assert pictures.shape == (6, 1, 8, 8) and 0 <= float(pictures.min()) and float(pictures.max()) <= 1
    assert torch.equal(pictures, own.decode(codes))
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 32\)"):
        alone.decode(torch.full((1, 16), 32))
    with pytest.raises(ValueError, match="image_size=7 is invalid"):
        CheckpointVQ(model.vqmodel(), 7)
