"""
train.py: the run every stage shares. It knows nothing of models or tasks; gpt.py and every stage build on it.

Read top to bottom:
  1. errors and flags                    UserError, a dataclass as --flags (parse_args), run_main's one-line errors
  2. output                              the final table, the JSON line and metrics file, atomic files, progress
  3. device and precision                cpu / cuda, bf16 or fp16 autocast (notes 7)
  4. per-step random streams             one stream per (seed, rank, step): reproducible, exact resume, DDP
  5. checkpoints                         atomic, weights_only, provenance, the out_dir lock, resume checks,
                                         loading an earlier stage's checkpoint
  6. the training loop                   TrainConfig, warmup + cosine, AdamW, DDP, MFU, Trainer and train()

`python train.py` does nothing of its own: `python gpt.py` pretrains the model.
"""
import argparse
import atexit
import contextlib
import dataclasses
import json
import math
import os
import random
import shlex
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm


# ----------------------------------------------------------------------------------------------
# 1. Errors and flags

class UserError(ValueError):
    """Bad input from the user (config, data, checkpoint): the scripts print the message, not a traceback."""


def arg(default, help):
    """A dataclass field that is also a command-line flag with this help text."""
    return field(default=default, metadata={"help": help})


def check(ok, message):
    if not ok:
        raise UserError(message)


def check_choice(obj, name, allowed):
    value = getattr(obj, name)
    check(value in allowed, f"{name}={value!r} is not one of {', '.join(map(str, allowed))}")


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line from run_main (rank 0 only under torchrun), not usage on every rank
        raise UserError(f"{message} (see --help)")


def finite_float(text):
    """A float flag's value, finite: no setting has a meaning at inf or nan (a limit is switched off with 0)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def parse_args(defaults, argv=None, description=None):
    """Expose every field of the given dataclass instances as --flags (the instances give the defaults).
    Returns new instances, every value validated by its dataclass: a bad one is a UserError naming it."""
    parser = ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for obj in defaults:
        group = parser.add_argument_group(type(obj).__name__)
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            kind = dict(action=argparse.BooleanOptionalAction) if isinstance(value, bool) else dict(
                type=finite_float if isinstance(value, float) else type(value))
            group.add_argument(f"--{f.name}", default=value, help=f.metadata.get("help", ""), **kind)
    ns = vars(parser.parse_args(argv))
    return [dataclasses.replace(obj, **{f.name: ns[f.name] for f in dataclasses.fields(obj)}) for obj in defaults]


def rank():
    """This process's rank under torchrun (0 without it): only rank 0 logs, evaluates and saves."""
    return int(os.environ.get("RANK", 0))


class Terminated(KeyboardInterrupt):
    """SIGTERM (kill, a batch system's time limit, torchrun stopping its workers): stopped as Ctrl-C is."""


def terminate(signum, frame):
    raise Terminated


def run_main(main):
    """Run a script's main: a UserError becomes one line 'error: ...' and exit status 2, Ctrl-C one line
    saying what is kept and exit status 130 (SIGTERM the same line and 143, the status of a process it ends;
    under torchrun only rank 0 prints those), running out of memory one line with what to lower and what is
    kept, and exit status 1."""
    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        main()
    except UserError as e:
        if rank() == 0:
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Finished as done:
        if rank() == 0:
            print(done)
    except KeyboardInterrupt as e:
        if rank() == 0:
            print(f"\ninterrupted: {Trainer.active.interrupted() if Trainer.active else 'nothing was trained'}",
                  file=sys.stderr)
        sys.exit(143 if isinstance(e, Terminated) else 130)
    except (MemoryError, RuntimeError) as e:  # a GPU's is a torch.OutOfMemoryError, the CPU allocator's a RuntimeError
        if not isinstance(e, (MemoryError, torch.OutOfMemoryError)) and "can't allocate memory" not in str(e):
            raise
        where = "GPU" if isinstance(e, torch.OutOfMemoryError) else "CPU"
        print(f"error: out of {where} memory: lower --batch_size (or the model's size); "
              f"{Trainer.active.checkpoint_note() if Trainer.active else 'nothing was trained'}", file=sys.stderr)
        sys.exit(1)
    finally:
        signal.signal(signal.SIGTERM, previous)


# ----------------------------------------------------------------------------------------------
# 2. Output: every script's final table, its JSON line and metrics file, atomic files, progress

def print_table(title, rows):
    """rows: (name, value) pairs, one per line under the title (every script's final table)."""
    width = max(len(k) for k, _ in rows)
    print(f"\n{title}")
    for k, v in rows:
        print(f"  {k:<{width}}  {f'{v:.4g}' if isinstance(v, float) else v}")


