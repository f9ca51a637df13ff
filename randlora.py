"""RandLoRA: full-rank parameter-efficient fine-tuning, in one file.

A frozen weight W (out, in) is adapted by an update built from frozen random low-rank bases
that every adapted layer of the model shares; only diagonal scalings train:

    U      = s * sum_{b=1..n} B_b diag(lam_b) A diag(gam_b)          (paper eq. 4)   (D, k)
    DeltaW = U if in <= out, else U^T      (gam always sits on the smaller dimension)  (out, in)
    y      = x W^T + bias + x DeltaW^T

Symbols and shapes (the letters of every shape comment below):
    T          tokens: every leading dimension of x flattened
    k, D       min(in, out), max(in, out)
    r          rank of each random basis;  n = ceil(k / r) bases;  m = n * r >= k
    A          (r, k)       = A_full[:, :k]        one A shared by all n bases of a layer
    B          (n, D, r)    = B_full[:n, :D, :]    B_b = B[b];  Bcat = [B_1 .. B_n]  (D, m)
    lam, gam   (n, r), (n, k)   trainable, init 0 and gam0: the diagonals of Lambda_b, Gamma_b
    s, gam0    by the convention `scaling` names (lam = 0 makes the patched model the base model):
               "paper" (default)  s = alpha / (r sqrt(n)),  gam0 = 1/D   [1, app. C.4, and the authors' code]
               "peft"             s = alpha / r,            gam0 = 1/k   [4]; its default alpha = 20r: s = 20
A_full (r, k_max) and B_full (n_max, D_max, r) are drawn once per model; layers read views.

"paper" divides alpha / r by sqrt(n), as a sum of n independent random rank-r terms grows like
sqrt(n); the paper's alpha = 2r gives s = 2 / sqrt(n). The first author has since called that an
older strategy, abandoned for scaling the bases, and the Hugging Face code the most up to date,
with alpha in s = alpha / r "somewhere between 2r and 20r" [5]. Adam's first step moves DeltaW
by s gam0 lr (times a sum of bases): sqrt(n) D / k times more under "peft" at equal alpha and lr.

Why the update is full rank: U = s Bcat LQ, LQ = diag(lam) [A diag(gam_1); ..; A diag(gam_n)]
(m, k). With m >= k, random bases and generic lam, gam (distinct across b) both factors have
rank k, so U has, though each term has rank r; LoRA's B A has rank r, so by Eckart-Young its
error on a target update is at least sqrt(sum_{i>r} sigma_i^2) (eq. 8). At init the gam_b are
equal (U has rank r until training separates them), and a zero column of a sparse A is one of U.

Cost. The autograd function saves only x. A layer either materialises W + DeltaW (formed again
in backward for x's gradient) or projects the tokens through the factors. lam's and gam's
gradients come from H = Bcat^T G (m, k), G = gy^T x the weight gradient (TDk + Dkm), or while
T < D from the tokens projected through Bcat (TDm + Tkm). Multiply-adds (tr = 1 if in > out):
    inference   materialised  TDk + Dkm          factored  TDk + TDm + Tkm
    training    materialised  2TDk + 2Dkm + H    factored  2TDk + (2 + tr) TDm + 3Tkm
so a layer materialises from T >= Dkm / (Dm + km) (inference) or 2Dkm / ((1 + tr) Dm + 2km)
(training, always below D): thresholds of its shape, computed once when it is built.

Usage (`model` any nn.Module; names select nn.Linear / Conv1D layers by qualified name or dotted suffix)
    import randlora
    randlora.add_randlora(model, ["q_proj", "v_proj"], r=8, alpha=16)   # patched in place, the rest frozen
    opt = torch.optim.AdamW(p for p in model.parameters() if p.requires_grad)
    ...                                                                 # train as usual
    randlora.save_adapter(model, "adapter.safetensors")                 # lam, gam, config; never the bases
    randlora.load_adapter(base_model, "adapter.safetensors")            # patches a fresh base model
    with randlora.disable_adapters(model): ...                          # the base model's function
    randlora.merge(model)                                               # W <- W + DeltaW: the base's speed
    plain = randlora.unload(model)                                      # original modules, update merged

References
    [1] Albert et al., RandLoRA: Full-rank parameter-efficient fine-tuning of large models,
        ICLR 2025, arXiv 2502.00987 (sec. 4: eqs. 4 and 8; sec. 6.4; app. C.4-C.6).
    [2] Li, Hastie, Church, Very sparse random projections, KDD 2006 (ternary bases).
    [3] Hu et al., LoRA: Low-rank adaptation of large language models, ICLR 2022.
    [4] Hugging Face PEFT 0.21, src/peft/tuners/randlora (layer.py: scaling = randlora_alpha / r, gamma from
        1 / max(gamma.shape); config.py: randlora_alpha = 640 for r = 32).
    [5] P. Albert, "Questions about scaling", github.com/PaulAlbert31/RandLoRA/issues/1, July 2025.
"""

import contextlib
import functools
import hashlib
import json
import math
import os
import stat
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

__all__ = [
    "AdapterConfig",
    "make_bases",
    "SharedBases",
    "RandLoRAFunction",
    "RandLoRA",
    "LoRA",
    "RandLoRALinear",
    "LoRALinear",
    "add_randlora",
    "add_lora",
    "adapters",
    "adapter_config",
    "rank_for_budget",
    "trainable_parameters",
    "merge",
    "unmerge",
    "unload",
    "disable_adapters",
    "adapter_state_dict",
    "load_adapter_state_dict",
    "save_adapter",
    "load_adapter",
    "FORMAT_VERSION",
    "BASES",
    "PATHS",
    "SCALINGS",
]

# 4: the file's checksum covers its header; 3: safetensors files, checksum of the tensor bytes only;
# 2: torch.save, s = alpha / (r sqrt(n)), gam 1/D; 1: alpha / r, 1/k
FORMAT_VERSION = 4
BASES = ("uniform", "normal", "binary", "sparse", "very_sparse")
PATHS = ("auto", "materialised", "factored")
SCALINGS = ("paper", "peft")

# ---- Configuration ---------------------------------------------------------------------


@dataclass(frozen=True)
class AdapterConfig:
    """Everything needed to patch a model again: saved in every adapter file."""

    method: str  # "randlora" or "lora"
    r: int  # rank of each random basis (RandLoRA) / of the update (LoRA)
    alpha: float  # RandLoRA: s = alpha / (r sqrt(n)) or alpha / r (by scaling); LoRA: alpha / r
    basis: str = "uniform"  # distribution of the frozen bases (RandLoRA only)
    seed: int = 0  # seeds the bases (RandLoRA) or LoRA's A
    dropout: float = 0.0  # dropout on the adapter branch's input while training
    target_modules: tuple = ()  # qualified names (or dotted suffixes) of nn.Linear / Conv1D
    target_parameters: tuple = ()  # qualified names (or suffixes) of raw 2-D weight Parameters
    trainable: tuple = ()  # modules left trainable and saved with the adapter (a head)
    scaling: str = "paper"  # RandLoRA's s and gam0: "paper" or "peft" (the docstring); not LoRA's


# ---- Frozen random bases ---------------------------------------------------------------


def _sample(shape, basis: str, D_max: int, gen: torch.Generator) -> torch.Tensor:
    if basis == "uniform":  # U(-sqrt3, sqrt3): unit variance
        return (torch.rand(shape, generator=gen) * 2 - 1) * math.sqrt(3)
    if basis == "normal":
        return torch.randn(shape, generator=gen)
    s = {"binary": 1.0, "sparse": 3.0, "very_sparse": math.sqrt(D_max)}[basis]  # Li et al.'s s [2]
    u = torch.rand(shape, generator=gen)  # sqrt(s) {-1, 0, 1} w.p. 1/2s, 1-1/s, 1/2s
    return math.sqrt(s) * ((u < 0.5 / s).float() - (u >= 1 - 0.5 / s).float())


def make_bases(r: int, k_max: int, D_max: int, basis: str = "uniform", seed: int = 0):
    """A_full (r, k_max) and B_full (n_max, D_max, r), float32, the same bits for a seed on any hardware
    (drawn on the CPU from their own generator, A first). B_full is D-major: each layer's Bcat (D, m) is a
    view."""
    gen = torch.Generator("cpu").manual_seed(seed)
    A = _sample((r, k_max), basis, D_max, gen)  # (r, k_max)
    B = _sample((math.ceil(k_max / r), D_max, r), basis, D_max, gen)  # (n_max, D_max, r)
    B = B.transpose(0, 1).contiguous().transpose(0, 1)  # (n_max, D_max, r), strides (r, n_max r, 1)
    return A, B


