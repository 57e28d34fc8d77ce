"""
The test suite: `python -m pytest -q test_all.py`.

Each test compares the code against an independent computation (a closed form, a slower
equivalent, an invariance) so that it fails when the code is wrong. Learning tests use fixed
seeds and margins that hold across seeds. Nothing writes into the user's out/ directory.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # the Triton kernels run on the CPU interpreter here

import dataclasses
import json
import math
import subprocess
import sys

import pytest
import torch

import gpt
import kernels
from gpt import (BOS, EOS, PAD, GPT, GPTConfig, TrainConfig, UserError, decode, encode, generate,
                 left_pad, lm_loss, sequence_logprobs)

HERE = os.path.dirname(os.path.abspath(__file__))


def tiny(**kw):
    base = dict(block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32)
    return GPTConfig(**{**base, **kw})


def seeded_model(seed=0, **kw):
    torch.manual_seed(seed)
    return GPT(tiny(**kw)).eval()


def run_script(args, cwd, env=None, timeout=300):
    """Run a script the way a user does; returns the CompletedProcess."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


# ---------------------------------------------------------------------------------------------
# gpt.py: tokenizer and config

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
])
def test_config_validation(kw, words):
    with pytest.raises(UserError, match=words):
        tiny(**kw)


def test_train_config_validation():
    with pytest.raises(UserError, match="min_lr"):
        TrainConfig(lr=1e-3, min_lr=1e-2)
    with pytest.raises(UserError, match="batch_size"):
        TrainConfig(batch_size=0)


def test_cli_rejects_bad_config_without_traceback(tmp_path):
    r = run_script([os.path.join(HERE, "gpt.py"), "--n_embd", "30"], cwd=tmp_path)
    assert r.returncode == 2 and "divisible by n_head" in r.stderr and "Traceback" not in r.stderr


# ---------------------------------------------------------------------------------------------
# gpt.py: the model

@pytest.mark.parametrize("kw", [dict(), dict(pos_emb="learned", norm="layernorm", ffn="gelu"),
                                dict(norm_placement="post", ffn="relu", bias=True)])
def test_causality(kw):
    """Changing a future token changes no earlier logit (notes 8.2: causal self-attention)."""
    model = seeded_model(**kw)
    x = torch.randint(0, 256, (2, 20))
    y = x.clone()
    y[:, 12] = (y[:, 12] + 1) % 256
    a, b = model(x), model(y)
    assert torch.allclose(a[:, :12], b[:, :12], atol=1e-6)
    assert not torch.allclose(a[:, 12:], b[:, 12:], atol=1e-4)


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


