"""The fitted layout as a value: its plain form and the corrections it records."""

from __future__ import annotations

import pytest

from ekfac_laplace.fitted import PLAIN_VERSION, FittedBlock, FittedLayout

BLOCKS = (
    FittedBlock("0", "weight", "linear", "kronecker", (3, 4), ((3, 3), (4, 4))),
    FittedBlock("0", "bias", "linear", "kronecker", (3,), ((3, 3),)),
    FittedBlock("1", "weight", "layer_norm", "diagonal", (4,)),
)


def test_the_plain_form_round_trips_with_the_corrections():
    layout = FittedLayout(BLOCKS, {"1": 1}).with_corrections({0: 2})
    assert [block.correction for block in layout.blocks] == [2, 0, 0]
    back = FittedLayout.from_plain(layout.plain())
    assert back == layout and back.batch_dims == {"1": 1}
    # with_corrections replaces every block's: what it is not given has none
    assert all(b.correction == 0 for b in back.with_corrections({}).blocks)


def test_a_state_saved_before_the_corrections_reads_as_none():
    version, entries, dims = FittedLayout(BLOCKS).plain()
    old = [version, [entry[:6] for entry in entries], dims]
    assert FittedLayout.from_plain(old) == FittedLayout(BLOCKS)


@pytest.mark.parametrize(
    "edit",
    [
        lambda entries: [[*entries[0], 0], *entries[1:]],  # eight entries
        lambda entries: [[1, *entries[0][1:]], *entries[1:]],  # a name not a string
        lambda entries: [[*entries[0][:6], -1], *entries[1:]],  # a negative count
    ],
)
def test_a_malformed_plain_form_is_refused(edit):
    version, entries, dims = FittedLayout(BLOCKS).plain()
    with pytest.raises(ValueError, match="is not the form that state_dict"):
        FittedLayout.from_plain([version, edit(entries), dims])
    with pytest.raises(ValueError, match="version"):
        FittedLayout.from_plain([PLAIN_VERSION + 1, entries, dims])
