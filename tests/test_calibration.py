"""The shared calibration pass (lora_lite.calibration): what it collects, what it leaves out, what it restores."""

import pytest
import torch

import lora_lite as ll
from conftest import gsm8k_rows, stories_tokenizer
from lora_lite.calibration import input_moments as moments_of
from lora_lite.runtime import _output_hook
from lora_lite.variants.antipasto_gain import AntiPaSTOGain

LAYER = "model.layers.2.self_attn.q_proj"


@pytest.fixture(scope="module")
def batches():
    """4 left-padded batches of 2 GSM8K questions, tokenised for stories260K."""
    tok = stories_tokenizer()
    texts = [r["question"] for r in gsm8k_rows("train", 8)]
    return [dict(tok(texts[i:i + 2], return_tensors="pt", padding=True)) for i in range(0, 8, 2)]


def targets(model, pattern=r"layers\.[0-4]\.self_attn\.[qk]_proj$"):
    return [(n, m) for n, m, _ in ll.find_targets(model, ll.LoRAConfig(target_names=(pattern,)))]


def input_moments(model, named_layers, data, **kwargs):
    """lora_lite's input_moments keyed by layer name."""
    return dict(zip([n for n, _ in named_layers], moments_of(model, [m for _, m in named_layers], data, **kwargs),
                    strict=True))


def captured_inputs(model, name, batches, keep_padding=False):
    """The layer's inputs over all batches as (tokens, d_in), padding dropped unless keep_padding."""
    rows = []
    layer = model.get_submodule(name)
    handle = layer.register_forward_pre_hook(lambda mod, args: rows.append(args[0].detach().reshape(-1, 64)))
    mask_rows = []
    with torch.no_grad():
        for b in batches:
            model(**b)
            mask_rows.append(b["attention_mask"].reshape(-1).bool())
    handle.remove()
    X = torch.cat(rows)
    return X if keep_padding else X[torch.cat(mask_rows)]


def test_moments_are_the_masked_second_moment(stories, batches):
    X = captured_inputs(stories, LAYER, batches)
    X_padded = captured_inputs(stories, LAYER, batches, keep_padding=True)
    assert X_padded.shape[0] > X.shape[0], "the fixture must contain padding for this test to mean anything"
    moments = input_moments(stories, targets(stories), batches, min_tokens=1, variant="probe")
    torch.testing.assert_close(moments[LAYER], X.T @ X / X.shape[0], rtol=1e-4, atol=1e-6)
    assert not torch.allclose(moments[LAYER], X_padded.T @ X_padded / X_padded.shape[0], rtol=1e-3)
    # q and k read the same tensor: one shared product, identical statistics
    torch.testing.assert_close(moments[LAYER], moments[LAYER.replace("q_proj", "k_proj")], rtol=0, atol=0)
    diag = input_moments(stories, targets(stories), batches, min_tokens=1, variant="probe", diagonal=True)
    torch.testing.assert_close(diag[LAYER], moments[LAYER].diagonal(), rtol=1e-5, atol=1e-7)


def test_batch_dispatch_dict_tuple_tensor(stories, batches):
    ids = batches[0]["input_ids"][:1]  # one row: no padding, so all three forms see the same tokens
    forms = [[{"input_ids": ids}], [(ids,)], [ids]]
    results = [input_moments(stories, targets(stories), f, min_tokens=1, variant="probe")[LAYER] for f in forms]
    for other in results[1:]:
        torch.testing.assert_close(other, results[0], rtol=0, atol=0)


def test_failure_restores_modes_and_removes_hooks(stories, batches):
    stories.train()
    stories.model.layers[1].eval()
    before = {n: m.training for n, m in stories.named_modules()}

    def data():
        yield batches[0]
        raise RuntimeError("data loader broke")

    with pytest.raises(RuntimeError, match="data loader broke"):
        input_moments(stories, targets(stories), data(), min_tokens=1, variant="probe")
    assert {n: m.training for n, m in stories.named_modules()} == before
    assert all(not m._forward_pre_hooks for m in stories.modules())


def test_errors_name_the_problem(stories, batches):
    with pytest.raises(ll.CalibrationError, match="calibration_data=None"):
        input_moments(stories, targets(stories), None, min_tokens=1, variant="probe")
    with pytest.raises(ll.CalibrationError, match=r"fewer than r=100000"):
        input_moments(stories, targets(stories), batches, min_tokens=100_000, variant="probe")
    with pytest.raises(ll.CalibrationError, match="0 non-padding"):
        input_moments(stories, targets(stories), [], min_tokens=1, variant="probe")
    bad = {"input_ids": batches[0]["input_ids"][:, :5], "attention_mask": batches[0]["attention_mask"]}
    with pytest.raises(ll.CalibrationError, match="attention_mask has shape"):
        input_moments(stories, targets(stories), [bad], min_tokens=1, variant="probe")


def test_group_init_sees_the_adapted_model(stories, batches, monkeypatch):
    """The runtime runs group_init with W_res written and the hooks live, so every layer's calibration inputs
    are the ones training will see. antipasto_gain's init rewrites W, so without live hooks the inputs of
    layers 1-4 would come from a model missing its top-r directions."""
    base = input_moments(stories, targets(stories), batches, min_tokens=1, variant="probe")
    seen = {}

    def recording_group_init(model, adapters, cfg, data):
        names = {id(m): n for n, m in model.named_modules()}
        seen.update(input_moments(model, [(names[id(a.base)], a.base) for a in adapters], data, min_tokens=1,
                                  variant="probe"))

    monkeypatch.setattr(AntiPaSTOGain, "group_init", staticmethod(recording_group_init), raising=False)
    cfg = ll.AntiPaSTOGainConfig(r=16, target_names=(r"self_attn\.[qk]_proj$",))
    ll.attach(stories, cfg, calibration_data=batches)
    assert sorted(seen) == sorted(base)
    for name in base:
        torch.testing.assert_close(seen[name], base[name], rtol=1e-3, atol=1e-5)
    # and the check has teeth: the same pass with the adapter's hooks off sees different layer-4 inputs
    for layer in stories.modules():
        for key in [k for k, h in layer._forward_hooks.items() if h is _output_hook]:
            del layer._forward_hooks[key]
    damaged = input_moments(stories, targets(stories), batches, min_tokens=1, variant="probe")
    name = "model.layers.4.self_attn.q_proj"
    assert not torch.allclose(damaged[name], base[name], rtol=1e-2)
