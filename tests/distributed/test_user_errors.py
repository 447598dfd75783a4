"""Early, right errors on the model path (CPU, gloo, fp32, TP=1):

* ``generate`` (tpfuse's and transformers') rejects prompt + ``max_new_tokens`` beyond ``max_seq_len`` before the
  prefill, naming the fix;
* ``from_pretrained``'s dtype defaults to ``comm.dtype``; a missing directory or a hub id is one
  ``TPFuseCheckpointNotFound`` without any network access; errors name ``from_pretrained`` to its callers;
* every exception the model path raises derives from ``TPFuseError`` and keeps its builtin base.
"""

import os
import re
import socket

import pytest
import torch

pytest.importorskip("transformers", reason="tpfuse.parallelize tests need transformers (pip install 'tpfuse[hf]')")

import model_cases as mc  # noqa: E402
from harness import run_on_ranks  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _comm():
    import tpfuse

    return tpfuse.TPCommunicator(max_tokens=64, hidden_size=mc.HIDDEN, dtype=torch.float32)


def _too_long(rank, world):
    import tpfuse
    from tpfuse.errors import TPFuseInputError
    from tpfuse.parallel import KVCacheConfig, generate

    comm = _comm()
    model = tpfuse.parallelize(mc.build("llama", 0), comm, cache=KVCacheConfig(max_batch=2, max_seq_len=16))
    ids = torch.randint(0, mc.VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))
    msgs = []
    for call in (lambda: generate(model, ids, max_new_tokens=8),
                 lambda: model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, pad_token_id=0)):
        with pytest.raises(TPFuseInputError) as e:
            call()
        msgs.append(str(e.value))
    ran = model._tpfuse.last_mode  # None: no forward ran
    fits = generate(model, ids, max_new_tokens=7).sequences.shape  # 10 + 7 - 1 = 16 cache slots: fits
    comm.close()
    return msgs, ran, fits


def test_generate_checks_the_cache_length_before_prefill():
    msgs, ran, fits = run_on_ranks(_too_long, 1)[0]
    assert ran is None and fits == (2, 17)
    for m in msgs:
        assert "prompts of up to 10 tokens + max_new_tokens=8 need 17 KV-cache slots" in m, m
        assert "parallelize(..., cache=KVCacheConfig(max_seq_len=...))" in m, m


def _no_network(*a, **k):
    raise AssertionError("tried the network")


def _pretrained(rank, world, path):
    import tpfuse
    from tpfuse.errors import TPFuseCheckpointNotFound, TPFuseInputError
    from tpfuse.parallel import KVCacheConfig, from_pretrained

    mc.build("llama", 0).save_pretrained(path)
    comm = _comm()
    model = from_pretrained(path, comm, cache=KVCacheConfig(max_batch=2))  # fp32, as comm.dtype
    dtype = model.lm_head.weight.dtype
    with pytest.raises(TPFuseInputError) as e:
        model(torch.zeros(3, 2, dtype=torch.long))  # batch > max_batch
    batch_msg = str(e.value)
    socket.socket.connect = _no_network  # this rank process only
    missing = []
    for bad in (os.path.join(path, "nope"), "meta-llama/Llama-3.1-8B", os.path.dirname(path)):
        with pytest.raises(TPFuseCheckpointNotFound) as e:
            from_pretrained(bad, comm)
        assert isinstance(e.value, FileNotFoundError) and isinstance(e.value, tpfuse.TPFuseError)
        missing.append(str(e.value))
    with pytest.raises(TPFuseInputError) as e:
        from_pretrained(path, comm, dtype=torch.bfloat16)
    dtype_msg = str(e.value)
    comm.close()
    return dtype, batch_msg, missing, dtype_msg


def test_from_pretrained_defaults_and_errors(tmp_path):
    dtype, batch_msg, missing, dtype_msg = run_on_ranks(_pretrained, 1, str(tmp_path / "ckpt"))[0]
    assert dtype == torch.float32
    assert "pass from_pretrained(..., cache=KVCacheConfig(max_batch=...))" in batch_msg, batch_msg
    assert "is not a directory" in missing[0] and "downloads nothing" in missing[0], missing
    assert "hf download meta-llama/Llama-3.1-8B --local-dir DIR" in missing[1], missing
    assert "has no config.json" in missing[2], missing
    assert "pass dtype=comm.dtype to from_pretrained" in dtype_msg, dtype_msg


class _FakeComm:
    tp, rank, hidden_size, dtype, device, max_tokens = 1, 0, mc.HIDDEN, torch.float32, torch.device("cpu"), 64


@pytest.mark.parametrize("case,builtin", [
    ("hidden_act", NotImplementedError), ("no layout", ValueError), ("cache type", TypeError),
    ("fp8 scheme", NotImplementedError), ("no safetensors", FileNotFoundError),
])
def test_model_path_errors_derive_from_tpfuse_error(case, builtin, tmp_path):
    import tpfuse
    from tpfuse.parallel import FP8Scheme, load_sharded_safetensors

    comm = _FakeComm()
    calls = {
        "hidden_act": lambda: tpfuse.parallelize(mc.build("llama", 0, hidden_act="gelu"), _FakeComm()),
        "no layout": lambda: tpfuse.parallelize(torch.nn.Linear(2, 2), _FakeComm()),
        "cache type": lambda: tpfuse.parallelize(mc.build("llama", 0), _FakeComm(), cache={"max_batch": 2}),
        "fp8 scheme": lambda: FP8Scheme(activation="static", weight="per_channel"),
        "no safetensors": lambda: load_sharded_safetensors(tpfuse.parallelize(mc.build("llama", 0), comm),
                                                           str(tmp_path), comm),
    }
    with pytest.raises(tpfuse.TPFuseError) as e:
        calls[case]()
    assert isinstance(e.value, builtin), type(e.value).__mro__


def test_no_plain_builtin_raises_in_the_model_path():
    pattern = re.compile(r"raise (ValueError|NotImplementedError|OSError|IOError|RuntimeError|TypeError|"
                         r"FileNotFoundError)\(")
    files = [os.path.join(ROOT, "tpfuse", "parallel", f) for f in os.listdir(os.path.join(ROOT, "tpfuse", "parallel"))
             if f.endswith(".py")] + [os.path.join(ROOT, "tpfuse", "generate_cli.py")]
    bad = [f"{f}:{i + 1}" for f in files for i, ln in enumerate(open(f)) if pattern.search(ln)]
    assert not bad, bad
