"""Models people use: tied weights, layers beyond ``torch.nn`` (the registry), HF, timm, torchvision."""

from __future__ import annotations

import copy
import importlib
import subprocess
import sys
import warnings
from collections.abc import Iterator
from types import ModuleType

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import aon_func
from aon_func import AON
from aon_func import _select as select_module


@pytest.fixture(autouse=True)
def _restore_registry() -> Iterator[None]:
    saved = dict(select_module._REGISTRY)
    yield
    select_module._REGISTRY.clear()
    select_module._REGISTRY.update(saved)


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def _detached(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach() for k, v in module.named_parameters()}


# ---------------------------------------------------------------- tied weights


class _TiedLM(nn.Module):
    """Token embedding, a hidden Linear, an output layer sharing the embedding's tensor."""

    def __init__(self, vocab: int = 11, width: int = 6) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.hidden = nn.Linear(width, width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, idx: Tensor) -> Tensor:
        return self.head(torch.tanh(self.hidden(self.emb(idx))))


def test_tied_head_is_left_alone_by_default() -> None:
    net = _TiedLM()
    aon = AON.for_module(net)
    assert aon.include == frozenset({"hidden.weight"})
    # the names are names of params: init and apply run (no "not in params" error)
    state = aon.init(_detached(net), generator=_gen())
    assert sorted(state) == ["hidden.weight"]


def test_tied_normalise_selects_the_tensor_once_and_uses_it_everywhere() -> None:
    net = _TiedLM()
    aon = AON.for_module(net, order=2, tied="normalise")
    assert aon.include == frozenset({"emb.weight", "hidden.weight"})
    params = _detached(net)
    state = aon.init(params, generator=_gen())
    weights, _ = aon.apply(params, state, training=False)
    idx = torch.tensor([[0, 3, 5]])
    out, _ = aon.functional_call(net, params, state, idx, training=False)
    h_emb = weights["emb.weight"]
    expected = torch.tanh(F.linear(h_emb[idx], weights["hidden.weight"], net.hidden.bias)) @ h_emb.T
    torch.testing.assert_close(out, expected)


def test_exclude_and_out_axes_take_any_name_of_a_tied_tensor() -> None:
    net = _TiedLM()
    aon = AON.for_module(net, tied="normalise", exclude=["head.weight"])
    assert aon.include == frozenset({"hidden.weight"})
    assert AON.for_module(net, exclude=["head.weight"]).include == frozenset({"hidden.weight"})
    aon = AON.for_module(net, tied="normalise", out_axes={"head.weight": 1})
    assert dict(aon.out_axes) == {"emb.weight": 1}
    with pytest.raises(ValueError, match=r"tied must be one of \['skip', 'normalise'\]"):
        AON.for_module(net, tied="yes")  # type: ignore[arg-type]


def test_shared_weight_between_two_linears_is_normalised_once() -> None:
    a, b = nn.Linear(5, 5), nn.Linear(5, 5)
    b.weight = a.weight
    net = nn.Sequential(a, nn.Tanh(), b)
    aon = AON.for_module(net)
    assert aon.include == frozenset({"0.weight"})  # both uses are Linear: no tie policy needed
    aon_func.parametrize(net, generator=_gen())
    net.eval()
    assert torch.equal(net[0].weight, net[2].weight)


def test_parametrize_keeps_a_tie_with_the_embedding_included() -> None:
    torch.manual_seed(0)
    net = _TiedLM()
    transform = AON(include={"emb.weight", "hidden.weight"}, order=2)
    aon_func.parametrize(net, transform=transform, generator=_gen())
    raw = net.emb.parametrizations.weight.original
    assert net.head.parametrizations.weight.original is raw  # one raw tensor
    assert net.head.parametrizations.weight[0] is net.emb.parametrizations.weight[0]  # one u
    assert len(list(net.parameters())) == 3  # raw tied tensor, hidden weight and bias

    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-2)
    idx, y = torch.randint(0, 11, (4, 3)), torch.randint(0, 11, (4, 3))
    for _ in range(3):
        optimizer.zero_grad()
        F.cross_entropy(net(idx).flatten(0, 1), y.flatten()).backward()
        optimizer.step()
    net.eval()
    assert net.head.parametrizations.weight.original is raw
    assert torch.equal(net.head.weight, net.emb.weight)  # still tied, and normalised
    h, _ = aon_func.aon(raw.detach(), net.emb.parametrizations.weight[0].u, order=2)
    torch.testing.assert_close(net.emb.weight.detach(), h, rtol=0, atol=0)

    w = net.emb.weight.detach().clone()
    aon_func.remove_parametrizations(net)
    assert net.head.weight is net.emb.weight  # the tie survives removal
    torch.testing.assert_close(net.emb.weight.detach(), w, rtol=0, atol=0)  # baked once


