"""Image-quality metrics: FID, KID and CLIP score, in pieces that model ranks can share.

    inception = load_inception("weights-inception-2015-12-05-6726825d.pth", device="cuda")  # or None, "random"
    real, fake = FeatureStats.empty(), FeatureStats.empty()
    real.add(inception(real_images))              # (B, 3, H, W) uint8, any size -> (B, 2048) features
    fake.add(inception(generated_images))
    fid(real, fake)                               # float
    kid(real.features, fake.features)             # (mean, std) over subsets
    clip = ClipScore.load("openai/clip-vit-large-patch14", device="cuda")
    clip(generated_images, captions)              # (B,) per-image scores: average them for the CLIP score

Contract:

- Features are those of the InceptionV3 that FID papers report, the `pt_inception-2015-12-05` network
  (TensorFlow's 2015-12-05 graph ported to PyTorch by torch-fidelity, used by torchmetrics too): its
  2048-d pool features of uint8 RGB images, resized to 299 x 299 inside the network the way TensorFlow
  1.x did. Its weights come from a local file (the `.pth` torch-fidelity publishes, or the same tensors
  as `.safetensors`), or are fetched once into the torch hub cache when the machine has network.
  `load_inception("random")` builds the same architecture with seeded random weights: for smoke tests
  only, its figures are never comparable with published ones.
- FID (Heusel et al. 2017, arXiv 1706.08500): ||mu_r - mu_g||^2 + tr(S_r + S_g - 2 (S_r S_g)^(1/2)),
  from the Gaussians fitted to the two feature sets.
- KID (Binkowski et al. 2018, arXiv 1801.01401): the unbiased estimator of MMD^2 with the cubic
  polynomial kernel k(x, y) = (x.y / d + 1)^3, averaged over random subsets (defaults 100 subsets of
  1000, torch-fidelity's), reported as mean and standard deviation over the subsets.
- CLIP score (Hessel et al. 2021, arXiv 2104.08718; torchmetrics' definition): per image
  100 * max(cos(E_image, E_caption), 0) with any CLIP checkpoint (hub id or local directory).

For evaluation during training, across model ranks (nothing here touches torch.distributed except
`gather_stats`, which takes a process group):

    # every model rank, on its own share of the evaluation rows, e.g. held-out rows decoded with
    # dataset.holdout_batches(b, rows=rows[rank::world], dtype=torch.uint8):
    real, fake = FeatureStats.empty(device=device), FeatureStats.empty(device=device)
    real.add(inception(real_uint8)); fake.add(inception(generated_uint8))
    scores = clip(generated_uint8, captions)                         # (B,)
    clip_sums = torch.tensor([float(scores.sum()), len(scores)], dtype=torch.float64, device=device)
    # then, on every model rank (a collective: all of them call it):
    real, fake = gather_stats(real, group), gather_stats(fake, group)
    dist.all_reduce(clip_sums, group=group)
    metrics = {"eval/fid": fid(real, fake), "eval/kid": kid(real.features, fake.features)[0],
               "eval/clip_score": float(clip_sums[0] / clip_sums[1])}
    logger.log(step, metrics)         # the first model rank; plot_run.py plots every eval/* key

The statistics are sums (count, sum of x, sum of x x^T, in float64) plus the features themselves for
KID, so merging shares gives exactly the statistics of all the images together: FID does not depend on
how the images were split over ranks, and KID sees the same feature sets (its seeded subsets are drawn
over the features in rank order). The real images' statistics can be computed once and kept.
`FeatureStats.merge` does the same as `gather_stats` without a process group.
"""

from __future__ import annotations

import functools
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

INCEPTION_DIM = 2048
RANDOM = "random"
"""`load_inception(RANDOM)`: a random-init network of the same architecture (smoke tests only)."""
RANDOM_WARNING = ("Inception weights are RANDOM (--inception-weights random): FID and KID below are NOT comparable "
                  "with published figures, only with other runs that also use random weights with the same seed")
KID_SUBSETS, KID_SUBSET_SIZE = 100, 1000
"""torch-fidelity's defaults (kid_subsets, kid_subset_size), which KID figures in papers mostly use."""


