"""
Tests of kernels.py: `python -m pytest -q test_kernels_draft.py`.

Without a GPU the Triton kernels run in Triton's CPU interpreter (fp32, against the float64
reference) and the compile check compiles them for sm_90 and sm_80 with the ptxas in the triton
wheel. With a GPU the interpreter is not used (triton 3.6's fails with numpy >= 2.4): the kernels
run compiled, in bf16 and fp16, against the float64 reference.
"""
import ast
import glob
import json
import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # set before kernels imports triton

import kernels  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
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


# ---------------------------------------------------------------------------------------------
# The layering and the command line

def test_kernels_imports_no_project_file():
    """kernels.py is the bottom layer: no import of any other .py file of the project."""
    project = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(HERE, "*.py"))} - {"kernels"}
    assert {"gpt", "sft"} <= project  # the parse below can only find what this set names
    tree = ast.parse(open(os.path.join(HERE, "kernels.py")).read())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
    assert "torch" in imported and not imported & project, imported & project


def test_importing_kernels_does_not_turn_on_the_interpreter():
    """Only `python kernels.py` without a GPU, or the caller, asks for Triton's interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", "import kernels, os; print(kernels.INTERPRET, "
                          "os.environ.get('TRITON_INTERPRET'))"], cwd=HERE, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "None"]


def test_cli_bad_flag_one_error_line_exit_2_no_traceback():
    out = subprocess.run([sys.executable, "kernels.py", "--bogus"], cwd=HERE, capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr == "error: unrecognized arguments: --bogus\n", out.stderr


@pytest.mark.parametrize("args, says", [(["--head_dims", "48"], "not supported"),
                                        (["--kv_heads", "3"], "do not divide"),
                                        (["--seq_lens", "1k"], "comma-separated"),
                                        (["--n_head", "x"], "invalid int value")])
def test_cli_bad_values_one_error_line_exit_2(args, says, capsys):
    with pytest.raises(SystemExit) as stop:
        kernels.parse_config(args)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1 and says in err, err


def test_cli_flags_reach_the_config():
    cfg = kernels.parse_config(["--kv_heads", "8,2", "--head_dims", "128", "--fp32", "--compile_check"])
    assert cfg.kvs() == [8, 2] and cfg.dims() == [128] and cfg.fp32 and cfg.compile_check and not cfg.fp8


def test_write_metrics_one_json_line_nan_as_null(tmp_path, capsys):
    kernels.write_metrics("kernels", {"x": float("nan"), "rows": [{"y": float("inf"), "z": 1.5}]}, str(tmp_path))
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
    lines = capsys.readouterr().out.splitlines()
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
    lines = capsys.readouterr().out.splitlines()
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
