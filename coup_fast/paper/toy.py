"""The 2-Gaussian label-flip study (Sec. 5.3.2, Fig. 3b of arXiv 2408.05900) and Proposition 2.

Data: p_0 = 1/2 N(-0.5, 1) (y = 0) + 1/2 N(0.5, 1) (y = 1) in the diffusion state x itself
(1-D, states (B, 1)).  Purification starts at x = 0.2 at t* = 0.1 and runs the engine's
guided reverse VP-SDE (`coup_fast.solver.solve`, Euler-Maruyama, dt = 1e-3) down to t = 0 with
the exact diffused score (`GaussianMixture`) and the paper's noisy classifier

    q(x) = p(y=1 | x) = p1(x) / (p0(x) + p1(x) + c n(x)),   n(x) = sin(100 x) / 100,
    p(y=0 | x) = 1 - q(x)   (binary: the two probabilities sum to one; the symmetric choice
                             p0 / (p0 + p1 + c n) would not, for c > 0).

For large c the denominator can reach 0 or turn negative, so q may leave (0, 1); q is clamped
into [tiny, 1 - tiny], tiny = max(TINY, dtype epsilon) (the guidance is then zero where the clamp
is active), and the logits (0, log q - log(1 - q)) are always finite.  The classifier's input
gradient is closed-form (`_ToyLogit`, tested against autograd); the score is `GaussianMixture`'s
in closed form (`ToyMixtureScore`, tested equal).  States are float32 by default (float64 on request).
Two flip probabilities, over the paths: P(x_0 < 0), the label of the purified point (what the
classifier sees), and P(min_t x_t < 0), the path ever crossing 0 on the grid: Prop. 1's
P_{<0} ("there exist t* in [0, 1] satisfying x_{t*} < 0"), which Sec. 5.3.2 estimates.
All grid points share one noise tensor (common random numbers): differences between cells are
then mostly the effect of (c, lam), not of the draw.  With lam = 0 the classifier is unused, so
the lam = 0 column is one solve shared by every c.
"""
from __future__ import annotations

import math
import os
import sys
import time

import torch
from torch import nn
from tqdm import tqdm

from . import CELLS_DIR, CellStore, check_out_dir, write_outputs
from ..analytic import GaussianMixture
from ..networks import EagerNetworks
from ..solver import NoiseStream, PurifyConfig, plain_drift, solve
from ..sde import ReverseGrid, euler_maruyama_step, vp_alpha, vp_gamma, vp_sigma

MEANS = (-0.5, 0.5)
STD = 1.0
X_START = 0.2
T_STAR = 0.1
DT = 1e-3
C_GRID = (0.0, 0.5, 1.0, 2.0, 5.0, 10.0)
LAM_GRID = (0.0, 0.5, 1.0, 2.0, 5.0, 10.0)
N_PATHS = 100_000
TINY = 1e-12  # clamp of q(x) into [TINY, 1 - TINY]
# Largest c and lam accepted: far beyond the paper's (c, lam <= 10), and far below float32
# overflow: the derivative of c n(x) / p1(x) reaches c * 3e26 (1/p1 is capped at 2.5 e^60), so
# c ~ 1e12 already gives inf, and c = 1e20 silently switched the guidance off.
MAX_WEIGHT = 1e6
OUTPUT_FILES = ("toy.csv", "toy.json", "toy.png")
NOISE_FREQ = 100.0  # n(x) = sin(NOISE_FREQ x) / NOISE_FREQ


class ToyMixtureScore(GaussianMixture):
    """The exact diffused score of p_0, as `GaussianMixture` computes it, in closed form.

    For two components N(±m, s^2) of equal weight the responsibilities reduce to a tanh:
    v = alpha^2 s^2 + sigma^2,  score(x, t) = -(x - alpha m tanh(alpha m x / v)) / v.
    Same numbers as `GaussianMixture.forward` (tested), a few elementwise ops instead of ~30:
    the study runs 31 solves of 100 steps on 100,000 paths on a shared CPU.
    """

    def __init__(self):
        super().__init__(torch.tensor(MEANS, dtype=torch.float64)[:, None], [STD, STD])
        if MEANS[0] != -MEANS[1]:
            raise ValueError(f"ToyMixtureScore needs symmetric means, got {MEANS}")

    def forward(self, x, t):
        if torch.is_tensor(t) and t.numel() > 1 and bool((t == t.reshape(-1)[0]).all()):
            t = t.reshape(-1)[0]  # the solve passes one time per row; here they are all equal
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        t = t.reshape(-1, *([1] * (x.ndim - 1))) if t.numel() > 1 else t
        alpha, sigma = vp_alpha(t), vp_sigma(t)
        v = alpha**2 * STD**2 + sigma**2
        am = alpha * MEANS[1]
        return (am * torch.tanh(am * x / v) - x) / v


