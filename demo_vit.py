"""LoRA vs RandLoRA at equal trainable parameters on a real pretrained vision backbone.

    python demo_vit.py                                        # DINOv2 ViT-S/14, CIFAR-10, 16 images per class
    python demo_vit.py --model clip-vit-b-32 --dataset cifar100 --shots 4
    python demo_vit.py --hub-dir ~/src/dinov2 --data-dir ~/data --random-init --device cpu   # no network

The paper's few-shot protocol [1, sec. 5.2-5.3] in miniature: N training images per class
(`--shots`), the same data, optimiser, schedule and steps for every method, accuracy on the
test set. Methods (`--methods`):
    none       the backbone stays frozen; only the head trains (linear probe; zero-shot for CLIP)
    lora       LoRA at rank `--lora-rank` (32) on the adapted layers [3]
    randlora   RandLoRA at the rank `randlora.rank_for_budget` picks for LoRA's trainable count
    full       every backbone weight trains (at `--full-lr`, as full fine-tuning needs a smaller one)

Models (`--model`):
    dinov2-vits14  torch.hub.load("facebookresearch/dinov2", "dinov2_vits14") [2], torch only. Its
                   CLS feature feeds a linear head that trains in every method. Adapted: attn.qkv,
                   attn.proj, mlp.fc1, mlp.fc2 of each of the 12 blocks (k = 384: RandLoRA r = 3).
    clip-vit-b-32  OpenAI CLIP ViT-B/32 through open_clip (`pip install open_clip_torch`) [4]. Classes
                   are scored by cosine similarity with the frozen text embeddings of "a photo of a
                   {class}." (scaled by CLIP's logit scale), as in the paper; only the image tower
                   trains. Adapted: mlp.c_fc, mlp.c_proj, and the attention weights, which
                   nn.MultiheadAttention reads as raw Parameters (in_proj_weight, out_proj.weight):
                   patching its out_proj module would leave the update off the forward path, so both
                   go through `target_parameters`, and the first two steps check that every adapted
                   layer's lam and gam (LoRA's A and B) receive a gradient (k = 768: RandLoRA r = 6).

Scales. LoRA gets alpha = 2 r and Adam at `--lr` 1e-3, the paper's settings on CLIP [1, app. C].
RandLoRA, at the same lr, gets `--scaling peft` by default: alpha = 20 r, s = alpha / r, gam from 1/k
(Hugging Face PEFT's defaults, which the first author calls the most up to date); `--scaling paper`
gives the paper's alpha = 2 r, s = alpha / (r sqrt(n)), gam from 1/D, whose first Adam steps move
DeltaW 35 to 150 times less than LoRA's at this lr on ViT-S's shapes (the README's measurements).
`--full-lr` 1e-5 and `--head-lr` 1e-3 were chosen here, not tuned: full
fine-tuning moves every pretrained weight and takes a much smaller step than the adapters, and
DINOv2's head is a fresh linear layer trained at the adapters' rate.

Speed. `--amp` (on by default on CUDA) runs the training and evaluation forward passes under bf16
autocast; the weights, adapters and optimiser state stay float32. `--compile` compiles the backbone
(torch.compile, `--compile-backend`); before the clock starts, one forward and backward on each batch
shape the training loop will see triggers the compilation, and its wall time is reported as "compile",
apart from the training time. Evaluation with the merged weights under no_grad compiles its own
graph, not timed.

The table. method; r: LoRA's rank, or RandLoRA's basis rank (n = ceil(k / r) bases per layer);
trainable: parameters that receive gradients, head included; test acc: top-1 accuracy on the test
images, adapters merged into the weights as deployed; train time: wall clock of training (not of
evaluation, nor of --compile's warm-up); time / full: train time over full fine-tuning's in the same
run; compile, recompiles (with --compile): the warm-up's wall time, and how many times dynamo
compiled a frame again in the warm-up and training (from its cache entries; each batch shape after
the first costs one); memory: on a GPU the peak of torch.cuda.max_memory_allocated during training
(weights, gradients, optimiser state, activations), on a CPU the bytes autograd saved for backward in
one training step (torch.autograd.graph.saved_tensors_hooks; parameters, buffers and views of them
not counted), the quantity the paper's memory-saving autograd function reduces. The hook runs in
eager steps only (dynamo would trace it into compiled ones): with --compile on a CPU, no memory.

The model is loaded before the data is looked for: a missing --hub-dir, open_clip or weights is
reported before anything is downloaded.

Checkpoint. `--save-adapter FILE` writes one safetensors file per adapter method, randlora.save_adapter
of the whole classifier: its adapters' lam and gam (LoRA's A and B), DINOv2's trained head (patched with
`trainable=["head"]`, so it trains and is saved beside them), and the config; no bases, no frozen
weights. load_finetuned rebuilds the classifier from it with randlora.load_adapter. none and full
write nothing: their trained weights are the head or the whole backbone, not an adapter.

Data: the official python-version CIFAR tarballs, downloaded with urllib, checked against their
published MD5 before anything is unpickled (and then only numpy arrays and plain types are
accepted), unpacked under `--data-dir`; a `--data-dir` that already holds the unpacked folder
(cifar-10-batches-py, cifar-100-python) is used as it is. Decoded with numpy, resized and
normalised in torch; no torchvision.

[1] Albert et al., RandLoRA: Full-rank parameter-efficient fine-tuning of large models, ICLR 2025,
    arXiv 2502.00987 (sec. 5.2-5.3).
[2] Oquab et al., DINOv2: Learning robust visual features without supervision, TMLR 2024.
[3] Hu et al., LoRA: Low-rank adaptation of large language models, ICLR 2022.
[4] Radford et al., Learning transferable visual models from natural language supervision, ICML 2021.
"""

from __future__ import annotations

