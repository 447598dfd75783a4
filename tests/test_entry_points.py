"""The README's entry points as a user runs them: the demo (self-spawning and under the torchrun launcher) and the
console script. Each must exit 0 and show both the all-reduce and the sequence-parallel form (``--sp-min-tokens`` pins
the switch, so the same token counts cross it on a CPU and on a GPU machine, whose tables differ)."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(cmd, timeout=300):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{cmd} exited {p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}"
    return p.stdout


def test_demo_self_spawned_crosses_the_sp_threshold():
    out = _run([sys.executable, "-m", "tpfuse.demo", "--tokens", "1,7,1500", "--sp-min-tokens", "1024"])
    assert "transformers LlamaForCausalLM" in out and "decode=" in out  # the HF model, prefill + decode
    assert "allreduce" in out and "sequence_parallel" in out
    assert "all token counts match the unsharded model" in out
    assert out.count(" ok") == 3


def test_demo_under_launcher_tp4_uneven_tokens():
    out = _run(["bash", "launch/run.sh", "-n", "4", "-m", "tpfuse.demo", "--tokens", "3,1027", "--layers", "1",
                "--sp-min-tokens", "1024", "--decode-steps", "1"])
    assert "TP=4" in out and "sequence_parallel" in out and "decode=" in out
    assert "all token counts match the unsharded model" in out


def test_launcher_rejects_missing_target():
    p = subprocess.run(["bash", "launch/run.sh", "-n", "2"], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 2 and "missing TARGET" in p.stderr


def test_exit_rank_flushes_and_keeps_the_status():
    # stdout is a pipe here and PYTHONUNBUFFERED is unset, so the text sits in Python's buffer until exit_rank
    # flushes it: os._exit alone would drop it (the demo's table is printed just before its ranks exit).
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    code = "import sys; from tpfuse.distributed import exit_rank; print('table'); sys.stderr.write('err'); exit_rank(3)"
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert (p.returncode, p.stdout, p.stderr) == (3, "table\n", "err")


def test_demo_reports_which_rank_failed():
    # ranks that raise (here the thresholds table named in the environment does not exist, which only the ranks
    # see) fail the demo, each exit status named
    env = dict(os.environ, TPFUSE_THRESHOLDS="/nonexistent/table.json")
    out = subprocess.run([sys.executable, "-m", "tpfuse.demo", "--tokens", "1", "--layers", "1"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1, out
    assert "tpfuse demo: failed: rank 0 exited 1, rank 1 exited 1" in out.stderr, out.stderr
    assert "ThresholdsError: thresholds table not found: /nonexistent/table.json" in out.stderr, out.stderr


@pytest.mark.parametrize("args,msg", [
    (["--tokens", "abc"], "argument --tokens: expected comma-separated positive ints, got 'abc'"),
    (["--tokens", "4,0"], "token counts must be >= 1"),
    (["--nproc", "3"], "--nproc 3: the demo model shards over a power-of-two TP only"),
    (["--nproc", "0"], "argument --nproc: must be in [1, 64], got 0"),
    (["--sp-min-tokens", "-5"], "argument --sp-min-tokens: must be >= 1, got -5"),
])
def test_demo_rejects_bad_arguments_before_any_rank(args, msg):
    p = subprocess.run([sys.executable, "-m", "tpfuse.demo", *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2, p
    assert p.stderr.count("\n") == 1 and msg in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert p.stdout == "", p.stdout  # no rank printed anything: none started


def test_help_texts_render_cleanly():
    demo = subprocess.run([sys.executable, "-m", "tpfuse.demo", "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert demo.returncode == 0 and "usage: tpfuse-demo" in demo.stdout
    assert "``" not in demo.stdout and ":func:" not in demo.stdout, demo.stdout
    run = subprocess.run(["bash", "launch/run.sh", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.startswith("Run a tpfuse entry point")
    assert "set -euo" not in run.stdout and not any(ln.startswith("#") for ln in run.stdout.splitlines()), run.stdout
    tune = subprocess.run(["bash", "launch/tune.sh", "-n", "2", "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert tune.returncode == 0 and tune.stdout.count("usage: tune.py") == 1, tune.stdout + tune.stderr


def test_tuner_rejects_bad_arguments_before_any_rank():
    p = subprocess.run(["bash", "launch/tune.sh", "-n", "2", "--ops", "fused_add_rmsnorm,bogus"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "cannot tune ['bogus']" in p.stderr, p.stderr
    assert p.stdout == "", p.stdout


def test_generate_cli_prints_speed_and_rejects_bad_args():
    p = subprocess.run([sys.executable, "-m", "tpfuse.generate_cli", "--batch", "2", "--prompt-len", "6",
                        "--new-tokens", "5"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    out = p.stdout
    assert p.returncode == 0 and "ms/step" in out and "tokens/s" in out and "KV cache" in out, p
    assert "5 new tokens per sequence" in out and "over 4 steps" in out, out
    assert "5/5 new tokens" in p.stderr, p.stderr  # the progress bar counts the tokens asked for
    bad = subprocess.run([sys.executable, "-m", "tpfuse.generate_cli", "--new-tokens", "0"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--new-tokens must be >= 1" in bad.stderr, bad


WORDS = "the cat sat on a mat dog ran far away big red blue sun moon sky and then it was".split()


def _text_checkpoint(path):
    """A tiny Llama and a word-level tokenizer (with a chat template) saved in ``path``, nothing downloaded; returns
    the unsharded model and the tokenizer. The EOS row of lm_head is zero so generations run their full length."""
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[EOS]", "<user>", "<bot>", *WORDS])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer, tk.decoder = pre_tokenizers.Whitespace(), decoders.WordPiece()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]",
                                               eos_token="[EOS]")
    tok.chat_template = ("{% for m in messages %}<user> {{ m['content'] }} {% endfor %}"
                         "{% if add_generation_prompt %}<bot>{% endif %}")
    tok.save_pretrained(path)
    cfg = transformers.LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, eos_token_id=2,
                                   pad_token_id=0, bos_token_id=None, max_position_embeddings=128,
                                   tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for prm in model.parameters():
            prm.normal_(0, 0.5)
        model.lm_head.weight[2] = 0
    model.save_pretrained(path)
    return model, tok


def _expected(model, tok, prompts, chat, new):
    """The unsharded transformers model's greedy completions, decoded."""
    tok.padding_side = "left"
    if chat:
        prompts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                           tokenize=False) for p in prompts]
    enc = tok(prompts, padding=True, return_tensors="pt", add_special_tokens=not chat)
    out = model.generate(**enc, max_new_tokens=new, do_sample=False, pad_token_id=0)
    return [tok.decode(r, skip_special_tokens=True) for r in out[:, enc["input_ids"].shape[1]:]]