def toy_mixture() -> GaussianMixture:
    """The data p_0: uniform mixture of N(-0.5, 1) and N(0.5, 1); exact VP-diffused score."""
    return ToyMixtureScore()


def _normal_pdf(x, mu, std=STD):
    return torch.exp(-0.5 * ((x - mu) / std) ** 2) / (std * math.sqrt(2 * math.pi))


class _ToyLogit(torch.autograd.Function):
    """L(x) = log q - log(1 - q) with q = clamp(1 / (1 + r), tiny, 1 - tiny), r = p0/p1 + c n/p1, and
    dL/dx = -r'/r in closed form (0 where the clamp is active).  The solve differentiates the
    classifier 3 million times per cell; a hand-written backward is one multiply instead of ~30 ops.
    First derivative only (the toy study runs no adjoint).
    """

    @staticmethod
    def forward(ctx, x, c: float, tiny: float):
        m, var = MEANS[1], STD**2
        ratio = torch.exp(-2.0 * m * x / var)  # p0 / p1
        r, dr = ratio, (-2.0 * m / var) * ratio
        if c != 0.0:
            # 1/p1; the exponent is capped so that far-out states give a huge finite value, not inf * 0
            inv_p1 = STD * math.sqrt(2 * math.pi) * torch.exp((0.5 * (x - m) ** 2 / var).clamp(max=60.0))
            sin, cos = torch.sin(NOISE_FREQ * x), torch.cos(NOISE_FREQ * x)
            r = r + (c / NOISE_FREQ) * sin * inv_p1
            dr = dr + c * inv_p1 * (cos + sin * (x - m) / (NOISE_FREQ * var))
        q_raw = 1.0 / (1.0 + r)
        q = q_raw.clamp(tiny, 1.0 - tiny)
        inside = (q_raw > tiny) & (q_raw < 1.0 - tiny)  # here r > 0
        ctx.save_for_backward(torch.where(inside, -dr / r, torch.zeros_like(r)))
        return torch.log(q) - torch.log1p(-q)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (dlogit,) = ctx.saved_tensors
        return grad * dlogit, None, None


class NoisyToyClassifier(nn.Module):
    """The paper's noisy 2-class classifier on [0, 1] images u of 1-D states x = 2u - 1.

    q(x) = p(y=1|x) = clamp(p1/(p0 + p1 + c n), tiny, 1 - tiny), tiny = max(TINY, machine epsilon of
    the dtype); p(y=0|x) = 1 - q.  u: (B, 1) -> logits (B, 2) = (0, log q - log(1 - q)), so
    softmax(logits) = (1 - q, q) exactly.  p_i are the class densities of the clean data.
    """

    def __init__(self, c: float, tiny: float = TINY):
        super().__init__()
        self.c, self.tiny = float(c), float(tiny)

    def prob1(self, x: torch.Tensor) -> torch.Tensor:
        """q(x) for states x (any shape): the paper's quotient, clamped into [tiny, 1 - tiny]."""
        p0, p1 = _normal_pdf(x, MEANS[0]), _normal_pdf(x, MEANS[1])
        noise = torch.sin(NOISE_FREQ * x) / NOISE_FREQ
        tiny = max(self.tiny, torch.finfo(x.dtype).eps)
        q = p1 / (p0 + p1 + self.c * noise)
        # derivative 0 where the clamp is active, bounds included, as _ToyLogit's backward (stated, not torch's pick)
        inside = (q > tiny) & (q < 1.0 - tiny)
        return torch.where(inside, q, q.detach().clamp(tiny, 1.0 - tiny))

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        x = (2.0 * u - 1.0).reshape(u.shape[0])
        # q = 1 / (1 + p0/p1 + c n/p1): the same quotient as prob1, with a closed-form derivative
        logit = _ToyLogit.apply(x, self.c, max(self.tiny, torch.finfo(x.dtype).eps))
        # (2, B) storage viewed as (B, 2): the softmax reductions over the class dim then run
        # as elementwise ops over two long rows, ~2x faster on CPU than over B pairs
        return torch.stack([torch.zeros_like(logit), logit], dim=0).t()