class EvaluationError(ValueError):
    """A metric's model or input cannot be used. The message names the thing and the fix."""


# --------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------


def uint8_images(images: Tensor) -> Tensor:
    """(B, 3, H, W) in [-1, 1] -> uint8 0..255, quantised exactly as `sd3.diffusion.pipeline.to_pil` saves them."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def pil_to_uint8(images) -> Tensor:
    """PIL RGB images of one size -> (B, 3, H, W) uint8."""
    return torch.stack([torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1) for im in images])


def _check_uint8(images: Tensor, what: str) -> None:
    if not (isinstance(images, Tensor) and images.dtype == torch.uint8 and images.dim() == 4
            and images.shape[1] == 3):
        got = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, Tensor) else type(images).__name__
        raise EvaluationError(f"{what} takes (B, 3, H, W) uint8 RGB images, got {got}; convert images in "
                              "[-1, 1] with sd3.eval.scores.uint8_images")


# --------------------------------------------------------------------------------------------------
# Inception features
# --------------------------------------------------------------------------------------------------


def _torch_fidelity_inception():
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3

    return FeatureExtractorInceptionV3, URL_INCEPTION_V3


def _empty_state() -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save({}, buffer)
    buffer.seek(0)
    return buffer


@functools.cache
def _inception_class():
    """torch-fidelity's InceptionV3, built without its own weight loading.

    Its constructor downloads the weights when given no file, and otherwise torch.loads the file it is
    given (0.4 with weights_only=False: an unpickler). We hand it an empty state dict (its one
    load_state_dict call is then skipped) and load the weights ourselves (safetensors, or torch.load with
    weights_only=True): nothing downloads at construction, and a random-init network can be built."""
    base, _ = _torch_fidelity_inception()

    class InceptionFeatures(base):
        """(B, 3, H, W) uint8 -> (B, 2048) float64 pool features of the FID Inception network."""

        num_features = INCEPTION_DIM  # what torchmetrics reads from a custom feature extractor
        random_weights = False

        def __init__(self):
            super().__init__("inception-v3-compat", [str(INCEPTION_DIM)],
                             feature_extractor_weights_path=_empty_state())

        def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
            if not state_dict:
                return None  # the constructor's call (see above)
            return super().load_state_dict(state_dict, strict=strict, assign=assign)

        @torch.no_grad()
        def forward(self, images: Tensor, chunk: int = 32) -> Tensor:
            _check_uint8(images, "the Inception feature extractor")
            device = next(self.parameters()).device
            out = [super(InceptionFeatures, self).forward(images[i:i + chunk].to(device))[0]
                   for i in range(0, images.shape[0], chunk)]
            return torch.cat(out).double()                                   # (B, 2048)

    return InceptionFeatures


def load_inception(weights: str | Path | None, *, device: torch.device | str = "cpu", seed: int = 0) -> nn.Module:
    """The FID Inception network, in eval mode on `device`.

    weights: a local file (`.pth` state dict as torch-fidelity publishes it, or `.safetensors`); None to
    fetch torch-fidelity's file once into the torch hub cache (needs network the first time; its SHA-256
    prefix is checked); "random" for seeded random weights (smoke tests only: see RANDOM_WARNING)."""
    cls = _inception_class()
    _, url = _torch_fidelity_inception()
    if weights is None:
        try:
            state = torch.hub.load_state_dict_from_url(url, progress=False, check_hash=True, weights_only=True,
                                                       map_location="cpu")
        except Exception as e:
            raise EvaluationError(
                f"could not fetch the Inception weights from {url} ({type(e).__name__}: {e}); download that file "
                "once where there is network and pass --inception-weights FILE, or --inception-weights random "
                "for a smoke test") from e
    elif str(weights) == RANDOM:
        state = None
    else:
        state = _read_state(Path(weights))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = cls()
        if state is None:
            _random_init(net)
            net.random_weights = True
    if state is not None:
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise EvaluationError(f"--inception-weights {weights}: not the weights of torch-fidelity's "
                                  f"InceptionV3 ({str(e).splitlines()[0]}); use weights-inception-2015-12-05-"
                                  "6726825d.pth") from e
    return net.to(device).eval().requires_grad_(False)


def _read_state(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise EvaluationError(f"--inception-weights {path}: no such file; give the InceptionV3 weights file "
                              "(weights-inception-2015-12-05-6726825d.pth) or 'random'")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(path)
        return torch.load(path, map_location="cpu", weights_only=True)   # plain tensors only, never a pickle
    except Exception as e:
        raise EvaluationError(f"--inception-weights {path}: cannot be read as a state dict ({type(e).__name__}: "
                              f"{e}); give a .pth state dict or a .safetensors file") from e


def _random_init(net: nn.Module) -> None:
    """He-normal weights (He et al. 2015, arXiv 1502.01852) so that activations keep their scale through
    the ~90 ReLU layers: PyTorch's default init shrinks them toward zero and every image would look alike."""
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


