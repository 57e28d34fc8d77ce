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


# ---------------------------------------------------------------------------------------------
# sft.py: the task, the SFT loss, LoRA

import random  # noqa: E402

import reward  # noqa: E402
import sft  # noqa: E402


def test_task_demonstrator_and_true_reward():
    rng = random.Random(0)
    task = sft.TaskConfig(digits=3, slip=0.5)
    prompts = sft.sample_prompts(task, 3000, rng)
    assert all(sft.column_add(a, b)[0] == str(a + b) for a, b in prompts)
    wrong = [sft.demonstrate(a, b, task.slip, rng) != str(a + b) for a, b in prompts]
    with_carry = [bool(sft.column_add(a, b)[1]) for a, b in prompts]
    # the demonstrator errs exactly on a `slip` share of the prompts that carry, never on the others
    assert not any(w and not c for w, c in zip(wrong, with_carry))
    assert abs(sum(wrong) / sum(with_carry) - task.slip) < 0.04
    assert sft.true_reward(555, 555, "1110") == 1.0
    assert sft.true_reward(555, 555, "1010") == 0.75       # one digit off: partial credit
    assert sft.true_reward(555, 555, "110") == 0.75        # a digit missing
    assert sft.true_reward(555, 555, "abc") == 0.0
    held = set(sft.heldout_prompts(task))
    assert len(held) > 150 and not held & set(prompts)    # the held-out prompts are never trained on


def test_sft_loss_is_masked_cross_entropy_on_response_and_eos():
    model = seeded_model()
    prompts, responses = [(123, 456), (999, 1)], [gpt.encode("579"), gpt.encode("1000")]
    ids, target = sft.pack(prompts, responses)
    # the target mask covers the response and <eos>, nothing of <bos> prompt <sep>, nor padding
    for i, ((a, b), r) in enumerate(zip(prompts, responses)):
        p = len(sft.prompt_tokens(a, b))
        assert target[i].tolist() == [0] * p + [1] * (len(r) + 1) + [0] * (ids.shape[1] - p - len(r) - 1)
        assert ids[i, p + len(r)] == EOS
    labels = ids[:, 1:].masked_fill(target[:, 1:] == 0, -100)  # independent: CE with ignore_index
    logits = model(ids)[:, :-1, :gpt.N_TOKENS]
    want = torch.nn.functional.cross_entropy(logits.reshape(-1, gpt.N_TOKENS), labels.reshape(-1), ignore_index=-100)
    assert torch.allclose(sft.sft_loss(model, ids, target), want, atol=1e-5)
    # the prompt's tokens are context, not targets: the loss has no term for predicting them, so
    # their gradient through the output head of the prompt positions is zero
    ids2 = ids.clone()
    ids2[0, 1] = ord("7")  # change a prompt token's label (and the context after it)
    per_tok, _ = gpt.sequence_logprobs(model, ids2, target)
    assert (per_tok[0, :len(sft.prompt_tokens(123, 456))] == 0).all()
    # EOS is a target: a model that cannot end scores worse
    noeos = ids.clone()
    noeos[target.bool() & (ids == EOS)] = ord("0")
    assert not torch.allclose(sft.sft_loss(model, noeos, target), sft.sft_loss(model, ids, target))


def test_sft_per_example_loss_does_not_depend_on_padding_or_batch():
    model = seeded_model()
    prompts = [(12, 34), (123, 4567), (5, 5)]
    responses = [gpt.encode(str(a + b)) for a, b in prompts]
    ids, target = sft.pack(prompts, responses)
    _, together = gpt.sequence_logprobs(model, ids, target)
    for i in range(3):
        alone_ids, alone_target = sft.pack(prompts[i:i + 1], responses[i:i + 1])
        _, alone = gpt.sequence_logprobs(model, alone_ids, alone_target)
        assert torch.allclose(together[i], alone[0], atol=1e-5)


def test_lora_starts_at_base_trains_only_a_b_and_merges_exactly():
    model = seeded_model()
    x = torch.randint(0, 256, (2, 12))
    base = model(x).detach()
    sft.apply_lora(model, rank=4, alpha=8)
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


