"""
diffusion_toy.py: DDPM and DDIM on a 1-D Gaussian, every sampler's variance beside its closed form.

Homework 13 (../shared/seeds/001_9900e8a2a2b26192.txt), problem 1 (a-h) and problem 4. Read top to bottom:
  1. the variance-exploding (VE) toy of problem 1: X_0 ~ N(0, sigma^2), X_t = X_0 + sqrt(t) Z, t in [0, 1];
     the reverse samplers (d), (e), (f-h) written once in the denoiser form of 1(f), the exact finite-T
     variance of each (one linear-Gaussian recursion), and the homework's dt -> 0 limits
  2. the learned denoiser of 1(f): an MLP f(x_t, t) trained with AdamW to predict x_0, its slope in x_t,
     and the same samplers run with it
  3. the variance-preserving (VP) process of problem 4: beta schedule, alpha_bar, q(x_t | x_0),
     the posterior q(x_{t-1} | x_t, x_0), ancestral DDPM and DDIM
  4. beyond the homework: two moons in 2-D, learned and scored with the sliced Wasserstein distance
  5. main: one table, theory beside measurement, and diffusion_metrics.json

The key fact: with the Gaussian oracle denoiser every step here maps x to a x + b z (z ~ N(0, 1)), so
the variance after each step is exactly a^2 Var + b^2. Iterating that recursion gives the finite-T
variance that a Monte-Carlo run must reproduce; the homework's integrals are its dt -> 0 limits.

Starting distribution. Problem 1 starts the reverse process at X_1 ~ N(0, 1), but the forward process
ends at N(0, 1 + sigma^2) (part a); the homework's closed forms use the former. Every VE sampler is
reported from both starts: N(0, 1 + sigma^2) is the exact marginal, and from it DDPM with the exact
reverse variance reproduces sigma^2 exactly at every T.
"""
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from train import (TrainConfig, UserError, arg, check_seed, claim_out_dir, parse_args, print_table, run_main,
                   step_generator, train, write_metrics)

MC_TOL = 4.0  # Monte-Carlo checks pass within this many standard errors