def test_parametrize_default_on_a_tied_model_leaves_the_tie_alone() -> None:
    net = _TiedLM()
    aon_func.parametrize(net)
    assert net.head.weight is net.emb.weight
    assert not hasattr(net.emb, "parametrizations")


def test_naming_a_tied_tensor_by_its_other_name_is_a_clear_error() -> None:
    net = _TiedLM()
    with pytest.raises(ValueError, match=r"'head.weight' is tied.*same tensor as 'emb.weight'"):
        aon_func.parametrize(net, transform=AON(include={"head.weight"}))
    assert net.head.weight is net.emb.weight  # nothing changed


# ---------------------------------------------------------------- the layer registry


class _Dense(nn.Module):
    """Weight stored (in, out), as in Keras and HF's Conv1D."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.kernel = nn.Parameter(torch.randn(n_in, n_out))

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.kernel


def test_register_layer_by_class_and_subclasses_follow() -> None:
    class Sub(_Dense):
        pass

    net = nn.Sequential(_Dense(4, 8), Sub(8, 3))
    with pytest.raises(ValueError, match="selects no tensor"):
        AON.for_module(net).init(_detached(net))  # unknown layers: nothing chosen
    assert aon_func.register_layer(_Dense, out_axis=1, weights=("kernel",)) is _Dense
    aon = AON.for_module(net)
    assert aon.include == frozenset({"0.kernel", "1.kernel"})
    assert dict(aon.out_axes) == {"0.kernel": 1, "1.kernel": 1}


def test_register_layer_by_name_needs_no_import() -> None:
    cls = type("Fancy", (_Dense,), {"__module__": "some_lib.layers", "__qualname__": "Fancy"})
    aon_func.register_layer("some_lib.layers.Fancy", out_axis=1, weights=("kernel",))
    net = nn.Sequential(cls(3, 5))
    assert dict(AON.for_module(net).out_axes) == {"0.kernel": 1}


def test_register_layer_with_no_weights_leaves_the_layer_alone_with_a_warning() -> None:
    class Renormalising(nn.Linear):
        pass

    aon_func.register_layer(Renormalising, weights=(), reason="re-normalises its weight")
    net = nn.Sequential(Renormalising(4, 4), nn.Linear(4, 2))
    with pytest.warns(UserWarning, match=r"leaves 1 layer\(s\) alone \('0'\).*re-normalises"):
        aon = AON.for_module(net)
    assert aon.include == frozenset({"1.weight"})


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"cls": 3}, TypeError, "cls must be an nn.Module subclass"),
        ({"cls": "Conv1D"}, ValueError, "qualified class name"),
        ({"cls": _Dense, "out_axis": -1}, ValueError, "out_axis must be an int >= 0"),
        ({"cls": _Dense, "weights": "kernel"}, TypeError, r"weights=\('name',\)"),
        ({"cls": _Dense, "weights": ("a b",)}, ValueError, "parameter names"),
        ({"cls": _Dense, "reason": "why"}, ValueError, "only with weights=()"),
    ],
)
def test_register_layer_errors(
    kwargs: dict[str, object], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        aon_func.register_layer(**kwargs)  # type: ignore[arg-type]


def test_a_registered_weight_name_the_layer_lacks_is_an_error() -> None:
    aon_func.register_layer(_Dense, weights=("kernal",))
    with pytest.raises(ValueError, match=r"module '0' \(_Dense\) has no attribute 'kernal'"):
        AON.for_module(nn.Sequential(_Dense(2, 3)))


def test_hf_conv1d_and_timm_std_conv_are_recognised_without_importing_them() -> None:
    """In a fresh interpreter: classes with the libraries' qualified names, and neither imported."""
    code = """
import sys, warnings, torch, aon_func
from torch import nn
Conv1D = type("Conv1D", (nn.Module,), {"__module__": "transformers.pytorch_utils"})
StdConv2d = type("StdConv2d", (nn.Conv2d,), {"__module__": "timm.layers.std_conv"})
m = Conv1D()
m.weight = nn.Parameter(torch.randn(4, 12))  # (in, out)
net = nn.Sequential(m, StdConv2d(1, 2, 3), nn.Linear(3, 3))
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    aon = aon_func.AON.for_module(net)
assert aon.include == frozenset({"0.weight", "2.weight"}), aon.include
assert dict(aon.out_axes) == {"0.weight": 1}, aon.out_axes
assert any("StdConv2d standardises its weight" in str(w.message) for w in caught), caught
assert "transformers" not in sys.modules and "timm" not in sys.modules
print("ok")
"""
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_output_axis_of_a_two_d_weight_does_not_change_the_map() -> None:
    """Why the default AON() (which sees names only) is right on Conv1D's (in, out) weights anyway."""
    w = torch.randn(6, 15, generator=_gen())
    params = {"c.weight": w}
    for order in (0, 2):
        a, _ = AON(order=order).apply(params, None)
        b, _ = AON(order=order, out_axes={"c.weight": 1}).apply(params, None)
        torch.testing.assert_close(a["c.weight"], b["c.weight"], rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- Hugging Face transformers

# transformers is in the test extra: these tests run in CI, never skip (an import error fails them).


def _transformers() -> ModuleType:
    return importlib.import_module("transformers")


def _gpt2(seed: int = 0) -> nn.Module:
    transformers = _transformers()
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        n_layer=2, n_head=2, n_embd=16, vocab_size=40, n_positions=16,
        bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config)