# --------------------------------------------------------------------------------------------------
# Statistics that merge over ranks
# --------------------------------------------------------------------------------------------------


@dataclass
class FeatureStats:
    """Sums over a set of feature vectors: enough for FID, and the vectors themselves for KID.

    Sums of shares are the sums of the whole set, so `merge` / `gather_stats` over ranks is exact."""

    n: int
    sum: Tensor
    """(D,) float64: sum of the feature vectors."""
    outer: Tensor
    """(D, D) float64: sum of x x^T."""
    features: Tensor | None
    """(n, D) float32 feature vectors (kept for KID), or None when not kept."""

    @classmethod
    def empty(cls, dim: int = INCEPTION_DIM, *, keep_features: bool = True,
              device: torch.device | str = "cpu") -> FeatureStats:
        zeros = torch.zeros(dim, dtype=torch.float64, device=device)
        feats = torch.zeros(0, dim, dtype=torch.float32, device=device) if keep_features else None
        return cls(n=0, sum=zeros, outer=torch.zeros(dim, dim, dtype=torch.float64, device=device), features=feats)

    @property
    def dim(self) -> int:
        return self.sum.shape[0]

    def add(self, features: Tensor) -> FeatureStats:
        """Add (B, D) feature vectors. Returns self."""
        if features.dim() != 2 or features.shape[1] != self.dim:
            raise EvaluationError(f"FeatureStats.add takes (B, {self.dim}) features, got {tuple(features.shape)}")
        x = features.to(self.sum.device, torch.float64)
        self.n += x.shape[0]
        self.sum += x.sum(0)
        self.outer += x.T @ x
        if self.features is not None:
            self.features = torch.cat([self.features, x.float()])
        return self

    @classmethod
    def merge(cls, parts: list[FeatureStats]) -> FeatureStats:
        """The statistics of all the parts' vectors together (what `gather_stats` computes over ranks)."""
        keep = all(p.features is not None for p in parts)
        out = cls.empty(parts[0].dim, keep_features=keep, device=parts[0].sum.device)
        for p in parts:
            out.n += p.n
            out.sum += p.sum.to(out.sum.device)
            out.outer += p.outer.to(out.sum.device)
            if keep:
                out.features = torch.cat([out.features, p.features.to(out.sum.device)])
        return out

    def mean_cov(self) -> tuple[Tensor, Tensor]:
        """The fitted Gaussian: mean (D,) and unbiased covariance (D, D), float64."""
        if self.n < 2:
            raise EvaluationError(f"FID needs at least 2 images per set, got {self.n}")
        mu = self.sum / self.n
        cov = (self.outer - self.n * torch.outer(mu, mu)) / (self.n - 1)
        return mu, (cov + cov.T) / 2


