"""
compare.py: every alignment method for the same training time, over whole chains, with the SFT control beside
them: the README's headline comparison as one command, its tables and its pictures.

    python compare.py            3 chains (seeds 1337, 1, 2), 60 s of training per method (33.5 min on 2 idle cores)
    python compare.py --quick    1 chain (seed 1337), 20 s per method: a first look (553 s on 2 idle cores)

A chain is the stages' own scripts with their defaults and --seed S: gpt.py, then sft.py, then reward.py, into
out_dir/chain_S. From its SFT model every method trains for the same seconds (--max_seconds, the learning-rate
schedule compressed into them), each in its own directory beside the chain's checkpoints, and so does the
control: more SFT on the same sloppy demonstrations (`sft.py --init`), the question being what an alignment
method adds beyond more imitation. Every run is the script itself in a child process, its output in
<run>/log.txt, `--jobs` at a time with cores / jobs threads each, so the methods share the machine alike (the
chains run side by side too). A finished run is never run again (its metrics file is read back) and an
interrupted one resumes, so the command can be stopped and started again; once everything has run it only
redraws.

It writes out_dir/compare.md (the tables: mean and range over the chains whose SFT model learnt the task, the
others named and why; the chains' own figures; then each chain with 95% intervals),
compare_metrics.json, and with matplotlib (optional: `pip install matplotlib`) three pictures: sampled held-out
accuracy against training seconds (accuracy_vs_seconds.png), r* against KL to the SFT model as each method
trains (reward_vs_kl.png), and the pretraining and SFT curves (pretraining_and_sft.png).

Left out: the seconds a method spends outside its optimizer steps (start-up, sampling preference data before
DPO starts, validation) are not counted, as in the stages' own train_seconds; PPO's and GRPO's rollouts are.
"""
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass

import sft
import train
from train import arg

# (directory, name in the tables, script, the stage name of its metrics file, flags, validate every N steps).
# The flags are the README's commands (RLOO at TRL's KL coefficient, GSPO at its paper's clip range and two updates
# per rollout: with one the ratio is 1 and GSPO is GRPO); the validation intervals give each curve about eight points
# in 60 s.
METHODS = [
    ("control", "SFT continued (control)", "sft.py", "sft", [], 250),
    ("dpo", "DPO, beta 0.5 + RPO", "dpo.py", "dpo", [], 200),
    ("dpo_beta0.1", "DPO, beta 0.1 (plain)", "dpo.py", "dpo", ["--beta", "0.1", "--rpo_alpha", "0"], 200),
    ("ipo", "IPO, beta 0.1", "dpo.py", "dpo", ["--loss", "ipo", "--beta", "0.1", "--rpo_alpha", "0"], 200),
    ("gpro", "GPRO", "gpro.py", "gpro", [], 75),
    ("grpo", "GRPO", "gpro.py", "grpo", ["--algo", "grpo"], 50),
    ("rloo", "RLOO", "gpro.py", "rloo", ["--algo", "rloo", "--kl_coef", "0.05"], 50),
    ("gspo", "GSPO", "gpro.py", "grpo", ["--algo", "grpo", "--importance_sampling_level", "sequence", "--mu", "2",
                                         "--clip_eps", "3e-4", "--clip_eps_high", "4e-4"], 50),
    ("ppo_rm", "PPO, reward model", "ppo.py", "ppo", [], 100),
    ("ppo_true", "PPO, r*", "ppo.py", "ppo", ["--reward", "true"], 100),
]
CONTROL = "control"
SCRIPTS = ("gpt.py", "sft.py", "reward.py", "dpo.py", "gpro.py", "ppo.py")
HERE = os.path.dirname(os.path.abspath(__file__))