def _bert(seed: int = 0) -> nn.Module:
    transformers = _transformers()
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        vocab_size=40, max_position_embeddings=16, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    return transformers.BertForMaskedLM(config)


def _tokens(batch: int = 4, length: int = 8) -> Tensor:
    return torch.randint(0, 40, (batch, length), generator=torch.Generator().manual_seed(1))


def test_gpt2_selection_conv1d_axis_one_no_embeddings_tied_head_skipped() -> None:
    model = _gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    aon = AON.for_module(model)
    expected = {
        f"transformer.h.{i}.{layer}.weight"
        for i in range(2)
        for layer in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    }
    assert aon.include == expected
    assert dict(aon.out_axes) == dict.fromkeys(expected, 1)
    normalise = AON.for_module(model, tied="normalise")
    assert normalise.include == {*expected, "transformer.wte.weight"}


def test_bert_selection_linears_no_embeddings_tied_decoder_skipped() -> None:
    model = _bert()
    aon = AON.for_module(model)
    assert not any("embeddings" in n or "decoder" in n for n in aon.include)
    assert "cls.predictions.transform.dense.weight" in aon.include
    assert "bert.encoder.layer.1.attention.self.query.weight" in aon.include
    assert len(aon.include) == 2 * 6 + 1  # q, k, v, attention out, intermediate, out; the MLM dense


@pytest.mark.parametrize("build", [_gpt2, _bert], ids=["gpt2", "bert"])
def test_functional_training_with_torch_func_grad(build: object) -> None:
    model = build()  # type: ignore[operator]
    aon = AON.for_module(model, order=2)
    params = aon.add_gains(_detached(model), init=1.0)
    before = copy.deepcopy(params)
    state = aon.init(params, generator=_gen())
    x = _tokens()

    def loss_fn(params: dict[str, Tensor], state: dict[str, Tensor]) -> tuple[Tensor, object]:
        out, state = aon.functional_call(model, params, state, (), {"input_ids": x, "labels": x})
        return out.loss, state

    losses = []
    for _ in range(6):
        grads, (loss, state) = torch.func.grad_and_value(loss_fn, has_aux=True)(params, state)
        params = {k: p - 0.2 * grads[k] for k, p in params.items()}
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    assert all(torch.equal(before[k], v) for k, v in _detached(model).items())  # model untouched
    weights, _ = aon.apply(params, state, training=False)
    for name in aon.include:
        s = torch.linalg.matrix_norm(weights[name], ord=2) / params[aon_func.gain_key(name)]
        assert float(s) == pytest.approx(1.0, abs=1e-3), name


@pytest.mark.parametrize("build", [_gpt2, _bert], ids=["gpt2", "bert"])
def test_parametrize_and_adamw(build: object) -> None:
    model = build()  # type: ignore[operator]
    aon_func.parametrize(model, order=2, learnable_gain=1.0, generator=_gen())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = _tokens()
    losses = []
    for _ in range(6):
        optimizer.zero_grad()
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    if build is _gpt2:
        assert model.lm_head.weight is model.transformer.wte.weight  # tie untouched
        w = model.transformer.h[0].attn.c_attn
        h, _ = aon_func.aon(
            w.parametrizations.weight.original.detach(),
            w.parametrizations.weight[0].u,
            order=2,
            out_axis=1,
            training=False,
        )
        torch.testing.assert_close(
            model.eval().transformer.h[0].attn.c_attn.weight.detach(),
            h * w.parametrizations.weight[0].gain.detach(),
        )