import argparse
import codecs
import copy
import hashlib
import http.client
import math
import os
import pickle
import shutil
import sys
import tarfile
import tempfile
import time
import urllib.request
from contextlib import nullcontext, suppress
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import randlora

METHODS = ("none", "lora", "randlora", "full")
ADAPTER_METHODS = ("lora", "randlora")


class DemoError(Exception):
    """A problem the user can fix (network, files, flags): main() prints the message, no traceback."""


# ----------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class DatasetSpec:
    title: str
    url: str  # the official python-version tarball
    filename: str
    md5: str  # published checksum of the tarball
    folder: str  # what the tarball unpacks to
    train_files: tuple
    test_files: tuple
    meta_file: str
    label_key: str  # key of the labels in each batch dict
    names_key: str  # key of the class names in the meta dict
    num_classes: int


DATASETS = {
    "cifar10": DatasetSpec(
        "CIFAR-10",
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "cifar-10-python.tar.gz",
        "c58f30108f718f92721af3b95e74349a",
        "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        ("test_batch",),
        "batches.meta",
        "labels",
        "label_names",
        10,
    ),
    "cifar100": DatasetSpec(
        "CIFAR-100",
        "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "cifar-100-python.tar.gz",
        "eb9058c3a382ffc7106e4002c42a8d85",
        "cifar-100-python",
        ("train",),
        ("test",),
        "meta",
        "fine_labels",
        "fine_label_names",
        100,
    ),
}


@dataclass(frozen=True)
class ModelSpec:
    title: str
    image_size: int  # the resolution the weights were trained at
    mean: tuple  # input normalisation, per RGB channel
    std: tuple
    target_modules: tuple  # nn.Linear layers to adapt (dotted suffixes)
    target_parameters: tuple = ()  # raw 2-D weights to adapt (dotted suffixes)


MODELS = {
    "dinov2-vits14": ModelSpec(
        "DINOv2 ViT-S/14",
        224,
        (0.485, 0.456, 0.406),
        (0.229, 0.224, 0.225),
        ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"),
    ),
    "clip-vit-b-32": ModelSpec(
        "CLIP ViT-B/32 (OpenAI)",
        224,
        (0.48145466, 0.4578275, 0.40821073),
        (0.26862954, 0.26130258, 0.27577711),
        ("mlp.c_fc", "mlp.c_proj"),
        ("attn.in_proj_weight", "attn.out_proj.weight"),
    ),
}
DINOV2_REPO, DINOV2_ENTRY = "facebookresearch/dinov2", "dinov2_vits14"
DINOV2_WEIGHTS = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_pretrain.pth"
CLIP_NAME, CLIP_TAG = "ViT-B-32-quickgelu", "openai"  # OpenAI's weights were trained with QuickGELU
PROMPT = "a photo of a {}."
ALPHA_PER_RANK = 2.0  # alpha = 2 r for LoRA and RandLoRA [1, app. C]
PEFT_ALPHA_PER_RANK = 20.0  # RandLoRA with --scaling peft: PEFT's 640 at r = 32


def default_data_dir() -> str:
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "randlora-demo")


# ----------------------------------------------------------------------------------------
# Progress


