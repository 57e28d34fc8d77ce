"""
The test suite: `python -m pytest -q test_all.py`.

Each test compares the code against an independent computation (a closed form, a slower
equivalent, an invariance) so that it fails when the code is wrong. Learning tests use fixed
seeds and margins that hold across seeds. Nothing writes into the user's out/ directory. The
scripts run with --device cpu and DDP over gloo, so the suite passes on a GPU machine too; there
the kernel tests run on the GPU, here in Triton's CPU interpreter.

Contents, one section per source file in the layer order (`grep -n "^# [0-9]" test_all.py`), then the
failure paths and the whole chain:
  0. the files: imports point down the layers; one helper for per-step random streams
  1. train.py: flags, checkpoints, the training loop, learning curves and exact resume, locks, random states
  2. kernels.py: flash attention against the reference, the dispatch, FP8, the command line
  3. gpt.py: tokenizer and config; the model; the switches (mixture of experts, post-norm and parallel blocks,
     linear attention, prefix LM, logit scaling); KV cache, sampling and generation; sequence log-probs; the
     Hugging Face export; the script and DDP
  4. sft.py: the Task interface, addition and sorting, the SFT loss, LoRA, QLoRA, adapters, sampling and export
     from a checkpoint, the script
  5. reward.py: the labeller, the comparisons, the losses, the reward model, latent pooling, the script
  6. ppo.py: GAE, the clipped surrogate, the baseline, rollouts, the bandit optimum, the script
  7. dpo.py: the DPO family on a bandit, IPO per token, the RPO term, the collapse diagnostics, the script, DDP
  8. gpro.py: GPRO on a bandit; GRPO's, RLOO's and GSPO's advantages, ratios, aggregations and clip against
     their formulas; the script
  9. compare.py: one tiny comparison, its tables from the runs' metrics, the redraw, without matplotlib
 10. diffusion_toy.py: every sampler's variance against its closed form, the script
 11. off the happy path: every bad value and failure ends in one line, nothing trained is lost
 12. the whole chain from an empty out_dir, and a task defined in the test
"""
import ast
import copy
import dataclasses
import errno
import json
import math
import os
import random
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

if not torch.cuda.is_available():  # the Triton kernels run in the CPU interpreter; it must be set before kernels loads
    os.environ.setdefault("TRITON_INTERPRET", "1")

import diffusion_toy as dt_mod  # noqa: E402
import compare  # noqa: E402
import dpo  # noqa: E402
import gpro  # noqa: E402
import gpt  # noqa: E402
import kernels  # noqa: E402
import ppo  # noqa: E402
import reward  # noqa: E402
import sft  # noqa: E402
import train  # noqa: E402
from diffusion_toy import (DiffusionConfig, ve_exact_variance, ve_limit, ve_step, ve_times, vp_oracle,  # noqa: E402
                           vp_posterior, vp_schedule, vp_step)
from gpt import (BOS, EOS, PAD, SEP, GPT, GPTConfig, decode, encode, generate, left_pad, lm_loss,  # noqa: E402
                 sequence_logprobs)
from train import TrainConfig, UserError  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
PROJECT = ("train", "kernels", "gpt", "sft", "reward", "ppo", "dpo", "gpro", "compare", "diffusion_toy")


def sampled_ids(logits):
    """The logits of the ids a response may hold, the ones sampling draws from: the real token ids (no padding of the
    vocabulary) but PAD, which fills finished rows."""
    z = logits[..., :gpt.N_TOKENS].clone()
    z[..., PAD] = -math.inf
    return z


def tiny(**kw):
    base = dict(block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32)
    return GPTConfig(**{**base, **kw})


ADD = sft.TaskConfig().build()  # the default task, 3-digit addition


def seeded_model(seed=0, **kw):
    torch.manual_seed(seed)
    return GPT(tiny(**kw)).eval()


def run_script(args, cwd, env=None, timeout=300, nproc=1, stdin=None):
    """Run a script the way a user does (with torchrun for nproc > 1), stdin its input (surrogate escapes give
    bytes that are not UTF-8); returns the CompletedProcess."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    return subprocess.run([sys.executable, *launcher, os.path.join(HERE, args[0]), *args[1:]], cwd=cwd, env=env,
                          input=stdin, capture_output=True, text=True, errors="surrogateescape", timeout=timeout)


def last_json_line(r):
    return json.loads(r.stdout.strip().splitlines()[-1])


def stage_dir(tmp_path, *checkpoints):
    """A fresh out_dir holding copies of the given checkpoints."""
    out = tmp_path / "out"
    out.mkdir()
    for path in checkpoints:
        shutil.copy(path, out)
    return out


# the tiny settings every end-to-end run uses: a 2-layer model, a few steps, the CPU
CPU = ["--device", "cpu"]
TINY_MODEL = ["--block_size", "32", "--n_layer", "2", "--n_embd", "32", "--n_head", "4", "--n_kv_head", "2"]
TINY_FLAGS = [*TINY_MODEL, "--batch_size", "4", "--max_steps", "4", "--eval_interval", "2", "--eval_batches", "2",
              "--warmup_steps", "1", "--sample_tokens", "8", *CPU]


# =============================================================================================
# 0. The files: imports point down the layers, one helper for the per-step random streams

def project_imports(name):
    """The project files that `name`.py imports, anywhere in it (also under `if __name__ == ...`)."""
    found = set()
    for node in ast.walk(ast.parse(open(os.path.join(HERE, f"{name}.py")).read())):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module.split(".")[0])
    return found & set(PROJECT)


def test_imports_point_down_the_layers_with_no_cycle():
    """The layers of the README, bottom up: train <- kernels <- gpt <- sft <- reward <- ppo, dpo, gpro
    (diffusion_toy on train only). Every import goes to a lower layer, so there is no cycle; train.py imports
    no project file, and kernels.py holds kernels only: no output helper of its own."""
    layer = {"train": 0, "kernels": 1, "diffusion_toy": 1, "gpt": 2, "sft": 3, "reward": 4, "ppo": 5, "dpo": 5,
             "gpro": 5, "compare": 6}
    imports = {name: project_imports(name) for name in PROJECT}
    assert imports["train"] == set() and imports["kernels"] == {"train"} and imports["diffusion_toy"] == {"train"}
    defined = {n.name for n in ast.parse(open(os.path.join(HERE, "kernels.py")).read()).body
               if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    assert not defined & {"print_table", "write_metrics", "atomic_write", "finite_or_none", "remove_quietly",
                          "parse_config", "usable_out_dir", "check"}
    for name, deps in imports.items():
        assert all(layer[d] < layer[name] for d in deps), (name, deps)


def test_per_step_random_streams_come_from_one_helper(monkeypatch):
    """No script writes the stream formula again; a stream is a pure function of (seed, step) and differs
    between the processes of a DDP run (RANK is how torchrun tells them apart)."""
    for name in PROJECT:
        if name != "train":
            assert "1_000_003" not in open(os.path.join(HERE, f"{name}.py")).read(), name
    data = [((a, a), [[1], [2]], [1.0, 0.0]) for a in range(1000)]
    batches = {}
    for r in ("0", "1"):
        monkeypatch.setenv("RANK", r)
        get = reward.comparison_batches(data, 8, seed=3)
        batches[r] = [get(i) for i in range(3)]
        assert get(1) == batches[r][1] and batches[r][0] != batches[r][1]
        assert [sft.sft_batches(sft.TaskConfig().build(), 4, 3)(i)[0].tolist() for i in range(2)] == \
            [sft.sft_batches(sft.TaskConfig().build(), 4, 3)(i)[0].tolist() for i in range(2)]
    assert batches["0"] != batches["1"]  # each process of a DDP run trains on its own comparisons


# =============================================================================================
# 1. train.py: flags, checkpoints, the training loop and exact resume

# ---------------------------------------------------------------------------------------------
# the training loop, checkpoints and resume

class Crash(Exception):
    pass


def tiny_run(tmp_path, steps, resume=False, init_seed=0, crash_at=None, eval_interval=3):
    torch.manual_seed(init_seed)
    model = GPT(tiny())
    data = torch.randint(0, 256, (5000,), generator=torch.Generator().manual_seed(1)).numpy().astype("uint16")
    get = gpt.corpus_batches(data, 4, model.cfg.block_size, seed=1)
    cfg = TrainConfig(max_steps=steps, batch_size=4, lr=1e-2, warmup_steps=2, eval_interval=eval_interval,
                      out_dir=str(tmp_path), resume=resume, seed=0, device="cpu")
    losses = []

    def loss_fn(net, batch):
        if len(losses) == crash_at:
            raise Crash  # the machine dies in the middle of training
        loss = lm_loss(net(batch[0]), batch[1])
        losses.append(loss.item())
        return loss, {"tokens": batch[0].numel()}

    result = train.train(model, cfg, get, loss_fn, ckpt_path=str(tmp_path / "m.pt"),
                         meta={"config": dataclasses.asdict(model.cfg)})
    return model, losses, result


def test_checkpoint_round_trip_and_exact_resume(tmp_path):
    straight, losses, figures = tiny_run(tmp_path / "a", 20)
    with pytest.raises(Crash):
        tiny_run(tmp_path / "b", 20, crash_at=10)  # dies in step 11, after the checkpoint of step 9
    # its fresh init is overwritten; validating at other steps is a change that resuming allows
    resumed, rest, resumed_figures = tiny_run(tmp_path / "b", 20, resume=True, init_seed=99, eval_interval=2)
    assert rest == pytest.approx(losses[9:], abs=1e-6)
    for (n, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), n
    # the reported loss is the mean of the last tenth of all 20 steps, not of the 11 since the resume
    assert figures["train_loss"] == pytest.approx(statistics.mean(losses[-2:]), abs=1e-6)
    assert resumed_figures["train_loss"] == pytest.approx(figures["train_loss"], abs=1e-6)
    loaded, ckpt = gpt.load_model(str(tmp_path / "a" / "m.pt"))
    assert ckpt["step"] == 20 and loaded.cfg == straight.cfg
    x = torch.randint(0, 256, (2, 10))
    assert torch.equal(loaded.eval()(x), straight.eval()(x))


def test_the_learning_curve_holds_every_validation_and_survives_a_resume(tmp_path):
    """result["curve"]: one entry per validation (every eval_interval steps and at the end) with its step, the
    training seconds so far and the figures evaluate() returned there; a resumed run's curve is the
    uninterrupted one's (the entries before the crash come from the checkpoint)."""
    x = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(5))

    def run(out, crash_at=None, resume=False):
        torch.manual_seed(0)
        model = GPT(tiny())
        data = torch.randint(0, 256, (5000,), generator=torch.Generator().manual_seed(1)).numpy().astype("uint16")
        cfg = TrainConfig(max_steps=7, batch_size=4, lr=1e-2, warmup_steps=2, eval_interval=3, out_dir=str(out),
                          resume=resume, seed=0, device="cpu")
        steps = []

        def loss_fn(net, batch):
            if len(steps) == crash_at:
                raise Crash
            steps.append(1)
            return lm_loss(net(batch[0]), batch[1]), {"tokens": batch[0].numel()}

        evaluate = lambda m: {"fixed_loss": lm_loss(m(x[:, :-1]), x[:, 1:]).item(), "note": "not a number"}
        result = train.train(model, cfg, gpt.corpus_batches(data, 4, 64, seed=1), loss_fn, evaluate,
                             str(out / "m.pt"), {"config": dataclasses.asdict(model.cfg)})
        return model, result

    model, result = run(tmp_path / "a")
    curve = result["curve"]
    assert [c["step"] for c in curve] == [3, 6, 7] and all(set(c) == {"step", "train_seconds", "fixed_loss"}
                                                           for c in curve)
    assert 0 < curve[0]["train_seconds"] < curve[1]["train_seconds"] < curve[2]["train_seconds"]
    assert curve[-1]["fixed_loss"] == pytest.approx(lm_loss(model.eval()(x[:, :-1]), x[:, 1:]).item(), abs=1e-6)
    with pytest.raises(Crash):
        run(tmp_path / "b", crash_at=4)
    _, resumed = run(tmp_path / "b", resume=True)
    assert [c["step"] for c in resumed["curve"]] == [3, 6, 7]
    assert [c["fixed_loss"] for c in resumed["curve"]] == pytest.approx([c["fixed_loss"] for c in curve], abs=1e-6)


def test_a_resume_is_refused_when_the_upstream_checkpoint_was_replaced(tmp_path):
    """A stage resumed after the checkpoint it was built from was trained again (sft.py --overwrite under an
    interrupted dpo.py) would continue on another reference model: refused, naming the field; an unchanged
    upstream resumes (its NaN metrics compare equal)."""
    cfg = TrainConfig(device="cpu", out_dir=str(tmp_path), resume=True)
    upstream = {"stage": "sft", "train_seconds": 12.5, "metrics": {"loss": 0.3, "kl": float("nan")}}
    train.save_checkpoint(str(tmp_path / "dpo.pt"), model={}, stage="dpo", built_from={"sft": upstream},
                          finished=False, step=2, max_steps=4, train_config=dataclasses.asdict(cfg))
    train.claim_checkpoint(str(tmp_path / "dpo.pt"), cfg, {"stage": "dpo", "built_from": {"sft": dict(upstream)}})
    retrained = {"sft": {**upstream, "train_seconds": 13.0}}
    with pytest.raises(UserError, match=r"built from another sft.pt .*built_from.sft.train_seconds=12.5.*--overwrite"):
        train.claim_checkpoint(str(tmp_path / "dpo.pt"), cfg, {"stage": "dpo", "built_from": retrained})


def test_resume_without_a_checkpoint_says_it_trains_from_scratch(tmp_path, capsys):
    train.claim_checkpoint(str(tmp_path / "m.pt"), TrainConfig(device="cpu", out_dir=str(tmp_path), resume=True))
    assert "m.pt does not exist, so this run trains from scratch" in capsys.readouterr().out


def test_checkpoints_keep_the_gpu_random_state_on_cuda(monkeypatch):
    """Dropout on a GPU draws from the CUDA generator: an exact resume restores it too (here a stand-in)."""
    gpu = {"state": torch.tensor([1, 2, 3], dtype=torch.uint8)}
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: gpu["state"].clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: gpu.update(state=state))
    saved = train.rng_state("cuda:0")
    assert torch.equal(saved["cuda"], gpu["state"]) and train.rng_state("cpu")["cuda"] is None
    gpu["state"] = torch.tensor([9], dtype=torch.uint8)
    cpu_draw = torch.rand(3)
    train.set_rng_state(saved, "cuda:0")
    assert torch.equal(gpu["state"], torch.tensor([1, 2, 3], dtype=torch.uint8)) and torch.equal(torch.rand(3),
                                                                                                  cpu_draw)


@pytest.mark.parametrize("name, tflops", [
    ("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 NVL", 835), ("NVIDIA H100 PCIe", 756), ("NVIDIA H200", 989),
    ("NVIDIA H200 NVL", 835), ("NVIDIA GH200 480GB", 989), ("NVIDIA A100-SXM4-80GB", 312), ("NVIDIA A10", 125),
    ("NVIDIA A10G", 125), ("NVIDIA L4", 121), ("NVIDIA L40", 181), ("NVIDIA L40S", 362), ("Tesla T4", 65)])
def test_peak_flops_are_read_from_the_most_specific_device_name(monkeypatch, name, tflops):
    """Vendor datasheets' dense bf16 (fp16 on T4) figures: an H200 NVL is not an H200 SXM, an L40 not an L4."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: name)
    assert train.device_peak_flops("cuda:0") == (tflops * 1e12, name)


def test_the_largest_seed_gives_valid_streams_on_any_rank_and_step(monkeypatch):
    monkeypatch.setenv("RANK", "4095")
    g = train.step_generator(train.SEED_LIMIT - 1, 10 ** 12)
    assert g.initial_seed() == ((train.SEED_LIMIT - 1 + 7919 * 4095) * 1_000_003 + 10 ** 12) % 2 ** 64
    assert train.step_rng(train.SEED_LIMIT - 1, 10 ** 12).random() < 1


def test_corrupt_and_mismatched_checkpoints_give_clear_errors(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="corrupt"):
        gpt.load_model(str(bad))
    with pytest.raises(UserError, match="does not exist"):
        gpt.load_model(str(tmp_path / "missing.pt"))
    model = GPT(tiny())
    train.save_checkpoint(str(tmp_path / "m.pt"), model=model.state_dict(),
                        config={**dataclasses.asdict(model.cfg), "n_embd": 64})
    with pytest.raises(UserError, match="does not match"):
        gpt.load_model(str(tmp_path / "m.pt"))
    assert not list(tmp_path.glob("*.tmp"))  # written atomically


def test_checkpoint_round_trip_with_every_switch_on(tmp_path):
    model = seeded_model(n_expert=3, expert_top_k=2, attention="linear", prefix_lm=True, parallel_block=True,
                         logit_scale=True)
    train.save_checkpoint(str(tmp_path / "m.pt"), model=model.state_dict(), config=dataclasses.asdict(model.cfg))
    loaded, _ = gpt.load_model(str(tmp_path / "m.pt"))
    x = torch.tensor([[BOS, 5, 6, SEP, 7, 8]])
    assert loaded.cfg == model.cfg and torch.equal(loaded.eval()(x), model(x))


def test_checkpoint_config_without_a_field_gets_its_default(tmp_path):
    model = seeded_model()
    cfg = {k: v for k, v in dataclasses.asdict(model.cfg).items() if k not in SWITCHES}
    train.save_checkpoint(str(tmp_path / "old.pt"), model=model.state_dict(), config=cfg)
    loaded, _ = gpt.load_model(str(tmp_path / "old.pt"))
    x = torch.randint(0, 256, (2, 12))
    assert loaded.cfg == model.cfg and torch.equal(loaded.eval()(x), model(x))


def test_optimizer_groups_scale_the_schedule_and_decay_only_matrices(tmp_path):
    """make_optimizer([(module, lr_scale), ...]): each module learns at its multiple of the schedule (ppo.py's
    critic), weight decay on matrices only; the schedule warms up linearly, then decays by a cosine."""
    a, b = nn.Linear(3, 3), nn.Linear(3, 3)
    cfg = TrainConfig(lr=1e-2, min_lr=1e-3, warmup_steps=2, max_steps=10, weight_decay=0.5, device="cpu")
    run = train.Trainer(nn.Sequential(a, b), cfg, groups=[(a, 1.0), (b, 10.0)])
    run.optimizer_step(lambda micro: ((a(torch.ones(1, 3)) + b(torch.ones(1, 3))).sum(), {}))
    lrs = {(id(g["params"][0]), g["weight_decay"]): g["lr"] for g in run.optimizer.param_groups}
    assert lrs == {(id(a.weight), 0.5): 5e-3, (id(a.bias), 0.0): 5e-3,
                   (id(b.weight), 0.5): 5e-2, (id(b.bias), 0.0): 5e-2}
    assert [train.lr_at(s, cfg) for s in (0, 1)] == [5e-3, 1e-2] and train.lr_at(10, cfg) == pytest.approx(1e-3)
    assert train.lr_at(6, cfg) == pytest.approx(1e-3 + 0.5 * (1 + math.cos(math.pi / 2)) * 9e-3)
    timed = dataclasses.replace(cfg, max_seconds=100.0)  # half the time budget spent: the cosine's middle
    assert train.lr_at(3, timed, seconds=50.0) == pytest.approx(1e-3 + 0.5 * 9e-3)
    run.finish()


def test_float16_scales_the_loss_on_its_own_device_and_skips_an_overflowing_step():
    """--dtype float16 (GPUs without bf16; the CPU here): the loss is multiplied by the scaler's 2^16 (notes 7;
    Micikevicius et al. 2018); a step whose scaled fp16 gradient overflows leaves the weights as they were and
    halves the scale, and the next step applies."""
    lin = nn.Linear(4, 1)
    cfg = TrainConfig(dtype="float16", device="cpu", max_steps=10, warmup_steps=0, grad_clip=0.0, weight_decay=0.0)
    run = train.Trainer(lin, cfg)
    assert run.scaler.is_enabled() and run.scaler.get_scale() == 2.0 ** 16
    before = lin.weight.detach().clone()
    run.optimizer_step(lambda micro: (lin(torch.full((1, 4), 1000.0)).sum(), {}))  # gradient 1000 * 2^16 > 65504
    assert torch.equal(lin.weight, before) and run.scaler.get_scale() == 2.0 ** 15
    run.optimizer_step(lambda micro: (lin(torch.ones(1, 4)).sum(), {}))
    assert not torch.equal(lin.weight, before) and run.scaler.get_scale() == 2.0 ** 15
    run.finish()


def test_train_mode_false_trains_in_eval_mode():
    """Trainer(train_mode=False), the alignment stages': dropout off while the model trains (the loss is the
    eval-mode forward's) and after validation; the default trains in train mode."""
    model = seeded_model(dropout=0.5)
    x = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        want = lm_loss(model(x[:, :-1]), x[:, 1:]).item()                 # eval mode: no dropout
    run = train.Trainer(model, TrainConfig(device="cpu", max_steps=2, warmup_steps=0), train_mode=False)
    loss, _ = run.optimizer_step(lambda micro: (lm_loss(run.net(x[:, :-1]), x[:, 1:]), {}))
    run.validate(lambda m: {})
    assert loss == want and not model.training
    run.finish()
    default = train.Trainer(seeded_model(), TrainConfig(device="cpu"))
    assert default.model.training
    default.finish()


def test_corrupt_checkpoint_on_resume_is_a_clear_error(tmp_path):
    (tmp_path / "gpt.pt").write_bytes(b"\x00" * 100)
    corpus = tmp_path / "c.txt"
    corpus.write_text("abcdefgh " * 2000)
    r = run_script(["gpt.py", "--data", str(corpus), "--out_dir", str(tmp_path), "--resume", "--block_size", "32",
                    "--n_layer", "1", "--max_steps", "2", *CPU], cwd=tmp_path)
    assert r.returncode == 2 and "corrupt" in r.stderr and "Traceback" not in r.stderr


# =============================================================================================
# 2. kernels.py

# ---------------------------------------------------------------------------------------------
# the command line; the kernels need no GPU to be checked: compile check, CPU interpreter, dispatch; on a GPU, compiled

GPU = torch.cuda.is_available()
needs_triton = pytest.mark.skipif(not kernels.HAS_TRITON, reason="triton is not installed (pip install triton): "
                                  "the kernels cannot run, not even in the interpreter")
needs_interpreter = pytest.mark.skipif(not kernels.INTERPRET, reason="runs the kernels in Triton's CPU interpreter "
                                       "(TRITON_INTERPRET=1), which this process does not use")
needs_gpu = pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")


def rel_err(a, b):
    """max|a - b| / max|b|, the denominator floored at 0.01: for T = 1 the reference dQ and dK are
    exactly zero and the kernel's are float32 rounding noise (dP - delta ~ 1e-7)."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-2)).item()


def qkv(B, H, Hkv, Tq, Tk, D, seed, dtype=torch.float32, device="cpu"):
    g = torch.Generator(device=device).manual_seed(seed)
    return [torch.randn(B, h, T, D, generator=g, device=device).to(dtype).requires_grad_()
            for h, T in ((H, Tq), (Hkv, Tk), (Hkv, Tk))]


def output_and_grads(fn, q, k, v, do):
    o = fn(q, k, v)
    return [o, *torch.autograd.grad(o, (q, k, v), do)]


def reference_and_grads(q, k, v, do, causal=True, scale=None):
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    return output_and_grads(lambda q, k, v: kernels.reference_attention(q, k, v, causal, scale=scale),
                            q64, k64, v64, do.double())


def test_importing_kernels_does_not_turn_on_the_interpreter():
    """Only `python kernels.py` without a GPU, or the caller, asks for Triton's interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", "import kernels, os; print(kernels.INTERPRET, "
                          "os.environ.get('TRITON_INTERPRET'))"], cwd=HERE, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "None"]


