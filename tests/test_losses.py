"""Tests for jkd.losses: parity with the reference losses, gradients, dtypes,
transformations and import hygiene."""
import functools
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
from jax.test_util import check_grads
import numpy as np
import pytest

from jkd import losses
import reference_losses as ref  # tests/ is on sys.path under pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _nchw(x):
  return np.transpose(np.asarray(x), (0, 3, 1, 2))


def _logits(rng, shape, scale=3.0):
  return (rng.normal(size=shape) * scale).astype(np.float32)


def _normal(rng, shape):
  return rng.normal(size=shape).astype(np.float32)


# Each case: make(rng) -> (args, kwargs, reference value). args[0] is the
# student input and args[1] the teacher input (pytrees allowed).
def _kd(shape, temperature):
  def make(rng):
    s, t = _logits(rng, shape), _logits(rng, shape)
    return (s, t), dict(temperature=temperature), ref.kd(s, t, temperature)
  return losses.kd, make


def _dkd(shape, temperature, alpha=1.0, beta=8.0):
  def make(rng):
    s, t = _logits(rng, shape), _logits(rng, shape)
    y = rng.integers(0, shape[1], size=shape[0])
    kw = dict(alpha=alpha, beta=beta, temperature=temperature)
    return (s, t, y), kw, ref.dkd(s, t, y, alpha, beta, temperature)
  return losses.dkd, make


def _dist(shape, temperature, beta=1.0, gamma=1.0):
  def make(rng):
    s, t = _logits(rng, shape), _logits(rng, shape)
    kw = dict(beta=beta, gamma=gamma, temperature=temperature)
    return (s, t), kw, ref.dist(s, t, beta, gamma, temperature)
  return losses.dist, make


def _kd_std(shape, temperature):
  def make(rng):
    s, t = _logits(rng, shape), _logits(rng, shape) + 2.0
    kw = dict(temperature=temperature)
    return (s, t), kw, ref.kd_logit_std(s, t, temperature)
  return losses.kd_logit_std, make


def _deit_hard(shape):
  def make(rng):
    s, t = _logits(rng, shape), _logits(rng, shape)
    return (s, t), {}, ref.deit_hard(s, t)
  return losses.deit_hard, make


def _deit_soft(shape, temperature):
  def make(rng):
    s, t = _logits(rng, shape), _logits(rng, shape)
    kw = dict(temperature=temperature)
    return (s, t), kw, ref.deit_soft(s, t, temperature)
  return losses.deit_soft, make


def _fitnet(shape):
  def make(rng):
    s, t = _normal(rng, shape), _normal(rng, shape)
    return (s, t), {}, ref.fitnet(s, t)
  return losses.fitnet, make


def _at(s_shapes, t_shapes, mode, p=2):
  def make(rng):
    s = [_normal(rng, sh) for sh in s_shapes]
    t = [_normal(rng, sh) for sh in t_shapes]
    s_nchw, t_nchw = [_nchw(x) for x in s], [_nchw(x) for x in t]
    if mode == "code":
      want = ref.at_code(s_nchw, t_nchw, p)
    else:
      want = ref.at_paper(s_nchw, t_nchw)
    return (s, t), dict(p=p, mode=mode), want
  return losses.attention_transfer, make


def _rkd(s_shape, t_shape):
  def make(rng):
    s, t = _normal(rng, s_shape), _normal(rng, t_shape)
    return (s, t), {}, ref.rkd(s, t)
  return losses.rkd, make


def _pkt(s_shape, t_shape):
  def make(rng):
    s, t = _normal(rng, s_shape), _normal(rng, t_shape)
    return (s, t), {}, ref.pkt(s, t)
  return losses.pkt, make


def _sp(s_shape, t_shape):
  def make(rng):
    s, t = _normal(rng, s_shape), _normal(rng, t_shape)
    return (s, t), {}, ref.sp(_nchw(s), _nchw(t))
  return losses.similarity_preserving, make