def clock(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Progress:
    """'label done/total ... elapsed, ETA' lines, at most one every `every` seconds (and the last)."""

    def __init__(self, label: str, total: int, log, every: float = 5.0):
        self.label, self.total, self.log, self.every = label, max(total, 1), log, every
        self.t0, self.last = time.perf_counter(), -math.inf

    def __call__(self, done: int, detail=None):
        now = time.perf_counter()
        if done < self.total and now - self.last < self.every:
            return
        self.last, elapsed = now, now - self.t0
        eta = elapsed / done * (self.total - done) if done else math.nan
        extra = f"  {detail()}" if detail else ""
        self.log(f"{self.label} {done}/{self.total}{extra}  {clock(elapsed)} elapsed, ETA {clock(eta)}")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------
# Data: download, MD5 check, unpack, decode


@dataclass(frozen=True)
class Cifar:
    train_images: torch.Tensor  # (N, 3, 32, 32) uint8, RGB
    train_labels: torch.Tensor  # (N,) int64
    test_images: torch.Tensor  # (M, 3, 32, 32) uint8
    test_labels: torch.Tensor  # (M,) int64
    classes: tuple  # class names, in label order


def file_md5(path: str) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _workaround(spec: DatasetSpec, data_dir: str) -> str:
    return (
        f"Offline? Fetch {spec.filename} elsewhere and put it, or the folder {spec.folder}/ it unpacks to, "
        f"in --data-dir DIR (now {data_dir})."
    )


def _download(spec: DatasetSpec, dest: str, data_dir: str, log) -> None:
    """Stream the tarball to dest + '.part', then rename: an interrupted download never looks complete."""
    part = dest + ".part"
    log(f"downloading {spec.title} from {spec.url} to {data_dir}")
    try:
        with urllib.request.urlopen(spec.url, timeout=60) as response, open(part, "wb") as f:
            total = int(response.headers.get("Content-Length") or 0)  # bytes, 0 if unknown
            progress, done = Progress(f"  {spec.filename}, MiB", math.ceil(total / 2**20), log), 0
            while chunk := response.read(1 << 20):
                f.write(chunk)
                done += len(chunk)
                if total:
                    progress(done // 2**20)
    except (
        OSError,
        http.client.HTTPException,
        ValueError,
    ) as e:  # URLError, HTTPError, timeouts are OSErrors
        with suppress(OSError):
            os.remove(part)
        raise DemoError(
            f"could not download {spec.title} from {spec.url} ({type(e).__name__}: {e}).\n"
            + _workaround(spec, data_dir)
        ) from None
    os.replace(part, dest)


def _verify(spec: DatasetSpec, tarball: str) -> None:
    got = file_md5(tarball)
    if got != spec.md5:
        os.remove(tarball)
        raise DemoError(
            f"{tarball} has MD5 {got}, but {spec.title}'s published MD5 is {spec.md5}: the download "
            "is corrupted or incomplete. Deleted it; nothing was unpickled. Run again to download it "
            "again, or put a good copy in --data-dir."
        )


def _extract(spec: DatasetSpec, tarball: str, data_dir: str) -> None:
    """Copy out exactly the files the loader reads (regular files under spec.folder, nothing else,
    so no path in the archive can write outside data_dir), into a temporary folder renamed at the end."""
    tmp = tempfile.mkdtemp(prefix=".unpack-", dir=data_dir)
    try:
        with tarfile.open(tarball, "r:gz") as tar:
            for name in spec.train_files + spec.test_files + (spec.meta_file,):
                member = tar.getmember(f"{spec.folder}/{name}")
                if not member.isfile():
                    raise tarfile.TarError(f"{member.name} is not a regular file")
                with tar.extractfile(member) as src, open(os.path.join(tmp, name), "wb") as dst:
                    shutil.copyfileobj(src, dst)
        os.replace(tmp, os.path.join(data_dir, spec.folder))
    except (tarfile.TarError, KeyError, EOFError, OSError) as e:
        raise DemoError(
            f"could not unpack {tarball} ({type(e).__name__}: {e}); delete it and run again"
        ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class _ArraysOnly(pickle.Unpickler):
    """Unpickles numpy arrays and plain Python types, nothing else: a file that names any other
    callable is refused instead of run. CIFAR's pickles need exactly these."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): np.ndarray(0).__reduce__()[0],
        ("numpy._core.multiarray", "_reconstruct"): np.ndarray(0).__reduce__()[0],
        ("numpy.core.multiarray", "scalar"): np.int64(0).__reduce__()[0],
        ("numpy._core.multiarray", "scalar"): np.int64(0).__reduce__()[0],
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,  # how Python 3 pickles bytes at protocol 2
    }

    def find_class(self, module, name):
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name}: not part of a CIFAR batch"
            ) from None


def _unpickle(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            d = _ArraysOnly(f, encoding="bytes").load()
    except FileNotFoundError:
        raise DemoError(
            f"{path} is missing: the folder is not a complete unpacked CIFAR tarball; "
            "delete the folder to download it again"
        ) from None
    except Exception as e:  # truncated, tampered, not a pickle
        raise DemoError(
            f"could not read {path} ({type(e).__name__}: {e}); delete its folder to download it again"
        ) from None
    if not isinstance(d, dict):
        raise DemoError(f"{path} does not hold a CIFAR batch dict")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}  # Python 2's bytes keys


def _decode_batches(folder: str, spec: DatasetSpec, names):
    images, labels = [], []
    for name in names:
        path = os.path.join(folder, name)
        d = _unpickle(path)
        x, y = d.get("data"), d.get(spec.label_key)
        if not (
            isinstance(x, np.ndarray) and x.dtype == np.uint8 and x.ndim == 2 and x.shape[1] == 3 * 32 * 32
        ):
            raise DemoError(f"{path}: 'data' must be a uint8 array (N, 3072)")
        y = np.asarray(y if y is not None else [], dtype=np.int64)  # (N,)
        if y.shape != (len(x),) or (len(y) and not 0 <= y.min() <= y.max() < spec.num_classes):
            raise DemoError(
                f"{path}: '{spec.label_key}' must hold {len(x)} labels in [0, {spec.num_classes})"
            )
        images.append(x.reshape(-1, 3, 32, 32))  # (N, 3, 32, 32): rows are R, G, B planes
        labels.append(y)
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))


def load_cifar(data_dir: str, dataset: str = "cifar10", download: bool = True, log=_log) -> Cifar:
    """CIFAR-10 / CIFAR-100 from data_dir/<folder>, downloading and unpacking the tarball first if
    the folder is not there. The tarball's MD5 is checked before anything is unpickled; a mismatch
    deletes it and raises DemoError."""
    spec = DATASETS[dataset]
    folder = os.path.join(data_dir, spec.folder)
    if not os.path.isdir(folder):
        tarball = os.path.join(data_dir, spec.filename)
        if not os.path.isfile(tarball):
            if not download:
                raise DemoError(f"{spec.title} is not in {data_dir}. " + _workaround(spec, data_dir))
            try:
                os.makedirs(data_dir, exist_ok=True)
            except OSError as e:
                raise DemoError(
                    f"cannot create the data folder {data_dir} ({e}); pass --data-dir DIR"
                ) from None
            _download(spec, tarball, data_dir, log)
        _verify(spec, tarball)
        _extract(spec, tarball, data_dir)
    train = _decode_batches(folder, spec, spec.train_files)
    test = _decode_batches(folder, spec, spec.test_files)
    names = _unpickle(os.path.join(folder, spec.meta_file)).get(spec.names_key)
    if not isinstance(names, list) or len(names) != spec.num_classes:
        raise DemoError(
            f"{folder}/{spec.meta_file}: '{spec.names_key}' must list {spec.num_classes} class names"
        )
    classes = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)
    return Cifar(*train, *test, classes)


def per_class(labels: torch.Tensor, n: int, num_classes: int, seed: int, flag: str) -> torch.Tensor:
    """Indices of n examples of every class, drawn without replacement by a seeded generator."""
    rng = np.random.default_rng(seed)
    labels = labels.numpy()
    picks = []
    for c in range(num_classes):
        idx = np.flatnonzero(labels == c)
        if len(idx) < n:
            raise DemoError(f"{flag} {n}: class {c} has only {len(idx)} images; choose {flag} <= {len(idx)}")
        picks.append(rng.permutation(idx)[:n])
    return torch.from_numpy(np.sort(np.concatenate(picks)))


# ----------------------------------------------------------------------------------------
# Models


def load_backbone(args) -> nn.Module:
    """The pretrained model as its own code builds it: DINOv2 from torch.hub (or --hub-dir), or
    open_clip's CLIP. --random-init builds the same architecture without downloading weights."""
    with torch.random.fork_rng(devices=[]):  # --random-init: the same weights for a seed
        torch.manual_seed(args.seed)
        return _load_clip(args) if args.model == "clip-vit-b-32" else _load_dinov2(args)


def _load_dinov2(args) -> nn.Module:
    where = f"--hub-dir {args.hub_dir}" if args.hub_dir else f"github.com/{DINOV2_REPO}"
    try:
        if args.hub_dir:
            return torch.hub.load(args.hub_dir, DINOV2_ENTRY, source="local", pretrained=not args.random_init)
        return torch.hub.load(DINOV2_REPO, DINOV2_ENTRY, trust_repo=True, pretrained=not args.random_init)
    except Exception as e:  # network, missing repo or file, bad hubconf
        raise DemoError(
            f"could not load {MODELS[args.model].title} ('{DINOV2_ENTRY}' from {where}): "
            f"{type(e).__name__}: {e}\n"
            "It needs the hub repository (online, or a local clone: git clone "
            f"https://github.com/{DINOV2_REPO}, "
            f"then --hub-dir DIR) and, unless --random-init, the weights {DINOV2_WEIGHTS}, which torch.hub "
            "caches "
            f"in {os.path.join(torch.hub.get_dir(), 'checkpoints')}."
        ) from None


def _import_open_clip():
    try:
        import open_clip
    except ImportError as e:
        raise DemoError(
            f"--model clip-vit-b-32 needs open_clip, an optional extra: pip install open_clip_torch "
            f"({type(e).__name__}: {e})"
        ) from None
    return open_clip


def _load_clip(args) -> nn.Module:
    open_clip = _import_open_clip()
    try:
        return open_clip.create_model(CLIP_NAME, pretrained=None if args.random_init else CLIP_TAG)
    except Exception as e:
        what = "" if args.random_init else f" with OpenAI's weights (pretrained='{CLIP_TAG}')"
        raise DemoError(
            f"could not create open_clip's {CLIP_NAME}{what}: {type(e).__name__}: {e}\n"
            "Offline? open_clip downloads the weights once and caches them (Hugging Face hub cache); "
            "run once online, or pass --random-init."
        ) from None


class ZeroShotHead(nn.Module):
    """CLIP's classifier: logit_scale * cos(image feature, text embedding of each class), frozen."""

    def __init__(self, text: torch.Tensor, scale: float):
        super().__init__()
        self.register_buffer("text", F.normalize(text.float(), dim=-1))  # (C, E)
        self.scale = scale

    def forward(self, f):  # (B, E)
        return self.scale * F.normalize(f, dim=-1) @ self.text.T  # (B, C)


class Classifier(nn.Module):
    """uint8 CIFAR images -> class scores: resize and normalise in torch, backbone, head.
    adapt() patches the whole classifier; its targets name backbone layers only."""

    def __init__(self, backbone: nn.Module, head: nn.Module, spec: ModelSpec, image_size: int):
        super().__init__()
        self.backbone, self.head, self.image_size = backbone, head, image_size
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)

    def forward(self, images):  # (B, 3, 32, 32) uint8
        x = images.float() / 255  # (B, 3, 32, 32) in [0, 1]
        x = F.interpolate(x, size=self.image_size, mode="bicubic", align_corners=False, antialias=True)
        x = (x.clamp(0, 1) - self.mean) / self.std  # (B, 3, S, S)
        return self.head(self.backbone(x))  # (B, C)


@torch.no_grad()
def clip_text_embeddings(clip, classes) -> torch.Tensor:
    tokenizer = _import_open_clip().get_tokenizer(CLIP_NAME)
    tokens = tokenizer([PROMPT.format(c.replace("_", " ")) for c in classes])  # (C, context)
    return clip.encode_text(tokens).float()  # (C, E)


def make_classifier(loaded: nn.Module, args, classes) -> Classifier:
    """Wrap what load_backbone returned; everything frozen except DINOv2's linear head."""
    spec = MODELS[args.model]
    size = args.image_size or spec.image_size
    if args.model == "clip-vit-b-32":
        backbone = loaded.visual
        head = ZeroShotHead(clip_text_embeddings(loaded, classes), loaded.logit_scale.exp().item())
        native = getattr(backbone, "image_size", size)
        native = native[0] if isinstance(native, (tuple, list)) else native
        if size != native:
            raise DemoError(f"--image-size {size}: CLIP's image tower takes {native}x{native} images")
    else:
        backbone, dim = loaded, loaded.embed_dim
        patch = getattr(loaded, "patch_size", 1)
        if size % patch:
            raise DemoError(f"--image-size {size} must be a multiple of the patch size {patch}")
        head = nn.Linear(dim, len(classes))
        gen = torch.Generator().manual_seed(args.seed)  # nn.Linear's default bound, seeded
        with torch.no_grad():
            for p in head.parameters():
                p.copy_((torch.rand(p.shape, generator=gen) * 2 - 1) / math.sqrt(dim))
    model = Classifier(backbone, head, spec, size).requires_grad_(False)
    model.head.requires_grad_(True)  # no-op for CLIP: buffers only
    return model


def adapt(model: Classifier, method: str, args) -> int | None:
    """Patch the classifier for `method`: adapters on the backbone's targets (dotted suffixes, so
    "mlp.fc1" matches "backbone.blocks.0.mlp.fc1"), and a head with parameters (DINOv2's linear
    layer) kept trainable through `trainable=`, so that randlora.save_adapter(model) writes it into
    the adapter checkpoint. Returns the adapter's r (None for none and full, which patch nothing)."""
    spec = MODELS[args.model]
    targets = dict(target_modules=spec.target_modules, target_parameters=spec.target_parameters)
    head = ["head"] if any(p.requires_grad for p in model.head.parameters()) else []  # CLIP's: buffers only
    try:
        if method == "lora":
            randlora.add_lora(
                model,
                r=args.lora_rank,
                alpha=ALPHA_PER_RANK * args.lora_rank,
                seed=args.seed,
                trainable=head,
                **targets,
            )
            return args.lora_rank
        if method == "randlora":
            r = randlora.rank_for_budget(model.backbone, lora_rank=args.lora_rank, **targets)
            alpha = (ALPHA_PER_RANK if args.scaling == "paper" else PEFT_ALPHA_PER_RANK) * r
            randlora.add_randlora(
                model, r=r, alpha=alpha, seed=args.seed, trainable=head, scaling=args.scaling, **targets
            )
            return r
    except ValueError as e:
        raise DemoError(f"cannot add {method} to {spec.title}: {e}") from None
    if method == "full":
        model.backbone.requires_grad_(True)
    return None


# ----------------------------------------------------------------------------------------
# Training, memory, evaluation


class SavedForBackward:
    """While active, records the tensors autograd saves for backward and sums their storages' bytes,
    each storage once (a saved view keeps, and counts, its whole storage), leaving out the model's
    parameters and buffers and views of them, which exist anyway: the activation memory that a
    training step holds until backward."""

    def __init__(self, model: nn.Module):
        self.owned = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
        self.storages = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t):
        s = t.untyped_storage()
        if s.data_ptr() not in self.owned:
            self.storages[s.data_ptr()] = s.nbytes()
        return t

    @property
    def bytes(self) -> int:
        return sum(self.storages.values())

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)