def exact_flip_probability(x_t: float = X_START, t: float = T_STAR) -> float:
    """P(x_0 < 0 | x_t) under the forward VP process, closed form (Bayes, per component).

    p(x_0 | x_t) ∝ p_0(x_0) N(x_t; alpha x_0, sigma^2): each Gaussian component k gives a Gaussian
    posterior N(m_k, v_k) with weight ∝ N(x_t; alpha mu_k, alpha^2 s^2 + sigma^2).  With lam = 0 and
    the exact score the reverse SDE keeps the forward marginals, so this is its flip probability.
    """
    alpha, sigma2 = vp_alpha(t), vp_sigma(t) ** 2
    logw, probs = [], []
    for mu in MEANS:
        var_k = alpha**2 * STD**2 + sigma2
        logw.append(-0.5 * (x_t - alpha * mu) ** 2 / var_k - 0.5 * math.log(var_k))
        v = 1.0 / (1.0 / STD**2 + alpha**2 / sigma2)
        m = v * (mu / STD**2 + alpha * x_t / sigma2)
        probs.append(0.5 * math.erfc(m / math.sqrt(2 * v)))  # Phi(-m / sqrt(v))
    top = max(logw)
    w = [math.exp(lw - top) for lw in logw]
    return sum(wi * pi for wi, pi in zip(w, probs)) / sum(w)


def quadrature_flip_probability(x_t: float = X_START, t: float = T_STAR, n: int = 200_001) -> float:
    """The same posterior probability by trapezoidal quadrature of p_0(x_0) N(x_t; alpha x_0, sigma^2)."""
    alpha, sigma = vp_alpha(t), vp_sigma(t)
    x0 = torch.linspace(-12.0, 12.0, n, dtype=torch.float64)
    prior = 0.5 * (_normal_pdf(x0, MEANS[0]) + _normal_pdf(x0, MEANS[1]))
    post = prior * _normal_pdf(torch.tensor(x_t, dtype=torch.float64), alpha * x0, sigma)
    mid = (n - 1) // 2  # x0[mid] = 0: integrate the negative half on its own grid
    return float(torch.trapezoid(post[: mid + 1], x0[: mid + 1]) / torch.trapezoid(post, x0))


class _PathRecorder(nn.Module):
    """Wraps the score model; with the solve's callback it keeps per-path sup ||x||, ||s||, ||lam g||
    and min x (the states are 1-D).

    lam g is recovered from the step actually taken (x_{k+1} minus sde.euler_maruyama_step without
    guidance = beta h lam g), so it is the guidance the engine applied, not a re-derivation.
    """

    def __init__(self, score_model, grid: ReverseGrid, noise: torch.Tensor):
        super().__init__()
        self.score_model, self.grid, self.noise = score_model, grid, noise
        self.x_k = self.s_k = None
        self.sup_x = self.sup_s = self.sup_g = self.min_x = None

    def forward(self, x, t):
        s = self.score_model(x, t)
        self.x_k, self.s_k = x, s
        if self.sup_x is None:
            self.sup_x = x.norm(dim=1)
            self.sup_s = s.norm(dim=1)
            self.sup_g = torch.zeros_like(self.sup_x)
            self.min_x = x[:, 0]
        else:
            self.sup_x = torch.maximum(self.sup_x, x.norm(dim=1))
            self.sup_s = torch.maximum(self.sup_s, s.norm(dim=1))
        return s

    def callback(self, info):
        k, x_next = info["k"], info["x"]
        bdt = self.grid.beta_dt(k)
        unguided = euler_maruyama_step(self.x_k, self.s_k, None, bdt, 0.0, self.noise[k])
        lam_g = (x_next - unguided) / bdt  # the step taken minus the same step without guidance
        self.sup_g = torch.maximum(self.sup_g, lam_g.norm(dim=1))
        self.sup_x = torch.maximum(self.sup_x, x_next.norm(dim=1))
        self.min_x = torch.minimum(self.min_x, x_next[:, 0])