def test_gpt2_parametrize_tied_normalise_keeps_head_and_embedding_one_tensor() -> None:
    model = _gpt2()
    aon_func.parametrize(model, order=2, tied="normalise", generator=_gen())
    wte, head = model.transformer.wte, model.lm_head
    assert head.parametrizations.weight.original is wte.parametrizations.weight.original
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = _tokens()
    for _ in range(2):
        optimizer.zero_grad()
        model(input_ids=x, labels=x).loss.backward()
        optimizer.step()
    model.eval()
    assert torch.equal(head.weight, wte.weight)
    assert float(torch.linalg.matrix_norm(wte.weight.detach(), ord=2)) == pytest.approx(1, abs=1e-3)


@pytest.mark.slow
def test_gpt2_compiled_training_step() -> None:
    model = _gpt2()
    aon = AON.for_module(model, order=2)
    params = aon.add_gains(_detached(model), init=1.0)
    state = aon.init(params, generator=_gen())
    x = _tokens(2, 8)

    def loss_fn(params: dict[str, Tensor], state: dict[str, Tensor]) -> tuple[Tensor, object]:
        out, state = aon.functional_call(model, params, state, (), {"input_ids": x, "labels": x})
        return out.loss, state

    def step(
        params: dict[str, Tensor], state: dict[str, Tensor]
    ) -> tuple[dict[str, Tensor], dict[str, Tensor], Tensor]:
        grads, (loss, state) = torch.func.grad_and_value(loss_fn, has_aux=True)(params, state)
        return {k: p - 0.2 * grads[k] for k, p in params.items()}, state, loss

    eager_params, eager_state, eager_loss = step(params, state)
    compiled = torch.compile(step)
    losses = []
    p, s = params, state
    for _ in range(3):
        p, s, loss = compiled(p, s)
        losses.append(float(loss))
        if len(losses) == 1:
            assert float(loss) == pytest.approx(float(eager_loss), rel=1e-4)
            for k in eager_params:
                torch.testing.assert_close(p[k], eager_params[k], rtol=1e-3, atol=1e-5)
            for k in eager_state:
                torch.testing.assert_close(s[k], eager_state[k], rtol=1e-3, atol=1e-5)
    assert losses[-1] < losses[0]


# ---------------------------------------------------------------- timm and torchvision


def _import_or_skip(name: str) -> ModuleType:
    """Import ``name`` or skip, naming the error (a torchvision built for another torch fails
    at import with ``operator torchvision::nms does not exist``, not with ImportError)."""
    try:
        return importlib.import_module(name)
    except Exception as error:  # any import-time failure: name it in the skip reason
        pytest.skip(
            f"{name} does not import with torch {torch.__version__}: "
            f"{type(error).__name__}: {error} (docs/usage.md lists versions that install together)"
        )


def _train_parametrized(model: nn.Module, x: Tensor, classes: int) -> list[float]:
    aon_func.parametrize(model, order=2, learnable_gain=1.0, generator=_gen())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    y = torch.arange(x.shape[0]) % classes
    losses = []
    for _ in range(3):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


def test_torchvision_resnet() -> None:
    models = _import_or_skip("torchvision.models")
    torch.manual_seed(0)
    model = models.resnet18(weights=None, num_classes=4)
    aon = AON.for_module(model)
    assert "conv1.weight" in aon.include
    assert "fc.weight" in aon.include
    losses = _train_parametrized(model, torch.randn(4, 3, 32, 32), 4)
    assert all(map(torch.isfinite, torch.tensor(losses)))


def test_timm_models_and_std_conv() -> None:
    timm = _import_or_skip("timm")
    torch.manual_seed(0)
    vit = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=3, img_size=32, patch_size=8, depth=2
    )
    losses = _train_parametrized(vit, torch.randn(2, 3, 32, 32), 3)
    assert all(map(torch.isfinite, torch.tensor(losses)))

    std = timm.layers.StdConv2d(3, 4, 3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        aon = AON.for_module(nn.Sequential(std, nn.Conv2d(4, 4, 1)))
    assert aon.include == frozenset({"1.weight"})
    assert any("standardises its weight" in str(w.message) for w in caught)
