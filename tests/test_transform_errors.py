"""Bad input gets a clear error at the boundary (init/apply), and never changes the caller's tensors."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from aon_func import AON, ONI, gain_key


def _params() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "fc1.weight": torch.randn(6, 4, generator=g),
        "fc1.bias": torch.randn(6, generator=g),
        "fc2.weight": torch.randn(3, 6, generator=g),
        "fc2.bias": torch.randn(3, generator=g),
        "norm.weight": torch.ones(6),
        "steps": torch.zeros(2, 2, dtype=torch.long),
    }


AON_ = AON(order=2)


def _state() -> dict[str, torch.Tensor]:
    return AON_.init(_params(), generator=torch.Generator().manual_seed(0))


def _with(d: dict, **changes: object) -> dict:
    out = dict(d)
    for k, v in changes.items():
        key = k.replace("__", ".")
        if v is None:
            del out[key]
        else:
            out[key] = v
    return out


def _other_model() -> dict[str, torch.Tensor]:
    return {"fc1.weight": torch.randn(3, 5), "fc2.weight": torch.randn(3, 3)}


# Each case: (params, state, error type, message pattern); apply(params, state).
APPLY_CASES: dict[str, tuple[Callable[[], dict], Callable[[], object], type, str]] = {
    "state missing a key": (
        _params,
        lambda: _with(_state(), fc2__weight=None),
        ValueError,
        r"missing keys \['fc2.weight'\]",
    ),
    "state with an extra key": (
        _params,
        lambda: _with(_state(), fc3__weight=torch.ones(3)),
        ValueError,
        r"unexpected keys \['fc3.weight'\]",
    ),
    "u of the wrong shape": (
        _params,
        lambda: _with(_state(), fc1__weight=torch.ones(6) / 6**0.5),
        ValueError,
        r"state\['fc1.weight'\] must have shape \(4,\).*got shape=\(6,\)",
    ),
    "u with a batch axis": (
        _params,
        lambda: _with(_state(), fc1__weight=torch.ones(1, 4)),
        ValueError,
        r"state\['fc1.weight'\] must have shape \(4,\)",
    ),
    "u of the wrong dtype": (
        _params,
        lambda: _with(_state(), fc1__weight=torch.ones(4, dtype=torch.float64)),
        TypeError,
        r"state\['fc1.weight'\] must have dtype torch.float32.*float64",
    ),
    "u on the wrong device": (
        _params,
        lambda: _with(_state(), fc1__weight=torch.ones(4, device="meta")),
        ValueError,
        r"state\['fc1.weight'\] must be on device cpu.*device=meta",
    ),
    "u not a tensor": (
        _params,
        lambda: _with(_state(), fc1__weight=[0.5, 0.5, 0.5, 0.5]),
        TypeError,
        r"state\['fc1.weight'\] must be a torch.Tensor, got list",
    ),
    "state not a mapping": (
        _params,
        lambda: list(_state().values()),
        TypeError,
        r"state must be a mapping",
    ),
    "params and state of different models (shapes)": (
        lambda: {**_params(), **_other_model()},
        _state,
        ValueError,
        r"state\['fc1.weight'\] must have shape \(3,\).*got shape=\(4,\)",
    ),
    "params and state of different models (names)": (
        lambda: {"enc.weight": torch.randn(6, 4), "dec.weight": torch.randn(3, 6)},
        _state,
        ValueError,
        r"state does not match params: missing keys \['dec.weight', 'enc.weight'\]",
    ),
    "params not a mapping": (
        lambda: list(_params().values()),
        _state,
        TypeError,
        r"params must be a mapping",
    ),
    "a params value not a tensor": (
        lambda: _with(_params(), fc1__bias=[0.0] * 6),
        _state,
        TypeError,
        r"params\['fc1.bias'\] must be a torch.Tensor, got list",
    ),
    "gain of an unselected tensor": (
        lambda: _with(_params(), **{"fc1__bias:gain": torch.tensor(1.0)}),
        _state,
        ValueError,
        r"gain 'fc1.bias:gain' but 'fc1.bias' is not a normalised tensor",
    ),
    "gain that is not 0-d": (
        lambda: _with(_params(), **{"fc1__weight:gain": torch.ones(6)}),
        _state,
        ValueError,
        r"params\['fc1.weight:gain'\] must be a 0-d floating tensor.*shape=\(6,\)",
    ),
    "gain that is an integer tensor": (
        lambda: _with(_params(), **{"fc1__weight:gain": torch.tensor(2)}),
        _state,
        ValueError,
        r"params\['fc1.weight:gain'\] must be a 0-d floating tensor.*int64",
    ),
    "gain that is a float": (
        lambda: _with(_params(), **{"fc1__weight:gain": 2.0}),
        _state,
        TypeError,
        r"params\['fc1.weight:gain'\] must be a 0-d Tensor",
    ),
}


@pytest.mark.parametrize("case", list(APPLY_CASES))
def test_apply_rejects_bad_input_and_changes_nothing(case: str) -> None:
    make_params, make_state, error, pattern = APPLY_CASES[case]
    params, state = make_params(), make_state()
    before = _snapshot(params), _snapshot(state)
    with pytest.raises(error, match=pattern):
        AON_.apply(params, state)  # type: ignore[arg-type]
    with pytest.raises(error, match=pattern):
        AON_.apply(params, state, training=False)  # type: ignore[arg-type]
    _assert_unchanged(params, before[0])
    _assert_unchanged(state, before[1])


# Each case: (transform, params, error type, message pattern); init(params) and apply(params, None).
SELECT_CASES: dict[str, tuple[AON, Callable[[], dict], type, str]] = {
    "include selects a 1-D tensor": (
        AON(include=r"weight$"),
        _params,
        ValueError,
        r"params\['norm.weight'\] \(selected by include\) must have ndim >= 2.*shape=\(6,\)",
    ),
    "include selects an integer tensor": (
        AON(include=lambda name, t: t.ndim >= 2),
        _params,
        TypeError,
        r"params\['steps'\] \(selected by include\) must have a real floating dtype.*int64",
    ),
    "include matches nothing": (
        AON(include=r"^conv"),
        _params,
        ValueError,
        r"include='\^conv' selects no tensor of params",
    ),
    "default include on a model without weights": (
        AON(),
        lambda: {"bias": torch.zeros(3)},
        ValueError,
        r"include=None selects no tensor",
    ),
    "include names not in params": (
        AON(include=["fc1.weight", "fc9.weight"]),
        _params,
        ValueError,
        r"include names \['fc9.weight'\] are not in params",
    ),
    "out_axes names not in params": (
        AON(out_axes={"fc9.weight": 1}),
        _params,
        ValueError,
        r"out_axes names \['fc9.weight'\] are not in params",
    ),
    "out_axis out of range": (
        AON(out_axes={"fc1.weight": 2}),
        _params,
        ValueError,
        r"out_axis=2 is out of range for params\['fc1.weight'\]",
    ),
}


@pytest.mark.parametrize("case", list(SELECT_CASES))
def test_selection_errors_in_init_and_apply(case: str) -> None:
    transform, make_params, error, pattern = SELECT_CASES[case]
    params = make_params()
    before = _snapshot(params)
    with pytest.raises(error, match=pattern):
        transform.init(params)
    with pytest.raises(error, match=pattern):
        transform.apply(params, None)
    with pytest.raises(error, match=pattern):
        transform.add_gains(params)
    _assert_unchanged(params, before)


def test_bad_configuration() -> None:
    with pytest.raises(TypeError, match="order must be a non-negative int"):
        AON(order=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="n_power_iterations must be a non-negative int"):
        AON(n_power_iterations=-1)
    with pytest.raises(ValueError, match=r"eps must be a positive float in \(0, 0.001\]"):
        AON(eps=0.0)
    with pytest.raises(TypeError, match="include must be None, a regular expression"):
        AON(include=3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="gain must be a positive float or None"):
        AON(gain="2")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"compute_dtype must be a floating torch\.dtype"):
        AON(compute_dtype=torch.int32)
    with pytest.raises(TypeError):
        AON(2)  # type: ignore[misc]  # options are keyword-only


def test_good_calls_change_nothing_either() -> None:
    params = AON_.add_gains(_params())
    params = {k: v.requires_grad_() if v.is_floating_point() else v for k, v in params.items()}
    state = _state()
    before = _snapshot(params), _snapshot(state)
    for training in (True, False):
        weights, _ = AON_.apply(params, state, training=training)
        sum(w.sum() for w in weights.values() if w.is_floating_point()).backward()  # type: ignore[union-attr]
    AON_.apply(params, None)
    AON_.init(params)
    _assert_unchanged(params, before[0])
    _assert_unchanged(state, before[1])
    assert all(params[gain_key(n)].grad is not None for n in ("fc1.weight", "fc2.weight"))


def _snapshot(d: object) -> dict:
    """Each entry's object and a copy of its value (the caller's dict or list)."""
    items = d.items() if isinstance(d, dict) else enumerate(d) if isinstance(d, list) else ()
    return {k: (v, v.detach().clone() if isinstance(v, torch.Tensor) else v) for k, v in items}


def _assert_unchanged(d: object, snap: dict) -> None:
    """Same keys, same objects, same values (meta tensors have no values)."""
    now = _snapshot(d)
    assert now.keys() == snap.keys()
    for k, (obj, value) in snap.items():
        assert now[k][0] is obj, k
        if isinstance(value, torch.Tensor) and value.device.type != "meta":
            assert torch.equal(now[k][1], value), k
        elif not isinstance(value, torch.Tensor):
            assert now[k][1] == value, k


def test_float16_compute_dtype_is_refused_at_construction() -> None:
    # float16's range is too narrow for the eps clamp: refused before any apply.
    with pytest.raises(TypeError, match=r"compute_dtype=torch\.float16 is not supported"):
        AON(compute_dtype=torch.float16)


def test_an_include_name_that_a_tie_hides_gets_a_hint() -> None:
    emb, head = nn.Embedding(10, 4), nn.Linear(4, 10, bias=False)
    head.weight = emb.weight  # tied: named_parameters() reports it once, as emb.weight
    model = nn.ModuleDict({"emb": emb, "head": head})
    params = dict(model.named_parameters())
    with pytest.raises(ValueError, match=r"\['head.weight'\] are not in params.*tied weight"):
        AON(include={"head.weight"}).apply(params)


def test_generator_and_module_types_are_checked_at_the_boundary() -> None:
    params = {"a.weight": torch.randn(3, 4)}
    for tr in (AON(), ONI()):
        with pytest.raises(TypeError, match=r"generator must be a torch.Generator or None, got 3"):
            tr.init(params, generator=3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"module must be a torch.nn.Module, got dict"):
        AON.for_module(params)  # type: ignore[arg-type]
