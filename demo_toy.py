"""Does full rank matter? LoRA vs RandLoRA at equal parameters on a target known in closed form.

The experiment (a miniature of the paper's Figure 1 [1], offline, CPU, well under a minute):

    base      three frozen linear maps side by side (block-diagonal, no bias):
              64 -> 64, 64 -> 96, 96 -> 64, so every layer has k = min(in, out) = 64
    teacher   base + DeltaW*_l = U_l diag(sigma_l) V_l^T per layer, U, V random orthonormal
              (out, k), (in, k); sigma_i ~ i^-decay (decay 0: a flat spectrum), scaled so
              sum_l ||DeltaW*_l||_F^2 = 1: a full-rank change that no rank-r update can hold
    data      N = 256 inputs X (N, 224) with X^T X = N I exactly (whitened), targets teacher(X)
    students  from the base, for each budget (LoRA rank 1, 2, 4, 8, 16, 32):
              LoRA at rank r and RandLoRA at the r that rank_for_budget gives for the same number
              of trainable parameters, under each scaling convention; and full fine-tuning.
              Same data, Adam, steps; LoRA and full fine-tuning at --lr, each RandLoRA convention
              at its own lr, chosen by train loss from --lr times LR_GRID at the middle budget.

Why the floor is exact. The loss is the mean over samples of the squared output error, summed
over outputs. A layer's output error is x (DeltaW_l - DeltaW*_l)^T, and with whitened inputs

    loss = sum_l ||DeltaW_l - DeltaW*_l||_F^2      (held-out Gaussian x: the same, in expectation)

so every loss the demo prints is the fraction of the teacher's change left unlearned (1 at the start).
A rank-r update cannot go below sum_l sum_{i>r} sigma_{l,i}^2 (Eckart-Young, paper eq. 8): LoRA
sits on that floor. For a flat spectrum the floor is 1 - r/k, while rank r costs r (in + out)
parameters, so LoRA captures roughly half what a generic family with as many parameters could;
RandLoRA's update is full rank, not bound by the floor: its error stays near 1 - params / sum_l
in_l out_l, what a generic family of that size captures of a random target. The two conventions
(randlora.py's docstring: "paper", s = alpha / (r sqrt(n)), gam from 1/D, at the paper's alpha = 2r;
"peft", s = alpha / r, gam from 1/k, at PEFT's default alpha = 20r) differ in how far a step of a
given lr moves DeltaW, which the lr grid absorbs; what remains is compared. With `--decay 0.5`
the energy gathers in the top directions and LoRA wins at every budget: low rank is the right
prior for a low-rank change. The verdict is computed from the numbers, whichever way they go.

    python demo_toy.py [--quick] [--seed 0] [--plot docs/demo_toy.png] [--decay 0] [--lr 0.01]

[1] Albert et al., RandLoRA, ICLR 2025, arXiv 2502.00987, fig. 1 and sec. 4 (eq. 8).
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time

import torch
import torch.nn as nn

import randlora

SHAPES = ((64, 64), (64, 96), (96, 64))  # (in, out) of each frozen layer
NAMES = [f"layers.{i}" for i in range(len(SHAPES))]
SCALINGS = {"randlora": ("paper", 2), "randlora-peft": ("peft", 20)}  # method: scaling, alpha / r
LR_GRID = (0.1, 1.0, 10.0)  # RandLoRA's candidate lrs, times --lr


class Blocks(nn.Module):
    """Linear maps side by side: x (B, sum in) is split per layer, outputs are concatenated."""

    def __init__(self, gen: torch.Generator):
        super().__init__()
        self.layers = nn.ModuleList(nn.utils.skip_init(nn.Linear, i, o, bias=False) for i, o in SHAPES)
        with torch.no_grad():
            for layer, (i, o) in zip(self.layers, SHAPES):
                layer.weight.copy_(torch.randn(o, i, generator=gen) / math.sqrt(i))  # (out, in)

    def forward(self, x):  # (B, 224)
        xs = x.split([i for i, _ in SHAPES], dim=-1)  # (B, in_l) each
        return torch.cat([layer(xi) for layer, xi in zip(self.layers, xs)], -1)  # (B, 224)


def make_problem(seed: int, decay: float, n_train: int = 256, n_test: int = 4096):
    """Base, the teacher's change per layer, whitened training data and Gaussian held-out data."""
    gen = torch.Generator().manual_seed(seed)
    base = Blocks(gen).requires_grad_(False)
    orth = lambda n, k: torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64))[0]
    changes = []
    for i, o in SHAPES:
        k = min(i, o)
        sigma = torch.arange(1, k + 1, dtype=torch.float64) ** -decay  # (k,)
        changes.append(orth(o, k) @ torch.diag(sigma) @ orth(i, k).T)  # (out, in)
    total = sum((c**2).sum() for c in changes)
    changes = [(c / total.sqrt()).float() for c in changes]  # sum_l ||DeltaW*_l||_F^2 = 1
    teacher = copy.deepcopy(base)
    with torch.no_grad():
        for layer, c in zip(teacher.layers, changes):
            layer.weight += c
    d_in = sum(i for i, _ in SHAPES)
    q = torch.linalg.qr(torch.randn(n_train, d_in, generator=gen, dtype=torch.float64))[0]
    X = (q * math.sqrt(n_train)).float()  # (N, 224), X^T X = N I
    X_test = torch.randn(n_test, d_in, generator=gen)  # (N_test, 224)
    with torch.no_grad():
        return base, changes, (X, teacher(X)), (X_test, teacher(X_test))


