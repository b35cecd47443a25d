"""Tests of m2u_jax.sharding on 8 fake CPU devices (tests/conftest.py sets XLA_FLAGS)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from m2u_jax import config as config_lib
from m2u_jax import default_config, sharding


def test_eight_fake_devices():
    assert jax.device_count() == 8


@pytest.mark.parametrize("fsdp, shape", [(1, {"data": 8, "fsdp": 1}), (2, {"data": 4, "fsdp": 2})])
def test_make_mesh_shapes(fsdp, shape):
    mesh = sharding.make_mesh(fsdp)
    assert dict(mesh.shape) == shape
    assert mesh.devices.size == 8


def test_make_mesh_rejects_non_divisor():
    with pytest.raises(ValueError, match="train.mesh_fsdp=3"):
        sharding.make_mesh(3)


def test_make_mesh_on_a_device_subset():
    mesh = sharding.make_mesh(1, devices=jax.devices()[:1])
    assert dict(mesh.shape) == {"data": 1, "fsdp": 1}


def test_config_mesh_spans_train_mesh_devices():
    config = default_config.get_config()
    assert sharding.config_mesh(config).devices.size == 8  # 0: every device
    config.train.mesh_devices, config.train.mesh_fsdp = 2, 2
    mesh = sharding.config_mesh(config)
    assert dict(mesh.shape) == {"data": 1, "fsdp": 2}
    assert list(mesh.devices.flat) == jax.devices()[:2]
    config.train.mesh_devices = 9
    with pytest.raises(ValueError, match="train.mesh_devices=9: this process sees 8 devices"):
        sharding.config_mesh(config)


def test_validate_checks_batches_against_the_mesh_devices():
    config = default_config.get_config()
    config.train.batch_size, config.eval.batch_size = 6, 6
    with pytest.raises(config_lib.ConfigError, match="batch_size=6 is not divisible by the 8"):
        config_lib.validate(config, num_devices=8)
    config.train.mesh_devices = 2
    config_lib.validate(config, num_devices=8)  # 6 splits over 2 devices
    config.train.mesh_devices = 16
    with pytest.raises(config_lib.ConfigError, match="train.mesh_devices=16: only 8 devices"):
        config_lib.validate(config, num_devices=8)


@pytest.mark.parametrize(
    "shape, fsdp, min_size, expected",
    [
        ((256, 512), 1, 1, P()),  # no fsdp axis: replicated
        ((256, 512), 4, 1, P(None, "fsdp")),  # largest divisible dim
        ((512, 256), 4, 1, P("fsdp", None)),
        ((256, 256), 4, 1, P(None, "fsdp")),  # ties go to the last dim
        ((6, 7, 8), 4, 1, P(None, None, "fsdp")),  # only dim 2 divisible
        ((6, 7), 4, 1, P()),  # nothing divisible
        ((64,), 4, 1000, P()),  # too small to bother
        ((), 4, 1, P()),  # scalars stay replicated
    ],
)
def test_fsdp_partition_spec(shape, fsdp, min_size, expected):
    assert sharding.fsdp_partition_spec(shape, fsdp, min_size) == expected


def test_state_shardings_and_sharded_creation():
    mesh = sharding.make_mesh(2)
    init = lambda: {"kernel": jnp.ones((64, 512)), "bias": jnp.zeros(512), "step": jnp.zeros(())}
    shardings = sharding.state_shardings(jax.eval_shape(init), mesh, min_size=1024)
    assert shardings["kernel"].spec == P(None, "fsdp")
    assert shardings["bias"].spec == P()
    assert shardings["step"].spec == P()
    state = jax.jit(init, out_shardings=shardings)()
    # Each of the 8 devices holds half the kernel's columns (fsdp = 2), the bias whole.
    assert {shard.data.shape for shard in state["kernel"].addressable_shards} == {(64, 256)}
    assert {shard.data.shape for shard in state["bias"].addressable_shards} == {(512,)}
    np.testing.assert_array_equal(np.asarray(state["kernel"]), np.ones((64, 512)))


def test_host_batch_to_global():
    mesh = sharding.make_mesh(2)
    images = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
    batch = sharding.host_batch_to_global(
        {"images": images, "labels": np.arange(16, dtype=np.int32), "paths": np.array(["a"] * 16)},
        mesh,
    )
    assert set(batch) == {"images", "labels"}  # strings cannot go to a device
    assert batch["images"].sharding.spec == P(("data", "fsdp"))
    assert {shard.data.shape for shard in batch["images"].addressable_shards} == {(2, 3)}
    np.testing.assert_array_equal(np.asarray(batch["images"]), images)
    np.testing.assert_array_equal(np.asarray(batch["labels"]), np.arange(16))