def test_kernels_cli_bad_flag_is_one_error_line():
    out = subprocess.run([sys.executable, "kernels.py", "--bogus"], cwd=HERE, capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr == "error: unrecognized arguments: --bogus (see --help)\n", out.stderr


@pytest.mark.parametrize("args, says", [(["--head_dims", "48"], "not supported"),
                                        (["--kv_heads", "3"], "do not divide"),
                                        (["--seq_lens", "1k"], "comma-separated"),
                                        (["--n_head", "x"], "invalid int value")])
def test_kernels_cli_bad_values_are_one_error_line(args, says, capsys):
    with pytest.raises(SystemExit) as stop:
        train.run_main(lambda: kernels.main(args))
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1 and says in err, err


def test_kernels_cli_flags_reach_the_config():
    cfg, = train.parse_args([kernels.KernelsConfig()], ["--kv_heads", "8,2", "--head_dims", "128", "--fp32",
                                                       "--compile_check"])
    assert cfg.kvs() == [8, 2] and cfg.dims() == [128] and cfg.fp32 and cfg.compile_check and not cfg.fp8


def test_metrics_are_one_strict_json_line(tmp_path, capsys):
    train.write_metrics("kernels", {"x": float("nan"), "rows": [{"y": float("inf"), "z": 1.5}]}, str(tmp_path))
    line = capsys.readouterr().out
    assert line.count("\n") == 1 and "NaN" not in line and "Infinity" not in line
    saved = (tmp_path / "kernels_metrics.json").read_text()
    assert saved == line and json.loads(saved) == {"stage": "kernels", "x": None, "rows": [{"y": None, "z": 1.5}]}
    assert os.listdir(tmp_path) == ["kernels_metrics.json"]  # the temporary file was renamed


# ---------------------------------------------------------------------------------------------
# The compile check: no GPU needed

@needs_triton
def test_compile_check_sm90_sm80_kept_tiles_compile_fit_use_wgmma_and_do_not_spill():
    """Every kept tile of every kernel compiles for sm_90 and sm_80; its shared memory fits the
    target's limit; on sm_90 every dot is a wgmma (each tile of every kernel has >= 64 rows: no
    mma.sync fallback is left); nothing spills in bf16 at head dims 64 and 128; GQA's dK/dV add
    atomically and MHA's store. (fp16 compiles to the same registers and shared memory as bf16, and the
    non-causal kernels are the causal ones less the mask: `python kernels.py --compile_check` has both.)"""
    rows = kernels.compile_check(targets=(90, 80), dtypes=("bf16",), head_dims=(64, 128), causals=(True,),
                                 groups=(1, 4))
    expected = 0
    for target, head_dim in ((90, 64), (90, 128), (80, 64), (80, 128)):
        for tiles in (kernels.FWD_TILES, kernels.DQ_TILES):
            expected += len(kernels._tiles_for(tiles, target, head_dim))
        expected += 1 + 2 * len(kernels._tiles_for(kernels.DKDV_TILES, target, head_dim))  # delta; dK/dV x 2 groups
    assert len(rows) == expected
    for r in rows:
        where = f"{r['kernel']} {r['BLOCK_M']}x{r['BLOCK_N']} w{r['num_warps']} s{r['num_stages']} {r['target']} " \
                f"D={r['head_dim']} group {r['group']}: {r}"
        assert "error" not in r, where
        assert r["regs"] is not None and r["spill_stores"] == 0 and r["spill_loads"] == 0, where
        assert 0 < r["smem"] <= kernels.SMEM_LIMITS[int(r["target"][3:])] or r["kernel"] == "delta", where
        if r["target"] == "sm_90" and r["kernel"] != "delta":
            assert r["needs_wgmma"] and r["wgmma"] > 0 and r["mma_sync"] == 0, where
        if r["kernel"] == "dkdv":
            assert (r["atomics"] > 0) == (r["group"] > 1), where
        assert r["ok"], where


# ---------------------------------------------------------------------------------------------
# Correctness in Triton's CPU interpreter: fp32 against the float64 reference

@needs_triton
@needs_interpreter
@pytest.mark.parametrize("B, H, Hkv, Tq, Tk, D, causal, scale", [
    (1, 2, 2, 1, 1, 16, True, None),        # T = 1
    (2, 4, 1, 1, 1, 64, False, None),
    (2, 4, 2, 17, 17, 16, True, None),      # group 2, one partial tile
    (1, 4, 1, 17, 17, 64, False, 0.3),      # MQA (group 4), non-causal, a softmax scale
    (1, 4, 2, 17, 17, 128, True, None),
    (1, 2, 2, 130, 130, 16, True, None),    # MHA, several tiles and masked tails
    (1, 4, 1, 130, 130, 64, False, None),
    (1, 4, 2, 130, 130, 32, True, 0.05),
    (1, 2, 2, 130, 130, 128, True, None),
    (1, 4, 1, 130, 130, 128, False, None),
    (1, 4, 2, 9, 40, 16, True, None),       # prefill into a KV cache: causal mask aligned bottom-right
    (1, 4, 4, 24, 130, 128, True, None),
    (2, 4, 1, 1, 33, 64, True, None),       # decode: one query against the cache
    (1, 2, 1, 24, 56, 32, False, None),     # Tq != Tk without a mask
    (1, 4, 2, 130, 17, 64, False, None),    # more queries than keys
])
def test_flash_matches_reference(B, H, Hkv, Tq, Tk, D, causal, scale):
    q, k, v = qkv(B, H, Hkv, Tq, Tk, D, seed=Tq * 1000 + Tk + D)
    do = torch.randn(B, H, Tq, D, generator=torch.Generator().manual_seed(1))
    ours = output_and_grads(lambda q, k, v: kernels.flash_attention(q, k, v, causal, scale), q, k, v, do)
    ref = reference_and_grads(q, k, v, do, causal, scale)
    for name, a, b in zip(("O", "dQ", "dK", "dV"), ours, ref):
        assert a.shape == b.shape and a.dtype == torch.float32
        assert rel_err(a, b) < 1e-4, f"{name}: relative error {rel_err(a, b):.2e}"


@needs_triton
@needs_interpreter
def test_flash_gqa_reads_shared_heads_without_copies():
    """GQA equals MHA on explicitly repeated K/V, with dK/dV summed over the group (the group's query
    heads add into fp32 buffers atomically, and a second backward starts again from zero), and what
    the kernel keeps for backward holds only the n_kv_head heads (no repeated copy)."""
    B, H, Hkv, T, D = 2, 4, 1, 40, 16
    q, k, v = qkv(B, H, Hkv, T, T, D, seed=3)
    do = torch.randn(B, H, T, D, generator=torch.Generator().manual_seed(4))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        gqa = output_and_grads(kernels.flash_attention, q, k, v, do)
    assert sorted(saved) == sorted([(B, H, T, D), (B, Hkv, T, D), (B, Hkv, T, D), (B, H, T, D), (B, H, T)])
    assert gqa[2].shape == gqa[3].shape == (B, Hkv, T, D) and gqa[2].dtype == k.dtype
    repeated = lambda q, k, v: kernels.flash_attention(q, k.repeat_interleave(H // Hkv, 1),  # noqa: E731
                                                       v.repeat_interleave(H // Hkv, 1))
    mha = output_and_grads(repeated, q, k, v, do)
    for a, b in zip(gqa, mha):
        assert rel_err(a, b) < 1e-5
    again = output_and_grads(kernels.flash_attention, q, k, v, do)
    for a, b in zip(gqa, again):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# Dispatch

@needs_triton
def test_dispatch_routes_and_forced_paths(monkeypatch):
    q, k, v = qkv(1, 4, 2, 8, 8, 16, seed=5)
    mask = torch.ones(8, 8, dtype=torch.bool)
    for impl in ("auto", "triton"):  # what the kernel does not compute goes to SDPA
        monkeypatch.setenv("ATTN_IMPL", impl)
        assert kernels.select_path(q, k, v, mask=mask)[0] == "sdpa"
        assert kernels.select_path(q, k, v, dropout_p=0.1)[0] == "sdpa"
        assert kernels.select_path(*qkv(1, 4, 2, 8, 8, 8, seed=5))[0] == "sdpa"  # head_dim 8
    monkeypatch.setenv("ATTN_IMPL", "auto")
    assert kernels.select_path(q, k, v) == ("sdpa", "no CUDA tensor")  # auto: the kernel only on CUDA tensors
    if not kernels.INTERPRET:
        return  # the forced paths below run the kernel on these CPU tensors
    calls = []

    def spy(name):
        fn = getattr(kernels, name)
        return lambda *args, **kwargs: calls.append(name) or fn(*args, **kwargs)

    for name in ("flash_attention", "sdpa_attention", "reference_attention"):
        monkeypatch.setattr(kernels, name, spy(name))
    expected = kernels.reference_attention(q, k, v)
    for impl, name in (("triton", "flash_attention"), ("sdpa", "sdpa_attention"),
                       ("reference", "reference_attention")):
        monkeypatch.setenv("ATTN_IMPL", impl)
        calls.clear()
        out = kernels.attention(q, k, v)
        assert calls == [name]
        assert rel_err(out, expected) < 1e-4
    monkeypatch.setenv("ATTN_IMPL", "triton")
    calls.clear()
    kernels.attention(q, k, v, mask=mask)
    assert calls == ["sdpa_attention"]
    monkeypatch.setenv("ATTN_IMPL", "flash")
    with pytest.raises(ValueError):
        kernels.attention(q, k, v)


def test_auto_sends_float32_to_sdpa_unless_the_kernel_is_forced(monkeypatch):
    """--dtype float32 on a GPU: the fp32 tiles spill and overflow sm_90's shared memory, so auto takes SDPA for
    CUDA tensors in fp32 (a stand-in for one here), not in bf16 or fp16; ATTN_IMPL=triton still runs the kernel."""
    monkeypatch.setattr(kernels, "HAS_TRITON", True)
    monkeypatch.setattr(kernels, "gpu_unsupported", lambda device: "")
    on_gpu = lambda dtype: types.SimpleNamespace(is_cuda=True, device="cuda:0", dtype=dtype)  # noqa: E731
    assert "float32" in kernels._device_unsupported(on_gpu(torch.float32))
    assert [kernels._device_unsupported(on_gpu(dtype)) for dtype in (torch.bfloat16, torch.float16)] == ["", ""]
    if kernels.INTERPRET:
        monkeypatch.setenv("ATTN_IMPL", "triton")
        assert kernels.select_path(*qkv(1, 4, 2, 8, 8, 16, seed=5)) == ("triton", "ATTN_IMPL")


def test_gpu_below_compute_capability_8_is_not_tried(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert kernels.gpu_unsupported("cuda:0") == "compute capability 7.5 < 8.0"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert kernels.gpu_unsupported("cuda:0") == ""


def _kernel_fails(*args, **kwargs):
    raise RuntimeError("PTXASError: ptxas fatal: entry function uses too much shared data\nsecond line")


@pytest.fixture
def fresh_dispatch(monkeypatch):
    """A dispatch that has announced nothing and seen no failure, on which auto takes the kernel for
    these tensors (CUDA ones on a GPU; CPU ones in the interpreter)."""
    monkeypatch.setattr(kernels, "_failed", {})
    monkeypatch.setattr(kernels, "_announced", set())
    monkeypatch.setattr(kernels, "_device_unsupported", lambda q: "")
    monkeypatch.setenv("ATTN_IMPL", "auto")


def _dispatch_inputs():
    device, dtype = ("cuda", torch.bfloat16) if GPU else ("cpu", torch.float32)
    q, k, v = qkv(1, 4, 2, 33, 33, 64, seed=7, dtype=dtype, device=device)
    return q, k, v, torch.randn_like(q)


@needs_triton
def test_dispatch_falls_back_to_sdpa_with_one_line_when_the_forward_fails(monkeypatch, capsys, fresh_dispatch):
    q, k, v, do = _dispatch_inputs()
    assert kernels.select_path(q, k, v) == ("triton", "auto")
    monkeypatch.setattr(kernels, "_flash_forward", _kernel_fails)
    outs = [kernels.attention(q, k, v) for _ in range(3)]
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and "sdpa" in lines[0] and "failed" in lines[0] and "too much shared data" in lines[0]
    assert "second line" not in lines[0]
    assert kernels.select_path(q, k, v)[0] == "sdpa"  # that class of calls no longer tries the kernel
    expected = kernels.sdpa_attention(q, k, v)
    assert all(torch.equal(o, expected) for o in outs)
    monkeypatch.setenv("ATTN_IMPL", "triton")  # forced: strict
    with pytest.raises(RuntimeError, match="too much shared data"):
        kernels.attention(q, k, v)


@needs_triton
def test_dispatch_backward_failure_recomputes_gradients_with_sdpa(monkeypatch, capsys, fresh_dispatch):
    if not (GPU or kernels.INTERPRET):
        pytest.skip("the forward kernel needs a GPU or the interpreter")
    q, k, v, do = _dispatch_inputs()
    monkeypatch.setattr(kernels, "_flash_backward", _kernel_fails)
    ours = output_and_grads(kernels.attention, q, k, v, do)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and "path: triton" in lines[0] and "failed" in lines[1] and "sdpa" in lines[1]
    ref = reference_and_grads(q, k, v, do)
    for name, a, b in zip(("O", "dQ", "dK", "dV"), ours, ref):
        assert rel_err(a, b) < (2e-2 if GPU else 1e-4), name
    monkeypatch.setenv("ATTN_IMPL", "triton")  # forced: the backward raises
    with pytest.raises(RuntimeError, match="too much shared data"):
        output_and_grads(kernels.attention, q, k, v, do)


# ---------------------------------------------------------------------------------------------
# On a GPU: the compiled kernel in bf16 and fp16 against the float64 reference

@needs_gpu
@pytest.mark.parametrize("dtype, B, H, Hkv, Tq, Tk, D, causal", [
    (torch.bfloat16, 2, 8, 2, 1000, 1000, 128, True),   # GQA, T not a multiple of any tile
    (torch.bfloat16, 1, 4, 4, 4096, 4096, 64, True),    # MHA, long
    (torch.bfloat16, 1, 8, 1, 777, 777, 64, False),     # MQA, full
    (torch.bfloat16, 1, 4, 2, 300, 1100, 128, True),    # prefill into a cache
    (torch.float16, 2, 8, 2, 1000, 1000, 128, True),
    (torch.float16, 1, 4, 2, 300, 1100, 128, True),
])
def test_flash_on_gpu_matches_reference(monkeypatch, dtype, B, H, Hkv, Tq, Tk, D, causal):
    """Within bf16 / fp16 rounding of the float64 reference on the same inputs, and no worse than twice
    SDPA's error plus a margin; auto dispatch takes the kernel and does not fall back."""
    q, k, v = qkv(B, H, Hkv, Tq, Tk, D, seed=Tq + D, dtype=dtype, device="cuda")
    do = torch.randn_like(q)
    monkeypatch.setattr(kernels, "_failed", {})
    monkeypatch.setenv("ATTN_IMPL", "auto")
    assert kernels.select_path(q, k, v, causal) == ("triton", "auto")
    ours = output_and_grads(lambda q, k, v: kernels.attention(q, k, v, causal), q, k, v, do)
    assert not kernels._failed
    sdpa = output_and_grads(lambda q, k, v: kernels.sdpa_attention(q, k, v, causal), q, k, v, do)
    ref = reference_and_grads(q, k, v, do, causal)
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-2
    for name, a, s, b in zip(("O", "dQ", "dK", "dV"), ours, sdpa, ref):
        assert a.dtype == dtype and torch.isfinite(a).all(), name
        err, sdpa_err = rel_err(a, b), rel_err(s, b)
        assert err < tol and err < 2 * sdpa_err + 2e-3, f"{name}: {err:.2e} (SDPA {sdpa_err:.2e})"


@needs_triton
@needs_interpreter
def test_gpt_trains_the_same_with_triton_and_sdpa(monkeypatch):
    cfg = GPTConfig(block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)  # head_dim 16
    idx = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(6))
    losses = {}
    for impl in ("sdpa", "triton"):
        monkeypatch.setenv("ATTN_IMPL", impl)
        torch.manual_seed(0)
        model = GPT(cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        losses[impl] = []
        for _ in range(4):
            loss = lm_loss(model(idx[:, :-1]), idx[:, 1:])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses[impl].append(loss.item())
    assert losses["triton"][-1] < losses["triton"][0]
    assert max(abs(a - b) for a, b in zip(losses["sdpa"], losses["triton"])) < 1e-4, losses




# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# FP8 scaled casts and matmul (notes 7)

# Round to nearest with m mantissa bits errs by at most half the ULP@1 of notes Table 4, relatively:
# e4m3 ULP@1 = 2^-3 -> 2^-4, e5m2 ULP@1 = 2^-2 -> 2^-3 (for numbers in the normal range).
FP8_REL = {"e4m3": 2 ** -4, "e5m2": 2 ** -3}
FP8_MAX = {"e4m3": 448.0, "e5m2": 57344.0}
FP8_MIN_NORMAL = {"e4m3": 2.0 ** -6, "e5m2": 2.0 ** -14}


def spread_rows(n, d, seed, decades=3):
    """(n, d) Gaussian rows whose scales span `decades` orders of magnitude."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) * 10 ** (decades * torch.rand(n, 1, generator=g) - decades / 2)


def ref_scale(x, fmt, scaling):
    """S = fp8 max / amax, computed independently in float64."""
    amax = x.double().abs().amax(-1, keepdim=True) if scaling == "channel" else x.double().abs().amax()
    return FP8_MAX[fmt] / amax


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("scaling", ["tensor", "channel"])
def test_fp8_scaled_cast_round_trip_within_format_precision(fmt, scaling):
    x = spread_rows(64, 128, seed=0)
    x8, s = kernels.to_fp8(x, fmt, scaling)
    assert x8.dtype == kernels.FP8_DTYPES[fmt] and x8.shape == x.shape
    back = kernels.from_fp8(x8, s)
    normal = (x.double() * ref_scale(x, fmt, scaling)).abs() >= FP8_MIN_NORMAL[fmt]  # in the normal range
    assert normal.float().mean() > 0.5
    rel = ((back.double() - x.double()).abs() / x.double().abs())[normal]
    assert rel.max() <= FP8_REL[fmt] * (1 + 1e-5), rel.max()  # fp32 multiply/divide by S: ~1e-7
    assert rel.max() > 0.5 * FP8_REL[fmt]  # really rounded to 1 + m bits (bf16 would err 16x less)


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_fp8_scale_maps_amax_to_the_format_max_and_zeros_stay_finite(fmt):
    x = spread_rows(16, 40, seed=1)
    for scaling in ("tensor", "channel"):
        x8, s = kernels.to_fp8(x, fmt, scaling)
        assert torch.allclose(s.double(), ref_scale(x, fmt, scaling), rtol=1e-6)
        at_max = x.abs() == (x.abs().amax(-1, keepdim=True) if scaling == "channel" else x.abs().amax())
        assert at_max.sum() >= (16 if scaling == "channel" else 1)
        assert (x8.float().abs()[at_max] == FP8_MAX[fmt]).all()  # amax lands exactly on the largest value
        assert x8.float().abs().max() == FP8_MAX[fmt]
    x[3] = 0.0  # a silent channel, and then an all-zero tensor
    for z, scaling in ((x, "channel"), (torch.zeros(16, 40), "tensor"), (torch.zeros(16, 40), "channel")):
        x8, s = kernels.to_fp8(z, fmt, scaling)
        back = kernels.from_fp8(x8, s)
        assert torch.isfinite(s).all() and torch.isfinite(back).all()
        assert (back[3] == 0).all()
        o = kernels.fp8_matmul(z, z, fmt, scaling)
        assert torch.isfinite(o).all() and (o[3] == 0).all() and (o[:, 3] == 0).all()


@pytest.mark.parametrize("fmt, ratio", [("e4m3", 1e5), ("e5m2", 1e10)])
def test_fp8_per_channel_scaling_keeps_the_quiet_rows_that_per_tensor_loses(fmt, ratio):
    """4 token rows louder than the rest by more than the format's normal range (max / smallest normal):
    one per-tensor scale pushes the quiet rows below the normal range, one scale per row does not."""
    assert ratio > FP8_MAX[fmt] / FP8_MIN_NORMAL[fmt]
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(64, 128, generator=g), torch.randn(32, 128, generator=g) / math.sqrt(128)
    x[:4] *= ratio
    ref = x.double() @ w.double().t()
    err = {}
    for scaling in ("none", "tensor", "channel"):
        o = kernels.fp8_matmul(x, w, fmt, scaling).double()
        quiet = ((o[4:] - ref[4:]).norm() / ref[4:].norm()).item()
        loud = ((o[:4] - ref[:4]).norm() / ref[:4].norm()).item()
        cast = kernels.from_fp8(*kernels.to_fp8(x, fmt, scaling))[4:]
        err[scaling] = quiet, loud, ((cast - x[4:]).norm() / x[4:].norm()).item()
    assert err["channel"][0] < 2 * FP8_REL[fmt] and err["channel"][2] < FP8_REL[fmt]
    assert err["tensor"][0] > 3 * err["channel"][0] and err["tensor"][2] > 3 * err["channel"][2]  # the quiet rows
    assert err["tensor"][1] < 2 * FP8_REL[fmt] and err["channel"][1] < 2 * FP8_REL[fmt]  # loud rows fine in both
    assert err["none"][1] > 0.5  # unscaled: the loud rows saturate at the format's max


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("scaling", ["tensor", "channel"])
def test_fp8_matmul_emulation_within_the_derived_error_bound(fmt, scaling):
    """Each operand errs by at most e = u|a| + eta/S elementwise (u = 2^-(m+1) in the normal range, eta =
    half the subnormal spacing below it, in scaled units), so |O8 - O| <= |X| e_W^T + e_X |W|^T + e_X e_W^T."""
    x, w = spread_rows(24, 64, seed=3), spread_rows(40, 64, seed=4)  # n != d_out: a wrong outer product fails
    o8 = kernels.fp8_matmul(x, w, fmt, scaling).double()
    X, W = x.double(), w.double()
    u, eta = FP8_REL[fmt], FP8_MIN_NORMAL[fmt] * 2 * FP8_REL[fmt] / 2
    ex, ew = u * X.abs() + eta / ref_scale(x, fmt, scaling), u * W.abs() + eta / ref_scale(w, fmt, scaling)
    bound = X.abs() @ ew.t() + ex @ W.abs().t() + ex @ ew.t() + 1e-5 * X.abs() @ W.abs().t()  # + fp32 sums
    err = (o8 - X @ W.t()).abs()
    assert (err <= bound).all(), (err / bound).max()
    assert (err / bound).max() > 0.05  # the bound is not vacuous: the inputs really were rounded to FP8


def test_fp8_per_channel_matmul_is_exactly_equivariant_to_power_of_two_row_scales():
    """Per channel, scaling a row of X or W by 2^k scales its S by 2^-k: the same float8 values, and the
    output row or column scaled by exactly 2^k. One scale per tensor does not have this property."""
    g = torch.Generator().manual_seed(5)
    x, w = torch.randn(16, 32, generator=g), torch.randn(24, 32, generator=g)
    dx = 2.0 ** torch.randint(-20, 21, (16, 1), generator=g).float()
    dw = 2.0 ** torch.randint(-20, 21, (24, 1), generator=g).float()
    for fmt in ("e4m3", "e5m2"):
        o = kernels.fp8_matmul(x, w, fmt, "channel")
        assert torch.equal(kernels.fp8_matmul(dx * x, dw * w, fmt, "channel"), dx * o * dw.t())
        per_tensor = kernels.fp8_matmul(dx * x, dw * w, fmt, "tensor")
        assert not torch.equal(per_tensor, dx * kernels.fp8_matmul(x, w, fmt, "tensor") * dw.t())


@pytest.mark.parametrize("scaling", ["tensor", "channel"])
def test_fp8_scaled_mm_call_conventions_match_the_emulation(scaling):
    """The hardware call (inverse scales, column-major second operand, scale shapes) gives the emulation's
    result. Runs where torch._scaled_mm runs: FP8 GPUs, and recent CPU builds of torch."""
    device = "cuda" if torch.cuda.is_available() and not kernels.fp8_gemm_unsupported(
        torch.zeros(16, 16, device="cuda"), torch.zeros(16, 16, device="cuda")) else "cpu"
    x, w = spread_rows(32, 64, seed=6).to(device), spread_rows(48, 64, seed=7).to(device)
    (x8, sx), (w8, sw) = kernels.to_fp8(x, "e4m3", scaling), kernels.to_fp8(w, "e4m3", scaling)
    try:
        hw = kernels._scaled_mm(x8, sx, w8, sw)
    except (RuntimeError, NotImplementedError) as e:
        pytest.skip(f"torch._scaled_mm does not run on {device}: {str(e).splitlines()[0]}")
    emulated = (x8.double() @ w8.double().t()) / (sx.double() * sw.double().t())
    tol = 2 ** -8 if scaling == "channel" else 1e-5  # row-wise output is bf16
    assert ((hw.double() - emulated).abs() <= tol * (x8.double().abs() @ w8.double().abs().t())
            / (sx.double() * sw.double().t())).all()


# =============================================================================================
# 3. gpt.py

# ---------------------------------------------------------------------------------------------
# tokenizer and config

def test_tokenizer_round_trip_and_invalid_bytes():
    for text in ["", "hello world", "def f(x):\n\treturn x ** 2  # ünïcödé ✓ 漢字 🙂", "\x00\xff"]:
        ids = encode(text, bos=True, eos=True)
        assert ids[0] == BOS and ids[-1] == EOS and all(0 <= i < 256 for i in ids[1:-1])
        assert decode(ids) == text
    assert decode([0xFF, 0xC3, ord("a")]) == "\ufffd\ufffda"  # invalid UTF-8 never raises
    assert decode([ord("a"), EOS, ord("b")], special=True) == "a<eos>b"
    assert GPTConfig().vocab_size % 64 == 0 and GPTConfig().vocab_size >= gpt.N_TOKENS
    assert len({BOS, EOS, PAD}) == 3 and min(BOS, EOS, PAD) >= 256


@pytest.mark.parametrize("kw, words", [
    (dict(n_embd=30, n_head=4), "divisible by n_head"),
    (dict(n_head=4, n_kv_head=3), "divisible by n_kv_head"),
    (dict(n_embd=36, n_head=4, n_kv_head=4), "even head_dim"),
    (dict(norm="batchnorm"), "norm="),
    (dict(ffn="moe"), "ffn="),
    (dict(pos_emb="alibi"), "pos_emb="),
    (dict(norm_placement="sandwich"), "norm_placement="),
    (dict(n_layer=0), "n_layer"),
    (dict(dropout=1.5), "dropout"),
    (dict(vocab_size=100), "vocab_size"),
    (dict(attention="performer"), "attention="),
    (dict(n_expert=-1), "n_expert"),
    (dict(n_expert=2, expert_top_k=3), "expert_top_k"),
    (dict(n_expert=2, expert_top_k=0), "expert_top_k"),
    (dict(n_expert=2, expert_capacity=-1.0), "expert_capacity"),
    (dict(n_expert=2, moe_aux_coef=-0.1), "moe_aux_coef"),
    (dict(parallel_block=True, norm_placement="post"), "parallel_block"),
])
def test_model_config_rejects_bad_values(kw, words):
    with pytest.raises(UserError, match=words):
        tiny(**kw)


def test_model_config_is_frozen():
    """A model's config never changes after it is built: the modules read it once."""
    with pytest.raises(dataclasses.FrozenInstanceError):
        GPTConfig().prefix_lm = True


SWITCHES = ("logit_scale", "attention", "prefix_lm", "parallel_block", "n_expert", "expert_top_k",
            "expert_capacity", "moe_aux_coef")


def test_every_model_switch_is_a_flag_and_off_by_default(capsys):
    defaults = list(gpt.pretrain_defaults())
    cfg = train.parse_args(defaults, ["--n_expert", "4", "--expert_top_k", "1", "--expert_capacity", "1.5",
                                    "--moe_aux_coef", "0.1", "--attention", "linear", "--prefix_lm",
                                    "--parallel_block", "--logit_scale"])[0]
    assert (cfg.n_expert, cfg.expert_top_k, cfg.expert_capacity, cfg.moe_aux_coef) == (4, 1, 1.5, 0.1)
    assert cfg.attention == "linear" and cfg.prefix_lm and cfg.parallel_block and cfg.logit_scale
    assert GPTConfig().n_expert == 0 and not GPTConfig().prefix_lm and GPTConfig().attention == "softmax"
    assert not GPTConfig().parallel_block and not GPTConfig().logit_scale
    with pytest.raises(SystemExit):
        train.parse_args(defaults, ["--help"])
    out = capsys.readouterr().out
    assert all(f"--{f}" in out for f in SWITCHES)


def test_cli_rejects_bad_config_without_traceback(tmp_path):
    r = run_script(["gpt.py", "--n_embd", "30"], cwd=tmp_path)
    assert r.returncode == 2 and "divisible by n_head" in r.stderr and "Traceback" not in r.stderr

# ---------------------------------------------------------------------------------------------
# the model (notes 4.1-4.4, 4.7, 5.2, 8.2, 8.6-8.7)

ARCHITECTURES = [dict(), dict(pos_emb="learned", norm="layernorm", ffn="gelu"),
                 dict(norm_placement="post", ffn="relu", bias=True), dict(attention="linear"),
                 dict(attention="linear", n_kv_head=1, pos_emb="learned"), dict(prefix_lm=True),
                 dict(n_expert=3, expert_top_k=2), dict(parallel_block=True, logit_scale=True)]


@pytest.mark.parametrize("kw", ARCHITECTURES)
def test_causal_and_left_padding_invariant(kw):
    """Changing a future token changes no earlier logit (notes 8.2: causal self-attention; a prefix LM is
    causal here, there is no SEP), and a left-padded sequence gets the logits it gets alone (positions
    count real tokens only)."""
    model = seeded_model(**kw)
    x = torch.randint(0, 256, (2, 20))
    y = x.clone()
    y[:, 12] = (y[:, 12] + 1) % 256
    a, b = model(x), model(y)
    assert torch.allclose(a[:, :12], b[:, :12], atol=1e-6) and not torch.allclose(a[:, 12:], b[:, 12:], atol=1e-4)
    seqs = [torch.randint(0, 256, (n,)).tolist() for n in (5, 12, 9)]
    ids, mask = left_pad(seqs)
    batch = model(ids, attn_mask=mask)
    for i, s in enumerate(seqs):
        assert torch.allclose(batch[i, -len(s):], model(torch.tensor([s]))[0], atol=1e-5)


def repeat_kv_heads(gqa, n_head):
    """An MHA model whose key/value head h is a copy of the GQA model's head g(h)."""
    cfg = dataclasses.replace(gqa.cfg, n_kv_head=n_head)
    mha = GPT(cfg).eval()
    sd = gqa.state_dict()
    group, hd = n_head // gqa.cfg.n_kv_head, cfg.head_dim
    for name, w in list(sd.items()):
        if name.endswith(("k_proj.weight", "v_proj.weight")):
            sd[name] = w.view(gqa.cfg.n_kv_head, hd, -1).repeat_interleave(group, 0).reshape(n_head * hd, -1)
    mha.load_state_dict(sd)
    return mha


@pytest.mark.parametrize("n_kv_head", [1, 2])
def test_gqa_equals_mha_with_repeated_kv_heads(n_kv_head):
    """GQA/MQA (notes 4.2, 4.4) is MHA whose key/value heads are shared within a group."""
    gqa = seeded_model(n_kv_head=n_kv_head)
    mha = repeat_kv_heads(gqa, 4)
    x = torch.randint(0, 256, (3, 17))
    assert torch.allclose(gqa(x), mha(x), atol=1e-5)
    assert mha.num_params() > gqa.num_params()


def test_loss_at_init_is_log_vocab():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2))
    x = torch.randint(0, 256, (4, 65))
    loss = lm_loss(model(x[:, :-1]), x[:, 1:]).item()  # uniform over the vocabulary: ln(320) = 5.77
    assert abs(loss - math.log(model.cfg.vocab_size)) < 0.1


def test_rmsnorm_and_swiglu_match_their_formulas():
    """RMSNorm (notes 5.2): x / sqrt(mean(x^2) + eps) * gamma, no mean subtracted; SwiGLU (8.7):
    W_2 (SiLU(W_g x) * W_v x); the GELU FFN (8.6): W_2 GELU(W_1 x). Written out in float64."""
    torch.manual_seed(0)
    x = torch.randn(3, 5, 32, dtype=torch.float64) + 2.0  # a mean far from 0: RMSNorm keeps it
    norm = gpt.RMSNorm(32).double()
    norm.weight.data.uniform_(0.5, 1.5)
    want = x / torch.sqrt((x ** 2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    assert torch.allclose(norm(x), want, atol=1e-12) and norm(x).mean() > 0.5  # LayerNorm would centre it at 0
    swiglu = gpt.FeedForward(tiny(ffn="swiglu")).double()
    up, gate, down = swiglu.up.weight, swiglu.gate.weight, swiglu.down.weight
    silu = lambda z: z / (1 + torch.exp(-z))  # noqa: E731
    assert torch.allclose(swiglu(x), (silu(x @ gate.T) * (x @ up.T)) @ down.T, atol=1e-12)
    assert tiny(ffn="swiglu").ffn_width == 96 and tiny(ffn="gelu").ffn_width == 128  # 8/3 d rounded to 32; 4 d
    gelu = gpt.FeedForward(tiny(ffn="gelu")).double()
    erf_gelu = lambda z: 0.5 * z * (1 + torch.erf(z / math.sqrt(2)))  # noqa: E731
    assert torch.allclose(gelu(x), erf_gelu(x @ gelu.up.weight.T) @ gelu.down.weight.T, atol=1e-12)


@pytest.mark.parametrize("kw", [dict(), dict(attention="linear"), dict(prefix_lm=True),
                                dict(n_expert=4, expert_top_k=2), dict(parallel_block=True)])
def test_model_overfits_one_batch(kw):
    torch.manual_seed(0)
    model = GPT(tiny(**kw))
    x = torch.randint(0, 256, (4, 33))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(100):
        loss = lm_loss(model(x[:, :-1]), x[:, 1:])
        opt.zero_grad()
        (loss + gpt.aux_loss(model)).backward()
        opt.step()
    assert loss.item() < 0.2  # from ln(320) = 5.77


def test_bf16_autocast_close_to_fp32():
    model = seeded_model()
    x = torch.randint(0, 256, (2, 32))
    ref = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(x)
    assert low.dtype == torch.bfloat16
    assert (low.float() - ref).abs().max() < 0.05 * ref.abs().max()
    assert abs(lm_loss(low, x).item() - lm_loss(ref, x).item()) < 0.02


def test_scaled_dot_products_have_unit_variance():
    g = torch.Generator().manual_seed(0)
    for d in (16, 64, 256):
        q, k = torch.randn(20000, d, generator=g), torch.randn(20000, d, generator=g)
        dots = (q * k).sum(-1)
        assert dots.var().item() == pytest.approx(d, rel=0.05)                    # Var(q.k) = d
        assert (dots / math.sqrt(d)).var().item() == pytest.approx(1.0, rel=0.05)  # / sqrt(d): 1
    # and the attention the model calls divides by sqrt(d_head): with V = I it returns softmax(s)
    D = 16
    q, k = torch.randn(1, 1, 5, D, generator=g), torch.randn(1, 1, D, D, generator=g)
    p = kernels.attention(q, k, torch.eye(D)[None, None], causal=False)[0, 0]   # (5, D) probabilities
    s = (q @ k.transpose(-2, -1))[0, 0]
    assert torch.allclose(p.log() - p.log()[:, :1], (s - s[:, :1]) / math.sqrt(D), atol=1e-4)

# ---------------------------------------------------------------------------------------------
# the switches: blocks (notes 4.7, 8.9), mixture of experts (8.8), linear attention (4.10), prefix LM (8.4),
# logit scaling (3.1)

def test_block_formulas():
    torch.manual_seed(0)
    x = torch.randn(2, 9, 32)
    par = GPT(tiny(parallel_block=True)).blocks[0]
    h = par.norm1(x)
    want = x + (par.attn(h, None, None, None) + par.ffn(h)) / math.sqrt(2)  # notes 8.9
    assert par.norm2 is None and torch.allclose(par(x, None, None, None), want, atol=1e-6)
    post = GPT(tiny(norm_placement="post", norm="layernorm")).blocks[0]
    post.norm2.weight.data.uniform_(0.5, 1.5)  # tell the two norms apart
    h = post.norm1(x + post.attn(x, None, None, None))
    assert torch.allclose(post(x, None, None, None), post.norm2(h + post.ffn(h)), atol=1e-6)  # notes 4.7
    pre = GPT(tiny()).blocks[0]
    h = x + pre.attn(pre.norm1(x), None, None, None)
    assert torch.allclose(pre(x, None, None, None), h + pre.ffn(pre.norm2(h)), atol=1e-6)
    assert GPT(tiny(parallel_block=True)).num_params() < GPT(tiny()).num_params()  # one norm per block fewer
    assert type(par) is gpt.ParallelBlock and type(post) is gpt.PostNormBlock and type(pre) is gpt.Block


def test_moe_with_one_expert_and_top1_is_the_dense_ffn():
    dense = seeded_model().train()
    moe = GPT(tiny(n_expert=1, expert_top_k=1, expert_capacity=1.0)).train()  # capacity floor(1 * N / 1) = N
    sd = {k.replace(".ffn.", ".ffn.experts.0."): v for k, v in dense.state_dict().items()}
    missing, unexpected = moe.load_state_dict(sd, strict=False)
    assert missing and all(".router." in k for k in missing) and not unexpected
    x = torch.randint(0, 256, (3, 20))
    assert torch.allclose(moe(x), dense(x), atol=1e-6)
    assert gpt.moe_stats(moe) == {"moe_aux": 1.0, "expert_load": 1.0, "expert_dropped": 0.0}


def test_moe_equals_a_per_token_loop_with_capacity():
    """Top-2 of 4 experts, capacity floor(1.0 * 20 / 4) = 5 per expert (the mean demand is 10), first come
    first served in token order: every token's output is sum over its kept experts of gate * FFN_e(x)."""
    torch.manual_seed(0)
    moe = gpt.MoE(tiny(n_expert=4, expert_top_k=2, expert_capacity=1.0)).train()
    x = torch.randn(2, 10, 32)
    out = moe(x).reshape(20, 32)
    xs, cap, used, want = x.reshape(20, 32), 5, [0] * 4, torch.zeros(20, 32)
    with torch.no_grad():
        for n in range(20):
            p = torch.softmax(moe.router(xs[n]), -1)
            top = sorted(range(4), key=lambda e: -p[e].item())[:2]
            for e in top:
                if used[e] < cap:
                    want[n] += p[e] / p[top].sum() * moe.experts[e](xs[n:n + 1])[0]
                used[e] += 1
    assert torch.allclose(out, want, atol=1e-6)
    dropped = sum(max(0, u - cap) for u in used)
    assert dropped > 0 and moe.dropped == pytest.approx(dropped / 40)
    assert (out.abs().sum(-1) == 0).any()  # some token lost both of its experts
    assert torch.allclose(moe.load, torch.tensor(used, dtype=torch.float) / 20)  # f_e counts before dropping
    moe.eval()  # no capacity at inference: every token reaches both of its experts
    assert (moe(x).reshape(20, 32).abs().sum(-1) > 0).all()


def test_dropped_tokens_pass_through_the_residual_unchanged():
    torch.manual_seed(0)
    block = GPT(tiny(n_expert=2, expert_top_k=1, expert_capacity=1.0, bias=True)).blocks[0].train()
    with torch.no_grad():  # every token picks expert 0, which takes floor(1.0 * 16 / 2) = 8 of the 16
        block.ffn.router.weight.zero_()
        block.ffn.router.bias.copy_(torch.tensor([5.0, -5.0]))
    x = torch.randn(2, 8, 32)
    out = block(x, None, None, None)
    h = x + block.attn(block.norm1(x), None, None, None)  # residual input plus attention
    ffn = block.ffn(block.norm2(h))
    assert (ffn[1] == 0).all() and (ffn[0].abs().sum(-1) > 0).all()  # the second row came too late
    assert torch.equal(out[1], h[1])
    assert torch.allclose(out[0], h[0] + ffn[0]) and not torch.allclose(out[0], h[0])


def test_load_balancing_loss():
    """L_aux = E sum_e f_e m_e: k at a uniform router (f sums to k), 1 when top-1 routing is balanced,
    up to E when every token goes to one expert."""
    E = 4
    x = torch.randn(3, 8, 32)
    for k in (1, 2):
        moe = gpt.MoE(tiny(n_expert=E, expert_top_k=k, bias=True))
        with torch.no_grad():
            moe.router.weight.zero_()
            moe.router.bias.zero_()
        moe(x)
        assert moe.aux_loss.item() == pytest.approx(k, abs=1e-6)
    moe = gpt.MoE(tiny(n_expert=E, expert_top_k=1))
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[:, :E] = 3 * torch.eye(E)  # token with x = one-hot(e) goes to expert e
    balanced = F.one_hot(torch.arange(24) % E, 32).float().view(3, 8, 32)
    moe(balanced)
    assert moe.aux_loss.item() == pytest.approx(1.0, abs=1e-6) and torch.allclose(moe.load, torch.full((E,), 0.25))
    moe(F.one_hot(torch.zeros(3, 8, dtype=torch.long), 32).float())  # all to expert 0
    p0 = math.exp(3) / (math.exp(3) + E - 1)
    assert moe.aux_loss.item() == pytest.approx(E * p0) and moe.aux_loss.item() > 2.5
    moe = gpt.MoE(tiny(n_expert=E, expert_top_k=2))  # a random router against the formula
    moe(x)
    p = torch.softmax(moe.router(x.reshape(24, 32)), -1)
    f = torch.zeros(E).index_add_(0, p.topk(2, -1).indices.reshape(-1), torch.ones(48)) / 24
    assert moe.aux_loss.item() == pytest.approx(E * (f * p.mean(0)).sum().item(), rel=1e-5)


def test_router_gets_gradients_and_the_aux_loss_reaches_the_training_loss():
    """L_total = L_task + lambda sum_layers L_aux (notes 8.8): what every stage's loss adds with gpt.aux_loss."""
    model = seeded_model(n_expert=4, expert_top_k=2).train()
    x = torch.randint(0, 256, (2, 17))
    for coef in (0.0, 0.5):
        for block in model.blocks:
            block.ffn.aux_coef = coef
        model.zero_grad()
        task = lm_loss(model(x[:, :-1]), x[:, 1:])
        aux = sum(b.ffn.aux_loss for b in model.blocks)
        loss = task + gpt.aux_loss(model)
        assert loss.item() == pytest.approx(task.item() + coef * aux.item(), abs=1e-6)
        assert set(gpt.moe_stats(model)) == {"moe_aux", "expert_load", "expert_dropped"}
        loss.backward()  # through the gates (top-k probabilities) and, with coef > 0, through m_e
        assert all(b.ffn.router.weight.grad.abs().sum() > 0 for b in model.blocks)
    dense = seeded_model()
    assert gpt.aux_loss(dense) == 0.0 and gpt.moe_stats(dense) == {}


def test_flops_count_only_the_active_experts():
    dense = GPT(tiny())
    for k in (1, 2):
        moe = GPT(tiny(n_expert=4, expert_top_k=k))
        router = sum(p.numel() for b in moe.blocks for p in b.ffn.router.parameters())
        ffn = sum(p.numel() for p in dense.blocks[0].ffn.parameters())
        extra = gpt.flops_per_token(moe, 64) - gpt.flops_per_token(dense, 64)
        assert extra == 6 * (router + (k - 1) * moe.cfg.n_layer * ffn)  # k experts run per token, not 4


def test_linear_attention_parallel_form_equals_the_recurrence():
    g = torch.Generator().manual_seed(0)
    B, H, Hkv, T, D = 2, 4, 2, 12, 8
    q, k, v = (torch.randn(B, h, T, D, generator=g) for h in (H, Hkv, Hkv))
    par = gpt.linear_attention(q, k, v)
    phi = lambda t: F.elu(t) + 1
    rec = torch.zeros_like(q)
    for b in range(B):
        for h in range(H):
            kv = h // (H // Hkv)
            s_v, s_k = torch.zeros(D, D), torch.zeros(D)  # constant memory, one token at a time
            for t in range(T):
                s_v += torch.outer(v[b, kv, t], phi(k[b, kv, t]))
                s_k += phi(k[b, kv, t])
                rec[b, h, t] = s_v @ phi(q[b, h, t]) / (s_k @ phi(q[b, h, t]) + 1e-6)
    assert torch.allclose(par, rec, atol=1e-5)
    # the tail given the running sums of the head (what a LinearCache holds) is the same
    t0 = 5
    s_v = v[:, :, :t0].transpose(-2, -1) @ phi(k[:, :, :t0])          # (B, Hkv, D, D)
    s_k = phi(k[:, :, :t0]).sum(2, keepdim=True)                      # (B, Hkv, 1, D)
    tail = gpt.linear_attention(q[:, :, t0:], k[:, :, t0:], v[:, :, t0:], sums=(s_v, s_k))
    assert torch.allclose(tail, par[:, :, t0:], atol=1e-5)


def test_prefix_lm_mask_is_the_notes_case_table():
    m, L = 4, 9  # the prefix is p_1..p_m (1-indexed as in the notes): its last token is the first SEP
    idx = torch.randint(0, 256, (2, L))
    idx[0, m - 1] = SEP
    idx[0, m + 2] = SEP  # a later SEP is part of the response
    mask = gpt.prefix_lm_mask(idx)
    assert mask.shape == (2, 1, L, L)
    for i in range(1, L + 1):
        for j in range(1, L + 1):
            want = ((i <= m and j <= m)            # prefix attends to all prefix
                    or (i >= m and j <= m)         # generation attends to all prefix
                    or (i > m and m < j <= i))     # generation attends to its own past
            assert mask[0, 0, i - 1, j - 1].item() == want, (i, j)
    causal = kernels.causal_mask(L, L, "cpu")
    assert not mask[0, 0, :m, m:].any()           # the prefix never sees the response
    assert torch.equal(mask[1, 0], causal)        # no SEP: no prefix
    # with a KV cache only the first call (start = 0) can hold the prefix; later calls are causal
    assert torch.equal(gpt.prefix_lm_mask(idx[:, :6], start=2)[0, 0], kernels.causal_mask(6, 8, "cpu"))


def test_prefix_lm_forward_sees_the_whole_prompt_and_the_response_causally():
    x = torch.tensor([[BOS] + list(range(40, 46)) + [SEP] + list(range(60, 67))])  # SEP at 7
    for prefix_lm in (False, True):
        model = seeded_model(prefix_lm=prefix_lm)
        a = model(x)
        y = x.clone()
        y[0, 4] += 1  # a prompt token: with a prefix LM the prompt positions before it see it too
        assert torch.allclose(a[:, :4], model(y)[:, :4], atol=1e-6) != prefix_lm
        z = x.clone()
        z[0, 10] += 1  # a response token: nothing before it may see it
        assert torch.allclose(a[:, :10], model(z)[:, :10], atol=1e-6)
        assert not torch.allclose(a[:, 10:], model(z)[:, 10:], atol=1e-4)


def test_logit_scale_makes_the_output_variance_independent_of_width():
    """After the final RMSNorm (RMS(x) = 1) and with head weights of variance 1, Var(logit) ~ n_embd
    (notes 3.1); divided by sqrt(n_embd) it is ~1 at every width."""
    for n_embd in (64, 256):
        for scale in (False, True):
            torch.manual_seed(0)
            model = GPT(tiny(n_embd=n_embd, tie_embeddings=False, logit_scale=scale)).eval()
            torch.nn.init.normal_(model.lm_head.weight, 0.0, 1.0)
            var = model(torch.randint(0, 256, (4, 64))).var().item()
            assert var == pytest.approx(1.0 if scale else n_embd, rel=0.15)

# ---------------------------------------------------------------------------------------------
# KV cache and generation (notes 4.3, 10.5)

@torch.no_grad()
def sample_by_recomputation(model, prompts, n, seed):
    """n sampled tokens per prompt, each step's logits from the full forward over each sequence alone
    (no cache, no padding, no batch), drawn by sample_next from a generator seeded as generate()'s."""
    seqs, g = [list(p) for p in prompts], torch.Generator().manual_seed(seed)
    for _ in range(n):
        logits = torch.cat([model(torch.tensor([s]))[:, -1] for s in seqs])            # (B, vocab)
        for s, t in zip(seqs, gpt.sample_next(logits, generator=g).tolist()):
            s.append(t)
    return [s[len(p):] for s, p in zip(seqs, prompts)]


def assert_cache_equals_full_forward(model, prompts):
    """generate() (batched, left padded, through the cache) samples the tokens of recomputing the full
    forward of each prompt alone with the same random draws, and prefill + decode through the cache give
    the logits of the full forward at every position (left padding included). Sampled, not greedy: a
    random model's greedy continuation is one token repeated, which would not show a wrong token fed back."""
    fast = generate(model, prompts, 12, eos=-1, generator=torch.Generator().manual_seed(0))
    assert fast == sample_by_recomputation(model, prompts, 12, seed=0)
    full = [p + f for p, f in zip(prompts, fast)]
    ids, mask = left_pad(full)
    want = model(ids, attn_mask=mask)
    P = max(map(len, prompts))
    cache = gpt.KVCache(model, len(full), ids.shape[1], "cpu", torch.float32)
    got = [model(ids[:, :P], attn_mask=mask[:, :P], cache=cache)]
    got += [model(ids[:, t:t + 1], cache=cache) for t in range(P, ids.shape[1])]
    assert torch.allclose(torch.cat(got, 1), want, atol=1e-5)


@pytest.mark.parametrize("kw", [dict(n_kv_head=4), dict(n_kv_head=2), dict(n_kv_head=1),  # MHA, GQA, MQA
                                dict(attention="linear", n_kv_head=4), dict(attention="linear", n_kv_head=1),
                                dict(prefix_lm=True), dict(prefix_lm=True, attention="linear", n_kv_head=1),
                                dict(prefix_lm=True, pos_emb="learned", n_expert=3, expert_top_k=2),
                                dict(parallel_block=True, logit_scale=True)])
@pytest.mark.parametrize("lengths", [((6, 0), (6, 0)), ((5, 0), (10, 2), (2, 0))])  # equal lengths, left padding
def test_kv_cache_generation_equals_full_recomputation(kw, lengths):
    """generate() with the cache (for linear attention: the running sums) gives the tokens and logits of
    the full forward; the prompts end in (or contain) SEP, so a prefix LM's prefill is bidirectional over
    the prompt and its decoding causal."""
    model = seeded_model(**kw)
    prompts = [[BOS] + torch.randint(0, 256, (n,)).tolist() + [SEP] + torch.randint(0, 256, (r,)).tolist()
               for n, r in lengths]
    assert_cache_equals_full_forward(model, prompts)


def test_kv_cache_holds_only_kv_heads_and_linear_attention_only_its_sums():
    """GQA's memory saving is real (notes 4.4); linear attention's cache is constant in the length (4.10)."""
    mqa = gpt.KVCache(GPT(tiny(n_head=4, n_kv_head=1)), 3, 40, "cpu", torch.float32)
    assert mqa.layers[0].k.shape == (3, 1, 40, 8)
    mha = gpt.KVCache(GPT(tiny(n_head=4, n_kv_head=4)), 3, 40, "cpu", torch.float32)
    assert mha.nbytes() == 4 * mqa.nbytes()
    short, long = (gpt.KVCache(GPT(tiny(attention="linear")), 3, n, "cpu", torch.float32) for n in (8, 64))
    assert short.nbytes() == long.nbytes() < gpt.KVCache(GPT(tiny()), 3, 64, "cpu", torch.float32).nbytes()
    assert long.layers[0].s_v.shape == (3, 2, 8, 8)


class NextTokenRule(torch.nn.Module):
    """A stand-in model for generate(): after byte 'a' it predicts EOS, after anything else 'a'."""

    def __init__(self):
        super().__init__()
        self.cfg = tiny()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, idx, attn_mask=None, cache=None, last_only=False):
        nxt = torch.where(idx[:, -1:] == ord("a"), EOS, ord("a"))
        return torch.nn.functional.one_hot(nxt, self.cfg.vocab_size).float() * 10


def test_generate_stops_each_sequence_at_eos():
    prompts = [[BOS, ord("a")], [BOS, ord("b"), ord("c")], [BOS]]
    assert generate(NextTokenRule(), prompts, 5, temperature=0) == [[EOS], [ord("a"), EOS], [ord("a"), EOS]]
    no_eos = generate(NextTokenRule(), prompts, 5, temperature=0, eos=-1)
    assert no_eos[1] == [ord("a"), EOS] + [ord("a"), EOS, ord("a")]


def test_generate_and_the_context_reject_bad_arguments():
    model = seeded_model()
    for kwargs, words in ((dict(max_new_tokens=-1), "max_new_tokens"), (dict(top_p=0.0), "top_p"),
                          (dict(top_k=-2), "top_k"), (dict(temperature=-1.0), "temperature"),
                          (dict(prompts=[[BOS, 400]]), "token ids"), (dict(prompts=[[]]), "at least one token"),
                          (dict(prompts=[[BOS] * 60]), "block_size"), (dict(top_k=2.5), "top_k must be an integer"),
                          (dict(temperature=float("nan")), "temperature"), (dict(top_p="0.9"), "top_p")):
        args = {"prompts": [[BOS, 5]], "max_new_tokens": 10, **kwargs}
        with pytest.raises(UserError, match=words):
            generate(model, args.pop("prompts"), **args)
    with pytest.raises(UserError, match="block_size"):
        model(torch.zeros(1, 65, dtype=torch.long))
    ids = torch.tensor([[BOS, 5, 6]])
    with pytest.raises(UserError, match="temperature must be > 0"):  # was NaN, silently
        sequence_logprobs(model, ids, torch.ones_like(ids), temperature=0)


def test_a_tiny_temperature_is_greedy_without_overflow():
    """z / T overflows float32 for T = 1e-45 (multinomial saw inf and nan): the limit T -> 0 is greedy."""
    model = seeded_model()
    logits = 10 * torch.randn(6, 320, generator=torch.Generator().manual_seed(0))
    logits[:, gpt.N_TOKENS:] = 100.0  # the vocabulary's padding ids are never candidates
    logp = gpt.logprobs_from_logits(logits, 1e-45)
    greedy = sampled_ids(logits).argmax(-1)
    assert torch.isfinite(logp).all() and torch.equal(logp.argmax(-1), greedy) and (logp.max(-1).values == 0).all()
    assert torch.equal(gpt.sample_next(logits, temperature=1e-45, generator=torch.Generator()), greedy)
    prompts = [[BOS, 5, 6], [BOS, 7]]
    assert generate(model, prompts, 12, temperature=1e-45) == generate(model, prompts, 12, temperature=0)


def test_pad_is_never_sampled_and_a_response_scores_as_it_was_sampled(monkeypatch):
    """generate() fills finished rows with PAD and drops it, so a sampled PAD was fed back into the cache yet
    missing from the response. With a model biased towards PAD: no PAD is drawn, every sampled token is in the
    response, and sequence_logprobs gives each response the log-prob accumulated while it was sampled, computed
    here in float64 from the logits seen then, softmax over the ids but PAD (and the vocabulary's padding)."""
    model = seeded_model()
    bias = torch.zeros(model.cfg.vocab_size)
    bias[PAD] = 8.0  # PAD would take most of the mass
    model.lm_head.register_forward_hook(lambda module, inputs, output: output + bias)
    drawn, real = [], gpt.sample_next

    def recording(logits, *args, **kwargs):
        nxt = real(logits, *args, **kwargs)
        z = sampled_ids(logits.double())
        drawn.append((nxt, torch.log_softmax(z, -1).gather(1, nxt[:, None])[:, 0]))
        return nxt

    monkeypatch.setattr(gpt, "sample_next", recording)
    prompts = [[BOS, 5, 6], [BOS, 7], [BOS, 9, 9, 9]]
    responses = generate(model, prompts, 10, generator=torch.Generator().manual_seed(0))
    for b, (prompt, response) in enumerate(zip(prompts, responses)):
        assert response == [int(nxt[b]) for nxt, _ in drawn[:len(response)]] and PAD not in response
        assert len(response) == 10 or response[-1] == EOS
        ids = torch.tensor([prompt + response])
        _, total = sequence_logprobs(model, ids, (torch.arange(ids.shape[1]) >= len(prompt)).long()[None])
        assert total.item() == pytest.approx(sum(lp[b].item() for _, lp in drawn[:len(response)]), abs=1e-4)


def test_sampling_top_k_top_p_and_temperature():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.1] + [1e-9] * 316]))
    g = torch.Generator().manual_seed(0)
    n = 4000

    def freq(**kw):
        s = torch.cat([gpt.sample_next(logits.expand(n, -1), generator=g, **kw)])
        return torch.bincount(s, minlength=320)[:5].float() / n

    assert torch.allclose(freq(), torch.tensor([0.5, 0.25, 0.15, 0.1, 0.0]), atol=0.03)
    assert torch.allclose(freq(top_k=2), torch.tensor([2 / 3, 1 / 3, 0, 0, 0]), atol=0.03)
    # nucleus p=0.8: the smallest set reaching 0.8 is {0.5, 0.25, 0.15} (0.75 < 0.8)
    assert torch.allclose(freq(top_p=0.8), torch.tensor([0.5, 0.25, 0.15, 0, 0]) / 0.9, atol=0.03)
    assert torch.allclose(freq(top_p=0.7), torch.tensor([2 / 3, 1 / 3, 0, 0, 0]), atol=0.03)
    p_t = torch.softmax(logits[0, :4] / 2.0, 0)  # temperature 2 flattens (notes 10.5)
    assert torch.allclose(freq(temperature=2.0)[:4], p_t / p_t.sum(), atol=0.03)
    assert (gpt.sample_next(logits, temperature=0) == 0).all()
    padded_vocab = torch.zeros(1000, 320)
    assert (gpt.sample_next(padded_vocab, generator=g) < gpt.N_TOKENS).all()  # never a padding id