@dataclass
class DiffusionConfig:
    sigma2: float = arg(0.01, "variance sigma^2 of the 1-D target N(0, sigma^2) (problem 1: sigma^2 << 1)")
    T_list: str = arg("10,100,1000,10000", "step counts T = 1/dt of the exact variance recursions; the last "
                      "two (both >= 10/sigma2) give the observed order of convergence to the dt -> 0 limit")
    mc_T: int = arg(100, "T of the Monte-Carlo runs checked against the exact recursion")
    n_mc: int = arg(100_000, "Monte-Carlo samples per sampler and starting distribution")
    steps: int = arg(3000, "AdamW steps for the 1-D learned denoiser (problem 1f)")
    hidden: int = arg(64, "hidden width of the 1-D denoiser MLP")
    n_data: int = arg(100_000, "training samples s_1..s_n of the 1-D target")
    slope_ts: str = arg("0.1,0.3,1.0", "times t at which the learned slope is compared with sigma^2/(sigma^2+t)")
    learned_T: int = arg(20, "steps of DDPM / DDIM run with the learned 1-D denoiser (with T=20 every step has "
                         "t >= 0.05, where the net is accurate; more steps reach small t, where it is less so)")
    n_learned: int = arg(20_000, "samples drawn with the learned 1-D denoiser")
    learned_tol: float = arg(0.15, "relative tolerance of the learned samplers' variance")
    batch_size: int = arg(512, "training batch (half of it noise-antithetic copies, see train_denoiser)")
    lr: float = arg(1e-2, "peak AdamW learning rate of both denoisers")
    vp_T: int = arg(1000, "steps of the variance-preserving process (problem 4)")
    vp_schedule: str = arg("linear", "beta schedule: linear (Ho et al. 2020) | cosine (Nichol & Dhariwal 2021)")
    beta_1: float = arg(1e-4, "first beta of the linear schedule")
    beta_T: float = arg(0.02, "last beta of the linear schedule")
    vp_data_var: float = arg(0.25, "variance of the Gaussian target of the VP samplers")
    posterior_t: int = arg(10, "step t at which the VP posterior q(x_{t-1} | x_t, x_0) is checked")
    moons_steps: int = arg(2000, "AdamW steps for the 2-D two-moons denoiser")
    moons_hidden: int = arg(128, "hidden width of the 2-D denoiser MLP")
    moons_scale: float = arg(0.5, "standard deviation of each coordinate of the two-moons data")
    moons_T: int = arg(100, "sampling steps for the two-moons model")
    n_eval: int = arg(2000, "samples scored against held-out data in 2-D")
    seed: int = arg(0, "random seed")
    plot: bool = arg(False, "save out_dir/diffusion_moons.png (needs matplotlib, not a dependency)")
    out_dir: str = arg("out", "where diffusion_metrics.json (and the plot) go")

    def __post_init__(self):
        for name in ("steps", "hidden", "n_data", "learned_T", "vp_T", "moons_steps", "moons_hidden", "moons_T"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name} must be a positive integer, got {getattr(self, name)}")
        if self.mc_T < 4 or self.batch_size < 2:
            raise UserError(f"need --mc_T >= 4 (1(c) is checked at t = 1/2) and --batch_size >= 2 (it holds "
                            f"antithetic pairs), got {self.mc_T} and {self.batch_size}")
        if not 0 < self.sigma2 < 1:
            raise UserError(f"--sigma2 must be in (0, 1) (problem 1 assumes sigma^2 << 1), got {self.sigma2}")
        if min(self.n_mc, self.n_learned, self.n_eval) < 100:
            raise UserError("--n_mc, --n_learned and --n_eval must be at least 100 for the Monte-Carlo errors to "
                            "mean anything")
        too_many = [name for name in ("n_mc", "n_learned", "n_data", "n_eval") if getattr(self, name) > 10 ** 8]
        if too_many:  # a sampler holds several float64 arrays of n_mc values: 10^8 of them are gigabytes already
            raise UserError(f"--{too_many[0]} must be at most 10^8: each sample count sizes arrays held in memory "
                            f"at once, got {getattr(self, too_many[0])}")
        check_seed(self.seed)
        try:
            Ts, ts = self.Ts, self.ts
        except ValueError:
            raise UserError(f"--T_list and --slope_ts are comma-separated numbers, got {self.T_list!r}, "
                            f"{self.slope_ts!r}") from None
        if len(Ts) < 2 or min(Ts) < 1 or Ts != sorted(set(Ts)):
            raise UserError(f"--T_list needs two or more increasing positive step counts, got {self.T_list!r}")
        if Ts[-2] < 10 / self.sigma2:
            raise UserError(f"the order of convergence is read off the last two T in --T_list, and the dt -> 0 "
                            f"limits assume dt << sigma^2: both must be at least 10/sigma2 = "
                            f"{math.ceil(10 / self.sigma2)}; raise them or --sigma2")
        if not ts or not all(0 < t <= 1 for t in ts):
            raise UserError(f"--slope_ts must be times in (0, 1], got {self.slope_ts!r}")
        if self.vp_schedule not in ("linear", "cosine"):
            raise UserError(f"--vp_schedule must be linear or cosine, got {self.vp_schedule!r}")
        if not 0 < self.beta_1 <= self.beta_T < 1:
            raise UserError(f"need 0 < beta_1 <= beta_T < 1, got {self.beta_1}, {self.beta_T}")
        if not 2 <= self.posterior_t <= self.vp_T:
            raise UserError(f"--posterior_t must be in [2, vp_T={self.vp_T}], got {self.posterior_t}")
        if self.vp_data_var <= 0 or self.moons_scale <= 0 or self.lr <= 0 or self.learned_tol <= 0:
            raise UserError("--vp_data_var, --moons_scale, --lr and --learned_tol must be positive")

    @property
    def Ts(self):
        return [int(v) for v in self.T_list.split(",")]

    @property
    def ts(self):
        return [float(v) for v in self.slope_ts.split(",")]


# ----------------------------------------------------------------------------------------------
# Shared machinery: a reverse sampler is a list of times and step(x, t) -> (mean, std) of the next x.
# Each section below returns table rows (key, name, theory, measured, ok, check).

def run_sampler(step, times, x, noise):
    """Monte Carlo: x <- mean + std * z at every time, z from noise(shape). Works on numpy and torch."""
    for t in times:
        mean, std = step(x, t)
        x = mean + std * noise(x.shape) if std > 0 else mean
    return x