def _simmim(shape, patch, pixel_level):
  def make(rng):
    b, h, w, _ = shape
    pred, img = _normal(rng, shape), _normal(rng, shape)
    mask = (rng.random((b, h // patch, w // patch)) < 0.6).astype(np.float32)
    want = ref.simmim(_nchw(img), _nchw(pred), mask, patch)
    if pixel_level:
      mask = mask.repeat(patch, 1).repeat(patch, 2)[..., None]
    return (pred, img, mask), {}, want
  return losses.simmim_l1, make


def _mae(shape, norm_pix):
  def make(rng):
    pred, tgt = _normal(rng, shape), _normal(rng, shape) * 2 + 0.5
    mask = (rng.random(shape[:2]) < 0.75).astype(np.float32)
    mask[:, 0] = 1.0
    want = ref.mae(tgt, pred, mask, norm_pix)
    return (pred, tgt, mask), dict(norm_pix=norm_pix), want
  return losses.mae_mse, make


def _mfd(shape, kind, normalize_target=True):
  def make(rng):
    s, t = _normal(rng, shape), _normal(rng, shape) * 3 + 1
    mask = (rng.random(shape[:2]) < 0.5).astype(np.float32)
    kw = dict(kind=kind, normalize_target=normalize_target)
    want = ref.masked_feature(s, t, mask, kind, normalize_target)
    return (s, t, mask), kw, want
  return losses.masked_feature_distill, make


def _tinymim(s_shape, t_shape):
  def make(rng):
    s = tuple(_normal(rng, s_shape) for _ in range(3))
    t = tuple(_normal(rng, t_shape) for _ in range(3))
    return (s, t), {}, ref.tinymim(s, t)
  return losses.tinymim_relation, make


def _hcl(shapes):
  def make(rng):
    s = [_normal(rng, sh) for sh in shapes]
    t = [_normal(rng, sh) for sh in shapes]
    return (s, t), {}, ref.hcl([_nchw(x) for x in s], [_nchw(x) for x in t])
  return losses.hcl, make


def _ofa(shape, eps, temperature=1.0):
  def make(rng):
    s, t = _logits(rng, shape), _logits(rng, shape)
    y = rng.integers(0, shape[1], size=shape[0])
    kw = dict(eps=eps, temperature=temperature)
    return (s, t, y), kw, ref.ofa(s, t, y, eps, temperature)
  return losses.ofa, make


CASES = {
    "kd_small": _kd((8, 10), 4.0),
    "kd_imagenet": _kd((6, 1000), 1.0),
    "dkd_small": _dkd((8, 10), 4.0),
    "dkd_large": _dkd((6, 1000), 1.0, alpha=0.5, beta=2.0),
    "dist_t1": _dist((16, 10), 1.0),
    "dist_t4": _dist((8, 100), 4.0, beta=2.0, gamma=0.5),
    "kd_logit_std": _kd_std((8, 100), 2.0),
    "deit_hard": _deit_hard((8, 100)),
    "deit_soft": _deit_soft((8, 100), 3.0),
    "fitnet": _fitnet((4, 7, 7, 16)),
    "at_code": _at([(4, 8, 8, 16), (4, 16, 16, 8)],
                   [(4, 8, 8, 32), (4, 8, 8, 24)], "code"),
    "at_code_odd_pool": _at([(3, 7, 7, 4)], [(3, 5, 5, 6)], "code"),
    "at_code_p4": _at([(3, 6, 6, 4)], [(3, 6, 6, 8)], "code", p=4),
    "at_paper": _at([(4, 8, 8, 16), (4, 4, 4, 8)],
                    [(4, 8, 8, 32), (4, 8, 8, 24)], "paper"),
    "rkd": _rkd((12, 32), (12, 64)),
    "pkt": _pkt((16, 32), (16, 64)),
    "sp": _sp((8, 4, 4, 16), (8, 2, 2, 32)),
    "simmim_patch_mask": _simmim((2, 32, 32, 3), 4, pixel_level=False),
    "simmim_pixel_mask": _simmim((2, 16, 24, 3), 8, pixel_level=True),
    "mae_norm_pix": _mae((4, 16, 48), True),
    "mae_raw": _mae((3, 9, 12), False),
    "mfd_smooth_l1": _mfd((4, 16, 32), "smooth_l1"),
    "mfd_cosine": _mfd((4, 16, 32), "cosine"),
    "mfd_raw_target": _mfd((2, 8, 16), "smooth_l1", normalize_target=False),
    "tinymim": _tinymim((2, 3, 10, 8), (2, 3, 10, 16)),
    # ReviewKD: 8x8 (levels 4, 2, 1), 4x4 (2, 1), 1x1 (none: the pooled feature), 7x7 (odd).
    "hcl": _hcl([(3, 8, 8, 16), (3, 4, 4, 8), (3, 1, 1, 32), (3, 7, 7, 4)]),
    "ofa_eps1": _ofa((8, 10), 1.0),
    "ofa_eps1.5_t2": _ofa((6, 100), 1.5, temperature=2.0),
}
NAMES = sorted(CASES)
# One case per public function, for the checks that do not depend on shapes.
PRIMARY = ["kd_small", "dkd_small", "dist_t4", "kd_logit_std", "deit_hard",
           "deit_soft", "fitnet", "at_code", "at_paper", "rkd", "pkt", "sp",
           "simmim_patch_mask", "mae_norm_pix", "mfd_smooth_l1", "mfd_cosine",
           "tinymim", "hcl", "ofa_eps1.5_t2"]


def _case(name, seed=0):
  fn, make = CASES[name]
  args, kwargs, want = make(np.random.default_rng(seed))
  return fn, args, kwargs, want


def _to_jnp(tree, dtype=None):
  def conv(x):
    x = np.asarray(x)
    if dtype is not None and np.issubdtype(x.dtype, np.floating):
      return jnp.asarray(x, dtype)
    return jnp.asarray(x)
  return jax.tree.map(conv, tree)


def _jit(fn, kwargs):
  return jax.jit(functools.partial(fn, **kwargs))


# ---------------------------------------------------------------------------
# Value parity with the float64 numpy references, gradients, dtypes (jitted)
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_parity_fp32_and_teacher_gradient_is_zero(name):
  fn, args, kwargs, want = _case(name)
  value_and_grad = jax.jit(jax.value_and_grad(
      functools.partial(fn, **kwargs), argnums=(0, 1)))
  got, (student_grad, teacher_grad) = value_and_grad(*_to_jnp(args))
  assert got.shape == () and got.dtype == jnp.float32
  np.testing.assert_allclose(float(got), want, rtol=1e-5, atol=1e-7)
  for leaf in jax.tree.leaves(teacher_grad):
    assert not np.any(np.asarray(leaf)), "teacher gradient is not zero"
  student_grad = jax.tree.leaves(student_grad)
  assert all(np.all(np.isfinite(g)) for g in student_grad)
  assert any(np.any(np.asarray(g)) for g in student_grad)


@pytest.mark.parametrize("name", PRIMARY)
def test_bf16_inputs_finite_and_close_to_fp32(name):
  """bf16 inputs are computed in fp32 inside and returned as fp32."""
  fn, args, kwargs, want = _case(name)
  got = _jit(fn, kwargs)(*_to_jnp(args, jnp.bfloat16))
  assert got.dtype == jnp.float32
  assert np.isfinite(float(got))
  np.testing.assert_allclose(float(got), want, rtol=5e-2, atol=1e-3)


# Numerical gradient checks (float64, reverse mode, first order).
GRAD_CASES = ["kd_small", "dkd_small", "dist_t4", "kd_logit_std", "at_paper",
              "rkd", "pkt", "sp", "mae_norm_pix", "mfd_cosine", "tinymim", "hcl",
              "ofa_eps1.5_t2"]


@pytest.mark.parametrize("name", PRIMARY)
def test_parity_fp64_and_check_grads(name):
  fn, args, kwargs, want = _case(name, seed=1)
  with jax.enable_x64(True):
    args = _to_jnp(args, jnp.float64)
    rest = args[1:]
    loss = jax.jit(lambda s: fn(s, *rest, **kwargs))
    got = loss(args[0])
    assert got.dtype == jnp.float64
    np.testing.assert_allclose(float(got), want, rtol=1e-10, atol=1e-13)
    if name in GRAD_CASES:
      check_grads(loss, (args[0],), order=1, modes=["rev"], atol=1e-5,
                  rtol=1e-5)


# ---------------------------------------------------------------------------
# Transformations
# ---------------------------------------------------------------------------
VMAP_CASES = ["kd_small", "dkd_small", "dist_t1", "at_code", "rkd", "pkt", "sp",
              "simmim_patch_mask", "mae_norm_pix", "mfd_cosine", "tinymim", "hcl", "ofa_eps1"]


@pytest.mark.parametrize("name", VMAP_CASES)
def test_vmap_over_stacked_batches(name):
  fn = CASES[name][0]
  per = [_case(name, seed)[1:] for seed in (4, 5, 6)]
  kwargs = per[0][1]
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs),
                         *[_to_jnp(args) for args, _, _ in per])
  got = jax.jit(jax.vmap(functools.partial(fn, **kwargs)))(*stacked)
  want = [w for _, _, w in per]
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------
ZERO_WHEN_EQUAL = ["kd_small", "dkd_small", "dist_t4", "kd_logit_std",
                   "deit_soft", "fitnet", "at_code_odd_pool", "at_paper", "rkd",
                   "pkt", "sp", "mfd_raw_target", "mfd_cosine", "tinymim", "hcl"]


@pytest.mark.parametrize("name", ZERO_WHEN_EQUAL)
def test_zero_when_student_equals_teacher(name):
  fn, args, kwargs, _ = _case(name, seed=9)
  args = _to_jnp(args)
  teacher = args[1]
  if name == "mfd_cosine":  # cosine to the LayerNorm-ed teacher
    teacher = jax.nn.standardize(teacher, axis=-1, epsilon=1e-5)
    args = (teacher, args[1], *args[2:])
  else:
    args = (teacher, teacher, *args[2:])
  got = float(_jit(fn, kwargs)(*args))
  assert abs(got) < 1e-5, f"{name}: {got}"


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_dkd_decomposition(temperature):
  """KD = TCKD + (1 - p_target^teacher) * NCKD for every sample."""
  rng = np.random.default_rng(10)
  s, t = _logits(rng, (16, 50)), _logits(rng, (16, 50))
  y = rng.integers(0, 50, size=16)
  with jax.enable_x64(True):
    s, t = jnp.asarray(s, jnp.float64), jnp.asarray(t, jnp.float64)
    p_target = jax.nn.softmax(t / temperature)[jnp.arange(16), y]

    def gap(s_row, t_row, y_row, p_row):
      kd_row = losses.kd(s_row, t_row, temperature)
      dkd_row = losses.dkd(s_row, t_row, y_row, alpha=1.0, beta=1.0 - p_row,
                           temperature=temperature)
      return kd_row - dkd_row

    gaps = jax.jit(jax.vmap(gap))(s, t, jnp.asarray(y), p_target)
    np.testing.assert_allclose(np.asarray(gaps), 0.0, atol=1e-10)
    per_sample = ref.kd_per_sample(np.asarray(s), np.asarray(t), temperature)
    kd_rows = jax.jit(jax.vmap(lambda a, b: losses.kd(a, b, temperature)))(
        s, t)
    np.testing.assert_allclose(np.asarray(kd_rows),
                               per_sample * temperature**2, rtol=1e-10)


def test_dkd_is_finite_where_probabilities_underflow():
  """The reference takes log(1 - p_target) = log(0) here; jkd stays finite."""
  c = 100
  s = jnp.zeros((2, c)).at[:, 3].set(200.0)
  t = jnp.zeros((2, c)).at[:, 3].set(150.0)
  y = jnp.array([3, 3])
  loss = functools.partial(losses.dkd, temperature=1.0)
  value, grad = jax.jit(jax.value_and_grad(loss))(s, t, y)
  assert np.isfinite(float(value))
  assert np.all(np.isfinite(np.asarray(grad)))
  # TCKD analytically: KL of two binary distributions with log p_other =
  # log(c - 1) - margin (margins 150 and 200), NCKD = 0 (uniform others).
  log_pt_other, log_ps_other = np.log(c - 1) - 150.0, np.log(c - 1) - 200.0
  want = np.exp(log_pt_other) * (log_pt_other - log_ps_other)
  np.testing.assert_allclose(float(value), want, rtol=1e-4, atol=1e-30)


def test_kd_with_masked_out_classes():
  """-inf teacher logits (masked classes) contribute 0, not NaN."""
  s = jnp.array([[1.0, 2.0, 3.0]])
  t = jnp.array([[0.5, -jnp.inf, 1.0]])
  value = losses.kd(s, t, 1.0)
  want = losses.kd(s[:, [0, 2]], t[:, [0, 2]], 1.0)
  assert np.isfinite(float(value))
  # The student still spends mass on class 1, so the loss is larger.
  assert float(value) > float(want)


def test_paper_and_code_at_on_different_spatial_sizes_pool_the_larger():
  rng = np.random.default_rng(11)
  s = jnp.asarray(_normal(rng, (2, 16, 16, 4)))
  t = jnp.asarray(_normal(rng, (2, 8, 8, 4)))
  pooled = s.reshape(2, 8, 2, 8, 2, 4).mean(axis=(2, 4))
  for mode in ("code", "paper"):
    np.testing.assert_allclose(
        float(losses.attention_transfer(s, t, mode=mode)),
        float(losses.attention_transfer(pooled, t, mode=mode)), rtol=1e-5)


# ---------------------------------------------------------------------------
# CRD (memory banks) and teacher-free KD: inputs that the generic cases do not fit
# ---------------------------------------------------------------------------
def _crd_inputs(rng, b=6, d=16, n=40, k=9):
  def unit(x):
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)
  stdv = 1.0 / np.sqrt(d / 3)
  banks = [rng.uniform(-stdv, stdv, size=(n, d)).astype(np.float32) for _ in range(2)]
  y = rng.permutation(n)[:b]
  idx = np.concatenate([y[:, None], rng.integers(0, n, size=(b, k))], 1)
  return unit(rng.normal(size=(b, d))), unit(rng.normal(size=(b, d))), *banks, idx, y, n