def gather_stats(stats: FeatureStats, group=None, *, device: torch.device | str | None = None) -> FeatureStats:
    """The statistics of every rank's vectors together, on every rank of `group` (a collective).

    Counts and sums are all-reduced; the feature vectors (KID) are all-gathered, padded to the largest
    share. `device`: where the collectives run (a CUDA device for NCCL; default the stats' device)."""
    import torch.distributed as dist

    device = torch.device(device) if device is not None else stats.sum.device
    flat = torch.cat([torch.tensor([float(stats.n)], dtype=torch.float64, device=stats.sum.device),
                      stats.sum, stats.outer.flatten()]).to(device)
    dist.all_reduce(flat, group=group)
    D = stats.dim
    out = FeatureStats(n=round(flat[0].item()), sum=flat[1:1 + D].to(stats.sum.device),
                       outer=flat[1 + D:].view(D, D).to(stats.sum.device), features=None)
    if stats.features is not None:
        world = dist.get_world_size(group)
        counts = torch.tensor([stats.n], dtype=torch.int64, device=device)
        all_counts = [torch.zeros_like(counts) for _ in range(world)]
        dist.all_gather(all_counts, counts, group=group)
        sizes = [int(c.item()) for c in all_counts]
        padded = torch.zeros(max(sizes), D, dtype=torch.float32, device=device)
        padded[:stats.n] = stats.features.to(device)
        parts = [torch.zeros_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded, group=group)
        out.features = torch.cat([p[:s] for p, s in zip(parts, sizes)]).to(stats.sum.device)
    return out


# --------------------------------------------------------------------------------------------------
# FID and KID
# --------------------------------------------------------------------------------------------------


def _sqrt_psd(a: Tensor) -> Tensor:
    """Square root of a symmetric positive semi-definite matrix (eigenvalues clamped at 0)."""
    w, v = torch.linalg.eigh(a)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def frechet_distance(*, mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (Dowson & Landau 1982):
    ||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2)).

    tr((S1 S2)^(1/2)) is computed as the sum of the square roots of the eigenvalues of the symmetric
    matrix S1^(1/2) S2 S1^(1/2), which has the same eigenvalues as S1 S2 (all >= 0), in float64. This
    stays real and stable when the covariances are singular (fewer images than feature dimensions),
    where scipy's sqrtm of the product returns complex noise that must be discarded."""
    mu1, mu2, s1, s2 = (x.double() for x in (mu1, mu2, sigma1, sigma2))
    root = _sqrt_psd(s1)
    middle = root @ s2 @ root
    eig = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0)
    value = (mu1 - mu2).square().sum() + s1.trace() + s2.trace() - 2 * eig.sqrt().sum()
    return float(value.clamp(min=0))


def fid(real: FeatureStats, fake: FeatureStats) -> float:
    """FID between two feature sets (Heusel et al. 2017)."""
    mu1, s1 = real.mean_cov()
    mu2, s2 = fake.mean_cov()
    return frechet_distance(mu1=mu1, sigma1=s1, mu2=mu2, sigma2=s2)


def polynomial_kernel(x: Tensor, y: Tensor) -> Tensor:
    """k(x, y) = (x.y / d + 1)^3 for every pair: (n, d), (m, d) -> (n, m) (KID's kernel)."""
    return (x @ y.T / x.shape[1] + 1) ** 3


def mmd2_unbiased(x: Tensor, y: Tensor) -> Tensor:
    """Unbiased MMD^2 estimate (Gretton et al. 2012, eq. 3) of two equal-size samples (m, d):
    sum_{i != j} [k(x_i, x_j) + k(y_i, y_j)] / (m (m - 1)) - 2 sum_{i, j} k(x_i, y_j) / m^2."""
    m = x.shape[0]
    k_xx, k_yy, k_xy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    same = (k_xx.sum() - k_xx.diagonal().sum() + k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1))
    return same - 2 * k_xy.sum() / m**2