# ---------------------------------------------------------------------------------------------
# sequence log-probabilities (notes 10.1)

def test_sequence_logprobs_equal_token_by_token_loop():
    model = seeded_model()
    seqs = [torch.randint(0, 256, (n,)).tolist() for n in (9, 14)]
    ids, attn = left_pad(seqs)
    target = attn.clone()
    target[0, -9:-5] = 0  # score only part of the first sequence
    for temperature in (1.0, 0.7):
        per_tok, total = sequence_logprobs(model, ids, target, attn, temperature)
        for b, s in enumerate(seqs):
            off = ids.shape[1] - len(s)
            want = 0.0
            for t in range(1, len(s)):
                if target[b, off + t]:
                    logits = model(torch.tensor([s[:t]]))[0, -1] / temperature
                    lp = torch.log_softmax(sampled_ids(logits), -1)[s[t]]
                    assert abs(per_tok[b, off + t].item() - lp.item()) < 1e-5
                    want += lp.item()
            assert abs(total[b].item() - want) < 1e-4
        assert (per_tok[target == 0] == 0).all()


def test_prefix_lm_sequence_logprobs_equal_token_by_token_loop():
    model = seeded_model(prefix_lm=True)
    seqs = [[BOS] + torch.randint(0, 256, (n,)).tolist() + [SEP] + torch.randint(0, 256, (r,)).tolist()
            for n, r in ((4, 5), (9, 3))]
    ids, attn = left_pad(seqs)
    target = torch.zeros_like(ids)
    for b, s in enumerate(seqs):
        target[b, ids.shape[1] - len(s) + s.index(SEP) + 1:] = 1  # the response tokens
    per_tok, total = sequence_logprobs(model, ids, target, attn)
    for b, s in enumerate(seqs):
        off, want = ids.shape[1] - len(s), 0.0
        for t in range(s.index(SEP) + 1, len(s)):  # the prompt is complete in s[:t]: same mask
            lp = torch.log_softmax(sampled_ids(model(torch.tensor([s[:t]]))[0, -1]), -1)[s[t]].item()
            assert per_tok[b, off + t].item() == pytest.approx(lp, abs=1e-5)
            want += lp
        assert total[b].item() == pytest.approx(want, abs=1e-4)

# ---------------------------------------------------------------------------------------------
# the script, with experts, and under torchrun

def test_a_data_file_too_small_for_the_context_is_a_clear_error(tmp_path):
    (tmp_path / "small.txt").write_text("hello")
    r = run_script(["gpt.py", "--data", str(tmp_path / "small.txt"), "--out_dir", str(tmp_path), *CPU], cwd=tmp_path)
    assert r.returncode == 2 and "too small" in r.stderr and "Traceback" not in r.stderr


def test_stdlib_corpus_holds_out_whole_files():
    root, files = gpt.stdlib_files()
    assert len(files) > 100 and all(f.endswith(".py") for f in files)
    train_ids, val, _ = gpt.load_corpus(gpt.DataConfig(val_fraction=0.05))
    assert 0.01 < len(val) / (len(train_ids) + len(val)) < 0.2
    assert train_ids[0] == BOS and val[0] == BOS  # each file starts with BOS

@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(open(os.path.join(HERE, "gpt.py")).read())
    return str(path)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, corpus):
    """`python gpt.py` with tiny settings: (its CompletedProcess, the out_dir holding gpt.pt)."""
    out = tmp_path_factory.mktemp("pretrained")
    return run_script(["gpt.py", "--data", corpus, "--out_dir", str(out), *TINY_FLAGS], cwd=out), out


def test_gpt_main_end_to_end(pretrained):
    r, out = pretrained
    assert r.returncode == 0, r.stderr
    metrics = json.loads((out / "gpt_metrics.json").read_text())
    assert metrics["val_bpb"] == pytest.approx(metrics["val_loss"] / math.log(2))
    assert 0 < metrics["val_bpb"] < 9 and metrics["tokens_per_sec"] > 0 and metrics["steps"] == 4
    assert last_json_line(r) == metrics  # the JSON line is the last line
    assert "val bits/byte" in r.stdout and "sample:" in r.stdout
    model, ckpt = gpt.load_model(str(out / "gpt.pt"))
    assert ckpt["step"] == 4 and ckpt["finished"] and model.cfg.block_size == 32 and ckpt["stage"] == "gpt"


def test_gpt_main_with_experts_reports_the_load(tmp_path, corpus):
    r = run_script(["gpt.py", "--data", corpus, "--out_dir", str(tmp_path / "out"), *TINY_FLAGS, "--n_expert", "2",
                    "--expert_top_k", "1"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "out" / "gpt_metrics.json").read_text())
    assert 0.5 <= m["expert_load"] <= 1.0 and 1.0 <= m["moe_aux"] <= 2.0 and m["val_bpb"] < 9
    assert "busiest expert's share" in r.stdout and "expert_load" in r.stdout  # table and validation line
    model, _ = gpt.load_model(str(tmp_path / "out" / "gpt.pt"))
    assert model.cfg.n_expert == 2


def test_ddp_two_processes_on_cpu(tmp_path, corpus):
    """torchrun with 2 processes (gloo on the CPU) trains a few steps and rank 0 writes the checkpoint."""
    r = run_script(["gpt.py", "--data", corpus, "--out_dir", str(tmp_path / "out"), *TINY_FLAGS], cwd=tmp_path,
                   nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 process(es)" in r.stdout
    metrics = json.loads((tmp_path / "out" / "gpt_metrics.json").read_text())
    assert metrics["steps"] == 4 and math.isfinite(metrics["val_loss"])
    assert r.stdout.count('"stage": "gpt"') == 1  # only rank 0 reports


# ---------------------------------------------------------------------------------------------
# the export to the Hugging Face Llama format, loaded by transformers

# Run outside this repository: its kernels.py would shadow the `kernels` package that transformers imports.
HF_LOAD = """
import sys, torch
from transformers import AutoTokenizer, LlamaForCausalLM
job, out = torch.load(sys.argv[1]), {}
for d in job["dirs"]:
    model = LlamaForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager").eval()
    tok = AutoTokenizer.from_pretrained(d)
    with torch.no_grad():
        logits = model(job["ids"][:, :model.config.max_position_embeddings]).logits
    out[d] = {"logits": logits, "ids": [tok(t)["input_ids"] for t in job["texts"]],
              "bytes": [tok(t, split_special_tokens=True)["input_ids"] for t in job["texts"]],
              "decoded": [tok.decode(tok(t)["input_ids"]) for t in job["texts"]], "config": model.config.to_dict()}
torch.save(out, sys.argv[2])
"""


def load_with_transformers(dirs, ids, texts, tmp_path):
    """What transformers (CPU, fp32) makes of exported directories: per directory the logits of LlamaForCausalLM
    on ids (cut to its context), the tokenizer's ids of each text (special tokens' names as their ids, and split
    into bytes), its decoding, the model's config."""
    torch.save({"dirs": [str(d) for d in dirs], "ids": ids, "texts": texts}, tmp_path / "job.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", HF_LOAD, "job.pt", "hf.pt"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=600, env={**env, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    return {d: v for d, v in torch.load(tmp_path / "hf.pt").items()}


def random_text(rng, n=60):
    """Random characters from ASCII to emoji (1 to 4 UTF-8 bytes), every special token's name, and near misses."""
    pieces = [chr(rng.choice([rng.randint(32, 126), rng.randint(0xA0, 0x7FF), rng.randint(0x4E00, 0x9FFF),
                              rng.randint(0x1F300, 0x1FAFF), rng.choice([9, 10, 13, 0])])) for _ in range(n)]
    pieces += [*gpt.SPECIAL_NAMES.values(), "<0x41>", "<bos", "sep>", "<<eos>>"]
    rng.shuffle(pieces)
    return "".join(pieces)


def test_export_hf_loads_in_transformers_with_the_same_logits_and_token_ids(tmp_path, pretrained):
    """The export (notes 8.2: the default model is Llama's) is LlamaForCausalLM: the same logits over the real token
    ids, for a random GQA model with tied embeddings and rope_theta 500, an MQA one with untied embeddings (norm
    weights random, so that swapping two norms shows) and a model trained by `python gpt.py`; its tokenizer gives
    encode()'s ids, with the special tokens' names in text as their ids."""
    models = [seeded_model(0, rope_theta=500.0), seeded_model(1, n_kv_head=1, tie_embeddings=False),
              gpt.load_model(str(pretrained[1] / "gpt.pt"))[0].eval()]
    for m in models[:2]:
        for name, p in m.named_parameters():
            if "norm" in name:
                p.data = 1 + 0.5 * torch.randn_like(p)
    dirs = [tmp_path / f"hf{i}" for i in range(3)]
    for m, d in zip(models, dirs):
        gpt.export_hf(m, str(d))
    torch.manual_seed(0)
    ids = torch.randint(0, gpt.N_TOKENS, (3, 64))
    rng = random.Random(0)
    texts = [random_text(rng) for _ in range(8)] + ["123+456", ""]
    hf = load_with_transformers(dirs, ids, texts, tmp_path)
    for m, d in zip(models, dirs):
        got, T = hf[str(d)], m.cfg.block_size
        with torch.no_grad():
            want = m(ids[:, :T])[..., :gpt.N_TOKENS]
        assert got["logits"].shape == want.shape and torch.allclose(got["logits"], want, atol=1e-4, rtol=0)
        assert got["config"]["tie_word_embeddings"] == m.cfg.tie_embeddings
    special = {name: i for i, name in gpt.SPECIAL_NAMES.items()}
    for i, text in enumerate(texts):  # the expected ids written out: names of special tokens as ids, the rest bytes
        want, rest = [], text
        while rest:
            hit = min((rest.find(n), n) for n in special if n in rest) if any(n in rest for n in special) else None
            cut = hit[0] if hit else len(rest)
            want += list(rest[:cut].encode("utf-8")) + ([special[hit[1]]] if hit else [])
            rest = rest[cut + len(hit[1]):] if hit else ""
        got = hf[str(dirs[0])]
        assert got["ids"][i] == want and got["bytes"][i] == encode(text) and got["decoded"][i] == text
    assert any(n in texts[0] for n in special) and len(encode(texts[0])) > len(texts[0])  # specials, multi-byte



def test_export_hf_without_safetensors_is_one_clear_error_and_writes_nothing(tmp_path, monkeypatch):
    """safetensors is an export dependency, not a runtime one: missing, it is one line saying what to install."""
    monkeypatch.setitem(sys.modules, "safetensors", None)  # None in sys.modules: the import raises ImportError
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(UserError, match="pip install safetensors"):
        gpt.export_hf(seeded_model(), str(tmp_path / "hf"))
    assert not (tmp_path / "hf").exists()


# =============================================================================================
# 4. sft.py

# ---------------------------------------------------------------------------------------------
# the task and the SFT loss (notes 10.3)

def test_task_demonstrator_and_true_reward():
    rng = random.Random(0)
    task = sft.TaskConfig(digits=3, slip=0.5).build()
    prompts = task.sample_prompts(3000, rng)
    assert all(sft.column_add(a, b)[0] == str(a + b) == task.correct((a, b)) for a, b in prompts)
    assert all(100 <= a <= 999 and 100 <= b <= 999 for a, b in prompts) and task.prompt_text((123, 45)) == "123+45"
    wrong = [task.demonstrate(p, rng) != str(sum(p)) for p in prompts]
    with_carry = [bool(sft.column_add(a, b)[1]) for a, b in prompts]
    # the demonstrator errs exactly on a `slip` share of the prompts that carry, never on the others
    assert not any(w and not c for w, c in zip(wrong, with_carry))
    assert abs(sum(wrong) / sum(with_carry) - task.cfg.slip) < 0.04
    assert task.true_reward((555, 555), "1110") == 1.0
    assert task.true_reward((555, 555), "1010") == 0.75       # one digit off: partial credit
    assert task.true_reward((555, 555), "110") == 0.75        # a digit missing
    assert task.true_reward((555, 555), "abc") == 0.0
    held = set(task.heldout_prompts())
    assert len(held) > 150 and not held & set(prompts)    # the held-out prompts are never trained on


def test_sort_task_demonstrator_true_reward_and_split():
    """--task sort: the demonstrator's one mistake (an adjacent pair of distinct digits left out of order) at the
    rate --slip, r*'s partial credit on hand-made cases, the held-out split counted by brute force and never
    trained on, and the task's own default of --digits."""
    task, rng = sft.TaskConfig(task="sort", digits=6, slip=0.5).build(), random.Random(0)
    prompts = task.sample_prompts(4000, rng)
    assert all(len(p) == 6 and p.isdigit() for p in prompts) and task.prompt_text("831520") == "sort 831520"
    wrong = 0
    for p in prompts:
        want, y = "".join(sorted(p)), task.demonstrate(p, rng)
        assert task.correct(p) == want
        if y != want:  # one swap of neighbours that differ, nothing else
            wrong += 1
            i = next(i for i in range(6) if y[i] != want[i])
            assert want[i] != want[i + 1] and y == want[:i] + want[i + 1] + want[i] + want[i + 2:]
    can_err = sum(len(set(p)) > 1 for p in prompts)  # a string of one repeated digit has nothing to swap
    assert abs(wrong / can_err - 0.5) < 0.03
    assert all(task.demonstrate("777777", rng) == "777777" for _ in range(50))
    assert task.true_reward("831520", "012358") == 1.0
    assert task.true_reward("831520", "021358") == pytest.approx(4 / 6)     # one pair swapped: two positions wrong
    assert task.true_reward("831520", "01235") == pytest.approx(5 / 6)      # the last digit missing
    assert task.true_reward("831520", "0123588") == pytest.approx(6 / 7)    # a digit too many
    assert task.true_reward("831520", "12358") == 0.0                       # the first missing: every position off
    assert task.true_reward("831520", "01235x") == 0.0 and task.true_reward("831520", "") == 0.0
    held = task.heldout_prompts()
    assert len(held) == len(set(held)) == 1000 and not set(held) & set(prompts)
    for digits in (3, 4):
        small = sft.TaskConfig(task="sort", digits=digits).build()
        n = sum(small.is_heldout(f"{i:0{digits}d}") for i in range(10 ** digits))
        assert small.heldout_size() == n and abs(n / 10 ** digits - 1 / 16) < 0.01
    argvs = ([], ["--task", "sort"], ["--task", "sort", "--digits", "4"])
    assert [sft.parse_args([sft.TaskConfig()], argv)[0].digits for argv in argvs] == [3, 6, 4]


def test_sft_loss_is_masked_cross_entropy_on_response_and_eos():
    model = seeded_model()
    prompts, responses = [(123, 456), (999, 1)], [gpt.encode("579"), gpt.encode("1000")]
    task = sft.TaskConfig().build()
    ids, target = sft.pack(task, prompts, responses)
    # the target mask covers the response and <eos>, nothing of <bos> prompt <sep>, nor padding
    for i, ((a, b), r) in enumerate(zip(prompts, responses)):
        p = len([gpt.BOS] + gpt.encode(f"{a}+{b}") + [gpt.SEP])
        assert target[i].tolist() == [0] * p + [1] * (len(r) + 1) + [0] * (ids.shape[1] - p - len(r) - 1)
        assert ids[i, p + len(r)] == EOS
    labels = ids[:, 1:].masked_fill(target[:, 1:] == 0, -100)  # independent: CE with ignore_index
    logits = sampled_ids(model(ids)[:, :-1])
    want = torch.nn.functional.cross_entropy(logits.reshape(-1, gpt.N_TOKENS), labels.reshape(-1), ignore_index=-100)
    assert torch.allclose(sft.sft_loss(model, ids, target), want, atol=1e-5)
    # the prompt's tokens are context, not targets: the loss has no term for predicting them, so
    # their gradient through the output head of the prompt positions is zero
    ids2 = ids.clone()
    ids2[0, 1] = ord("7")  # change a prompt token's label (and the context after it)
    per_tok, _ = gpt.sequence_logprobs(model, ids2, target)
    assert (per_tok[0, :len(task.prompt_tokens((123, 456)))] == 0).all()
    # EOS is a target: a model that cannot end scores worse
    noeos = ids.clone()
    noeos[target.bool() & (ids == EOS)] = ord("0")
    assert not torch.allclose(sft.sft_loss(model, noeos, target), sft.sft_loss(model, ids, target))


def test_sft_per_example_loss_does_not_depend_on_padding_or_batch():
    model = seeded_model()
    prompts = [(12, 34), (123, 4567), (5, 5)]
    responses = [gpt.encode(str(a + b)) for a, b in prompts]
    task = sft.TaskConfig().build()
    ids, target = sft.pack(task, prompts, responses)
    _, together = gpt.sequence_logprobs(model, ids, target)
    for i in range(3):
        alone_ids, alone_target = sft.pack(task, prompts[i:i + 1], responses[i:i + 1])
        _, alone = gpt.sequence_logprobs(model, alone_ids, alone_target)
        assert torch.allclose(together[i], alone[0], atol=1e-5)

# ---------------------------------------------------------------------------------------------
# parameter-efficient fine-tuning: LoRA, NF4 and QLoRA, adapters, the template tokens' rows (notes 10.4)

def test_lora_starts_at_base_trains_only_a_b_and_merges_exactly():
    model = seeded_model()
    x = torch.randint(0, 256, (2, 12))
    base = model(x).detach()
    sft.apply_lora(model, rank=4, alpha=8, targets="qv")
    assert torch.allclose(model(x), base, atol=1e-6)  # B = 0: W = W_0
    lm_loss(model(x[:, :-1]), x[:, 1:]).backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith((".A", ".B")) for n in trainable)
    assert all(("q_proj" in n or "v_proj" in n) for n in trainable)
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)
    assert all(model.get_parameter(n).grad is not None for n in trainable if n.endswith(".B"))
    with torch.no_grad():
        for n in trainable:
            model.get_parameter(n).normal_(0, 0.1)
    lora_out = model(x)
    assert not torch.allclose(lora_out, base, atol=1e-3)
    sft.merge_lora(model)
    assert not any(isinstance(m, sft.LoRALinear) for m in model.modules())
    assert torch.allclose(model(x), lora_out, atol=1e-5)  # merged equals unmerged
    assert set(model.state_dict()) == set(seeded_model().state_dict())  # a plain GPT again
    everything = seeded_model()
    sft.apply_lora(everything, rank=2, alpha=2, targets="all")
    assert sum(isinstance(m, sft.LoRALinear) for m in everything.modules()) == 2 * 7  # 4 attn + 3 ffn


@pytest.mark.parametrize("d_in, d_out, rank", [(64, 64, 16), (64, 192, 16), (256, 256, 4), (32, 96, 2)])
def test_lora_forward_is_w0_x_plus_scaled_b_a_x_on_either_path(d_in, d_out, rank):
    """LoRALinear forms W_0 + (alpha / r) B A first where that is cheaper (r large against d), else applies B A
    factored: both must be W_0 x + (alpha / r) B (A x), computed here in float64, and train A and B alike."""
    torch.manual_seed(0)
    layer = sft.LoRALinear(nn.Linear(d_in, d_out, bias=True), rank, alpha=3.0)
    with torch.no_grad():
        layer.B.normal_(0, 0.5)
    x = torch.randn(2, 5, d_in)
    W0, b, A, B = (t.detach().double() for t in (layer.base.weight, layer.base.bias, layer.A, layer.B))
    want = x.double() @ W0.t() + b + (3.0 / rank) * (x.double() @ A.t()) @ B.t()
    out = layer(x)
    assert torch.allclose(out.double(), want, atol=1e-5)
    out.pow(2).sum().backward()
    gA, gB = torch.autograd.functional.jacobian(lambda a, bb: (x.double() @ W0.t() + b + (3.0 / rank) * (
        x.double() @ a.t()) @ bb.t()).pow(2).sum(), (A, B))
    assert torch.allclose(layer.A.grad.double(), gA, rtol=1e-4, atol=1e-4)
    assert torch.allclose(layer.B.grad.double(), gB, rtol=1e-4, atol=1e-4)
    assert layer.base.weight.grad is None


@pytest.mark.parametrize("tokens, tie", [("all", True), ("all", False), ("template", True), ("none", True)])
def test_peft_token_table_option_trains_the_whole_table_the_template_rows_or_none(tokens, tie):
    model, ids = seeded_model(tie_embeddings=tie), torch.tensor([[gpt.BOS, 49, 50, gpt.SEP, 51, gpt.EOS]])
    base = model(ids).detach()
    sft.wrap_peft(model, sft.SFTConfig(lora_rank=2, tokens=tokens, norms=False))
    assert torch.allclose(model(ids), base, atol=1e-6)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad and not n.endswith((".A", ".B"))}
    assert trainable == {"all": {"wte.weight"} | (set() if tie else {"lm_head.weight"}),
                         "template": {"wte.delta"} | (set() if tie else {"lm_head.delta"}), "none": set()}[tokens]
    sft.merge_lora(model)
    assert (model.lm_head.weight is model.wte.weight) == tie