def mse(model, data):
    x, y = data
    return ((model(x) - y) ** 2).sum(-1).mean()  # sum over outputs, mean over x


@torch.no_grad()
def learned_changes(model, base, method):
    """DeltaW per layer in float64: each adapter's delta_weight(), or W - W_base for full
    fine-tuning. Float64, so that float32 rounding does not blur the rank: LoRA's zero singular
    values come out near 1e-16 sigma_max, far below any that RandLoRA's update has."""
    model = copy.deepcopy(model).double()  # shared bases convert once, too
    if method == "full":
        return [m.weight - b.weight.double() for m, b in zip(model.layers, base.layers)]
    ups = randlora.adapters(model)
    return [ups[name][0].delta_weight() for name in NAMES]  # (out, in) each


def train(method, r, base, train_data, steps, lr, seed):
    """One student: patch a copy of the base, run full-batch Adam with cosine decay."""
    model = copy.deepcopy(base)
    if method == "lora":
        randlora.add_lora(model, NAMES, r=r, alpha=2 * r, seed=seed)  # the paper's alpha = 2r: s = 2
    elif method in SCALINGS:  # s = 2 / sqrt(n), gam 1/D; or 20, 1/k
        scaling, ratio = SCALINGS[method]
        randlora.add_randlora(model, NAMES, r=r, alpha=ratio * r, seed=seed, scaling=scaling)
    else:
        model.requires_grad_(True)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    curve = []
    for step in range(steps):
        loss = mse(model, train_data)
        if not torch.isfinite(loss):
            raise ValueError(f"{method} (r={r}) diverged at step {step} with lr {lr:g}; try a smaller --lr")
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        curve.append(loss.item())
    return model, curve


def student(method, budget, problem, steps, lr, seed) -> dict:
    """Train one student and measure it: params, losses, error and rank of its DeltaW."""
    base, changes, train_data, test_data = problem
    r = randlora.rank_for_budget(base, NAMES, budget) if method in SCALINGS else budget
    model, curve = train(method, r, base, train_data, steps, lr, seed)
    deltas = learned_changes(model, base, method)  # (out, in) per layer, float64
    teacher_sv = [torch.linalg.svdvals(c.double()) for c in changes]  # (k,) per layer
    spectra = [torch.linalg.svdvals(d) for d in deltas]  # (k,) per layer
    with torch.no_grad():
        return dict(
            method=method,
            budget=budget,
            r=r,
            lr=lr,
            params=randlora.trainable_parameters(model),
            train=mse(model, train_data).item(),
            heldout=mse(model, test_data).item(),
            error=sum(((d - c.double()) ** 2).sum().item() for d, c in zip(deltas, changes)),
            floor=sum((sv[budget:] ** 2).sum().item() for sv in teacher_sv) if budget else None,
            ranks=[int(torch.linalg.matrix_rank(d)) for d in deltas],  # float64 default tolerance
            ks=[min(shape) for shape in SHAPES],
            spectra=[sv.tolist() for sv in spectra],
            conditioning=min((sv[-1] / sv[0]).item() for sv in spectra),
            curve=curve,
        )