def _bases_dtype(weight_dtypes: set) -> torch.dtype:
    """The bases' dtype: the targets' one dtype, or the widest of several (float32 at least)."""
    if len(weight_dtypes) == 1:
        return next(iter(weight_dtypes))
    return max(weight_dtypes | {torch.float32}, key=lambda d: torch.finfo(d).bits)


class SharedBases(nn.Module):
    """A_full and B_full once per model, as non-persistent buffers, of which every layer keeps views.

    A child of the first adapted layer (`shared_bases`). They keep the dtype the layers' weights need
    (`_bases_dtype`; `fit`, after any cast), so a cast of part of the model never changes another layer's
    update; where they would come out uninitialised (`to_empty` after the meta device) or need to be
    wider than they are, they are drawn again from the config's seed: the same bits as at patching."""

    def __init__(self, A: torch.Tensor, B: torch.Tensor, config: AdapterConfig):
        super().__init__()
        self.config = config
        self.layers = []  # RandLoRA layers: plain references
        self.requires_grad_before = {}  # {parameter name: requires_grad} before patching, for unpatching
        self.parameters_before = {}  # {module name: its parameters' names, in order}, the same
        self.register_buffer("A", A, persistent=False)  # (r, k_max)
        self.register_buffer("B", B, persistent=False)  # (n_max, D_max, r)

    def redraw(self, dtype: torch.dtype) -> None:
        """Draw A_full and B_full again from the config's seed, in `dtype`, where they are now."""
        c = self.config
        A, B = make_bases(c.r, self.A.shape[1], self.B.shape[1], c.basis, c.seed)
        self.A = A.to(self.A.device, dtype)
        self.B = B.to(self.B.device, dtype)

    def fit(self) -> None:
        """Bases in the dtype the layers' weights need now; where that changed them, every layer views
        them again."""
        changed = False
        if self.layers and not self.B.is_meta:
            wanted = _bases_dtype({layer.base_weight().dtype for layer in self.layers})
            if torch.finfo(wanted).bits > torch.finfo(self.B.dtype).bits:
                self.redraw(wanted)  # never widen rounded values
                changed = True
            elif wanted != self.B.dtype:
                self.A = self.A.to(wanted)
                self.B = self.B.to(wanted)
                changed = True
        for layer in self.layers:
            layer.fitted_dtype = layer.base_weight().dtype
            if changed:
                layer.views(remake=True)

    def _apply(self, fn, *args, **kwargs):
        before = None if self.B.is_meta else self.B.data_ptr()
        super()._apply(fn, *args, **kwargs)
        if self.layers and not self.B.is_meta and self.B.data_ptr() != before:
            self.redraw(self.B.dtype)  # new memory: to_empty leaves it uninitialised
        self.fit()
        for layer in self.layers:  # the buffers are new tensors
            layer.views(remake=True)
        return self


# ---- The memory-saving autograd function -----------------------------------------------
# DeltaW is formed by _delta only. With H = Bcat^T G_U (m, k), G_U the (D, k) dL/dU, U = s Bcat LQ:
#   dL/dlam[b, i] = s sum_c H[b r + i, c] A[i, c] gam[b, c]
#   dL/dgam[b, c] = s sum_i H[b r + i, c] A[i, c] lam[b, i]


def _lq(lam, gam, A):
    """LQ = diag(lam) [A diag(gam_1); ..; A diag(gam_n)] (m, k): U = s Bcat LQ."""
    return (lam.unsqueeze(2) * gam.unsqueeze(1) * A).view(-1, A.shape[1])  # (n, r, k) -> (m, k)


def _addmm(base, L, R, s):  # base + s L R (s L R if no base)
    return torch.mm(L, R).mul_(s) if base is None else torch.addmm(base, L, R, alpha=s)


def _delta(Bcat, LQ, s, transposed, base=None):
    """(base +) DeltaW = s Bcat LQ, (out, in): eq. 4's one implementation, which all others call."""
    return _addmm(base, LQ.T, Bcat.T, s) if transposed else _addmm(base, Bcat, LQ, s)


def _to(t, dt):  # t in dtype dt, skipping a no-op .to() (it costs ~1 us)
    return t if t is None or t.dtype is dt else t.to(dt)


def _wide(dt):  # float32, or dt where wider: masters and merges
    return torch.promote_types(dt, torch.float32)


def _flat(t, dt):  # t as (T, features) in dtype dt, with no op where it is
    return _to(t if t.dim() == 2 else t.reshape(-1, t.shape[-1]), dt)


def _compute_dtype(x, weight) -> torch.dtype:
    """The dtype F.linear(x, weight) computes in: autocast's for float16/32 tensors (it leaves float64
    alone), else the tensors' own; a TypeError where F.linear would refuse the pair."""
    dev = x.device.type
    autocast = not x.is_meta and torch.is_autocast_enabled(dev)

    def cast(t):
        return torch.get_autocast_dtype(dev) if autocast and t.dtype != torch.float64 else t.dtype

    if weight is not None and cast(x) != cast(weight):
        raise TypeError(
            f"input is {x.dtype} but the layer's weight is {weight.dtype}; nn.Linear refuses mixed "
            "dtypes too: cast the input (or the model), or run under torch.autocast"
        )
    return cast(x)


class RandLoRAFunction(torch.autograd.Function):
    """y = x W^T + bias + x DeltaW^T (`weight=None`: the update alone; the path is the caller's). Saves x, and
    references to what exists anyway; DeltaW, W + DeltaW, G and the (T, m) projections are formed in
    backward."""

    generate_vmap_rule = True  # torch.func.vmap runs it per sample

    @staticmethod
    def forward(x, weight, bias, lam, gam, A, Bcat, scale, transposed, materialise):
        dt = _compute_dtype(x, weight)  # autocast decides, else x
        x2 = _flat(x, dt)  # (T, in)
        Bc = _to(Bcat, dt)  # (D, m)
        LQ = _to(_lq(lam, gam, A), dt)  # (m, k)
        w = _to(weight, dt)  # (out, in)
        b = _to(bias, dt)  # (out,)
        if materialise:
            y = F.linear(x2, _delta(Bc, LQ, scale, transposed, w), b)  # (T, out)
        else:  # x DeltaW^T = (x L) R
            L, R = (Bc, LQ) if transposed else (LQ.T, Bc.T)  # (in, m), (m, out)
            base = None if w is None else F.linear(x2, w, b)  # (T, out)
            y = _addmm(base, x2 @ L, R, scale)  # (T, out)
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, lam, gam, A, Bcat, scale, transposed, materialise = inputs
        ctx.save_for_backward(x, weight, bias, lam, gam, A, Bcat)  # x, and what exists anyway
        ctx.scale = scale
        ctx.transposed = transposed
        ctx.materialise = materialise
        ctx.dtype = output.dtype  # forward computes in _compute_dtype(x, weight)

    @staticmethod
    def backward(ctx, gy):
        x, weight, bias, lam, gam, A, Bcat = ctx.saved_tensors
        need_x, need_w, need_b, need_lam, need_gam = ctx.needs_input_grad[:5]
        s, tr, dt = ctx.scale, ctx.transposed, ctx.dtype
        x2 = _flat(x, dt)  # (T, in)
        gy2 = _flat(gy, dt)  # (T, out)
        Bc = _to(Bcat, dt)  # (D, m)
        w = _to(weight, dt)  # (out, in)
        LQ = _to(_lq(lam, gam, A), dt) if need_x else None  # (m, k)
        gx = glam = ggam = None
        by_weight = ctx.materialise and x2.shape[0] >= Bc.shape[0]  # H from G if T >= D, else tokens
        G = Z = None
        if need_w or (by_weight and (need_lam or need_gam)):
            G = gy2.T @ x2  # (out, in)
        if not by_weight:
            Z = (x2 if tr else gy2) @ Bc  # (T, m)
        if need_lam or need_gam:
            if by_weight:
                H = Bc.T @ (G.T if tr else G)  # (m, k) = Bcat^T G_U
            else:
                H = Z.T @ (gy2 if tr else x2)  # (m, k) = Bcat^T G_U
            HA = _to(H.view(*lam.shape, -1), lam.dtype).mul_(s).mul_(A)  # (n, r, k): dL/dLQ * A
            glam = (HA * gam.unsqueeze(1)).sum(2)  # (n, r)
            ggam = (HA * lam.unsqueeze(2)).sum(1)  # (n, k)
        if need_x and ctx.materialise:  # through W + DeltaW, formed again
            gx = gy2 @ _delta(Bc, LQ, s, tr, w)  # (T, in)
        elif need_x:  # through the factors
            gyW = None if w is None else gy2 @ w  # (T, in)
            gx = _addmm(gyW, gy2 @ LQ.T, Bc.T, s) if tr else _addmm(gyW, Z, LQ, s)
        if need_x:
            gx = _to(gx if x.dim() == 2 else gx.reshape(x.shape), x.dtype)  # (..., in)
        gw = _to(G, weight.dtype) if need_w else None
        gb = _to(gy2.sum(0), bias.dtype) if need_b else None  # (out,)
        return gx, gw, gb, glam, ggam, None, None, None, None, None