def check_adapter_gradients(backbone: nn.Module) -> None:
    """Every adapted layer is on the forward path: each trainable factor has a gradient, non-zero
    wherever the factor it multiplies is non-zero (lam = 0 at init gives gam a zero gradient on the
    first step, as LoRA's B = 0 does its A)."""
    for name, (u, _) in randlora.adapters(backbone).items():
        pair = ("lam", "gam") if isinstance(u, randlora.RandLoRA) else ("lora_A", "lora_B")
        for mine, other in (pair, pair[::-1]):
            g, partner = getattr(u, mine).grad, getattr(u, other).detach()
            if g is None or (partner.abs().sum() > 0 and not g.abs().sum() > 0):
                raise AssertionError(
                    f"{name}.{mine} received no gradient: the adapted weight is not used by the forward pass "
                    "(a module whose parent reads its .weight directly, like nn.MultiheadAttention's "
                    "out_proj, "
                    "must be adapted through target_parameters)"
                )


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def autocast(args):
    """bf16 autocast for forward passes under --amp (the parameters stay float32), else a no-op."""
    return torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16, enabled=args.amp)


def compiled_graphs(args) -> int:
    """How many graphs torch.compile has compiled in this process so far (its own counter); 0 without
    --compile."""
    if not args.compile:
        return 0
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def recompiles() -> int | None:
    """How many times torch.compile compiled a frame again since dynamo's last reset, because a guard
    failed (a dtype, a shape, an attribute changed): for every frame it compiled, its cache entries
    beyond the first. None where this torch keeps them elsewhere."""
    from torch._dynamo import convert_frame, eval_frame

    try:
        codes = [ref() for ref in convert_frame.input_codes.seen]
        return sum(max(len(eval_frame._debug_get_cache_entry_list(c)) - 1, 0) for c in codes if c is not None)
    except AttributeError:
        return None