def test_generate_cli_text_in_text_out(tmp_path):
    pytest.importorskip("transformers")
    path = str(tmp_path / "ckpt")
    model, tok = _text_checkpoint(path)
    want = _expected(model, tok, ["the cat sat on"], False, 6)[0]
    out = _run([sys.executable, "-m", "tpfuse.generate_cli", "--model-dir", path, "--prompt", "the cat sat on",
                "--new-tokens", "6"])
    lines = out.splitlines()
    assert "TP=1" in lines[0] and "float32" in lines[0], out  # dtype auto: the checkpoint's
    assert lines[1] == want and len(want.split()) == 6, (out, want)  # the streamed text, as transformers makes it
    assert "6 new tokens per sequence" in lines[2] and "ms/step" in lines[2] and "tokens/s" in lines[2], out


def test_generate_cli_chat_batch_under_launcher_tp2(tmp_path):
    pytest.importorskip("transformers")
    path = str(tmp_path / "ckpt")
    model, tok = _text_checkpoint(path)
    prompts = ["the cat sat on", "big red sun"]
    (tmp_path / "prompts.txt").write_text(f"{prompts[0]}\n\n{prompts[1]}\n")
    want = _expected(model, tok, prompts, True, 5)
    out = _run(["bash", "launch/run.sh", "-n", "2", "-m", "tpfuse.generate_cli", "--model-dir", path, "--chat",
                "--prompts-file", str(tmp_path / "prompts.txt"), "--new-tokens", "5", "--dtype", "fp32"])
    assert "TP=2" in out and "batch 2" in out, out
    for i, (p, w) in enumerate(zip(prompts, want)):
        assert f"[{i}] {p}\n    -> {w}\n" in out, (out, want)
    assert "5 new tokens per sequence" in out, out


@pytest.mark.parametrize("args,msg", [
    (["--prompt", "hi"], "text mode (--prompt / --prompts-file) needs --model-dir"),
    (["--chat"], "--chat needs --prompt or --prompts-file"),
    (["--prompts-file", "/nonexistent/p.txt"], "--prompts-file /nonexistent/p.txt: No such file or directory"),
    (["--dtype", "int8"], "argument --dtype: invalid choice"),
])
def test_generate_cli_rejects_bad_text_args(args, msg):
    p = subprocess.run([sys.executable, "-m", "tpfuse.generate_cli", *args], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 2 and msg in p.stderr and p.stdout == "", p


def test_generate_cli_help_shows_defaults_in_plain_text():
    p = subprocess.run([sys.executable, "-m", "tpfuse.generate_cli", "--help"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0 and "usage: tpfuse-generate" in p.stdout, p
    assert "``" not in p.stdout and ":func:" not in p.stdout, p.stdout
    flat = " ".join(p.stdout.split())
    assert flat.count("(default: ") == 12, p.stdout  # every option but --help has a help text and its default
    for default in ("(default: 64)", "(default: auto)", "(default: tiny)", "(default: 32)", "(default: 4)"):
        assert default in flat, (default, p.stdout)