def kid(real: Tensor, fake: Tensor, *, subsets: int = KID_SUBSETS, subset_size: int = KID_SUBSET_SIZE,
        seed: int = 0) -> tuple[float, float]:
    """KID: mean and standard deviation of the unbiased MMD^2 over `subsets` random subsets of
    `subset_size` vectors of each set (drawn without replacement, seeded). The subset size is capped at
    the smaller set (then with equal sets every subset is the whole set and the std is 0)."""
    if real is None or fake is None:
        raise EvaluationError("KID needs the feature vectors: build FeatureStats with keep_features=True")
    m = min(subset_size, real.shape[0], fake.shape[0])
    if m < 2:
        raise EvaluationError(f"KID needs at least 2 images per set, got {real.shape[0]} and {fake.shape[0]}")
    g = torch.Generator().manual_seed(seed)
    x_all, y_all = real.double(), fake.double()
    values = []
    for _ in range(subsets):
        ix = torch.randperm(real.shape[0], generator=g)[:m].to(real.device)
        iy = torch.randperm(fake.shape[0], generator=g)[:m].to(fake.device)
        values.append(mmd2_unbiased(x_all[ix], y_all[iy]))
    v = torch.stack(values)
    return float(v.mean()), float(v.std(unbiased=False))


def kid_subset_size(n_real: int, n_fake: int, subset_size: int = KID_SUBSET_SIZE) -> int:
    """The subset size `kid` uses for sets of these sizes."""
    return min(subset_size, n_real, n_fake)


# --------------------------------------------------------------------------------------------------
# CLIP score
# --------------------------------------------------------------------------------------------------


class ClipScore:
    """Per-image CLIP score 100 * max(cos(E_image, E_caption), 0) with a CLIP checkpoint.

    Not torchmetrics' CLIPScore: with transformers 5 it fails outright (get_image_features now returns a
    model output, which it divides by its norm); it accepts only a fixed list of hub ids (or a callable); it cuts the
    token ids of captions longer than the text tower after tokenizing, dropping the end-of-text token at
    which CLIP pools (the detailed `recaption` captions often are that long), and its state syncs through
    torch.distributed's default group. Here the tokenizer truncates (keeping the end token), and the
    per-image scores are returned for the caller to sum over ranks. torchmetrics clamps the average, the
    definition clamps each image: identical whenever every cosine is positive, as with trained CLIPs."""

    def __init__(self, model, tokenizer, image_processor, *, name: str):
        self.model, self.tokenizer, self.image_processor, self.name = model.eval(), tokenizer, image_processor, name
        self.max_tokens = int(model.config.text_config.max_position_embeddings)

    @classmethod
    def load(cls, source: str, *, device: torch.device | str = "cpu") -> ClipScore:
        """`source`: a hub id (e.g. openai/clip-vit-large-patch14) or a local directory holding what
        save_pretrained writes for a CLIPModel, its tokenizer and its image processor."""
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel
        from transformers.utils import logging as hf_logging

        local = Path(source).expanduser()
        where = str(local) if local.is_dir() else source
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            model = CLIPModel.from_pretrained(where, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(where)
            image_processor = AutoImageProcessor.from_pretrained(where)
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            kind = "local directory" if local.is_dir() else "hub id (HF_HUB_OFFLINE may be set)"
            raise EvaluationError(f"--clip {source}: could not load a CLIP model, tokenizer and image processor "
                                  f"from this {kind} ({type(e).__name__}: {first}); give a hub id such as "
                                  "openai/clip-vit-large-patch14 or a directory saved with save_pretrained") from e
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        tokenizer.padding_side = "right"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return cls(model.to(device).requires_grad_(False), tokenizer, image_processor, name=source)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def __call__(self, images: Tensor, captions: list[str]) -> Tensor:
        """(B, 3, H, W) uint8 images and B captions -> (B,) float64 scores in [0, 100]."""
        _check_uint8(images, "ClipScore")
        if len(captions) != images.shape[0]:
            raise EvaluationError(f"ClipScore: {images.shape[0]} images but {len(captions)} captions")
        pixels = self.image_processor(images=list(images.cpu()), return_tensors="pt")["pixel_values"]
        tokens = self.tokenizer(list(captions), padding=True, truncation=True, max_length=self.max_tokens,
                                return_tensors="pt")
        image = self.model.get_image_features(pixel_values=pixels.to(self.device)).pooler_output
        text = self.model.get_text_features(input_ids=tokens["input_ids"].to(self.device),
                                            attention_mask=tokens["attention_mask"].to(self.device)).pooler_output
        cos = torch.nn.functional.cosine_similarity(image.double(), text.double(), dim=-1)
        return 100 * cos.clamp(min=0)                                        # (B,)