class _EagerRandLoRAFunction(RandLoRAFunction):
    """RandLoRAFunction in the older one-method style, for eager calls. Where setup_context is defined,
    Function.apply binds default arguments with inspect.signature on every call (20-50 us, more than a
    small layer's own work); torch.func transforms need setup_context, so they get the original."""

    setup_context = torch.autograd.Function.setup_context  # not defined: the one-method style

    @staticmethod
    def forward(ctx, *inputs):
        y = RandLoRAFunction.forward(*inputs)
        RandLoRAFunction.setup_context(ctx, inputs, y)
        return y


def _function():
    """The autograd function for this call: RandLoRAFunction under a torch.func transform, else its
    one-method twin (which torch.compile also traces on every torch from 2.4)."""
    if not torch.compiler.is_compiling() and torch._C._are_functorch_transforms_active():
        return RandLoRAFunction
    return _EagerRandLoRAFunction


# ---- Layers ----------------------------------------------------------------------------
# RandLoRA, LoRA: the update of one weight, a parametrization W -> W + DeltaW;
# *Linear: an nn.Linear with it, x -> y.


def _trainables(u) -> dict:
    if isinstance(u, RandLoRA):
        return {"lam": u.lam, "gam": u.gam}
    return {"lora_A": u.lora_A, "lora_B": u.lora_B}


class _Update(nn.Module):
    """What RandLoRA and LoRA share. state_dict records a merge (`merged_flag`, `<name>_merged`): unmerge
    takes out what merge put in, even if an optimizer moved the trainables since. They stay float32 through
    .half(), and come back at their initial values from `to_empty` after the meta device."""

    def __init__(self, fan_in_fan_out: bool, **trainables):
        super().__init__()
        self.fan_in_fan_out = fan_in_fan_out
        self.merged = False
        self.disabled = False
        device = next(iter(trainables.values())).device
        self.register_buffer("merged_flag", torch.tensor(False, device=device))
        for name, t in trainables.items():  # and what the last merge used
            setattr(self, name, nn.Parameter(t))
            self.register_buffer(name + "_merged", torch.zeros_like(t))

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self.merged = bool(self.merged_flag)
        shared = getattr(self, "_shared", None)
        if shared is not None and shared.B.is_meta and not self.merged_flag.is_meta:  # assign=True from meta
            shared.to_empty(device=self.merged_flag.device)  # drawn again from the seed

    def _apply(self, fn, *args, **kwargs):
        was_meta = self.merged_flag.is_meta
        keep = {}
        for name in _trainables(self):
            for key in (name, name + "_merged"):
                t = getattr(self, key)
                keep[key] = (t.data, None if t.grad is None else t.grad.data)
        super()._apply(fn, *args, **kwargs)
        if isinstance(self, RandLoRA) and self.base_weight().dtype != self.fitted_dtype:
            self._shared.fit()  # its weight changed dtype (a move: SharedBases._apply fits)
        for key, (data, grad) in keep.items():
            t = getattr(self, key)
            if t.element_size() < 4 and not data.is_meta:  # moved, but kept float32 or wider
                t.data = data.to(t.device)
                t.grad = None if grad is None else grad.to(t.device)
        if was_meta and not self.merged_flag.is_meta:  # to_empty: uninitialised memory
            self.reset_parameters()
        return self

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The trainables at their initial values (the same draw as at patching), no merge recorded."""
        for name, value in self._initial().items():
            getattr(self, name).copy_(value)
            getattr(self, name + "_merged").zero_()
        self.merged_flag.fill_(False)
        self.merged = False

    def _adopt(self, base: nn.Module, dropout: float):
        """*Linear: share W and bias with the module replaced, and take its mode and its hooks."""
        self.weight = base.weight
        self.bias = base.bias
        self.dropout = nn.Dropout(dropout)
        if self.fan_in_fan_out:
            self.nf = base.nf  # what Conv1D's forward reads
        object.__setattr__(self, "base_layer", base)  # not a child: no copies
        self.train(base.training)
        _move_hooks(base, self)

    def base_forward(self, x):
        """The replaced module's own forward, run on this layer's weight and bias (bit for bit)."""
        return type(self.base_layer).forward(self, x)

    def synced_base(self) -> nn.Module:
        """The module it replaced, with this layer's weight, bias, mode and hooks."""
        self.base_layer.weight = self.weight
        self.base_layer.bias = self.bias
        self.base_layer.train(self.training)
        _move_hooks(self, self.base_layer)
        return self.base_layer


class RandLoRA(_Update):
    """The update of one frozen weight (lam, gam, views of the bases); alone, a parametrization W -> W +
    DeltaW."""

    def __init__(self, weight, bases: SharedBases, r, alpha, fan_in_fan_out=False, scaling="paper"):
        if scaling not in SCALINGS:
            raise ValueError(f"scaling must be one of {SCALINGS}, got {scaling!r}")
        out_f, in_f = weight.shape[::-1] if fan_in_fan_out else weight.shape
        k = min(in_f, out_f)
        D = max(in_f, out_f)
        tr = in_f > out_f
        n = math.ceil(k / r)
        m = n * r
        if scaling == "paper":  # [1, app. C.4]
            s = alpha / (r * math.sqrt(n))
            gam0 = 1 / D
        else:  # Hugging Face PEFT's [4]
            s = alpha / r
            gam0 = 1 / k
        kw = dict(device=weight.device, dtype=_wide(weight.dtype))  # float32 masters for bf16/fp16
        lam = torch.zeros(n, r, **kw)  # (n, r)
        gam = torch.full((n, k), gam0, **kw)  # (n, k)
        super().__init__(fan_in_fan_out, lam=lam, gam=gam)
        self.k = k
        self.D = D
        self.r = r
        self.n = n
        self.transposed = tr
        self.scale = s
        self.gam0 = gam0
        self.threshold_inference = math.ceil(D * k * m / (D * m + k * m))  # see the docstring
        self.threshold_training = math.ceil(2 * D * k * m / ((1 + tr) * D * m + 2 * k * m))
        object.__setattr__(self, "_shared", bases)  # a reference, not a child
        object.__setattr__(self, "_owner", None)  # set when it parametrizes a weight
        self.fitted_dtype = weight.dtype  # the weight's dtype the bases last fitted
        bases.layers.append(self)
        self.views(remake=True)

    def _initial(self) -> dict:
        return {"lam": torch.zeros_like(self.lam), "gam": torch.full_like(self.gam, self.gam0)}

    def base_weight(self) -> torch.Tensor:
        """The frozen weight this update adapts."""
        if self._owner is None:
            return self.weight
        owner, name = self._owner
        return getattr(owner.parametrizations, name).original

    def views(self, remake=False):
        """A (r, k), Bcat (D, m): views of the shared bases, made again once those move (.to(), FSDP's
        .data)."""
        B = self._shared.B  # (n_max, D_max, r)
        if remake or self.Bcat.device != B.device or self.Bcat.dtype != B.dtype:
            self.A = self._shared.A[:, : self.k]  # (r, k)
            self.Bcat = B[: self.n, : self.D].transpose(0, 1).reshape(self.D, -1)  # (D, m), a view
        return self.A, self.Bcat

    def delta_weight(self, at_merge=False) -> torch.Tensor:
        """DeltaW in the base weight's layout ((in, out) for a Conv1D); `at_merge`: as last merged."""
        if at_merge:
            lam, gam = self.lam_merged, self.gam_merged  # (n, r), (n, k)
        else:
            lam, gam = self.lam, self.gam
        if self.base_weight().dtype != self.fitted_dtype:
            self._shared.fit()
        A, Bcat = self.views()
        dt = torch.promote_types(lam.dtype, A.dtype)
        dw = _delta(Bcat.to(dt), _lq(lam, gam, A).to(dt), self.scale, self.transposed)
        return dw.T if self.fan_in_fan_out else dw  # (out, in) or (in, out)

    def forward(self, W):  # as a parametrization
        if self.merged or self.disabled:
            return W
        if W.dtype != self.fitted_dtype:  # cast after the bases were fitted
            self._shared.fit()
        A, Bcat = self.views()  # autograd keeps these views, lam and gam
        dt = torch.promote_types(W.dtype, A.dtype)  # W's, unless the bases are wider
        # in W's dtype, not autocast's
        no_autocast = contextlib.nullcontext() if W.is_meta else torch.autocast(W.device.type, enabled=False)
        with no_autocast:
            Bc = _to(Bcat, dt)  # (D, m)
            LQ = _to(_lq(self.lam, self.gam, A), dt)  # (m, k)
            return _to(_delta(Bc, LQ, self.scale, self.transposed, _to(W, dt)), W.dtype)  # W + DeltaW