def run(
    quick: bool = False,
    seed: int = 0,
    decay: float = 0.0,
    lr: float = 1e-2,
    steps: int | None = None,
    log=None,
) -> dict:
    """Train every student; returns {"runs": [student dicts], "teacher_spectra", "settings",
    "verdict"}. A run's "floor" is the Eckart-Young error at its budget's LoRA rank (None: full).
    Each RandLoRA convention first trains at every lr of lr * LR_GRID at the middle budget
    (settings["tried"]: {method: {lr: train loss}}) and keeps the lr of the lowest train loss."""
    budgets = (1, 4, 16) if quick else (1, 2, 4, 8, 16, 32)
    steps = steps or (300 if quick else 1000)
    pick = budgets[len(budgets) // 2]  # where RandLoRA's lrs are chosen
    problem = make_problem(seed, decay)
    grid = [(m, pick, lr * f) for m in SCALINGS for f in LR_GRID]
    total, done = len(grid) + len(budgets) * (1 + len(SCALINGS)) - len(SCALINGS) + 1, {}  # picks run once
    threads, runs, tried, chosen = torch.get_num_threads(), [], {m: {} for m in SCALINGS}, {"lora": lr}

    def train_logged(method, budget, rate):
        t0 = time.perf_counter()
        x = student(method, budget, problem, steps, rate, seed)
        if log:
            log(
                f"[{len(done) + 1:2d}/{total}] {method:13s} r={x['r'] or '-':<3} {x['params']:6d} params"
                f"  lr {rate:<7.2g} train {x['train']:.4f}  ({time.perf_counter() - t0:.1f} s)"
            )
        done[method, budget, rate] = x
        return x

    torch.set_num_threads(1)  # tiny matrices: threads only add overhead
    try:
        for method, budget, rate in grid:
            try:
                tried[method][rate] = train_logged(method, budget, rate)["train"]
            except ValueError:  # diverged: this lr loses
                done[method, budget, rate] = None
                tried[method][rate] = math.inf
        for method in SCALINGS:
            chosen[method] = min(tried[method], key=tried[method].get)
            if tried[method][chosen[method]] == math.inf:
                raise ValueError(
                    f"{method} diverged at every lr of {sorted(tried[method])}; try a smaller --lr"
                )
        for budget in budgets:
            for method in ("lora", *SCALINGS):
                key = (method, budget, chosen[method])
                runs.append(done[key] if key in done else train_logged(*key))
        runs.append(train_logged("full", None, lr))
    finally:
        torch.set_num_threads(threads)
    settings = dict(
        seed=seed,
        decay=decay,
        lr=lr,
        steps=steps,
        n_train=len(problem[2][0]),
        n_test=len(problem[3][0]),
        shapes=SHAPES,
        pick=pick,
        tried=tried,
        chosen=chosen,
    )
    teacher = [torch.linalg.svdvals(c.double()).tolist() for c in problem[1]]
    results = dict(runs=runs, teacher_spectra=teacher, settings=settings)
    results["verdict"] = verdict(results)
    return results


def verdict(results) -> str:
    """Two sentences computed from the runs: how often RandLoRA beat LoRA's floor, and by how much;
    how the two scaling conventions compared, each at its chosen lr."""
    runs = results["runs"]
    lora = {x["budget"]: x for x in runs if x["method"] == "lora"}
    rand = {x["budget"]: x for x in runs if x["method"] == "randlora"}
    peft = {x["budget"]: x for x in runs if x["method"] == "randlora-peft"}
    wins = [b for b in lora if rand[b]["error"] < lora[b]["floor"]]
    wins_peft = [b for b in lora if peft[b]["error"] < lora[b]["floor"]]
    top = max(lora)
    lo, ra, full = lora[top], rand[top], next(x for x in runs if x["method"] == "full")
    gap = max(abs(x["error"] - x["floor"]) for x in lora.values())
    rank_ra = min(min(x["ranks"]) for x in [*rand.values(), *peft.values()])
    rank_lo = max(max(x["ranks"]) - x["r"] for x in lora.values())
    both = len(wins) + len(wins_peft)
    mood = (
        "Full rank paid off"
        if both == 2 * len(lora)
        else "Full rank did not pay off here"
        if not both
        else "Mixed"
    )
    diff = {b: peft[b]["error"] - rand[b]["error"] for b in lora}
    lower = [b for b in lora if diff[b] < 0]
    widest = max(diff, key=lambda b: abs(diff[b]))
    chosen = results["settings"]["chosen"]
    return (
        f"{mood}: RandLoRA went below LoRA's Eckart-Young floor at {len(wins)} of {len(lora)} "
        "equal-parameter "
        f"budgets with the paper's scaling and {len(wins_peft)} of {len(lora)} with PEFT's (at LoRA rank "
        f"{top}: {ra['error']:.4f} and {peft[top]['error']:.4f} with {ra['params']} params vs the floor "
        f"{lo['floor']:.4f}, LoRA {lo['error']:.4f} with {lo['params']}); LoRA ended within {gap:.1e} "
        f"of its floor at every rank; RandLoRA's updates had rank >= {rank_ra} of {min(ra['ks'])}, "
        f"LoRA's {'<= r' if rank_lo <= 0 else f'up to {rank_lo} above r'}; full fine-tuning reached "
        f"{full['error']:.4f} with {full['params']} params. Each at the lr its train loss chose "
        f"({chosen['randlora']:g} and {chosen['randlora-peft']:g}), PEFT's scaling ended lower than the "
        f"paper's at {len(lower)} of {len(lora)} budgets, the widest gap {diff[widest]:+.4f} at LoRA rank "
        f"{widest} ({abs(diff[widest]) / rand[widest]['error']:.1%} of the paper's error)."
    )


def table(results) -> str:
    s = results["settings"]
    spectrum = "flat (all sigma_i equal)" if s["decay"] == 0 else f"sigma_i ~ i^-{s['decay']:g}"
    tried = "; ".join(
        f"{m} " + ", ".join(f"{lr:g}: {loss:.4f}" for lr, loss in s["tried"][m].items()) for m in SCALINGS
    )
    lines = [
        f"Teacher: base + full-rank change with a {spectrum} spectrum, layers "
        + ", ".join(f"{i}->{o}" for i, o in s["shapes"])
        + f"; seed {s['seed']}.",
        f"Training: Adam with cosine decay, {s['steps']} full-batch steps on {s['n_train']} whitened inputs; "
        f"held-out: {s['n_test']} Gaussian inputs. LoRA: alpha = 2r (the paper's), lr {s['lr']:g};",
        f"randlora: the paper's scaling, alpha = 2r (s = 2 / sqrt(n), gam from 1/D), lr "
        f"{s['chosen']['randlora']:g}; randlora-peft: PEFT's, alpha = 20r (s = 20, gam from 1/k), lr "
        f"{s['chosen']['randlora-peft']:g};",
        f"each lr chosen by train loss at LoRA rank {s['pick']} from: {tried}.",
        "Losses and ||dW-dW*||^2 are fractions of the teacher's change left unlearned (1 = none learned);",
        "floor = Eckart-Young error of the best rank-r update at the budget's LoRA rank; rank dW = "
        "matrix_rank per layer (float64),",
        "s_k/s_1 = smallest ratio of last to first singular value (0: below 1e-12).",
        "",
        f"{'method':14s}{'r':>3s}{'params':>8s}{'train':>9s}{'held-out':>10s}{'||dW-dW*||^2':>14s}"
        f"{'floor':>8s}{'vs floor':>10s}{'rank dW':>9s}{'s_k/s_1':>9s}",
    ]
    for i, x in enumerate(results["runs"]):
        if i and x["method"] in ("lora", "full"):
            lines.append("")  # one group per budget
        lo, hi = min(x["ranks"]), max(x["ranks"])
        fl = "-" if x["floor"] is None else f"{x['floor']:.4f}"
        vs = "-" if x["floor"] is None else f"{round(x['error'] - x['floor'], 4) + 0.0:+.4f}"  # no -0.0000
        cond = f"{x['conditioning']:.0e}" if x["conditioning"] > 1e-12 else "0"
        lines.append(
            f"{x['method']:14s}{x['r'] or '-':>3}{x['params']:8d}{x['train']:9.4f}{x['heldout']:10.4f}"
            f"{x['error']:14.4f}{fl:>8s}{vs:>10s}{(str(lo) if lo == hi else f'{lo}-{hi}'):>9s}"
            f"{cond:>9s}"
        )
    return "\n".join(lines)


def _pyplot():
    """matplotlib.pyplot with a file-only backend, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        return plt
    except ImportError:
        return None


def plot(results, path) -> bool:
    """Error vs parameters (with LoRA's floor), loss curves, spectra of layer 0's learned DeltaW, and
    the lr choice of each RandLoRA convention; legends sit below their axes, clear of the curves."""
    plt = _pyplot()
    if plt is None:
        return False
    runs, s = results["runs"], results["settings"]
    color = {"lora": "tab:blue", "randlora": "tab:red", "randlora-peft": "tab:purple", "full": "black"}
    name = {
        "lora": "LoRA",
        "randlora": "RandLoRA, paper's scaling",
        "randlora-peft": "RandLoRA, PEFT's scaling",
        "full": "full fine-tuning",
    }
    style = {"randlora-peft": "--"}
    by = {m: [x for x in runs if x["method"] == m] for m in color}
    top, full = max(x["budget"] for x in by["lora"]), by["full"][0]
    below = dict(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
    with plt.rc_context({"font.size": 12, "axes.titlesize": 13, "legend.fontsize": 11}):
        fig, ((a, b), (c, d)) = plt.subplots(2, 2, figsize=(13, 11.5), layout="constrained")
        a.plot(
            [x["params"] for x in by["lora"]],
            [x["floor"] for x in by["lora"]],
            color="tab:blue",
            lw=8,
            alpha=0.2,
            label="Eckart-Young floor of LoRA's rank",
        )
        for m in ("lora", "randlora", "randlora-peft"):
            a.plot(
                [x["params"] for x in by[m]],
                [x["heldout"] for x in by[m]],
                "o" + style.get(m, "-"),
                color=color[m],
                label=name[m],
            )
        a.axhline(full["heldout"], color="black", ls=":", label=f"full fine-tuning ({full['params']} params)")
        a.set(
            xscale="log",
            ylim=(-0.02, 1.05),
            xlabel="trainable parameters",
            ylabel="held-out loss (lower is better)",
            title="Equal parameters (cf. paper fig. 1)",
        )
        for x in runs:  # the largest budget stands out
            bold = x["budget"] in (None, top)
            b.plot(
                range(1, len(x["curve"]) + 1),
                x["curve"],
                style.get(x["method"], "-"),
                color=color[x["method"]],
                alpha=1 if bold else 0.25,
                label=f"{name[x['method']]} ({x['params']})" if bold else None,
            )
        b.axhline(
            by["lora"][-1]["floor"], color="tab:blue", ls=":", lw=1.5, label=f"floor of LoRA rank {top}"
        )
        b.set(
            xscale="log",
            ylim=(-0.02, 1.03 * max(max(x["curve"]) for x in runs)),
            xlabel="step",
            ylabel="train loss (lower is better)",
            title="Loss curves (bold: largest budget; params)",
        )
        c.plot(
            range(1, len(results["teacher_spectra"][0]) + 1),
            results["teacher_spectra"][0],
            "k:",
            lw=2,
            label="teacher",
        )
        for m in ("lora", "randlora"):
            for i, x in enumerate(by[m]):
                sv = [max(v, 1e-8) for v in x["spectra"][0]]  # zeros drawn at 1e-8
                c.plot(
                    range(1, len(sv) + 1),
                    sv,
                    color=color[m],
                    alpha=0.3 + 0.7 * i / len(by[m]),
                    label=name[m] if x["budget"] == top else None,
                )
        sv = [max(v, 1e-8) for v in by["randlora-peft"][-1]["spectra"][0]]
        c.plot(range(1, len(sv) + 1), sv, "--", color=color["randlora-peft"], label=name["randlora-peft"])
        c.set(
            yscale="log",
            ylim=(1e-8, 1),
            xlabel="index i",
            ylabel="sigma_i of learned DeltaW (0 drawn at 1e-8)",
            title=f"Singular values, layer 0 ({SHAPES[0][0]}x{SHAPES[0][1]}); darker: larger budget",
        )
        for m in SCALINGS:
            lrs = sorted(s["tried"][m])
            d.plot(
                lrs, [s["tried"][m][lr] for lr in lrs], "o" + style.get(m, "-"), color=color[m], label=name[m]
            )
            d.plot([s["chosen"][m]], [s["tried"][m][s["chosen"][m]]], "*", ms=18, color=color[m])
        d.set(
            xscale="log",
            xlabel="Adam learning rate",
            ylabel=f"train loss at LoRA rank {s['pick']} (lower is better)",
            title="Each convention's lr, chosen by train loss (star)",
        )
        for ax in (a, b, c, d):
            ax.legend(**below)
        fig.suptitle(results["verdict"].split(" (")[0].replace(" with the paper", "\nwith the paper"))
        fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="3 budgets, 300 steps (a few seconds)")
    p.add_argument("--seed", type=int, default=0, help="seeds the base, teacher, data and adapters")
    p.add_argument("--plot", metavar="FILE.png", help="save a figure (.png, .pdf or .svg; needs matplotlib)")
    p.add_argument(
        "--decay", type=float, default=0.0, help="teacher spectrum sigma_i ~ i^-decay (default 0: flat)"
    )
    p.add_argument(
        "--lr",
        type=float,
        default=1e-2,
        help="Adam learning rate of LoRA and full fine-tuning; "
        "each RandLoRA convention picks its own from --lr times 0.1, 1, 10 (default 0.01)",
    )
    p.add_argument("--steps", type=int, help="training steps (default 1000, --quick 300)")
    args = p.parse_args(argv)
    for bad, what in (
        (args.seed < 0, "--seed must be >= 0"),
        (not 0 <= args.decay <= 4, "--decay must be in [0, 4]"),
        (not 0 < args.lr < math.inf, "--lr must be a number > 0"),
        (args.steps is not None and not 1 <= args.steps <= 10**5, "--steps must be in [1, 100000]"),
    ):
        if bad:
            p.error(what)
    if args.plot:
        folder = os.path.dirname(os.path.abspath(args.plot))
        if not os.path.isdir(folder):
            p.error(f"--plot: folder {folder!r} does not exist")
        if os.path.splitext(args.plot)[1].lower() not in (".png", ".pdf", ".svg"):
            p.error(f"--plot: file name must end in .png, .pdf or .svg, got {args.plot!r}")
        if _pyplot() is None:
            p.error("--plot needs matplotlib, which is not installed: pip install matplotlib")
    try:
        results = run(
            args.quick,
            args.seed,
            args.decay,
            args.lr,
            args.steps,
            log=lambda msg: print(msg, file=sys.stderr, flush=True),
        )
    except ValueError as e:  # divergence: a usage problem
        p.exit(1, f"{p.prog}: error: {e}\n")
    print(table(results))
    print("\nVerdict: " + results["verdict"])
    if args.plot:
        try:
            plot(results, args.plot)
        except OSError as e:
            print(f"could not write the figure {args.plot!r}: {e}", file=sys.stderr)
            return 1
        print(f"figure saved to {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
