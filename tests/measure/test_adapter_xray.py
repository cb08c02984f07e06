"""The LoRA X-ray: singular values from the r×r core agree with a dense SVD; live models and saved folders."""

from __future__ import annotations

import math

import peft
import pytest
import torch

from runlora_nb.assets.zoo import load_model
from runlora_nb.common.numerics import rounding_bound
from runlora_nb.integrations.adapters import save_adapter
from runlora_nb.integrations.inject import apply_runlora, get_peft_model
from runlora_nb.measure.adapter_xray import (
    XRAY_COLUMNS,
    adapter_xray,
    effective_rank,
    saved_adapter_xray,
    svals,
)


def _dense(a: torch.Tensor, b: torch.Tensor, s: float) -> torch.Tensor:
    return torch.linalg.svdvals(s * b.detach().double() @ a.detach().double())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize(("o", "i", "r"), [(48, 32, 4), (20, 64, 8), (6, 5, 8)])
def test_svals_match_a_dense_float64_svd(dtype, o, i, r):
    g = torch.Generator().manual_seed(o * i + r)
    a = torch.randn(r, i, generator=g).to(dtype)
    b = torch.randn(o, r, generator=g).to(dtype)
    got, want = svals(a, b, 0.5), _dense(a, b, 0.5)
    k = min(r, i, o)
    assert got.shape == (k,)
    # both sides are float64 products of the same (exactly cast) factors: the float64 bound applies
    tol = 4 * rounding_bound(torch.float64, max(i, o, r), depth=3) * float(want[0])
    assert torch.allclose(got, want[:k], rtol=0, atol=tol), (got - want[:k]).abs().max()


def test_effective_rank_definition():
    assert effective_rank(torch.tensor([3.0, 0.0, 0.0])) == pytest.approx(1.0)
    assert effective_rank(torch.tensor([2.0, 2.0, 2.0, 2.0])) == pytest.approx(4.0)
    assert 1.0 < effective_rank(torch.tensor([3.0, 1.0])) < 2.0
    assert effective_rank(torch.zeros(4)) == 0.0


def _tiny_runlora(r: int = 4):
    model, tok = load_model("tiny-llama")
    return apply_runlora(model.train(), r=r, alpha=2 * r), tok


def test_zero_initialised_b_gives_zero_norm_and_rank_without_nan():
    model, _ = _tiny_runlora()
    df = adapter_xray(model)
    assert list(df.columns) == list(XRAY_COLUMNS) and len(df) > 0
    assert (df["norm"] == 0).all() and (df["effective_rank"] == 0).all()
    assert not df[["norm", "effective_rank", "scaling"]].isna().any().any()
    assert df["grad_A"].isna().all()  # no backward yet
    assert df["chain"].str.contains("not called yet").all()


def test_live_model_after_a_step_has_grads_plans_and_matches_dense():
    model, _ = _tiny_runlora()
    torch.manual_seed(0)
    for _, p in model.named_parameters():
        if p.requires_grad and p.dim() == 2 and p.shape[1] == 4:  # lora_B (o×r): make the update nonzero
            p.data.normal_()
    ids = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    df = adapter_xray(model).set_index("module")
    assert (df["norm"] > 0).all() and (df["grad_A"] > 0).all() and (df["grad_B"] > 0).all()
    assert df["chain"].str.fullmatch(r"fwd\w*\+bwd\w*").all(), df["chain"].tolist()
    name = df.index[0]
    layer = model.get_submodule(name)
    want = _dense(layer.lora_A.weight, layer.lora_B.weight, layer.scaling)
    assert df.loc[name, "norm"] == pytest.approx(float(want.square().sum().sqrt()), rel=1e-9)
    assert df.loc[name, "svals"][0] == pytest.approx(float(want[0]), rel=1e-9)
    assert 0 < df.loc[name, "effective_rank"] <= layer.r


def test_peft_layers_are_read_with_chain_peft():
    model, _ = load_model("tiny-llama")
    pm = get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False))
    df = adapter_xray(pm)
    assert len(df) > 0 and (df["chain"] == "peft").all()
    assert (df["scaling"] == 2.0).all() and (df["norm"] > 0).all()


def test_saved_folder_gives_the_same_table_without_the_base(tmp_path):
    model, _ = _tiny_runlora()
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_()
    live = adapter_xray(model)
    save_adapter(model, tmp_path / "ad")
    saved = saved_adapter_xray(tmp_path / "ad")
    assert sorted(saved["module"]) == sorted(live["module"])
    merged = live.merge(saved, on="module", suffixes=("", "_saved"))
    assert (merged["norm"] - merged["norm_saved"]).abs().max() <= 1e-9 * merged["norm"].max()
    assert (saved["chain"] == "saved").all() and saved["grad_B"].isna().all()
    assert all(math.isfinite(v) for v in saved["effective_rank"])


def test_saved_folder_errors_are_clear(tmp_path):
    from runlora_nb.integrations.adapter_files import AdapterError

    with pytest.raises(AdapterError, match=r"adapter_config\.json is missing"):
        saved_adapter_xray(tmp_path)
