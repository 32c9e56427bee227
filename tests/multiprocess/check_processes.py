"""The sharded losses and the training on a mesh that spans processes, checked from inside.

Not collected by pytest: ``tests/test_multiprocess.py`` runs it as 2 processes x 4 virtual
CPU devices through ``experiments/launch.py``, which appends the process flags (it also runs
as 1 process x 8 devices without them). By hand::

    python experiments/launch.py --processes 2 --devices-per-process 4 -- \\
        tests/multiprocess/check_processes.py --out /tmp/two

In a run of several processes it first checks ``sharded_cross_entropy`` and
``sharded_linear_cross_entropy``, with the vocabulary split across the processes (a mesh of
``Auto`` axes) and with the batch split across them (``Explicit`` axes, an uneven vocabulary),
against one device: values and gradients (each process compares the gradient blocks it holds);
a mismatch fails the process. Then, in every run, it trains the
spiral case of ``TRAINING`` with ``jaxsoftmax.train`` and process 0 writes the final
parameters and history to ``OUT/<case>.npz``, which the test compares across runs. With
``--then-train-until-killed FLAGS`` it goes on to ``tests/multiprocess/train_until_killed.py``
(``experiments/train.py``, one of whose processes kills itself) in the same processes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:0] = [ROOT, os.path.join(ROOT, "experiments")]
import processes  # noqa: E402  (experiments/processes.py: the process flags)

# The cases the test compares; experiments/train.py's flags for "minibatch" are
# tests/test_multiprocess.py's TRAIN_FLAGS (its killed run resumes to these parameters).
TRAINING = {
    "full_batch": {"hidden": (16,), "steps": 40, "eval_every": 20, "checkpoint_every": 20},
    "minibatch": {
        "hidden": (16,),
        "optimizer": "momentum",
        "learning_rate": 0.1,
        "batch_size": 20,  # 24 rows on 8 devices, 4 of them masked padding
        "steps": 40,
        "eval_every": 10,
        "checkpoint_every": 20,
    },
}
NUM_EXAMPLES = 30  # points per class: 90 training points, padded to 96 on 8 devices


def check_losses() -> int:
    """Both sharded losses on two meshes over the 2 x 4 devices, against one device."""
    import contextlib

    import jax
    import numpy as np
    from jax.sharding import AxisType, Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from jaxsoftmax import (
        cross_entropy,
        linear_cross_entropy,
        sharded_cross_entropy,
        sharded_linear_cross_entropy,
    )

    assert jax.process_count() == 2 and jax.local_device_count() == 4
    # Rows of the grid are processes: jax.devices() lists process 0's devices first.
    grid = np.array(jax.devices()).reshape(2, 4)
    assert [device.process_index for device in grid[:, 0]] == [0, 1]
    layouts = {
        # "vocab": 2 entries, one per process; "batch": the 4 devices of a process. Auto axes.
        "vocabulary across processes": Mesh(grid.T, ("batch", "vocab")),
        # "batch": one entry per process; 18 classes over the 4 devices of a process, padded
        # to 20. Explicit axes (jax.make_mesh's default), under jax.set_mesh.
        "batch across processes": Mesh(grid, ("batch", "vocab"), (AxisType.Explicit,) * 2),
    }
    rng = np.random.default_rng(0)
    n, v, d = 8, 18, 4
    logits = (3 * rng.normal(size=(n, v))).astype(np.float32)
    labels = rng.integers(0, v, n).astype(np.int32)
    labels[5] = -100
    hidden = rng.normal(size=(n, d)).astype(np.float32)
    classifier = rng.normal(size=(v, d)).astype(np.float32)
    bias = rng.normal(size=(v,)).astype(np.float32)
    # The options whose backward communicates (class weights with smoothing), and a skipped row.
    options = {
        "ignore_index": -100,
        "label_smoothing": 0.1,
        "class_weights": rng.uniform(0.5, 2.0, v).astype(np.float32),
        "z_loss": 1e-3,
    }

    def value_and_grads(plain, fused, labels, logits, hidden, classifier, bias):
        """Both losses and their gradients in their arrays (not the labels), compiled as one
        program (a global array may be an argument of a compiled function, not a constant):
        a dict of (value, gradients) by the sharded loss's name."""

        def both(y, z, h, w, b):
            return {
                "sharded_cross_entropy": jax.value_and_grad(plain, argnums=(1,))(y, z),
                "sharded_linear_cross_entropy": jax.value_and_grad(fused, argnums=(1, 2, 3))(
                    y, h, w, b
                ),
            }

        return jax.jit(both)(labels, logits, hidden, classifier, bias)

    device = jax.local_devices()[0]  # this process's: no other process takes part
    expected = value_and_grads(
        lambda y, z: cross_entropy(z, y, **options),
        lambda y, h, w, b: linear_cross_entropy(h, w, y, bias=b, **options),
        *jax.device_put((labels, logits, hidden, classifier, bias), device),
    )
    checks = 0
    for layout, mesh in layouts.items():
        explicit = mesh.axis_types[0] == AxisType.Explicit
        vocab = "vocab" if v % mesh.shape["vocab"] == 0 else None  # uneven: the loss pads

        def place(array, *spec):
            sharding = NamedSharding(mesh, P(*spec))
            return jax.make_array_from_callback(array.shape, sharding, lambda i: array[i])

        z, y = place(logits, "batch", vocab), place(labels, "batch")
        h, w, b = place(hidden, "batch", None), place(classifier, vocab, None), place(bias, vocab)
        axes = {"mesh": mesh, "class_axis_name": "vocab", "batch_axis_name": "batch"}
        with jax.set_mesh(mesh) if explicit else contextlib.nullcontext():
            got = value_and_grads(
                lambda y, z: sharded_cross_entropy(z, y, **axes, **options),
                lambda y, h, w, b: sharded_linear_cross_entropy(h, w, y, bias=b, **axes, **options),
                y,
                z,
                h,
                w,
                b,
            )
        for loss, (value, grads) in got.items():
            value_1, grads_1 = expected[loss]
            what = f"{loss}, {layout}"
            np.testing.assert_allclose(float(value), float(value_1), rtol=2e-6, err_msg=what)
            for argument, grad, grad_1 in zip(("first", "second", "third"), grads, grads_1):
                assert grad.shape == grad_1.shape, (what, argument, grad.shape, grad_1.shape)
                for block in grad.addressable_shards:  # those this process holds
                    np.testing.assert_allclose(
                        np.asarray(block.data),
                        np.asarray(grad_1)[block.index],
                        rtol=2e-5,
                        atol=2e-7,
                        err_msg=f"{what}: gradient of the {argument} argument at {block.index}",
                    )
            checks += 1
    return checks