def compile_backbone(model: Classifier, args) -> None:
    """torch.compile model.backbone in place (nn.Module.compile: its names, state dict and adapters stay
    as they are), after clearing dynamo's caches so that each method's compile time is its own."""
    import torch._dynamo as dynamo

    dynamo.reset()
    model.backbone.compile(backend=args.compile_backend)


def warm_up(model: Classifier, images, labels, args) -> float:
    """Trigger --compile's compilation before the clock starts: one forward and backward on each
    batch shape the training loop will see (the full batch, and the shorter last one when the
    batch size does not divide the set), no optimiser step, gradients dropped. Returns the wall time."""
    sizes = {min(args.batch_size, len(images)), len(images) % args.batch_size} - {0}
    _sync(args.device)
    t0 = time.perf_counter()
    try:
        for b in sorted(sizes, reverse=True):
            with autocast(args):
                loss = F.cross_entropy(model(images[:b].to(args.device)), labels[:b].to(args.device))
            loss.backward()
    except Exception as e:  # no compiler, unsupported op, backend error
        first = (str(e).strip().splitlines() or [""])[0]
        raise DemoError(
            f"torch.compile with --compile-backend {args.compile_backend} failed ({type(e).__name__}: "
            f"{first})\nRun without --compile, or with --compile-backend aot_eager."
        ) from None
    model.zero_grad(set_to_none=True)
    _sync(args.device)
    return time.perf_counter() - t0


