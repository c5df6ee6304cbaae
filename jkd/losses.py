"""Distillation and masked-image-modeling losses as pure JAX functions.

Every loss here is a pure function of arrays that returns a scalar. They work
under `jax.jit`, `jax.vmap`, `jax.grad` and any sharding (they only use
`jax.numpy` ops, so GSPMD partitions them like the surrounding step). This
module imports jax (and numpy, which jax imports anyway) and nothing else, so
other codebases can drop it into their own train steps.

Conventions shared by all losses:

* Inputs may be float32 or bfloat16 (or float16); they are cast to float32
  (float64 under `jax_enable_x64` with float64 inputs) before any softmax,
  log-softmax, norm, variance or matmul, and the loss is returned in that
  dtype.
* Teacher inputs are treated as constants (`jax.lax.stop_gradient`): the
  gradient with respect to any `teacher_*` argument is exactly zero.
* Matmuls inside relation losses (Gram matrices, pairwise distances, attention
  relations) use `Precision.HIGHEST` so that TPUs and TF32 GPUs do not round
  their inputs to bfloat16/TF32.
* Values match the reference PyTorch implementations named in each docstring
  (checked against the independent numpy versions in
  `tests/reference_losses.py`); `docs/losses.md` lists where references
  disagree and which one is followed.
"""
from collections.abc import Sequence

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "kd",
    "dkd",
    "dist",
    "kd_logit_std",
    "deit_hard",
    "deit_soft",
    "fitnet",
    "attention_transfer",
    "rkd",
    "pkt",
    "similarity_preserving",
    "simmim_l1",
    "mae_mse",
    "masked_feature_distill",
    "tinymim_relation",
    "crd",
    "crd_scores",
    "crd_normalizer",
    "crd_memory_update",
    "hcl",
    "ofa",
    "tf_kd_reg",
]

_HIGHEST = lax.Precision.HIGHEST
# mdistiller's DKD subtracts this from the target logit (already divided by T)
# to remove it from the non-target distribution.
_DKD_GT_OFFSET = 1000.0


# ----------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------
def _as_float(x):
  """Casts `x` to at least float32 (keeps float64)."""
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _teacher(x):
  """A teacher input: at least float32 and without gradient."""
  return lax.stop_gradient(_as_float(x))


def _clamped_norm(x, axis, eps):
  """`max(||x||_2, eps)` along `axis` (keepdims), finite gradient at 0."""
  sq = jnp.sum(x * x, axis=axis, keepdims=True)
  return jnp.sqrt(jnp.maximum(sq, eps * eps))


def _l2_normalize(x, axis, eps=1e-12):
  """`x / max(||x||_2, eps)`, like `torch.nn.functional.normalize`."""
  return x / _clamped_norm(x, axis, eps)


def _norm_zero_safe(x, axis):
  """`||x||_2` along `axis` with a zero (not NaN) gradient at x = 0."""
  sq = jnp.sum(x * x, axis=axis)
  positive = sq > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


def _kl(log_p_teacher, log_p_student, axis=-1):
  """`sum p_t (log p_t - log p_s)` along `axis`, with 0 log 0 = 0."""
  p_teacher = jnp.exp(log_p_teacher)
  terms = p_teacher * (log_p_teacher - log_p_student)
  return jnp.sum(jnp.where(p_teacher > 0, terms, 0.0), axis=axis)


def _smooth_l1(a, b, beta=1.0):
  """Mean Huber/smooth-L1, like `F.smooth_l1_loss(a, b, beta=beta)`."""
  diff = jnp.abs(a - b)
  return jnp.mean(
      jnp.where(diff < beta, 0.5 * diff * diff / beta, diff - 0.5 * beta))


def _flatten_batch(x):
  return x.reshape(x.shape[0], -1)


def _replicated(x):
  """`x` with any Explicit-mode sharding removed (a no-op otherwise).

  Batch-relation losses pair every row with every other; under Explicit
  sharding the "column" operand must be replicated so that the `(B, B)`
  result can stay sharded along its rows.
  """
  sharding = getattr(jax.typeof(x), "sharding", None)
  spec = getattr(sharding, "spec", None)
  if spec is None or all(axis is None for axis in spec):
    return x
  replicated = jax.sharding.NamedSharding(sharding.mesh,
                                          jax.sharding.PartitionSpec())
  return jax.sharding.reshard(x, replicated)


def _gram(x):
  """`x x^T` for `(B, N)` rows, in full precision, rows sharded like `x`."""
  return jnp.matmul(x, _replicated(x).T, precision=_HIGHEST)


# ----------------------------------------------------------------------------
# Logit distillation
# ----------------------------------------------------------------------------
def kd(student_logits, teacher_logits, temperature=4.0):
  """Hinton knowledge distillation: KL(teacher || student) at temperature T.

  `loss = T^2 * mean_b sum_c p_t[b,c] (log p_t[b,c] - log p_s[b,c])` with
  `p = softmax(logits / T)`.

  Args:
    student_logits: `(..., C)` student logits.
    teacher_logits: `(..., C)` teacher logits (no gradient).
    temperature: softmax temperature `T`.

  Returns:
    Scalar: KL summed over classes, averaged over all leading axes, times
    `T^2`.

  References: Hinton et al., "Distilling the Knowledge in a Neural Network",
  2015; mdistiller `distillers/KD.py` `kd_loss`.
  """
  log_ps = jax.nn.log_softmax(_as_float(student_logits) / temperature, -1)
  log_pt = jax.nn.log_softmax(_teacher(teacher_logits) / temperature, -1)
  return jnp.mean(_kl(log_pt, log_ps)) * temperature**2