@pytest.mark.parametrize("z_given", [False, True])
def test_crd_matches_repdistiller_and_banks_are_constants(z_given):
  rng = np.random.default_rng(21)
  f_s, f_t, bank_s, bank_t, idx, _, n = _crd_inputs(rng)
  z = (3.5, 2.5) if z_given else (-1.0, -1.0)
  want, z_s, z_t = ref.crd(f_s, f_t, bank_s, bank_t, idx, 0.07, n, *z)
  if not z_given:  # The first step: Z from this batch's scores (crd_normalizer).
    got_zs = losses.crd_normalizer(losses.crd_scores(f_s, bank_t, idx), n)
    got_zt = losses.crd_normalizer(losses.crd_scores(f_t, bank_s, idx), n)
    np.testing.assert_allclose([float(got_zs), float(got_zt)], [z_s, z_t], rtol=1e-5)
  fn = jax.jit(jax.value_and_grad(functools.partial(losses.crd, num_data=n),
                                  argnums=(0, 1, 2, 3)))
  got, grads = fn(f_s, f_t, bank_s, bank_t, idx, z_s, z_t)
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  assert np.any(np.asarray(grads[0])) and np.any(np.asarray(grads[1]))  # both heads learn
  assert not np.any(np.asarray(grads[2])) and not np.any(np.asarray(grads[3]))
  with jax.enable_x64(True):
    args = _to_jnp((f_s, f_t, bank_s, bank_t), jnp.float64)
    got64 = losses.crd(*args, idx, z_s, z_t, num_data=n)
    assert got64.dtype == jnp.float64
    np.testing.assert_allclose(float(got64), want, rtol=1e-10)
    check_grads(lambda a: losses.crd(a, *args[1:], idx, z_s, z_t, num_data=n), (args[0],),
                order=1, modes=["rev"], atol=1e-5, rtol=1e-5)


