"""Reading collectives out of HLO text, in both ways XLA prints their device groups.

The sharded-loss checks (``tests/multidevice``) count which collectives a compiled program
runs and over which mesh axis; they rely on this reader. XLA up to JAX 0.10 lists the groups
(``replica_groups={{0,1},{2,3}}``); the XLA of JAX 0.12 names the mesh and the reduced axes
(``replica_groups=mesh['batch'=2,'vocab'=4] {'vocab'}``). Each line below is in the form the
compiler printed for a 2 x 4 mesh of devices 0-7 laid out row by row.
"""

import importlib.util
import os

import numpy as np
import pytest


def load_reader():
    path = os.path.join(os.path.dirname(__file__), "..", "experiments", "hlo_collectives.py")
    spec = importlib.util.spec_from_file_location("hlo_collectives", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def groups_over(axis: int):
    """Device groups of a 2 x 4 row-major mesh reduced over ``axis``, built independently."""
    ids = np.arange(8).reshape(2, 4)
    lines = ids if axis == 1 else ids.T
    return {frozenset(int(d) for d in line) for line in lines}


LISTED = "%a = f32[16]{0} all-reduce(f32[16]{0} %x), replica_groups={{0,1,2,3},{4,5,6,7}}, "
NAMED = "%b = (f32[16]{0}, f32[]) all-reduce(%x, %y), channel_id=1, replica_groups=mesh["
NAMED_VOCAB = NAMED + "'batch'=2,'vocab'=4] {'vocab'}, use_global_device_ids=true"
NAMED_BATCH = NAMED + "'batch'=2,'vocab'=4] {'batch'}, use_global_device_ids=true"


@pytest.mark.parametrize(
    "line, axis, shapes",
    [
        (LISTED, 1, [("f32", (16,))]),
        (NAMED_VOCAB, 1, [("f32", (16,)), ("f32", ())]),
        (NAMED_BATCH, 0, [("f32", (16,)), ("f32", ())]),
    ],
    ids=["listed", "named-vocab", "named-batch"],
)
def test_device_groups_in_either_form(line, axis, shapes):
    ((op, found_shapes, groups),) = load_reader().collectives_with_groups(line)
    assert (op, found_shapes) == ("all-reduce", shapes)
    assert groups == groups_over(axis)


def test_groups_of_one_device_move_nothing():
    reader = load_reader()
    one = "%c = f32[] all-reduce(%x), replica_groups=mesh['batch'=1,'vocab'=4] {'batch'}, use"
    assert reader.collectives_with_groups(one) == []
    assert (
        reader.collectives_with_groups("%d = f32[] all-reduce(%x), replica_groups={{0},{1}}") == []
    )
    two = "%e = f32[] all-reduce(%x), replica_groups=mesh['batch'=2,'vocab'=4] {'batch'}, use"
    assert len(reader.collectives_with_groups(two)) == 1