def _binary_log_probs(z, gt_mask):
  """`log [p_target, 1 - p_target]` of `softmax(z)` computed in log space."""
  lse = jax.nn.logsumexp(z, axis=-1)
  log_target = jnp.sum(jnp.where(gt_mask, z, 0.0), axis=-1) - lse
  log_other = jax.nn.logsumexp(jnp.where(gt_mask, -jnp.inf, z), axis=-1) - lse
  return jnp.stack([log_target, log_other], axis=-1)


def dkd(student_logits, teacher_logits, labels, alpha=1.0, beta=8.0,
        temperature=4.0):
  """Decoupled knowledge distillation (TCKD + NCKD).

  With `z / T` the tempered logits and `t` the label:

  * TCKD = KL over the binary distribution `[p_t, 1 - p_t]` (teacher ||
    student), computed in log space (log-sum-exp over the non-target
    classes), so it never takes the log of an underflowed probability.
  * NCKD = KL(teacher || student) of `softmax(z / T - 1000 * onehot(t))`, the
    distribution over the non-target classes (mdistiller's -1000 mask).

  `loss = T^2 * (alpha * mean_b TCKD_b + beta * mean_b NCKD_b)`.

  For every sample `KD_b = TCKD_b + (1 - p_t^teacher) * NCKD_b` (the paper's
  decomposition, at temperature T).

  Args:
    student_logits: `(..., C)` student logits.
    teacher_logits: `(..., C)` teacher logits (no gradient).
    labels: `(...)` integer ground-truth classes.
    alpha: TCKD weight.
    beta: NCKD weight.
    temperature: softmax temperature `T`.

  Returns:
    Scalar: KL sums divided by the number of samples (mdistiller's
    `size_average=False` sum / batch size), times `T^2`.

  References: Zhao et al., "Decoupled Knowledge Distillation", CVPR 2022;
  mdistiller `distillers/DKD.py` `dkd_loss`.
  """
  s = _as_float(student_logits) / temperature
  t = _teacher(teacher_logits) / temperature
  gt_mask = jnp.asarray(labels)[..., None] == jnp.arange(s.shape[-1])
  tckd = _kl(_binary_log_probs(t, gt_mask), _binary_log_probs(s, gt_mask))
  offset = _DKD_GT_OFFSET * gt_mask
  nckd = _kl(jax.nn.log_softmax(t - offset, -1),
             jax.nn.log_softmax(s - offset, -1))
  return (alpha * jnp.mean(tckd) + beta * jnp.mean(nckd)) * temperature**2


def _pearson(a, b, axis, eps):
  """Pearson correlation along `axis` (torch `cosine_similarity` clamping)."""
  a = a - jnp.mean(a, axis=axis, keepdims=True)
  b = b - jnp.mean(b, axis=axis, keepdims=True)
  return jnp.sum(_l2_normalize(a, axis, eps) * _l2_normalize(b, axis, eps),
                 axis=axis)


def dist(student_logits, teacher_logits, beta=1.0, gamma=1.0,
         temperature=1.0, eps=1e-8):
  """DIST: inter- and intra-class Pearson relation distillation.

  With `y = softmax(logits / T)` of shape `(B, C)`:

  * inter = `1 - mean_b pearson(y_s[b, :], y_t[b, :])`  (over classes),
  * intra = `1 - mean_c pearson(y_s[:, c], y_t[:, c])`  (over the batch),

  `loss = T^2 * (beta * inter + gamma * intra)`.

  Pearson is the cosine similarity of mean-centred vectors with each norm
  clamped to `eps` (`torch.nn.functional.cosine_similarity`, as torchdistill
  uses; the original code divides by `|a||b| + eps` instead, which differs
  only for near-constant vectors).

  Args:
    student_logits: `(B, C)` student logits.
    teacher_logits: `(B, C)` teacher logits (no gradient).
    beta: inter-class weight.
    gamma: intra-class weight.
    temperature: softmax temperature `T`.
    eps: norm clamp.

  Returns:
    Scalar.

  References: Huang et al., "Knowledge Distillation from A Stronger Teacher",
  NeurIPS 2022; torchdistill `losses/mid_level.py` `DISTLoss`.
  """
  if jnp.ndim(student_logits) != 2:
    raise ValueError("dist expects (batch, classes) logits, got shape "
                     f"{jnp.shape(student_logits)}")
  y_s = jax.nn.softmax(_as_float(student_logits) / temperature, -1)
  y_t = jax.nn.softmax(_teacher(teacher_logits) / temperature, -1)
  inter = 1.0 - jnp.mean(_pearson(y_s, y_t, -1, eps))
  intra = 1.0 - jnp.mean(_pearson(y_s, y_t, 0, eps))
  return temperature**2 * (beta * inter + gamma * intra)


def _zscore(logits, eps):
  """`(x - mean) / (eps + std)` over the last axis, std unbiased (torch)."""
  centred = logits - jnp.mean(logits, axis=-1, keepdims=True)
  n = logits.shape[-1]
  var = jnp.sum(centred * centred, axis=-1, keepdims=True) / (n - 1)
  std = jnp.sqrt(jnp.maximum(var, jnp.finfo(var.dtype).tiny))
  return centred / (eps + std)