NF4_PAPER = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
             -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
             0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
             0.7229568362236023, 1.0]


def nibbles(layer):
    """The 4-bit codes of an NF4Linear, unpacked by a plain loop: low nibble first."""
    return torch.tensor([(b & 15, b >> 4)[i] for b in layer.codes.tolist() for i in (0, 1)])


def test_nf4_levels_are_normalised_normal_quantiles():
    # independent: the standard library's inverse normal CDF, 8 quantiles above 0, 7 below, an exact 0
    q = statistics.NormalDist().inv_cdf
    delta = 1 - (1 / 30 + 1 / 32) / 2
    pos = [q(delta + (0.5 - delta) * i / 8) for i in range(8)]
    neg = [-q(delta + (0.5 - delta) * i / 7) for i in range(7)]
    want = torch.tensor(sorted(neg + [0.0] + pos), dtype=torch.float64) / pos[0]
    levels = sft.nf4_levels()
    assert levels.shape == (16,) and (levels[1:] > levels[:-1]).all()
    assert levels[0] == -1 and levels[-1] == 1 and (levels == 0).sum() == 1
    assert torch.allclose(levels.double(), want, atol=1e-6)
    assert torch.allclose(levels, torch.tensor(NF4_PAPER), atol=1e-6)


def test_nf4_quantises_its_own_levels_exactly():
    torch.manual_seed(0)
    levels = sft.nf4_levels()
    idx = torch.randint(0, 16, (48, 64))        # 48 blocks of 64 weights
    idx[:, 0] = torch.randint(0, 2, (48,)) * 15  # each block holds -1 or +1, so its absmax is its scale
    for scales in (torch.full((48,), 0.5), torch.rand(48) + 0.1):
        lin = nn.Linear(96, 32, bias=False)
        with torch.no_grad():
            lin.weight.copy_((levels[idx] * scales[:, None]).view(32, 96))
        q = sft.NF4Linear(lin)
        assert torch.equal(nibbles(q), idx.flatten())  # every weight gets its own level's code
        # the 4-bit step is exact; what remains is the (double-quantised) scale
        assert torch.equal(q.weight, (levels[idx] * q.scales()[:, None]).view(32, 96))
    # equal scales that are a power of two survive double quantisation exactly too
    lin.weight.data.copy_((levels[idx] * 0.5).view(32, 96))
    assert torch.equal(sft.NF4Linear(lin).weight, lin.weight)


@pytest.mark.parametrize("shape", [(96, 80), (33, 17), (600, 64)])
def test_nf4_round_trip_error_is_within_its_bound_and_beats_uniform_int4(shape):
    torch.manual_seed(1)
    lin = nn.Linear(shape[1], shape[0], bias=False)
    nn.init.normal_(lin.weight, 0.0, 0.02)
    q = sft.NF4Linear(lin)
    w, n = lin.weight.detach(), lin.weight.numel()
    blocks = F.pad(w.flatten(), (0, -n % 64)).view(-1, 64)
    s = blocks.abs().amax(1)  # the true block absmax
    # w = s x, w_hat = s_hat l(x), |l| <= 1:  |w - w_hat| <= s |x - l(x)| + |s - s_hat| <= s g / 2 + |s - s_hat|,
    # g the largest gap between neighbouring levels; and |s - s_hat| <= half an int8 step of its block of 256
    levels = torch.tensor(NF4_PAPER)
    g = (levels[1:] - levels[:-1]).max()
    c = F.pad(s - s.mean(), (0, -len(s) % 256)).view(-1, 256)
    dq_bound = (c.abs().amax(1) / 254).repeat_interleave(256)[:len(s)]
    err = F.pad((w - q.weight).flatten(), (0, -n % 64)).view(-1, 64).abs()
    assert (err <= (s * g / 2 + dq_bound + 1e-7)[:, None]).all()
    # a relaxed version that uses the scale's true error instead of its bound, to show the bound is not loose
    assert (err.amax(1) <= s * g / 2 + (s - q.scales()).abs() + 1e-7).all()
    # NF4 suits normal weights better than the 16 evenly spaced levels of int4 with the same scales
    uniform = torch.linspace(-1, 1, 16)
    x = blocks / s[:, None]
    int4 = uniform[(x[..., None] - uniform).abs().argmin(-1)] * s[:, None]
    nf4 = levels[(x[..., None] - levels).abs().argmin(-1)] * s[:, None]
    assert (nf4 - blocks).pow(2).sum() < 0.92 * (int4 - blocks).pow(2).sum()  # about 0.85 over seeds
    # the reported error sums are the true ones
    sq_err, sq_norm, abs_err = q.error_sums
    assert math.isclose(sq_err, (w - q.weight).pow(2).sum().item(), rel_tol=1e-4)
    assert math.isclose(sq_norm, w.pow(2).sum().item(), rel_tol=1e-4)
    assert math.isclose(abs_err, (w - q.weight).abs().sum().item(), rel_tol=1e-4)


def test_nf4_double_quantised_scales_are_within_their_8_bit_bound():
    torch.manual_seed(2)
    lin = nn.Linear(256, 160, bias=False)  # 640 blocks of 64: three blocks of 256 scales, the last partial
    with torch.no_grad():
        lin.weight.copy_(torch.randn(160, 256) * torch.rand(160, 1) * 0.1)  # scales that vary a lot
    q = sft.NF4Linear(lin)
    s = lin.weight.detach().view(-1, 64).abs().amax(1)
    assert q.scale_codes.dtype == torch.int8 and q.scale_codes.numel() == 640
    assert q.scale_absmax.numel() == 3 and torch.isclose(q.scale_mean, s.mean())
    for b in range(3):
        chunk = slice(256 * b, 256 * (b + 1))
        step = (s[chunk] - s.mean()).abs().max() / 127  # symmetric int8 absmax of the centred scales
        assert ((q.scales()[chunk] - s[chunk]).abs() <= step / 2 + 1e-7).all()
    assert (q.scales() - s).abs().max() > 0  # the scales really are quantised


def test_nf4_storage_is_4_bits_per_weight_plus_scales():
    lin = nn.Linear(192, 64, bias=True)  # 12288 weights: 192 blocks of 64, one block of 256 scales
    q = sft.NF4Linear(lin)
    n = lin.weight.numel()
    assert q.codes.dtype == torch.uint8 and q.codes.numel() == n // 2  # two 4-bit codes per byte
    assert q.nbytes() == n // 2 + n // 64 + 4 + 4  # codes, int8 scales, one fp32 absmax of scales, fp32 mean
    assert 8 * q.nbytes() / n == pytest.approx(4 + 8 / 64 + 64 / n)
    # nothing else is kept: the state holds the codes, the scales and the (fp32, unquantised) bias only
    state = q.state_dict()
    assert set(state) == {"codes", "scale_mean", "scale_absmax", "scale_codes", "bias"}
    assert sum(t.numel() * t.element_size() for k, t in state.items() if k != "bias") == q.nbytes()
    assert [n for n, _ in q.named_parameters()] == ["bias"]


def test_qlora_starts_at_the_dequantised_base_trains_only_a_b_and_merges():
    torch.manual_seed(3)
    lin = nn.Linear(64, 48, bias=True)
    layer = sft.LoRALinear(sft.NF4Linear(lin), rank=4, alpha=8)
    x = torch.randn(5, 64)
    w_hat = layer.base.weight
    assert torch.allclose(layer(x), x @ w_hat.t() + lin.bias, atol=1e-6)  # B = 0: the dequantised base layer
    assert not torch.allclose(layer(x), lin(x), atol=1e-4)                 # which is not the fp32 layer
    model = seeded_model()
    ids = torch.randint(0, 256, (2, 12))
    sft.apply_lora(model, rank=2, alpha=4, targets="qv", quantize=True)
    nf4 = [m for m in model.modules() if isinstance(m, sft.NF4Linear)]
    assert len(nf4) == 2 * 7  # every linear layer of the 2 blocks is 4-bit, also those without LoRA
    lm_loss(model(ids[:, :-1]), ids[:, 1:]).backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith((".A", ".B")) and ("q_proj" in n or "v_proj" in n) for n in trainable)
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)
    assert all(model.get_parameter(n).grad is not None for n in trainable if n.endswith(".B"))
    assert all(not b.requires_grad for b in model.buffers())
    with torch.no_grad():
        for n in trainable:
            model.get_parameter(n).normal_(0, 0.1)
    out = model(ids)
    q = model.blocks[0].attn.q_proj
    want = q.base.weight + q.scale * q.B @ q.A  # the merged weight: dequantised W_0 + (alpha / r) B A
    sft.merge_lora(model)
    assert not any(isinstance(m, (sft.LoRALinear, sft.NF4Linear)) for m in model.modules())
    assert set(model.state_dict()) == set(seeded_model().state_dict())  # a plain GPT again
    assert torch.allclose(model.blocks[0].attn.q_proj.weight, want, atol=1e-6)
    assert torch.allclose(model(ids), out, atol=1e-5)


def test_qlora_learns_a_low_rank_change_up_to_the_quantisation_error():
    # target layer: W_0 + a rank-2 change; QLoRA starts from NF4(W_0) and trains only A, B (rank 2)
    torch.manual_seed(4)
    base = nn.Linear(64, 64, bias=False)
    nn.init.normal_(base.weight, 0.0, 0.02)
    target = base.weight.detach() + 0.05 * torch.randn(64, 2) @ torch.randn(2, 64) / 8
    layer = sft.LoRALinear(sft.NF4Linear(base), rank=2, alpha=2)
    opt = torch.optim.Adam([layer.A, layer.B], lr=1e-2)
    losses = []
    for _ in range(300):
        x = torch.randn(128, 64)
        loss = (layer(x) - x @ target.t()).pow(2).mean()
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    # with x ~ N(0, I) the mean squared output error of a weight error E is ||E||_F^2 / d_out: what is left
    # is the quantisation error of W_0 (full rank, which a rank-2 update barely reduces)
    floor = (layer.base.weight - base.weight).pow(2).sum().item() / 64
    final = sum(losses[-50:]) / 50
    assert final < 0.1 * losses[0]
    assert 0.6 * floor < final < 1.2 * floor


def adapter_reference(model, x, s):
    """A pre-norm block stack computed by hand, the attention (GQA, RoPE, causal softmax) and the FFN written out,
    every linear layer W x + b of the blocks with its adapter beside it: + s W_up gelu(W_down x) (notes 10.4)."""
    def lin(a, u):
        return F.linear(u, a.base.weight, a.base.bias) + s * (
            F.gelu(u @ a.down.weight.t() + a.down.bias) @ a.up.weight.t() + a.up.bias)
    cfg, (B, T) = model.cfg, x.shape
    cos, sin = model.rope_cos[:T][None, :, None], model.rope_sin[:T][None, :, None]
    future = torch.ones(T, T, dtype=torch.bool).triu(1)
    h = model.wte(x)
    for b in model.blocks:
        attn, u = b.attn, b.norm1(h)
        q, k, v = (lin(p, u).view(B, T, -1, cfg.head_dim) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
        q, k = gpt.apply_rope(q, cos, sin), gpt.apply_rope(k, cos, sin)
        g = cfg.n_head // cfg.n_kv_head  # query heads per key/value head
        k, v = k.repeat_interleave(g, 2), v.repeat_interleave(g, 2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(cfg.head_dim)
        y = torch.einsum("bhqk,bkhd->bqhd", scores.masked_fill(future, float("-inf")).softmax(-1), v)
        h = h + lin(attn.o_proj, y.reshape(B, T, -1))
        f, u = b.ffn, b.norm2(h)
        hidden = f.act(lin(f.gate, u)) * lin(f.up, u) if f.gate is not None else f.act(lin(f.up, u))
        h = h + lin(f.down, hidden)
    return model.lm_head(model.norm_f(h))


def test_adapters_start_as_the_frozen_model_train_alone_and_sit_beside_every_linear_layer():
    model = seeded_model()
    ids = torch.randint(0, 256, (2, 12))
    base = model(ids).detach()
    linears = {n: (m.in_features, m.out_features) for n, m in model.blocks.named_modules() if isinstance(m, nn.Linear)}
    sft.apply_adapters(model, dim=4, scale=3.0)
    assert sum(isinstance(m, sft.Adapter) for m in model.modules()) == len(linears) == 2 * 7
    assert torch.allclose(model(ids), base, atol=1e-6)  # W_up = 0: the frozen model
    lm_loss(model(ids[:, :-1]), ids[:, 1:]).backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"blocks.{n}.{l}.{p}" for n in linears for l in ("down", "up") for p in ("weight", "bias")}
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)
    assert all(model.get_parameter(n).grad.abs().sum() > 0 for n in trainable if n.split(".")[-2] == "up")  # W_up
    n_adapter = sum(model.get_parameter(n).numel() for n in trainable)
    assert n_adapter == sum(d_in * 4 + 4 + 4 * d_out + d_out for d_in, d_out in linears.values())
    with torch.no_grad():
        for n in trainable:
            model.get_parameter(n).normal_(0, 0.2)
    assert not torch.allclose(model(ids), base, atol=1e-3)
    assert torch.allclose(model(ids), adapter_reference(model, ids, 3.0), atol=1e-5)
    # generation (KV cache) goes through the adapters too: it samples what the full forwards give
    prompt = ids[0, :5].tolist()
    out = gpt.generate(model.eval(), [prompt], 8, eos=-1, generator=torch.Generator().manual_seed(0))
    assert out == sample_by_recomputation(model, [prompt], 8, seed=0)


@pytest.mark.parametrize("tie", [True, False])
def test_template_token_rows_start_at_base_train_alone_and_merge_into_the_table(tie):
    model = seeded_model(tie_embeddings=tie)
    ids = torch.tensor([[gpt.BOS, 49, 50, gpt.SEP, 51, gpt.EOS, 52, gpt.SEP]])
    base = model(ids).detach()
    sft.train_template_tokens(sft.apply_lora(model, rank=2, alpha=2, targets="qv"))
    assert torch.allclose(model(ids), base, atol=1e-6)  # delta = 0
    lm_loss(model(ids[:, :-1]), ids[:, 1:]).backward()
    deltas = {n for n, p in model.named_parameters() if p.requires_grad and not n.endswith((".A", ".B"))}
    assert deltas == ({"wte.delta"} if tie else {"wte.delta", "lm_head.delta"})
    assert (model.lm_head.delta is model.wte.delta) == tie
    assert model.wte.delta.grad.abs().sum(1).min() > 0  # both <sep> and <eos> rows get a gradient
    with torch.no_grad():
        for n in deltas:
            model.get_parameter(n).normal_(0, 0.5)
        for n, p in model.named_parameters():
            if n.endswith(".B"):
                p.zero_()  # LoRA off: compare the token rows alone
    out = model(ids)
    # independent: the original model with the rows of <sep> and <eos> edited by hand
    edited = seeded_model(tie_embeddings=tie)
    with torch.no_grad():
        edited.wte.weight[[gpt.SEP, gpt.EOS]] += model.wte.delta
        if not tie:
            edited.lm_head.weight[[gpt.SEP, gpt.EOS]] += model.lm_head.delta
    assert torch.allclose(out, edited(ids), atol=1e-5) and not torch.allclose(out, base, atol=1e-3)
    sft.merge_lora(model)
    assert set(model.state_dict()) == set(seeded_model(tie_embeddings=tie).state_dict())
    assert (model.lm_head.weight is model.wte.weight) == tie
    assert torch.allclose(model(ids), out, atol=1e-5)
    changed = (model.wte.weight != seeded_model(tie_embeddings=tie).wte.weight).any(1).nonzero().flatten()
    assert changed.tolist() == sorted([gpt.EOS, gpt.SEP])


@pytest.mark.parametrize("cfg, gains_train", [(dict(lora_rank=2), True), (dict(lora_rank=2, norms=False), False),
                                              (dict(adapter_dim=4), True), (dict(lora_rank=2, qlora=True), True)])
def test_peft_trains_the_norm_gains_unless_told_not_to_and_still_starts_at_the_base(cfg, gains_train):
    model, ids = seeded_model(), torch.randint(0, 256, (2, 10))
    base = model(ids).detach()
    gains = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, gpt.RMSNorm)}
    assert len(gains) == 2 * model.cfg.n_layer + 1  # two per block and the final one
    sft.wrap_peft(model, sft.SFTConfig(**cfg))
    quantised = cfg.get("qlora", False)  # QLoRA starts at the dequantised base
    assert torch.allclose(model(ids), base, atol=0.5 if quantised else 1e-6)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert (gains <= trainable) == gains_train and (gains & trainable == set()) != gains_train
    if cfg.get("lora_rank") and not quantised:  # the gains moved, B moved: merging still changes no logit
        with torch.no_grad():
            for n in trainable:
                model.get_parameter(n).add_(torch.randn_like(model.get_parameter(n)) * 0.1)
        out = model(ids)
        sft.merge_lora(model)
        assert torch.allclose(model(ids), out, atol=1e-4) and not torch.allclose(out, base, atol=1e-2)


def test_peft_initialisation_follows_the_runs_seed_not_what_ran_before(tmp_path):
    """LoRA's A is random: a sweep's runs (sft.py --seeds) must each get their own seed's, not the process's state."""
    task, ids = sft.TaskConfig(heldout=4).build(), torch.randint(0, 256, (2, 10))

    def run(name, seed, burn):
        model = seeded_model()
        torch.randn(burn)  # whatever this process drew before
        cfg = train.TrainConfig(max_steps=1, batch_size=2, eval_interval=1, device="cpu", compile="off", seed=seed,
                                out_dir=str(tmp_path / name), lr=1e-2)
        return sft.finetune(model, task, sft.SFTConfig(lora_rank=2), cfg)[0](ids).detach()

    first = run("a", 0, 1)
    assert torch.equal(run("b", 0, 1000), first) and not torch.allclose(run("c", 1, 1), first, atol=1e-4)


def test_sft_config_validation_for_peft():
    with pytest.raises(UserError, match="--lora_rank"):
        sft.SFTConfig(qlora=True)
    with pytest.raises(UserError, match="adapter_dim"):
        sft.SFTConfig(adapter_dim=-1)
    with pytest.raises(UserError, match="not both"):
        sft.SFTConfig(adapter_dim=4, lora_rank=4)


def test_finetune_saves_qlora_merged_and_adapters_beside_sft_pt(tmp_path):
    task = sft.TaskConfig(heldout=4).build()
    train_cfg = train.TrainConfig(max_steps=3, batch_size=4, eval_interval=3, device="cpu", compile="off",
                                out_dir=str(tmp_path), lr=1e-2)
    ids = torch.randint(0, 256, (2, 10))
    # QLoRA: out_dir/sft.pt is a plain GPT holding the dequantised base plus the LoRA update
    model, m = sft.finetune(seeded_model(), task, sft.SFTConfig(lora_rank=2, lora_targets="all", qlora=True),
                            train_cfg)
    loaded, _ = gpt.load_model(str(tmp_path / "sft.pt"))
    assert torch.allclose(loaded(ids), model(ids), atol=1e-5)
    n_linear = sum(m.weight.numel() for m in seeded_model().blocks.modules() if isinstance(m, nn.Linear))
    assert m["linear_weight_bytes_fp32"] == 4 * n_linear
    assert m["linear_weight_bytes"] < m["linear_weight_bytes_fp32"] / 7
    assert 4 < m["linear_weight_bits"] < 4.3 and 0 < m["nf4_relative_error"] < 0.2 and m["nf4_mean_abs_error"] > 0
    assert m["trainable_params"] == 2 * sum(2 * (i + o) for i, o in  # rank 2 on 7 layers per block
                                            [(32, 32), (32, 16), (32, 16), (32, 32), (32, 96), (32, 96), (96, 32)]
                                            ) + 320 * 32 + (2 * 2 + 1) * 32  # the token table (tied: one) and
    # the norm gains (two per block, the final one)
    # adapters: cannot merge, so they are saved apart, and sft.pt is not touched
    before = (tmp_path / "sft.pt").read_bytes()
    model, m = sft.finetune(seeded_model(), task, sft.SFTConfig(adapter_dim=4, tokens="template"), train_cfg)
    assert (tmp_path / "sft.pt").read_bytes() == before
    assert m["checkpoint"] == os.path.join(str(tmp_path), "sft_adapter.pt") and "nf4_relative_error" not in m
    loaded, ckpt = sft.load_trained(str(tmp_path / "sft_adapter.pt"))
    assert ckpt["sft"]["adapter_dim"] == 4 and ckpt["finished"] and torch.allclose(loaded(ids), model(ids), atol=1e-6)
    assert not torch.allclose(loaded(ids), seeded_model()(ids), atol=1e-4)  # the adapters did train
    assert not isinstance(loaded.wte, sft.TokenRows) and loaded.lm_head.weight is loaded.wte.weight  # rows merged
    with pytest.raises(UserError):
        gpt.load_model(str(tmp_path / "sft_adapter.pt"))
    plain, _ = sft.load_trained(str(tmp_path / "sft.pt"))  # the QLoRA run's: a plain GPT
    assert not any(isinstance(m, (sft.Adapter, sft.LoRALinear, sft.NF4Linear)) for m in plain.modules())


def test_sft_prefix_lm_fine_tunes_the_same_weights_under_a_prefix_lm_mask(tmp_path):
    """--prefix_lm (notes 8.4): the pretrained causal weights in a new model whose config says prefix_lm
    (a config never changes in place), which sft.pt records; the prompt positions then see the whole prompt."""
    causal = seeded_model()
    x = torch.tensor([[BOS, 40, 41, 42, SEP, 60, 61]])
    want = GPT(dataclasses.replace(causal.cfg, prefix_lm=True)).eval()
    want.load_state_dict(causal.state_dict())
    cfg = train.TrainConfig(max_steps=1, batch_size=2, lr=1e-12, min_lr=0.0, warmup_steps=0, weight_decay=0.0,
                          eval_interval=1, device="cpu", out_dir=str(tmp_path))
    model, _ = sft.finetune(causal, sft.TaskConfig(heldout=4).build(), sft.SFTConfig(prefix_lm=True), cfg)
    assert model.cfg.prefix_lm and not causal.cfg.prefix_lm
    assert torch.allclose(model.eval()(x), want(x), atol=1e-6)
    assert not torch.allclose(want(x)[:, :4], causal(x)[:, :4], atol=1e-4)  # the prompt sees the whole prompt
    loaded, _ = gpt.load_model(str(tmp_path / "sft.pt"))
    assert loaded.cfg.prefix_lm and torch.allclose(loaded.eval()(x), model(x), atol=1e-6)


@pytest.fixture(scope="module")
def fine_tuned(tmp_path_factory, pretrained):
    """`python sft.py` with tiny settings (LoRA, prefix LM) from the tiny gpt.pt: (CompletedProcess, out_dir)."""
    out = tmp_path_factory.mktemp("fine_tuned")
    shutil.copy(pretrained[1] / "gpt.pt", out)
    return run_script(["sft.py", "--out_dir", str(out), "--max_steps", "6", "--eval_interval", "3", "--batch_size", "4",
                       "--heldout", "8", "--lora_rank", "2", "--prefix_lm", *CPU], cwd=out), out


def test_sft_main_end_to_end(fine_tuned):
    r, out = fine_tuned
    assert r.returncode == 0, r.stderr
    metrics = json.loads((out / "sft_metrics.json").read_text())
    assert last_json_line(r) == metrics
    for k in ("accuracy", "sample_accuracy", "true_reward"):
        assert 0 <= metrics[k] <= 1 and 0 <= metrics["before"][k] <= 1
    assert "trainable of" in r.stdout
    assert "has not learnt the task fully" in r.stdout and "--init" in r.stdout  # the guard: 6 steps teach nothing
    model, ckpt = gpt.load_model(str(out / "sft.pt"))  # LoRA merged: a plain GPT
    assert model.cfg.block_size == 32 and model.cfg.prefix_lm  # every later stage runs the prefix LM
    assert ckpt["finished"] and ckpt["sft"]["lora_rank"] == 2
    assert (ckpt["train_config"]["lr"], ckpt["train_config"]["min_lr"]) == (1e-3, 0.0)  # LoRA's rate, from the CLI
    assert ckpt["task"] == {"name": "add", "digits": 3, "slip": 0.4}
    assert ckpt["built_from"]["gpt"]["stage"] == "gpt" and ckpt["built_from"]["gpt"]["config"]["n_layer"] == 2


def test_each_peft_method_has_its_own_schedule_and_a_given_flag_wins():
    full = sft.sft_defaults()[2]
    assert (full.max_steps, full.lr, full.min_lr) == (3000, 2e-3, 2e-4)
    for argv, steps, lr in ((["--lora_rank", "16"], 2850, 1e-3), (["--lora_rank=4", "--no-qlora"], 2850, 1e-3),
                            (["--qlora", "--lora_rank=4"], 2700, 1e-3), (["--lora_rank", "8", "--qlora"], 2700, 1e-3),
                            (["--adapter_dim", "16"], 2200, 1e-3)):
        cfg = sft.sft_defaults(argv)[2]
        assert (cfg.max_steps, cfg.lr, cfg.min_lr) == (steps, lr, 0.0), argv
        assert dataclasses.replace(cfg, max_steps=3000, lr=2e-3, min_lr=2e-4) == full  # nothing else changes
    for argv in ([], ["--lora_rank", "0"], ["--adapter_dim", "0"], ["--lora_rank", "x"], ["--qlora"]):
        assert sft.sft_defaults(argv)[2] == full, argv  # --qlora alone: the flags' parser refuses it
    argv = ["--lora_rank", "16", "--lr", "3e-3", "--max_steps", "10"]
    cfg = sft.parse_args(list(sft.sft_defaults(argv)), argv)[2]
    assert (cfg.lr, cfg.max_steps, cfg.min_lr) == (3e-3, 10, 0.0)