class LoRA(_Update):
    """The baseline DeltaW = (alpha / r) lora_B lora_A; lora_B (out, r) starts at 0, lora_A (r, in)
    U(+-1/sqrt(in))."""

    def __init__(self, weight, r, alpha, gen: torch.Generator, fan_in_fan_out=False):
        out_f, in_f = weight.shape[::-1] if fan_in_fan_out else weight.shape
        kw = dict(device=weight.device, dtype=_wide(weight.dtype))
        draw_state = gen.get_state()  # to draw lora_A again after to_empty
        a = (torch.rand(r, in_f, generator=gen) * 2 - 1) / math.sqrt(in_f)  # (r, in)
        lora_A = a.to(**kw)  # (r, in)
        lora_B = torch.zeros(out_f, r, **kw)  # (out, r)
        super().__init__(fan_in_fan_out, lora_A=lora_A, lora_B=lora_B)
        self.r = r
        self.scale = alpha / r
        self.draw_state = draw_state

    def _initial(self) -> dict:
        gen = torch.Generator("cpu")
        gen.set_state(self.draw_state)
        r, in_f = self.lora_A.shape
        a = (torch.rand(r, in_f, generator=gen) * 2 - 1) / math.sqrt(in_f)  # (r, in)
        return {"lora_A": a, "lora_B": torch.zeros_like(self.lora_B)}

    def delta_weight(self, at_merge=False) -> torch.Tensor:
        if at_merge:
            B, A = self.lora_B_merged, self.lora_A_merged  # (out, r), (r, in)
        else:
            B, A = self.lora_B, self.lora_A
        dw = self.scale * (B @ A)  # (out, in)
        return dw.T if self.fan_in_fan_out else dw

    def forward(self, W):  # as a parametrization
        if self.merged or self.disabled:
            return W
        return W + self.delta_weight().to(W.dtype)


class RandLoRALinear(RandLoRA):
    """An nn.Linear (or Conv1D) with a RandLoRA update. `path`: "auto" (the docstring's rule), or one
    forced."""

    def __init__(self, base: nn.Module, bases: SharedBases, r, alpha, dropout=0.0, scaling="paper"):
        super().__init__(base.weight, bases, r, alpha, type(base).__name__ == "Conv1D", scaling)
        self._adopt(base, dropout)
        self.path = "auto"

    @property
    def path(self) -> str:
        return self._path

    @path.setter
    def path(self, value: str) -> None:
        if value not in PATHS:
            raise ValueError(f"layer.path must be one of {PATHS}, got {value!r}")
        self._path = value

    def chosen_path(self, T: int, grad: bool = True) -> str:
        if self._path != "auto":
            return self._path
        threshold = self.threshold_training if grad else self.threshold_inference
        return "materialised" if T >= threshold else "factored"

    def forward(self, x):
        if self.merged or self.disabled:  # the replaced module's computation
            return self.base_forward(x)
        if not x.is_floating_point():
            raise TypeError(f"expected floating-point input, got {x.dtype}")
        W = self.weight.T if self.fan_in_fan_out else self.weight  # (out, in)
        T = x.numel() // x.shape[-1]
        mat = self.chosen_path(T, torch.is_grad_enabled()) == "materialised"
        args = (self.lam, self.gam, *self.views(), self.scale, self.transposed, mat)
        if self.training and self.dropout.p > 0:  # the update sees other x
            return self.base_forward(x) + _function().apply(self.dropout(x), None, None, *args)
        return _function().apply(x, W, self.bias, *args)


class LoRALinear(LoRA):
    """An nn.Linear (or Conv1D) with a LoRA update: y = base(x) + s (dropout(x) lora_A^T) lora_B^T."""

    def __init__(self, base: nn.Module, r, alpha, gen, dropout=0.0):
        super().__init__(base.weight, r, alpha, gen, fan_in_fan_out=type(base).__name__ == "Conv1D")
        self._adopt(base, dropout)

    def forward(self, x):
        y = self.base_forward(x)  # (..., out)
        if self.merged or self.disabled:
            return y
        h = F.linear(self.dropout(x), self.lora_A.to(x.dtype))  # (..., r)
        y2 = y.reshape(-1, y.shape[-1])  # (T, out)
        h2 = h.reshape(-1, self.r)  # (T, r)
        B = self.lora_B.to(x.dtype)  # (out, r)
        y2 = torch.addmm(y2, h2, B.T, alpha=self.scale)  # (T, out): y + s h B^T, fused
        return y2.reshape(y.shape)


# ---- Patching --------------------------------------------------------------------------


def _matches(name: str, pattern: str) -> bool:
    return name == pattern or name.endswith("." + pattern)


def _as_names(value, what: str) -> tuple:
    if isinstance(value, str):
        value = (value,)
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
        shown = repr(value)[:200]
        raise TypeError(f"{what} must be a string or a list of non-empty strings, got {shown}")
    return tuple(dict.fromkeys(value))  # each name once, in order


def _is_real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


_MAX_ALPHA = 1e6  # |alpha| above this overflows float32 updates at init


def _check_hparams(r, alpha, dropout, seed, basis="uniform", scaling="paper", method="randlora"):
    if method not in ("randlora", "lora"):
        raise ValueError(f"unknown method {method!r}; choose 'randlora' or 'lora'")
    if type(r) is not int or type(seed) is not int:
        raise TypeError(f"r and seed must be ints, got r={r!r}, seed={seed!r}")
    if r < 1:
        raise ValueError(f"r must be >= 1, got {r}")
    if not -(2**63) <= seed < 2**64:
        raise ValueError("seed must lie in [-2**63, 2**64)")
    if not _is_real(alpha) or alpha == 0 or abs(alpha) > _MAX_ALPHA:
        raise ValueError(
            f"alpha must be a finite non-zero number of magnitude at most {_MAX_ALPHA:g}, got {alpha!r}"
        )
    if not _is_real(dropout) or not 0 <= dropout < 1:
        raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
    if basis not in BASES:
        raise ValueError(f"unknown basis {basis!r}; choose one of {BASES}")
    if scaling not in SCALINGS:
        raise ValueError(
            f"unknown scaling {scaling!r}; choose 'paper' (s = alpha / (r sqrt(n)), gam from 1/D) "
            "or 'peft' (s = alpha / r, gam from 1/k, PEFT's)"
        )


def _offloads(hook) -> bool:
    """Whether an accelerate hook (or a SequentialHook of them) swaps the module's tensors in per call."""
    return bool(getattr(hook, "offload", False)) or any(_offloads(h) for h in getattr(hook, "hooks", ()))