def train(model: Classifier, images, labels, method: str, args, log=_log, label: str = "") -> dict:
    """Adam with cosine decay, random horizontal flips; the same batches for every method.
    Returns {"seconds", "compile", "recompiles", "loop_compiles", "memory"}: compile is the warm-up's
    wall time, recompiles dynamo's recompilations in the warm-up and training (see `recompiles`),
    loop_compiles the graphs compiled inside the timed loop (all three None without --compile);
    memory: see the module docstring. The saved-tensor hook that counts memory on a CPU runs in the
    first eager step only: in a compiled step dynamo would trace it, and recompile it for every
    dtype and shape of tensor it is handed, so --compile on a CPU reports no memory."""
    lr = args.full_lr if method == "full" else args.lr
    groups = [
        dict(params=[p for p in m.parameters() if p.requires_grad], lr=g)
        for m, g in ((model.head, args.head_lr), (model.backbone, lr))
    ]
    groups = [g for g in groups if g["params"]]
    if not groups:  # CLIP zero-shot: nothing trains
        return dict(seconds=None, compile=None, recompiles=None, loop_compiles=None, memory=None)
    opt = torch.optim.Adam(groups)
    per_epoch = math.ceil(len(images) / args.batch_size)
    total = args.epochs * per_epoch
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(total, 1))
    gen = torch.Generator().manual_seed(args.seed)
    cuda = torch.device(args.device).type == "cuda"
    counter = None if cuda or args.compile else SavedForBackward(model)
    progress = Progress(f"{label} step", total, log)
    model.train()
    compile_seconds = None
    if args.compile:
        compile_seconds = warm_up(model, images, labels, args)
        log(f"{label}: compiled in {compile_seconds:.1f} s (not counted in train time)")
    graphs = compiled_graphs(args)
    if cuda:
        torch.cuda.reset_peak_memory_stats(args.device)
    _sync(args.device)
    t0, step = time.perf_counter(), 0
    for epoch in range(args.epochs):
        order = torch.randperm(len(images), generator=gen)
        for i in range(per_epoch):
            idx = order[i * args.batch_size : (i + 1) * args.batch_size]
            flip = torch.rand(len(idx), generator=gen) < 0.5
            x = torch.where(flip[:, None, None, None], images[idx].flip(-1), images[idx])  # (B, 3, 32, 32)
            x, y = x.to(args.device), labels[idx].to(args.device)
            with counter if counter and step == 0 else nullcontext(), autocast(args):
                loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if step < 2:
                check_adapter_gradients(model.backbone)
            opt.step()
            sched.step()
            step += 1
            progress(
                step,
                lambda epoch=epoch, loss=loss: f"epoch {epoch + 1}/{args.epochs}  loss {loss.item():.3f}",
            )
    _sync(args.device)
    seconds = time.perf_counter() - t0
    if args.compile:
        log(f"{label}: torch.compile recompiled {recompiles()} time(s) while training (warm-up included)")
    memory = torch.cuda.max_memory_allocated(args.device) if cuda else counter.bytes if counter else None
    return dict(
        seconds=seconds,
        compile=compile_seconds,
        recompiles=recompiles() if args.compile else None,
        loop_compiles=compiled_graphs(args) - graphs if args.compile else None,
        memory=memory,
    )


@torch.no_grad()
def evaluate(model: nn.Module, images, labels, args, log=_log, label: str = "") -> tuple:
    """(top-1 accuracy, predicted class of every image (M,))."""
    model.eval()
    bs = 4 * args.batch_size
    progress, preds = Progress(f"{label} evaluating", len(images), log), []
    for i in range(0, len(images), bs):
        with autocast(args):
            preds.append(model(images[i : i + bs].to(args.device)).argmax(-1).cpu())  # (b,)
        progress(min(i + bs, len(images)))
    preds = torch.cat(preds)  # (M,)
    return (preds == labels).float().mean().item(), preds


# ----------------------------------------------------------------------------------------
# Checkpoints: one randlora.save_adapter file per adapter method, DINOv2's trained head included


def adapter_path(path: str, method: str, args) -> str:
    """--save-adapter FILE as given, or FILE with the method inserted when several adapters train."""
    if sum(m in ADAPTER_METHODS for m in args.methods) < 2:
        return path
    root, ext = os.path.splitext(path)
    return f"{root}.{method}{ext or '.safetensors'}"


def load_finetuned(args, path: str, classes) -> Classifier:
    """Rebuild the fine-tuned classifier from load_backbone(args) and a --save-adapter checkpoint:
    randlora.load_adapter patches the fresh classifier from the file's config and loads the adapters
    (and DINOv2's head); then merge. Ready for evaluate()."""
    model = make_classifier(load_backbone(args), args, classes)
    try:
        randlora.load_adapter(model, path)
    except (OSError, ValueError, TypeError) as e:  # missing, damaged or mismatched file
        raise DemoError(f"could not load the checkpoint {path} ({type(e).__name__}: {e})") from None
    randlora.merge(model)
    return model.to(args.device).eval()


# ----------------------------------------------------------------------------------------
# The experiment