def simulate(c: float, lam: float, noise: torch.Tensor, *, x_start: float = X_START, t_star: float = T_STAR,
             dt: float = DT) -> dict:
    """Run `noise.shape[1]` toy paths through the engine's solver (`coup_fast.solver.solve`); noise (N, B, 1) standard normals
    (their dtype is the states' dtype).

    Returns x_final (B,), x_min (B,) and per-path sups of |x|, |s| and |lam g| along the path.
    """
    grid = ReverseGrid.from_dt(t_star, dt)
    if noise.shape[0] != grid.n_steps:
        raise ValueError(f"noise: expected {grid.n_steps} steps in dim 0, got shape {tuple(noise.shape)}")
    config = PurifyConfig(grid, float(lam), "coup")
    x = torch.full((noise.shape[1], 1), x_start, dtype=noise.dtype)
    recorder = _PathRecorder(toy_mixture(), grid, noise)
    stream = NoiseStream(x, config, noise=noise)
    drift = plain_drift(EagerNetworks(recorder, NoisyToyClassifier(c)), config.lam)
    with torch.no_grad():
        out = solve(x, config, stream, drift, callback=recorder.callback)
    # lam = 0 applies no guidance; the recovered residual would be pure float round-off (~1e-3 in float32)
    sup_g = recorder.sup_g if lam != 0 else torch.zeros_like(recorder.sup_g)
    return {"x_final": out[:, 0], "x_min": recorder.min_x, "sup_x": recorder.sup_x, "sup_s": recorder.sup_s,
            "sup_g": sup_g}


def prop2_bound(t_star: float, c_s, c_p, c_x, eps_norm):
    """Right side of Eq. 8: gamma (C_s + C_p) + (e^gamma - 1) C_x + sqrt(e^{2 gamma} - 1) ||eps||."""
    g = vp_gamma(t_star)
    return g * (c_s + c_p) + math.expm1(g) * c_x + math.sqrt(math.expm1(2 * g)) * eps_norm


def wiener_eps(noise: torch.Tensor, grid: ReverseGrid) -> torch.Tensor:
    """The standardised noise displacement of each path: the `epsilon` of Eq. 8 for the discretised path.

    The noise of step k, sqrt(beta_k h) z_k, is carried to the end by the linear part of the later
    steps, P_k = prod_{j > k} (1 + beta_j h / 2) (the continuous path's e^{gamma}); so the path's noise
    displacement is sum_k P_k sqrt(beta_k h) z_k, of variance sum_k P_k^2 beta_k h (about e^{2 gamma} - 1).
    Standardised by its deviation: a standard normal per path.  noise (N, B, D) -> (B, D).
    """
    beta_dt = [grid.beta_dt(k) for k in range(grid.n_steps)]
    carry = [math.prod(1 + b / 2 for b in beta_dt[k + 1:]) for k in range(grid.n_steps)]
    w = torch.tensor([p * math.sqrt(b) for p, b in zip(carry, beta_dt)], dtype=noise.dtype)
    total = (w[:, None, None] * noise).sum(0)
    return total / math.sqrt(float((w**2).sum()))


def prop2_check(result: dict, noise: torch.Tensor, *, x_start=X_START, t_star=T_STAR, dt=DT) -> dict:
    """Proposition 2 on the simulated paths: ||r(x) - x|| <= Eq. 8 with measured sup bounds.

    C_s = 2 sup ||s||, C_p = 2 sup ||lam grad log max_y p|| (the guidance drift actually applied;
    the paper writes ||grad p|| <= C_p / 2 for this term), C_x = sup ||x||, sups over all paths
    and steps ("global"), and, tighter, over each path alone ("per path").
    """
    grid = ReverseGrid.from_dt(t_star, dt)
    eps = wiener_eps(noise, grid).norm(dim=1)
    lhs = (result["x_final"] - x_start).abs()
    sups = {"C_s": 2 * result["sup_s"], "C_p": 2 * result["sup_g"], "C_x": result["sup_x"]}
    glob = {k: float(v.max()) for k, v in sups.items()}
    bound_global = prop2_bound(t_star, glob["C_s"], glob["C_p"], glob["C_x"], eps)
    bound_path = prop2_bound(t_star, sups["C_s"], sups["C_p"], sups["C_x"], eps)
    return {
        **glob,
        "gamma": vp_gamma(t_star),
        "frac_global": float((lhs <= bound_global).double().mean()),
        "frac_per_path": float((lhs <= bound_path).double().mean()),
        "max_ratio_per_path": float((lhs / bound_path).max()),
    }