def test_overfits_one_batch():
    torch.manual_seed(0)
    model = GPT(tiny())
    x = torch.randint(0, 256, (4, 33))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        loss = lm_loss(model(x[:, :-1]), x[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1  # from ln(320) = 5.77


def test_bf16_autocast_close_to_fp32():
    model = seeded_model()
    x = torch.randint(0, 256, (2, 32))
    ref = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(x)
    assert low.dtype == torch.bfloat16
    assert (low.float() - ref).abs().max() < 0.05 * ref.abs().max()
    assert abs(lm_loss(low, x).item() - lm_loss(ref, x).item()) < 0.02


def test_left_padding_does_not_change_logits():
    """A left-padded sequence gets the logits it gets alone (positions count real tokens only)."""
    for kw in (dict(), dict(pos_emb="learned")):
        model = seeded_model(**kw)
        seqs = [torch.randint(0, 256, (n,)).tolist() for n in (5, 12, 9)]
        ids, mask = left_pad(seqs)
        batch = model(ids, attn_mask=mask)
        for i, s in enumerate(seqs):
            alone = model(torch.tensor([s]))[0]
            assert torch.allclose(batch[i, -len(s):], alone, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# gpt.py: KV cache and generation

@pytest.mark.parametrize("n_kv_head", [4, 2, 1])  # MHA, GQA, MQA
@pytest.mark.parametrize("lengths", [(7, 7), (3, 11, 6)])  # equal lengths, and left padding
def test_kv_cache_generation_equals_full_recomputation(n_kv_head, lengths):
    model = seeded_model(n_kv_head=n_kv_head)
    prompts = [torch.randint(0, 256, (n,)).tolist() for n in lengths]
    fast = generate(model, prompts, 12, temperature=0, eos=-1)
    slow = generate(model, prompts, 12, temperature=0, eos=-1, use_cache=False)
    assert fast == slow and all(len(f) == 12 for f in fast)
    # logits: prefill + decode through the cache equal the full forward at every position
    full = [p + f for p, f in zip(prompts, fast)]
    ids, mask = left_pad(full)
    want = model(ids, attn_mask=mask)
    P = max(lengths)
    cache = gpt.KVCache(model.cfg, len(full), ids.shape[1], "cpu", torch.float32)
    got = [model(ids[:, :P], attn_mask=mask[:, :P], cache=cache)]
    got += [model(ids[:, t:t + 1], cache=cache) for t in range(P, ids.shape[1])]
    assert torch.allclose(torch.cat(got, 1), want, atol=1e-5)


def test_kv_cache_holds_only_kv_heads():
    cfg = tiny(n_head=4, n_kv_head=1)
    cache = gpt.KVCache(cfg, 3, 40, "cpu", torch.float32)
    assert cache.layers[0].k.shape == (3, 1, 40, cfg.head_dim)
    mha = gpt.KVCache(dataclasses.replace(cfg, n_kv_head=4), 3, 40, "cpu", torch.float32)
    assert mha.nbytes() == 4 * cache.nbytes()


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
    for use_cache in (True, False):
        out = generate(NextTokenRule(), prompts, 5, temperature=0, use_cache=use_cache)
        assert out == [[EOS], [ord("a"), EOS], [ord("a"), EOS]]
    assert generate(NextTokenRule(), prompts, 5, temperature=0, eos=-1)[1] == [ord("a"), EOS] + [ord("a"), EOS, ord("a")]


def test_prompt_longer_than_context_is_a_clear_error():
    model = seeded_model()
    with pytest.raises(UserError, match="block_size"):
        generate(model, [[BOS] * 60], 10)
    with pytest.raises(UserError, match="block_size"):
        model(torch.zeros(1, 65, dtype=torch.long))


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
# gpt.py: sequence log-probabilities

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
                    lp = torch.log_softmax(logits[:gpt.N_TOKENS], -1)[s[t]]
                    assert abs(per_tok[b, off + t].item() - lp.item()) < 1e-5
                    want += lp.item()
            assert abs(total[b].item() - want) < 1e-4
        assert (per_tok[target == 0] == 0).all()


# ---------------------------------------------------------------------------------------------
# gpt.py: training loop, checkpoints, resume, DDP, the script

class Crash(Exception):
    pass


def tiny_run(tmp_path, steps, resume=False, seed=0, crash_at=None):
    torch.manual_seed(seed)
    model = GPT(tiny())
    data = torch.randint(0, 256, (5000,), generator=torch.Generator().manual_seed(1)).numpy().astype("uint16")
    get = gpt.corpus_batches(data, 4, model.cfg.block_size, seed=1)
    cfg = TrainConfig(max_steps=steps, batch_size=4, lr=1e-2, warmup_steps=2, eval_interval=3,
                      out_dir=str(tmp_path), resume=resume, seed=seed)
    losses = []

    def loss_fn(net, batch):
        if len(losses) == crash_at:
            raise Crash  # the machine dies in the middle of training
        loss = lm_loss(net(batch[0]), batch[1])
        losses.append(loss.item())
        return loss, {"tokens": batch[0].numel()}

    gpt.train(model, cfg, get, loss_fn, ckpt_path=str(tmp_path / "m.pt"))
    return model, losses


def test_checkpoint_round_trip_and_exact_resume(tmp_path):
    straight, losses = tiny_run(tmp_path / "a", 6)
    with pytest.raises(Crash):
        tiny_run(tmp_path / "b", 6, crash_at=4)  # dies in step 5, after the checkpoint of step 3
    resumed, rest = tiny_run(tmp_path / "b", 6, resume=True, seed=99)  # its fresh init is overwritten
    assert rest == pytest.approx(losses[3:], abs=1e-6)
    for (n, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), n
    loaded, ckpt = gpt.load_model(str(tmp_path / "a" / "m.pt"))
    assert ckpt["step"] == 6 and loaded.cfg == straight.cfg
    x = torch.randint(0, 256, (2, 10))
    assert torch.equal(loaded.eval()(x), straight.eval()(x))


def test_corrupt_and_mismatched_checkpoints_give_clear_errors(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="corrupt"):
        gpt.load_model(str(bad))
    with pytest.raises(UserError, match="does not exist"):
        gpt.load_model(str(tmp_path / "missing.pt"))
    model = GPT(tiny())
    gpt.save_checkpoint(str(tmp_path / "m.pt"), model=model.state_dict(),
                        config={**dataclasses.asdict(model.cfg), "n_embd": 64})
    with pytest.raises(UserError, match="does not match"):
        gpt.load_model(str(tmp_path / "m.pt"))
    assert not list(tmp_path.glob("*.tmp"))  # written atomically


def test_nan_loss_stops_with_a_clear_message(tmp_path):
    model = GPT(tiny())
    cfg = TrainConfig(max_steps=3, batch_size=2, out_dir=str(tmp_path))
    nan_loss = lambda net, batch: (net(batch).sum() * float("nan"), {})
    with pytest.raises(UserError, match="lower --lr"):
        gpt.train(model, cfg, lambda i: torch.zeros(2, 4, dtype=torch.long), nan_loss)


def test_missing_or_tiny_data_file_is_a_clear_error(tmp_path):
    r = run_script([os.path.join(HERE, "gpt.py"), "--data", str(tmp_path / "nope.txt")], cwd=tmp_path)
    assert r.returncode == 2 and "no such file" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "small.txt").write_text("hello")
    r = run_script([os.path.join(HERE, "gpt.py"), "--data", str(tmp_path / "small.txt")], cwd=tmp_path)
    assert r.returncode == 2 and "too small" in r.stderr


def test_corrupt_checkpoint_on_resume_is_a_clear_error(tmp_path):
    (tmp_path / "gpt.pt").write_bytes(b"\x00" * 100)
    corpus = tmp_path / "c.txt"
    corpus.write_text("abcdefgh " * 2000)
    r = run_script([os.path.join(HERE, "gpt.py"), "--data", str(corpus), "--out_dir", str(tmp_path),
                    "--resume", "--block_size", "32", "--n_layer", "1", "--max_steps", "2"], cwd=tmp_path)
    assert r.returncode == 2 and "corrupt" in r.stderr and "Traceback" not in r.stderr


TINY_FLAGS = ["--block_size", "32", "--n_layer", "2", "--n_embd", "32", "--n_head", "4", "--n_kv_head", "2",
              "--batch_size", "4", "--max_steps", "4", "--eval_interval", "2", "--eval_batches", "2",
              "--warmup_steps", "1", "--sample_tokens", "8"]


def test_gpt_main_end_to_end(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(open(os.path.join(HERE, "gpt.py")).read())
    r = run_script([os.path.join(HERE, "gpt.py"), "--data", str(corpus), "--out_dir", str(tmp_path / "out"),
                    *TINY_FLAGS], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    metrics = json.loads((tmp_path / "out" / "gpt_metrics.json").read_text())
    assert metrics["val_bpb"] == pytest.approx(metrics["val_loss"] / math.log(2))
    assert 0 < metrics["val_bpb"] < 9 and metrics["tokens_per_sec"] > 0 and metrics["steps"] == 4
    assert json.loads(r.stdout.strip().splitlines()[-1]) == metrics  # the JSON line is the last line
    assert "val bits/byte" in r.stdout and "sample:" in r.stdout
    model, ckpt = gpt.load_model(str(tmp_path / "out" / "gpt.pt"))
    assert ckpt["step"] == 4 and model.cfg.block_size == 32


def test_stdlib_corpus_holds_out_whole_files():
    root, files = gpt.stdlib_files()
    assert len(files) > 100 and all(f.endswith(".py") for f in files)
    train, val, _ = gpt.load_corpus(gpt.DataConfig(val_fraction=0.05))
    assert 0.01 < len(val) / (len(train) + len(val)) < 0.2
    assert train[0] == BOS and val[0] == BOS  # each file starts with BOS


def test_ddp_two_processes_on_cpu(tmp_path):
    """torchrun with 2 processes (gloo) trains a few steps and rank 0 writes the checkpoint."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(open(os.path.join(HERE, "gpt.py")).read())
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        os.path.join(HERE, "gpt.py"), "--data", str(corpus), "--out_dir", str(tmp_path / "out"),
                        *TINY_FLAGS], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 process(es)" in r.stdout
    metrics = json.loads((tmp_path / "out" / "gpt_metrics.json").read_text())
    assert metrics["steps"] == 4 and math.isfinite(metrics["val_loss"])
    assert r.stdout.count('"stage": "gpt"') == 1  # only rank 0 reports


# ---------------------------------------------------------------------------------------------
# kernels.py: the Triton kernels run in Triton's CPU interpreter, in float32, against the float64
# reference on fresh random inputs.

needs_triton = pytest.mark.skipif(not kernels.HAS_TRITON, reason="triton is not installed (pip install triton): "
                                  "the kernels cannot run, not even in the interpreter")


def rel_err(a, b):
    """max|a - b| / max|b|, the denominator floored at 0.01: for T = 1 the reference dQ and dK are
    exactly zero and the kernel's are float32 rounding noise (dP - delta ~ 1e-7)."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-2)).item()


def qkv(B, H, Hkv, Tq, Tk, D, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, h, T, D, generator=g, dtype=dtype).requires_grad_()
            for h, T in ((H, Tq), (Hkv, Tk), (Hkv, Tk))]


def output_and_grads(fn, q, k, v, do):
    o = fn(q, k, v)
    return [o, *torch.autograd.grad(o, (q, k, v), do)]


@needs_triton
@pytest.mark.parametrize("B, H, Hkv, Tq, Tk, D, causal, scale", [
    (1, 2, 2, 1, 1, 16, True, None),       # T = 1
    (2, 2, 1, 1, 1, 64, False, None),
    (2, 4, 2, 17, 17, 16, True, None),     # group 2, one partial tile
    (1, 4, 1, 17, 17, 64, False, 0.3),     # MQA (group 4), non-causal, a softmax scale
    (1, 2, 2, 130, 130, 16, True, None),   # MHA (group 1), several tiles and masked tails
    (1, 4, 1, 130, 130, 64, False, None),
    (1, 4, 2, 130, 130, 32, True, 0.05),
    (1, 4, 2, 9, 40, 16, True, None),      # prefill into a KV cache: causal mask aligned bottom-right
    (2, 4, 1, 1, 33, 64, True, None),      # decode: one query against the cache
    (1, 2, 1, 24, 56, 32, False, None),    # Tq != Tk without a mask
])
def test_flash_matches_reference(B, H, Hkv, Tq, Tk, D, causal, scale):
    q, k, v = qkv(B, H, Hkv, Tq, Tk, D, seed=Tq * 1000 + Tk + D)
    do = torch.randn(B, H, Tq, D, generator=torch.Generator().manual_seed(1))
    ours = output_and_grads(lambda q, k, v: kernels.flash_attention(q, k, v, causal, scale), q, k, v, do)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = output_and_grads(lambda q, k, v: kernels.reference_attention(q, k, v, causal, scale=scale),
                           q64, k64, v64, do.double())
    for name, a, b in zip(("O", "dQ", "dK", "dV"), ours, ref):
        assert a.shape == b.shape and a.dtype == torch.float32
        assert rel_err(a, b) < 1e-4, f"{name}: relative error {rel_err(a, b):.2e}"


@needs_triton
def test_flash_gqa_reads_shared_heads_without_copies():
    """GQA equals MHA on explicitly repeated K/V, with dK/dV summed over the group, and what the
    kernel keeps for backward holds only the n_kv_head heads (no repeated copy)."""
    B, H, Hkv, T, D = 2, 4, 1, 40, 16
    q, k, v = qkv(B, H, Hkv, T, T, D, seed=3)
    do = torch.randn(B, H, T, D, generator=torch.Generator().manual_seed(4))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        gqa = output_and_grads(kernels.flash_attention, q, k, v, do)
    assert sorted(saved) == sorted([(B, H, T, D), (B, Hkv, T, D), (B, Hkv, T, D), (B, H, T, D), (B, H, T)])
    assert gqa[2].shape == gqa[3].shape == (B, Hkv, T, D)
    repeated = lambda q, k, v: kernels.flash_attention(q, k.repeat_interleave(H // Hkv, 1),  # noqa: E731
                                                       v.repeat_interleave(H // Hkv, 1))
    mha = output_and_grads(repeated, q, k, v, do)
    for a, b in zip(gqa, mha):
        assert rel_err(a, b) < 1e-5


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
    assert kernels.select_path(q, k, v)[0] == "sdpa"  # auto: the kernel only on CUDA tensors
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


@needs_triton
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