@dataclass(frozen=True)
class CompareConfig:
    seeds: str = arg("1337,1,2", "one whole chain per seed (1337 is every stage's default)")
    seconds: float = arg(60.0, "training seconds of every method and of the control")
    quick: bool = arg(False, "one chain (the first seed) and 20 s per method: a first look in about 10 minutes")
    methods: str = arg("", "comma-separated subset of: " + ", ".join(m[0] for m in METHODS) + " (empty = all)")
    jobs: int = arg(2, "runs at a time, each with cores / jobs threads")
    task: str = arg("", "the task every stage trains on, with its own defaults (each script's --task; empty = the "
                        "default task, addition)")
    device: str = arg("auto", "every run's --device")
    extra: str = arg("", "more flags for the runs of some scripts, after compare's own so that they win, e.g. "
                         "'gpt.py: --n_layer 8 --n_embd 128; sft.py: --lr 1e-3'. Finished runs are read back as "
                         "they are: give a changed comparison its own --out_dir")
    out_dir: str = arg("out/compare", "the chains, the runs, the tables and the pictures (under the task's name "
                                      "with --task)")

    def __post_init__(self):
        try:
            seeds = [int(s) for s in self.seeds.split(",")]
        except ValueError:
            raise train.UserError(f"--seeds {self.seeds!r} is not a comma-separated list of integers") from None
        train.check(len(set(seeds)) == len(seeds) and all(s >= 0 for s in seeds),
                    f"--seeds {self.seeds!r}: give distinct seeds >= 0")
        train.check(self.seconds > 0, f"--seconds must be > 0, got {self.seconds}")
        train.check(self.jobs >= 1, f"--jobs must be >= 1, got {self.jobs}")
        unknown = set(self.method_names()) - {m[0] for m in METHODS}
        train.check(not unknown, f"--methods: no method {', '.join(sorted(unknown))}; the methods are "
                    + ", ".join(m[0] for m in METHODS))
        train.check_device(self.device)
        train.check(not self.task or self.task in sft.TASKS, f"--task {self.task}: the tasks are "
                    + ", ".join(sft.TASKS))
        for part in filter(None, (p.strip() for p in self.extra.split(";"))):
            script, colon, _ = part.partition(":")
            train.check(colon and script.strip() in SCRIPTS, f"--extra {part!r}: write 'SCRIPT: FLAGS', SCRIPT one "
                        f"of {', '.join(SCRIPTS)}")

    def extra_flags(self, script):
        parts = [p.partition(":") for p in self.extra.split(";") if p.strip()]
        return [f for name, _, flags in parts if name.strip() == script for f in shlex.split(flags)]

    @property
    def root(self):
        return os.path.join(self.out_dir, self.task) if self.task else self.out_dir

    def seed_list(self):
        seeds = [int(s) for s in self.seeds.split(",")]
        return seeds[:1] if self.quick else seeds

    def budget(self):
        return 20.0 if self.quick else self.seconds

    def method_names(self):
        return [m for m in self.methods.split(",") if m] or [m[0] for m in METHODS]


@dataclass
class Run:
    """One script run: python script --out_dir out_dir flags..., after the runs named in `after` finished."""
    key: str
    title: str
    script: str
    stage: str
    out_dir: str
    flags: list
    after: tuple = ()
    links: tuple = ()  # checkpoints of the chain it builds on, linked into its directory

    def metrics_path(self):
        return os.path.join(self.out_dir, f"{self.stage}_metrics.json")

    def command(self, common):
        resume = ["--resume"] if os.path.exists(os.path.join(self.out_dir, f"{self.stage}.pt")) else []
        return [sys.executable, os.path.join(HERE, self.script), "--out_dir", self.out_dir, *common, *self.flags,
                *resume]