def _check_grid(name: str, values) -> tuple:
    """values as a tuple of floats in [0, MAX_WEIGHT], or a ValueError naming `name`."""
    try:
        if isinstance(values, (str, bytes)):  # "12" would otherwise pass as (1.0, 2.0)
            raise TypeError
        values = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a sequence of numbers, got {values!r}") from None
    bad = [v for v in values if not 0.0 <= v <= MAX_WEIGHT]  # NaN fails both comparisons
    if not values or bad:
        raise ValueError(f"{name}: expected a non-empty sequence of numbers in [0, {MAX_WEIGHT:g}], got {values!r}")
    return values


def run_toy(out_dir: str | None = "results/paper", *, n_paths: int = N_PATHS, c_grid=C_GRID, lam_grid=LAM_GRID,
            seed: int = 0, x_start: float = X_START, t_star: float = T_STAR, dt: float = DT,
            dtype: torch.dtype = torch.float32, progress: bool = True) -> dict:
    """Flip probabilities P(x_0 < 0) and P(min_t x_t < 0) ± Monte-Carlo SE on the c × lam grid, plus
    the Prop. 2 check.

    Writes toy.csv, toy.json and toy.png (Fig. 3b: both flip probabilities vs lam, one line per c) under
    out_dir (skipped when out_dir is None), which is checked for writing first.  Each finished cell
    is kept in out_dir/cells/ until then, and a rerun with the same settings resumes from them.
    Returns the JSON dict.
    """
    start = time.perf_counter()
    c_grid, lam_grid = _check_grid("c_grid", c_grid), _check_grid("lam_grid", lam_grid)
    if isinstance(n_paths, bool) or not isinstance(n_paths, int) or n_paths < 1:
        raise ValueError(f"n_paths: expected an integer >= 1, got {n_paths!r}")
    if out_dir is not None:
        check_out_dir(out_dir, OUTPUT_FILES)
    grid = ReverseGrid.from_dt(t_star, dt)
    setup = {"means": MEANS, "std": STD, "x_start": x_start, "t_star": t_star, "dt": dt, "n_steps": grid.n_steps,
             "n_paths": n_paths, "seed": seed, "dtype": str(dtype).replace("torch.", ""), "tiny": TINY,
             "classifier": "q = clamp(p1/(p0+p1+c sin(100x)/100)), p(y=0|x) = 1 - q"}
    store = CellStore(None if out_dir is None else os.path.join(out_dir, CELLS_DIR),
                      {"study": "toy", "setup": setup, "noise_freq": NOISE_FREQ})
    noise = None  # drawn only when a cell has to be computed (a resumed run may need none)
    rows, cache = [], {}
    cells = [(c, lam) for c in c_grid for lam in lam_grid]
    for c, lam in tqdm(cells, desc="toy (c, lam)", disable=not progress):
        key = ("any", 0.0) if lam == 0 else (c, lam)  # lam = 0 never calls the classifier
        name = "lam0" if lam == 0 else f"c{c!r}-lam{lam!r}"
        if key not in cache:
            cache[key] = store.get(name)
            if cache[key] is not None and progress:
                tqdm.write(f"toy: cell {name} already done in {store.directory}", file=sys.stderr)
        if cache[key] is None:
            if noise is None:
                gen = torch.Generator().manual_seed(seed)
                noise = torch.randn(grid.n_steps, n_paths, 1, generator=gen, dtype=torch.float64).to(dtype)
            res = simulate(c, lam, noise, x_start=x_start, t_star=t_star, dt=dt)
            cache[key] = {"flip_prob": float((res["x_final"] < 0).double().mean()),
                          "flip_ever": float((res["x_min"] < 0).double().mean()),
                          # paths thrown far out by the noisy classifier's large gradients (poles of q for big c)
                          "frac_abs_x0_gt_3": float((res["x_final"].abs() > 3).double().mean()),
                          **prop2_check(res, noise, x_start=x_start, t_star=t_star, dt=dt)}
            store.put(name, cache[key])
        cell = cache[key]
        flip, ever = cell["flip_prob"], cell["flip_ever"]
        rows.append({"c": c, "lam": lam, "flip_prob": flip, "se": math.sqrt(flip * (1 - flip) / n_paths),
                     "flip_ever": ever, "se_ever": math.sqrt(ever * (1 - ever) / n_paths),
                     "prop2_frac_global": cell["frac_global"], "prop2_frac_per_path": cell["frac_per_path"],
                     "C_s": cell["C_s"], "C_p": cell["C_p"], "C_x": cell["C_x"],
                     "frac_abs_x0_gt_3": cell["frac_abs_x0_gt_3"]})
    result = {
        "setup": setup,
        "exact_flip_lam0_c0": exact_flip_probability(x_start, t_star),
        "quadrature_flip_lam0_c0": quadrature_flip_probability(x_start, t_star),
        "rows": rows,
        "prop2": {"gamma": vp_gamma(t_star),
                  "min_frac_global": min(r["prop2_frac_global"] for r in rows),
                  "min_frac_per_path": min(r["prop2_frac_per_path"] for r in rows),
                  "max_ratio_per_path": max(cell["max_ratio_per_path"] for cell in cache.values())},
        "seconds": time.perf_counter() - start,
    }
    if out_dir is not None:
        write_toy(result, out_dir)
        store.clear()
    return result