def run(args, log=_log) -> list:
    """Load the model, then the data; train and evaluate every method in args.methods. Returns one row
    per method: method, r, trainable, accuracy, seconds, compile, recompiles, loop_compiles, memory,
    changes ({adapted layer: ||DeltaW|| / ||W||}), predictions (M,), files (checkpoints written)."""
    spec, data_spec = MODELS[args.model], DATASETS[args.dataset]
    log(f"loading {spec.title}" + (" with random weights" if args.random_init else ""))
    loaded = load_backbone(args)  # first: a missing --hub-dir or open_clip
    data = load_cifar(args.data_dir, args.dataset, log=log)  # is reported before any data is fetched
    n = data_spec.num_classes
    train_idx = per_class(data.train_labels, args.shots, n, args.seed, "--shots")
    test_idx = (
        per_class(data.test_labels, args.test_per_class, n, args.seed, "--test-per-class")
        if args.test_per_class
        else torch.arange(len(data.test_labels))
    )
    train_x, train_y = data.train_images[train_idx], data.train_labels[train_idx]
    test_x, test_y = data.test_images[test_idx], data.test_labels[test_idx]
    log(
        f"{data_spec.title}: {len(train_x)} training images ({args.shots} per class), {len(test_x)} test "
        "images"
    )
    base = make_classifier(loaded, args, data.classes)
    rows = []
    for j, method in enumerate(args.methods):
        label = f"[{j + 1}/{len(args.methods)}] {method}"
        model = copy.deepcopy(base)
        r = adapt(model, method, args)
        model.to(args.device)
        if args.compile:
            compile_backbone(model, args)
        names = list(randlora.adapters(model.backbone))
        log(
            f"{label}: {randlora.trainable_parameters(model):,} trainable parameters"
            + (f", r = {r}, {len(names)} adapted weights ({names[0]}, ...)" if names else "")
        )
        stats = train(model, train_x, train_y, method, args, log, label)
        with torch.no_grad():
            changes = {
                name: (u.delta_weight().norm() / w.norm()).item()
                for name, (u, w) in randlora.adapters(model.backbone).items()
            }
        randlora.merge(model.backbone)  # evaluate as deployed: no adapter cost
        graphs = compiled_graphs(args)
        accuracy, preds = evaluate(model, test_x, test_y, args, log, label)
        if args.compile:
            log(
                f"{label}: evaluation compiled {compiled_graphs(args) - graphs} graph(s) (merged weights, "
                "no_grad)"
            )
        files = []
        if args.save_adapter and method in ADAPTER_METHODS:
            files.append(adapter_path(args.save_adapter, method, args))
            randlora.save_adapter(model, files[0])  # the adapters and the trained head
        rows.append(
            dict(
                method=method,
                r=r,
                trainable=randlora.trainable_parameters(model),
                accuracy=accuracy,
                **stats,
                changes=changes,
                predictions=preds,
                files=files,
            )
        )
        log(f"{label}: test accuracy {accuracy:.2%}")
        del model
        if torch.device(args.device).type == "cuda":
            torch.cuda.empty_cache()
    return rows


