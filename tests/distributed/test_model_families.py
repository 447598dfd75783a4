"""Every shipped model family (``tpfuse.parallel.FAMILIES``) through ``tpfuse.parallelize`` with the layout it is
recognised by (no ``layout=``), CPU, gloo, fp32, TP 1 / 2 / 4: a left-padded batched prefill, decode steps of rows
at different lengths, and greedy ``tpfuse.parallel.generate``. (``from_pretrained`` of the families whose
checkpoints need more than the Llama reads - Qwen2's q/k/v biases, Phi-3's fused weights - is in
``test_checkpoint_load.py``.)

Oracle: the unsharded Hugging Face model (:mod:`model_cases`): its fp64 logits over each whole sequence, and its
own greedy ``generate()`` tokens. The tiny configs (``model_cases.ARCHS``) make TP=4 split every head count, or
replicate the kv heads (Mistral, Phi-3: 2 kv heads), and Phi-3 at TP > 1 fails unless its fused weights are split
by their parts (a contiguous slice would give rank 0 only q heads).
"""

import pytest
import torch

pytest.importorskip("transformers", reason="tpfuse.parallelize tests need transformers (pip install 'tpfuse[hf]')")

import model_cases as mc  # noqa: E402
from harness import run_on_ranks  # noqa: E402

ARCHS = ("llama3", "mistral", "qwen2", "qwen3", "phi3")
DECODE_STEPS, NEW_TOKENS = 3, 5


def _decode_vs_oracle(model, ref_model, prompts, what):
    """Left-padded prefill of ``prompts``, then DECODE_STEPS steps of every row; each row's real logits against
    the oracle over its whole sequence. Returns the worst relative error."""
    from tpfuse.tolerance import assert_close

    extra = torch.randint(0, mc.VOCAB, (len(prompts), DECODE_STEPS), generator=torch.Generator().manual_seed(3))
    refs = [mc.oracle(ref_model, torch.cat([p, extra[b]])) for b, p in enumerate(prompts)]
    ids, mask = mc.padded(prompts, left=True)
    out = model(ids, attention_mask=mask)
    errs = [assert_close(out.logits[b][mask[b].bool()], refs[b][:len(p)], torch.float32, f"{what} prefill row {b}")
            for b, p in enumerate(prompts)]
    for i in range(DECODE_STEPS):
        mask = torch.cat([mask, torch.ones(len(prompts), 1, dtype=mask.dtype)], dim=1)
        out = model(extra[:, i:i + 1], attention_mask=mask, cache=mc.cache_of(out))
        errs += [assert_close(out.logits[b, 0], refs[b][len(p) + i], torch.float32, f"{what} decode {i} row {b}")
                 for b, p in enumerate(prompts)]
    return max(errs)


def _family(rank, world, arch):
    import transformers

    from tpfuse.parallel import LAYOUTS, generate

    model, ref_model, comm = mc.tp_model(arch, world)
    assert model._tpfuse.layout is LAYOUTS[type(ref_model).__name__]  # recognised, not passed
    what = f"{arch} TP={world}"
    err = _decode_vs_oracle(model, ref_model, mc.prompts(), what)
    ids, mask = mc.padded(mc.prompts(seed=5), left=True)
    # the oracle's greedy tokens: HF generate() of the unsharded model (no early stop at a random eos)
    want = ref_model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0,
                              generation_config=transformers.GenerationConfig(eos_token_id=None))
    got = generate(model, ids, mask, max_new_tokens=NEW_TOKENS).sequences
    assert torch.equal(got, want), (what, got, want)
    comm.close()
    return err


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("arch", ARCHS)
def test_family_matches_unsharded_hf(arch, world):
    errs = run_on_ranks(_family, world, arch)
    assert max(errs) <= 1e-5, errs


# ---------------------------------------------------------------------------------------------------------------
# recognition (raised before any collective: no ranks needed)


def test_recognised_by_class_base_class_or_model_type():
    import transformers

    from tpfuse.parallel import LLAMA_LAYOUT, PHI3_LAYOUT, layout_for

    class Subclass(transformers.Phi3ForCausalLM):  # e.g. a wrapper: recognised by its base class
        pass

    class RemoteQwen2ForCausalLM(torch.nn.Module):  # remote code: a *ForCausalLM of another name, model_type qwen2
        config = mc.config("qwen2")

    assert layout_for(Subclass(mc.config("phi3"))) is PHI3_LAYOUT
    assert layout_for(RemoteQwen2ForCausalLM()) is LLAMA_LAYOUT


def test_unsupported_model_raises_one_error_naming_the_families(tmp_path):
    import transformers

    import tpfuse
    from tpfuse.errors import TPFuseError
    from tpfuse.parallel import from_pretrained

    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=64, n_layer=1, n_head=4, vocab_size=128))
    gpt2.save_pretrained(tmp_path)
    calls = (lambda: tpfuse.parallelize(gpt2, None),
             lambda: tpfuse.parallelize(transformers.LlamaForSequenceClassification(mc.config("llama")), None),
             lambda: from_pretrained(str(tmp_path), None, dtype=torch.float32))
    for call in calls:
        with pytest.raises(TPFuseError) as e:  # also a ValueError
            call()
        assert isinstance(e.value, ValueError)
        msg = str(e.value)
        assert all(f in msg for f in ("Llama 2 / 3.x", "Mistral", "Qwen2 / Qwen2.5", "Qwen3", "Phi-3")), msg
        assert "layout=TPLayout(" in msg, msg


@pytest.mark.parametrize("arch,over,match", [
    ("phi3", dict(hidden_size=96, num_attention_heads=4, head_dim=24), "head_dim=24"),  # Phi-3-mini has 96
    ("phi3", dict(partial_rotary_factor=0.5), "partial_rotary_factor=0.5"),  # Phi-4-mini has 0.75
    ("mistral", dict(sliding_window=16), "sliding-window"),
])
def test_recognised_family_with_unsupported_config_raises(arch, over, match):
    import tpfuse

    model = mc.build(arch, 0, **over)
    with pytest.raises(NotImplementedError, match=match):
        tpfuse.parallelize(model, _stub_comm(model))


def _stub_comm(model):
    """What parallelize reads of a communicator before its first collective."""
    import types

    return types.SimpleNamespace(tp=2, rank=0, hidden_size=model.config.hidden_size, dtype=torch.float32,
                                 device=torch.device("cpu"))


def test_stacked_module_without_parts_raises():
    import dataclasses

    import tpfuse
    from tpfuse.parallel import PHI3_LAYOUT

    bad = dataclasses.replace(PHI3_LAYOUT, parts={})  # a contiguous split would give rank 0 only q heads
    with pytest.raises(ValueError, match=r"qkv_proj holds 3 projections: list their sizes in TPLayout.parts"):
        model = mc.build("phi3", 0)
        tpfuse.parallelize(model, _stub_comm(model), layout=bad)