def test_sft_seed_sweep_runs_each_seed_from_one_pretrained_model(tmp_path, pretrained):
    out = stage_dir(tmp_path, pretrained[1] / "gpt.pt")
    r = run_script(["sft.py", "--out_dir", str(out), "--seeds", "3,4", "--max_steps", "3", "--eval_interval", "3",
                    "--batch_size", "4", "--heldout", "8", *CPU], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    m = json.loads((out / "sft_seeds_metrics.json").read_text())
    assert last_json_line(r) == m and set(m["runs"]) == {"3", "4"}
    runs = [train.load_checkpoint(str(out / f"seed_{s}" / "sft.pt")) for s in (3, 4)]
    assert [c["train_config"]["seed"] for c in runs] == [3, 4] and all(c["finished"] for c in runs)
    assert not torch.equal(runs[0]["model"]["wte.weight"], runs[1]["model"]["wte.weight"])  # other batches
    acc = [m["runs"][s]["accuracy"] for s in ("3", "4")]
    assert m["accuracy"] == {"mean": sum(acc) / 2, "min": min(acc), "max": max(acc)}


# ---------------------------------------------------------------------------------------------
# using a trained model: sampling from a checkpoint of any stage, the export to the Hugging Face Llama format

def sampled_lines(out):
    return [line for line in out.splitlines() if " -> " in line]


@pytest.mark.parametrize("name", list(sft.TASKS))
def test_a_task_reads_its_own_prompt_text_back_and_nothing_else(name):
    """sft.py --sample scores a typed prompt only when it is one of the task's: prompt_text's inverse."""
    task = sft.TaskConfig(task=name, **sft.TASKS[name].defaults).build()
    for p in task.sample_prompts(50, random.Random(0)) + task.sample_prompts(50, random.Random(1), heldout=True):
        assert task.parse_prompt(task.prompt_text(p)) == p
    for text in ("", "hello", "12+34", "123+4567", "sort 12", "sort 1234567", "123 + 456", "sort abcdef", "+",
                 "１２３+456", "sort ０１２３４５"):
        assert task.parse_prompt(text) is None, text


def test_sample_prints_n_continuations_and_for_a_task_prompt_the_answer_and_r_star(fine_tuned, pretrained, capsys):
    """--sample: the fine-tuned model answers in its chat template <bos> prompt <sep>, an answer's length at most,
    each continuation with the correct sum and its r*; the pretrained one continues <bos> text, with the sampling
    flags. Both what generate() samples with the same seed."""
    path = str(fine_tuned[1] / "sft.pt")
    sft.main(["--sample", path, "--prompt", "123+456", "--n", "3", "--seed", "5", *CPU])
    model, _ = gpt.load_model(path)
    outs = generate(model, [[BOS, *b"123+456", SEP]] * 3, 6, generator=torch.Generator().manual_seed(5))
    answers = [decode(o[:o.index(EOS)] if EOS in o else o) for o in outs]
    shown = lambda y: y if y.isprintable() else repr(y)  # one line each
    assert sampled_lines(capsys.readouterr().out) == [
        f"123+456 -> {shown(y)}    correct: 579    r* = {ADD.true_reward((123, 456), y):.3f}" for y in answers]
    path = str(pretrained[1] / "gpt.pt")
    sft.main(["--sample", path, "--prompt", "def ", "--n", "2", "--temperature", "0.5", "--top_k", "10",
              "--top_p", "0.9", "--max_new_tokens", "9", *CPU])
    model, _ = gpt.load_model(path)
    outs = generate(model, [[BOS, *b"def "]] * 2, 9, 0.5, 10, 0.9, generator=torch.Generator().manual_seed(1337))
    assert sampled_lines(capsys.readouterr().out) == [f"def  -> {shown(decode(o))}" for o in outs]


def test_sample_reads_a_prompt_per_line_of_stdin_and_a_bad_line_is_one_error_line(tmp_path, fine_tuned):
    """`echo 123+456 | python sft.py --sample sft.pt`: a prompt longer than the context, or bytes that are not UTF-8,
    are one error line each and the lines after them are still answered."""
    r = run_script(["sft.py", "--sample", str(fine_tuned[1] / "sft.pt"), "--n", "2", *CPU], cwd=tmp_path,
                   stdin="123+456\n" + "9" * 40 + "\n\udcff\udcfe\n\n999+999\n")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    lines = sampled_lines(r.stdout)
    assert [line.split(" -> ")[0] for line in lines] == ["123+456"] * 2 + ["999+999"] * 2
    assert all("correct: 579" in line for line in lines[:2]) and all("correct: 1998" in line for line in lines[2:])
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and "42 tokens" in errors[0] and "block_size=32" in errors[0] and "UTF-8" in errors[1]


def peft_checkpoint(path, sft_cfg):
    """A checkpoint of an SFT run stopped before its end under this PEFT method (so not merged), its trainable
    weights random (as if trained). Returns the wrapped model."""
    model = sft.wrap_peft(seeded_model(), sft_cfg)
    torch.manual_seed(1)
    for p in model.parameters():
        if p.requires_grad:
            p.data = 0.05 * torch.randn_like(p)
    train.save_checkpoint(str(path), stage="sft", config=dataclasses.asdict(model.cfg), task=ADD.identity,
                          sft=dataclasses.asdict(sft_cfg), model=model.state_dict(), finished=False, step=1)
    return model.eval()


def test_a_qlora_run_stopped_early_samples_and_exports_merged_and_adapters_are_not_exported(tmp_path, capsys):
    """A QLoRA checkpoint whose LoRA is not merged yet loads merged (the same logits), samples and exports: the
    exported LlamaForCausalLM has the logits of the unmerged model. An adapter checkpoint samples, and its export
    is one line (a nonlinear bottleneck cannot merge into Llama's weights)."""
    ids = torch.randint(0, gpt.N_TOKENS, (2, 24))
    wrapped = peft_checkpoint(tmp_path / "sft.pt", sft.SFTConfig(lora_rank=2, lora_targets="all", qlora=True))
    loaded, _ = sft.load_trained(str(tmp_path / "sft.pt"))
    assert not any(isinstance(m, (sft.LoRALinear, sft.NF4Linear, sft.TokenRows)) for m in loaded.modules())
    with torch.no_grad():
        want = wrapped(ids)
        assert torch.allclose(loaded.eval()(ids), want, atol=1e-5)
        assert not torch.allclose(seeded_model()(ids), want, atol=1e-3)  # the update counts
    sft.main(["--sample", str(tmp_path / "sft.pt"), "--prompt", "123+456", "--n", "2", *CPU])
    assert len(sampled_lines(capsys.readouterr().out)) == 2
    code, err = main_in_process(sft, ["--export_hf", str(tmp_path / "sft.pt"), "--export_dir", str(tmp_path / "hf")],
                                capsys)
    assert code == 0, err
    hf = load_with_transformers([tmp_path / "hf"], ids, [], tmp_path)
    assert torch.allclose(hf[str(tmp_path / "hf")]["logits"], want[..., :gpt.N_TOKENS], atol=1e-4, rtol=0)

    wrapped = peft_checkpoint(tmp_path / "sft_adapter.pt", sft.SFTConfig(adapter_dim=4))
    loaded, _ = sft.load_trained(str(tmp_path / "sft_adapter.pt"))
    assert isinstance(loaded.blocks[0].attn.q_proj, sft.Adapter) and not isinstance(loaded.wte, sft.TokenRows)
    with torch.no_grad():
        assert torch.allclose(loaded.eval()(ids), wrapped(ids), atol=1e-5)
    sft.main(["--sample", str(tmp_path / "sft_adapter.pt"), "--prompt", "123+456", "--n", "2", *CPU])
    assert len(sampled_lines(capsys.readouterr().out)) == 2
    code, err = main_in_process(sft, ["--export_hf", str(tmp_path / "sft_adapter.pt"), "--export_dir",
                                      str(tmp_path / "hf2")], capsys)
    assert_one_error_line(code, err, 2, ["adapter_dim", "Llama"])
    assert not (tmp_path / "hf2").exists()


@pytest.mark.parametrize("switch", [dict(n_expert=2), dict(attention="linear"), dict(parallel_block=True),
                                    dict(norm_placement="post"), dict(pos_emb="learned"), dict(prefix_lm=True),
                                    dict(logit_scale=True), dict(norm="layernorm"), dict(bias=True),
                                    dict(ffn="gelu"), dict(ffn="relu")])
def test_export_refuses_a_switch_llama_has_no_place_for_in_one_line(tmp_path, capsys, switch):
    model = seeded_model(**switch)
    train.save_checkpoint(str(tmp_path / "gpt.pt"), stage="gpt", config=dataclasses.asdict(model.cfg),
                          model=model.state_dict())
    code, err = main_in_process(sft, ["--export_hf", str(tmp_path / "gpt.pt"), "--export_dir", str(tmp_path / "hf")],
                                capsys)
    (name, value), = switch.items()
    assert_one_error_line(code, err, 2, [f"{name}={value!r}", "Llama"])
    assert not (tmp_path / "hf").exists()


def test_export_never_writes_over_a_directory_silently_and_a_reward_model_does_not_sample(tmp_path, capsys, pretrained):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    argv = ["--export_hf", str(pretrained[1] / "gpt.pt"), "--export_dir", str(tmp_path / "hf")]
    assert_one_error_line(*main_in_process(sft, argv, capsys), 2, ["not empty", "--overwrite"])
    assert (tmp_path / "hf" / "config.json").read_text() == "{}"
    assert main_in_process(sft, [*argv, "--overwrite"], capsys)[0] == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["num_hidden_layers"] == 2
    train.save_checkpoint(str(tmp_path / "reward.pt"), stage="reward", model={})
    code, err = main_in_process(sft, ["--sample", str(tmp_path / "reward.pt"), "--prompt", "1+2"], capsys)
    assert_one_error_line(code, err, 2, ["reward model"])


# =============================================================================================
# 5. reward.py

# ---------------------------------------------------------------------------------------------
# the labeller, the losses, the reward model (notes 10.5, stage 2)

def test_comparisons_are_made_however_many_rounds_identical_samples_take(monkeypatch):
    """A policy whose two samples agree on 70% of prompts (a well fine-tuned one at T = 1) needs about
    log(n) / log(1 / 0.7) rounds of fresh prompts: every comparison is made, each of two distinct responses
    ranked; one that almost never differs is one line that says what to raise."""
    task = ADD
    calls = []

    def fake_samples(policy, task, prompts, k, temperature, seed, batch=256):
        rng = random.Random(seed)
        calls.append(len(prompts))
        return [[[1, 2], [1, 2]] if rng.random() < same else [[1, 2], [3, 4]] for _ in prompts]

    monkeypatch.setattr(reward, "sample_responses", fake_samples)
    same = 0.7
    data = reward.make_comparisons(None, task, 3000, 2, 0.1, 1.0, seed=0)
    assert len(data) == 3000 and all(ys[0] != ys[1] for _, ys, _ in data)
    assert len(calls) > 20 and calls[0] == 3000  # more rounds than the fixed 20 that used to be allowed
    same, calls[:] = 0.999, []
    with pytest.raises(UserError, match="too often identical.*--sample_temperature"):
        reward.make_comparisons(None, task, 3000, 2, 0.1, 1.0, seed=0)
    assert len(calls) == 1  # told after the first round, not after sampling for ever


def test_labeller_preference_rate_matches_bradley_terry():
    rng = random.Random(0)
    for r1, r2, tau in ((1.0, 0.75, 0.1), (0.5, 0.75, 0.2), (0.7, 0.7, 0.1)):
        wins = sum(reward.plackett_luce_ranking([r1, r2], tau, rng)[0] == 0 for _ in range(4000))
        assert abs(wins / 4000 - 1 / (1 + math.exp(-(r1 - r2) / tau))) < 0.025
    # K = 3: the first place follows softmax(r / tau), the noise ceiling is what the truth scores
    first = [reward.plackett_luce_ranking([1.0, 0.8, 0.5], 0.2, rng)[0] for _ in range(6000)]
    p = torch.softmax(torch.tensor([1.0, 0.8, 0.5]) / 0.2, 0)
    assert torch.allclose(torch.bincount(torch.tensor(first), minlength=3) / 6000., p, atol=0.025)
    pairs = [(None, None, sorted([rng.random(), rng.random()], reverse=rng.random() < 0.5)) for _ in range(3000)]
    truth_agrees = [(r[0] > r[1]) == (reward.plackett_luce_ranking(r, 0.1, rng)[0] == 0) for _, _, r in pairs]
    assert abs(sum(truth_agrees) / len(pairs) - reward.noise_ceiling(pairs, 0.1)) < 0.02


def test_preference_losses_match_their_formulas_and_bt_ignores_prompt_shifts():
    r = torch.randn(16, 2)
    cfg = lambda **kw: reward.RewardConfig(**kw)  # noqa: E731
    gap = r[:, 0] - r[:, 1]
    assert torch.allclose(reward.preference_loss(r, cfg(loss="bt")), -torch.log(torch.sigmoid(gap)).mean())
    assert torch.allclose(reward.preference_loss(r, cfg(loss="hinge", margin=0.5)), (0.5 - gap).clamp(min=0).mean())
    assert torch.allclose(reward.preference_loss(r, cfg(loss="mse", target_gap=1.5)), ((gap - 1.5) ** 2).mean())
    assert torch.allclose(reward.preference_loss(r, cfg(loss="listwise")), reward.preference_loss(r, cfg(loss="bt")))
    c = torch.randn(16, 1) * 10  # a per-prompt shift c(x) added to both rewards (problem set 4.3(c)(i))
    assert torch.allclose(reward.preference_loss(r + c, cfg(loss="bt")), reward.preference_loss(r, cfg(loss="bt")),
                          atol=1e-5)
    assert abs(reward.preference_loss(torch.zeros(4, 2), cfg(loss="bt")).item() - math.log(2)) < 1e-6


@pytest.mark.parametrize("pooling", ["last", "mean", "eos"])
def test_reward_does_not_depend_on_padding_side_or_batch(pooling):
    torch.manual_seed(0)
    rm = reward.RewardModel(GPT(tiny()), pooling).eval()
    torch.nn.init.normal_(rm.head.weight)
    prompts = [(12, 34), (123, 4567), (5, 5)]
    responses = [gpt.encode(str(a + b)) for a, b in prompts]
    right = rm(*reward.pack_for_rm(ADD, prompts, responses, side="right"))
    left = rm(*reward.pack_for_rm(ADD, prompts, responses, side="left"))
    assert torch.allclose(right, left, atol=1e-5)
    for i in range(3):
        alone = rm(*reward.pack_for_rm(ADD, prompts[i:i + 1], responses[i:i + 1]))
        assert torch.allclose(alone[0], right[i], atol=1e-5)


def test_reward_model_training_raises_heldout_accuracy(tmp_path):
    """A tiny reward model learns the labeller's preference for the correct sum over a wrong one."""
    torch.manual_seed(0)
    task = sft.TaskConfig(digits=2).build()
    rng = random.Random(0)

    def comparisons(n, heldout):
        out = []
        for a, b in task.sample_prompts(n, rng, heldout):
            good, bad = gpt.encode(str(a + b)), gpt.encode(str(rng.randint(0, 9)))
            r = [1.0, task.true_reward((a, b), gpt.decode(bad))]
            out.append(((a, b), [good, bad], r) if reward.plackett_luce_ranking(r, 0.1, rng)[0] == 0
                       else ((a, b), [bad, good], r[::-1]))
        return out

    train_data, eval_data = comparisons(256, False), comparisons(64, True)
    rm = reward.RewardModel(GPT(tiny()), "last")
    cfg = TrainConfig(max_steps=60, batch_size=16, lr=3e-3, warmup_steps=5, eval_interval=60, out_dir=str(tmp_path),
                      device="cpu")
    accuracy = lambda m: (reward.score(m, task, eval_data, "cpu")[:, 0]  # noqa: E731
                          > reward.score(m, task, eval_data, "cpu")[:, 1]).float().mean().item()
    get = lambda i: [train_data[(i * 16 + j) % len(train_data)] for j in range(16)]  # noqa: E731
    loss_fn = lambda net, b: (reward.preference_loss(reward.score(net, task, b, "cpu"),  # noqa: E731
                                                     reward.RewardConfig()), {})
    with torch.no_grad():
        before = accuracy(rm)
    train.train(rm, cfg, get, loss_fn)
    with torch.no_grad():
        after = accuracy(rm.eval())
    ceiling = reward.noise_ceiling(eval_data, 0.1)
    assert before == 0.0 and after > 0.8 and ceiling > 0.9  # zero head at the start: all rewards tie

# ---------------------------------------------------------------------------------------------
# latent (Perceiver-style) pooling (notes 4.5-4.6)

PROMPTS = [(12, 34), (123, 4567), (5, 5)]


def latent_rm(n_latents=3, seed=0):
    torch.manual_seed(seed)
    rm = reward.RewardModel(GPT(tiny()), "latent", n_latents).eval()
    torch.nn.init.normal_(rm.head.weight)
    return rm


def test_latent_reward_does_not_depend_on_padding_or_batch():
    rm = latent_rm()
    responses = [gpt.encode(str(a + b)) for a, b in PROMPTS]
    with torch.no_grad():
        ids, attn, resp = reward.pack_for_rm(ADD, PROMPTS, responses, side="right")
        right = rm(ids, attn, resp)
        assert torch.allclose(rm(*reward.pack_for_rm(ADD, PROMPTS, responses, side="left")), right, atol=1e-5)
        extra = 7  # more padding columns: more (masked) keys for the latents
        padded = rm(torch.cat([ids, torch.full((3, extra), PAD)], 1),
                    *(torch.cat([m, torch.zeros(3, extra, dtype=m.dtype)], 1) for m in (attn, resp)))
        assert torch.allclose(padded, right, atol=1e-5)
        for i in range(3):
            alone = rm(*reward.pack_for_rm(ADD, PROMPTS[i:i + 1], responses[i:i + 1]))
            assert torch.allclose(alone[0], right[i], atol=1e-5)
    assert (right[1:] - right[:-1]).abs().min() > 1e-3  # the rewards differ: the invariance is not trivial


def test_cross_attention_equals_the_hand_computed_softmax():
    """A_h = softmax(Q_h K_h^T / sqrt(d_head)) V_h over the real keys only (eq. 9-11), by hand in float64."""
    torch.manual_seed(1)
    ca = reward.CrossAttention(GPTConfig(n_embd=8, n_head=2, n_kv_head=2)).double()
    z, x = torch.randn(2, 3, 8, dtype=torch.float64), torch.randn(2, 5, 8, dtype=torch.float64)
    n_real = [5, 3]
    key_valid = torch.tensor([[1, 1, 1, 1, 1], [0, 1, 1, 1, 0]])  # row 1: padding on both sides
    with torch.no_grad():
        out = ca(z, x, key_valid)
        weights = [m.weight for m in (ca.q_proj, ca.k_proj, ca.v_proj, ca.o_proj)]
    for b in range(2):
        xs = x[b][key_valid[b].bool()]                                     # (n_real, 8)
        assert len(xs) == n_real[b]
        q, k, v = (a @ m.T for a, m in zip((z[b], xs, xs), weights))
        heads = []
        for h in range(2):
            cols = slice(4 * h, 4 * h + 4)
            s = [[sum(q[i, c].item() * k[j, c].item() for c in range(4 * h, 4 * h + 4)) / 2.0  # sqrt(d_head) = 2
                  for j in range(len(xs))] for i in range(3)]
            p = torch.tensor([[math.exp(e) / sum(math.exp(f) for f in row) for e in row] for row in s],
                             dtype=torch.float64)
            heads.append(p @ v[:, cols])
        expected = torch.cat(heads, 1) @ weights[3].T
        assert torch.allclose(out[b], expected, atol=1e-10)


def test_latent_reward_is_invariant_to_the_order_of_the_latents():
    """The latents are a set: no positions, no causal mask among them, and the reward reads their mean."""
    rm = latent_rm(n_latents=5)
    batch = reward.pack_for_rm(ADD, PROMPTS, [gpt.encode(str(a + b)) for a, b in PROMPTS])
    with torch.no_grad():
        rm.latent.latents.normal_()
        before = rm(*batch)
        rm.latent.latents.copy_(rm.latent.latents[:, torch.tensor([3, 0, 4, 2, 1])])
        assert torch.allclose(rm(*batch), before, atol=1e-5)
        rm.latent.latents.normal_()  # other latents: another reward (the latents matter)
        assert (rm(*batch) - before).abs().max() > 1e-2


def test_latent_cross_attention_scores_are_M_by_L(monkeypatch):
    """The cost argument of notes 4.5: the latents' queries meet the L keys in a (B, H, M, L) score matrix,
    and self-attention among the latents is (B, H, M, M); nothing is L x L."""
    rm = latent_rm(n_latents=3)
    calls = []
    real = reward.attention
    monkeypatch.setattr(reward, "attention", lambda q, k, v, **kw: calls.append(
        (*q.shape[:-1], k.shape[2])) or real(q, k, v, **kw))
    ids, attn, resp = reward.pack_for_rm(ADD, PROMPTS, [gpt.encode(str(a + b)) for a, b in PROMPTS])
    B, L = ids.shape
    rm(ids, attn, resp)
    assert calls == [(B, 4, 3, L), (B, 4, 3, 3)]


def test_latent_reward_model_trains_saves_and_loads(tmp_path, monkeypatch):
    """train_reward with --pooling latent end to end (a tiny random policy in place of sft.pt), and
    load_reward_model gives back the same model."""
    with pytest.raises(train.UserError):
        reward.RewardConfig(n_latents=0)
    torch.manual_seed(0)
    policy = GPT(tiny())
    monkeypatch.setattr(sft, "load_sft_policy", lambda task, cfg, device: (policy, {"stage": "sft"}))
    rm, metrics = reward.train_reward(
        sft.TaskConfig(digits=2).build(), reward.PrefConfig(n_pairs=8, n_eval=4),
        reward.RewardConfig(pooling="latent", n_latents=3),
        TrainConfig(max_steps=2, batch_size=4, eval_interval=2, out_dir=str(tmp_path), device="cpu"))
    assert json.loads((tmp_path / "reward_metrics.json").read_text())["pooling"] == "latent"
    assert metrics["pooling"] == "latent"
    loaded = reward.load_reward_model(str(tmp_path / "reward.pt"))
    assert loaded.pooling == "latent" and loaded.latent.latents.shape == (1, 3, 32)
    batch = reward.pack_for_rm(ADD, PROMPTS, [gpt.encode(str(a + b)) for a, b in PROMPTS])
    with torch.no_grad():
        assert torch.allclose(loaded(*batch), rm.eval()(*batch), atol=1e-6)


@pytest.fixture(scope="module")
def reward_trained(tmp_path_factory, fine_tuned):
    """`python reward.py` with tiny settings and K-way rankings from the tiny sft.pt: (CompletedProcess, out_dir)."""
    out = tmp_path_factory.mktemp("reward_trained")
    shutil.copy(fine_tuned[1] / "sft.pt", out)
    return run_script(["reward.py", "--out_dir", str(out), "--max_steps", "4", "--eval_interval", "2", "--batch_size",
                       "4", "--n_pairs", "12", "--n_eval", "8", "--heldout", "8", "--loss", "listwise", "--k", "3",
                       *CPU], cwd=out), out


def test_reward_main_end_to_end(reward_trained):
    r, out = reward_trained
    assert r.returncode == 0, r.stderr
    metrics = json.loads((out / "reward_metrics.json").read_text())
    assert last_json_line(r) == metrics
    assert 0.5 <= metrics["noise_ceiling"] <= 1 and 0 <= metrics["pairwise_accuracy"] <= 1
    rm = reward.load_reward_model(str(out / "reward.pt"))
    ckpt = train.load_checkpoint(str(out / "reward.pt"))
    assert isinstance(rm, reward.RewardModel) and ckpt["finished"] and ckpt["built_from"]["sft"]["stage"] == "sft"


# =============================================================================================
# 6. ppo.py (notes 10.5-10.7): GAE against its explicit sums, the clipped surrogate's gradient, REINFORCE's
# baseline, the first inner step, and convergence to the closed-form optimum on a bandit

@pytest.mark.parametrize("make, words", [
    (lambda: ppo.PPOConfig(reward="human"), "reward="), (lambda: ppo.PPOConfig(kl_mode="both"), "kl_mode="),
    (lambda: ppo.PPOConfig(beta=-0.1), "beta >= 0"), (lambda: ppo.PPOConfig(epochs=0), "epochs"),
    (lambda: ppo.PPOConfig(clip_eps=1.5), "clip_eps"), (lambda: ppo.PPOConfig(top_p=0.0), "top_p"),
    (lambda: ppo.PPOConfig(kl_estimator="k2"), "kl_estimator="),
    (lambda: ppo.PPOConfig(reward_norm="whiten"), "reward_norm="),
    (lambda: ppo.PPOConfig(samples_per_prompt=0), "samples_per_prompt"),
    (lambda: ppo.PPOConfig(minibatch="rows"), "minibatch=")])
def test_ppo_config_rejects_bad_values(make, words):
    with pytest.raises(UserError, match=words):
        make()


def bandit(K=8, beta=0.5, seed=0):
    """One prompt, K one-token responses: a reference policy, rewards in [0, 1] and the optimum of the
    KL-regularised objective, pi* = pi_ref exp(r / beta) / Z (problem set eq. 15)."""
    g = torch.Generator().manual_seed(seed)
    log_ref = torch.log_softmax(torch.randn(K, generator=g), 0)
    r = torch.rand(K, generator=g)
    return log_ref, r, torch.softmax(log_ref + r / beta, 0)


def test_gae_recursion_equals_the_explicit_sums():
    """Eq. 15 by backward recursion = sum_l (gamma lam)^l delta_{t+l} up to the end of the episode, with
    random rewards, values, lengths (padding after) and done flags inside the rows."""
    g = torch.Generator().manual_seed(0)
    B, T, gamma, lam = 6, 10, 0.9, 0.8
    rewards, values = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    dones = (torch.rand(B, T, generator=g) < 0.2).float()
    for b in range(B):  # a random length; the padding after it is done and carries nothing
        n = int(torch.randint(1, T + 1, (1,), generator=g))
        dones[b, n - 1:] = 1.0
        rewards[b, n:] = values[b, n:] = 0.0
    adv, returns = ppo.gae(rewards, values, dones, gamma, lam)
    want = torch.zeros(B, T)
    for b in range(B):
        for t in range(T):
            for s in range(t, T):  # delta_s, discounted, until the episode that contains t ends
                v_next = values[b, s + 1] if s + 1 < T and not dones[b, s] else 0.0
                delta = rewards[b, s] + gamma * v_next - values[b, s]
                want[b, t] += (gamma * lam) ** (s - t) * delta
                if dones[b, s]:
                    break
    assert torch.allclose(adv, want, atol=1e-5)
    assert torch.allclose(returns, want + values)  # eq. 16


def test_clipped_surrogate_gradient_is_zero_exactly_where_the_clip_binds():
    eps = 0.2
    ratio = torch.tensor([0.5, 0.5, 0.9, 1.1, 1.5, 1.5, 1.0, 1.0])
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, -1.0, 2.0, -2.0])
    old = torch.randn(8)
    logp = (old + ratio.log()).requires_grad_()
    loss, clip_frac = ppo.clipped_surrogate(logp[None], old[None], adv[None], torch.ones(1, 8), eps)
    loss.backward()
    # zero where the ratio left [1-eps, 1+eps] on the side the advantage favours: o < 1-eps with A < 0,
    # o > 1+eps with A > 0; elsewhere the plain ratio gradient -A o / |M|
    frozen = torch.tensor([False, True, False, False, True, False, False, False])
    assert (logp.grad[frozen] == 0).all()
    assert torch.allclose(logp.grad[~frozen], (-adv * ratio / 8)[~frozen])
    assert clip_frac.item() == frozen.float().mean().item()  # the share whose gradient the clip zeroes: 2 / 8


def test_reinforce_baseline_keeps_the_expected_gradient_and_lowers_its_variance():
    """Problem set 4.3(b)(ii) on an 8-armed bandit: E[(r - b) grad log pi] = E[r grad log pi] exactly
    (sum_y pi(y) grad log pi(y) = 0), and with b = E[r] the per-sample estimator's variance is lower."""
    log_ref, r, _ = bandit()
    r = r + 2.0  # rewards far from zero, where a baseline matters
    p = log_ref.exp()
    grad_logp = torch.eye(8) - p                                  # row y: grad_theta log pi(y) for softmax
    b = (p * r).sum()
    exact = (p[:, None] * r[:, None] * grad_logp).sum(0)
    assert torch.allclose((p[:, None] * (r - b)[:, None] * grad_logp).sum(0), exact, atol=1e-6)
    g = torch.Generator().manual_seed(0)
    y = torch.multinomial(p, 200_000, replacement=True, generator=g)
    plain, based = r[y, None] * grad_logp[y], (r[y] - b)[:, None] * grad_logp[y]
    assert torch.allclose(plain.mean(0), exact, atol=0.02) and torch.allclose(based.mean(0), exact, atol=0.02)
    assert based.var(0).sum() < 0.5 * plain.var(0).sum()


def tiny_actor_critic():
    policy = seeded_model(0, block_size=32)
    critic = ppo.Critic(seeded_model(1, block_size=32))
    return ppo.ActorCritic(policy, critic), copy.deepcopy(policy).requires_grad_(False)


def test_first_inner_step_has_ratio_one_no_clipping_and_zero_kl():
    model, ref = tiny_actor_critic()
    cfg = ppo.PPOConfig(reward="true", value_clip=0.2)
    task = sft.TaskConfig(heldout=8).build()
    prompts = task.sample_prompts(6, random.Random(0))

    def score(ps, ys):
        return torch.tensor(task.true_rewards(ps, ys)), {}

    batch, stats = ppo.rollout(model, ref, task, prompts, score, cfg, 0.1, torch.Generator().manual_seed(0))
    assert stats["kl_ref"] == 0
    resp = batch["resp"].bool()
    # the per-token rewards are only R at the last token (KL_t = 0): the returns with gamma = 1 are R
    logits, _ = model(batch["ids"])
    logp, _ = gpt.shifted_logprobs(logits, batch["ids"], batch["resp"])
    assert torch.equal(logp, batch["old_logp"])                      # ratio exactly 1
    _, stats = ppo.ppo_loss(model, batch, resp, cfg, 0.1)
    assert stats["clip_ratio/region_mean"] == 0 and stats["approx_kl"] == 0
    assert stats["tokens"] == int(resp.sum())


def test_rollout_masks_and_rewards():
    """The response mask covers the sampled tokens (and <eos> only when sampled); the returns with
    gamma = lam = 1 and beta = 0 are R at every token of the response."""
    model, ref = tiny_actor_critic()
    cfg = ppo.PPOConfig(reward="true", gamma=1.0, lam=1.0, whiten_adv=False)
    prompts = [(12, 34), (5, 678), (999, 1)]
    R = torch.tensor([0.3, -1.0, 2.0])
    batch, _ = ppo.rollout(model, ref, ADD, prompts, lambda ps, ys: (R, {}), cfg, 0.0,
                           torch.Generator().manual_seed(1))
    resp = batch["resp"].bool()
    assert torch.allclose(batch["returns"][resp], R[:, None].expand_as(resp)[resp], atol=1e-5)
    assert (batch["adv"][~resp] == 0).all()
    ids, mask = sft.pack_generated(ADD, [(1, 2), (3, 4)], [[gpt.encode("3")[0], gpt.EOS], gpt.encode("71")])
    assert mask.sum(1).tolist() == [2, 2] and ids[1, mask[1].bool()].tolist() == gpt.encode("71")


def test_ppo_converges_to_the_kl_regularised_optimum_on_a_bandit():
    """One prompt, one-token responses from 8 choices, known r and pi_ref: PPO with the per-token KL
    shaping r - beta (log pi_old - log pi_ref), a critic, GAE and the clipped surrogate reaches
    pi* = pi_ref exp(r / beta) / Z (total variation under 0.05; entropy bonus off)."""
    beta = 0.5
    log_ref, r, optimum = bandit(beta=beta)
    theta = log_ref.clone().requires_grad_()
    v = torch.zeros(1, requires_grad=True)                       # V(s) of the single state
    opt = torch.optim.Adam([theta, v], lr=0.03)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 300)
    g = torch.Generator().manual_seed(0)
    n = 512
    ones = torch.ones(n, 1)
    for _ in range(300):
        with torch.no_grad():                                     # rollout with theta_old
            old = torch.log_softmax(theta, 0)
            y = torch.multinomial(old.exp(), n, replacement=True, generator=g)
            rewards = (r[y] - beta * (old[y] - log_ref[y]))[:, None]  # one token: KL shaping + R
            values = v.expand(n)[:, None].clone()
            adv, returns = ppo.gae(rewards, values, ones, 1.0, 0.95)
            adv = ppo.whiten(adv, ones)
        for _ in range(4):                                        # E epochs
            logp = torch.log_softmax(theta, 0)[y][:, None]
            actor, _ = ppo.clipped_surrogate(logp, old[y][:, None], adv, ones, 0.2)
            loss = actor + 0.5 * ppo.critic_loss(v.expand(n)[:, None], values, returns, ones, 0.0)
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    tv = 0.5 * (torch.softmax(theta, 0) - optimum).abs().sum().item()
    start = 0.5 * (log_ref.exp() - optimum).abs().sum().item()
    assert tv < 0.05 and start > 0.1, (tv, start)
    expected = (optimum * r).sum() - beta * (optimum * (optimum.log() - log_ref)).sum()
    assert abs(v.item() - expected.item()) < 0.1  # the critic learned V = E[R - beta KL] at pi*


def tabular(V=6, seed=0):
    """A random categorical policy (logits with gradient) and a reference: log pi, log pi_ref, both (V,)."""
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(V, generator=g).requires_grad_()
    return theta, torch.log_softmax(torch.randn(V, generator=g), 0)


def exact_kl(logp, ref_logp):
    return (logp.exp() * (logp - ref_logp)).sum()


@pytest.mark.parametrize("estimator", ["k1", "k3", "exact"])
def test_kl_estimators_are_unbiased_for_the_exact_kl(estimator):
    """E_{a ~ pi}[k(a)] = KL(pi || pi_ref) for k1 and k3 (the expectation taken exactly, over every action);
    k3 is never negative; exact is the sum itself, per state."""
    V = 7
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(1))
    ref = torch.randn(3, V, generator=torch.Generator().manual_seed(2))
    logp, ref_logp = torch.log_softmax(logits, -1), torch.log_softmax(ref, -1)
    want = (logp.exp() * (logp - ref_logp)).sum(-1)                               # (3,)
    a = torch.arange(V).expand(3, V)                                              # every action of every state
    k = ppo.kl_estimate(estimator, logp.gather(-1, a), ref_logp.gather(-1, a), logp[:, None].expand(3, V, V),
                        ref_logp[:, None].expand(3, V, V))                        # (3, V): k(a) per state
    assert torch.allclose((logp.exp() * k).sum(-1), want, atol=1e-6)
    if estimator == "k3":
        assert (k >= 0).all()