def listening_addresses() -> list[str]:
    """The addresses of this process's listening TCP sockets (Linux: from /proc)."""
    import ipaddress

    inodes = set()
    for descriptor in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{descriptor}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    addresses = []
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        with open(table) as lines:
            for line in list(lines)[1:]:
                fields = line.split()
                local, state, inode = fields[1], fields[3], fields[9]
                if state != "0A" or inode not in inodes:  # 0A: LISTEN
                    continue
                hex_address, port = local.split(":")
                words = [
                    bytes.fromhex(hex_address[i : i + 8])[::-1]
                    for i in range(0, len(hex_address), 8)
                ]
                address = ipaddress.ip_address(b"".join(words))
                if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
                    address = address.ipv4_mapped
                addresses.append(f"{address}:{int(port, 16)}")
    return addresses


def train_cases(out: str) -> None:
    import jax
    import numpy as np

    from jaxsoftmax import data, training

    spiral = data.load("spiral", num_examples=NUM_EXAMPLES)
    for case, options in TRAINING.items():
        result = training.train(training.TrainConfig(**options), spiral)
        assert result.devices == 8 and result.processes == jax.process_count()
        if jax.process_index() == 0:
            leaves = {
                f"leaf_{i}": np.asarray(leaf)
                for i, leaf in enumerate(jax.tree_util.tree_leaves(result.params))
            }
            history = np.asarray(json.dumps(result.history))
            np.savez(os.path.join(out, f"{case}.npz"), **leaves, history=history)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for OUT/<case>.npz")
    parser.add_argument(
        "--then-train-until-killed",
        metavar="FLAGS",
        help="then run tests/multiprocess/train_until_killed.py FLAGS in these processes, "
        "already joined (FLAGS: its flags and train.py's, without the process flags; "
        "the heartbeat's --peer-timeout is this script's)",
    )
    processes.add_flags(parser)
    arguments = parser.parse_args()
    several = processes.initialize(parser, arguments)
    import jax

    jax.config.update("jax_numpy_rank_promotion", "raise")
    jax.config.update("jax_numpy_dtype_promotion", "strict")
    assert jax.device_count() == 8, jax.devices()
    if several:
        print(f"process {jax.process_index()}: {check_losses()} loss checks passed", flush=True)
        if os.path.isdir("/proc/self/net"):  # the coordinator's and gloo's sockets, by now
            addresses = listening_addresses()
            outside = [a for a in addresses if not a.startswith(("127.", "::1"))]
            assert addresses and not outside, f"listening beyond the loopback: {addresses}"
            print(f"process {jax.process_index()}: listening on {', '.join(addresses)}", flush=True)
    train_cases(arguments.out)
    print(f"process {jax.process_index()}: trained {', '.join(TRAINING)}", flush=True)
    if arguments.then_train_until_killed:
        # The killed run of tests/test_multiprocess.py in the processes this run started: a
        # launch of its own would start and join two more Python processes to do the same.
        import shlex

        import train_until_killed  # this script's folder is on sys.path

        sys.argv = [train_until_killed.__file__, *shlex.split(arguments.then_train_until_killed)]
        return train_until_killed.main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
