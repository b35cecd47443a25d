"""The loop-free CPU threefry lowering gives the same bits as JAX's rolled one."""

import jax
import jax.numpy as jnp
import numpy as np

from m2u_jax import cpu_prng


def _dropout_program():
    # A fresh function object each time: jit caches by function, so this lowers anew.
    def keep_mask(key, values):
        return jnp.where(jax.random.bernoulli(key, 0.9, values.shape), values / 0.9, 0.0)

    return jax.jit(keep_mask)


def test_unrolled_lowering_gives_identical_bits_without_loops():
    key, values = jax.random.PRNGKey(7), jnp.ones((4, 33, 17))
    rolled = _dropout_program().lower(key, values).compile()
    try:
        assert cpu_prng.install()
        unrolled = _dropout_program().lower(key, values).compile()
    finally:
        assert cpu_prng.install(unrolled=False)
    assert " while(" in rolled.as_text()
    assert " while(" not in unrolled.as_text()
    expected, actual = np.asarray(rolled(key, values)), np.asarray(unrolled(key, values))
    np.testing.assert_array_equal(actual, expected)
    # About 10 % dropped, the rest scaled by 1 / 0.9.
    assert 0.05 < np.mean(actual == 0) < 0.15
    np.testing.assert_allclose(actual[actual != 0], 1 / 0.9, rtol=1e-6)
    # Restored: a new program is rolled again.
    assert " while(" in _dropout_program().lower(key, values).compile().as_text()