def finite_or_none(x):
    """Strict JSON: NaN and infinities become null, in nested dicts and lists too (json.dumps would write bare
    NaN)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: finite_or_none(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite_or_none(v) for v in x]
    return x


def write_metrics(stage, metrics, out_dir):
    """One JSON line on stdout and out_dir/<stage>_metrics.json, written atomically (every script's metrics)."""
    line = json.dumps(finite_or_none({"stage": stage, **metrics}), allow_nan=False)
    print(line)
    os.makedirs(out_dir, exist_ok=True)
    atomic_write(os.path.join(out_dir, f"{stage}_metrics.json"), lambda tmp: open(tmp, "w").write(line + "\n"))


def atomic_write(path, write):
    """write(tmp) into a temporary file unique to this process, then rename it to path: a crash or a full
    disk never leaves a half-written file, and the temporary file is removed on failure."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        remove_quietly(tmp)
        raise


@contextlib.contextmanager
def signals_held():
    """Ctrl-C (SIGINT) and SIGTERM arriving inside the block take effect at its end: for a save and the record
    of which step it holds, which must not be parted. (A signal mask would not do: the OS may hand the signal to
    another of torch's threads, and Python then runs the handler in the main thread at once.)"""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    pending = []
    hold = lambda signum, frame: pending.append(signum)  # noqa: E731
    before = {s: signal.signal(s, hold) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
        for s in pending:
            signal.raise_signal(s)


def remove_quietly(path):
    with contextlib.suppress(OSError):
        os.remove(path)


class Progress:
    """The progress of a long loop: a bar on a terminal; when stderr is a log (a file, CI, nohup), a plain
    line every `every` seconds instead of redrawn frames."""

    def __init__(self, total, desc, initial=0, enabled=True, every=10.0):
        self.tty, self.enabled, self.every, self.desc = sys.stderr.isatty(), enabled, every, desc
        self.n, self.total, self.last, self.postfix = initial, total, time.perf_counter(), {}
        self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True,
                        disable=not (enabled and self.tty))

    def update(self, n=1, **postfix):
        self.n, self.postfix = self.n + n, postfix
        if self.tty:
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(n)
        elif self.enabled and (time.perf_counter() - self.last >= self.every or self.n == self.total):
            self.last = time.perf_counter()
            print(f"{self.desc}: {self.n}/{self.total} " + " ".join(f"{k} {v}" for k, v in postfix.items()),
                  file=sys.stderr, flush=True)

    def write(self, line):
        if self.enabled:
            self.bar.write(line) if self.tty else print(line, flush=True)

    def close(self):
        self.bar.close()


# ----------------------------------------------------------------------------------------------
# 3. Device and precision

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_device(name):
    """A device that exists on this machine: auto, cpu, cuda or cuda:N (N < the number of GPUs)."""
    if name in ("auto", "cpu"):
        return
    kind, _, index = name.partition(":")
    check(kind == "cuda" and (index == "" or index.isdigit()), f"device={name!r} is not one of auto, cpu, cuda, "
          "cuda:N")
    check(torch.cuda.is_available(), f"--device {name} was asked for but no CUDA GPU is available; use --device cpu")
    check(int(index or 0) < torch.cuda.device_count(), f"--device {name}: this machine has "
          f"{torch.cuda.device_count()} GPU(s)")


def pick_device(name="auto"):
    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


def autocast_dtype(device, dtype="auto"):
    """The compute dtype: bf16 on GPUs that support it, fp16 on older GPUs (with a GradScaler),
    fp32 on CPU unless asked for (notes 7; mixed precision, Micikevicius et al. 2018: fp32 master weights
    either way)."""
    if dtype != "auto":
        return DTYPES[dtype]
    if torch.device(device).type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def autocast(device, dtype="auto"):
    dt = autocast_dtype(device, dtype)
    return contextlib.nullcontext() if dt == torch.float32 else torch.autocast(torch.device(device).type, dtype=dt)


# ----------------------------------------------------------------------------------------------
# 4. Per-step random streams

SEED_LIMIT = 2 ** 32


def check_seed(seed, name="seed"):
    """A seed in [0, 2^32): step_seed below, (seed + 7919 rank) * 1_000_003 + step, then stays far below the
    2^64 that torch.Generator.manual_seed accepts, for any rank and step a run reaches."""
    check(0 <= seed < SEED_LIMIT, f"{name} must be in [0, 2^32 = {SEED_LIMIT}), got {seed}")


def step_seed(seed, step):
    """The seed of the random stream of (seed, this process's rank, step). Every batch, rollout and sample
    draws from its own stream: runs are reproducible, resume exactly, and DDP processes see different data."""
    return (seed + 7919 * rank()) * 1_000_003 + step


def step_rng(seed, step):
    return random.Random(step_seed(seed, step))


def step_generator(seed, step, device="cpu"):
    return torch.Generator(device=device).manual_seed(step_seed(seed, step))


def rng_state(device):
    """The random state a checkpoint keeps for an exact resume: the CPU's, and the GPU's on CUDA (dropout)."""
    return {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if torch.device(device).type == "cuda" else None}


def set_rng_state(state, device):
    torch.set_rng_state(state["cpu"])
    if torch.device(device).type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


# ----------------------------------------------------------------------------------------------
# 5. Checkpoints: atomic, provenance, the out_dir lock, resume, an earlier stage's model

def save_checkpoint(path, **state):
    """torch.save, atomically: a full disk is one line (UserError) and leaves the old checkpoint."""
    def write(tmp):
        with open(tmp, "wb") as f:  # through a file object a full disk is an OSError, not a zip writer's error
            torch.save(state, f)
    try:
        atomic_write(path, write)
    except OSError as e:
        raise UserError(f"cannot write {path} ({e.strerror}): free some space or give another --out_dir") from None


def load_checkpoint(path):
    check(os.path.isfile(path), f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"checkpoint {path} is corrupt or not a checkpoint of this project "
                        f"({type(e).__name__}); delete it and train again") from None
    check(isinstance(ckpt, dict) and "model" in ckpt, f"checkpoint {path} holds no model; delete it and train again")
    return ckpt


class Finished(Exception):
    """--resume on a run that already finished: run_main prints its metrics and exits 0."""


_claimed = set()


def claim_out_dir(out_dir):
    """Before any work: out_dir is a writable directory with room for checkpoints, and no other run uses
    it (a lock file holding the process id, removed at exit; only rank 0 takes it)."""
    if out_dir in _claimed or rank() != 0:
        return
    check(not os.path.exists(out_dir) or os.path.isdir(out_dir), f"--out_dir {out_dir} is a file: give a directory")
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out_dir {out_dir} cannot be created ({e.strerror}): give another --out_dir") from None
    lock = os.path.join(out_dir, ".lock")
    busy = f"another run is using --out_dir {out_dir}: wait for it to finish or give another --out_dir"
    for _ in range(2):
        try:  # creating the lock is also the test that the directory is writable
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            text = open(lock).read().strip()
            if not text:  # a run writes its id just after creating the lock: read again a moment later
                time.sleep(0.5)
                text = open(lock).read().strip()
            # anything but a process id is then left from a run that failed as it started
            check(text.isdigit() and int(text) > 0, f"{lock} holds no process id ({text[:20]!r}), left by a run "
                  f"that failed at start-up: if no run is using --out_dir {out_dir}, delete {lock}")
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(text), 0)  # raises if there is no such process: the lock is stale
                raise UserError(busy.replace("another run", f"another run (process {text})"))
            remove_quietly(lock)
        except OSError as e:
            raise UserError(f"--out_dir {out_dir} is not writable ({e.strerror}): give another --out_dir") from None
    else:
        raise UserError(busy)
    try:
        os.write(fd, str(os.getpid()).encode())
    except OSError as e:  # a full disk: no empty lock may stay behind to block the next run
        remove_quietly(lock)
        raise UserError(f"cannot write to --out_dir {out_dir} ({e.strerror}): free some space or give another "
                        "--out_dir") from None
    finally:
        os.close(fd)
    atexit.register(remove_quietly, lock)
    free = shutil.disk_usage(out_dir).free
    check(free >= 64 * 2**20, f"--out_dir {out_dir} has {free / 2**20:.0f} MiB free, too little for checkpoints: "
          "free some space or give another --out_dir")
    _claimed.add(out_dir)


def first_difference(want, have, prefix=""):
    """The first field (dotted name, wanted, found) where the nested dict `have` differs from `want`, or None.
    Only the keys of `want` are compared."""
    for key, value in want.items():
        found = have.get(key, "missing") if isinstance(have, dict) else "missing"
        if isinstance(value, dict) and isinstance(found, dict):
            diff = first_difference(value, found, f"{prefix}{key}.")
            if diff:
                return diff
        elif found != value:
            return f"{prefix}{key}", value, found
    return None


def json_difference(want, have):
    """first_difference of the two as JSON: NaN metrics compare equal, tuples equal lists."""
    as_json = lambda x: json.loads(json.dumps(finite_or_none(x), default=str))  # noqa: E731
    return first_difference(as_json(want), as_json(have))


# what a resumed run may change: where it runs and how often it validates, not what it computes
RESUME_MAY_CHANGE = ("device", "compile", "out_dir", "resume", "overwrite", "eval_interval", "eval_batches")


_noted = set()


def claim_checkpoint(path, cfg, meta=None):
    """Before a stage trains into `path`: out_dir checked and locked; an existing checkpoint is never lost
    silently (--resume continues it, or prints its metrics when it finished; --overwrite replaces it); a
    resumed one must have been built with the same `meta` (the model's config and the stage's settings; a
    finished one too, so that its metrics are the ones asked for) and trained with the same TrainConfig but
    for RESUME_MAY_CHANGE, so that it continues exactly."""
    claim_out_dir(os.path.dirname(path) or ".")
    if not os.path.exists(path) or cfg.overwrite:
        if cfg.resume and path not in _noted and rank() == 0:
            print(f"--resume: {path} does not exist, so this run trains from scratch")
        _noted.add(path)
        return
    ckpt = load_checkpoint(path)
    stopped = f"stopped at step {ckpt.get('step')} of {ckpt.get('max_steps')}"
    if not cfg.resume:
        raise UserError(f"{path} holds a run {'that finished' if ckpt.get('finished') else stopped}: --resume "
                        f"{'prints its metrics' if ckpt.get('finished') else 'continues it'}, --overwrite trains "
                        "from scratch over it")
    want = dict(meta or {})
    if not ckpt.get("finished"):
        want["train_config"] = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RESUME_MAY_CHANGE}
    diff = json_difference(want, {k: ckpt.get(k, "missing") for k in want})
    upstream = diff and diff[0].startswith("built_from.") and diff[0].split(".")[1]
    check(not upstream, upstream and f"cannot resume {path}: it was built from another {upstream}.pt than the one in "
          f"out_dir now ({diff[0]}={diff[2]!r}, now {diff[1]!r}): start again with --overwrite")
    check(not diff, diff and f"cannot resume {path}: it was built with {diff[0].replace('train_config.', '--')}="
          f"{diff[2]!r}, this run asks for {diff[1]!r}; resume with the same settings, or start again with --overwrite")
    if ckpt.get("finished"):
        raise Finished(f"{path} finished at step {ckpt.get('step')}; its metrics: "
                       f"{json.dumps(finite_or_none(ckpt.get('metrics', {})))}")