def test_crd_memory_update_matches_repdistiller():
  rng = np.random.default_rng(22)
  f_s, _, bank, _, _, y, _ = _crd_inputs(rng)
  want = ref.crd_memory_update(bank, y, f_s, 0.5)
  got = jax.jit(losses.crd_memory_update)(bank, y, f_s, 0.5)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-7)
  untouched = np.setdiff1d(np.arange(len(bank)), y)
  np.testing.assert_array_equal(np.asarray(got)[untouched], bank[untouched])


@pytest.mark.parametrize("correct_prob, temperature", [(0.99, 20.0), (0.9, 40.0), (0.5, 1.0)])
def test_tf_kd_reg_matches_the_authors_code(correct_prob, temperature):
  rng = np.random.default_rng(23)
  s, y = _logits(rng, (8, 100)), rng.integers(0, 100, size=8)
  want = ref.tf_kd_reg(s, y, correct_prob, temperature)
  fn = jax.jit(functools.partial(losses.tf_kd_reg, correct_prob=correct_prob,
                                 temperature=temperature))
  np.testing.assert_allclose(float(fn(s, y)), want, rtol=1e-5)
  with jax.enable_x64(True):
    s64 = jnp.asarray(s, jnp.float64)
    np.testing.assert_allclose(float(fn(s64, y)), want, rtol=1e-10)
    check_grads(lambda a: losses.tf_kd_reg(a, y, correct_prob, temperature), (s64,),
                order=1, modes=["rev"], atol=1e-5, rtol=1e-5)


