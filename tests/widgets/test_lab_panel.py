"""LoRA lab: its numbers are the core's (pair_flops, the planner, saved_tensors_hooks); the view shows them."""

from __future__ import annotations

import pytest
from panel_helpers import all_widgets, wait_until

from runlora_nb.core.chains import BACKWARD, FORWARD, Needs, pair_flops, pair_temp_bytes, valid_pairs
from runlora_nb.measure import layer_saved_tensors
from runlora_nb.widgets import LabController, LoRALab
from runlora_nb.widgets.lab import ALL_PAIRS, GRID_RANKS, GRID_TOKENS
from runlora_nb.widgets.lab_view import BARS, HEATMAP, HERE


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("x_needs_grad", [True, False])
def test_pair_flops_are_the_cores(dropout, x_needs_grad):
    ctl = LabController(
        tokens=512, in_features=576, out_features=1536, rank=8, dropout=dropout, x_needs_grad=x_needs_grad
    )
    df = ctl.pairs()
    needs = Needs(x_needs_grad, True, True)
    assert list(df["pair"]) == ["+".join(p) for p in valid_pairs(dropout)]
    for row in df.itertuples():
        assert row.flops == pair_flops(row.fwd, row.bwd, 512, 576, 1536, 8, needs)
        assert row.fwd_formula == FORWARD[row.fwd].formula and row.bwd_formula == BACKWARD[row.bwd].formula
    chosen = df[df["chosen"]]
    assert len(chosen) == 1
    assert chosen["flops"].iloc[0] == df["flops"].min()
    e = ctl.explain()
    assert e["pair"] == chosen["pair"].iloc[0] and "FLOPs" in e["reason"]


def test_winner_map_is_the_fewest_flop_pair_everywhere():
    ctl = LabController(in_features=256, out_features=4096, dropout=0.0, x_needs_grad=False)
    wmap = ctl.winner_map()
    assert wmap.tokens == GRID_TOKENS and wmap.ranks == GRID_RANKS
    assert wmap.index.shape == (len(GRID_RANKS), len(GRID_TOKENS))
    needs = Needs(False, True, True)
    for row, r in enumerate(GRID_RANKS):
        for col, n in enumerate(GRID_TOKENS):
            best = min(
                valid_pairs(0.0),
                key=lambda p, n=n, r=r: (
                    pair_flops(*p, n, 256, 4096, r, needs),
                    pair_temp_bytes(*p, n, 256, 4096, r, needs),
                ),
            )
            assert wmap.names[row][col] == "+".join(best)
            assert wmap.pairs[wmap.index[row, col]] == "+".join(best)
    assert len(set(wmap.pairs)) > 1  # this shape has more than one winner over the grid


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("x_needs_grad", [True, False])
def test_saved_tensors_scale_to_the_real_recording(dropout, x_needs_grad):
    n, i, o, r = 48, 24, 40, 6  # distinct sizes: record directly at this shape and compare
    ctl = LabController(
        tokens=n, in_features=i, out_features=o, rank=r, dropout=dropout, x_needs_grad=x_needs_grad
    )
    got = ctl.saved_tensors()
    real = layer_saved_tensors(n, i, o, r, dropout=dropout, x_requires_grad=x_needs_grad)
    assert list(got["tensor"]) == list(real["tensor"])
    assert list(got["bytes"]) == list(real["bytes"])
    sym = {"N": n, "i": i, "o": o, "r": r}
    for shape, real_shape in zip(got["shape"], real["shape"]):
        assert tuple(sym[d] for d in shape.split("×")) == tuple(real_shape)
    totals = ctl.saved_totals()
    assert totals["runlora"] == n * i * 4  # runlora_nb keeps X only
    assert totals["peft"] > totals["runlora"]
    # with dropout PEFT keeps the dropped copy D(X) for dA, and its dropout mask too when X needs a gradient
    names = set(got["tensor"])
    assert ("dropped copy D(X)" in names) == bool(dropout)
    assert ("dropout mask" in names) == bool(dropout and x_needs_grad)


def test_settings_are_validated():
    ctl = LabController()
    with pytest.raises(ValueError):
        ctl.set(rank=0)
    with pytest.raises(ValueError):
        ctl.set(dropout=1.5)


def test_view_sliders_update_the_figure_and_texts():
    view = LoRALab()
    assert view.task.join(60)
    view._redraw.flush()
    view.tokens.value = 256
    view.in_features.value = 576
    view.out_features.value = 1536
    view.rank.value = 8
    view.x_needs_grad.value = False
    view._redraw.flush()
    needs = Needs(False, True, True)
    bars = view.figure.data[BARS]
    assert list(bars.x) == ["+".join(p) for p in valid_pairs(0.0)]
    assert list(bars.y) == [pair_flops(*p, 256, 576, 1536, 8, needs) / 1e9 for p in valid_pairs(0.0)]
    chosen = view.controller.explain()["pair"]
    assert bars.marker.color[list(bars.x).index(chosen)] == "#2e7d32"
    assert chosen in view.formula.value and "Y = " in view.formula.value
    heat = view.figure.data[HEATMAP]
    assert len(heat.z) == len(GRID_RANKS) and len(heat.z[0]) == len(GRID_TOKENS)
    wmap = view.controller.winner_map()
    assert [list(r) for r in heat.z] == [[ALL_PAIRS.index(p) for p in row] for row in wmap.names]
    assert view.figure.data[HERE].x == ("256",) and view.figure.data[HERE].y == ("8",)
    assert "XA = X·A" in view.peft_table.value and "N×i" in view.runlora_table.value
    view.dropout.value = 0.2
    view._redraw.flush()
    assert len(view.figure.data[BARS].x) == len(list(valid_pairs(0.2)))
    assert "dropped copy D(X)" in view.peft_table.value  # for dA, whether or not X needs a gradient
    assert "dropout mask" not in view.peft_table.value  # X needs no grad: no backward through the dropout
    view.x_needs_grad.value = True
    view._redraw.flush()
    assert "dropout mask" in view.peft_table.value
    assert view.errors.messages == []
    view.close()


def test_view_redraws_are_throttled():
    view = LoRALab()
    assert view.task.join(60)
    runs_before = view._redraw.runs
    for k, n in enumerate([16, 32, 64, 128, 256, 512, 1024, 2048] * 5):
        view.tokens.value = n
        view.rank.value = [1, 2, 4, 8][k % 4]
    assert view._redraw.runs - runs_before <= 2  # one now, one trailing
    assert wait_until(lambda: not view._redraw.pending, 30)  # generous: a loaded machine draws slowly
    assert view.figure.data[HERE].x == ("2048",)
    view.close()


def test_view_error_in_a_callback_lands_in_the_error_area_and_close():
    view = LoRALab()

    def broken(**changes):
        raise RuntimeError("lab broke")

    view.controller.set = broken
    view.rank.value = 64
    assert "lab broke" in view.errors.text
    tree = all_widgets(view)
    view.close()
    assert all(w.comm is None for w in tree)