def _check_patchable(name: str, m: nn.Module, parents: list):
    """Refuse a layer that a patched layer in its place would not compute like."""
    fused = [
        type(p).__name__
        for p in parents
        if isinstance(p, (nn.MultiheadAttention, nn.TransformerEncoderLayer))
    ]
    why = None
    if fused:
        why = f"its parent {' and '.join(fused)} reads its weight directly (a fused path)"
    elif not isinstance(m.weight, nn.Parameter):
        why = "its weight is computed (weight norm or another parametrization or hook); remove that first"
    elif isinstance(m, nn.Linear) and type(m).forward is not nn.Linear.forward:
        why = f"{type(m).__name__} has its own forward, which the patched layer would replace"
    elif not isinstance(m, nn.Linear) and getattr(m, "nf", None) != m.weight.shape[-1]:
        why = "it is named Conv1D but is not Hugging Face's (weight (in, out), nf = out)"
    if why is not None:
        raise ValueError(
            f"cannot patch {name!r}: {why}; use target_parameters=[{name + '.weight'!r}] instead"
        )
    if "forward" in vars(m) and not hasattr(m, "_hf_hook"):
        raise ValueError(
            f"cannot patch {name!r}: its forward was replaced on the instance (module.forward = ...), "
            "which the patched layer cannot carry over; patch first, then wrap the patched layer"
        )
    if _offloads(getattr(m, "_hf_hook", None)):
        raise ValueError(
            f"cannot patch {name!r}: accelerate offloads its weights (cpu_offload, or a device_map "
            "with 'cpu' or 'disk'); load the model onto devices that hold it, or patch it first"
        )


def _find_targets(model, mods: tuple, params: tuple) -> list:
    """[(name, kind, module, weight)]: modules, then raw parameters, in model order (an aliased module
    once)."""
    if adapters(model):  # (and model is a Module)
        raise ValueError("this model is already patched; patch a fresh copy of the base model instead")
    if not mods and not params:
        raise ValueError("nothing to adapt: pass target_modules (e.g. ['attn.qkv']) or target_parameters")
    every = list(model.named_modules(remove_duplicate=False))
    linear = {n: m for n, m in every if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"}
    raw = {n: p for n, p in model.named_parameters() if p.dim() == 2}
    for pats, pool, kind in ((mods, linear, "module"), (params, raw, "parameter")):
        unmatched = [p for p in pats if not any(_matches(n, p) for n in pool)]
        if unmatched:
            pat = unmatched[0]
            hint = ""
            if any(_matches(n, pat) for n in raw):
                hint = " (it is a raw parameter: pass target_parameters)"
            names = ", ".join(list(pool)[:30]) or "none"
            raise ValueError(f"target {pat!r} matches no {kind}{hint}; candidates: {names}")
    targets = []
    for name, m in linear.items():
        aliases = [n for n, x in every if x is m]
        if name == aliases[0] and any(_matches(a, p) for a in aliases for p in mods):
            _check_patchable(name, m, [model.get_submodule(a.rpartition(".")[0]) for a in aliases])
            targets.append((name, "module", m, m.weight))
    for name, p in raw.items():
        if not any(_matches(name, pat) for pat in params):
            continue
        owner = model.get_submodule(name.rpartition(".")[0])
        if any(t[2] is owner for t in targets):
            raise ValueError(
                f"{name!r} belongs to an adapted layer; target the layer or its weight, not both"
            )
        targets.append((name, "parameter", owner, p))
    return targets


def _named(model, patterns) -> list:
    """Names of the model's modules that match `patterns` (exactly or by dotted suffix)."""
    return [n for n, _ in model.named_modules() if n and any(_matches(n, p) for p in patterns)]


def _extra_trainables(model, patterns, targets=()) -> dict:
    """{qualified name: Parameter} of the modules named in `trainable`; validates."""
    hits = _named(model, patterns)
    unmatched = [p for p in patterns if not any(_matches(n, p) for n in hits)]
    if unmatched:
        raise ValueError(f"trainable {unmatched[0]!r} matches no module of the model")
    holders = [n for n in hits if any(t[0] == n or t[0].startswith(n + ".") for t in targets)]
    if holders:
        raise ValueError(
            f"trainable {holders[0]!r} holds an adapted layer; name a module beside the targets (e.g. a head)"
        )
    params = {}
    for n in hits:
        params.update(model.get_submodule(n).named_parameters(prefix=n))
    return params


def _replace(model, old: nn.Module, new: nn.Module):
    """Put `new` under every name that `old` has in the model."""
    names = [n for n, x in model.named_modules(remove_duplicate=False) if x is old]
    for name in names:
        owner, _, attr = name.rpartition(".")
        setattr(model.get_submodule(owner), attr, new)


_HOOKS = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_backward_pre_hooks",
    "_backward_hooks",
    "_is_full_backward_hook",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


def _move_hooks(src: nn.Module, dst: nn.Module) -> None:
    """Give dst src's hook dicts (the same objects: a handle removes from both, a hook added on either runs
    on whichever is in the model) and move an accelerate hook's wrapped forward. Only the module in the
    model is called, so each hook runs once."""
    for attr in _HOOKS:
        if hasattr(src, attr):
            setattr(dst, attr, getattr(src, attr))
    if "forward" in vars(src) and hasattr(src, "_hf_hook"):  # accelerate: partial(new_forward, src)
        dst._hf_hook = src._hf_hook
        dst._old_forward = type(dst).forward.__get__(dst)
        dst.forward = functools.partial(vars(src)["forward"].func, dst)
        for attr in ("forward", "_hf_hook", "_old_forward"):
            delattr(src, attr)


def _n_trainable(method: str, r: int, ws: list) -> int:
    """How many numbers adapters on the weights `ws` train: LoRA r (in + out), RandLoRA n (r + k) each."""
    if method == "lora":
        return sum(r * sum(w.shape) for w in ws)
    return sum(math.ceil(min(w.shape) / r) * (r + min(w.shape)) for w in ws)


def _patch(model, c: AdapterConfig, max_numbers=None) -> list:
    """Validate everything, then freeze the model and install an adapter on every target (refused, before
    anything is allocated, if the adapters would train more than `max_numbers` numbers)."""
    names = {f: _as_names(getattr(c, f), f) for f in ("target_modules", "target_parameters", "trainable")}
    c = replace(c, **names)
    rand = c.method == "randlora"
    _check_hparams(c.r, c.alpha, c.dropout, c.seed, c.basis if rand else "uniform", c.scaling, c.method)
    targets = _find_targets(model, c.target_modules, c.target_parameters)
    extra = _extra_trainables(model, c.trainable, targets)
    for name, _, _, w in targets:
        if w.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise TypeError(
                f"{name!r} is {w.dtype}; adapt float16, bfloat16, float32 or float64 weights (dequantise "
                "them first)"
            )
        if c.r > min(w.shape):
            raise ValueError(
                f"r={c.r} exceeds min(in, out)={min(w.shape)} of {name!r}; choose r <= {min(w.shape)}"
            )
    n_numbers = _n_trainable(c.method, c.r, [t[3] for t in targets])
    if max_numbers is not None and n_numbers > max_numbers:
        raise ValueError(
            f"its adapters would train {n_numbers} numbers, but the file's tensor bytes hold at most "
            f"{max_numbers} (4 bytes a number, as save_adapter writes them): it is truncated or not "
            "written by save_adapter"
        )
    device = targets[0][3].device
    if rand:
        k_max = max(min(t[3].shape) for t in targets)
        D_max = max(max(t[3].shape) for t in targets)
        A, B = make_bases(c.r, k_max, D_max, c.basis, c.seed)  # (r, k_max), (n_max, D_max, r)
        for name, _, _, w in targets:
            if not A[:, : min(w.shape)].any():
                raise ValueError(
                    f"the {c.basis} bases of seed {c.seed} are zero on A's columns of {name!r}, so "
                    "its update would stay zero; raise r, or change seed or basis"
                )
        dt = _bases_dtype({t[3].dtype for t in targets})
        shared = SharedBases(A.to(device, dt), B.to(device, dt), c)
    else:
        shared = SharedBases(torch.empty(0, device=device), torch.empty(0, device=device), c)
    shared.requires_grad_before = {n: p.requires_grad for n, p in model.named_parameters()}
    shared.parameters_before = {n: list(m._parameters) for n, m in model.named_modules()}  # names, in order
    try:
        _install(model, c, targets, extra, shared)
    except BaseException:  # a layer that failed to build (out of memory, say): the model as it was
        _unpatch(model, keep_update=False, shared=shared)  # shared: the first layer may not hold it yet
        raise
    return [t[0] for t in targets]


def _install(model, c: AdapterConfig, targets: list, extra: dict, shared: SharedBases) -> None:
    """Freeze the model but the `trainable` modules, and put an adapter on every target."""
    rand = c.method == "randlora"
    gen = torch.Generator("cpu").manual_seed(c.seed)  # LoRA's A
    model.requires_grad_(False)
    for p in extra.values():
        p.requires_grad_(True)
    for i, (name, kind, mod, w) in enumerate(targets):
        if kind == "module":
            if rand:
                layer = RandLoRALinear(mod, shared, c.r, c.alpha, c.dropout, c.scaling)
            else:
                layer = LoRALinear(mod, c.r, c.alpha, gen, c.dropout)
            _replace(model, mod, layer)
        else:
            pname = name.rpartition(".")[2]
            if rand:
                layer = RandLoRA(w, shared, c.r, c.alpha, scaling=c.scaling)
            else:
                layer = LoRA(w, c.r, c.alpha, gen)
            parametrize.register_parametrization(mod, pname, layer)
            mod.parametrizations.train(mod.training)  # new modules take their owner's mode
            object.__setattr__(layer, "_owner", (mod, pname))
        if i == 0:
            layer.shared_bases = shared  # registered once, here
            shared.train(mod.training)


def add_randlora(
    model,
    target_modules,
    r,
    alpha,
    dropout=0.0,
    basis="uniform",
    seed=0,
    target_parameters=(),
    trainable=(),
    scaling="paper",
) -> list:
    """Patch `model` in place: each nn.Linear / Conv1D named (exactly or by dotted suffix) in `target_modules`
    becomes a RandLoRALinear, each 2-D Parameter in `target_parameters` gets a RandLoRA parametrization; all
    else is frozen but the `trainable` modules (a head). `scaling` picks s and gam0 (the docstring's "paper"
    or "peft"). Returns the adapted names; bad input changes nothing."""
    c = AdapterConfig(
        "randlora", r, alpha, basis, seed, dropout, target_modules, target_parameters, trainable, scaling
    )
    return _patch(model, c)


def add_lora(
    model, target_modules, r, alpha, dropout=0.0, seed=0, target_parameters=(), trainable=()
) -> list:
    """The LoRA baseline with the same targeting, freezing and errors as add_randlora."""
    c = AdapterConfig("lora", r, alpha, "none", seed, dropout, target_modules, target_parameters, trainable)
    return _patch(model, c)


def adapters(model) -> dict:
    """{adapted name: (update module, frozen base weight Parameter)} in model order."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, (RandLoRALinear, LoRALinear)):
            out[name] = (m, m.weight)
        if not parametrize.is_parametrized(m):
            continue
        for pname, plist in m.parametrizations.items():
            for u in plist:
                if isinstance(u, _Update):
                    out[f"{name}.{pname}" if name else pname] = (u, plist.original)
    return out


def adapter_config(model) -> AdapterConfig:
    """The AdapterConfig the model was patched with; ValueError if it has no adapters (or only part of
    them)."""
    shared = []
    if adapters(model):
        shared = [m.config for m in model.modules() if isinstance(m, SharedBases)]
    if not shared:  # (a part of a patched model has none)
        raise ValueError(
            "no adapters with their bases in this model; patch it first, or pass the whole model"
        )
    return shared[0]


def rank_for_budget(model, target_modules, lora_rank: int, target_parameters=()) -> int:
    """The RandLoRA r whose count sum n (r + k) is closest to LoRA's sum lora_rank (in + out) (ties: the
    smaller)."""
    _check_hparams(lora_rank, 1.0, 0.0, 0)
    mods = _as_names(target_modules, "target_modules")
    params = _as_names(target_parameters, "target_parameters")
    ws = [t[3] for t in _find_targets(model, mods, params)]
    budget = _n_trainable("lora", lora_rank, ws)
    k_min = min(min(w.shape) for w in ws)
    counts = {r: _n_trainable("randlora", r, ws) for r in range(1, k_min + 1)}
    return min(counts, key=lambda r: (abs(counts[r] - budget), counts[r]))


def trainable_parameters(model) -> int:
    """How many numbers train: the adapters' scalings (or factors) and the `trainable` modules' parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ---- Merge / unmerge: W <- W +/- DeltaW, computed in float32 (or wider) and rounded once ----