def kd_logit_std(student_logits, teacher_logits, temperature=2.0, eps=1e-7):
  """KD on z-score standardised logits ("logit standardization").

  `z = (x - mean_c x) / (eps + std_c x)` (unbiased std) for both models, then
  `kd(z_s, z_t, T)`, including the `T^2` factor as in the official code.

  Args:
    student_logits: `(..., C)` student logits, `C >= 2`.
    teacher_logits: `(..., C)` teacher logits (no gradient).
    temperature: base temperature `T` applied after standardisation.
    eps: added to the standard deviation.

  Returns:
    Scalar, reduced like `kd`.

  References: Sun et al., "Logit Standardization in Knowledge Distillation",
  CVPR 2024; github.com/sunshangquan/logit-standardization-KD
  `mdistiller/distillers/KD.py` (`normalize`, `kd_loss`).
  """
  z_s = _zscore(_as_float(student_logits), eps)
  z_t = _zscore(_teacher(teacher_logits), eps)
  return kd(z_s, z_t, temperature)


def deit_hard(distill_logits, teacher_logits):
  """DeiT hard distillation: cross-entropy to the teacher's argmax.

  `loss = mean_b -log softmax(s)[b, argmax_c t[b, c]]`.

  Args:
    distill_logits: `(..., C)` logits of the student's distillation head.
    teacher_logits: `(..., C)` teacher logits (only the argmax is used).

  Returns:
    Scalar, averaged over all leading axes.

  References: Touvron et al., "Training data-efficient image transformers &
  distillation through attention", ICML 2021; facebookresearch/deit
  `losses.py` (`distillation_type == 'hard'`).
  """
  hard = jnp.argmax(lax.stop_gradient(teacher_logits), axis=-1)
  log_p = jax.nn.log_softmax(_as_float(distill_logits), -1)
  return -jnp.mean(jnp.take_along_axis(log_p, hard[..., None], -1))


def deit_soft(distill_logits, teacher_logits, temperature=1.0):
  """DeiT soft distillation with DeiT's own reduction.

  `loss = T^2 * sum_{b,c} p_t (log p_t - log p_s) / numel(distill_logits)`,
  i.e. `kd(...) / C`: DeiT divides the summed KL by batch x classes.

  Args:
    distill_logits: `(..., C)` logits of the student's distillation head.
    teacher_logits: `(..., C)` teacher logits (no gradient).
    temperature: softmax temperature `T` (DeiT's `--distillation-tau`,
      default 1.0).

  Returns:
    Scalar.

  References: facebookresearch/deit `losses.py` `DistillationLoss`
  (`F.kl_div(..., reduction='sum', log_target=True) * T * T / numel`).
  """
  s = _as_float(distill_logits)
  log_ps = jax.nn.log_softmax(s / temperature, -1)
  log_pt = jax.nn.log_softmax(_teacher(teacher_logits) / temperature, -1)
  return jnp.sum(_kl(log_pt, log_ps)) * temperature**2 / s.size


# ----------------------------------------------------------------------------
# Feature distillation
# ----------------------------------------------------------------------------
def fitnet(student_feat, teacher_feat):
  """FitNets hint loss: mean squared error over all elements.

  `loss = mean((s - t)^2)`; the student feature is expected to be already
  projected to the teacher's shape (the regressor is a model part).

  Args:
    student_feat: any shape, e.g. `(B, H, W, C)` or `(B, L, D)`.
    teacher_feat: same shape (no gradient).

  Returns:
    Scalar mean over all elements.

  References: Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015;
  mdistiller `distillers/FitNet.py` (`F.mse_loss`).
  """
  diff = _as_float(student_feat) - _teacher(teacher_feat)
  return jnp.mean(diff * diff)