def test_sft_reward_dpo_gpro_main_end_to_end(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(open(os.path.join(HERE, "gpt.py")).read())
    out = str(tmp_path / "out")
    r = run_script([os.path.join(HERE, "gpt.py"), "--data", str(corpus), "--out_dir", out, *TINY_FLAGS], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = run_script([os.path.join(HERE, "sft.py"), "--out_dir", out, "--max_steps", "6", "--eval_interval", "3",
                    "--batch_size", "4", "--heldout", "8", "--lora_rank", "2"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    metrics = json.loads((tmp_path / "out" / "sft_metrics.json").read_text())
    for k in ("accuracy", "sample_accuracy", "true_reward"):
        assert 0 <= metrics[k] <= 1 and 0 <= metrics["before"][k] <= 1
    assert "trainable of" in r.stdout
    model, _ = gpt.load_model(str(tmp_path / "out" / "sft.pt"))  # LoRA merged: a plain GPT
    assert model.cfg.block_size == 32
    r = run_script([os.path.join(HERE, "reward.py"), "--out_dir", out, "--max_steps", "4", "--eval_interval", "2",
                    "--batch_size", "4", "--n_pairs", "12", "--n_eval", "8", "--heldout", "8",
                    "--loss", "listwise", "--k", "3"], cwd=tmp_path)  # K-way rankings end to end
    assert r.returncode == 0, r.stderr
    metrics = json.loads((tmp_path / "out" / "reward_metrics.json").read_text())
    assert 0.5 <= metrics["noise_ceiling"] <= 1 and 0 <= metrics["pairwise_accuracy"] <= 1
    rm = reward.load_reward_model(str(tmp_path / "out" / "reward.pt"))
    assert isinstance(rm, reward.RewardModel)
    r = run_script([os.path.join(HERE, "dpo.py"), "--out_dir", out, "--max_steps", "4", "--eval_interval", "2",
                    "--batch_size", "4", "--n_pairs", "12", "--n_eval", "8", "--heldout", "8"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    metrics = json.loads((tmp_path / "out" / "dpo_metrics.json").read_text())
    for k in ("accuracy", "sample_accuracy", "true_reward"):
        assert 0 <= metrics["before"][k] <= 1 and 0 <= metrics["after"][k] <= 1
    assert metrics["before"]["kl"] == 0 and math.isfinite(metrics["after"]["kl"])
    for flags in (["--algo", "gpro", "--online"], ["--algo", "grpo", "--reward", "rm"]):
        r = run_script([os.path.join(HERE, "gpro.py"), "--out_dir", out, "--max_steps", "3", "--eval_interval", "3",
                        "--batch_size", "2", "--k", "3", "--heldout", "8", *flags], cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        metrics = json.loads((tmp_path / "out" / "gpro_metrics.json").read_text())
        assert metrics["algo"] == flags[1] and 0 <= metrics["after"]["sample_accuracy"] <= 1
    # DPO with 2 processes (DDP over gloo), from the same SFT model
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        os.path.join(HERE, "dpo.py"), "--out_dir", out, "--max_steps", "3", "--eval_interval", "3",
                        "--batch_size", "2", "--n_pairs", "8", "--n_eval", "4", "--heldout", "4"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 process(es)" in r.stdout and r.stdout.count('"stage": "dpo"') == 1


# ---------------------------------------------------------------------------------------------
# reward.py: the labeller, the losses, the reward model

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
    right = rm(*reward.pack_for_rm(prompts, responses, side="right"))
    left = rm(*reward.pack_for_rm(prompts, responses, side="left"))
    assert torch.allclose(right, left, atol=1e-5)
    for i in range(3):
        alone = rm(*reward.pack_for_rm(prompts[i:i + 1], responses[i:i + 1]))
        assert torch.allclose(alone[0], right[i], atol=1e-5)


def test_reward_model_training_raises_heldout_accuracy(tmp_path):
    """A tiny reward model learns the labeller's preference for the correct sum over a wrong one."""
    torch.manual_seed(0)
    task = sft.TaskConfig(digits=2)
    rng = random.Random(0)

    def comparisons(n, heldout):
        out = []
        for a, b in sft.sample_prompts(task, n, rng, heldout):
            good, bad = gpt.encode(str(a + b)), gpt.encode(str(rng.randint(0, 9)))
            r = [1.0, sft.true_reward(a, b, gpt.decode(bad))]
            out.append(((a, b), [good, bad], r) if reward.plackett_luce_ranking(r, 0.1, rng)[0] == 0
                       else ((a, b), [bad, good], r[::-1]))
        return out

    train_data, eval_data = comparisons(256, False), comparisons(64, True)
    rm = reward.RewardModel(GPT(tiny()), "last")
    cfg = TrainConfig(max_steps=60, batch_size=16, lr=3e-3, warmup_steps=5, eval_interval=60, out_dir=str(tmp_path))
    accuracy = lambda m: (reward.score(m, eval_data, "cpu")[:, 0] > reward.score(m, eval_data, "cpu")[:, 1]  # noqa
                          ).float().mean().item()
    get = lambda i: [train_data[(i * 16 + j) % len(train_data)] for j in range(16)]  # noqa: E731
    loss_fn = lambda net, b: (reward.preference_loss(reward.score(net, b, "cpu"), reward.RewardConfig()), {})  # noqa
    with torch.no_grad():
        before = accuracy(rm)
    gpt.train(rm, cfg, get, loss_fn)
    with torch.no_grad():
        after = accuracy(rm.eval())
    ceiling = reward.noise_ceiling(eval_data, 0.1)
    assert before == 0.0 and after > 0.8 and ceiling > 0.9  # zero head at the start: all rewards tie


# ---------------------------------------------------------------------------------------------
# dpo.py: the DPO family, checked on a bandit against the closed-form optimum

import dpo  # noqa: E402


def bandit(K=8, beta=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    log_ref = torch.log_softmax(torch.randn(K, generator=g), 0)
    r = torch.rand(K, generator=g)
    optimum = torch.softmax(log_ref + r / beta, 0)  # pi* = pi_ref exp(r / beta) / Z (problem set eq. 15)
    return log_ref, r, optimum


def test_dpo_at_initialisation_is_ln2_with_zero_implicit_rewards():
    model = seeded_model()
    prompts = [(12, 34), (5, 6)]
    logps = []
    for ids, target in (sft.pack(prompts, [gpt.encode("46"), gpt.encode("11")]),
                        sft.pack(prompts, [gpt.encode("47"), gpt.encode("1")])):
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


# ---------------------------------------------------------------------------------------------
# gpro.py: GPRO's weighted likelihood reaches pi* as K grows; GRPO's group advantages

import gpro  # noqa: E402


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


def test_gpro_weights_and_grpo_advantages():
    r = torch.tensor([[1.0, 0.0, 0.5], [0.2, 0.2, 0.2]])
    w = gpro.gpro_weights(r, beta=0.5)
    assert torch.allclose(w.sum(-1), torch.ones(2)) and torch.allclose(w[1], torch.full((3,), 1 / 3))
    assert torch.allclose(w[0, 0] / w[0, 1], torch.tensor(math.exp(2.0)))  # exp((r_i - r_j) / beta)
    a = gpro.grpo_advantages(r)
    assert torch.allclose(a[0], (r[0] - r[0].mean()) / (r[0].std() + 1e-4)) and (a[1] == 0).all()
    assert torch.allclose(gpro.grpo_advantages(r, std_norm=False)[0], r[0] - r[0].mean())


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


# ---------------------------------------------------------------------------------------------
# diffusion_toy.py (homework problem 1 and problem 4). Every closed form is checked against an
# independent computation: the homework's own finite-T formula (eq. 1), a product derived by hand,
# Euler-Maclaurin for the dt -> 0 gap, direct Gaussian conditioning from a joint covariance matrix,
# or a Monte-Carlo simulation written out here.

import numpy as np  # noqa: E402

import diffusion_toy as dt_mod  # noqa: E402
from diffusion_toy import (DiffusionConfig, ve_exact_variance, ve_limit, ve_step, ve_times,  # noqa: E402
                           vp_posterior, vp_schedule, vp_step, vp_oracle)

S2 = (0.01, 0.05)
SAMPLERS = ("mean", "ddpm", "ddpm_exact", "ddim")


def se_var(var, n):
    return var * math.sqrt(2 / (n - 1))


# ---------------------------------------------------------------------------------------------
# Problem 1, exact finite-T variances

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
# Problem 4, the variance-preserving process

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
# The learned denoisers

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
# The script

def test_config_errors():
    for bad in (dict(sigma2=0.0), dict(sigma2=1.5), dict(T_list="10"), dict(T_list="10,100"),
                dict(T_list="100,x"), dict(vp_schedule="quadratic"), dict(posterior_t=1), dict(mc_T=3),
                dict(batch_size=1), dict(n_mc=50),
                dict(slope_ts="0,1"), dict(beta_1=0.1, beta_T=0.01)):
        with pytest.raises(UserError):
            DiffusionConfig(**bad)
    with pytest.raises(SystemExit) as e:
        dt_mod.main(["--sigma2", "2"])
    assert e.value.code == 2


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        dt_mod.main(["--help"])
    assert e.value.code == 0
    assert "--sigma2" in capsys.readouterr().out


def test_plot_without_matplotlib(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)             # import matplotlib -> ImportError
    dt_mod.save_plot({"a": np.zeros((3, 2))}, str(tmp_path / "p.png"))
    assert "needs matplotlib" in capsys.readouterr().out
    assert not (tmp_path / "p.png").exists()


def test_main_end_to_end(tmp_path, capsys):
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