def test_ofa_at_eps_1_is_cross_entropy_to_the_teacher():
  rng = np.random.default_rng(24)
  s, t = _logits(rng, (5, 10)), _logits(rng, (5, 10))
  y = rng.integers(0, 10, size=5)
  p_t = jax.nn.softmax(t)
  want = -jnp.mean(jnp.sum(p_t * jax.nn.log_softmax(s), -1))
  np.testing.assert_allclose(float(losses.ofa(s, t, y, eps=1.0)), float(want), rtol=1e-6)


def test_bad_arguments_raise():
  x = jnp.zeros((2, 4, 4, 3))
  with pytest.raises(ValueError, match="mode"):
    losses.attention_transfer([x], [x], mode="other")
  with pytest.raises(ValueError, match="kind"):
    losses.masked_feature_distill(x[:, 0], x[:, 0], jnp.ones((2, 4)), kind="l2")
  with pytest.raises(ValueError, match="batch, classes"):
    losses.dist(jnp.zeros((2, 3, 4)), jnp.zeros((2, 3, 4)))
  with pytest.raises(ValueError, match="equal shapes"):
    losses.hcl([x], [jnp.zeros((2, 2, 2, 3))])


# ---------------------------------------------------------------------------
# Import hygiene and sharding (fresh interpreters)
# ---------------------------------------------------------------------------
def _start_python(code, env_extra=None):
  env = dict(os.environ, JAX_PLATFORMS="cpu", **(env_extra or {}))
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, env=env, cwd=REPO)