def _pool_matrix(n_in, n_out):
  """Averaging matrix of `adaptive_avg_pool` along one axis, `(n_out, n_in)`."""
  m = np.zeros((n_out, n_in), np.float64)
  for i in range(n_out):
    start = (i * n_in) // n_out
    end = -((-(i + 1) * n_in) // n_out)
    m[i, start:end] = 1.0 / (end - start)
  return m


def _adaptive_avg_pool(x, out_h, out_w):
  """`torch.nn.functional.adaptive_avg_pool2d` for NHWC maps."""
  _, h, w, _ = x.shape
  if h != out_h:
    mh = jnp.asarray(_pool_matrix(h, out_h), x.dtype)
    x = jnp.einsum("oh,bhwc->bowc", mh, x, precision=_HIGHEST)
  if w != out_w:
    mw = jnp.asarray(_pool_matrix(w, out_w), x.dtype)
    x = jnp.einsum("ow,bhwc->bhoc", mw, x, precision=_HIGHEST)
  return x


def _power(x, p):
  if float(p).is_integer():
    return lax.integer_pow(x, int(p))
  return jnp.abs(x)**p


def _attention_map(feat, p):
  """`normalize(mean_c f^p)` flattened over space: `(B, H*W)`."""
  a = jnp.mean(_power(feat, p), axis=-1)
  return _l2_normalize(a.reshape(a.shape[0], -1), axis=-1)


def _at_pair(student_feat, teacher_feat, p, mode):
  s = _as_float(student_feat)
  t = _teacher(teacher_feat)
  out_h = min(s.shape[1], t.shape[1])
  out_w = min(s.shape[2], t.shape[2])
  a_s = _attention_map(_adaptive_avg_pool(s, out_h, out_w), p)
  a_t = _attention_map(_adaptive_avg_pool(t, out_h, out_w), p)
  if mode == "code":
    return jnp.mean((a_s - a_t)**2)
  return jnp.sum(_norm_zero_safe(a_s - a_t, axis=-1))


def attention_transfer(student_feats, teacher_feats, p=2, mode="code"):
  """Attention transfer between spatial feature maps.

  The attention map of an NHWC map is `a = normalize(mean_c f^p)` flattened
  over `H*W` (L2 normalisation with eps 1e-12; in "paper" mode the sum over
  channels of the paper gives the same normalised map). When a pair's
  spatial sizes differ, the larger map is adaptive-average-pooled to the
  smaller size (per axis) before `a` is computed.

  * mode="code" (authors' code, mdistiller `at_loss`, torchdistill default):
    `loss = sum_pairs mean_{b,hw} (a_s - a_t)^2`.
  * mode="paper" (Eq. 2, torchdistill `mode='paper'`):
    `loss = sum_pairs sum_b ||a_s[b] - a_t[b]||_2 / B`.

  `f^p` is the signed power for integer `p` (as `tensor.pow(p)` in the
  references) and `|f|^p` otherwise.

  Args:
    student_feats: an NHWC array `(B, H, W, C)` or a sequence of them.
    teacher_feats: matching teacher maps (no gradient); channel counts may
      differ from the student's.
    p: power applied to activations.
    mode: "code" or "paper".

  Returns:
    Scalar summed over pairs.

  References: Zagoruyko & Komodakis, "Paying More Attention to Attention",
  ICLR 2017; mdistiller `distillers/AT.py`; torchdistill
  `losses/mid_level.py` `ATLoss`.
  """
  if mode not in ("code", "paper"):
    raise ValueError(f"mode must be 'code' or 'paper', got {mode!r}")
  if not isinstance(student_feats, Sequence):
    student_feats, teacher_feats = [student_feats], [teacher_feats]
  if len(student_feats) != len(teacher_feats):
    raise ValueError("student_feats and teacher_feats differ in length: "
                     f"{len(student_feats)} vs {len(teacher_feats)}")
  loss = sum(_at_pair(s, t, p, mode)
             for s, t in zip(student_feats, teacher_feats))
  if mode == "paper":
    loss = loss / jnp.shape(student_feats[0])[0]
  return loss


def _rkd_relations(e, eps=1e-12):
  """RKD's distance `(B, B)` and angle `(B, B, B)` relations of `(B, D)` rows.

  Distances follow mdistiller's `_pdist(squared=False)`:
  `sqrt(max(|e_i|^2 + |e_j|^2 - 2 e_i.e_j, eps))` with a zero diagonal. Angles
  `<unit(e_j - e_i), unit(e_k - e_i)>` are expanded through the Gram matrix,
  `(G_jk - G_ij - G_ik + G_ii) / (|e_j - e_i| |e_k - e_i|)`, which costs
  `O(B^2 D + B^3)` instead of the `O(B^3 D)` of normalising all `B^2`
  difference vectors. Both are translation invariant, so the rows are first
  centred on the batch mean, which keeps the expansions accurate in float32.
  """
  e = e - jnp.mean(e, axis=0, keepdims=True)
  sq = jnp.sum(e * e, axis=-1)
  gram = _gram(e)
  d2 = sq[:, None] + _replicated(sq)[None, :] - 2.0 * gram
  eye = jnp.eye(e.shape[0], dtype=bool)
  dist = jnp.where(eye, 0.0, jnp.sqrt(jnp.maximum(d2, eps)))
  # |e_j - e_i| clamped like F.normalize (eps 1e-12 on the norm).
  norm = jnp.sqrt(jnp.maximum(d2, eps * eps))
  dots = (_replicated(gram)[None, :, :] - gram[:, :, None] - gram[:, None, :]
          + sq[:, None, None])
  # Zero difference vectors (j == i or k == i) normalise to 0 in the
  # reference; masking before dividing keeps the gradient finite.
  zero = eye[:, :, None] | eye[:, None, :]
  denom = jnp.where(zero, 1.0, norm[:, :, None] * norm[:, None, :])
  return dist, jnp.where(zero, 0.0, dots) / denom


def _mean_normalized(dist):
  positive = dist > 0
  return dist / (jnp.sum(jnp.where(positive, dist, 0.0)) / jnp.sum(positive))


def rkd(student_emb, teacher_emb, distance_weight=25.0, angle_weight=50.0):
  """Relational knowledge distillation: distance and angle relations.

  Embeddings are flattened to `(B, D)`. Distances
  `d_ij = sqrt(max(|e_i|^2 + |e_j|^2 - 2 e_i.e_j, 1e-12))` with a zero
  diagonal, divided by the mean of the positive distances; angles are the
  cosines between `e_j - e_i` and `e_k - e_i` for all triplets.
  `loss = distance_weight * smooth_l1(d_s, d_t)
  + angle_weight * smooth_l1(angle_s, angle_t)`, smooth-L1 with beta 1,
  averaged over `B^2` and `B^3` entries.

  Args:
    student_emb: `(B, ...)` student embeddings.
    teacher_emb: `(B, ...)` teacher embeddings (no gradient); the feature
      size may differ from the student's.
    distance_weight: weight of the distance term.
    angle_weight: weight of the angle term.

  Returns:
    Scalar. Cost is `O(B^2 D + B^3)` time and `O(B^3)` memory (angles go
    through the Gram matrix of batch-centred rows; same values as the
    reference's explicit difference vectors up to float rounding).

  References: Park et al., "Relational Knowledge Distillation", CVPR 2019;
  mdistiller `distillers/RKD.py` `rkd_loss`.
  """
  d_s, a_s = _rkd_relations(_flatten_batch(_as_float(student_emb)))
  d_t, a_t = _rkd_relations(_flatten_batch(_teacher(teacher_emb)))
  loss_d = _smooth_l1(_mean_normalized(d_s), _mean_normalized(d_t))
  loss_a = _smooth_l1(a_s, a_t)
  return distance_weight * loss_d + angle_weight * loss_a


def _pkt_probs(f, eps):
  """Row-normalised cosine-similarity kernel scaled to [0, 1]."""
  f = _flatten_batch(f)
  tiny = jnp.finfo(f.dtype).tiny
  norm = jnp.sqrt(jnp.maximum(jnp.sum(f * f, axis=1, keepdims=True), tiny))
  f = f / (norm + eps)
  sim = (_gram(f) + 1.0) / 2.0
  return sim / jnp.sum(sim, axis=1, keepdims=True)


def pkt(student_emb, teacher_emb, eps=1e-7):
  """Probabilistic knowledge transfer with a cosine-similarity kernel.

  `f <- f / (||f|| + eps)`, `K = (f f^T + 1) / 2` row-normalised to `P`;
  `loss = mean_{i,j} P_t log((P_t + eps) / (P_s + eps))`.

  Args:
    student_emb: `(B, ...)` student embeddings (flattened per sample).
    teacher_emb: `(B, ...)` teacher embeddings (no gradient).
    eps: stabiliser, 1e-7 as in the references.

  Returns:
    Scalar mean over the `B^2` kernel entries.

  References: Passalis & Tefas, "Learning Deep Representations with
  Probabilistic Knowledge Transfer", ECCV 2018; mdistiller
  `distillers/PKT.py` `pkt_loss`; torchdistill `PKTLoss` (same values).
  """
  p_s = _pkt_probs(_as_float(student_emb), eps)
  p_t = _pkt_probs(_teacher(teacher_emb), eps)
  return jnp.mean(p_t * jnp.log((p_t + eps) / (p_s + eps)))


def similarity_preserving(student_feat, teacher_feat):
  """Similarity-preserving distillation of batch Gram matrices.

  Features are flattened per sample to `(B, N)`; `G = f f^T` with each row
  L2-normalised; `loss = sum (G_t - G_s)^2 / B^2`.

  Args:
    student_feat: `(B, ...)`, e.g. NHWC `(B, H, W, C)` (the Gram matrix does
      not depend on the order of the flattened axes, so NHWC and NCHW give
      the same value).
    teacher_feat: `(B, ...)` (no gradient); sizes may differ from the
      student's.

  Returns:
    Scalar.

  References: Tung & Mori, "Similarity-Preserving Knowledge Distillation",
  ICCV 2019; mdistiller `distillers/SP.py` `similarity_loss`.
  """
  s = _flatten_batch(_as_float(student_feat))
  t = _flatten_batch(_teacher(teacher_feat))
  g_s = _l2_normalize(_gram(s), axis=1)
  g_t = _l2_normalize(_gram(t), axis=1)
  batch = s.shape[0]
  return jnp.sum((g_t - g_s)**2) / (batch * batch)


# ----------------------------------------------------------------------------
# Masked image modeling
# ----------------------------------------------------------------------------
def _pixel_mask(mask, height, width):
  """A `(B, H, W)` float mask from `(B, H, W[, 1])` or a coarser `(B, h, w)`."""
  mask = _as_float(mask)
  if mask.ndim == 4:
    mask = mask[..., 0]
  h, w = mask.shape[1:3]
  if (h, w) != (height, width):
    if height % h or width % w:
      raise ValueError(f"mask of spatial size {(h, w)} does not tile images "
                       f"of size {(height, width)}")
    mask = jnp.repeat(jnp.repeat(mask, height // h, 1), width // w, 2)
  return mask


def simmim_l1(pred_images, target_images, pixel_mask):
  """SimMIM reconstruction loss: L1 over masked pixels.

  `loss = sum(|x - x_rec| * m) / (sum(m) + 1e-5) / C` where `sum(m)` counts
  masked pixel positions (not channels).

  Args:
    pred_images: `(B, H, W, C)` reconstructions.
    target_images: `(B, H, W, C)` input images (no gradient).
    pixel_mask: `(B, H, W)` or `(B, H, W, 1)`, 1 = masked. A patch-level
      `(B, H/s, W/s)` mask is upsampled by repetition (SimMIM's
      `repeat_interleave`).

  Returns:
    Scalar mean absolute error per masked pixel and channel.

  References: Xie et al., "SimMIM", CVPR 2022; microsoft/SimMIM
  `models/simmim.py` `SimMIM.forward`.
  """
  x_rec = _as_float(pred_images)
  x = _teacher(target_images)
  _, height, width, channels = x.shape
  mask = lax.stop_gradient(_pixel_mask(pixel_mask, height, width))
  masked = jnp.abs(x - x_rec) * mask[..., None]
  return jnp.sum(masked) / (jnp.sum(mask) + 1e-5) / channels


def mae_mse(pred_patches, target_patches, patch_mask, norm_pix=True):
  """MAE reconstruction loss: MSE on removed patches.

  If `norm_pix`, each target patch is normalised by its own mean and unbiased
  variance: `t <- (t - mean) / sqrt(var + 1e-6)`. Then
  `loss = sum_{b,l} m[b,l] mean_d (pred - t)^2 / sum m`.

  Args:
    pred_patches: `(B, L, p*p*C)` decoder predictions.
    target_patches: `(B, L, p*p*C)` patchified images (no gradient).
    patch_mask: `(B, L)`, 1 = removed (predicted), 0 = kept.
    norm_pix: normalise target pixels per patch (`norm_pix_loss`).

  Returns:
    Scalar. As in the reference there is no epsilon in the denominator: an
    all-zero mask gives NaN.

  References: He et al., "Masked Autoencoders Are Scalable Vision Learners",
  CVPR 2022; facebookresearch/mae `models_mae.py` `forward_loss`.
  """
  pred = _as_float(pred_patches)
  target = _teacher(target_patches)
  if norm_pix:
    mean = jnp.mean(target, axis=-1, keepdims=True)
    var = jnp.var(target, axis=-1, keepdims=True, ddof=1)
    target = (target - mean) / jnp.sqrt(var + 1e-6)
  per_patch = jnp.mean((pred - target)**2, axis=-1)
  mask = lax.stop_gradient(_as_float(patch_mask))
  return jnp.sum(per_patch * mask) / jnp.sum(mask)


def _layer_norm(x, eps):
  """Parameter-free LayerNorm over the last axis (biased variance)."""
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.var(x, axis=-1, keepdims=True)
  return (x - mean) * lax.rsqrt(var + eps)


def masked_feature_distill(student_feat, teacher_feat, token_mask,
                           kind="smooth_l1", normalize_target=True,
                           smooth_l1_beta=1.0, ln_eps=1e-5, cos_eps=1e-8):
  """Masked feature distillation from a MIM (or any) teacher.

  The student, fed a masked image, predicts the teacher's features of the
  full image at the masked positions. The target is the teacher feature
  passed through a parameter-free LayerNorm when `normalize_target`
  (MaskDistill/MILAN-style). Per-token loss:

  * kind="smooth_l1": `mean_d smooth_l1(s - t)` (Huber with
    `smooth_l1_beta`),
  * kind="cosine": `1 - cos(s, t)` (each norm clamped to `cos_eps`).

  `loss = sum_{b,l} m[b,l] loss[b,l] / max(sum m, 1)`.

  Args:
    student_feat: `(B, L, D)` student predictions (after any projection head).
    teacher_feat: `(B, L, D)` teacher features (no gradient).
    token_mask: `(B, L)`, 1 = masked (distilled) token.
    kind: "smooth_l1" or "cosine".
    normalize_target: apply the parameter-free LayerNorm to the target.
    smooth_l1_beta: Huber transition point.
    ln_eps: LayerNorm epsilon (torch's `F.layer_norm` default).
    cos_eps: norm clamp for the cosine.

  Returns:
    Scalar averaged over masked tokens (0 when no token is masked).

  References: Peng et al., "A Unified View of Masked Image Modeling"
  (MaskDistill), 2022; Hou et al., "MILAN", 2022; Bai et al., "Masked
  Autoencoders Enable Efficient Knowledge Distillers" (DMAE), CVPR 2023.
  """
  s = _as_float(student_feat)
  t = _teacher(teacher_feat)
  if normalize_target:
    t = _layer_norm(t, ln_eps)
  if kind == "smooth_l1":
    diff = jnp.abs(s - t)
    huber = jnp.where(diff < smooth_l1_beta,
                      0.5 * diff * diff / smooth_l1_beta,
                      diff - 0.5 * smooth_l1_beta)
    per_token = jnp.mean(huber, axis=-1)
  elif kind == "cosine":
    cos = jnp.sum(_l2_normalize(s, -1, cos_eps) * _l2_normalize(t, -1, cos_eps),
                  axis=-1)
    per_token = 1.0 - cos
  else:
    raise ValueError(f"kind must be 'smooth_l1' or 'cosine', got {kind!r}")
  mask = lax.stop_gradient(_as_float(token_mask))
  return jnp.sum(per_token * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def _log_relation(x, y, temperature):
  """`log softmax(x y^T / sqrt(d) / T)` over the last axis."""
  scale = x.shape[-1]**-0.5 / temperature
  logits = jnp.einsum("...ld,...md->...lm", x, y, precision=_HIGHEST) * scale
  return jax.nn.log_softmax(logits, axis=-1)


def tinymim_relation(student_qkv, teacher_qkv, temperature=1.0):
  """TinyMIM attention-relation distillation (Q-K and V-V relations).

  For one block's per-head queries, keys and values,
  `R_qk = softmax(q k^T / sqrt(d_head) / T)` and
  `R_vv = softmax(v v^T / sqrt(d_head) / T)` (each model scaled by its own
  `d_head`). `loss = KL(R_qk^t || R_qk^s) + KL(R_vv^t || R_vv^s)`, each KL
  summed over the last axis and averaged over `(B, H, L)`. Computed from
  log-softmax (the reference takes `log` of probabilities). No `T^2` factor;
  the default `T = 1` is the paper's setting.

  Args:
    student_qkv: tuple `(q, k, v)`, each `(B, H, L, d_s)` from the student's
      last block.
    teacher_qkv: tuple `(q, k, v)`, each `(B, H, L, d_t)` from the teacher's
      chosen block (no gradient). `H` and `L` must match the student's (the
      student's last block uses the teacher's head count); `d` may differ.
    temperature: optional softening of both relations.

  Returns:
    Scalar `qk_loss + vv_loss`.

  References: Ren et al., "TinyMIM: An Empirical Study of Distilling MIM
  Pre-trained Models", CVPR 2023; OliverRensu/TinyMIM `models_tinymim.py`
  (`forward_kd_loss`), `vit.py` (`Attention.forward(return_relation=True)`).
  """
  q_s, k_s, v_s = (_as_float(x) for x in student_qkv)
  q_t, k_t, v_t = (_teacher(x) for x in teacher_qkv)
  qk = _kl(_log_relation(q_t, k_t, temperature),
           _log_relation(q_s, k_s, temperature))
  vv = _kl(_log_relation(v_t, v_t, temperature),
           _log_relation(v_s, v_s, temperature))
  return jnp.mean(qk) + jnp.mean(vv)


# ----------------------------------------------------------------------------
# Contrastive representation distillation (CRD)
# ----------------------------------------------------------------------------
_CRD_EPS = 1e-7


def crd_scores(anchor_emb, bank, indices, temperature=0.07):
  """CRD's unnormalised scores of anchors against rows of a memory bank.

  `scores[b, k] = exp(<bank[indices[b, k]], anchor[b]> / T)`.

  Args:
    anchor_emb: `(B, D)` L2-normalised embeddings.
    bank: `(N, D)` memory bank (no gradient).
    indices: `(B, K+1)` integer rows, the positive first.
    temperature: `T` (RepDistiller's `nce_t`, 0.07).

  Returns:
    `(B, K+1)`.

  References: RepDistiller `crd/memory.py` `ContrastMemory.forward`.
  """
  rows = lax.stop_gradient(_as_float(bank))[indices]
  dots = jnp.einsum("bkd,bd->bk", rows, _as_float(anchor_emb), precision=_HIGHEST)
  return jnp.exp(dots / temperature)


def crd_normalizer(scores, num_data):
  """CRD's normalisation constant `Z = mean(scores) * N`, fixed at the first step.

  RepDistiller sets Z once, from the first batch's scores, and keeps it (a
  buffer); the trainer stores it with its state. Returned without gradient.
  """
  return lax.stop_gradient(jnp.mean(_as_float(scores)) * num_data)


def _contrast_loss(x, num_data):
  """RepDistiller's `ContrastLoss` (their Eq. 18): NCE with K noise samples.

  `P_n = 1 / N`; `loss = -(sum_b log(x_b0 / (x_b0 + K P_n + eps))
  + sum_{b, k>0} log(K P_n / (x_bk + K P_n + eps))) / B`.
  """
  k = x.shape[1] - 1
  noise = k / float(num_data)
  log_d1 = jnp.log(x[:, 0] / (x[:, 0] + noise + _CRD_EPS))
  log_d0 = jnp.log(noise / (x[:, 1:] + noise + _CRD_EPS))
  return -(jnp.sum(log_d1) + jnp.sum(log_d0)) / x.shape[0]


def crd(student_emb, teacher_emb, student_bank, teacher_bank, indices,
        z_student, z_teacher, num_data, temperature=0.07):
  """Contrastive representation distillation: NCE against memory banks.

  Both directions of Tian et al.'s objective. With `s = crd_scores(
  student_emb, teacher_bank, indices, T) / z_student` (the student as anchor,
  positives and negatives from the teacher's bank) and `t = crd_scores(
  teacher_emb, student_bank, indices, T) / z_teacher`,
  `loss = nce(s) + nce(t)`, `nce` the NCE loss with `K = indices.shape[1] - 1`
  noise samples of probability `1 / num_data` (`_contrast_loss`).

  The teacher embedding is the output of a trainable head on the frozen
  teacher's feature, so it does get a gradient here (unlike other `teacher_*`
  inputs); the banks and the Z constants are constants.

  Args:
    student_emb: `(B, D)` L2-normalised student embeddings.
    teacher_emb: `(B, D)` L2-normalised teacher embeddings.
    student_bank, teacher_bank: `(N, D)` momentum memory banks (constants).
    indices: `(B, K+1)` rows of the banks, `indices[:, 0]` the batch's own
      dataset indices (the positives).
    z_student, z_teacher: normalisation constants (`crd_normalizer` of the
      first step's scores), scalars.
    num_data: `N`, the number of training examples.
    temperature: `T` (0.07).

  Returns:
    Scalar.

  References: Tian et al., "Contrastive Representation Distillation", ICLR
  2020; RepDistiller `crd/criterion.py` (`CRDLoss`, `ContrastLoss`),
  `crd/memory.py` (`ContrastMemory`), commit b84f547c.
  """
  s = crd_scores(student_emb, teacher_bank, indices, temperature)
  t = crd_scores(teacher_emb, student_bank, indices, temperature)
  s = s / lax.stop_gradient(_as_float(z_student))
  t = t / lax.stop_gradient(_as_float(z_teacher))
  return _contrast_loss(s, num_data) + _contrast_loss(t, num_data)


def crd_memory_update(bank, indices, emb, momentum=0.5):
  """CRD's momentum update of the memory rows of the batch.

  `bank[i] <- normalize(momentum * bank[i] + (1 - momentum) * emb)` for the
  batch's dataset indices `i`, L2-normalised, other rows unchanged. A row
  that appears twice in `indices` (repeated augmentation) keeps one of its
  writes, which one unspecified (as torch's `index_copy_`), but the same one
  on every run of the same program.

  Args:
    bank: `(N, D)`.
    indices: `(B,)` integer rows.
    emb: `(B, D)` embeddings (no gradient).
    momentum: `nce_m` (0.5).

  Returns:
    The new `(N, D)` bank.

  References: RepDistiller `crd/memory.py` `ContrastMemory.forward`.
  """
  bank = _as_float(bank)
  pos = bank[indices] * momentum + lax.stop_gradient(_as_float(emb)) * (1 - momentum)
  pos = pos / jnp.sqrt(jnp.sum(pos * pos, axis=1, keepdims=True))
  return bank.at[indices].set(pos.astype(bank.dtype))


# ----------------------------------------------------------------------------
# Review KD, OFA-KD, teacher-free KD
# ----------------------------------------------------------------------------
def hcl(student_feats, teacher_feats):
  """ReviewKD's hierarchical context loss between fused student maps and teacher maps.

  For each pair of NHWC maps of the same shape (`H` the student's height):
  `l = mse(s, t) + sum_k 2^-k mse(pool_l(s), pool_l(t))` over the pyramid
  levels `l` in (4, 2, 1) with `l < H` (`pool` is adaptive average pooling to
  `l x l`, `k` counts the levels used), divided by `1 + sum_k 2^-k`; the
  loss is the sum over pairs.

  Args:
    student_feats: a sequence of `(B, H, W, C)` maps (the ABF outputs).
    teacher_feats: the teacher's maps, same shapes (no gradient).

  Returns:
    Scalar.

  References: Chen et al., "Distilling Knowledge via Knowledge Review",
  CVPR 2021; mdistiller `distillers/ReviewKD.py` `hcl_loss`, commit a08d46f1.
  """
  if len(student_feats) != len(teacher_feats):
    raise ValueError("student_feats and teacher_feats differ in length: "
                     f"{len(student_feats)} vs {len(teacher_feats)}")
  total = 0.0
  for fs, ft in zip(student_feats, teacher_feats):
    fs, ft = _as_float(fs), _teacher(ft)
    if fs.shape != ft.shape:
      raise ValueError(f"hcl pairs need equal shapes, got {fs.shape} and {ft.shape}")
    h = fs.shape[1]
    loss = jnp.mean((fs - ft)**2)
    cnt, tot = 1.0, 1.0
    for level in (4, 2, 1):
      if level >= h:
        continue
      cnt /= 2.0
      diff = _adaptive_avg_pool(fs, level, level) - _adaptive_avg_pool(ft, level, level)
      loss = loss + jnp.mean(diff**2) * cnt
      tot += cnt
    total = total + loss / tot
  return total


def ofa(student_logits, teacher_logits, labels, eps=1.0, temperature=1.0):
  """OFA-KD's loss with adaptive target enhancement.

  With `p = softmax(z / T)` and `m` the one-hot label:
  `loss = mean_b sum_c -((p_t + m)^eps - m) log p_s`. At `eps = 1` it is the
  cross-entropy to the teacher's distribution; `eps > 1` raises the weight
  of the target class when the teacher is confident in it.

  Args:
    student_logits: `(B, C)` logits (the student's, or a stage projector's).
    teacher_logits: `(B, C)` teacher logits (no gradient).
    labels: `(B,)` integer classes.
    eps: the enhancement exponent (`--ofa-eps`).
    temperature: `T` (`--ofa-temperature`, 1).

  Returns:
    Scalar. `log p_s` is a log-softmax (the reference takes the log of the
    softmax: equal, without its underflow).

  References: Hao et al., "One-for-All: Bridge the Gap Between Heterogeneous
  Architectures in Knowledge Distillation", NeurIPS 2023; Hao840/OFAKD
  `distillers/ofa.py` `ofa_loss`, commit f7bb896c.
  """
  log_ps = jax.nn.log_softmax(_as_float(student_logits) / temperature, -1)
  p_t = jax.nn.softmax(_teacher(teacher_logits) / temperature, -1)
  mask = jax.nn.one_hot(labels, log_ps.shape[-1], dtype=log_ps.dtype)
  weight = lax.stop_gradient((p_t + mask)**eps - mask)
  return jnp.mean(jnp.sum(-weight * log_ps, axis=-1))


def tf_kd_reg(student_logits, labels, correct_prob=0.99, temperature=20.0):
  """Teacher-free KD with a manually designed teacher (Tf-KD_reg).

  The virtual teacher puts `a = correct_prob` on the label and
  `(1 - a) / (C - 1)` on every other class; its distribution is
  `q = softmax(u / T)` of those probabilities `u` (as the authors' code does).
  `loss = sum_{b,c} q (log q - log softmax(s)) / (B C)`: KL(q || p_s) with
  `nn.KLDivLoss`'s default mean over all elements. The paper's
  `(1 - alpha) CE + alpha * multiplier * loss` is a `ce` term plus this one
  with weight `alpha * multiplier`.

  Args:
    student_logits: `(B, C)` logits (no temperature on the student, as in the
      reference).
    labels: `(B,)` integer classes.
    correct_prob: `a` (0.99 in the reference).
    temperature: `T` (`reg_temperature`: 20 for ResNet-18, 40 for
      MobileNetV2 on CIFAR-100).

  Returns:
    Scalar.

  References: Yuan et al., "Revisiting Knowledge Distillation via Label
  Smoothing Regularization", CVPR 2020; yuanli2333/Teacher-free-Knowledge-
  Distillation `my_loss_function.py` `loss_kd_regularization`, commit
  d000ab37.
  """
  s = _as_float(student_logits)
  num_classes = s.shape[-1]
  onehot = jax.nn.one_hot(labels, num_classes, dtype=s.dtype)
  virtual = onehot * correct_prob + (1 - onehot) * (1 - correct_prob) / (num_classes - 1)
  log_q = jax.nn.log_softmax(virtual / temperature, -1)
  return jnp.sum(_kl(log_q, jax.nn.log_softmax(s, -1))) / s.size