def step_coefficients(step, times):
    """[(a, b)] of a step that is linear-Gaussian, x -> a x + b z: its mean is linear in x (the oracle
    denoiser is), so a is the mean at x = 1, and b is the std (which does not depend on x)."""
    return [step(1.0, t) for t in times]


def variance_recursion(coefficients, var_start):
    """Exact variance after the steps x <- a x + b z with independent z ~ N(0, 1): Var <- a^2 Var + b^2."""
    var = var_start
    for a, b in coefficients:
        var = a * a * var + b * b
    return var


def regress(y, X):
    """Least squares y ~ X c (numpy; y: (n,), X: (n, p)). Returns c, the standard errors of c, and the
    residual variance: the conditional mean and variance of y given X when (y, X) is jointly Gaussian."""
    c, *_ = np.linalg.lstsq(X, y, rcond=None)
    resid_var = np.mean((y - X @ c) ** 2)
    se = np.sqrt(np.diag(np.linalg.inv(X.T @ X)) * resid_var)
    return c, se, resid_var


def var_se(var, n):
    """Standard error of the sample variance of n Gaussian samples whose variance is var."""
    return var * math.sqrt(2 / (n - 1))


# ----------------------------------------------------------------------------------------------
# 1. The variance-exploding toy of problem 1

VE_SAMPLERS = {"mean": "1(d) cond. mean only",
               "ddpm": "1(e) DDPM, N(0,dt) noise",
               "ddpm_exact": "1(e) DDPM, exact var 1(c)",
               "ddim": "1(h) DDIM, eta(t,dt)"}
STARTS = {"N(0,1)": lambda s2: 1.0, "N(0,1+s2)": lambda s2: 1.0 + s2}  # Var of X_1 the sampler starts from


def ve_oracle(x, t, s2):
    """1(f): the ideal denoiser g(x_t, t) = E[X_0 | X_t = x_t] = sigma^2 / (sigma^2 + t) x_t."""
    return s2 / (s2 + t) * x


def ve_times(T):
    """The reverse time grid t = 1, 1 - dt, ..., dt (each step goes from t to t - dt, dt = 1/T)."""
    return [k / T for k in range(T, 0, -1)]


def ve_step(sampler, x, t, dt, x0_hat, s2):
    """One reverse step t -> t - dt of problem 1, given the denoiser output x0_hat = g(x_t, t).
    Returns (mean, std) of x_{t-dt}. With the oracle the DDPM mean (1 - dt/(s2+t)) x_t is 1(c)'s
    conditional mean (s2+t-dt)/(s2+t) x_t. s2 is used only by 'ddpm_exact' (an oracle-only sampler)."""
    ddpm_step = dt / t * (x0_hat - x)                     # 1(f): a dt/t step toward x0_hat
    if sampler == "ddim":
        # 1(f): a shorter step and no noise. eta dt = t - sqrt(t (t-dt)), so this is exactly DDIM's
        # x0_hat + sqrt((t-dt)/t) (x_t - x0_hat) (Song et al. 2021, eta = 0); at t = dt it returns x0_hat.
        eta = math.sqrt(t) / (math.sqrt(t - dt) + math.sqrt(t))
        return x + eta * ddpm_step, 0.0
    if sampler == "mean":                                      # 1(d): conditional mean only
        return x + ddpm_step, 0.0
    if sampler == "ddpm":                                      # 1(e): N(0, dt) noise
        return x + ddpm_step, math.sqrt(dt)
    return x + ddpm_step, math.sqrt((s2 + t - dt) * dt / (s2 + t))   # 1(c): Var(X_{t-dt} | X_t), exactly


def ve_oracle_step(sampler, T, s2):
    """step(x, t) of a VE sampler with the oracle denoiser and T steps."""
    return lambda x, t: ve_step(sampler, x, t, 1 / T, ve_oracle(x, t, s2), s2)


def ve_exact_variance(sampler, T, s2, var_start):
    """Var(X_0_hat) after T steps from X_1 ~ N(0, var_start), exactly (the linear-Gaussian recursion)."""
    return variance_recursion(step_coefficients(ve_oracle_step(sampler, T, s2), ve_times(T)), var_start)