def provenance(ckpt):
    """What a checkpoint records of itself, for the checkpoints built from it: its identity (the stage, the
    model's config, the stage's settings), its training config and what it was built from."""
    return {k: v for k, v in ckpt.items() if k not in ("model", "critic", "optimizer", "scaler", "rng", "state",
                                                         "loss_history", "curve")}


def resume_command(script, ckpt, path, defaults=()):
    """The command that finishes the interrupted run in `path`: script.py with --resume and every setting the run
    recorded that differs from `defaults`, the script's configs (each found in the checkpoint by its fields)."""
    flags = []
    for config in defaults:
        names = {f.name for f in dataclasses.fields(config)}
        recorded = next((v for v in ckpt.values() if isinstance(v, dict) and v and set(v) <= names), {})
        for name, value in recorded.items():
            if value != getattr(config, name) and name not in RESUME_MAY_CHANGE:
                flags.append(f"--{'' if value else 'no-'}{name}" if isinstance(value, bool) else
                             f"--{name} {shlex.quote(str(value))}")
    return " ".join([f"python {script}.py --resume --out_dir {os.path.dirname(path) or '.'}", *flags])


def check_finished(ckpt, path, script, defaults=()):
    """A checkpoint another run builds on must be a finished run's (script, defaults: for the command that
    finishes it)."""
    check("finished" in ckpt, f"{path} records nothing of how it was built (an earlier version of this project "
          "wrote it): delete it and run again")
    check(ckpt["finished"], f"{path} stopped at step {ckpt.get('step')} of {ckpt.get('max_steps')}: finish it "
          f"with `{resume_command(script, ckpt, path, defaults)}`, or delete it")