def fmt_bytes(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size or unit == "KiB":
            return f"{n / size:,.1f} {unit}"


def time_ratio(row, rows) -> str:
    """The row's train time over full fine-tuning's, from the measured seconds: 'n/a' when full did
    not run, '-' when the row did not train."""
    full = next((x["seconds"] for x in rows if x["method"] == "full" and x["seconds"]), None)
    if row["seconds"] is None:
        return "-"
    return "n/a" if full is None else f"{row['seconds'] / full:.2f}"


def format_table(rows, args) -> str:
    spec, data_spec = MODELS[args.model], DATASETS[args.dataset]
    cuda = torch.device(args.device).type == "cuda"
    mem = "peak CUDA mem" if cuda else "saved for bwd"
    weights = "random init" if args.random_init else "pretrained"
    source = f", from {args.hub_dir}" if args.hub_dir else ""
    speed = ", bf16 autocast" if args.amp else ", float32"
    speed += f", torch.compile ({args.compile_backend})" if args.compile else ""
    lines = [
        f"{spec.title} ({weights}{source}) on {data_spec.title}, {args.shots} training images per class, "
        f"{args.epochs} epochs, batch {args.batch_size}, lr {args.lr:g} (full: {args.full_lr:g}, "
        f"head: {args.head_lr:g}), {args.device}{speed}",
        "",
        f"{'method':<10}{'r':>4}{'trainable':>13}{'test acc':>10}{'train time':>12}{'time / full':>13}"
        + (f"{'compile':>10}{'recompiles':>12}" if args.compile else "")
        + f"{mem:>15}",
    ]
    recompiled = False
    for x in rows:
        t = "-" if x["seconds"] is None else f"{x['seconds']:.1f} s"
        if x["loop_compiles"]:
            t, recompiled = t + "*", True
        c = "-" if x["compile"] is None else f"{x['compile']:.1f} s"
        rc = "-" if x["recompiles"] is None else str(x["recompiles"])
        m = "-" if x["memory"] is None else fmt_bytes(x["memory"])
        lines.append(
            f"{x['method']:<10}{x['r'] or '-':>4}{x['trainable']:>13,}{x['accuracy']:>10.2%}{t:>12}"
            f"{time_ratio(x, rows):>13}{f'{c:>10}{rc:>12}' if args.compile else ''}{m:>15}"
        )
    lines += [
        "",
        "trainable: parameters that receive gradients, head included; r: LoRA's rank or RandLoRA's basis "
        "rank (equal-parameter rank from rank_for_budget);",
        "test acc: adapters merged into the weights; train time: wall clock of training only; time / full: "
        "train time over full fine-tuning's (n/a: full not run);",
    ]
    if args.compile:
        lines.append(
            "compile: wall time of the warm-up forward and backward that compiled the backbone, not in "
            "train time (evaluation's own compile, merged weights, is not timed); recompiles: frames "
            "torch.compile compiled again in the warm-up and training (a batch shape of its own is one);"
        )
    if recompiled:
        lines.append(
            "*: torch.compile also compiled inside the timed loop: "
            + ", ".join(f"{x['method']} {x['loop_compiles']} graph(s)" for x in rows if x["loop_compiles"])
            + "; that time is in train time;"
        )
    lines.append(
        "memory: "
        + (
            "torch.cuda.max_memory_allocated while training."
            if cuda
            else "not measured with --compile on a CPU (the saved-tensor hook would be traced)."
            if args.compile
            else "bytes autograd saved for backward in one training step (parameters and buffers "
            "not counted)."
        )
    )
    files = [f for x in rows for f in x["files"]]
    if files:
        lines.append("saved: " + ", ".join(files))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------
# Command line


def _compile_backends(debug: bool = True) -> list:
    import torch._dynamo as dynamo

    return dynamo.list_backends(exclude_tags=() if debug else ("debug", "experimental"))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=sorted(MODELS), default="dinov2-vits14", help="default: %(default)s")
    p.add_argument("--dataset", choices=sorted(DATASETS), default="cifar10", help="default: %(default)s")
    p.add_argument(
        "--data-dir",
        metavar="DIR",
        default=default_data_dir(),
        help="where the tarball is cached and unpacked (default: %(default)s); a folder that already "
        "holds the unpacked cifar-10-batches-py/ or cifar-100-python/ is used as it is",
    )
    p.add_argument(
        "--shots", metavar="N", type=int, default=16, help="training images per class (default: %(default)s)"
    )
    p.add_argument(
        "--test-per-class",
        metavar="N",
        type=int,
        default=0,
        help="test images per class (default: 0, the whole test set)",
    )
    p.add_argument(
        "--methods",
        nargs="+",
        default=list(METHODS),
        help=f"any of {', '.join(METHODS)}, separated by spaces or commas (default: all)",
    )
    p.add_argument(
        "--lora-rank",
        metavar="R",
        type=int,
        default=32,
        help="LoRA's rank; RandLoRA gets the same parameter count (default: %(default)s)",
    )
    p.add_argument("--epochs", type=int, default=10, help="default: %(default)s")
    p.add_argument("--batch-size", type=int, default=32, help="default: %(default)s (evaluation: 4x)")
    p.add_argument(
        "--scaling",
        choices=randlora.SCALINGS,
        default="peft",
        help="RandLoRA's scale and gam init (randlora.py's docstring): peft, alpha = 20r (PEFT's "
        "default), s = alpha / r, gam from 1/k; or paper, alpha = 2r, s = alpha / (r sqrt(n)), gam "
        "from 1/D (default: %(default)s)",
    )
    p.add_argument(
        "--lr",
        type=float,
        default=1e-3,
        help="Adam learning rate of the LoRA and RandLoRA adapters (default: %(default)s)",
    )
    p.add_argument(
        "--full-lr",
        type=float,
        default=1e-5,
        help="learning rate of the backbone in full fine-tuning (default: %(default)s)",
    )
    p.add_argument(
        "--head-lr",
        type=float,
        default=1e-3,
        help="learning rate of DINOv2's linear head (default: %(default)s)",
    )
    p.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="default: %(default)s"
    )
    p.add_argument(
        "--amp",
        action=argparse.BooleanOptionalAction,
        help="bf16 autocast for the training and evaluation forward passes; weights, adapters and "
        "optimiser state stay float32 (default: on for CUDA, off otherwise)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the backbone; the compile time is measured in a warm-up step and reported "
        "apart from train time",
    )
    p.add_argument(
        "--compile-backend",
        metavar="NAME",
        default="inductor",
        help="torch.compile backend for --compile (default: %(default)s; aot_eager needs no C++ compiler)",
    )
    p.add_argument(
        "--hub-dir",
        metavar="DIR",
        help="load dinov2_vits14 from this local copy of the DINOv2 hub "
        "repository (torch.hub source='local') instead of GitHub",
    )
    p.add_argument(
        "--random-init", action="store_true", help="the same architecture without pretrained weights"
    )
    p.add_argument(
        "--save-adapter",
        metavar="FILE",
        help="write each adapter method's checkpoint, DINOv2's trained head included, to one file "
        "(randlora.save_adapter); with both lora and randlora the method goes into the name; "
        "none and full write nothing",
    )
    p.add_argument("--image-size", metavar="S", type=int, help="input resolution (default: the model's, 224)")
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seeds the few-shot subset, batches, head, adapters, random init (default: %(default)s)",
    )
    args = p.parse_args(argv)
    args.methods = [m for item in args.methods for m in item.split(",") if m]
    bad = [m for m in args.methods if m not in METHODS]
    if bad or not args.methods or len(set(args.methods)) != len(args.methods):
        p.error(f"--methods: choose distinct methods from {', '.join(METHODS)}, got {' '.join(args.methods)}")
    for flag, value, low in (
        ("--shots", args.shots, 1),
        ("--test-per-class", args.test_per_class, 0),
        ("--lora-rank", args.lora_rank, 1),
        ("--epochs", args.epochs, 1),
        ("--batch-size", args.batch_size, 1),
        ("--seed", args.seed, 0),
    ):
        if value < low:
            p.error(f"{flag} must be >= {low}, got {value}")
    if args.image_size is not None and args.image_size < 1:
        p.error(f"--image-size must be >= 1, got {args.image_size}")
    for flag, value in (("--lr", args.lr), ("--full-lr", args.full_lr), ("--head-lr", args.head_lr)):
        if not 0 < value < math.inf:
            p.error(f"{flag} must be a number > 0, got {value}")
    try:
        device = torch.device(args.device)
    except (RuntimeError, ValueError):
        p.error(f"--device {args.device!r} is not a device torch knows (cpu, cuda, cuda:1, mps, ...)")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: torch sees no CUDA device; use --device cpu")
    if args.amp is None:
        args.amp = device.type == "cuda"
    if args.compile and args.compile_backend not in _compile_backends():
        p.error(
            f"--compile-backend {args.compile_backend!r} is not a torch.compile backend; choose one of "
            f"{', '.join(_compile_backends(debug=False))}, or eager, aot_eager to debug"
        )
    if args.hub_dir and args.model != "dinov2-vits14":
        p.error("--hub-dir loads DINOv2 only; CLIP comes through open_clip")
    if args.save_adapter:
        if not any(m in ADAPTER_METHODS for m in args.methods):
            p.error("--save-adapter needs lora or randlora among --methods")
        folder = os.path.dirname(os.path.abspath(args.save_adapter))
        if not os.path.isdir(folder):
            p.error(f"--save-adapter: folder {folder} does not exist")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if torch.device(args.device).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # Ampere and newer: TF32 matmuls, ~2x faster
        torch.backends.cudnn.allow_tf32 = True
    t0 = time.perf_counter()
    try:
        rows = run(args)
    except DemoError as e:
        print(f"demo_vit.py: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("demo_vit.py: interrupted", file=sys.stderr)
        return 130
    print(format_table(rows, args))
    print(f"total wall time {clock(time.perf_counter() - t0)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
