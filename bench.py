"""Step time and activation memory of RandLoRA, LoRA and full fine-tuning, side by side in one run.

The model is a stack of transformer blocks reduced to their linear layers (ViT-B shapes by
default; `--shape llm` for LLM-like ones), every layer adapted:

    qkv   d -> 3d        h = q + k + v           (stands in for attention: no saved tensors)
    proj  d -> d         x = x + proj(h)
    fc1   d -> d_ff
    fc2   d_ff -> d      x = x + fc2(fc1(x))     (no GELU: it would cost every method the same)

Methods, each timed as one training step (forward, backward with a fixed output gradient, and
the optimizer step where there is something to train):

    frozen            all weights frozen, input gradients only: the floor of any adapter
    lora              LoRA rank 32 on every layer (4 in the tiny shape), AdamW over its factors
    randlora          RandLoRA at the rank with LoRA's parameter count (rank_for_budget)
    full              full fine-tuning, AdamW over every weight
    randlora_vsparse  (on request, --methods) RandLoRA with very sparse bases (paper sec. 6.4)

x requires grad in every method, as it does for layers in the middle of a deeper network.
AdamW is the fused kernel where torch has it (much faster than the default for-loop one,
so full fine-tuning is not slowed by its optimizer). Times are medians over `repeats` steps
after `warmup` steps, with the methods interleaved round-robin (the order rotated every
round) so that load from other processes falls on all of them alike; ratios are taken within
the run. Activation bytes are counted exactly with saved_tensors_hooks (see `saved_bytes`).
Merged inference compares `randlora.merge(model)` against the unpatched base model under
torch.no_grad, with 3x the repeats (the two do the same work, so only noise separates them).

Modes:

    python bench.py [--shape vit|llm|tiny] [--blocks N] [--tokens 256 1600 6400] [--repeats 5]
                    [--warmup 1] [--methods ...] [--quick] [--json FILE] [--impl REV|PATH]
    python bench.py --overhead [--impl PATH]     tiny widths (d = 32, d_ff = 128, 12 blocks,
                    T = 64, LoRA rank 4, 30 repeats after 5 warmup), on one thread: the step
                    time is the framework's per-op cost, not arithmetic (with two threads each
                    matmul would also pay a thread hand-off, which hides the Python cost)
    python bench.py --device cuda|cpu [--dtype bf16 fp32] [--backend inductor] [--blocks 12]
                    eager and torch.compile'd step times, the one-time compile time apart, and
                    from torch.profiler the CPU time to issue one step beside the kernel time of
                    one step (every kernel of the profiled steps, forward and backward, over
                    their number); T = 6304 (32 images of 197 tokens) by default

`--impl REV|PATH` is an A/B run: randlora.py as of the git revision REV of this repository
(copied into a temporary folder, deleted at the end), or the copy at PATH, adds its LoRA and
RandLoRA as extra interleaved methods (`lora@impl`, `randlora@impl`), and "x prev" is the
current implementation's step time over that copy's, from the same run.

Verdicts. Every round runs each method once, so the two methods of a ratio ran under the same
load; a target is judged on the median of the per-round ratios, of CPU time (this process's,
all threads: the work done, which other processes disturb much less than the wall clock) on a
CPU, of wall-clock time on a GPU (whose work the CPU clock does not see). The table gives the
middle half of those ratios (their quartiles) beside the median: pass when the whole middle half
is within the limit, MISS when the whole of it is above, and "inconclusive" when it straddles
the limit, so that one loaded round cannot flip a verdict: run again, with more --repeats.
Ratios without rounds (saved bytes, a single repeat) are judged on their value.

Targets: saved bytes RandLoRA <= LoRA at every T;
step time RandLoRA <= 1.3x LoRA at T = 6400, <= 1.9x at 1600, <= 2.5x at 256, and <= 1.1x
full fine-tuning at 6400; merged inference within 3% of the base model; in the overhead mode
RandLoRA <= 1.3x LoRA; with --impl, no step-time ratio current/previous above 1.05 at T = 256,
1600, 6400; with --device cuda, ViT-B widths, bf16, T = 6304: eager RandLoRA <= 1.3x eager LoRA
and compiled RandLoRA <= 1.4x compiled full fine-tuning.

[1] Albert et al., RandLoRA, ICLR 2025, arXiv 2502.00987 (sec. 6.4, 6.6 and app. C.6.1).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

# On a shared machine, OpenMP threads that spin while waiting stall whenever another process
# holds a core: a small-op step (LoRA at T = 64) then runs 10-20x slower and at random. Waiting
# passively keeps the ratios honest. Only effective before torch is imported; set it to
# override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

SHAPES = {  # d, d_ff, blocks, LoRA rank
    "vit": dict(d=768, d_ff=3072, blocks=4, lora_rank=32),  # ViT-B/16
    "llm": dict(d=2048, d_ff=5632, blocks=1, lora_rank=32),  # a 1B-class decoder's widths (e.g. TinyLlama)
    "tiny": dict(d=32, d_ff=128, blocks=12, lora_rank=4),  # the overhead mode: per-op cost, not arithmetic
}
TARGETS = ("qkv", "proj", "fc1", "fc2")
METHODS = ("frozen", "lora", "randlora", "full")  # the default run
ALL_METHODS = METHODS + ("randlora_vsparse",)
AB_METHODS = ("lora", "randlora", "randlora_vsparse")  # those that --impl runs twice
LORA_RANK = 32
TOKENS = (256, 1600, 6400)
OVERHEAD_TOKENS = (64,)
DEVICE_TOKENS = (6304,)  # 32 images of 197 ViT-B/16 tokens
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
STEP_TARGETS = {6400: 1.3, 1600: 1.9, 256: 2.5}  # RandLoRA step time / LoRA's, at most
FULL_TARGET = (6400, 1.1)  # RandLoRA / full fine-tuning at T, at most
MERGED_TARGET = 1.03  # merged inference / base model, at most
OVERHEAD_TARGET = 1.3  # RandLoRA / LoRA step time in the tiny shape, at most
AB_TARGET = (TOKENS, 1.05)  # current / previous step time at these T, at most
DEVICE_TARGETS = {
    "eager step / LoRA": ("x_lora", 1.3),  # at DEVICE_TARGET_AT, at most
    "compiled step / full FT": ("compiled_x_full", 1.4),
}
DEVICE_TARGET_AT = dict(device="cuda", dtype="bf16", shape="vit", T=6304)
PROFILED_STEPS = 3  # steps under torch.profiler, per method and mode


# ----------------------------------------------------------------------------------------
# The model


class Block(nn.Module):
    def __init__(self, d, d_ff):
        super().__init__()
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, d_ff), nn.Linear(d_ff, d)

    def forward(self, x):  # (T, d)
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # 3 x (T, d), views
        x = x + self.proj(q + k + v)  # (T, d)
        return x + self.fc2(self.fc1(x))  # (T, d)


def make_model(shape="vit", blocks=None, seed=0) -> nn.Module:
    cfg = SHAPES[shape]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Sequential(*(Block(cfg["d"], cfg["d_ff"]) for _ in range(blocks or cfg["blocks"])))


def load_impl(path=None):
    """randlora itself, or (for A/B runs against a previous copy) the module in the file `path`."""
    if not path:
        import randlora

        return randlora
    name = "randlora_impl_" + os.path.splitext(os.path.basename(path))[0]
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None:
        raise ValueError(f"--impl {path!r} is not a Python file")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look it up
    spec.loader.exec_module(mod)
    return mod


def impl_file(spec: str, folder: str) -> str:
    """The file for --impl: `spec` itself if it names a file, else randlora.py as of the git revision
    `spec` of the repository that holds bench.py, written into `folder` (a temporary one)."""
    if os.path.isfile(spec):
        return spec
    repo = os.path.dirname(os.path.abspath(__file__))
    try:
        source = subprocess.run(
            ["git", "-C", repo, "show", f"{spec}:randlora.py"], capture_output=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        why = getattr(e, "stderr", b"").decode().strip() or str(e)
        raise ValueError(f"--impl {spec!r} is neither a file nor a git revision of {repo} ({why})") from None
    path = os.path.join(folder, "randlora_" + "".join(c if c.isalnum() else "_" for c in spec) + ".py")
    with open(path, "wb") as f:
        f.write(source)
    return path


def adamw(params):
    params = list(params)
    try:
        return torch.optim.AdamW(params, lr=1e-4, fused=True)
    except (RuntimeError, TypeError, ValueError):  # no fused kernel here
        return torch.optim.AdamW(params, lr=1e-4)


def build(method, base, R, lora_rank=LORA_RANK, device="cpu", dtype=torch.float32):
    """(model, optimizer or None) for one method, from a deep copy of the base model, adapted by
    the randlora module R, then moved to device and dtype (adapter bases included)."""
    model = copy.deepcopy(base)
    if method == "lora":
        R.add_lora(model, TARGETS, r=lora_rank, alpha=2 * lora_rank)
    elif method in ("randlora", "randlora_vsparse"):
        r = R.rank_for_budget(model, TARGETS, lora_rank)
        basis = "very_sparse" if method == "randlora_vsparse" else "uniform"
        R.add_randlora(model, TARGETS, r=r, alpha=2 * r, basis=basis)
    elif method not in ("frozen", "full"):
        raise ValueError(f"unknown method {method!r}; choose from {ALL_METHODS}")
    model.to(device, dtype)
    if method == "frozen":
        return model.requires_grad_(False), None
    if method == "full":
        model.requires_grad_(True)
    return model, adamw(p for p in model.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------------------
# Measurements


def saved_bytes(model, x) -> int:
    """Bytes that autograd keeps alive for backward after one forward of `model` on `x`.

    The rule: every tensor handed to a saved_tensors_hook is counted by its storage, once per
    storage (the same tensor, or two views of one tensor, saved twice counts once), at the
    storage's full size (a saved view keeps all of it alive); storages that belong to a
    parameter or buffer of the model are not counted (they exist anyway: a frozen nn.Linear
    saves W^T, a view of W)."""
    owned = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in owned:
            seen[st.data_ptr()] = st.nbytes()  # all alive until backward
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = model(x)
    del y
    return sum(seen.values())


def make_step(model, opt, x, gy):
    def step():
        if opt is not None:
            opt.zero_grad(set_to_none=True)
        x.grad = None
        model(x).backward(gy)
        if opt is not None:
            opt.step()

    return step


def interleaved(fns: dict, repeats: int, warmup: int) -> dict:
    """{name: {"wall": [s], "cpu": [s]}} per call: every round calls each fn once, the order
    rotated per round. "cpu" is this process's CPU time (all threads): the work done, which
    other processes on the machine disturb much less than the wall-clock time."""
    names, times = list(fns), {n: {"wall": [], "cpu": []} for n in fns}
    for i in range(warmup + repeats):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            t0, c0 = time.perf_counter(), time.process_time()
            fns[name]()
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            if i >= warmup:
                times[name]["wall"].append(dt)
                times[name]["cpu"].append(dc)
    return times


def _medians(times, key):
    return {name: statistics.median(t[key]) for name, t in times.items()}


def _timed_row(kind, shape, T, method, times, rounds, **ratios) -> dict:
    """One method's row at one shape: its median wall and CPU ms, each round's wall ms, `ratios` (of
    medians) and the same ratios round by round (`rounds`), judged on CPU time."""
    return dict(
        kind=kind,
        shape=shape,
        T=T,
        method=method,
        ms=1e3 * statistics.median(times[method]["wall"]),
        cpu_ms=1e3 * statistics.median(times[method]["cpu"]),
        times_ms=[1e3 * t for t in times[method]["wall"]],
        **ratios,
        clock="cpu",
        rounds=rounds,
    )


def per_round(times, clock, pairs) -> dict:
    """{ratio name: [a's time over b's, in each round]} for each (name, a, b) in pairs whose b ran:
    a and b ran in the same round, under the same load. clock: "cpu" or "wall"."""
    return {
        key: [x / y for x, y in zip(times[a][clock], times[b][clock])] for key, a, b in pairs if b in times
    }


def run(
    shape="vit",
    tokens=TOKENS,
    repeats=5,
    warmup=1,
    quick=False,
    impl=None,
    blocks=None,
    methods=METHODS,
    seed=0,
    log=None,
) -> list:
    """One row per (T, method): training step rows (kind "train") and merged-inference rows
    (kind "infer", methods "base" and "merged"). `quick`: one block, 2 repeats. `impl`: the
    path of a previous randlora.py, whose LoRA and RandLoRA run as the extra methods
    "lora@impl", "randlora@impl" (A/B in one run). Ratios (x_*) are of median wall-clock
    times, cpu_x_* of median CPU times, within this run; x_prev = current / previous; rounds
    holds each ratio per round, of CPU time, which checks() judges."""
    R = load_impl()
    R_prev = load_impl(impl) if impl else None
    if quick:
        blocks, repeats, warmup = blocks or 1, min(repeats, 2), min(warmup, 1)
    if impl:
        methods = tuple(methods) + tuple(f"{m}@impl" for m in methods if m in AB_METHODS)
    base = make_model(shape, blocks, seed)
    rank = SHAPES[shape]["lora_rank"]
    impl_of = {m: R_prev if m.endswith("@impl") else R for m in methods}
    models = {m: build(m.removesuffix("@impl"), base, impl_of[m], rank) for m in methods}
    infer = None
    if "randlora" in methods:  # a trained-looking update
        merged = copy.deepcopy(models["randlora"][0])
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for u, _ in R.adapters(merged).values():
                u.lam.copy_(1e-3 * torch.randn(u.lam.shape, generator=g))
        R.merge(merged)
        infer = {"base": copy.deepcopy(base).requires_grad_(False), "merged": merged.requires_grad_(False)}
    d = SHAPES[shape]["d"]
    rows = []
    for T in tokens:
        g = torch.Generator().manual_seed(seed + T)
        x = torch.randn(T, d, generator=g).requires_grad_(True)  # (T, d)
        gy = torch.randn(T, d, generator=g)  # (T, d) fixed output grad
        steps = {m: make_step(model, opt, x, gy) for m, (model, opt) in models.items()}
        times = interleaved(steps, repeats, warmup)
        med, cpu = _medians(times, "wall"), _medians(times, "cpu")
        ratio = lambda d, m, ref: d[m] / d[ref] if ref in d else None
        for m, (model, _) in models.items():
            n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
            pairs = [("x_lora", m, "lora"), ("x_full", m, "full"), ("x_prev", m, m + "@impl")]
            row = _timed_row(
                "train",
                shape,
                T,
                m,
                times,
                per_round(times, "cpu", pairs),
                x_lora=ratio(med, m, "lora"),
                x_full=ratio(med, m, "full"),
                cpu_x_lora=ratio(cpu, m, "lora"),
                cpu_x_full=ratio(cpu, m, "full"),
                x_prev=ratio(med, m, m + "@impl"),
                cpu_x_prev=ratio(cpu, m, m + "@impl"),
            )
            row.update(
                trainable=n_train,
                saved_bytes=saved_bytes(model, x),
                paths=resolved_paths(model, T, impl_of[m]),
            )
            rows.append(row)
        if infer is not None:
            xs = x.detach()
            fns = {k: (lambda mdl=mdl, xs=xs: _no_grad_forward(mdl, xs)) for k, mdl in infer.items()}
            times = interleaved(fns, 3 * repeats, warmup)  # same work: a finer look
            med, cpu = _medians(times, "wall"), _medians(times, "cpu")
            for k in infer:
                rounds = per_round(times, "cpu", [("x_base", k, "base")])
                x_base, cpu_x_base = med[k] / med["base"], cpu[k] / cpu["base"]
                rows.append(
                    _timed_row("infer", shape, T, k, times, rounds, x_base=x_base, cpu_x_base=cpu_x_base)
                )
        if log:
            log(f"T={T} done")
    return rows


def device_run(
    shape="vit",
    tokens=DEVICE_TOKENS,
    dtypes=("bf16", "fp32"),
    device="cuda",
    repeats=5,
    warmup=1,
    blocks=None,
    methods=METHODS,
    backend="inductor",
    seed=0,
    log=None,
) -> list:
    """One row per (dtype, T, method), kind "device": the step on `device` in `dtype` (model,
    bases, optimizer state and x all cast: pure low-precision training), eager and compiled.

    eager_ms, compiled_ms   median step times, the 2 x len(methods) steps interleaved; each
                            timed call ends with torch.cuda.synchronize() on CUDA
    compile_s               the first compiled step (dynamo capture, forward and backward
                            compilation), once, apart: not in compiled_ms. The optimizer step
                            stays eager; dynamo's cache is reset per (dtype, T)
    *_issue_ms              torch.profiler: wall time of one step's call on the calling thread, the
                            time to issue its ops (the queue is drained before each of PROFILED_STEPS
                            steps; the profiler adds its own few microseconds per op)
    *_kernel_ms             torch.profiler: kernel time of one step, see `kernel_ms`
    x_lora, x_full, compiled_x_lora, compiled_x_full: ratios of the medians within the run;
    rounds: the same ratios per round (wall-clock time on CUDA, CPU time on a CPU), which checks()
    judges.
    """
    from torch.profiler import ProfilerActivity, profile, record_function

    R = load_impl()
    cuda = torch.device(device).type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    base = make_model(shape, blocks, seed)
    d, rank = SHAPES[shape]["d"], SHAPES[shape]["lora_rank"]
    rows = []
    for dt in dtypes:
        for T in tokens:
            torch._dynamo.reset()  # this group's compiles only
            g = torch.Generator().manual_seed(seed + T)
            x = torch.randn(T, d, generator=g).to(device, DTYPES[dt]).requires_grad_(True)  # (T, d)
            gy = torch.randn(T, d, generator=g).to(device, DTYPES[dt])  # (T, d)
            steps, compile_s = {}, {}
            for m in methods:
                model, opt = build(m, base, R, rank, device, DTYPES[dt])
                steps[m] = make_step(model, opt, x, gy)
                steps[m + "/compiled"] = make_step(torch.compile(model, backend=backend), opt, x, gy)
                sync()
                t0 = time.perf_counter()
                steps[m + "/compiled"]()
                sync()
                compile_s[m] = time.perf_counter() - t0
            timed = {k: (lambda s=s: (s(), sync())) for k, s in steps.items()}
            times = interleaved(timed, repeats, warmup)
            med = _medians(times, "wall")
            issue, kernel = {}, {}
            for k, step in steps.items():
                with profile(activities=activities) as prof:
                    for _ in range(PROFILED_STEPS):
                        with record_function("bench.step"):
                            step()
                        sync()
                events = prof.events()
                issue[k] = statistics.mean(e.cpu_time_total for e in events if e.name == "bench.step") / 1e3
                kernel[k] = kernel_ms(events, torch.device(device).type, PROFILED_STEPS)
            for m in methods:
                c = m + "/compiled"
                rounds = per_round(
                    times,
                    "wall" if cuda else "cpu",
                    [
                        ("x_lora", m, "lora"),
                        ("x_full", m, "full"),
                        ("compiled_x_lora", c, "lora/compiled"),
                        ("compiled_x_full", c, "full/compiled"),
                    ],
                )
                rows.append(
                    dict(
                        kind="device",
                        device=device,
                        dtype=dt,
                        shape=shape,
                        blocks=len(base),
                        T=T,
                        method=m,
                        eager_ms=1e3 * med[m],
                        compiled_ms=1e3 * med[c],
                        compile_s=compile_s[m],
                        x_lora=med[m] / med["lora"],
                        x_full=med[m] / med["full"],
                        compiled_x_lora=med[c] / med["lora/compiled"],
                        compiled_x_full=med[c] / med["full/compiled"],
                        clock="wall" if cuda else "cpu",
                        rounds=rounds,
                        eager_issue_ms=issue[m],
                        eager_kernel_ms=kernel[m],
                        compiled_issue_ms=issue[c],
                        compiled_kernel_ms=kernel[c],
                    )
                )
            if log:
                log(f"{dt} T={T} done")
    torch._dynamo.reset()
    return rows


def kernel_ms(events, device_type: str, steps: int) -> float | None:
    """Kernel time per step, in ms, of a torch.profiler window of `steps` steps: the self time of
    every kernel the window ran, forward and backward, over `steps`.

    Every kernel, whichever thread launched it: backward's kernels are launched from autograd's
    device threads, so a step's record_function range, which holds only what its own thread
    launched, leaves them out. Self time, so that nothing is counted twice. On CUDA the kernels
    are the profiler's device-side events (kernels, memcpy, memset) other than the device-side
    copies of record_function ranges, which span kernels (None where the profiler does not mark
    those, as torch.profiler's own table leaves them out by the same mark); on a CPU they are the
    ATen ops (aten:: events; inductor's fused C++ kernels are not profiled, so a step compiled
    with it counts only its ATen calls)."""
    from torch.autograd import DeviceType

    if device_type == "cpu":
        us = sum(
            e.self_cpu_time_total
            for e in events
            if e.device_type == DeviceType.CPU and e.name.startswith("aten::")
        )
        return us / steps / 1e3  # us -> ms
    kind = getattr(DeviceType, device_type.upper())
    ours = [e for e in events if e.device_type == kind]
    if not all(hasattr(e, "is_user_annotation") for e in ours):
        return None
    self_time = (
        "self_device_time_total"
        if all(hasattr(e, "self_device_time_total") for e in ours)
        else "self_cuda_time_total"
    )  # its name before torch 2.4
    return sum(getattr(e, self_time) for e in ours if not e.is_user_annotation) / steps / 1e3


def resolved_paths(model, T, R):
    """{layer type: path} that "auto" resolves to at T tokens (None for non-RandLoRA models)."""
    out = {}
    for name, mod in model.named_modules():
        if hasattr(mod, "chosen_path"):
            path = mod.chosen_path(T)
        elif hasattr(mod, "lam") and hasattr(mod, "path"):  # older copies: the cost model
            args = (T, mod.D, mod.k, mod.n * mod.r, mod.transposed)
            sp = (
                mod._shared.sparse_operands(mod.n, mod.D) if hasattr(mod._shared, "sparse_operands") else None
            )
            if mod.path != "auto":
                path = mod.path
            elif sp is None:
                path = R.choose_path(*args)
            else:  # CSR bases
                path = R.choose_path(*args, True, sp[0].values().numel() / (mod.D * mod.n * mod.r))
        else:
            continue
        out.setdefault(name.rsplit(".", 1)[-1], set()).add(path)
    return {k: "+".join(sorted(v)) for k, v in out.items()} or None


def _no_grad_forward(model, x):
    with torch.no_grad():
        model(x)


def judge(row, key, limit) -> dict:
    """The verdict on the ratio row[key] against `limit` (see the module docstring): value is the
    median of the row's per-round ratios (row["rounds"][key]), low and high their quartiles, the
    middle half of the rounds; a ratio without rounds is its own value, low and high. ok: True
    (pass) when high <= limit, False (MISS) when low > limit, None (inconclusive) between."""
    rounds = (row.get("rounds") or {}).get(key)
    values = rounds or [row[key]]
    if len(values) > 1:
        low, value, high = statistics.quantiles(values, n=4, method="inclusive")
    else:
        low = value = high = values[0]
    ok = True if high <= limit else False if low > limit else None
    return dict(
        value=value,
        low=low,
        high=high,
        limit=limit,
        ok=ok,
        wall=row[key],
        clock=row.get("clock") if rounds else None,
    )


def checks(rows) -> list:
    """The targets, each as {target, T, method, value, low, high, limit, ok, wall, clock}, from the
    rows (see `judge`); wall is the ratio of the wall-clock medians, shown beside."""
    train = {(r["T"], r["method"]): r for r in rows if r["kind"] == "train"}
    out = []
    for method in ("randlora", "randlora_vsparse"):
        for T in sorted({r["T"] for r in rows}):
            row, lora = train.get((T, method)), train.get((T, "lora"))
            if row is None or lora is None:
                continue
            saved = dict(saved=row["saved_bytes"] / lora["saved_bytes"])
            out.append(dict(target="saved bytes <= LoRA", T=T, method=method, **judge(saved, "saved", 1.0)))
            if row.get("shape") == "tiny":
                out.append(
                    dict(
                        target="overhead step / LoRA",
                        T=T,
                        method=method,
                        **judge(row, "x_lora", OVERHEAD_TARGET),
                    )
                )
            elif T in STEP_TARGETS:
                out.append(
                    dict(
                        target="step time / LoRA", T=T, method=method, **judge(row, "x_lora", STEP_TARGETS[T])
                    )
                )
            if T == FULL_TARGET[0] and row.get("shape") != "tiny" and row["x_full"] is not None:
                out.append(
                    dict(
                        target="step time / full FT",
                        T=T,
                        method=method,
                        **judge(row, "x_full", FULL_TARGET[1]),
                    )
                )
    for r in rows:
        if r["kind"] == "train" and r.get("x_prev") is not None and r["T"] in AB_TARGET[0]:
            out.append(
                dict(
                    target="step time / previous",
                    T=r["T"],
                    method=r["method"],
                    **judge(r, "x_prev", AB_TARGET[1]),
                )
            )
    for r in rows:
        if r["kind"] == "infer" and r["method"] == "merged":
            out.append(
                dict(
                    target="merged inference / base",
                    T=r["T"],
                    method="randlora",
                    **judge(r, "x_base", MERGED_TARGET),
                )
            )
    for r in rows:
        if (
            r["kind"] == "device"
            and r["method"] == "randlora"
            and all(r.get(k) == v for k, v in DEVICE_TARGET_AT.items())
        ):
            for target, (key, limit) in DEVICE_TARGETS.items():
                out.append(
                    dict(
                        target=f"{target} ({r['dtype']})", T=r["T"], method="randlora", **judge(r, key, limit)
                    )
                )
    return out


def verdict(check) -> str:
    return {True: "pass", False: "MISS", None: "inconclusive"}[check["ok"]]


def _fmt_bytes(n):
    return f"{n / 2**20:.1f} MiB"


def table(rows, check_rows) -> str:
    fx = lambda v: "-" if v is None else f"{v:.2f}"
    train = [r for r in rows if r["kind"] == "train"]
    ab = any(r.get("x_prev") is not None for r in train)
    w = max([17] + [len(r["method"]) for r in rows])
    lines = []
    if train:
        lines.append(
            f"{'T':>5} {'method':<{w}} {'step ms':>9} {'x LoRA':>7} {'x full':>7} {'cpu x LoRA':>10} "
            f"{'cpu x full':>10}{' x prev cpu x prev' if ab else ''} {'trainable':>11} {'saved':>11}  paths"
        )
    for r in train:
        paths = " ".join(f"{k}:{v[:3]}" for k, v in r["paths"].items()) if r["paths"] else ""
        prev = f" {fx(r.get('x_prev')):>6} {fx(r.get('cpu_x_prev')):>10}" if ab else ""
        lines.append(
            f"{r['T']:>5} {r['method']:<{w}} {r['ms']:>9.1f} {fx(r['x_lora']):>7} {fx(r['x_full']):>7} "
            f"{fx(r.get('cpu_x_lora')):>10} {fx(r.get('cpu_x_full')):>10}{prev} "
            f"{r['trainable']:>11,} {_fmt_bytes(r['saved_bytes']):>11}  {paths}"
        )
    inf = [r for r in rows if r["kind"] == "infer"]
    if inf:
        lines += ["", f"{'T':>5} {'inference':<{w}} {'ms':>9} {'x base':>7} {'cpu x base':>10}"]
        lines += [
            f"{r['T']:>5} {r['method']:<{w}} {r['ms']:>9.1f} {r['x_base']:>7.3f} "
            f"{r.get('cpu_x_base', 0):>10.3f}"
            for r in inf
        ]
    dev = [r for r in rows if r["kind"] == "device"]
    if dev:
        ms = lambda v: "n/a" if v is None else f"{v:.2f}"
        lines += [
            f"{'':>11} {'':<{w}} {'eager':-^25} {'compiled':-^35} {'eager profile':-^19} "
            f"{'compiled profile':-^19}",
            f"{'dtype':>5} {'T':>5} {'method':<{w}} {'ms':>9} {'x LoRA':>7} {'x full':>7} {'ms':>9} "
            f"{'x LoRA':>7} "
            f"{'x full':>7} {'compile s':>10} {'issue ms':>9} {'kernel ms':>9} {'issue ms':>9} "
            f"{'kernel ms':>9}",
        ]
        lines += [
            f"{r['dtype']:>5} {r['T']:>5} {r['method']:<{w}} {r['eager_ms']:>9.2f} {r['x_lora']:>7.2f} "
            f"{r['x_full']:>7.2f} {r['compiled_ms']:>9.2f} {r['compiled_x_lora']:>7.2f} "
            f"{r['compiled_x_full']:>7.2f} {r['compile_s']:>10.1f} "
            f"{ms(r['eager_issue_ms']):>9} {ms(r['eager_kernel_ms']):>9} "
            f"{ms(r['compiled_issue_ms']):>9} {ms(r['compiled_kernel_ms']):>9}"
            for r in dev
        ]
    if check_rows:
        clocks = sorted({c["clock"] for c in check_rows} - {None})
        header = (
            f"targets: the median of the per-round ratios of {' and '.join(clocks) or 'no'} time, their "
            "middle "
            "half in brackets (inconclusive where it straddles the limit); wall: the wall-clock medians' "
            "ratio"
        )
        lines += ["", header]
        for c in check_rows:
            spread = f" [{c['low']:.3f}-{c['high']:.3f}]" if c["low"] != c["high"] else ""
            wall = f"  wall {c['wall']:.3f}" if c["clock"] == "cpu" else ""
            lines.append(
                f"  {verdict(c):<12}  {c['target']:<27} T={c['T']:<5} {c['method']:<{w}} "
                f"{c['value']:.3f}{spread} (limit {c['limit']:g}){wall}"
            )
    return "\n".join(lines)


def environment(device="cpu") -> dict:
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    gpu = torch.cuda.get_device_name() if torch.device(device).type == "cuda" else None
    return dict(
        torch=torch.__version__,
        python=platform.python_version(),
        threads=torch.get_num_threads(),
        cpus=os.cpu_count(),
        machine=platform.machine(),
        loadavg=load,
        gpu=gpu,
        omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"),
    )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default=None, help="vit (default), llm, tiny")
    p.add_argument("--blocks", type=int, default=None, help="override the shape's block count")
    p.add_argument(
        "--tokens",
        type=int,
        nargs="+",
        default=None,
        help=f"T values (default {TOKENS}; {OVERHEAD_TOKENS} with --overhead, {DEVICE_TOKENS} with --device)",
    )
    p.add_argument("--repeats", type=int, default=None, help="timed steps (default 5; 30 with --overhead)")
    p.add_argument(
        "--warmup", type=int, default=None, help="untimed steps first (default 1; 5 with --overhead)"
    )
    p.add_argument("--methods", nargs="+", choices=ALL_METHODS, default=list(METHODS))
    p.add_argument("--quick", action="store_true", help="smoke run: one block, T = 64 and 256, 2 repeats")
    p.add_argument(
        "--overhead",
        action="store_true",
        help="tiny widths (shape tiny: d = 32, d_ff = 128, 12 blocks), T = 64, 30 repeats",
    )
    p.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default=None,
        help="eager and torch.compile'd steps with a profile, on this device",
    )
    p.add_argument(
        "--dtype",
        nargs="+",
        choices=sorted(DTYPES),
        default=None,
        help="with --device (default bf16 fp32 on cuda, fp32 on cpu)",
    )
    p.add_argument("--backend", default="inductor", help="with --device: torch.compile's backend")
    p.add_argument("--json", metavar="FILE", help="write rows, checks and environment here")
    p.add_argument(
        "--impl",
        metavar="REV|PATH",
        help="A/B: add the LoRA and RandLoRA of randlora.py as of this "
        "git revision (or of this file) as extra methods, and the ratio current/previous",
    )
    a = p.parse_args(argv)
    if a.overhead and a.shape not in (None, "tiny"):
        p.error("--overhead runs the tiny shape; drop --shape")
    shape = "tiny" if a.overhead else a.shape or "vit"
    repeats = a.repeats if a.repeats is not None else 30 if a.overhead else 5
    warmup = a.warmup if a.warmup is not None else 5 if a.overhead else 1
    if repeats < 1 or warmup < 0 or (a.tokens and min(a.tokens) < 1):
        p.error("--repeats must be >= 1, --warmup >= 0 and every --tokens value >= 1")
    if "lora" not in a.methods or "full" not in a.methods:
        p.error("--methods must include lora and full: every ratio is taken against them")
    if a.device is None and a.dtype:
        p.error("--dtype goes with --device")
    if a.device and a.impl:
        p.error("--impl (A/B) is a CPU step-time run; drop --device or --impl")
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device here")
    tokens = tuple(
        a.tokens
        or (
            OVERHEAD_TOKENS if a.overhead else (64, 256) if a.quick else DEVICE_TOKENS if a.device else TOKENS
        )
    )
    if a.quick:
        repeats, warmup = min(repeats, 2), min(warmup, 1)
    if a.overhead:
        torch.set_num_threads(1)
    blocks = a.blocks or (1 if a.quick else None)
    env = environment(a.device or "cpu")
    mode = f" device={a.device} dtype={a.dtype or ''} backend={a.backend}" if a.device else ""
    print(
        f"bench.py shape={shape} blocks={blocks or SHAPES[shape]['blocks']} tokens={tokens} "
        f"repeats={repeats} "
        f"warmup={warmup}{' quick' if a.quick else ''}{mode}{f' impl={a.impl}' if a.impl else ''}  "
        f"torch {env['torch']}, {env['threads']} threads, load {env['loadavg']}",
        flush=True,
    )
    t0 = time.time()
    log = lambda s: print(f"  {s} ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
    if a.device:
        dtypes = tuple(a.dtype or (("bf16", "fp32") if a.device == "cuda" else ("fp32",)))
        rows = device_run(
            shape, tokens, dtypes, a.device, repeats, warmup, blocks, tuple(a.methods), a.backend, log=log
        )
    else:
        with tempfile.TemporaryDirectory(prefix="bench-impl-") as folder:  # a revision's copy, deleted after
            try:
                impl = impl_file(a.impl, folder) if a.impl else None
            except ValueError as e:
                p.error(str(e))
            rows = run(shape, tokens, repeats, warmup, a.quick, impl, blocks, tuple(a.methods), log=log)
    env["loadavg_after"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    env["seconds"] = time.time() - t0
    cs = checks(rows)
    print(table(rows, cs))
    print(f"\n{env['seconds']:.0f} s; load average before {env['loadavg']}, after {env['loadavg_after']}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(
                dict(
                    argv=sys.argv[1:] if argv is None else list(argv), environment=env, rows=rows, checks=cs
                ),
                f,
                indent=1,
            )
    return rows


if __name__ == "__main__":
    main()