def load_stage(path, stage, train_missing, build, device="cpu", requires=None, defaults=()):
    """The model of an earlier stage's checkpoint, checked before use: the run must have finished, and match
    `requires` (e.g. {"task": {"digits": 3}}, or the provenance of the checkpoint it must have been built from).
    When it is missing, train_missing() trains it first, so any script works on a fresh clone. build(ckpt, path)
    -> the model (gpt.model_from_checkpoint for a GPT); defaults: the configs of that stage's script, for the
    command that finishes an interrupted run. Returns (model, ckpt)."""
    if not os.path.exists(path):
        print(f"{path} not found: training that stage first")
        train_missing()
    ckpt = load_checkpoint(path)
    where = f"--out_dir {os.path.dirname(path) or '.'}"
    check_finished(ckpt, path, stage, defaults)
    diff = json_difference(requires or {}, ckpt)
    upstream = diff and diff[0].startswith("built_from.") and diff[0].split(".")[1]
    check(not upstream, upstream and f"{path} was built from another {upstream}.pt than the one in "
          f"{os.path.dirname(path) or '.'} now ({diff[0]} differs): run `python {stage}.py --overwrite {where}` "
          "to build it again on that one, or delete it")
    check(not diff, diff and f"{path} was built with {diff[0]}={diff[2]!r}, this run asks for {diff[1]!r}: delete "
          f"it (or give another --out_dir) and run again, or run `python {stage}.py {where}` with that setting")
    return build(ckpt, path).to(device), ckpt