def toy_table(result: dict, which: str = "flip_prob") -> str:
    """Markdown table c × lam with 'flip ± SE': which = 'flip_prob' (P(x_0 < 0)) or 'flip_ever'."""
    rows = result["rows"]
    se = {"flip_prob": "se", "flip_ever": "se_ever"}[which]
    cs = sorted({r["c"] for r in rows})
    lams = sorted({r["lam"] for r in rows})
    cell = {(r["c"], r["lam"]): r for r in rows}
    lines = ["| c \\ lam | " + " | ".join(f"{lam:g}" for lam in lams) + " |", "|---" * (len(lams) + 1) + "|"]
    for c in cs:
        vals = [f"{cell[c, lam][which]:.4f} ± {cell[c, lam][se]:.4f}" for lam in lams]
        lines.append(f"| {c:g} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def write_toy(result: dict, out_dir: str) -> dict:
    """toy.csv (one row per cell), toy.json (everything), toy.png (Fig. 3b); returns their paths."""
    return write_outputs(result, out_dir, "toy", plot_toy)


def plot_toy(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.4))
    panels = ((axes[0], "flip_prob", "se", "label flip P(x_0 < 0) (purified point)"),
              (axes[1], "flip_ever", "se_ever", "label flip P(min_t x_t < 0) (Prop. 1)"))
    for ax, key, se, ylabel in panels:
        for c in sorted({r["c"] for r in result["rows"]}):
            rows = sorted((r for r in result["rows"] if r["c"] == c), key=lambda r: r["lam"])
            ax.errorbar([r["lam"] for r in rows], [r[key] for r in rows], yerr=[2 * r[se] for r in rows],
                        marker="o", ms=3, capsize=2, label=f"c = {c:g}")
        ax.set_xlabel("guidance weight lam")
        ax.set_ylabel(ylabel)
        ax.set_title(f"2-Gaussian toy, x(t*={result['setup']['t_star']:g}) = {result['setup']['x_start']:g}; "
                     "bars: ± 2 SE", fontsize=9)
    axes[0].axhline(result["exact_flip_lam0_c0"], color="k", ls=":", lw=1, label="exact, lam = 0")
    for ax in axes:  # each panel its own legend: the lines are the same c, their values differ
        ax.legend(fontsize=8, title="classifier noise c", title_fontsize=8)
    fig.suptitle("c: weight of the classifier's noise, p(y=1|x) = p1 / (p0 + p1 + c sin(100 x)/100) "
                 "(c = 0: the Bayes classifier)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")  # path may be a temporary name
    plt.close(fig)