def plan(cfg):
    """Every run of the comparison, in an order that respects what each needs."""
    runs = []
    for seed in cfg.seed_list():
        chain = os.path.join(cfg.root, f"chain_{seed}")
        s = ["--seed", str(seed)]
        t = s + (["--task", cfg.task] if cfg.task else [])  # every stage after pretraining, which knows no task
        runs += [Run(f"{seed}/gpt", f"chain {seed}: pretraining", "gpt.py", "gpt", chain,
                     [*s, "--eval_interval", "100"]),
                 Run(f"{seed}/sft", f"chain {seed}: SFT", "sft.py", "sft", chain, [*t, "--eval_interval", "250"],
                     after=(f"{seed}/gpt",)),
                 Run(f"{seed}/reward", f"chain {seed}: reward model", "reward.py", "reward", chain, t,
                     after=(f"{seed}/sft",))]
        budget = ["--max_seconds", f"{cfg.budget():g}", "--max_steps", "1000000"]
        for key, title, script, stage, flags, every in METHODS:
            if key not in cfg.method_names():
                continue
            out = os.path.join(chain, f"{key}_{cfg.budget():g}s")
            if key == CONTROL:  # its own sft.pt is the continued model: the chain's comes in through --init
                extra, links, after = ["--init", os.path.join(chain, "sft.pt")], (), (f"{seed}/sft",)
            else:
                extra, links, after = [], ("gpt.pt", "sft.pt", "reward.pt"), (f"{seed}/reward",)
            runs.append(Run(f"{seed}/{key}", f"chain {seed}: {title}", script, stage, out,
                            [*t, *budget, "--eval_interval", str(every), *extra, *flags], after, links))
    for run in runs:
        run.flags += cfg.extra_flags(run.script)
    return runs


def link_chain(run):
    """The chain's checkpoints in the run's directory, as relative links (the stages read them from out_dir)."""
    os.makedirs(run.out_dir, exist_ok=True)
    for name in run.links:
        link = os.path.join(run.out_dir, name)
        if not os.path.lexists(link):
            os.symlink(os.path.join("..", name), link)