def inherit(defaults, cfg):
    """An earlier stage's TrainConfig `defaults` with the settings of this run that must carry over to it."""
    return dataclasses.replace(defaults, **{k: getattr(cfg, k) for k in ("out_dir", "device", "dtype", "seed",
                                                                          "compile")})


# ----------------------------------------------------------------------------------------------
# 6. The training loop: its pieces in Trainer, the plain loop over batches in train()

@dataclass(frozen=True)
class TrainConfig:
    max_steps: int = arg(1600, "optimizer steps")
    max_seconds: float = arg(0.0, "stop after this many seconds of training, the schedule compressed to fit "
                                  "(0 = no limit): for comparisons at equal wall time")
    batch_size: int = arg(16, "sequences per micro-batch (per process)")
    grad_accum: int = arg(1, "micro-batches per optimizer step")
    lr: float = arg(3e-3, "peak learning rate")
    min_lr: float = arg(3e-4, "learning rate at the end of the cosine decay")
    warmup_steps: int = arg(50, "linear warmup steps")
    weight_decay: float = arg(0.1, "AdamW weight decay, on matrices only")
    beta1: float = arg(0.9, "AdamW beta1")
    beta2: float = arg(0.95, "AdamW beta2")
    grad_clip: float = arg(1.0, "clip the gradient norm to this (0 = off)")
    eval_interval: int = arg(400, "validate and checkpoint every this many steps")
    eval_batches: int = arg(64, "batches per validation")
    dtype: str = arg("auto", "auto | float32 | bfloat16 | float16 (auto: bf16 on GPU, fp32 on CPU)")
    device: str = arg("auto", "auto | cpu | cuda | cuda:N")
    compile: str = arg("auto", "torch.compile: auto (on for CUDA) | on | off")
    seed: int = arg(1337, "random seed")
    out_dir: str = arg("out", "where checkpoints and metrics go")
    resume: bool = arg(False, "continue from the stage's checkpoint in out_dir (a finished one: print its metrics)")
    overwrite: bool = arg(False, "train from scratch over the stage's existing checkpoint in out_dir")

    def __post_init__(self):
        for name in ("max_steps", "batch_size", "grad_accum", "eval_interval", "eval_batches"):
            check(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_seconds", "warmup_steps", "weight_decay", "grad_clip"):
            check(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        check(self.lr > 0 and 0 <= self.min_lr <= self.lr,
              f"need lr > 0 and 0 <= min_lr <= lr, got lr={self.lr}, min_lr={self.min_lr}")
        check(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, f"beta1 and beta2 must be in [0, 1), got {self.beta1}, "
              f"{self.beta2}")
        check_choice(self, "dtype", ("auto", *DTYPES))
        check_choice(self, "compile", ("auto", "on", "off"))
        check_device(self.device)
        check_seed(self.seed)
        check(not (self.resume and self.overwrite), "--resume continues the checkpoint, --overwrite replaces it: "
              "choose one")


def lr_at(step, cfg, seconds=0.0):
    """Linear warmup to lr, then cosine decay to min_lr at the end of the budget: max_steps, or
    max_seconds of training when that comes first."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    if cfg.max_seconds:
        progress = max(progress, seconds / cfg.max_seconds)
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * min(1.0, progress))) * (cfg.lr - cfg.min_lr)


def make_optimizer(groups, cfg, device):
    """AdamW (Loshchilov & Hutter 2019) over groups [(module, lr_scale), ...]: a module's trainable parameters
    learn at lr_scale times the schedule; weight decay on matrices (dim >= 2) only, never on norms, biases
    or gains."""
    param_groups = []
    for module, scale in groups:
        params = [p for p in module.parameters() if p.requires_grad]
        param_groups += [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay,
                          "lr_scale": scale},
                         {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0, "lr_scale": scale}]
    cuda = torch.device(device).type == "cuda"  # fused on GPUs; elsewhere foreach: one call per step for all the
    # tensors instead of one per tensor (the same arithmetic, bit for bit, as the per-tensor loop on CPU)
    return torch.optim.AdamW(param_groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=cuda, foreach=not cuda)


class Processes:
    """torchrun's environment: rank, world size, and the process group (NCCL on GPUs, gloo on CPU)."""

    def __init__(self, device):
        self.world, self.rank = int(os.environ.get("WORLD_SIZE", 1)), rank()
        self.local_rank, self.device = int(os.environ.get("LOCAL_RANK", 0)), device
        if self.world > 1:
            if not dist.is_initialized():
                dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
            if device.startswith("cuda"):
                self.device = f"cuda:{self.local_rank}"
                torch.cuda.set_device(self.device)
        self.master = self.rank == 0


# dense bf16 TFLOP/s by device name; the longest key found in the name wins ("NVIDIA H100 80GB HBM3" is the SXM,
# "NVIDIA H200 NVL" the NVL, "NVIDIA L40" not an L4)
PEAK_BF16_TFLOPS = {"H200 NVL": 835.0, "H200": 989.0, "GH200": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0,
                    "H100": 989.0, "B200": 2250.0, "A100": 312.0, "A10G": 125.0, "A10": 125.0, "L40S": 362.0,
                    "L40": 181.0, "L4": 121.0, "RTX 4090": 165.0, "RTX 3090": 71.0, "V100": 125.0, "T4": 65.0}


def device_peak_flops(device):
    """Dense bf16 (fp16 on pre-Ampere) peak of this GPU from its name; if unknown, a measured matmul, timed
    after a warm-up (the first calls pay for cuBLAS's setup and the clocks ramping up)."""
    name = torch.cuda.get_device_name(device)
    known = [key for key in PEAK_BF16_TFLOPS if key in name]
    if known:
        return PEAK_BF16_TFLOPS[max(known, key=len)] * 1e12, name
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(2):  # the first pass warms up, the second is timed
        torch.cuda.synchronize(device)
        t = time.perf_counter()
        for _ in range(10):
            a @ a
        torch.cuda.synchronize(device)
    return 10 * 2 * 8192 ** 3 / (time.perf_counter() - t), name + " (measured matmul peak)"


class Trainer:
    """The pieces of a training run that every stage shares: device and DDP, the optimizer and its schedule
    (param groups [(module, lr_scale)]), precision, exact resume, validation, checkpoints and the progress
    line. train() below is the plain loop over batches; ppo.py writes its rollout loop from the same pieces.

    The checkpoint at ckpt_path holds the state_dicts of `saved` ({"model": model} unless given), `meta`
    (the stage's identity: its config, the configs of what it was built from), the optimizer, the step,
    `state` (whatever else the stage's loop needs to resume) and whether the run finished. `unit` names
    what the loss functions count in their stats (tokens, samples): its rate is the throughput, measured
    after the first steps (compile and warm-up), and with flops_per_unit on a GPU the MFU. train_mode=False
    keeps the model in eval mode while it trains: no dropout and no MoE capacity, so the policy that is scored
    is the one that generate() sampled (the alignment stages, as TRL's disable_dropout)."""

    active = None  # the run in progress, for run_main's Ctrl-C line

    def __init__(self, model, cfg, ckpt_path=None, meta=None, groups=None, saved=None, unit="tokens",
                 flops_per_unit=0, desc="train", train_mode=True):
        self.cfg, self.desc, self.unit, self.flops_per_unit = cfg, desc, unit, flops_per_unit
        self.procs = Processes(pick_device(cfg.device))
        self.device = self.procs.device
        torch.manual_seed(cfg.seed + self.procs.rank)
        self.model = model.to(self.device)
        self.optimizer = make_optimizer(groups or [(model, 1.0)], cfg, self.device)
        self.dtype = autocast_dtype(self.device, cfg.dtype)
        # fp16 needs loss scaling (notes 7; Micikevicius et al. 2018), on whichever device it runs
        self.scaler = torch.amp.GradScaler(torch.device(self.device).type, enabled=self.dtype == torch.float16)
        self.ckpt_path, self.meta, self.saved = ckpt_path, meta or {}, saved or {"model": model}
        self.step, self.saved_step, self.train_seconds, self.state, self.metrics = 0, None, 0.0, {}, {}
        self.curve = []  # every validation's figures with its step and training seconds, for the learning curves
        self.history = []  # the loss of every step, from step 0 also after a resume
        if ckpt_path:
            claim_checkpoint(ckpt_path, cfg, self.meta)
            if cfg.resume and os.path.exists(ckpt_path):
                self.resume()
        if self.procs.master:
            print(f"{desc}: {sum(p.numel() for p in model.parameters()):,} parameters, device {self.device}, compute "
                  f"dtype {str(self.dtype).replace('torch.', '')}, {self.procs.world} process(es)")
        self.net = model
        if self.procs.world > 1:
            self.net = nn.parallel.DistributedDataParallel(model, device_ids=[self.procs.local_rank]
                                                           if "cuda" in self.device else None)
        if cfg.compile == "on" or (cfg.compile == "auto" and self.device.startswith("cuda")):
            self.net = torch.compile(self.net)
        self.peak = device_peak_flops(self.device) if self.device.startswith("cuda") and flops_per_unit else None
        self.warm, self.units, self.unit_seconds = 0, 0, 0.0
        self.t0 = time.perf_counter()
        self.bar = Progress(cfg.max_steps, desc, initial=self.step, enabled=self.procs.master)
        self.train_mode = train_mode
        model.train(train_mode)
        Trainer.active = self

    def resume(self):
        ckpt = load_checkpoint(self.ckpt_path)
        try:
            for name, module in self.saved.items():
                module.load_state_dict(ckpt[name])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scaler.load_state_dict(ckpt["scaler"])
            set_rng_state(ckpt["rng"], self.device)
            self.step, self.train_seconds, self.state = ckpt["step"], ckpt["train_seconds"], ckpt["state"]
            self.history = list(ckpt["loss_history"])
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as e:
            raise UserError(f"cannot resume from {self.ckpt_path}: it lacks or mismatches what resuming needs "
                            f"({str(e).splitlines()[0][:120]}); start again with --overwrite") from None
        self.saved_step, self.metrics, self.curve = self.step, ckpt.get("metrics", {}), ckpt.get("curve", [])
        if self.procs.master:
            print(f"resuming {self.ckpt_path} at step {self.step}")

    @property
    def done(self):
        out_of_time = self.cfg.max_seconds and self.train_seconds >= self.cfg.max_seconds
        return self.step >= self.cfg.max_steps or bool(out_of_time)

    def optimizer_step(self, loss_of, extra=None):
        """One optimizer step: loss_of(micro) -> (loss, stats) for micro = 0..grad_accum-1, with the stats
        floats (averaged for the progress line) and stats[unit] the units that micro-batch processed; extra:
        figures of the batch as a whole (a rollout's) shown before them. The loss is scaled for accumulation
        and fp16, the gradient all-reduced (DDP) on the last micro-batch and clipped. Returns (loss, stats)."""
        cfg, t = self.cfg, time.perf_counter()
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.step, cfg, self.train_seconds) * group["lr_scale"]
        loss_sum, sums = 0.0, {}
        for micro in range(cfg.grad_accum):
            sync = self.procs.world == 1 or micro == cfg.grad_accum - 1  # DDP all-reduces on the last one
            with (contextlib.nullcontext() if sync else self.net.no_sync()), autocast(self.device, cfg.dtype):
                loss, stats = loss_of(micro)
            self.scaler.scale(loss / cfg.grad_accum).backward()
            loss_sum += loss.item() / cfg.grad_accum
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + v
        if not math.isfinite(loss_sum):
            raise UserError(f"the loss became {loss_sum} at step {self.step}: lower --lr (now {cfg.lr}) or use "
                            f"--dtype float32; {self.checkpoint_note()}")
        if cfg.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        seconds = time.perf_counter() - t
        self.train_seconds += seconds
        n = sums.pop(self.unit, 0) * self.procs.world
        self.warm += 1
        if self.warm > min(20, cfg.max_steps // 5):  # steady state: after compile, autotuning and warm-up
            self.units, self.unit_seconds = self.units + n, self.unit_seconds + seconds
        stats = {**(extra or {}), **{k: v / cfg.grad_accum for k, v in sums.items()}}
        self.history.append(loss_sum)
        postfix = {"loss": f"{loss_sum:.4f}", f"{self.unit}/s": f"{self.rate():,.0f}",
                   **{k: f"{v:.3g}" for k, v in stats.items()}}
        if self.peak:
            postfix["mfu"] = f"{self.mfu():.1%}"
        self.bar.update(1, **postfix)
        self.last_stats = stats
        return loss_sum, stats

    def rate(self):
        return self.units / self.unit_seconds if self.unit_seconds else 0.0

    def mfu(self):
        """Model FLOPs utilisation: achieved FLOP/s over the peak of every process's GPU (PaLM's MFU)."""
        return self.rate() * self.flops_per_unit / (self.peak[0] * self.procs.world)

    def due(self, since=None):
        """Whether to validate now: a multiple of eval_interval was passed since step `since` (default: the
        step before this one), or the run is done."""
        since = self.step - 1 if since is None else since
        return self.step // self.cfg.eval_interval > since // self.cfg.eval_interval or self.done

    def validate(self, evaluate=None):
        """evaluate(model) -> metrics on rank 0 (no gradients, the training precision), printed with the
        latest training stats, then a checkpoint. A non-finite validation loss never reaches the checkpoint."""
        if evaluate and self.procs.master:
            self.model.eval()
            with torch.no_grad(), autocast(self.device, self.cfg.dtype):
                metrics = evaluate(self.model)
            self.model.train(self.train_mode)
            bad = [k for k, v in metrics.items() if k.endswith("loss") and not math.isfinite(v)]
            check(not bad, f"validation {bad and bad[0]} became {bad and metrics[bad[0]]} at step {self.step}: "
                  f"lower --lr (now {self.cfg.lr}) or use --dtype float32; {self.checkpoint_note()}")
            self.metrics = metrics
            self.curve.append({"step": self.step, "train_seconds": self.train_seconds,
                               **{k: v for k, v in metrics.items() if isinstance(v, (int, float))}})
            self.bar.write(f"step {self.step}: train loss {self.history[-1]:.4f} " + " ".join(
                f"{k} {v:.4f}" for k, v in {**metrics, **self.last_stats}.items() if isinstance(v, (int, float))))
        self.checkpoint()

    def checkpoint(self):
        if self.ckpt_path and self.procs.master:
            with signals_held():  # a Ctrl-C between the file and saved_step would name the wrong step as kept
                try:  # the losses so far too: the final train_loss must not depend on where a run was resumed
                    save_checkpoint(self.ckpt_path, **{k: m.state_dict() for k, m in self.saved.items()},
                                    **self.meta, optimizer=self.optimizer.state_dict(),
                                    scaler=self.scaler.state_dict(), step=self.step, max_steps=self.cfg.max_steps,
                                    rng=rng_state(self.device), state=self.state, loss_history=self.history,
                                    metrics=self.metrics, curve=self.curve, train_seconds=self.train_seconds,
                                    finished=self.done, train_config=dataclasses.asdict(self.cfg))
                except UserError as e:
                    raise UserError(f"{e}; {self.checkpoint_note()}") from None
                self.saved_step = self.step

    def checkpoint_note(self):
        """What an interrupted or failed run leaves behind, for its last line."""
        if self.saved_step is None:
            return "no checkpoint was written" if self.ckpt_path else "nothing is saved"
        return f"{self.ckpt_path} from step {self.saved_step} is kept, `--resume` continues it"

    def interrupted(self):
        return f"{self.desc} stopped at step {self.step} of {self.cfg.max_steps}; {self.checkpoint_note()}"

    def finish(self):
        """The run's figures: mean train loss of the last tenth of the steps, the last validation metrics,
        throughput and times, and `curve`: every validation's figures (the learning curve, resumes included)."""
        self.bar.close()
        recent = self.history[-max(1, len(self.history) // 10):]
        result = {"train_loss": sum(recent) / len(recent) if recent else float("nan"), **self.metrics,
                  f"{self.unit}_per_sec": self.rate(), "train_seconds": self.train_seconds,
                  "wall_seconds": time.perf_counter() - self.t0, "steps": self.step}
        if self.peak:
            result.update(mfu=self.mfu(), device_name=self.peak[1])
        result["curve"] = self.curve
        if self.procs.world > 1:
            dist.barrier()
        Trainer.active = None
        return result


def train(model, cfg, get_batch, loss_fn, evaluate=None, ckpt_path=None, meta=None, **trainer_kw):
    """The loop of every stage that is "batches -> loss": get_batch(i) -> the i-th micro-batch of this process
    (a pure function of i, so a resumed run sees exactly the data it would have seen); loss_fn(net, batch)
    -> (loss, stats); evaluate(model) -> metrics every eval_interval steps and at the end. Returns the
    Trainer's figures."""
    run = Trainer(model, cfg, ckpt_path, meta, **trainer_kw)
    while not run.done:
        run.optimizer_step(lambda micro: loss_fn(run.net, get_batch(run.step * cfg.grad_accum + micro)))
        if run.due():
            run.validate(evaluate)
    return run.finish()


if __name__ == "__main__":
    print("train.py is the machinery every stage shares; it trains nothing by itself. Start with `python gpt.py` "
          "(pretraining), then sft.py, reward.py, dpo.py / gpro.py / ppo.py; --help lists each script's flags.")