def expected_grad(loss_of_theta, theta):
    theta.grad = None
    loss_of_theta().backward()
    return theta.grad.clone()


def test_shaping_estimators_policy_gradient_against_the_kl_gradient():
    """KL_t in the shaped reward enters the policy gradient as E_{a ~ pi}[grad log pi(a) * (-beta KL_t(a))]
    (the reward a constant). With k1 that is -beta grad KL(pi || pi_ref) exactly; with k3 it is
    -beta (grad KL(pi || pi_ref) - grad KL(pi_ref || pi)), which vanishes to second order at pi = pi_ref."""
    theta, ref_logp = tabular()

    def score_function(estimator):
        logp = torch.log_softmax(theta, 0)
        k = ppo.kl_estimate(estimator, logp, ref_logp).detach()
        return -(logp.exp().detach() * logp * k).sum()          # the surrogate sum_a pi(a) log pi(a) A(a), A = -k

    forward = expected_grad(lambda: exact_kl(torch.log_softmax(theta, 0), ref_logp), theta)
    reverse = expected_grad(lambda: exact_kl(ref_logp, torch.log_softmax(theta, 0)), theta)
    assert torch.allclose(expected_grad(lambda: score_function("k1"), theta), -forward, atol=1e-6)
    assert torch.allclose(expected_grad(lambda: score_function("k3"), theta), -(forward - reverse), atol=1e-6)
    # near the reference the k3 reward hardly pulls back: at pi = pi_ref + small, its gradient is second order
    near = (ref_logp + 0.01 * torch.randn(6, generator=torch.Generator().manual_seed(3))).requires_grad_()
    theta.data.copy_(near.data)
    g_k3 = expected_grad(lambda: score_function("k3"), theta).norm()
    g_kl = expected_grad(lambda: exact_kl(torch.log_softmax(theta, 0), ref_logp), theta).norm()
    assert g_k3 < 0.05 * g_kl


@pytest.mark.parametrize("estimator", ["k1", "k3", "exact"])
def test_kl_loss_gradient_at_theta_old_is_the_exact_kl_gradient(estimator):
    """PPO-KL's penalty on tokens drawn from pi_old (taken exactly: the mask weights each action by pi_old(a)),
    at theta = theta_old: its value is KL(pi || pi_ref) and its gradient grad KL(pi || pi_ref), for every
    estimator (k1 and k3 through the ratio o = pi / pi_old)."""
    theta, ref_logp = tabular(seed=4)
    V = theta.numel()

    def penalty():
        logp = torch.log_softmax(theta, 0)
        old = logp.detach()
        return ppo.kl_loss(estimator, logp[None], old[None], ref_logp[None], logp[None, None].expand(1, V, V),
                           ref_logp[None, None].expand(1, V, V), old.exp()[None])

    want = expected_grad(lambda: exact_kl(torch.log_softmax(theta, 0), ref_logp), theta)
    assert torch.allclose(penalty(), exact_kl(torch.log_softmax(theta, 0), ref_logp), atol=1e-6)
    assert torch.allclose(expected_grad(penalty, theta), want, atol=1e-6)


def test_kl_loss_without_the_ratio_would_be_wrong():
    """Why k1 and k3 carry o = pi / pi_old in the loss: without it, at theta = theta_old, k1's expected gradient
    is zero and k3's is that of the reverse KL(pi_ref || pi) (what GRPO's k3 term optimises)."""
    theta, ref_logp = tabular(seed=5)

    def plain(estimator):
        logp = torch.log_softmax(theta, 0)
        return (logp.exp().detach() * ppo.kl_estimate(estimator, logp, ref_logp)).sum()

    reverse = expected_grad(lambda: exact_kl(ref_logp, torch.log_softmax(theta, 0)), theta)
    assert torch.allclose(expected_grad(lambda: plain("k1"), theta), torch.zeros(6), atol=1e-6)
    assert torch.allclose(expected_grad(lambda: plain("k3"), theta), reverse, atol=1e-6)


def two_step_tree(V=4, seed=0):
    """A tabular two-token episode: pi(a0), pi(a1 | a0) from logits with gradient, a reference, and every one of
    the V^2 sequences with its probability. Returns theta0 (V,), theta1 (V, V), the reference's log-probs and a
    function giving, per sequence (V^2, 2), log pi of the sampled tokens, the full distributions and weights."""
    g = torch.Generator().manual_seed(seed)
    theta0, theta1 = torch.randn(V, generator=g).requires_grad_(), torch.randn(V, V, generator=g).requires_grad_()
    ref0, ref1 = torch.log_softmax(torch.randn(V, generator=g), 0), torch.log_softmax(torch.randn(V, V, generator=g), 1)
    a0, a1 = torch.arange(V).repeat_interleave(V), torch.arange(V).repeat(V)     # all sequences (a0, a1)

    def unroll():
        l0, l1 = torch.log_softmax(theta0, 0), torch.log_softmax(theta1, 1)
        dist = torch.stack([l0.expand(V * V, V), l1[a0]], 1)                      # (V^2, 2, V)
        ref_dist = torch.stack([ref0.expand(V * V, V), ref1[a0]], 1)
        logp = torch.stack([l0[a0], l1[a0, a1]], 1)                               # (V^2, 2)
        ref_logp = torch.stack([ref0[a0], ref1[a0, a1]], 1)
        w = logp.sum(1).exp().detach()                                            # P(sequence) under pi_old = pi
        return logp, ref_logp, dist, ref_dist, w

    return theta0, theta1, unroll


@pytest.mark.parametrize("estimator", ["k1", "exact"])
def test_kl_shaping_gives_the_gradient_of_the_sequence_kl(estimator):
    """Notes 10.5: with only the KL in the reward (R = 0), the expected PPO update at theta = theta_old (ratio 1,
    GAE with gamma = lam = 1 and V = 0, no whitening) is -beta grad KL(pi(y) || pi_ref(y)) over whole sequences.
    k1 gets there through the policy gradient alone; the exact per-state KL through the policy gradient (how a0
    changes the KL at the second state) plus ppo.py's direct term beta E_t[KL(pi(.|s_t) || pi_ref)]."""
    beta = 0.3
    theta0, theta1, unroll = two_step_tree()

    def objective():
        logp, ref_logp, dist, ref_dist, w = unroll()
        kl_t = ppo.kl_estimate(estimator, logp, ref_logp, dist, ref_dist).detach()
        dones = torch.tensor([[0.0, 1.0]]).expand_as(kl_t)
        adv, _ = ppo.gae(-beta * kl_t, torch.zeros_like(kl_t), dones, 1.0, 1.0)
        mask = w[:, None].expand_as(kl_t)                    # each token weighted by its sequence's probability
        loss, _ = ppo.clipped_surrogate(logp, logp.detach(), adv, mask, 0.2)
        if estimator == "exact":
            loss = loss + beta * ppo.kl_loss(estimator, logp, logp.detach(), ref_logp, dist, ref_dist, mask)
        return loss

    def sequence_kl():
        logp, ref_logp, _, _, _ = unroll()
        return (logp.sum(1).exp() * (logp - ref_logp).sum(1)).sum()

    got = [g.clone() for g in torch.autograd.grad(objective(), (theta0, theta1))]
    want = torch.autograd.grad(sequence_kl(), (theta0, theta1))
    for a, b in zip(got, want):   # the loss is a mean over the 2 tokens of each sequence: beta KL / 2
        assert torch.allclose(a, beta * b / 2, atol=1e-6), (a, beta * b / 2)


def test_gae_is_linear_in_rewards_and_values():
    """What rollout() logs as adv_R, adv_kl and adv_V adds up to the advantages: GAE is linear."""
    g = torch.Generator().manual_seed(0)
    r1, r2, v = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    dones = (torch.rand(4, 6, generator=g) < 0.3).float()
    dones[:, -1] = 1
    whole, _ = ppo.gae(r1 + r2, v, dones, 0.9, 0.8)
    zero = torch.zeros_like(v)
    parts = sum(ppo.gae(r, value, dones, 0.9, 0.8)[0] for r, value in ((r1, zero), (r2, zero), (zero, v)))
    assert torch.allclose(whole, parts, atol=1e-5)


def test_running_moments_equal_the_statistics_of_the_concatenation():
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(n, generator=g) * 3 + 1 for n in (5, 1, 17, 64)]
    m = ppo.RunningMoments()
    for i, b in enumerate(batches):
        m.update(b)
        seen = torch.cat(batches[:i + 1])
        assert math.isclose(m.mean, seen.mean().item(), rel_tol=1e-5, abs_tol=1e-6)
        if seen.numel() > 1:
            assert math.isclose(m.std, seen.std().item(), rel_tol=1e-5)
    resumed = ppo.RunningMoments(m.state())              # what a resumed run continues from
    assert (resumed.n, resumed.mean, resumed.m2) == (m.n, m.mean, m.m2)


def test_normalise_rewards_each_mode():
    g = torch.Generator().manual_seed(0)
    ref_R, R = torch.rand(256, generator=g), torch.rand(64, generator=g) * 0.1 + 0.9
    ref = ppo.RunningMoments()
    ref.update(ref_R)
    assert torch.equal(ppo.normalise_rewards(R, "none", ref, ppo.RunningMoments(ref.state())), R)
    assert torch.allclose(ppo.normalise_rewards(R, "ref", ref, None), (R - ref_R.mean()) / ref_R.std(), atol=1e-5)
    b = ppo.normalise_rewards(R, "batch", ref, None)
    assert abs(b.mean().item()) < 1e-5 and abs(b.std().item() - 1) < 1e-4
    running = ppo.RunningMoments(ref.state())
    seen = torch.cat([ref_R, R])
    assert torch.allclose(ppo.normalise_rewards(R, "running", ref, running), (R - seen.mean()) / seen.std(), atol=1e-5)
    assert running.n == 320
    # a nearly constant batch: batch whitening blows its differences up to unit spread, ref keeps them small
    assert b.std() > 5 * ppo.normalise_rewards(R, "ref", ref, None).std()


def test_minibatch_parts_partition_tokens_or_whole_responses():
    resp = torch.ones(9, 5, dtype=torch.bool)
    seq = ppo.minibatch_parts(resp, 4, "sequences", torch.Generator().manual_seed(0))
    assert (seq == seq[:, :1]).all()                                   # a response stays in one minibatch
    sizes = torch.bincount(seq[:, 0], minlength=4)
    assert sizes.max() - sizes.min() <= 1 and sizes.sum() == 9
    tok = ppo.minibatch_parts(resp, 3, "tokens", torch.Generator().manual_seed(0))
    assert tok.min() >= 0 and tok.max() <= 2 and not (tok == tok[:, :1]).all()


def test_shaping_exact_adds_the_direct_kl_term_to_the_loss():
    """ppo_loss with kl_mode shaping and the exact estimator adds beta * E_t[KL(pi(.|s_t) || pi_ref)] (and k1 does
    not): at the first inner step, the loss differs from beta = 0's by exactly that."""
    policy = seeded_model(0, block_size=32)
    model = ppo.ActorCritic(policy, ppo.Critic(seeded_model(1, block_size=32)))
    ref = seeded_model(2, block_size=32).requires_grad_(False)
    task = sft.TaskConfig(heldout=8).build()
    prompts = task.sample_prompts(5, random.Random(0))
    score = lambda ps, ys: (torch.tensor(task.true_rewards(ps, ys)), {})  # noqa: E731
    for estimator in ("exact", "k1"):
        cfg = ppo.PPOConfig(reward="true", kl_estimator=estimator)
        batch, _ = ppo.rollout(model, ref, task, prompts, score, cfg, 0.0, torch.Generator().manual_seed(0))
        resp = batch["resp"].bool()
        with torch.no_grad():
            with_kl, stats = ppo.ppo_loss(model, batch, resp, cfg, 0.5)
            without, _ = ppo.ppo_loss(model, batch, resp, cfg, 0.0)
            logits, _ = model(batch["ids"])
            _, dist = gpt.shifted_logprobs(logits, batch["ids"], batch["resp"])
            kl = ppo.masked_mean(ppo.kl_full(dist, batch["ref_dist"]), resp.float())
        if estimator == "exact":
            assert kl > 0 and torch.allclose(with_kl - without, 0.5 * kl, atol=1e-6)
            assert math.isclose(stats["kl_loss"], kl.item(), rel_tol=1e-5)
        else:
            assert with_kl == without and "kl_loss" not in stats


def test_rollout_with_normalised_rewards_and_several_samples_per_prompt():
    """The terminal reward R enters GAE after normalise(); samples of one prompt are separate episodes."""
    policy = seeded_model(0, block_size=32)
    model = ppo.ActorCritic(policy, ppo.Critic(seeded_model(1, block_size=32)))
    ref = copy.deepcopy(policy).requires_grad_(False)
    cfg = ppo.PPOConfig(reward="true", gamma=1.0, lam=1.0, whiten_adv=False)
    prompts = [p for p in [(12, 34), (5, 678)] for _ in range(3)]
    R = torch.tensor([0.3, -1.0, 2.0, 0.5, 0.0, 1.0])
    batch, stats = ppo.rollout(model, ref, ADD, prompts, lambda ps, ys: (R, {}), cfg, 0.1,
                               torch.Generator().manual_seed(1), normalise=lambda r: (r - 1.0) / 2.0)
    resp = batch["resp"].bool()
    want = ((R - 1.0) / 2.0)[:, None].expand_as(resp)
    assert torch.allclose(batch["returns"][resp], want[resp], atol=1e-5)   # KL_t = 0 at the start: G_t = R'
    assert math.isclose(stats["R_std"], ((R - 1.0) / 2.0).std().item(), rel_tol=1e-5)


def test_ppo_with_dropout_starts_on_policy(tmp_path, fine_tuned, reward_trained, capsys, monkeypatch):
    """A policy built with dropout 0.1 trains as it samples (Trainer train_mode=False): the first optimizer
    step, on the whole rollout, has the ratio exactly 1: nothing clipped, no KL to theta_old. In train mode
    dropout's noise would count as a policy change."""
    out = stage_dir(tmp_path, reward_trained[1] / "reward.pt")
    ckpt = train.load_checkpoint(str(fine_tuned[1] / "sft.pt"))
    ckpt = {**ckpt, "config": {**ckpt["config"], "dropout": 0.1}}
    train.save_checkpoint(str(out / "sft.pt"), **ckpt)
    rm = train.load_checkpoint(str(out / "reward.pt"))  # as if reward.py had run on this sft.pt
    train.save_checkpoint(str(out / "reward.pt"), **{**rm, "built_from": {"sft": train.provenance(ckpt)}})
    first, real = [], ppo.ppo_loss

    def recording(*args):
        loss, stats = real(*args)
        first.append(stats)
        return loss, stats

    monkeypatch.setattr(ppo, "ppo_loss", recording)
    monkeypatch.setattr(train.Trainer, "active", None)
    code, err = main_in_process(ppo, ["--out_dir", str(out), "--max_steps", "1", "--eval_interval", "1",
                                      "--batch_size", "4", "--epochs", "1", "--minibatches", "1", "--heldout", "8",
                                      *CPU], capsys)
    assert code == 0, err
    assert first[0]["clip_ratio/region_mean"] == 0 and first[0]["approx_kl"] == 0, first[0]


@pytest.mark.parametrize("flags", [[], ["--reward", "true", "--kl_mode", "loss", "--kl_estimator", "k3", "--kl_target",
                                        "0.5", "--c_e", "0.01", "--value_clip", "0.2", "--reward_norm", "running",
                                        "--samples_per_prompt", "2", "--minibatch", "sequences"],
                                   ["--reward_norm", "batch", "--kl_estimator", "k1", "--reward", "true"]])