# Sharded models. FSDP2 (fully_shard) keeps each parameter as a DTensor shard between calls. Merging
# gathers W, shifts it, and each rank keeps its own rows; a checkpoint gathers lam and gam. Both are
# collectives: every rank must make the call. FSDP1 flattens parameters into shards of other shapes: refused.

_FSDP1 = (
    "the model is sharded by FSDP1 (FullyShardedDataParallel), whose parameters are flat shards; shard it "
    "with FSDP2 (fully_shard) instead, or load a full state dict into a single-process copy and use that"
)


def _is_shard(t) -> bool:  # a DTensor, tested without importing it
    return hasattr(t, "full_tensor")


def _local(t) -> torch.Tensor:  # this rank's part
    return t.to_local() if _is_shard(t) else t


def _full(t) -> torch.Tensor:
    """t whole: a DTensor is gathered from every rank (a collective); an FSDP1 flat shard is refused."""
    if getattr(t, "_fsdp_flattened", False):
        raise ValueError(_FSDP1)
    return t.full_tensor() if _is_shard(t) else t


def _fsdp2():
    """fully_shard's module class and distribute_tensor, from where this torch keeps them."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch < 2.6
        from torch.distributed._composable.fsdp import FSDPModule
    try:
        from torch.distributed.tensor import distribute_tensor
    except ImportError:  # torch < 2.5
        from torch.distributed._tensor import distribute_tensor
    return FSDPModule, distribute_tensor


def _sharded(model) -> nn.Module:
    """The model with every FSDP2 parameter registered as its shard, as between training steps. (After a
    forward without backward the root holds gathered copies, which a write would miss.)"""
    if not isinstance(model, nn.Module):
        return model  # adapters(model) names the TypeError
    if any(getattr(p, "_fsdp_flattened", False) for p in model.parameters()):
        raise ValueError(_FSDP1)
    if not any(_is_shard(p) for p in model.parameters()):
        return model
    FSDPModule = _fsdp2()[0]
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()
    return model


def _write(p, t) -> None:
    """p <- t, t whole; a DTensor p takes this rank's part (rank 0's t is scattered: every rank must call)."""
    if _is_shard(p):
        distribute_tensor = _fsdp2()[1]
        t = distribute_tensor(t.to(p.device), p.device_mesh, p.placements).to_local()
        p = p.to_local()
    p.copy_(t)


def _shifted(u, w, merge: bool) -> torch.Tensor:
    """W + DeltaW (merge), or W - DeltaW (unmerge), whole: DeltaW from what the merge recorded."""
    dt = _wide(w.dtype)
    whole = _full(w).to(dt)
    dw = u.delta_weight(at_merge=True).to(dt)
    return whole.add(dw, alpha=1 if merge else -1).to(w.dtype)


def _memory(t: torch.Tensor) -> tuple:
    """(storage, first byte, end byte) of the memory a tensor's elements span (a shard's, for a DTensor)."""
    t = _local(t)
    extent = 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    start = t.data_ptr()
    return t.untyped_storage().data_ptr(), start, start + extent * t.element_size()


def _sharers(model, w: torch.Tensor) -> list:
    """Names of the model's parameters and buffers whose memory overlaps w's (w's own name among them)."""
    storage, start, end = _memory(w)
    names = []
    for mname, mod in model.named_modules():
        for pname, t in [*mod._parameters.items(), *mod._buffers.items()]:
            if t is None or not t.numel():
                continue
            s, a, b = _memory(t)
            if s == storage and a < end and start < b:
                names.append(f"{mname}.{pname}".lstrip("."))
    return names


@torch.no_grad()
def _set_merged(model, merged: bool) -> int:
    ups = adapters(_sharded(model))
    if any(u.disabled for u, _ in ups.values()):
        raise ValueError(
            "the adapters are disabled (inside disable_adapters); merge, unmerge or unload after it"
        )
    todo = {name: (u, w) for name, (u, w) in ups.items() if u.merged != merged}
    for name, (_, w) in todo.items():  # check everything first
        if w.is_meta:
            raise ValueError(
                f"{name!r} is on the meta device (no values yet, or offloaded by accelerate); bring "
                "the model to a device and load its weights (model.to_empty(device=...), then "
                "load_state_dict) before merging"
            )
        tied = _sharers(model, w)
        if len(tied) > 1:
            raise ValueError(
                f"{tied[0]} and {tied[1]} are one tied tensor (they share memory); merging {name!r} "
                f"would change both. Untie them (assign a clone) or leave {name!r} out; unmerged, the "
                "model is correct"
            )
    before = {}  # the records, to restore on failure
    for u, _ in todo.values():
        before[u] = {k: getattr(u, k + "_merged").clone() for k in _trainables(u)}
    if merged:  # record what goes in (whole)
        for u, _ in todo.values():
            for key, p in _trainables(u).items():
                getattr(u, key + "_merged").copy_(_full(p))
    for name, (u, w) in todo.items():
        if not torch.isfinite(_shifted(u, w, merged)).all():  # the same on every rank
            for v, record in before.items():  # nothing was changed
                for key, t in record.items():
                    getattr(v, key + "_merged").copy_(t)
            verb = "merging" if merged else "unmerging"
            raise ValueError(
                f"{verb} {name!r} would give non-finite "
                "weights; nothing was changed (check lam/gam and the weight's dtype range)"
            )
    for u, w in todo.values():
        _write(w, _shifted(u, w, merged))
        u.merged = merged
        u.merged_flag.fill_(merged)
    return len(todo)


def merge(model) -> int:
    """Fold every DeltaW into its base weight; layers then run at the base model's speed.
    Idempotent; returns how many layers changed. Refuses tied weights, changing nothing.
    Under FSDP2, every rank must call it; each keeps its shard of the merged weights."""
    return _set_merged(model, True)


def unmerge(model) -> int:
    """Take out of every weight the DeltaW its merge put in (exact up to the dtype's rounding)."""
    return _set_merged(model, False)


def _unpatch(model, keep_update: bool, shared=None) -> nn.Module:
    """The original modules back (with their hooks and mode); raw weights keep their parametrizations'
    value (W + DeltaW, and any parametrization stacked after it) if `keep_update`, else their stored
    weight; every parameter's requires_grad and place as `shared` (by default the model's SharedBases)
    recorded them before patching."""
    if shared is None:
        shared = next((m for m in model.modules() if isinstance(m, SharedBases)), None)
    for name, (u, _) in adapters(model).items():
        if isinstance(u, (RandLoRALinear, LoRALinear)):
            _replace(model, u, u.synced_base())
        else:
            owner, _, attr = name.rpartition(".")
            parametrize.remove_parametrizations(
                model.get_submodule(owner), attr, leave_parametrized=keep_update
            )
    if shared is not None:
        for n, p in model.named_parameters():
            p.requires_grad_(shared.requires_grad_before.get(n, p.requires_grad))
        for prefix, m in model.named_modules():
            # removing a parametrization registers the weight last: put each parameter back in its place
            # (in the module's own dict of them: torch has no public way to reorder it)
            place = {name: i for i, name in enumerate(shared.parameters_before.get(prefix, []))}
            for name in sorted(m._parameters, key=lambda name: place.get(name, len(place))):
                m._parameters[name] = m._parameters.pop(name)
    return model


def unload(model) -> nn.Module:
    """Merge, then give the plain model back: its original modules, no parametrizations, the base state_dict
    keys, each parameter's requires_grad as before patching. Raises ValueError where merge would, and under
    FSDP2 (merge sharded instead, or unload a single-process copy)."""
    if isinstance(model, nn.Module) and any(_is_shard(p) for p in model.parameters()):
        raise ValueError(
            "unload would replace modules that FSDP2 (fully_shard) manages; merge(model) works sharded, "
            "or load adapter_state_dict(model) (on every rank) into a single-process copy, unload that"
        )
    merge(model)  # refuses tied weights
    return _unpatch(model, keep_update=True)


@contextlib.contextmanager
def disable_adapters(model):
    """Inside: the base model's function (bit for bit if unmerged), trainables not requiring grad. After: as
    before. Nested blocks keep the adapters off until the outermost one ends; merge, unmerge, unload and
    loading are refused inside. A model without adapters is a ValueError."""
    ups = [u for u, _ in adapters(model).values()]
    if not ups:
        raise ValueError("this model has no adapters to disable; patch it first (add_randlora, load_adapter)")
    if any(u.disabled for u in ups):  # nested: the outer block owns the switch
        yield model
        return
    merged = any(u.merged for u in ups)
    grads = {p: p.requires_grad for u in ups for p in _trainables(u).values()}

    def switch(off: bool):
        for u in ups:
            u.disabled = off
        for p, wanted in grads.items():
            p.requires_grad_(wanted and not off)

    unmerge(model)
    try:
        switch(off=True)
        yield model
    finally:
        switch(off=False)
        if merged:
            merge(model)


# ---- Adapter checkpoints: the trainables, each layer's (out, in) and the config; never the bases ----

_ON_META = "on the meta device (no values); materialise the model first (to_empty, then the base weights)"


def _checkpoint(model) -> dict:
    """adapter_state_dict(model) with the model's own tensors in place of whole CPU copies."""
    config = json.loads(json.dumps(asdict(adapter_config(model))))  # tuples as lists, as JSON has them
    shapes = {}
    for name, (u, w) in adapters(model).items():
        shapes[name] = list(w.shape[::-1] if u.fan_in_fan_out else w.shape)  # [out, in]
    tensors = {f"{n}.{k}": p for n, (u, _) in adapters(model).items() for k, p in _trainables(u).items()}
    for name in _named(model, config["trainable"]):
        tensors.update(model.get_submodule(name).state_dict(prefix=name + ".", keep_vars=True))
    return {"format_version": FORMAT_VERSION, "config": config, "shapes": shapes, "tensors": tensors}


def adapter_state_dict(model) -> dict:
    """{"format_version", "config", "shapes": {name: [out, in]}, "tensors": {"<name>.lam": (n, r), .., the
    `trainable` modules' state}}: plain types, and whole CPU tensors (under FSDP2 every rank must call it)."""
    state = _checkpoint(model)
    if any(t.is_meta for t in state["tensors"].values()):
        raise ValueError(f"cannot save: the adapters are {_ON_META}")
    state["tensors"] = {key: _full(t).detach().cpu().clone() for key, t in state["tensors"].items()}
    return state


def _fits(model, state) -> dict:
    """The model's {key: tensor} once the format, config, entry names and layer shapes of `state` fit it (its
    entries are not looked at: a file's header can stand in for them)."""
    want = _checkpoint(_sharded(model))  # its tensors: each FSDP2 parameter's shard
    if any(u.merged for u, _ in adapters(model).values()):
        raise ValueError("the model is merged; call unmerge(model) before loading adapters")
    if any(u.disabled for u, _ in adapters(model).values()):
        raise ValueError("the adapters are disabled (inside disable_adapters); load after the block")
    try:  # the plain part as JSON has it: a tensor or other object where a number belongs is refused
        plain = json.loads(json.dumps({k: state.get(k) for k in ("format_version", "config", "shapes")}))
        tensors = state.get("tensors")
    except Exception:  # not a dict, or not plain
        plain, tensors = {}, None
    version, config, shapes = plain.get("format_version"), plain.get("config"), plain.get("shapes")
    if type(version) is not int or version not in (2, 3, FORMAT_VERSION) or type(config) is not dict:
        raise ValueError(
            f"not an adapter checkpoint of format 2 to {FORMAT_VERSION} in plain Python types, the dict "
            "adapter_state_dict() writes (format 1 had s = alpha / r and gam from 1/k, these alpha / "
            "(r sqrt(n)) and 1/D)"
        )
    if version == 2:  # format 2 had the paper's scaling only
        config = {"scaling": "paper", **config}
    if type(shapes) is not dict or type(tensors) is not dict:
        raise ValueError(
            "a checkpoint's 'shapes' and 'tensors' are dicts, as adapter_state_dict() writes them"
        )
    odd = sorted(set(config) ^ set(want["config"]))
    if odd:
        raise ValueError(
            f"the checkpoint's config lacks or adds the fields {str(odd[:5])[:300]}; it holds AdapterConfig's"
        )
    try:  # what patching checks of these fields, so that a patched model refuses what a fresh one would
        basis = config["basis"] if config["method"] == "randlora" else "uniform"
        numbers = [config[k] for k in ("r", "alpha", "dropout", "seed")]
        _check_hparams(*numbers, basis, config["scaling"], config["method"])
    except (TypeError, ValueError) as e:
        raise type(e)(f"the checkpoint's config: {str(e)[:300]}") from None
    for key in ("method", "r", "alpha", "basis", "seed", "scaling"):
        if config[key] != want["config"][key]:
            raise ValueError(
                f"checkpoint {key} differs from the model's {key}={want['config'][key]!r}: patch a new model"
            )
    missing = [k for k in want["tensors"] if k not in tensors]
    extra = sorted(str(k)[:80] for k in tensors if k not in want["tensors"])
    if missing or extra:
        raise ValueError(
            f"checkpoint does not fit this model (their targets or trainable modules differ): missing "
            f"{missing[:5]}, unexpected {extra[:5]}"
        )
    if shapes != want["shapes"]:
        layers = sorted({*shapes, *want["shapes"]}, key=str)
        differ = [
            (n, shapes.get(n), want["shapes"].get(n))
            for n in layers
            if shapes.get(n) != want["shapes"].get(n)
        ]
        raise ValueError(
            f"the checkpoint's layers have other (out, in) shapes than this model's; (layer, checkpoint's, "
            f"model's): {str(differ[:5])[:300]}; load it into a model of the shapes it was trained on"
        )
    return want["tensors"]


def load_adapter_state_dict(model, state) -> None:
    """Load into a model patched with the same config and layer shapes; all is checked before any copy."""
    _copy_in(_fits(model, state), state["tensors"])


def _copy_in(params: dict, tensors: dict) -> None:
    """params[key] <- tensors[key] for every key of `params`, once each entry is a dense tensor of its
    shape, of a dtype that casts, on a real device and finite."""
    for key, p in params.items():
        t = tensors[key]
        dense = isinstance(t, torch.Tensor) and t.layout == torch.strided and not t.is_nested
        castable = dense and (t.dtype == p.dtype or t.is_floating_point() and p.is_floating_point())
        if not castable or t.shape != p.shape:
            got = f"{t.dtype} of shape {tuple(t.shape)}" if dense else f"a {type(t).__name__}, not dense"
            raise ValueError(
                f"checkpoint entry {key!r} is {got}; the model expects {p.dtype} (a float: any float "
                f"dtype) of shape {tuple(p.shape)}"
            )
        if p.is_meta:
            raise ValueError(f"cannot load: the model's adapters are {_ON_META}")
        if t.is_meta:
            raise ValueError(
                f"checkpoint entry {key!r} is on the meta device (no values); save it from a real model"
            )
        if p.is_floating_point() and not torch.isfinite(t.to(p.dtype)).all():
            raise ValueError(f"checkpoint entry {key!r} is non-finite as {p.dtype}; nothing was loaded")
    with torch.no_grad():
        for key, p in params.items():
            _write(p, tensors[key])


def _safetensors():
    try:
        import safetensors.torch
    except ImportError:
        raise ImportError("adapter files are safetensors files: pip install safetensors") from None
    return safetensors


def save_adapter(model, path_or_file) -> None:
    """adapter_state_dict(model) as a safetensors file: its tensors; as metadata the format version, config
    and layer shapes in JSON, and the SHA-256 of the header and the tensor bytes (safetensors keeps no
    checksum)."""
    st = _safetensors().torch
    state = adapter_state_dict(model)
    meta = {k: json.dumps(state[k]) for k in ("format_version", "config", "shapes")}
    body = st.save(state["tensors"], meta)  # the file without its sha256 entry
    header_len = int.from_bytes(body[:8], "little")
    header = json.dumps(
        json.loads(body[8 : 8 + header_len]), sort_keys=True
    ).encode()  # as load_adapter has it
    meta["sha256"] = hashlib.sha256(header + body[8 + header_len :]).hexdigest()
    writer = hasattr(path_or_file, "write")
    with contextlib.nullcontext(path_or_file) if writer else open(path_or_file, "wb") as f:
        f.write(st.save(state["tensors"], meta))


def load_adapter(model, path_or_file) -> None:
    """Load a save_adapter file (a path or a binary file object). Its header is checked as the dict is, and
    no more tensor bytes are read than the model's adapter can need. A model without adapters is patched from
    the file's config first, if the file's size can hold what that patch trains (so a file object must seek),
    and unpatched if loading fails."""
    safetensors = _safetensors()
    patched = bool(adapters(model))
    file = f"adapter file {str(path_or_file)[:200]!r}"
    damaged = f"{file} is damaged or not written by save_adapter"
    reader = hasattr(path_or_file, "read")
    if not reader and not stat.S_ISREG(os.stat(os.fspath(path_or_file)).st_mode):  # before open() hangs
        raise ValueError(f"{file} is not a regular file")
    with contextlib.nullcontext(path_or_file) if reader else open(path_or_file, "rb") as f:
        head = f.read(8)
        if not isinstance(head, bytes):
            raise TypeError(f"{file} is open in text mode; open it with open(path, 'rb')")
        if not head:
            raise ValueError(f"{damaged}: it is empty (a file object just written to needs seek(0) first)")
        if head[:4] == b"PK\x03\x04":  # a zip (torch.save's), not a header length
            raise ValueError(
                f"{file} is of the older torch.save format; if you trust it, load it with "
                "load_adapter_state_dict(model, torch.load(path, weights_only=True)) and save it again"
            )
        header_len = int.from_bytes(head, "little")
        n_tensors = len(model.state_dict())  # bounds the header and the config's lists
        limit = 2**16 + 2**11 * n_tensors  # 64 KiB, and 2 KiB a tensor of the model
        if header_len > limit:
            raise ValueError(
                f"{file} has a header of {header_len} bytes, more than this model's adapter can need "
                f"({limit}): is it a file for another model?"
            )
        head += f.read(header_len)
        try:
            header = json.loads(head[8:])
            meta = header["__metadata__"]
            sha256 = meta.pop("sha256")
            canonical = json.dumps(header, sort_keys=True).encode()  # the header as save_adapter hashed it
            state = {k: json.loads(meta[k]) for k in ("format_version", "config", "shapes")}
            file_shapes = {k: list(e["shape"]) for k, e in header.items() if k != "__metadata__"}
            fields = {k: tuple(v) if type(v) is list else v for k, v in state["config"].items()}
            most = max(len(fields[k]) for k in ("target_modules", "target_parameters", "trainable"))
            if most > 1024 + n_tensors:  # each name must match a module or parameter
                raise ValueError(f"its config names {most} modules in a list, more than the model has")
            config = AdapterConfig(**fields)
        except Exception as e:  # truncated, tampered, not save_adapter's
            raise ValueError(f"{damaged} ({type(e).__name__}: {str(e)[:200]})") from None
        try:
            if not patched:
                try:
                    here = f.tell()
                    available = f.seek(0, os.SEEK_END) - here  # bytes of tensors the file holds
                    f.seek(here)
                except (AttributeError, OSError):
                    raise ValueError(
                        f"{file} cannot seek: load it into a model without adapters from a path or a "
                        "seekable file object (or patch the model first)"
                    ) from None
                try:  # refused before allocating adapters the file cannot hold
                    _patch(model, config, max_numbers=available // 4)
                except (TypeError, ValueError) as e:
                    raise type(e)(f"{file}'s config: {str(e)[:300]}") from None
            # format, config, names and layer shapes, then each entry's shape: before any tensor byte
            params = _fits(model, {**state, "tensors": file_shapes})
            for key, p in params.items():
                if file_shapes[key] != list(p.shape):
                    got = str(file_shapes[key])[:80]
                    raise ValueError(f"{file}'s entry {key!r} has shape {got}, the model's {list(p.shape)}")
            size = sum(p.numel() * max(8, p.element_size()) for p in params.values())
            data = f.read(size + 1)  # at most what float64 tensors of those shapes need, + 1
            covered = data if state["format_version"] == 3 else canonical + data  # format 3: tensor bytes
            if len(data) > size or hashlib.sha256(covered).hexdigest() != sha256:
                raise ValueError(
                    f"{damaged} (its header or tensor bytes changed since saving, or are too many)"
                )
            try:
                tensors = safetensors.torch.load(head + data)
            except Exception as e:  # safetensors' checks of the byte ranges and dtypes
                raise ValueError(f"{damaged} ({type(e).__name__}: {str(e)[:200]})") from None
            _copy_in(params, tensors)  # dtypes and values; its names are the header's, which fit
        except BaseException:
            if not patched and adapters(model):  # patched here: undo it
                _unpatch(model, keep_update=False)  # no merge: weights never touched; requires_grad back
            raise