def execute(runs, cfg):
    """Run what has not finished, cfg.jobs at a time, each when the runs it needs are done. Returns the runs that
    failed (each has said so in one line, with its log)."""
    common = ["--device", cfg.device]
    threads = str(max(1, (os.cpu_count() or 1) // cfg.jobs))
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    todo = [r for r in runs if not os.path.exists(r.metrics_path())]
    done = {r.key for r in runs} - {r.key for r in todo}
    if done:
        print(f"{len(done)} of {len(runs)} runs already finished: their metrics are read back")
    failed, running, started = set(), {}, {}
    bar = train.Progress(len(todo), "compare", enabled=bool(todo))
    while todo or running:
        for run in [r for r in todo if set(r.after) & failed]:  # what needs a failed run cannot run
            todo.remove(run)
            failed.add(run.key)
            bar.write(f"skipped {run.title}: {', '.join(sorted(set(run.after) & failed))} failed")
            bar.update(1)
        ready = [r for r in todo if set(r.after) <= done]
        while ready and len(running) < cfg.jobs:
            run = ready.pop(0)
            todo.remove(run)
            link_chain(run)
            log = open(os.path.join(run.out_dir, "log.txt"), "a")
            running[run.key] = (run, subprocess.Popen(run.command(common), stdout=log, stderr=subprocess.STDOUT,
                                                      env=env), log)
            started[run.key] = time.perf_counter()
            bar.write(f"started {run.title} -> {run.out_dir}")
        time.sleep(0.5)
        for key, (run, proc, log) in list(running.items()):
            if proc.poll() is None:
                continue
            log.close()
            del running[key]
            minutes = (time.perf_counter() - started[key]) / 60
            if proc.returncode == 0 and os.path.exists(run.metrics_path()):
                done.add(key)
                bar.write(f"finished {run.title} in {minutes:.1f} min")
            else:
                failed.add(key)
                bar.write(f"failed {run.title} (exit status {proc.returncode}): see {run.out_dir}/log.txt")
            bar.update(1)
    bar.close()
    return failed


# ----------------------------------------------------------------------------------------------
# The tables

FIGURES = ("sample_accuracy", "accuracy", "true_reward", "kl")
# the chains' own figures: (stage, what, metrics key, a percentage?)
CHAIN_FIGURES = [("gpt", "validation bits per byte", "val_bpb", False),
                 ("sft", "greedy held-out accuracy", "accuracy", True),
                 ("sft", "sampled held-out accuracy", "sample_accuracy", True),
                 ("reward", "pairwise accuracy on held-out comparisons", "pairwise_accuracy", True),
                 ("reward", "noise ceiling of those labels", "noise_ceiling", True)]


def read_metrics(runs):
    """{run key: its metrics} for every run that finished."""
    return {r.key: json.load(open(r.metrics_path())) for r in runs if os.path.exists(r.metrics_path())}


def after_figures(m):
    """A method's held-out figures at the end (an alignment stage's `after`; the control's own)."""
    return m.get("after", m)


def averaged_chains(cfg, metrics):
    """(the chains the means cover, a sentence on those left out). A chain whose SFT model ended short of its
    plateau (greedy held-out accuracy under sft.LEARNT, where sft.py warns) is left out: every method of it starts
    from a model that has not learnt the task, so it measures that, not the method. Its runs stay in each chain's
    table. When no chain learnt the task (a tiny test), the means cover them all."""
    done = [s for s in cfg.seed_list() if f"{s}/sft" in metrics]
    short = [s for s in done if metrics[f"{s}/sft"]["accuracy"] < sft.LEARNT]
    if not short or len(short) == len(done):
        return done, "" if not short else (f"no chain's SFT model reached {sft.LEARNT:.0%} greedy (where sft.py "
                                          "warns that it has not learnt the task); the means cover them all")
    said = ", ".join(f"chain {s} (SFT {100 * metrics[f'{s}/sft']['accuracy']:.1f}% greedy)" for s in short)
    return [s for s in done if s not in short], (f"left out of the means: {said}, short of the plateau "
                                                 f"({sft.LEARNT:.0%}, where sft.py warns): every method starts "
                                                 "from a model that has not learnt the task; its runs are in the "
                                                 "table of each chain")


def summarise(cfg, metrics):
    """{method: {figure: [per-chain values]}} over the chains the means cover, their SFT models as the first row."""
    seeds, _ = averaged_chains(cfg, metrics)
    rows = {"SFT (start)": {f: [metrics[f"{s}/sft"].get(f) for s in seeds] for f in FIGURES}}
    rows["SFT (start)"]["kl"] = [0.0] * len(seeds)
    for key, title, *_ in METHODS:
        got = [after_figures(metrics[f"{s}/{key}"]) for s in seeds if f"{s}/{key}" in metrics]
        if got:
            rows[title] = {f: [g.get(f) for g in got] for f in FIGURES}
    return rows


def mean_range(values, percent):
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    fmt = (lambda v: f"{100 * v:.1f}") if percent else (lambda v: f"{v:.3f}")
    mean = sum(values) / len(values)
    return fmt(mean) if len(values) == 1 else f"{fmt(mean)} ({fmt(min(values))}-{fmt(max(values))})"


def tables(cfg, metrics):
    """compare.md: the mean (range) table, then every chain's figures with their 95% intervals and steps."""
    seeds = cfg.seed_list()
    rows = summarise(cfg, metrics)
    averaged, left_out = averaged_chains(cfg, metrics)
    head = (f"{cfg.budget():g} s of training each, {len(seeds)} chain(s) (seeds {', '.join(map(str, seeds))}); "
            f"held-out prompts; mean (range) over chains {', '.join(map(str, averaged))}"
            + (f"; {left_out}" if left_out else "") + "\n\n")
    lines = [f"| {cfg.budget():g} s of training | sampled | greedy | r* | KL to SFT |", "|---|---:|---:|---:|---:|"]
    for title, figs in rows.items():
        lines.append(f"| {title} | {mean_range(figs['sample_accuracy'], True)} | {mean_range(figs['accuracy'], True)}"
                     f" | {mean_range(figs['true_reward'], False)} | {mean_range(figs['kl'], False)} |")
    chains = ["", "The chains (each stage's defaults with --seed S): mean (range)", "",
              "| stage | figure | mean (range) |", "|---|---|---:|"]
    for stage, label, key, percent in CHAIN_FIGURES:
        values = [metrics[f"{s}/{stage}"].get(key) for s in seeds if f"{s}/{stage}" in metrics]
        chains.append(f"| {stage}.py | {label} | {mean_range(values, percent)} |")
    per_chain = ["", "Each chain: sampled [95% CI] / greedy / r* / KL (steps)", "",
                 "| method | " + " | ".join(f"chain {s}" for s in seeds) + " |", "|---|" + "---|" * len(seeds)]
    for key, title, *_ in [("sft", "SFT (start)")] + METHODS:
        cells = []
        for s in seeds:
            m = metrics.get(f"{s}/{key}")
            if m is None:
                cells.append("-")
                continue
            a = after_figures(m)
            low, high = a["sample_accuracy_ci"]
            kl = f"{a['kl']:.2f}" if "kl" in a else "-"
            cells.append(f"{100 * a['sample_accuracy']:.1f} [{100 * low:.1f}, {100 * high:.1f}] / "
                         f"{100 * a['accuracy']:.1f} / {a['true_reward']:.3f} / {kl} ({m.get('steps', '-')})")
        per_chain.append(f"| {title} | " + " | ".join(cells) + " |")
    return head + "\n".join(lines + chains + per_chain) + "\n", rows


# ----------------------------------------------------------------------------------------------
# The pictures

def draw(cfg, metrics, runs):
    """The three PNGs; without matplotlib, one line saying how to get them. Returns the files written."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("pictures: matplotlib is not installed; `pip install matplotlib` and run again to draw them "
              "(nothing is trained again)")
        return []
    seeds, averaged = cfg.seed_list(), averaged_chains(cfg, metrics)[0]  # (3) shows every chain, (1) and (2) these
    colours = {title: plt.cm.tab10(i % 10) for i, (_, title, *_) in enumerate(METHODS)}
    written = []

    def save(fig, name):
        path = os.path.join(cfg.root, name)
        fig.tight_layout()
        train.atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
        plt.close(fig)
        written.append(path)

    def curve(key, seed, x, y):
        """The points (x, y) of a run's validations, from the SFT model at 0 seconds."""
        m, start = metrics.get(f"{seed}/{key}"), metrics.get(f"{seed}/sft")
        if m is None or start is None:
            return [], []
        first = {"train_seconds": 0.0, "kl": 0.0, **{f: start.get(f) for f in FIGURES if f != "kl"}}
        points = [first] + [p for p in m.get("curve", []) if x in p and y in p]
        return [p[x] for p in points], [p[y] for p in points]

    # (1) sampled accuracy against training seconds: the mean over chains, the range shaded
    fig, ax = plt.subplots(figsize=(8, 5))
    grid = [cfg.budget() * i / 50 for i in range(51)]
    for key, title, *_ in METHODS:
        per_chain = []
        for s in averaged:
            xs, ys = curve(key, s, "train_seconds", "sample_accuracy")
            if len(xs) > 1:
                per_chain.append([100 * interpolate(xs, ys, t) for t in grid])
        if not per_chain:
            continue
        mean = [sum(col) / len(col) for col in zip(*per_chain)]
        style = "--" if key == CONTROL else "-"
        ax.plot(grid, mean, style, color=colours[title], label=title)
        if len(per_chain) > 1:
            ax.fill_between(grid, [min(c) for c in zip(*per_chain)], [max(c) for c in zip(*per_chain)],
                            color=colours[title], alpha=0.15)
    ax.set(xlabel="training seconds", ylabel="sampled held-out accuracy (%)",
           title=f"Every method from the SFT model, chains {', '.join(map(str, averaged))}"
                 + (", range shaded" if len(averaged) > 1 else ""))
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    save(fig, "accuracy_vs_seconds.png")

    # (2) r* against KL to the SFT model: the path each method takes, one line per chain, its end marked
    fig, ax = plt.subplots(figsize=(8, 5))
    for key, title, *_ in METHODS:
        if key == CONTROL:  # the control's KL is not measured
            continue
        for i, s in enumerate(averaged):
            xs, ys = curve(key, s, "kl", "true_reward")
            if len(xs) > 1:
                ax.plot(xs, ys, "-", color=colours[title], alpha=0.6, label=title if i == 0 else None)
                ax.plot(xs[-1:], ys[-1:], "o", color=colours[title])
    ax.set_xscale("symlog", linthresh=0.1)
    ax.set(xlabel="KL(pi || pi_SFT) per prompt (nats)", ylabel="true reward r* of samples",
           title="Reward against distance from the SFT model, each validation")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    save(fig, "reward_vs_kl.png")

    # (3) pretraining and SFT, where the SFT learning transition shows
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    for i, s in enumerate(seeds):
        colour = plt.cm.tab10(i % 10)
        pre = metrics.get(f"{s}/gpt", {}).get("curve", [])
        left.plot([p["step"] for p in pre], [p["val_bpb"] for p in pre], "-o", ms=3, color=colour, label=f"chain {s}")
        sft = metrics.get(f"{s}/sft", {}).get("curve", [])
        for figure, style in (("accuracy", "-o"), ("sample_accuracy", "--o")):
            right.plot([p["step"] for p in sft], [100 * p[figure] for p in sft], style, ms=3, color=colour,
                       label=f"chain {s}, {'greedy' if figure == 'accuracy' else 'sampled (T = 1)'}")
    left.set(xlabel="step", ylabel="validation bits per byte", title="Pretraining (gpt.py)")
    right.set(xlabel="step", ylabel="held-out accuracy (%)", title="SFT (sft.py)")
    for ax in (left, right):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    save(fig, "pretraining_and_sft.png")
    return written


def interpolate(xs, ys, t):
    """y at t on the piecewise-linear curve through (xs, ys), held flat after its last point."""
    if t >= xs[-1]:
        return ys[-1]
    i = next(i for i in range(1, len(xs)) if xs[i] >= t)
    w = (t - xs[i - 1]) / (xs[i] - xs[i - 1]) if xs[i] > xs[i - 1] else 1.0
    return ys[i - 1] + w * (ys[i] - ys[i - 1])


def main(argv=None):
    cfg, = train.parse_args([CompareConfig()], argv, description="every alignment method at equal training time")
    train.claim_out_dir(cfg.root)
    if cfg.quick:
        print(f"quick: one chain (seed {cfg.seed_list()[0]}) and 20 s per method; the README's table is "
              f"`python compare.py` (three chains, {cfg.seconds:g} s each)")
    runs = plan(cfg)
    failed = execute(runs, cfg)
    metrics = read_metrics(runs)
    text, rows = tables(cfg, metrics)
    train.atomic_write(os.path.join(cfg.root, "compare.md"), lambda tmp: open(tmp, "w").write(text))
    print("\n" + text)
    pictures = draw(cfg, metrics, runs)
    averaged, left_out = averaged_chains(cfg, metrics)
    train.write_metrics("compare", {"seconds": cfg.budget(), "seeds": cfg.seed_list(), "averaged": averaged,
                                    "left_out": left_out, "methods": rows,
                                    "failed": sorted(failed), "pictures": pictures}, cfg.root)
    train.check(not failed, f"{len(failed)} run(s) failed or were skipped: {', '.join(sorted(failed))}; their "
                "logs say why. Run the same command again to retry them (finished runs are kept)")


if __name__ == "__main__":
    train.run_main(main)