def test_ppo_main_end_to_end(tmp_path, fine_tuned, reward_trained, flags):
    out = stage_dir(tmp_path, fine_tuned[1] / "sft.pt", reward_trained[1] / "reward.pt")
    r = run_script(["ppo.py", "--out_dir", str(out), "--max_steps", "4", "--eval_interval", "4", "--batch_size", "4",
                    "--epochs", "2", "--minibatches", "2", "--heldout", "8", *CPU, *flags], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    metrics = json.loads((out / "ppo_metrics.json").read_text())
    assert last_json_line(r) == metrics
    assert metrics["steps"] == 4 and 0 <= metrics["after"]["sample_accuracy"] <= 1
    assert math.isfinite(metrics["rm_score"]) and math.isfinite(metrics["before"]["rm_score"])
    assert metrics["train_seconds"] > 0
    policy, ckpt = gpt.load_model(str(out / "ppo.pt"))  # a policy like every other stage's checkpoint
    assert ckpt["finished"] and ckpt["stage"] == "ppo" and policy.cfg.prefix_lm
    assert ckpt["ppo"]["reward_norm"] == (flags[flags.index("--reward_norm") + 1] if flags else "ref")
    assert "reward_moments" in ckpt["state"]  # what resuming needs of the reward normalisation


# =============================================================================================
# 7. dpo.py: the DPO family, checked on a bandit against the closed-form optimum; the RPO term against the SFT
#    loss (notes 10.8)

def test_dpo_at_initialisation_is_ln2_with_zero_implicit_rewards():
    model = seeded_model()
    prompts = [(12, 34), (5, 6)]
    logps = []
    for ids, target in (sft.pack(ADD, prompts, [gpt.encode("46"), gpt.encode("11")]),
                        sft.pack(ADD, prompts, [gpt.encode("47"), gpt.encode("1")])):
        logps.append(gpt.sequence_logprobs(model, ids, target)[1])
    losses, r_c, r_r = dpo.dpo_loss(logps[0], logps[1], logps[0].detach(), logps[1].detach(), beta=0.1)
    assert torch.allclose(losses, torch.full_like(losses, math.log(2)))
    assert (r_c == 0).all() and (r_r == 0).all()


def test_dpo_gradient_equals_the_closed_form():
    """Homework 2(f): grad L = -beta sigmoid(r_l - r_w) (grad log pi(y_w) - grad log pi(y_l))."""
    log_ref, _, _ = bandit()
    theta = (log_ref + 0.3 * torch.randn(8)).requires_grad_()
    beta, w, l = 0.5, 2, 5
    logp = torch.log_softmax(theta, 0)
    loss, r_w, r_l = dpo.dpo_loss(logp[w:w + 1], logp[l:l + 1], log_ref[w:w + 1], log_ref[l:l + 1], beta)
    loss.sum().backward()
    p = torch.softmax(theta.detach(), 0)
    grad_logp = lambda y: torch.nn.functional.one_hot(torch.tensor(y), 8).float() - p  # noqa: E731
    closed = -beta * torch.sigmoid(r_l - r_w).detach() * (grad_logp(w) - grad_logp(l))
    assert torch.allclose(theta.grad, closed, atol=1e-6)


def test_plackett_luce_with_two_responses_is_dpo():
    logps, ref = torch.randn(6, 2), torch.randn(6, 2)
    pl = dpo.plackett_luce_loss(logps, ref, beta=0.3)
    d, _, _ = dpo.dpo_loss(logps[:, 0], logps[:, 1], ref[:, 0], ref[:, 1], beta=0.3)
    assert torch.allclose(pl, d, atol=1e-6)
    # K = 3 written out: P(1 > 2 > 3) = e^r1/(e^r1+e^r2+e^r3) * e^r2/(e^r2+e^r3)
    logps, ref = torch.randn(4, 3), torch.randn(4, 3)
    r = 0.3 * (logps - ref)
    want = -(r[:, 0] - torch.logsumexp(r, 1) + r[:, 1] - torch.logsumexp(r[:, 1:], 1))
    assert torch.allclose(dpo.plackett_luce_loss(logps, ref, 0.3), want, atol=1e-6)


@pytest.mark.parametrize("loss", ["sigmoid", "ipo", "hinge"])
def test_dpo_losses_match_their_formulas(loss):
    lc, lr, rc, rr = torch.randn(4, 5)
    beta = 0.2
    h = (lc - rc) - (lr - rr)
    want = {"sigmoid": -torch.nn.functional.logsigmoid(beta * h), "ipo": (h - 1 / (2 * beta)) ** 2,
            "hinge": (1 - beta * h).clamp(min=0)}[loss]
    assert torch.allclose(dpo.dpo_loss(lc, lr, rc, rr, beta, loss)[0], want, atol=1e-6)
    smoothed = dpo.dpo_loss(lc, lr, rc, rr, beta, "sigmoid", label_smoothing=0.1)[0]
    flipped = dpo.dpo_loss(lr, lc, rr, rc, beta, "sigmoid")[0]
    assert torch.allclose(smoothed, 0.9 * dpo.dpo_loss(lc, lr, rc, rr, beta)[0] + 0.1 * flipped, atol=1e-6)


def test_dpo_converges_to_the_kl_regularised_optimum_on_a_bandit():
    """One prompt, 8 one-token responses, a known reward r and reference: DPO on Bradley-Terry labelled
    pairs of r reaches pi* = pi_ref exp(r / beta) / Z (total variation under 0.05)."""
    beta = 0.5
    log_ref, r, optimum = bandit(beta=beta)
    g = torch.Generator().manual_seed(1)
    n = 100_000
    y1 = torch.randint(8, (n,), generator=g)
    y2 = (y1 + torch.randint(1, 8, (n,), generator=g)) % 8                 # a different response
    first_wins = torch.rand(n, generator=g) < torch.sigmoid(r[y1] - r[y2])  # the labeller (BT)
    chosen, rejected = torch.where(first_wins, y1, y2), torch.where(first_wins, y2, y1)
    theta = log_ref.clone().requires_grad_()                                # pi_theta = pi_ref at the start
    opt = torch.optim.Adam([theta], lr=0.05)
    for _ in range(600):
        logp = torch.log_softmax(theta, 0)
        loss = dpo.dpo_loss(logp[chosen], logp[rejected], log_ref[chosen], log_ref[rejected], beta)[0].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    tv = 0.5 * (torch.softmax(theta, 0) - optimum).abs().sum().item()
    start = 0.5 * (log_ref.exp() - optimum).abs().sum().item()
    assert tv < 0.05 and start > 0.1, (tv, start)  # it moved: the reference is far from pi*


def test_dpo_main_end_to_end_and_with_two_processes(tmp_path, fine_tuned):
    out = stage_dir(tmp_path, fine_tuned[1] / "sft.pt")
    r = run_script(["dpo.py", "--out_dir", str(out), "--max_steps", "4", "--eval_interval", "2", "--batch_size", "4",
                    "--n_pairs", "12", "--n_eval", "8", "--heldout", "8", *CPU], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    metrics = json.loads((out / "dpo_metrics.json").read_text())
    assert last_json_line(r) == metrics
    for k in ("accuracy", "sample_accuracy", "true_reward"):
        assert 0 <= metrics["before"][k] <= 1 and 0 <= metrics["after"][k] <= 1
    assert metrics["before"]["kl"] == 0 and math.isfinite(metrics["after"]["kl"])
    # DDP over gloo, from the same SFT model: rank 0 alone reports
    r = run_script(["dpo.py", "--out_dir", str(out), "--max_steps", "3", "--eval_interval", "3", "--batch_size", "2",
                    "--n_pairs", "8", "--n_eval", "4", "--heldout", "4", "--overwrite", *CPU], cwd=tmp_path, nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 process(es)" in r.stdout and r.stdout.count('"stage": "dpo"') == 1


def test_rpo_term_is_the_sft_loss_of_the_chosen_responses():
    """L = L_DPO + alpha * NLL(y+) per token (Pang et al. 2024): the added term is exactly sft.py's prompt-masked
    SFT loss on the chosen responses (an independent path: sft.pack + sft.sft_loss), value and gradient."""
    model = seeded_model()
    comparisons = [((12, 34), [gpt.encode("46"), gpt.encode("47")], [1.0, 0.5]),
                   ((5, 6), [gpt.encode("11"), gpt.encode("1")], [1.0, 0.5]),
                   ((99, 1), [gpt.encode("100"), gpt.encode("90")], [1.0, 0.0])]
    with torch.no_grad():
        ref = dpo.response_logps(model, ADD, comparisons, "cpu")
    lengths = torch.tensor([[len(y) + 1 for y in ys] for _, ys, _ in comparisons])
    cfg, plain = dpo.DPOConfig(rpo_alpha=0.7), dpo.DPOConfig()
    loss, stats = dpo.preference_step(dpo.response_logps(model, ADD, comparisons, "cpu"), ref, cfg, lengths)
    base, _ = dpo.preference_step(dpo.response_logps(model, ADD, comparisons, "cpu"), ref, plain, lengths)
    ids, target = sft.pack(ADD, [p for p, _, _ in comparisons], [ys[0] for _, ys, _ in comparisons])
    nll = sft.sft_loss(model, ids, target)
    assert math.isclose(base.item(), math.log(2), rel_tol=1e-6)  # pi = pi_ref: the DPO part is ln 2
    assert torch.allclose(loss, base + 0.7 * nll, atol=1e-6) and math.isclose(stats["nll"], nll.item(), rel_tol=1e-5)
    g_rpo = torch.autograd.grad(loss - base, list(model.parameters()), allow_unused=True)
    g_sft = torch.autograd.grad(0.7 * nll, list(model.parameters()), allow_unused=True)
    for a, b in zip(g_rpo, g_sft):
        assert (a is None and b is None) or torch.allclose(a, b, atol=1e-6)


def test_ipo_per_token_regresses_the_margin_of_mean_log_ratios():
    """--ipo_per_token (TRL's IPO): (mean_t log-ratio(y+) - mean_t log-ratio(y-) - 1/(2 beta))^2, written out per
    pair in float64 against the summed form the default uses."""
    g = torch.Generator().manual_seed(0)
    logps, ref = -10 * torch.rand(4, 2, generator=g), -10 * torch.rand(4, 2, generator=g)
    lengths = torch.tensor([[2, 5], [3, 3], [6, 1], [4, 2]])
    beta = 0.3
    for per_token in (False, True):
        want = []
        for (lc, lr), (rc, rr), (nc, nr) in zip(logps.double().tolist(), ref.double().tolist(), lengths.tolist()):
            nc, nr = (nc, nr) if per_token else (1, 1)
            want.append(((lc - rc) / nc - (lr - rr) / nr - 1 / (2 * beta)) ** 2)
        cfg = dpo.DPOConfig(beta=beta, loss="ipo", ipo_per_token=per_token)
        loss, _ = dpo.preference_step(logps, ref, cfg, lengths)
        assert loss.item() == pytest.approx(statistics.mean(want), rel=1e-5)


def test_dpo_config_rejects_a_negative_rpo_alpha():
    with pytest.raises(UserError, match="rpo_alpha"):
        dpo.DPOConfig(rpo_alpha=-1)


def test_correct_response_stats_against_a_token_by_token_computation():
    model, task = seeded_model(), ADD
    prompts = [(123, 456), (999, 1), (500, 500)]
    got = dpo.correct_response_stats(model, task, prompts, "cpu")
    total = eos = 0.0
    for a, b in prompts:  # log p of each token of "<sum><eos>" from a forward of the whole sequence
        prompt = [BOS] + gpt.encode(f"{a}+{b}") + [SEP]
        seq = prompt + gpt.encode(str(a + b)) + [EOS]
        with torch.no_grad():
            logp = gpt.logprobs_from_logits(model(torch.tensor([seq])))[0]
        p = len(prompt)
        terms = [logp[t - 1, seq[t]].item() for t in range(p, len(seq))]
        total, eos = total + sum(terms), eos + terms[-1]
    assert math.isclose(got["logps/correct"], total / 3, rel_tol=1e-5)
    assert math.isclose(got["logps/correct_eos"], eos / 3, rel_tol=1e-5)
    g = torch.Generator().manual_seed(0)  # the samples: evaluate_policy's (seed 0, T = 1)
    outs = gpt.generate(model, [task.prompt_tokens(p) for p in prompts], task.max_response_tokens, generator=g)
    assert got["samples/length"] == sum(len(sft.strip_eos(o)) for o in outs) / 3
    assert got["samples/no_eos"] == sum(EOS not in o for o in outs) / 3


# =============================================================================================
# 8. gpro.py: GPRO's weighted likelihood reaches pi* as K grows; GRPO's options, each against its formula
#    (notes 10.9)

@pytest.mark.parametrize("make, words", [(lambda: gpro.GPROConfig(kl_coef=-1), "kl_coef >= 0"),
                                         (lambda: gpro.GPROConfig(algo="ppo"), "algo="),
                                         (lambda: gpro.GPROConfig(reward="rlhf"), "reward="),
                                         (lambda: gpro.GPROConfig(mu=0), "mu must be >= 1"),
                                         (lambda: gpro.GPROConfig(scale_rewards="std"), "scale_rewards="),
                                         (lambda: gpro.GPROConfig(loss_agg="mean"), "loss_agg="),
                                         (lambda: gpro.GPROConfig(clip_eps_high=-0.1), "clip_eps_high")])
def test_gpro_config_rejects_bad_values(make, words):
    with pytest.raises(UserError, match=words):
        make()


def gpro_on_bandit(K, beta=0.5):
    """Fit a softmax policy by the GPRO loss on draws of K responses from pi_ref (320k samples in all)."""
    groups = 320_000 // K
    log_ref, r, optimum = bandit(beta=beta)
    g = torch.Generator().manual_seed(K)
    ys = torch.multinomial(log_ref.exp(), groups * K, replacement=True, generator=g).view(groups, K)
    theta = log_ref.clone().requires_grad_()
    opt = torch.optim.Adam([theta], lr=0.05)
    for _ in range(300):
        loss = gpro.gpro_loss(torch.log_softmax(theta, 0)[ys], r[ys], beta)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return 0.5 * (torch.softmax(theta, 0) - optimum).abs().sum().item()


def test_gpro_converges_to_the_optimum_as_k_grows():
    """Self-normalised weights softmax(r / beta) over K samples are biased towards pi_ref for small K."""
    tv = {K: gpro_on_bandit(K) for K in (2, 8, 64)}
    assert tv[2] > tv[8] > tv[64] and tv[64] < 0.05 and tv[2] > 0.05, tv


def test_gpro_weights_are_a_softmax_of_r_over_beta():
    r = torch.tensor([[1.0, 0.0, 0.5], [0.2, 0.2, 0.2]])
    w = gpro.gpro_weights(r, beta=0.5)
    assert torch.allclose(w.sum(-1), torch.ones(2)) and torch.allclose(w[1], torch.full((3,), 1 / 3))
    assert torch.allclose(w[0, 0] / w[0, 1], torch.tensor(math.exp(2.0)))  # exp((r_i - r_j) / beta)


def test_grpo_policy_gradient_is_zero_for_a_group_of_equal_rewards():
    logits = torch.randn(3, 5, 10, requires_grad=True)  # 3 responses of 5 tokens
    tokens = torch.randint(10, (3, 5))
    logp = torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1)
    mask = torch.ones(3, 5)
    adv = gpro.grpo_advantages(torch.full((1, 3), 0.7))[0]
    loss = gpro.grpo_loss(logp, logp.detach(), logp.detach(), adv, mask, beta=0.0)
    loss.backward()
    assert loss.item() == 0 and (logits.grad == 0).all()
    # with different rewards the first step is the plain policy gradient -A grad log pi (ratio 1)
    logits.grad = None
    logp = torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1)
    adv = torch.tensor([1.0, -1.0, 0.0])
    gpro.grpo_loss(logp, logp.detach(), logp.detach(), adv, mask, beta=0.0).backward(retain_graph=True)
    want = torch.autograd.grad(-(adv[:, None] * logp).sum() / mask.sum(), logits)[0]
    assert torch.allclose(logits.grad, want, atol=1e-6)


@pytest.mark.parametrize("flags", [["--algo", "gpro", "--online"], ["--algo", "grpo", "--reward", "rm"]])
def test_gpro_main_end_to_end(tmp_path, fine_tuned, reward_trained, flags):
    out = stage_dir(tmp_path, fine_tuned[1] / "sft.pt", reward_trained[1] / "reward.pt")
    r = run_script(["gpro.py", "--out_dir", str(out), "--max_steps", "3", "--eval_interval", "3", "--batch_size", "2",
                    "--k", "3", "--heldout", "8", *CPU, *flags], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    metrics = json.loads((out / f"{flags[1]}_metrics.json").read_text())  # GRPO's never overwrite GPRO's figures
    assert last_json_line(r) == metrics and metrics["stage"] == flags[1] and len(list(out.glob("*_metrics.json"))) == 1
    assert metrics["algo"] == flags[1] and 0 <= metrics["after"]["sample_accuracy"] <= 1
    assert train.load_checkpoint(str(out / f"{flags[1]}.pt"))["finished"]


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_grpo_advantages_match_their_formulas(scale):
    """A_i = (r_i - mean of its group) / (std + 1e-4), the std of the group, of the whole batch, or no division."""
    r = torch.tensor([[1.0, 0.0, 0.5, 0.25], [0.2, 0.2, 0.2, 0.2], [1.0, 1.0, 0.0, 0.0]])
    got = gpro.grpo_advantages(r, scale)
    rows = r.tolist()
    every = [x for row in rows for x in row]
    for i, row in enumerate(rows):
        std = {"group": statistics.stdev(row), "batch": statistics.stdev(every), "none": None}[scale]
        for j, x in enumerate(row):
            want = (x - statistics.mean(row)) / (std + 1e-4) if std is not None else x - statistics.mean(row)
            assert math.isclose(got[i, j].item(), want, rel_tol=1e-5, abs_tol=1e-6), (i, j)
    assert (got[1] == 0).all()  # a group of equal rewards teaches nothing, however it is scaled


def random_grpo_batch(seed=0, N=5, T=6):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(N, T, generator=g) * 2
    old = logp + 0.4 * torch.randn(N, T, generator=g)
    ref = logp + 0.4 * torch.randn(N, T, generator=g)
    adv = torch.randn(N, generator=g)
    lengths = [1, 3, 6, 4, 2][:N]
    mask = torch.tensor([[1.0] * n + [0.0] * (T - n) for n in lengths])
    return logp, old, ref, adv, mask, lengths


@pytest.mark.parametrize("agg", ["sequence", "token", "constant"])
@pytest.mark.parametrize("eps_high", [None, 0.28])
def test_grpo_loss_aggregations_match_their_formulas(agg, eps_high):
    """Per token l = -min(rho A, clip(rho, 1 - eps, 1 + eps_high) A) + beta (exp(q) - q - 1), written out with
    Python floats; then GRPO's mean of per-response means, DAPO's sum over tokens / their count, or Dr. GRPO's
    sum / (N x max_len)."""
    logp, old, ref, adv, mask, lengths = random_grpo_batch()
    eps, beta, max_len = 0.2, 0.3, 8
    high = eps if eps_high is None else eps_high
    per_response = []
    for i, n in enumerate(lengths):
        terms = []
        for t in range(n):
            rho, a = math.exp(logp[i, t].item() - old[i, t].item()), adv[i].item()
            q = ref[i, t].item() - logp[i, t].item()
            terms.append(-min(rho * a, min(max(rho, 1 - eps), 1 + high) * a) + beta * (math.exp(q) - q - 1))
        per_response.append(terms)
    want = {"sequence": statistics.mean(sum(ts) / len(ts) for ts in per_response),
            "token": sum(map(sum, per_response)) / sum(lengths),
            "constant": sum(map(sum, per_response)) / (len(lengths) * max_len)}[agg]
    got = gpro.grpo_loss(logp, old, ref, adv, mask, eps, beta, agg, max_len, eps_high)
    assert math.isclose(got.item(), want, rel_tol=1e-5)


def test_grpo_clipped_gradient_vanishes_exactly_where_it_should():
    """d loss / d log pi_t is 0 exactly where the clip is active on the side the advantage favours (rho > 1 + eps_high
    with A > 0, rho < 1 - eps_low with A < 0) and -A rho_t / normaliser everywhere else, including the other two
    corners (rho above the range with A < 0, below it with A > 0), where min() keeps the unclipped term."""
    eps_low, eps_high = 0.2, 0.28
    rhos = torch.tensor([0.5, 0.79, 0.81, 1.0, 1.1, 1.27, 1.29, 2.0])
    old = torch.full((2, 8), -1.0)
    logp = (old + rhos.log()).requires_grad_()                    # row 0: A = +1.5, row 1: A = -0.7
    adv, mask = torch.tensor([1.5, -0.7]), torch.ones(2, 8)
    loss = gpro.grpo_loss(logp, old, old, adv, mask, eps_low, 0.0, "token", clip_eps_high=eps_high)
    grad, = torch.autograd.grad(loss, logp)
    for i, a in enumerate(adv.tolist()):
        for t, rho in enumerate(rhos.tolist()):
            clipped = (a > 0 and rho > 1 + eps_high) or (a < 0 and rho < 1 - eps_low)
            if clipped:
                assert grad[i, t].item() == 0.0, (a, rho)
            else:
                assert math.isclose(grad[i, t].item(), -a * rho / 16, rel_tol=1e-5), (a, rho)
    fr = gpro.clip_fractions(logp.detach(), old, adv, mask, eps_low, eps_high)
    assert fr["clip_ratio/high_mean"] == 2 / 16 and fr["clip_ratio/low_mean"] == 2 / 16  # 1.29, 2.0 | 0.5, 0.79
    assert fr["clip_ratio/region_mean"] == 4 / 16
    # symmetric clipping (clip_eps_high = None): 1.27 is now above 1 + 0.2 and clipped too
    assert gpro.clip_fractions(logp.detach(), old, adv, mask, eps_low)["clip_ratio/high_mean"] == 3 / 16


def test_grpo_rollout_then_mu_updates():
    """The loop's pieces on a tiny policy: the rollout's old log-probs are the policy's own (ratio exactly 1 on the
    first update, no clipping, the plain policy gradient), the reference's are recorded, the advantages follow the
    rewards; after an optimizer step on the same batch the ratio moves and the clip acts."""
    policy, task = seeded_model(1), ADD
    ref = copy.deepcopy(policy).requires_grad_(False)
    cfg = gpro.GPROConfig(algo="grpo", k=4, mu=2, kl_coef=0.0, loss_agg="token", scale_rewards="none")
    prompts = task.sample_prompts(3, random.Random(0))
    r = torch.tensor([[1.0, 0.0, 0.5, 0.0], [0.3, 0.3, 0.3, 0.3], [0.0, 1.0, 0.0, 0.0]])
    batch, stats = gpro.grpo_rollout(policy, ref, task, prompts, lambda p, ys: r, cfg, torch.Generator().manual_seed(0))
    assert torch.equal(batch["old_logp"], batch["ref_logp"])  # the policy is still the reference
    assert torch.allclose(batch["adv"], (r - r.mean(-1, keepdim=True)).flatten())
    assert math.isclose(stats["frac_reward_zero_std"], 1 / 3, rel_tol=1e-6)
    assert stats["completions/mean_length"] == batch["mask"].sum(1).mean().item()
    policy.train()
    opt = torch.optim.SGD(policy.parameters(), lr=30.0)
    loss, first = gpro.grpo_update(policy, batch, cfg, task.max_response_tokens)
    logp, _ = gpt.sequence_logprobs(policy, batch["ids"], batch["mask"])
    assert torch.equal(logp.detach(), batch["old_logp"]) and first["clip_ratio/region_mean"] == 0
    want = -(batch["adv"][:, None] * logp * batch["mask"]).sum() / batch["mask"].sum()  # REINFORCE with a baseline
    for a, b in zip(torch.autograd.grad(loss, list(policy.parameters()), retain_graph=True, allow_unused=True),
                    torch.autograd.grad(want, list(policy.parameters()), allow_unused=True)):
        assert (a is None and b is None) or torch.allclose(a, b, atol=1e-6)
    opt.zero_grad()
    loss.backward()
    opt.step()
    _, second = gpro.grpo_update(policy, batch, cfg, task.max_response_tokens)
    assert second["clip_ratio/region_mean"] > 0, second


def test_rloo_advantages_are_each_reward_minus_the_mean_of_the_others_and_carry_the_kl():
    """RLOO (Ahmadian et al. 2024): A_i = R_i - mean_{j != i} R_j, written here as an explicit loop, with
    R = r - kl_coef log(pi_old(y) / pi_ref(y)) summed over the response; the update has no k3 term."""
    r = torch.tensor([[1.0, 0.0, 0.5, 0.25], [0.3, 0.9, 0.3, 0.1]])
    want = torch.tensor([[r[b, i] - sum(r[b, j] for j in range(4) if j != i) / 3 for i in range(4)] for b in range(2)])
    assert torch.allclose(gpro.rloo_advantages(r), want)
    policy, task = seeded_model(1), ADD
    ref = seeded_model(2).requires_grad_(False)  # another model: the KL is not zero
    cfg = gpro.GPROConfig(algo="rloo", k=4, kl_coef=0.3)
    prompts = task.sample_prompts(2, random.Random(0))
    batch, _ = gpro.grpo_rollout(policy, ref, task, prompts, lambda p, ys: r, cfg, torch.Generator().manual_seed(0))
    ids, mask = batch["ids"], batch["mask"]
    with torch.no_grad():
        seq_kl = (gpt.sequence_logprobs(policy, ids, mask)[1] - gpt.sequence_logprobs(ref, ids, mask)[1]).view(2, 4)
    R = r - 0.3 * seq_kl
    want = torch.tensor([[R[b, i] - sum(R[b, j] for j in range(4) if j != i) / 3 for i in range(4)] for b in range(2)])
    assert torch.allclose(batch["adv"], want.flatten(), atol=1e-5)
    loss, _ = gpro.grpo_update(policy, batch, cfg, task.max_response_tokens)  # ratio 1: -mean A, no k3 KL term
    assert loss.item() == pytest.approx((-(batch["adv"][:, None] * mask).sum() / mask.sum()).item(), abs=1e-6)


def test_gspo_clips_whole_responses_by_the_geometric_mean_ratio():
    """GSPO (Zheng et al. 2025): s_i = exp(mean_t log(pi / pi_old)) over response i's tokens, one ratio for all of
    them. With loss_agg sequence the loss is mean_i -min(s_i A_i, clip(s_i) A_i), so the gradient of token t of
    response i is -A_i s_i / (|y_i| N) where the clip does not bind, and zero for the whole response where it does."""
    old = torch.full((3, 4), -1.0)
    mask = torch.tensor([[1.0, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    shift = torch.tensor([[0.3, -0.1, 0.1, 9.0], [0.05, 0.05, 9.0, 9.0], [-0.4, -0.4, -0.4, -0.4]])
    logp = (old + shift).requires_grad_()
    adv = torch.tensor([1.0, -2.0, -1.0])
    eps = 0.2
    loss = gpro.grpo_loss(logp, old, old, adv, mask, eps, 0.0, "sequence", level="sequence")
    grad, = torch.autograd.grad(loss, logp)
    for i in range(3):
        n = int(mask[i].sum())
        s = math.exp(sum(shift[i, :n].tolist()) / n)                        # 1.1, 1.05, 0.67 (padding ignored)
        clipped = (adv[i] > 0 and s > 1 + eps) or (adv[i] < 0 and s < 1 - eps)
        want = 0.0 if clipped else -adv[i].item() * s / (n * 3)
        assert grad[i, :n].tolist() == pytest.approx([want] * n, abs=1e-6) and (grad[i, n:] == 0).all()
    fr = gpro.clip_fractions(logp.detach(), old, adv, mask, eps, level="sequence")
    assert fr["clip_ratio/low_mean"] == pytest.approx(4 / 9)  # response 2's four tokens of the nine
    tok = gpro.clip_fractions(logp.detach(), old, adv, mask, eps, level="token")
    assert tok["clip_ratio/low_mean"] == pytest.approx(4 / 9) and tok["clip_ratio/high_mean"] == pytest.approx(1 / 9)


@pytest.mark.parametrize("flags", [["--mu", "2", "--loss_agg", "constant", "--scale_rewards", "batch",
                                    "--clip_eps_high", "0.28"]])
def test_grpo_main_with_several_updates_per_rollout(tmp_path, fine_tuned, flags):
    out = stage_dir(tmp_path, fine_tuned[1] / "sft.pt")
    r = run_script(["gpro.py", "--algo", "grpo", "--out_dir", str(out), "--max_steps", "5", "--eval_interval", "4",
                    "--batch_size", "2", "--k", "3", "--heldout", "8", *CPU, *flags], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    metrics = last_json_line(r)
    assert metrics["steps"] == 5 and metrics["algo"] == "grpo"
    for key in gpro.CLIP_KEYS:
        assert 0 <= metrics[key] <= 1
    ckpt = train.load_checkpoint(str(out / "grpo.pt"))
    assert ckpt["finished"] and ckpt["gpro"]["mu"] == 2


# =============================================================================================
# 9. compare.py: every method once from one chain, the tables from the runs' own metrics, then only a redraw

TINY_COMPARE = (f"gpt.py: {' '.join(TINY_FLAGS)}; sft.py: --max_steps 4 --eval_interval 2 --batch_size 4 --heldout 8; "
                "reward.py: --max_steps 3 --batch_size 4 --n_pairs 12 --n_eval 8 --heldout 8; dpo.py: --max_steps 3 "
                "--batch_size 2 --n_pairs 8 --n_eval 4 --heldout 8; gpro.py: --max_steps 3 --batch_size 2 --k 3 "
                "--heldout 8; ppo.py: --max_steps 3 --batch_size 4 --minibatches 2 --heldout 8")


def test_compare_runs_every_method_once_then_only_redraws(tmp_path, corpus, capsys, monkeypatch):
    out = tmp_path / "cmp"
    args = ["compare.py", "--quick", "--out_dir", str(out), "--device", "cpu", "--jobs", "2",
            "--extra", f"gpt.py: --data {corpus}; " + TINY_COMPARE]
    r = run_script(args, cwd=tmp_path, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    chain = out / "chain_1337"
    runs = {key: chain / f"{key}_20s" for key, *_ in compare.METHODS}
    stage_of = {key: stage for key, _, _, stage, *_ in compare.METHODS}
    for key, d in runs.items():
        m = json.loads((d / f"{stage_of[key]}_metrics.json").read_text())
        assert m["steps"] == 3 + (key == "control") and m["curve"] and m["curve"][-1]["step"] == m["steps"]
    # the table: each method's figure is its run's own held-out figure after training (the control's its own)
    table = json.loads((out / "compare_metrics.json").read_text())["methods"]
    for key, title, _, stage, *_ in compare.METHODS:
        m = json.loads((runs[key] / f"{stage}_metrics.json").read_text())
        after = m["after"] if key != "control" else m
        assert table[title]["sample_accuracy"] == [after["sample_accuracy"]]
        assert title in (out / "compare.md").read_text()
    sft_m = json.loads((chain / "sft_metrics.json").read_text())
    assert table["SFT (start)"]["accuracy"] == [sft_m["accuracy"]]
    gpt_m, reward_m = (json.loads((chain / f"{s}_metrics.json").read_text()) for s in ("gpt", "reward"))
    assert f"| gpt.py | validation bits per byte | {gpt_m['val_bpb']:.3f} |" in (out / "compare.md").read_text()
    assert f"| pairwise accuracy on held-out comparisons | {100 * reward_m['pairwise_accuracy']:.1f} |" in (
        out / "compare.md").read_text()
    pictures = ["accuracy_vs_seconds.png", "reward_vs_kl.png", "pretraining_and_sft.png"]
    assert all((out / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pictures)
    # run again: nothing trains, the tables and pictures are drawn anew from the same metrics
    stamps = {p: p.stat().st_mtime_ns for p in chain.rglob("*.pt")}
    r = run_script(args, cwd=tmp_path, timeout=300)
    n = len(compare.METHODS) + 3  # the chain's three stages, then every method
    assert r.returncode == 0 and f"{n} of {n} runs already finished" in r.stdout and "started" not in r.stdout, r.stdout
    assert {p: p.stat().st_mtime_ns for p in chain.rglob("*.pt")} == stamps
    # without matplotlib: the tables and one line saying how to get the pictures
    for p in pictures:
        (out / p).unlink()
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    compare.main(args[1:])
    said = capsys.readouterr().out
    assert "pip install matplotlib" in said and "| PPO, r* |" in said
    assert not any((out / p).exists() for p in pictures) and (out / "compare.md").exists()


def test_compare_means_leave_out_a_chain_whose_sft_did_not_learn_the_task():
    """A chain whose SFT model ended under sft.LEARNT greedy is named and left out of the mean, kept per chain."""
    def figures(sampled, greedy):
        return {"sample_accuracy": sampled, "accuracy": greedy, "true_reward": 0.5, "kl": 0.25,
                "sample_accuracy_ci": [sampled - 0.01, sampled + 0.01], "steps": 7}
    metrics = {"1/sft": figures(0.60, 0.95), "2/sft": figures(0.06, 0.04), "3/sft": figures(0.70, 0.90),
               "1/dpo": {"after": figures(0.90, 0.99)}, "2/dpo": {"after": figures(0.10, 0.08)},
               "3/dpo": {"after": figures(0.96, 1.0)}}
    cfg = compare.CompareConfig(seeds="1,2,3", methods="dpo")
    assert compare.averaged_chains(cfg, metrics)[0] == [1, 3]
    text, rows = compare.tables(cfg, metrics)
    assert rows["DPO, beta 0.5 + RPO"]["sample_accuracy"] == [0.90, 0.96]
    assert "| DPO, beta 0.5 + RPO | 93.0 (90.0-96.0) | 99.5 (99.0-100.0) |" in text
    assert "chain 2 (SFT 4.0% greedy)" in text and "10.0 [9.0, 11.0] / 8.0" in text  # named, and kept per chain
    everyone_short = {k: {**v, "accuracy": 0.5} if k.endswith("sft") else v for k, v in metrics.items()}
    assert compare.averaged_chains(cfg, everyone_short)[0] == [1, 2, 3]


def test_compare_task_reaches_every_stage_after_pretraining(tmp_path, corpus):
    """--task sort: pretraining knows no task (gpt.py has no --task); SFT, the reward model and every method train on
    sorting, as their checkpoints record, under the task's own defaults (6 digits)."""
    out = tmp_path / "cmp"
    r = run_script(["compare.py", "--quick", "--task", "sort", "--methods", "control,dpo", "--out_dir", str(out),
                    "--device", "cpu", "--extra", f"gpt.py: --data {corpus}; " + TINY_COMPARE], cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    chain = out / "sort" / "chain_1337"
    for path in (chain / "sft.pt", chain / "reward.pt", chain / "control_20s" / "sft.pt", chain / "dpo_20s" / "dpo.pt"):
        assert train.load_checkpoint(str(path))["task"] == {"name": "sort", "digits": 6, "slip": 0.4}, path
    assert "task" not in train.load_checkpoint(str(chain / "gpt.pt"))
    assert sorted(p.name for p in chain.iterdir() if p.is_dir()) == ["control_20s", "dpo_20s"]


@pytest.mark.parametrize("flags, words", [(["--seeds", "1,1"], ["--seeds", "distinct"]),
                                          (["--methods", "dpo,sft2"], ["no method sft2"]),
                                          (["--extra", "train.py: --lr 1"], ["--extra", "SCRIPT"]),
                                          (["--seconds", "0"], ["--seconds"]), (["--jobs", "0"], ["--jobs"]),
                                          (["--task", "nope"], ["--task nope", "add, sort"])])
def test_compare_bad_flags_are_one_line(tmp_path, capsys, flags, words):
    code, err = main_in_process(compare, ["--out_dir", str(tmp_path / "out"), *flags], capsys)
    assert_one_error_line(code, err, 2, words)
    assert not (tmp_path / "out").exists()


# =============================================================================================
# 10. diffusion_toy.py (homework problem 1 and problem 4). Every closed form is checked against an
# independent computation: the homework's own finite-T formula (eq. 1), a product derived by hand,
# Euler-Maclaurin for the dt -> 0 gap, direct Gaussian conditioning from a joint covariance matrix,
# or a Monte-Carlo simulation written out here.

S2 = (0.01, 0.05)
SAMPLERS = ("mean", "ddpm", "ddpm_exact", "ddim")


def se_var(var, n):
    return var * math.sqrt(2 / (n - 1))

# ---------------------------------------------------------------------------------------------
# problem 1, exact finite-T variances

@pytest.mark.parametrize("s2", S2)
@pytest.mark.parametrize("T", (1, 10, 100, 1000))
def test_ddpm_recursion_is_homework_eq1(s2, T):
    """1(e) eq. (1) is exact for X_1 ~ N(0, 1) with N(0, dt) noise at every step."""
    dt = 1 / T
    eq1 = (s2 / (s2 + 1)) ** 2 + dt * sum((s2 / (s2 + k * dt)) ** 2 for k in range(T))
    assert ve_exact_variance("ddpm", T, s2, 1.0) == pytest.approx(eq1, rel=1e-10)


@pytest.mark.parametrize("s2", S2)
@pytest.mark.parametrize("T", (1, 7, 100, 1000))
def test_mean_only_and_exact_ddpm_have_no_finite_T_gap(s2, T):
    # 1(d): the product of (s2 + k dt)/(s2 + (k+1) dt) telescopes to s2/(s2+1) at every T
    product = np.prod([(s2 + k / T) / (s2 + (k + 1) / T) for k in range(T)])
    for v1 in (1.0, 1 + s2):
        assert ve_exact_variance("mean", T, s2, v1) == pytest.approx(product ** 2 * v1, rel=1e-10)
        assert ve_limit("mean", s2, v1) == pytest.approx(product ** 2 * v1, rel=1e-10)
    # 1(c) exact reverse variance: from the true marginal N(0, 1+s2) every step keeps X_t ~ N(0, s2+t)
    assert ve_exact_variance("ddpm_exact", T, s2, 1 + s2) == pytest.approx(s2, rel=1e-10)
    # from N(0, 1) the deficit -s2 is multiplied by the squared product (s2/(s2+1))^2
    assert ve_exact_variance("ddpm_exact", T, s2, 1.0) == pytest.approx(s2 - s2 ** 3 / (s2 + 1) ** 2, rel=1e-10)


@pytest.mark.parametrize("s2", S2)
@pytest.mark.parametrize("T", (1, 10, 1000))
def test_ddim_recursion_is_the_product_of_ddim_factors(s2, T):
    """DDIM's factor at t is (s2 + sqrt(t (t-dt)))/(s2 + t) (derived by hand); by AM-GM its square is below
    the true variance ratio (s2+t-dt)/(s2+t), so from N(0, 1+s2) DDIM always lands below s2."""
    ts = [k / T for k in range(1, T + 1)]
    factor = np.prod([(s2 + math.sqrt(t * (t - 1 / T))) / (s2 + t) for t in ts])
    for v1 in (1.0, 1 + s2):
        assert ve_exact_variance("ddim", T, s2, v1) == pytest.approx(factor ** 2 * v1, rel=1e-10)
    assert ve_exact_variance("ddim", T, s2, 1 + s2) < s2


def test_ddim_step_is_song_et_al_ddim_and_eta_expands_as_in_1g():
    rng = np.random.default_rng(0)
    for _ in range(20):
        t = rng.uniform(0.01, 1)
        dt = t * rng.uniform(0.001, 1)
        x, x0_hat = rng.normal(size=2)
        mean, std = ve_step("ddim", x, t, dt, x0_hat, s2=0.01)
        assert std == 0
        assert mean == pytest.approx(x0_hat + math.sqrt((t - dt) / t) * (x - x0_hat), rel=1e-9, abs=1e-12)
    # 1(g): eta(t, dt) = 1/2 + dt/(8t) + O((dt/t)^2)
    for t, dt in ((0.5, 1e-3), (1.0, 1e-4)):
        eta = math.sqrt(t) / (math.sqrt(t - dt) + math.sqrt(t))
        assert abs(eta - 0.5 - dt / (8 * t)) < (dt / t) ** 2


def test_ddpm_step_is_the_conditional_of_1c():
    """With the oracle, the DDPM mean and the exact variance are Gaussian conditioning of X_{t-dt} on X_t,
    computed here from the covariance of (X_{t-dt}, X_t) (1(b): Var = s2 + t, Cov = s2 + t - dt)."""
    s2 = 0.03
    for t, dt in ((1.0, 0.01), (0.3, 0.1), (0.05, 0.05)):
        cov = np.array([[s2 + t - dt, s2 + t - dt], [s2 + t - dt, s2 + t]])
        slope = cov[0, 1] / cov[1, 1]
        cond_var = cov[0, 0] - cov[0, 1] ** 2 / cov[1, 1]
        for sampler, var in (("ddpm_exact", cond_var), ("ddpm", dt), ("mean", 0.0)):
            mean, std = ve_step(sampler, 2.0, t, dt, dt_mod.ve_oracle(2.0, t, s2), s2)
            assert mean == pytest.approx(2.0 * slope, rel=1e-12)
            assert std ** 2 == pytest.approx(var, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("T", (10, 40))
def test_exact_recursion_matches_monte_carlo(T):
    """A Monte-Carlo run written out here (oracle x0_hat, the homework's step formulas) agrees with the
    recursion within 4 standard errors; at this small T the dt -> 0 limit is far outside that band."""
    s2, n, rng = 0.01, 200_000, np.random.default_rng(1)
    dt = 1 / T
    for v1 in (1.0, 1 + s2):
        x = {s: rng.normal(0, math.sqrt(v1), n) for s in SAMPLERS}
        for k in range(T, 0, -1):
            t = k * dt
            a = 1 - dt / (s2 + t)                                          # 1(c), 1(f)
            eta = math.sqrt(t) / (math.sqrt(t - dt) + math.sqrt(t))        # 1(f)
            x["mean"] = a * x["mean"]
            x["ddpm"] = a * x["ddpm"] + math.sqrt(dt) * rng.standard_normal(n)
            x["ddpm_exact"] = a * x["ddpm_exact"] + math.sqrt((s2 + t - dt) * dt / (s2 + t)) * rng.standard_normal(n)
            x["ddim"] = (1 - eta * dt / (s2 + t)) * x["ddim"]
        for s in SAMPLERS:
            exact = ve_exact_variance(s, T, s2, v1)
            assert abs(x[s].var() - exact) < 4 * se_var(exact, n), (s, v1)
            if s in ("ddpm", "ddim"):
                assert abs(ve_limit(s, s2, v1) - exact) > 20 * se_var(exact, n)


@pytest.mark.parametrize("s2", S2)
def test_limits_and_their_gaps(s2):
    shrink = s2 / (s2 + 1)
    # the homework's closed forms for X_1 ~ N(0, 1), and their N(0, 1 + s2) variants
    assert ve_limit("ddpm", s2, 1.0) == pytest.approx(s2 - s2 ** 3 / (s2 + 1) ** 2, rel=1e-12)
    assert ve_limit("ddim", s2, 1.0) == pytest.approx(shrink, rel=1e-12)
    assert ve_limit("mean", s2, 1 + s2) == pytest.approx(s2 ** 2 / (s2 + 1), rel=1e-12)
    assert ve_limit("ddpm", s2, 1 + s2) == pytest.approx(s2, rel=1e-12)
    assert ve_limit("ddim", s2, 1 + s2) == pytest.approx(s2, rel=1e-12)
    for T in (10_000, 100_000):
        dt = 1 / T
        for v1 in (1.0, 1 + s2):
            # DDPM: the left Riemann sum of f(t) = (s2/(s2+t))^2 overshoots its integral by dt (f(0) - f(1))/2
            gap = ve_exact_variance("ddpm", T, s2, v1) - ve_limit("ddpm", s2, v1)
            assert gap / dt == pytest.approx((1 - shrink ** 2) / 2, rel=0.05)
            # DDIM: each step loses the factor 1 - s2 dt (sqrt k - sqrt(k-1))^2 / ((s2+k dt)(s2+(k-1) dt)), so
            # 0 < -log(Var_T / limit) <= dt/s2 (5/4 + log(T)/4) / (1 - dt/s2): an O(dt log T) gap
            log_ratio = math.log(ve_exact_variance("ddim", T, s2, v1) / ve_limit("ddim", s2, v1))
            assert 0 < -log_ratio <= dt / s2 * (1.25 + math.log(T) / 4) / (1 - dt / s2)

# ---------------------------------------------------------------------------------------------
# problem 4, the variance-preserving process

@pytest.mark.parametrize("schedule", ("linear", "cosine"))
def test_vp_alpha_bar_and_q_xt_given_x0(schedule):
    cfg = DiffusionConfig(vp_schedule=schedule)
    beta, ab = vp_schedule(cfg)
    T = cfg.vp_T
    assert len(beta) == T and len(ab) == T + 1 and ab[0] == 1.0
    assert np.all((beta > 0) & (beta < 1))
    if schedule == "linear":
        assert beta[0] == pytest.approx(1e-4) and beta[-1] == pytest.approx(0.02)
    else:  # Nichol & Dhariwal: alpha_bar_t = f(t)/f(0) wherever beta was not clipped
        f = lambda t: math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2
        assert ab[T // 2] == pytest.approx(f(T // 2) / f(0), rel=1e-9)
    assert ab[T] < 1e-4                                              # x_T is nearly pure noise
    # 4(a) by Monte Carlo: run eq. (2) step by step from x_0 = 0.7, compare with N(sqrt(ab) x_0, 1 - ab)
    rng, n, x0 = np.random.default_rng(2), 100_000, 0.7
    x = np.full(n, x0)
    for t in range(1, T + 1):
        x = math.sqrt(1 - beta[t - 1]) * x + math.sqrt(beta[t - 1]) * rng.standard_normal(n)
        if t in (1, T // 10, T // 2, T):
            assert abs(x.mean() - math.sqrt(ab[t]) * x0) < 4 * math.sqrt((1 - ab[t]) / n)
            assert abs(x.var() - (1 - ab[t])) < 4 * se_var(1 - ab[t], n)


@pytest.mark.parametrize("schedule", ("linear", "cosine"))
@pytest.mark.parametrize("v", (0.25, 4.0))
def test_vp_posterior_is_gaussian_conditioning(schedule, v):
    """4(b) against conditioning x_{t-1} on (x_t, x_0) in the joint covariance of (x_0, x_{t-1}, x_t), built
    from the one-step kernel (2) alone: Var x_{t-1} = ab v + 1 - ab, x_t = sqrt(1-beta) x_{t-1} + noise."""
    beta, ab = vp_schedule(DiffusionConfig(vp_schedule=schedule))
    for t in (2, 10, 100, 500, 1000):
        b, abp = beta[t - 1], ab[t - 1]
        var_prev = abp * v + 1 - abp
        cov = np.empty((3, 3))                                       # order: x_{t-1}, x_t, x_0
        cov[0, 0] = var_prev
        cov[1, 1] = (1 - b) * var_prev + b
        cov[2, 2] = v
        cov[0, 1] = cov[1, 0] = math.sqrt(1 - b) * var_prev
        cov[0, 2] = cov[2, 0] = math.sqrt(abp) * v
        cov[1, 2] = cov[2, 1] = math.sqrt(1 - b) * math.sqrt(abp) * v
        coef = np.linalg.solve(cov[1:, 1:], cov[1:, 0])
        cond_var = cov[0, 0] - cov[0, 1:] @ coef
        c_t, c_0, beta_hat = vp_posterior(t, beta, ab)
        assert (c_t, c_0) == pytest.approx(tuple(coef), rel=1e-7, abs=1e-12)
        assert beta_hat == pytest.approx(cond_var, rel=1e-6, abs=1e-12)
        # and the oracle denoiser is Cov(x_0, x_t) / Var(x_t)
        assert vp_oracle(1.0, t, ab, v) == pytest.approx(cov[1, 2] / cov[1, 1], rel=1e-9)


def test_vp_samplers_exact_recursion_matches_monte_carlo():
    cfg = DiffusionConfig()
    beta, ab = vp_schedule(cfg)
    v, n, rng = 0.25, 100_000, np.random.default_rng(3)
    for sampler in ("ddpm", "ddim"):
        step = lambda x, t: vp_step(sampler, x, t, vp_oracle(x, t, ab, v), beta, ab)
        times = range(cfg.vp_T, 0, -1)
        exact = dt_mod.variance_recursion(dt_mod.step_coefficients(step, times), 1.0)
        x = rng.standard_normal(n)
        for t in times:  # written out here rather than through run_sampler
            mean, std = step(x, t)
            x = mean + std * rng.standard_normal(n)
        assert abs(x.var() - exact) < 4 * se_var(exact, n)
        assert abs(exact - v) < 0.1 * v                              # both land near the target

# ---------------------------------------------------------------------------------------------
# the learned denoisers

@pytest.fixture(scope="module")
def learned_1d():
    cfg = DiffusionConfig(seed=1)
    data = torch.tensor(np.random.default_rng(1).normal(0, math.sqrt(cfg.sigma2), (cfg.n_data, 1)),
                        dtype=torch.float32)
    return cfg, dt_mod.train_denoiser(data, cfg.hidden, cfg.steps, cfg, desc="test 1-D")


def test_learned_slope_within_10_percent(learned_1d):
    cfg, model = learned_1d
    s2 = cfg.sigma2
    for t in (0.1, 0.2, 0.5, 1.0):
        x = np.linspace(-2, 2, 401) * math.sqrt(s2 + t)             # two standard deviations of X_t
        with torch.no_grad():
            f = model(torch.tensor(x[:, None], dtype=torch.float32), t)[:, 0].numpy()
        slope = np.polyfit(x, f, 1)[0]
        assert slope == pytest.approx(s2 / (s2 + t), rel=0.10), t


def test_learned_samplers_variance(learned_1d):
    cfg, model = learned_1d
    T, v1, n = 20, 1 + cfg.sigma2, 20_000
    gen = torch.Generator().manual_seed(0)
    for sampler in ("ddpm", "ddim"):
        x = torch.randn((n, 1), generator=gen) * math.sqrt(v1)
        x = dt_mod.run_sampler(dt_mod.learned_step(sampler, T, model), ve_times(T), x,
                               lambda shape: torch.randn(shape, generator=gen))
        assert x.var().item() == pytest.approx(ve_exact_variance(sampler, T, cfg.sigma2, v1), rel=0.15)


def test_sliced_w2():
    rng = np.random.default_rng(4)
    angles = np.pi * np.arange(180) / 180                            # evenly spread directions
    d = np.stack([np.cos(angles), np.sin(angles)])                   # (2, 180)
    a = rng.standard_normal((5000, 2))
    assert dt_mod.sliced_w2(a, a[::-1], d) == pytest.approx(0.0, abs=1e-12)
    # a shift m: every 1-D W2 is |theta . m|, and the mean of (theta . m)^2 over directions is |m|^2 / 2
    assert dt_mod.sliced_w2(a, a + np.array([0.3, 0.4]), d) == pytest.approx(0.5 / math.sqrt(2), rel=1e-9)
    # N(0, I) vs N(0, 4 I): every projection is N(0, 1) vs N(0, 4), whose W2 is 2 - 1 = 1
    assert dt_mod.sliced_w2(a, 2 * rng.standard_normal((5000, 2)), d) == pytest.approx(1.0, rel=0.05)


def test_moons_model_beats_gaussian_fit():
    cfg = DiffusionConfig(seed=2)
    rows = {r[0]: r for r in dt_mod.moons_rows(cfg, np.random.default_rng(2))}
    # recompute the baseline independently: a Gaussian with the data's mean and covariance
    rng = np.random.default_rng(5)
    raw = dt_mod.two_moons(20_000, rng)
    data = (raw - raw.mean(0)) / raw.std(0) * cfg.moons_scale
    d = rng.standard_normal((2, 256))
    d /= np.linalg.norm(d, axis=0)
    gauss = rng.multivariate_normal(data[:10_000].mean(0), np.cov(data[:10_000].T), 2000)
    gauss_w2 = dt_mod.sliced_w2(gauss, data[-2000:], d)
    for sampler in ("ddpm", "ddim"):
        _, _, floor, w2, ok, _ = rows[f"moons_{sampler}"]
        assert ok and floor < w2 < 0.6 * gauss_w2, (sampler, floor, w2, gauss_w2)

# ---------------------------------------------------------------------------------------------
# the script

def test_diffusion_config_rejects_bad_values():
    for bad in (dict(sigma2=0.0), dict(sigma2=1.5), dict(T_list="10"), dict(T_list="10,100"),
                dict(T_list="100,x"), dict(vp_schedule="quadratic"), dict(posterior_t=1), dict(mc_T=3),
                dict(batch_size=1), dict(n_mc=50),
                dict(slope_ts="0,1"), dict(beta_1=0.1, beta_T=0.01)):
        with pytest.raises(UserError):
            DiffusionConfig(**bad)
    with pytest.raises(UserError, match="sigma2"):
        dt_mod.main(["--sigma2", "2"])


def test_diffusion_help_lists_the_flags(capsys):
    with pytest.raises(SystemExit) as e:
        dt_mod.main(["--help"])
    assert e.value.code == 0
    assert "--sigma2" in capsys.readouterr().out


def test_diffusion_plot_without_matplotlib_says_so(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)             # import matplotlib -> ImportError
    dt_mod.save_plot({"a": np.zeros((3, 2))}, str(tmp_path / "p.png"))
    assert "needs matplotlib" in capsys.readouterr().out
    assert not (tmp_path / "p.png").exists()


def test_diffusion_main_end_to_end(tmp_path, capsys):
    metrics = dt_mod.main(["--out_dir", str(tmp_path), "--n_mc", "5000", "--mc_T", "20", "--steps", "100",
                           "--n_data", "2000", "--n_learned", "1000", "--moons_steps", "100", "--moons_T", "10",
                           "--n_eval", "500", "--vp_T", "100", "--plot"])
    out = capsys.readouterr().out
    saved = json.loads((tmp_path / "diffusion_metrics.json").read_text())
    assert saved["stage"] == "diffusion"
    assert saved == json.loads(json.dumps({"stage": "diffusion", **metrics}))
    rows = {k: v for k, v in saved.items() if k not in ("stage", "all_ok")}
    assert len(rows) == 3 + 4 * 2 * 2 + 3 + 2 + 4 + 3 + 2 + 2
    for key, row in rows.items():
        assert {"theory", "measured", "ok"} <= set(row), key
        assert math.isfinite(row["theory"]) and math.isfinite(row["measured"]), key
    assert saved["all_ok"] == all(r["ok"] for r in rows.values())
    # rows that do not depend on training pass even at this size; the table shows them with their theory
    for key, row in rows.items():
        if key.startswith(("ve_", "vp_")):
            assert row["ok"], key
    assert rows["ve_ddpm_from_N(0,1)_limit"]["theory"] == pytest.approx(0.01 - 1e-6 / 1.01 ** 2)
    assert "theory beside measurement" in out and "pass" in out


# =============================================================================================
# 11. Off the happy path: every bad value and failure ends in one line that says what to do, exit status 2
# (130 for Ctrl-C, 143 for SIGTERM, 0 for --resume of a finished run), no traceback, and nothing trained is lost

def assert_one_error_line(code, err, status, words):
    assert code == status, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith(("error:", "interrupted:"))]
    assert len(lines) == 1 and all(w in lines[0] for w in words), (lines, err[-3000:])
    return lines[0]


def main_in_process(module, argv, capsys):
    """module.main(argv) the way `python module.py argv` runs it: (exit status, stderr)."""
    try:
        train.run_main(lambda: module.main(argv))
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("module, flags, words", [
    (gpt, ["--device", f"cuda:{torch.cuda.device_count()}"], ["--device"]),  # one past the last GPU, or none
    (gpt, ["--device", "tpu"], ["device=", "cuda:N"]),
    (gpt, ["--beta1", "1.5"], ["beta1", "[0, 1)"]), (gpt, ["--beta2", "-0.1"], ["beta2"]),
    (gpt, ["--warmup_steps", "-1"], ["warmup_steps"]), (gpt, ["--weight_decay", "-1"], ["weight_decay"]),
    (gpt, ["--max_seconds", "-5"], ["max_seconds"]), (gpt, ["--sample_tokens", "-1"], ["sample_tokens"]),
    (gpt, ["--val_fraction", "1.5"], ["val_fraction", "(0, 1)"]), (gpt, ["--data", HERE], ["is a directory"]),
    (gpt, ["--data", "/no/such/file.txt"], ["no such file"]), (gpt, ["--max_stepz", "3"], ["unrecognized", "--help"]),
    (gpt, ["--lr", "abc"], ["--lr", "not a finite number"]), (gpt, ["--resume", "--overwrite"], ["choose one"]),
    (gpt, ["--rope_theta", "nan"], ["--rope_theta", "finite"]), (ppo, ["--max_seconds", "inf"], ["finite"]),
    (dpo, ["--beta", "inf"], ["--beta", "not a finite number"]),
    (ppo, ["--top_p", "0"], ["top_p", "(0, 1]"]), (ppo, ["--top_k", "-1"], ["top_k"]),
    (ppo, ["--temperature", "0"], ["temperature > 0"]), (ppo, ["--minibatches", "65"], ["--minibatches", "empty"]),
    (sft, ["--heldout", "10000000"], ["heldout", "50626 prompts"]),
    (sft, ["--task", "nope"], ["task='nope'", "add, sort"]),
    (ppo, ["--task", "sort", "--digits", "1"], ["digits", "2..12", "--task sort"]),
    (dpo, ["--task", "sort", "--heldout", "70000"], ["heldout", "62501 prompts"]),
    (sft, ["--init", "/no/such.pt"], ["--init"]), (sft, ["--qlora"], ["--lora_rank"]),
    (sft, ["--prompt", "1+2"], ["--prompt", "--sample"]), (sft, ["--sample", "/no/such.pt"], ["no such file"]),
    (sft, ["--export_hf", os.path.join(HERE, "gpt.py")], ["--export_dir"]),
    (sft, ["--sample", os.path.join(HERE, "gpt.py"), "--n", "0"], ["n must be >= 1"]),
    (sft, ["--sample", os.path.join(HERE, "gpt.py"), "--top_p", "2"], ["top_p"]),
    (sft, ["--sample", os.path.join(HERE, "gpt.py"), "--lr", "0.1"], ["does not apply to --sample"]),
    (sft, ["--sample", os.path.join(HERE, "gpt.py"), "--export_hf", os.path.join(HERE, "gpt.py")], ["choose one"]),
    (reward, ["--tau", "0"], ["tau"]), (dpo, ["--beta", "0"], ["beta"]), (gpro, ["--k", "1"], ["k >= 2"]),
    (gpt, ["--seed", "20000000000000"], ["seed", "2^32"]), (gpt, ["--seed", "99999999999999999999"], ["seed"]),
    (gpt, ["--seed", "-1"], ["seed", "[0, 2^32"]), (dt_mod, ["--seed", "-1"], ["seed"]),
    (dt_mod, ["--n_mc", "100000000000"], ["--n_mc", "10^8"]),
    (sft, ["--seeds", "1,1"], ["--seeds", "twice"]), (sft, ["--seeds", "0,4294967296"], ["--seeds", "2^32"]),
    (gpro, ["--beta", "1e-320"], ["beta", "1e-6"]),
    (gpro, ["--algo", "grpo", "--grad_accum", "2"], ["GRPO", "--grad_accum"]),
    (dpo, ["--ipo_per_token"], ["--ipo_per_token", "--loss ipo"]),
])
def test_bad_values_are_caught_when_the_flags_are_parsed(tmp_path, capsys, module, flags, words):
    """Every value is validated when the flags are parsed, before any earlier stage trains: nothing is
    written (ppo.py --top_p 0 used to pretrain, fine-tune and train the reward model first)."""
    code, err = main_in_process(module, ["--out_dir", str(tmp_path / "out"), *flags], capsys)
    assert_one_error_line(code, err, 2, words)
    assert not (tmp_path / "out").exists()


def unfinished_copy(src, dst, **fields):
    """dst: the checkpoint src as a run that stopped at step 2 of its max_steps (or with other fields)."""
    ckpt = train.load_checkpoint(str(src))
    train.save_checkpoint(str(dst), **{**ckpt, "finished": False, "step": 2, **fields})


def test_resume_of_a_finished_run_prints_its_metrics_and_rerunning_never_overwrites(tmp_path, corpus, pretrained,
                                                                                     fine_tuned):
    out = stage_dir(tmp_path, pretrained[1] / "gpt.pt", fine_tuned[1] / "sft.pt")
    r = run_script(["dpo.py", "--out_dir", str(out), "--max_steps", "2", "--eval_interval", "2", "--batch_size", "2",
                    "--n_pairs", "8", "--n_eval", "4", "--heldout", "4", *CPU], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    saved = {stage: (out / f"{stage}.pt").read_bytes() for stage in ("gpt", "sft", "dpo")}
    for stage, extra in (("gpt", ["--data", corpus, *TINY_FLAGS]), ("sft", CPU), ("dpo", CPU)):
        r = run_script([f"{stage}.py", "--out_dir", str(out), "--resume", *extra], cwd=tmp_path)
        assert r.returncode == 0 and "finished at step" in r.stdout and "Traceback" not in r.stderr, r.stderr
        assert json.loads(r.stdout.split("its metrics: ")[1])  # the saved metrics, as JSON
        r = run_script([f"{stage}.py", "--out_dir", str(out), *extra], cwd=tmp_path)  # a plain re-run
        assert_one_error_line(r.returncode, r.stderr, 2, ["finished", "--resume", "--overwrite"])
    assert all((out / f"{stage}.pt").read_bytes() == data for stage, data in saved.items())


@pytest.mark.parametrize("case", ["another architecture", "another learning rate", "missing fields", "another task",
                                  "unfinished upstream", "a finished run of other sizes", "--init of an unfinished run",
                                  "a reward model of another sft.pt", "another task's name"])
def test_resume_and_upstream_checkpoints_are_checked(tmp_path, corpus, pretrained, fine_tuned, reward_trained, case):
    """--resume continues only the run it saved (and prints the metrics only of the run asked for); a stage never
    builds silently on a checkpoint made for another task, on another upstream model or on an unfinished one.
    The message names the field and the command that fixes it, and that command works."""
    out = tmp_path / "out"
    out.mkdir()
    if case == "another architecture":  # an interrupted RMSNorm run resumed with --norm layernorm
        unfinished_copy(pretrained[1] / "gpt.pt", out / "gpt.pt")
        args, words = ["gpt.py", "--data", corpus, *TINY_FLAGS, "--resume", "--norm", "layernorm"], ["config.norm",
                                                                                                       "--overwrite"]
    elif case == "another learning rate":  # the same run resumed with --lr: it would not continue exactly
        unfinished_copy(pretrained[1] / "gpt.pt", out / "gpt.pt")
        args, words = ["gpt.py", "--data", corpus, *TINY_FLAGS, "--resume", "--lr", "1e-3"], ["--lr=0.003", "0.001",
                                                                                             "--overwrite"]
    elif case == "missing fields":  # a checkpoint without the optimizer state and step resume needs
        ckpt = train.load_checkpoint(str(pretrained[1] / "gpt.pt"))
        train.save_checkpoint(str(out / "gpt.pt"), model=ckpt["model"], config=ckpt["config"], finished=False)
        args, words = ["gpt.py", "--data", corpus, *TINY_FLAGS, "--resume"], ["cannot resume", "--overwrite"]
    elif case == "another task":  # an sft.pt trained on 3 digits, a DPO run on 2
        shutil.copy(fine_tuned[1] / "sft.pt", out)
        args, words = ["dpo.py", "--digits", "2", *CPU], ["task.digits=3", "asks for 2", "python sft.py"]
    elif case == "another task's name":  # an sft.pt trained on addition, a PPO run on sorting
        shutil.copy(fine_tuned[1] / "sft.pt", out)
        args, words = ["ppo.py", "--task", "sort", "--reward", "true", *CPU], ["task.name='add'", "asks for 'sort'"]
    elif case == "unfinished upstream":  # an interrupted gpt.pt under SFT
        unfinished_copy(pretrained[1] / "gpt.pt", out / "gpt.pt")
        args, words = ["sft.py", *CPU], ["stopped at step 2 of 4", "python gpt.py --resume", "--n_layer 2"]
    elif case == "a finished run of other sizes":  # its metrics are not the ones of the default model asked for
        shutil.copy(pretrained[1] / "gpt.pt", out)
        args, words = ["gpt.py", "--data", corpus, "--resume", *CPU], ["cannot resume", "config.block_size=32"]
    elif case == "--init of an unfinished run":
        unfinished_copy(pretrained[1] / "gpt.pt", out / "gpt.pt")
        args, words = ["sft.py", "--init", str(out / "gpt.pt"), *CPU], ["stopped at step 2 of 4", "gpt.py --resume"]
    else:  # sft.py --overwrite since reward.py ran: PPO would score with a reward model of the old policy
        shutil.copy(fine_tuned[1] / "sft.pt", out)
        ckpt = train.load_checkpoint(str(reward_trained[1] / "reward.pt"))
        old_sft = {**ckpt["built_from"]["sft"], "train_seconds": ckpt["built_from"]["sft"]["train_seconds"] + 1}
        train.save_checkpoint(str(out / "reward.pt"), **{**ckpt, "built_from": {"sft": old_sft}})
        args, words = ["ppo.py", *CPU], ["reward.pt was built from another sft.pt", "built_from.sft.train_seconds",
                                         "python reward.py --overwrite"]
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    r = run_script([args[0], "--out_dir", str(out), *args[1:]], cwd=tmp_path)
    line = assert_one_error_line(r.returncode, r.stderr, 2, words)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.suffix == ".pt"} == before
    if "stopped at step" in line:  # the command it prints finishes the run, whatever flags it was started with
        r = run_script(shlex.split(line.split("`")[1])[1:], cwd=tmp_path)
        assert r.returncode == 0 and train.load_checkpoint(str(out / "gpt.pt"))["finished"], r.stderr[-3000:]


def test_a_non_finite_loss_never_reaches_a_checkpoint(tmp_path, corpus):
    r = run_script(["gpt.py", "--data", corpus, "--out_dir", str(tmp_path / "out"), *TINY_FLAGS, "--lr", "1e10",
                    "--min_lr", "0", "--max_steps", "6"], cwd=tmp_path)
    assert_one_error_line(r.returncode, r.stderr, 2, ["became", "lower --lr"])
    path = tmp_path / "out" / "gpt.pt"
    if path.exists():  # a checkpoint written before the loss blew up holds a finite validation loss
        assert math.isfinite(train.load_checkpoint(str(path))["metrics"]["val_loss"])


@pytest.mark.parametrize("case", ["read-only", "a file", "cannot be created"])
def test_an_unusable_output_directory_is_one_line_at_start_up(tmp_path, corpus, case):
    if case == "read-only":  # root writes into a mode-555 directory; sysfs refuses files even to root
        out = "/sys" if os.geteuid() == 0 else str(tmp_path / "ro")
        if os.geteuid() != 0:
            os.mkdir(out, 0o555)
        words = ["not writable"]
    elif case == "a file":
        out, words = str(tmp_path / "file"), ["is a file"]
        open(out, "w").close()
    else:
        out, words = "/proc/no/such/dir", ["cannot be created"]
    r = run_script(["gpt.py", "--data", corpus, "--out_dir", out, *TINY_FLAGS], cwd=tmp_path)
    assert_one_error_line(r.returncode, r.stderr, 2, ["--out_dir", *words])
    assert "pretrain:" not in r.stdout + r.stderr  # before any training


@pytest.mark.parametrize("script", [["diffusion_toy.py"], ["kernels.py", "--fp8"]])
def test_the_check_scripts_refuse_an_unusable_output_directory_at_start_up(tmp_path, script):
    out = tmp_path / "file"
    out.write_text("")
    r = run_script([*script, "--out_dir", str(out)], cwd=tmp_path)
    assert_one_error_line(r.returncode, r.stderr, 2, ["--out_dir", "is a file"])
    assert "theory" not in r.stdout and "e4m3" not in r.stdout  # before any work


def test_ctrl_c_during_a_save_takes_effect_after_it():
    """A Ctrl-C between writing a checkpoint and noting its step once made the last line name the step before."""
    # Python's own Ctrl-C handler, also where the suite runs as a shell's background job (which ignores SIGINT)
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    done = []
    try:
        with pytest.raises(KeyboardInterrupt):
            with train.signals_held():
                os.kill(os.getpid(), signal.SIGINT)
                done.append("the rest of the block ran")
    finally:
        signal.signal(signal.SIGINT, before)
    assert done == ["the rest of the block ran"]


@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_two_runs_on_one_out_dir_and_ctrl_c(tmp_path, corpus, signum, status):
    """The second run on an out_dir in use stops at once (a lock); Ctrl-C says where the first stopped and what
    is kept, exits 130, and the kept checkpoint loads; SIGTERM (kill) the same, with 143."""
    out = tmp_path / "out"
    first = subprocess.Popen([sys.executable, os.path.join(HERE, "gpt.py"), "--data", corpus, "--out_dir", str(out),
                              *TINY_FLAGS, "--max_steps", "100000", "--eval_interval", "5"], cwd=tmp_path,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"},
                             # a shell's background job ignores SIGINT, and Python keeps an ignored SIGINT ignored
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        for _ in range(600):  # until the first checkpoint exists
            if (out / "gpt.pt").exists() or first.poll() is not None:
                break
            subprocess.run(["sleep", "0.1"])
        assert first.poll() is None, first.communicate()[1]
        second = run_script(["gpt.py", "--data", corpus, "--out_dir", str(out), *TINY_FLAGS], cwd=tmp_path)
        assert_one_error_line(second.returncode, second.stderr, 2, ["another run", str(first.pid), "--out_dir"])
        first.send_signal(signum)  # SIGINT is what Ctrl-C sends
        _, err = first.communicate(timeout=60)
    finally:
        first.kill()
    line = assert_one_error_line(first.returncode, err, status, ["stopped at step", "of 100000", "is kept",
                                                                 "--resume"])
    kept = int(line.split("from step ")[1].split()[0])
    assert train.load_checkpoint(str(out / "gpt.pt"))["step"] == kept > 0 and not (out / ".lock").exists()
    assert not list(out.glob("*.tmp"))


def test_ctrl_c_during_the_kernel_check_is_one_line(tmp_path):
    """`python kernels.py` runs through train.run_main as the stages do: Ctrl-C is one line and exit status 130."""
    out = tmp_path / "out"
    check = subprocess.Popen([sys.executable, os.path.join(HERE, "kernels.py"), "--out_dir", str(out)], cwd=tmp_path,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"},
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        for _ in range(600):  # until run_main has started it: the out_dir is claimed first
            if (out / ".lock").exists() or check.poll() is not None:
                break
            subprocess.run(["sleep", "0.1"])
        assert check.poll() is None, check.communicate()[1]
        check.send_signal(signal.SIGINT)
        _, err = check.communicate(timeout=60)
    finally:
        check.kill()
    assert_one_error_line(check.returncode, err, 130, ["interrupted: nothing was trained"])
    assert not (out / ".lock").exists()


def test_running_out_of_memory_is_one_line_with_what_to_lower_and_what_is_kept(tmp_path, corpus, capsys,
                                                                               monkeypatch):
    """A GPU's out-of-memory error at step 3, after the checkpoint of step 2: one line and exit status 1; the
    CPU allocator's failure (a RuntimeError) too; any other RuntimeError stays a traceback (a bug)."""
    monkeypatch.setattr(train.Trainer, "active", None)
    calls, real_loss = [], gpt.lm_loss

    def lm_loss(logits, targets):  # called once per training step and eval_batches = 2 times per validation
        calls.append(1)
        if len(calls) == 5:  # steps 1 and 2, validation at step 2, then step 3
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real_loss(logits, targets)

    monkeypatch.setattr(gpt, "lm_loss", lm_loss)
    code, err = main_in_process(gpt, ["--data", corpus, "--out_dir", str(tmp_path / "out"), *TINY_FLAGS,
                                      "--max_steps", "100"], capsys)
    assert_one_error_line(code, err, 1, ["out of GPU memory", "--batch_size", "from step 2 is kept", "--resume"])
    assert train.load_checkpoint(str(tmp_path / "out" / "gpt.pt"))["step"] == 2
    monkeypatch.setattr(train.Trainer, "active", None)

    class Allocates:
        @staticmethod
        def main(argv):
            torch.empty(10 ** 13)  # 40 TB

    code, err = main_in_process(Allocates, [], capsys)
    assert_one_error_line(code, err, 1, ["out of CPU memory", "--batch_size", "nothing was trained"])

    def bug():
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    with pytest.raises(RuntimeError, match="shapes"):
        train.run_main(bug)


def test_progress_in_a_log_is_plain_lines(tmp_path, corpus):
    r = run_script(["gpt.py", "--data", corpus, "--out_dir", str(tmp_path / "out"), *TINY_FLAGS, "--max_steps", "200",
                    "--eval_interval", "100"], cwd=tmp_path)  # stderr is a pipe here, not a terminal
    assert r.returncode == 0, r.stderr
    assert "\r" not in r.stderr and len(r.stderr) / 200 < 20  # bytes per step: a line every few seconds at most
    assert "pretrain: 200/200" in r.stderr


def test_a_failed_write_leaves_no_temporary_file_and_the_old_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "m.pt"
    train.save_checkpoint(str(path), model={"w": torch.ones(2)})
    before = path.read_bytes()

    def disk_full(obj, f):
        f.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(UserError, match="cannot write .*m.pt .No space left on device.: free some space"):
        train.save_checkpoint(str(path), model={"w": torch.zeros(2)})
    assert path.read_bytes() == before and not list(tmp_path.glob("*.tmp"))
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 ** 9, 10 ** 9 - 10 ** 6, 10 ** 6))
    with pytest.raises(UserError, match="MiB free"):
        train.claim_out_dir(str(tmp_path / "full"))
    train.remove_quietly(str(tmp_path / "full" / ".lock"))


def test_a_full_disk_is_one_line_at_start_up_and_mid_run(tmp_path, corpus, capsys, monkeypatch):
    """A full disk when the lock is written: one line, and no empty lock left to block the next run. When a
    checkpoint is written: one line naming the checkpoint kept (torch.save's own error was a traceback)."""
    monkeypatch.setattr(train.Trainer, "active", None)
    real_write, real_save, saves = os.write, torch.save, []

    def disk_full(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", disk_full)
    code, err = main_in_process(gpt, ["--data", corpus, "--out_dir", str(tmp_path / "a"), *TINY_FLAGS], capsys)
    assert_one_error_line(code, err, 2, ["--out_dir", "No space left on device", "free some space"])
    assert list((tmp_path / "a").iterdir()) == []
    monkeypatch.setattr(os, "write", real_write)

    def save(obj, f):  # the checkpoint of step 2 is written, the one of step 4 finds the disk full
        saves.append(1)
        return disk_full() if len(saves) == 2 else real_save(obj, f)

    monkeypatch.setattr(torch, "save", save)
    code, err = main_in_process(gpt, ["--data", corpus, "--out_dir", str(tmp_path / "b"), *TINY_FLAGS], capsys)
    assert_one_error_line(code, err, 2, ["cannot write", "No space left", "gpt.pt from step 2 is kept", "--resume"])
    assert train.load_checkpoint(str(tmp_path / "b" / "gpt.pt"))["step"] == 2
    assert not list((tmp_path / "b").glob("*.tmp"))
    monkeypatch.setattr(train.Trainer, "active", None)


@pytest.mark.parametrize("content", ["", "garbage\n"])
def test_a_lock_without_a_process_id_says_what_to_do(tmp_path, capsys, content):
    """A lock file is created and its process id written at once: one without (a run that failed there, or
    anything else) blocked every run with the 'another run' line, or was a ValueError."""
    (tmp_path / ".lock").write_text(content)

    class Claims:
        @staticmethod
        def main(argv):
            train.claim_out_dir(str(tmp_path))

    code, err = main_in_process(Claims, [], capsys)
    assert_one_error_line(code, err, 2, [".lock holds no process id", "if no run is using", "delete"])


def test_an_error_under_torchrun_is_one_line_from_rank_0(tmp_path, corpus):
    r = run_script(["gpt.py", "--data", corpus, "--out_dir", str(tmp_path / "out"), *TINY_FLAGS, "--beta1", "2"],
                   cwd=tmp_path, nproc=2)
    assert r.returncode != 0 and r.stderr.count("error: beta1") == 1, r.stderr[-3000:]


# =============================================================================================
# 12. The whole chain from an empty out_dir

def tiny_stage_defaults(monkeypatch, corpus, max_steps, n_pairs, n_eval):
    """Every earlier stage's defaults made tiny, as a later stage trains them when their checkpoints are missing;
    returns the model config."""
    tiny_train = dict(batch_size=4, max_steps=max_steps, eval_interval=2, eval_batches=2, warmup_steps=1,
                      weight_decay=0.0)
    model_cfg = GPTConfig(block_size=32, n_layer=2, n_embd=32, n_head=4, n_kv_head=2)
    monkeypatch.setattr(gpt, "pretrain_defaults", lambda: (model_cfg, TrainConfig(**tiny_train),
                                                           gpt.DataConfig(data=corpus, sample_tokens=4)))
    monkeypatch.setattr(sft, "sft_defaults", lambda: (sft.TaskConfig(), sft.SFTConfig(), TrainConfig(**tiny_train)))
    monkeypatch.setattr(reward, "reward_defaults", lambda: (
        sft.TaskConfig(), reward.PrefConfig(n_pairs=n_pairs, n_eval=n_eval), reward.RewardConfig(),
        TrainConfig(**tiny_train)))
    return model_cfg


def test_whole_chain_from_an_empty_out_dir(tmp_path, monkeypatch, corpus):
    """`python ppo.py` on a fresh clone trains every earlier stage it needs (pretraining, SFT, the reward model),
    each with its own defaults (tiny here) plus the settings that carry over (the task, seed, device), and each
    leaves what it leaves when run directly: its metrics file and a finished checkpoint that records what it
    was built from."""
    model_cfg = tiny_stage_defaults(monkeypatch, corpus, max_steps=4, n_pairs=12, n_eval=8)
    task = sft.TaskConfig(digits=2, heldout=8).build()
    cfg = TrainConfig(max_steps=4, batch_size=4, eval_interval=4, seed=7, device="cpu", out_dir=str(tmp_path))
    ppo.train_ppo(task, ppo.PPOConfig(), cfg)
    for stage in ("gpt", "sft", "reward", "ppo"):
        ckpt = train.load_checkpoint(str(tmp_path / f"{stage}.pt"))
        assert ckpt["finished"] and ckpt["stage"] == stage
        assert (ckpt["train_config"]["seed"], ckpt["train_config"]["device"]) == (7, "cpu")
        assert json.loads((tmp_path / f"{stage}_metrics.json").read_text())["stage"] == stage
    for stage in ("sft", "reward", "ppo"):
        assert train.load_checkpoint(str(tmp_path / f"{stage}.pt"))["task"] == {"name": "add", "digits": 2, "slip": 0.4}
    chain = train.load_checkpoint(str(tmp_path / "ppo.pt"))["built_from"]
    assert chain["sft"]["built_from"]["gpt"]["config"] == dataclasses.asdict(model_cfg)
    policy, _ = gpt.load_model(str(tmp_path / "ppo.pt"))
    assert policy.cfg == model_cfg


class Copy(sft.Task):
    """A third task, as a forker adds one: copy a string of three letters. The demonstrator drops the last letter
    on a fraction `slip` of the prompts; r* is the share of positions right."""
    name = "copy"
    max_response_tokens = 5  # three letters, <eos>, one spare

    def random_prompt(self, rng):
        return "".join(rng.choice("abcd") for _ in range(3))

    def is_heldout(self, prompt):
        return prompt[0] == "a"

    def heldout_size(self):
        return 16  # the 4 x 4 strings that start with "a"

    def prompt_text(self, prompt):
        return f"copy {prompt}"

    def correct(self, prompt):
        return prompt

    def demonstrate(self, prompt, rng):
        return prompt[:-1] if rng.random() < self.cfg.slip else prompt

    def true_reward(self, prompt, response):
        return sft.positions_right(prompt, response)


def test_a_task_defined_here_runs_every_stage(tmp_path, monkeypatch, corpus, capsys):
    """The Task interface is all a stage knows of the task: a task defined and registered here, whose prompts are
    strings (no operand pairs), runs pretraining, SFT, the reward model, DPO, GPRO, GRPO and PPO (with the reward
    model and with r*) from an empty out_dir, each checkpoint recording it; a stage run on addition then refuses
    them, naming task.name."""
    monkeypatch.setitem(sft.TASKS, "copy", Copy)
    tiny_stage_defaults(monkeypatch, corpus, max_steps=2, n_pairs=8, n_eval=4)
    flags = ["--task", "copy", "--heldout", "8", "--out_dir", str(tmp_path), "--max_steps", "2", "--eval_interval",
             "2", "--batch_size", "4", *CPU]
    runs = [(dpo, ["--n_pairs", "8", "--n_eval", "4"]), (gpro, ["--k", "2"]), (gpro, ["--algo", "grpo", "--k", "2"]),
            (ppo, []), (ppo, ["--reward", "true", "--overwrite"])]
    for module, extra in runs:
        code, err = main_in_process(module, flags + extra, capsys)
        assert code == 0, err
    for stage in ("sft", "reward", "dpo", "gpro", "grpo", "ppo"):
        ckpt = train.load_checkpoint(str(tmp_path / f"{stage}.pt"))
        assert ckpt["finished"] and ckpt["task"] == {"name": "copy", "digits": 3, "slip": 0.4}
    for stage in ("sft", "dpo", "gpro", "ppo"):
        m = json.loads((tmp_path / f"{stage}_metrics.json").read_text())
        assert 0 <= m["true_reward"] <= 1 and 0 <= m["sample_accuracy"] <= 1
    code, err = main_in_process(dpo, ["--out_dir", str(tmp_path), "--overwrite", *CPU], capsys)
    assert_one_error_line(code, err, 2, ["task.name='copy'", "asks for 'add'"])