def ve_limit(sampler, s2, var_start):
    """The homework's dt -> 0 closed forms, for X_1 ~ N(0, var_start).
    With var_start = 1:      (d) (s2/(s2+1))^2,   (e) s2 - s2^3/(s2+1)^2,   (h) s2/(s2+1).
    With var_start = 1 + s2: (d) s2^2/(s2+1),     (e) s2,                   (h) s2."""
    shrink = s2 / (s2 + 1)                # 1(d): the telescoping product of (s2+t-dt)/(s2+t)
    if sampler == "mean":
        return shrink ** 2 * var_start
    if sampler == "ddim":                 # 1(h): exp(-int_0^1 dt/(s2+t)) = s2/(s2+1) multiplies the variance
        return shrink * var_start
    # 1(e): the first term of eq. (1) plus int_0^1 (s2/(s2+t))^2 dt = s2 - s2^2/(s2+1); the exact
    # reverse variance (s2+t-dt) dt/(s2+t) = dt (1 - O(dt)) has the same limit
    return shrink ** 2 * var_start + s2 - s2 ** 2 / (s2 + 1)


def ve_forward(s2, T, n, rng):
    """1(a)-(b): X_0 ~ N(0, s2) plus T independent N(0, dt) increments. Returns X_1 and the pair
    (X_{1/2 - dt}, X_{1/2}) for the conditional of 1(c)."""
    x = rng.normal(0.0, math.sqrt(s2), n)
    half = {}
    for k in range(1, T + 1):
        x = x + math.sqrt(1 / T) * rng.standard_normal(n)
        if k in (T // 2 - 1, T // 2):
            half[k] = x
    return x, half[T // 2 - 1], half[T // 2]


def ve_rows(cfg, rng):
    s2, T, n = cfg.sigma2, cfg.mc_T, cfg.n_mc
    rows = []
    x1, x_prev, x_half = ve_forward(s2, T, n, rng)
    rows.append(("ve_forward_var_x1", f"1(a) Var X_1, forward, T={T}", 1 + s2, x1.var(),
                 abs(x1.var() - 1 - s2) < MC_TOL * var_se(1 + s2, n), "forward MC"))
    t, dt = (T // 2) / T, 1 / T
    (slope,), (slope_se,), resid = regress(x_prev, x_half[:, None])
    rows.append(("ve_cond_mean_slope", f"1(c) E[X_(t-dt)|X_t] slope, t={t:g}", (s2 + t - dt) / (s2 + t), slope,
                 abs(slope - (s2 + t - dt) / (s2 + t)) < MC_TOL * slope_se, "regression on forward samples"))
    cond_var = (s2 + t - dt) * dt / (s2 + t)
    rows.append(("ve_cond_var", f"1(c) Var(X_(t-dt)|X_t), t={t:g}", cond_var, resid,
                 abs(resid - cond_var) < MC_TOL * var_se(cond_var, n), f"residual; approx dt = {dt:g}"))
    for sampler, label in VE_SAMPLERS.items():
        step = ve_oracle_step(sampler, T, s2)
        for start, start_var in STARTS.items():
            v1 = start_var(s2)
            exact = ve_exact_variance(sampler, T, s2, v1)
            x0 = run_sampler(step, ve_times(T), rng.normal(0.0, math.sqrt(v1), n), rng.standard_normal)
            rows.append((f"ve_{sampler}_from_{start}_T{T}", f"{label}, X_1~{start}, T={T}", exact, x0.var(),
                         abs(x0.var() - exact) < MC_TOL * var_se(exact, n), "exact recursion vs MC"))
            # convergence to the dt -> 0 limit over T_list: the gap should shrink like dt. (d) and the
            # exact-variance DDPM have no gap at all; DDIM's gap carries a log(sigma^2/dt) factor (its steps near
            # t = 0 lose the most), so its observed order approaches 1 from below, slowly.
            limit = ve_limit(sampler, s2, v1)
            gaps = [ve_exact_variance(sampler, T_, s2, v1) - limit for T_ in cfg.Ts]
            note = f"measured: exact recursion, T={cfg.Ts[-1]}; "
            if all(abs(g) < 1e-9 * limit for g in gaps):
                ok = True
                note += "no gap at any T in T_list"
            else:
                order = math.log(abs(gaps[-2] / gaps[-1])) / math.log(cfg.Ts[-1] / cfg.Ts[-2])
                ok = 0.75 <= order <= 1.25
                note += f"gaps at T={cfg.T_list}: " + " ".join(f"{g:+.1e}" for g in gaps) + f"; order {order:.2f}"
            rows.append((f"ve_{sampler}_from_{start}_limit", f"{label}, X_1~{start}, limit",
                         limit, limit + gaps[-1], ok, note))
    return rows


# ----------------------------------------------------------------------------------------------
# 2. The learned denoiser of 1(f)

class Denoiser(nn.Module):
    """f(x_t, t) ~ E[X_0 | X_t = x_t] for X_t = X_0 + sqrt(t) Z: an MLP on (x_t / sqrt(s_d^2 + t), log(t)/4, t)
    whose output is multiplied by s_d, the data's standard deviation. Both scalings keep the network's
    inputs and outputs O(1) at every t (1(f): "scalings ... are also acceptable and practically useful")."""

    def __init__(self, dim, hidden, data_std):
        super().__init__()
        self.data_std = data_std
        self.net = nn.Sequential(nn.Linear(dim + 2, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, dim))

    def forward(self, x, t):  # x: (N, dim), t: float or (N, 1) -> (N, dim)
        t = t if torch.is_tensor(t) else torch.full((x.shape[0], 1), float(t))
        features = torch.cat([x / torch.sqrt(self.data_std ** 2 + t), torch.log(t) / 4, t], dim=1)
        return self.data_std * self.net(features)


def train_denoiser(data, hidden, steps, cfg, desc):
    """1(f): a batch is t_i ~ U(0, 1], a random training point s_(l_i), and the input s_(l_i) + sqrt(t_i) z_i;
    the loss is the squared error of predicting s_(l_i); AdamW via train.py's training loop.
    Each (s, t) is used twice, with z and -z (antithetic noise): the cross terms s z cancel in the gradient
    (exactly, for a denoiser linear in x_t), which matters at large t, where the signal is tiny (the slope
    sigma^2/(sigma^2+t) is 0.01 at t = 1 for sigma^2 = 0.01) and the noise is not.
    data: (n, dim) float32 tensor."""
    model = Denoiser(data.shape[1], hidden, data.std().item())
    half = cfg.batch_size // 2

    def get_batch(i):  # a pure function of the step, as train() asks
        g = step_generator(cfg.seed, i)
        s = data[torch.randint(0, len(data), (half,), generator=g)]    # (half, dim)
        t = 1 - torch.rand(half, 1, generator=g)                       # (half, 1), in (0, 1]
        z = torch.randn(s.shape, generator=g)
        return torch.cat([s, s]), torch.cat([t, t]), torch.cat([z, -z])

    def loss_fn(net, batch):
        s, t, z = batch
        return ((net(s + t.sqrt() * z, t) - s) ** 2).mean(), {"samples": len(s)}

    tcfg = TrainConfig(max_steps=steps, batch_size=cfg.batch_size, lr=cfg.lr, min_lr=0.0, warmup_steps=50,
                       weight_decay=0.0, eval_interval=steps, device="cpu", compile="off", seed=cfg.seed)
    train(model, tcfg, get_batch, loss_fn, desc=desc, unit="samples")
    return model.eval()


def learned_step(sampler, T, model):
    """step(x, t) of a VE sampler driven by a learned denoiser (torch, no gradients)."""
    def step(x, t):
        with torch.no_grad():
            return ve_step(sampler, x, t, 1 / T, model(x, t), s2=None)
    return step


def learned_rows(cfg, rng):
    s2, n = cfg.sigma2, cfg.n_mc
    data = torch.tensor(rng.normal(0.0, math.sqrt(s2), (cfg.n_data, 1)), dtype=torch.float32)
    model = train_denoiser(data, cfg.hidden, cfg.steps, cfg, desc="1-D denoiser")
    rows = []
    for t in cfg.ts:  # the slope of f(x, t) in x, fitted where X_t lives: x ~ N(0, s2 + t)
        x = rng.normal(0.0, math.sqrt(s2 + t), n)
        with torch.no_grad():
            f = model(torch.tensor(x[:, None], dtype=torch.float32), t)[:, 0].double().numpy()
        (slope,), _, _ = regress(f, x[:, None])
        theory = s2 / (s2 + t)
        rows.append((f"learned_slope_t{t:g}", f"1(f) learned slope in x_t, t={t:g}", theory, slope,
                     abs(slope / theory - 1) <= 0.10, "within 10% of s2/(s2+t)"))
    T, v1 = cfg.learned_T, 1 + s2
    gen = torch.Generator().manual_seed(cfg.seed)
    noise = lambda shape: torch.randn(shape, generator=gen)
    for sampler in ("ddpm", "ddim"):
        x1 = torch.tensor(rng.normal(0.0, math.sqrt(v1), (cfg.n_learned, 1)), dtype=torch.float32)
        var = run_sampler(learned_step(sampler, T, model), ve_times(T), x1, noise).var().item()
        exact = ve_exact_variance(sampler, T, s2, v1)
        rows.append((f"learned_{sampler}_T{T}", f"{VE_SAMPLERS[sampler]}, learned, T={T}", exact, var,
                     abs(var / exact - 1) <= cfg.learned_tol,
                     f"X_1~N(0,1+s2); theory: oracle at same T; tol {cfg.learned_tol:.0%}"))
    return rows


# ----------------------------------------------------------------------------------------------
# 3. The variance-preserving process of problem 4 (time steps t = 1..T; x_0 is the data)

def vp_schedule(cfg):
    """beta_1..beta_T (array index t-1) and alpha_bar_0..alpha_bar_T with alpha_bar_0 = 1.
    4(a): alpha_bar_t = prod_{i <= t} (1 - beta_i) (the homework calls it alpha_t)."""
    T = cfg.vp_T
    if cfg.vp_schedule == "linear":
        beta = np.linspace(cfg.beta_1, cfg.beta_T, T)
    else:  # cosine: alpha_bar(t) = f(t) / f(0), f(t) = cos^2(pi/2 (t/T + s) / (1 + s)), s = 0.008, beta <= 0.999
        f = np.cos(np.pi / 2 * (np.arange(T + 1) / T + 0.008) / 1.008) ** 2
        beta = np.minimum(1 - f[1:] / f[:-1], 0.999)
    return beta, np.concatenate([[1.0], np.cumprod(1 - beta)])


def vp_posterior(t, beta, alpha_bar):
    """4(b): q(x_{t-1} | x_t, x_0) = N(c_t x_t + c_0 x_0, beta_hat_t). Returns (c_t, c_0, beta_hat_t)."""
    b, ab, ab_prev = beta[t - 1], alpha_bar[t], alpha_bar[t - 1]
    return (math.sqrt(1 - b) * (1 - ab_prev) / (1 - ab),    # c_t
            b * math.sqrt(ab_prev) / (1 - ab),               # c_0
            (1 - ab_prev) / (1 - ab) * b)                    # beta_hat_t


def vp_oracle(x, t, alpha_bar, v):
    """E[x_0 | x_t] = Cov(x_0, x_t) / Var(x_t) x_t for the target x_0 ~ N(0, v), where
    x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps (4(a))."""
    ab = alpha_bar[t]
    return math.sqrt(ab) * v / (ab * v + 1 - ab) * x


def vp_step(sampler, x, t, x0_hat, beta, alpha_bar):
    """One reverse step t -> t-1 given x0_hat; returns (mean, std) of x_{t-1}.
    ddpm: ancestral, x_{t-1} ~ q(x_{t-1} | x_t, x_0 = x0_hat) of 4(b).
    ddim: (eta = 0) x0_hat re-noised to level t-1 with the noise eps_hat that x_t implies, no fresh noise;
    the VP twin of 1(f)'s x0_hat + sqrt((t-dt)/t) (x_t - x0_hat)."""
    if sampler == "ddpm":
        c_t, c_0, beta_hat = vp_posterior(t, beta, alpha_bar)
        return c_t * x + c_0 * x0_hat, math.sqrt(beta_hat)
    eps_hat = (x - math.sqrt(alpha_bar[t]) * x0_hat) / math.sqrt(1 - alpha_bar[t])
    return math.sqrt(alpha_bar[t - 1]) * x0_hat + math.sqrt(1 - alpha_bar[t - 1]) * eps_hat, 0.0


def vp_rows(cfg, rng):
    beta, ab = vp_schedule(cfg)
    T, n, v = cfg.vp_T, cfg.n_mc, cfg.vp_data_var
    rows = []
    # 4(a): run the chain of eq. (2) step by step from x_0 = 1; compare with the one-shot q(x_t | x_0)
    x, kept = np.ones(n), {}
    for t in range(1, T + 1):
        x = math.sqrt(1 - beta[t - 1]) * x + math.sqrt(beta[t - 1]) * rng.standard_normal(n)
        if t in (T // 2, T):
            kept[t] = x
    for t in (T // 2, T):
        mean, var = math.sqrt(ab[t]), 1 - ab[t]
        rows.append((f"vp_q_mean_t{t}", f"4(a) E q(x_t|x_0=1) = sqrt(abar_t), t={t}", mean, kept[t].mean(),
                     abs(kept[t].mean() - mean) < MC_TOL * math.sqrt(var / n), f"{T}-step chain (2), MC"))
        rows.append((f"vp_q_var_t{t}", f"4(a) Var q(x_t|x_0) = 1-abar_t, t={t}", var, kept[t].var(),
                     abs(kept[t].var() - var) < MC_TOL * var_se(var, n),
                     f"abar_T = {ab[T]:.3g} (terminal SNR)" if t == T else f"{T}-step chain (2), MC"))
    # 4(b): sample (x_0, x_{t-1}, x_t) forward and regress x_{t-1} on (x_t, x_0): for jointly Gaussian
    # variables the regression is the conditional mean and its residual variance the conditional variance
    t = cfg.posterior_t
    x0 = rng.normal(0.0, math.sqrt(v), n)
    x_prev = math.sqrt(ab[t - 1]) * x0 + math.sqrt(1 - ab[t - 1]) * rng.standard_normal(n)   # 4(a)
    x_t = math.sqrt(1 - beta[t - 1]) * x_prev + math.sqrt(beta[t - 1]) * rng.standard_normal(n)  # eq. (2)
    coef, se, resid = regress(x_prev, np.stack([x_t, x0], axis=1))
    c_t, c_0, beta_hat = vp_posterior(t, beta, ab)
    for key, label, theory, measured, tol in (("c_t", "coef of x_t", c_t, coef[0], se[0]),
                                             ("c_0", "coef of x_0", c_0, coef[1], se[1]),
                                             ("var", "var beta_hat", beta_hat, resid, var_se(beta_hat, n))):
        rows.append((f"vp_posterior_{key}_t{t}", f"4(b) q(x_(t-1)|x_t,x_0) {label}, t={t}", theory, measured,
                     abs(measured - theory) < MC_TOL * tol, "regression on forward samples"))
    # ancestral DDPM and DDIM from x_T ~ N(0, 1) with the oracle denoiser, on the target N(0, v)
    times = range(T, 0, -1)
    for sampler in ("ddpm", "ddim"):
        step = lambda x, t: vp_step(sampler, x, t, vp_oracle(x, t, ab, v), beta, ab)
        exact = variance_recursion(step_coefficients(step, times), 1.0)
        x0 = run_sampler(step, times, rng.standard_normal(n), rng.standard_normal)
        label = "4 ancestral DDPM, 4(b) noise" if sampler == "ddpm" else "4 DDIM (eta=0)"
        rows.append((f"vp_{sampler}_oracle", f"{label}, oracle, x_T~N(0,1), T={T}", exact, x0.var(),
                     abs(x0.var() - exact) < MC_TOL * var_se(exact, n),
                     f"exact recursion vs MC; target {v:g}, gap {exact - v:+.1e}"))
    return rows


# ----------------------------------------------------------------------------------------------
# 4. Beyond the homework: two moons in 2-D

def two_moons(n, rng, noise=0.05):
    """Two interleaved half circles of radius 1 plus N(0, noise^2) jitter: (n, 2)."""
    angle, upper = rng.uniform(0, np.pi, n), rng.random(n) < 0.5
    x = np.where(upper, np.cos(angle), 1 - np.cos(angle))
    y = np.where(upper, np.sin(angle), 0.5 - np.sin(angle))
    return np.stack([x, y], axis=1) + noise * rng.standard_normal((n, 2))


def sliced_w2(a, b, directions):
    """Sliced Wasserstein-2 distance of two equal-size samples a, b: (n, 2) along directions (2, P): in 1-D
    the optimal coupling pairs sorted values, so W2^2 is the mean squared gap of the sorted projections."""
    pa, pb = np.sort(a @ directions, axis=0), np.sort(b @ directions, axis=0)   # (n, P)
    return float(np.sqrt(np.mean((pa - pb) ** 2)))


def moons_rows(cfg, rng):
    n = cfg.n_eval
    raw = two_moons(cfg.n_data + 2 * n, rng)
    data = (raw - raw.mean(0)) / raw.std(0) * cfg.moons_scale       # each coordinate: mean 0, std moons_scale
    train_x, held, held2 = data[:cfg.n_data], data[cfg.n_data:-n], data[-n:]
    model = train_denoiser(torch.tensor(train_x, dtype=torch.float32), cfg.moons_hidden, cfg.moons_steps, cfg,
                           desc="2-D denoiser")
    directions = rng.standard_normal((2, 256))
    directions /= np.linalg.norm(directions, axis=0)
    floor = sliced_w2(held, held2, directions)                        # data vs data: the noise floor
    gauss = rng.multivariate_normal(train_x.mean(0), np.cov(train_x.T), n)   # baseline: a fitted Gaussian
    gauss_w2 = sliced_w2(gauss, held, directions)
    gen = torch.Generator().manual_seed(cfg.seed)
    noise = lambda shape: torch.randn(shape, generator=gen)
    panels, rows = {"held-out data": held, "Gaussian fit": gauss}, []
    for sampler in ("ddpm", "ddim"):
        x1 = torch.randn((n, 2), generator=gen) * math.sqrt(1 + cfg.moons_scale ** 2)   # X_1 ~ N(0, 1 + sd^2)
        x0 = run_sampler(learned_step(sampler, cfg.moons_T, model), ve_times(cfg.moons_T), x1, noise).numpy()
        panels[f"{sampler.upper()}, T={cfg.moons_T}"] = x0
        w2 = sliced_w2(x0, held, directions)
        rows.append((f"moons_{sampler}", f"2-D moons {sampler.upper()} T={cfg.moons_T}: sliced W2", floor, w2,
                     w2 < gauss_w2, f"theory: data-vs-data floor; pass: beats Gaussian fit {gauss_w2:.4f}"))
    if cfg.plot:
        save_plot(panels, f"{cfg.out_dir}/diffusion_moons.png")
    return rows


def save_plot(panels, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot needs matplotlib, which is not installed (it is not a dependency of this project: "
              "pip install matplotlib); no plot saved")
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4), sharex=True, sharey=True)
    for ax, (title, points) in zip(axes, panels.items()):
        ax.scatter(points[:, 0], points[:, 1], s=1)
        ax.set_title(title)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"saved {path}")


# ----------------------------------------------------------------------------------------------
# 5. main

def main(argv=None):
    (cfg,) = parse_args([DiffusionConfig()], argv, description=__doc__.split("\n")[1])
    claim_out_dir(cfg.out_dir)  # before the work: the metrics (and the plot) at the end must have somewhere to go
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    rows = ve_rows(cfg, rng) + learned_rows(cfg, rng) + vp_rows(cfg, rng) + moons_rows(cfg, rng)
    table = [("row", f"{'theory':>11} {'measured':>11}  ok    check")]
    table += [(name, f"{theory:>11.5g} {measured:>11.5g}  {'pass' if ok else 'FAIL'}  {check}")
              for _, name, theory, measured, ok, check in rows]
    print_table(f"diffusion_toy: theory beside measurement (sigma^2 = {cfg.sigma2:g}, {cfg.n_mc:,} Monte-Carlo "
                f"samples, MC checks within {MC_TOL:g} standard errors)", table)
    metrics = {key: {"theory": float(theory), "measured": float(measured), "ok": bool(ok), "check": check}
               for key, _, theory, measured, ok, check in rows}
    metrics["all_ok"] = all(m["ok"] for m in metrics.values())
    write_metrics("diffusion", metrics, cfg.out_dir)
    return metrics


if __name__ == "__main__":
    run_main(main)