def _result(proc, timeout=180):
  stdout, stderr = proc.communicate(timeout=timeout)
  assert proc.returncode == 0, stderr
  return json.loads(stdout.strip().splitlines()[-1])


def _run_python(code, env_extra=None):
  return _result(_start_python(code, env_extra))


def test_import_pulls_in_jax_only_and_is_fast():
  result = _run_python("""
      import json, sys, time
      start = time.perf_counter()
      import jax
      after_jax = time.perf_counter()
      import jkd.losses
      end = time.perf_counter()
      heavy = ["flax", "optax", "orbax", "grain", "tensorflow",
               "tensorflow_datasets", "torch", "ml_collections"]
      print(json.dumps({"total": end - start, "own": end - after_jax,
                        "loaded": [m for m in heavy if m in sys.modules]}))
  """)
  print(f"import jkd.losses: {result['total']:.3f} s in all, "
        f"{result['own']:.3f} s on top of jax")
  assert result["loaded"] == []
  assert result["own"] < 1.0
  # Nearly all of this is importing jax; generous for loaded CI machines.
  assert result["total"] < 5.0


_SHARDING_SCRIPT = """
      import functools, json
      import jax, jax.numpy as jnp, numpy as np
      from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
      from jkd import losses
      rng = np.random.default_rng(0)
      b = 8
      def arr(*shape):
        return jnp.asarray(rng.normal(size=shape), jnp.float32)
      def mask(*shape):
        return (arr(*shape) > 0).astype(jnp.float32)
      logits = (arr(b, 16), arr(b, 16))
      cases = {
          "kd": (losses.kd, logits),
          "dkd": (losses.dkd, logits + (jnp.arange(b) % 16,)),
          "dist": (losses.dist, logits),
          "kd_logit_std": (losses.kd_logit_std, logits),
          "deit_hard": (losses.deit_hard, logits),
          "deit_soft": (losses.deit_soft, logits),
          "fitnet": (losses.fitnet, (arr(b, 4, 4, 6), arr(b, 4, 4, 6))),
          "at": (losses.attention_transfer, (arr(b, 8, 8, 6), arr(b, 4, 4, 3))),
          "at_paper": (functools.partial(losses.attention_transfer,
                                         mode="paper"),
                       (arr(b, 8, 8, 6), arr(b, 4, 4, 3))),
          "rkd": (losses.rkd, (arr(b, 16), arr(b, 12))),
          "pkt": (losses.pkt, (arr(b, 16), arr(b, 12))),
          "sp": (losses.similarity_preserving,
                 (arr(b, 4, 4, 6), arr(b, 2, 2, 3))),
          "simmim": (losses.simmim_l1,
                     (arr(b, 8, 8, 3), arr(b, 8, 8, 3), mask(b, 2, 2))),
          "mae": (losses.mae_mse, (arr(b, 4, 12), arr(b, 4, 12), mask(b, 4))),
          "mfd": (losses.masked_feature_distill,
                  (arr(b, 4, 12), arr(b, 4, 12), mask(b, 4))),
          "tinymim": (losses.tinymim_relation,
                      (tuple(arr(b, 2, 5, 4) for _ in range(3)),
                       tuple(arr(b, 2, 5, 8) for _ in range(3)))),
      }
      plain = {name: float(jax.jit(fn)(*args))
               for name, (fn, args) in cases.items()}
      gaps = {}
      # Auto (GSPMD) partitions anything; Explicit is where batch-pair
      # relations (rkd, pkt, sp) need care, so it runs every loss.
      runs = [(AxisType.Auto, ["kd", "rkd", "at", "tinymim"]),
              (AxisType.Explicit, list(cases))]
      for axis_type, names in runs:
        mesh = jax.make_mesh((4,), ("data",), axis_types=(axis_type,))
        batch = NamedSharding(mesh, P("data"))
        for name in names:
          fn, args = cases[name]
          sharded = jax.tree.map(lambda a: jax.device_put(a, batch), args)
          with jax.set_mesh(mesh):
            value, _ = jax.jit(jax.value_and_grad(fn))(*sharded)
          gap = abs(float(value) - plain[name]) / abs(plain[name])
          gaps[f"{axis_type.name}/{name}"] = gap
      print(json.dumps(gaps))
  """


@pytest.fixture(scope="module", autouse=True)
def sharding_subprocess():
  """Starts the multi-device run at once so it overlaps the other tests."""
  proc = _start_python(
      _SHARDING_SCRIPT,
      {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
  yield proc
  if proc.poll() is None:
    proc.kill()
    proc.communicate()


def test_batch_sharded_auto_and_explicit_match_unsharded(sharding_subprocess):
  """Every loss runs jitted on a batch sharded over 4 simulated devices."""
  result = _result(sharding_subprocess)
  assert len(result) == 20
  assert all(gap < 1e-5 for gap in result.values()), result
