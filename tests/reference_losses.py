"""Float64 numpy re-statements of the reference PyTorch losses.

Written from the reference sources (mdistiller, torchdistill, DeiT, SimMIM,
MAE, logit-standardization-KD, TinyMIM), following their operations step by
step (including their probability-space computations), independently of
`jkd.losses`. Feature maps are NCHW here, as in the references; the tests
transpose jkd's NHWC inputs.
"""
import numpy as np


def _f64(x):
  return np.asarray(x, np.float64)


def softmax(x, axis=1):
  x = x - x.max(axis=axis, keepdims=True)
  e = np.exp(x)
  return e / e.sum(axis=axis, keepdims=True)


def log_softmax(x, axis=1):
  x = x - x.max(axis=axis, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=axis, keepdims=True))


def kl_div(log_input, target):
  """torch `F.kl_div(input, target, reduction='none')` (xlogy for target)."""
  with np.errstate(divide="ignore", invalid="ignore"):
    out = np.where(target > 0, target * (np.log(target) - log_input), 0.0)
  return out


def normalize(x, axis=1, eps=1e-12):
  """torch `F.normalize`."""
  n = np.sqrt((x * x).sum(axis=axis, keepdims=True))
  return x / np.maximum(n, eps)


def smooth_l1(a, b, beta=1.0):
  d = np.abs(a - b)
  return np.where(d < beta, 0.5 * d * d / beta, d - 0.5 * beta).mean()


# --- mdistiller KD.py ---
def kd(ls, lt, temperature):
  ls, lt = _f64(ls), _f64(lt)
  log_ps = log_softmax(ls / temperature)
  pt = softmax(lt / temperature)
  return kl_div(log_ps, pt).sum(1).mean() * temperature**2


def kd_per_sample(ls, lt, temperature):
  log_ps = log_softmax(_f64(ls) / temperature)
  pt = softmax(_f64(lt) / temperature)
  return kl_div(log_ps, pt).sum(1)


# --- mdistiller DKD.py ---
def dkd(ls, lt, target, alpha, beta, temperature):
  ls, lt = _f64(ls), _f64(lt)
  n, c = ls.shape
  gt = np.zeros((n, c))
  gt[np.arange(n), target] = 1.0
  other = 1.0 - gt
  ps = softmax(ls / temperature)
  pt = softmax(lt / temperature)

  def cat_mask(p):
    return np.stack([(p * gt).sum(1), (p * other).sum(1)], 1)

  ps2, pt2 = cat_mask(ps), cat_mask(pt)
  tckd = kl_div(np.log(ps2), pt2).sum() * temperature**2 / n
  pt_part2 = softmax(lt / temperature - 1000.0 * gt)
  log_ps_part2 = log_softmax(ls / temperature - 1000.0 * gt)
  nckd = kl_div(log_ps_part2, pt_part2).sum() * temperature**2 / n
  return alpha * tckd + beta * nckd


# --- torchdistill DISTLoss ---
def _cosine_similarity(a, b, eps):
  """torch `F.cosine_similarity(a, b, dim=1, eps)` (norms clamped apart)."""
  na = np.maximum(np.sqrt((a * a).sum(1)), eps)
  nb = np.maximum(np.sqrt((b * b).sum(1)), eps)
  return (a * b).sum(1) / (na * nb)


def _pearson(a, b, eps):
  return _cosine_similarity(a - a.mean(1, keepdims=True),
                            b - b.mean(1, keepdims=True), eps)


def dist(ls, lt, beta, gamma, tau, eps=1e-8):
  ys = softmax(_f64(ls) / tau)
  yt = softmax(_f64(lt) / tau)
  inter = tau**2 * (1 - _pearson(ys, yt, eps).mean())
  intra = tau**2 * (1 - _pearson(ys.T, yt.T, eps).mean())
  return beta * inter + gamma * intra


# --- logit-standardization-KD KD.py ---
def _standardize(logit):
  mean = logit.mean(-1, keepdims=True)
  std = logit.std(-1, keepdims=True, ddof=1)
  return (logit - mean) / (1e-7 + std)


def kd_logit_std(ls, lt, temperature):
  return kd(_standardize(_f64(ls)), _standardize(_f64(lt)), temperature)


# --- DeiT losses.py ---
def deit_hard(ls, lt):
  ls, lt = _f64(ls), _f64(lt)
  y = lt.argmax(1)
  return -log_softmax(ls)[np.arange(len(y)), y].mean()


def deit_soft(ls, lt, tau):
  ls, lt = _f64(ls), _f64(lt)
  log_ps = log_softmax(ls / tau)
  log_pt = log_softmax(lt / tau)
  # kl_div(..., log_target=True): exp(t) * (t - input)
  total = (np.exp(log_pt) * (log_pt - log_ps)).sum()
  return total * tau * tau / ls.size


# --- mdistiller FitNet.py ---
def fitnet(fs, ft):
  return ((_f64(fs) - _f64(ft))**2).mean()


# --- mdistiller AT.py / torchdistill ATLoss (NCHW) ---
def adaptive_avg_pool2d(x, out_hw):
  n, c, h, w = x.shape
  oh, ow = out_hw
  out = np.zeros((n, c, oh, ow))
  for i in range(oh):
    h0, h1 = (i * h) // oh, -((-(i + 1) * h) // oh)
    for j in range(ow):
      w0, w1 = (j * w) // ow, -((-(j + 1) * w) // ow)
      out[:, :, i, j] = x[:, :, h0:h1, w0:w1].mean(axis=(2, 3))
  return out


def _at(f, p):
  return normalize((f**p).mean(1).reshape(f.shape[0], -1))


def _pool_pair(fs, ft):
  s_h, t_h = fs.shape[2], ft.shape[2]
  if s_h > t_h:
    fs = adaptive_avg_pool2d(fs, (t_h, t_h))
  elif s_h < t_h:
    ft = adaptive_avg_pool2d(ft, (s_h, s_h))
  return fs, ft


def at_code(gs, gt, p):
  total = 0.0
  for fs, ft in zip(gs, gt):
    fs, ft = _pool_pair(_f64(fs), _f64(ft))
    total += ((_at(fs, p) - _at(ft, p))**2).mean()
  return total


def at_paper(gs, gt):
  """torchdistill ATLoss(mode='paper') with unit pair weights."""
  total = 0.0
  for fs, ft in zip(gs, gt):
    fs, ft = _pool_pair(_f64(fs), _f64(ft))
    a_s = normalize((fs**2).sum(1).reshape(fs.shape[0], -1))
    a_t = normalize((ft**2).sum(1).reshape(ft.shape[0], -1))
    total += np.sqrt(((a_s - a_t)**2).sum(1)).sum()
  return total / len(gs[0])


# --- mdistiller RKD.py ---
def _pdist(e, eps=1e-12):
  e_square = (e**2).sum(1)
  prod = e @ e.T
  res = np.maximum(e_square[:, None] + e_square[None, :] - 2 * prod, eps)
  res = np.sqrt(res)
  res[np.arange(len(e)), np.arange(len(e))] = 0
  return res


def rkd(fs, ft, distance_weight=25.0, angle_weight=50.0):
  stu = _f64(fs).reshape(len(fs), -1)
  tea = _f64(ft).reshape(len(ft), -1)
  t_d = _pdist(tea)
  t_d = t_d / t_d[t_d > 0].mean()
  d = _pdist(stu)
  d = d / d[d > 0].mean()
  loss_d = smooth_l1(d, t_d)
  td = tea[None, :, :] - tea[:, None, :]
  norm_td = normalize(td, axis=2)
  t_angle = np.matmul(norm_td, norm_td.transpose(0, 2, 1)).reshape(-1)
  sd = stu[None, :, :] - stu[:, None, :]
  norm_sd = normalize(sd, axis=2)
  s_angle = np.matmul(norm_sd, norm_sd.transpose(0, 2, 1)).reshape(-1)
  loss_a = smooth_l1(s_angle, t_angle)
  return distance_weight * loss_d + angle_weight * loss_a


# --- mdistiller PKT.py ---
def pkt(fs, ft, eps=1e-7):
  fs = _f64(fs).reshape(len(fs), -1)
  ft = _f64(ft).reshape(len(ft), -1)
  fs = fs / (np.sqrt((fs**2).sum(1, keepdims=True)) + eps)
  fs[fs != fs] = 0
  ft = ft / (np.sqrt((ft**2).sum(1, keepdims=True)) + eps)
  ft[ft != ft] = 0
  ms = (fs @ fs.T + 1.0) / 2.0
  mt = (ft @ ft.T + 1.0) / 2.0
  ms = ms / ms.sum(1, keepdims=True)
  mt = mt / mt.sum(1, keepdims=True)
  return (mt * np.log((mt + eps) / (ms + eps))).mean()


# --- mdistiller SP.py ---
def sp(fs, ft):
  bsz = fs.shape[0]
  fs = _f64(fs).reshape(bsz, -1)
  ft = _f64(ft).reshape(bsz, -1)
  g_s = normalize(fs @ fs.T)
  g_t = normalize(ft @ ft.T)
  diff = g_t - g_s
  return (diff * diff).sum() / (bsz * bsz)


# --- SimMIM models/simmim.py (NCHW images, (B, h, w) patch mask) ---
def simmim(x, x_rec, mask, patch_size):
  x, x_rec = _f64(x), _f64(x_rec)
  in_chans = x.shape[1]
  mask = _f64(mask).repeat(patch_size, 1).repeat(patch_size, 2)[:, None]
  loss_recon = np.abs(x - x_rec)
  return (loss_recon * mask).sum() / (mask.sum() + 1e-5) / in_chans


# --- MAE models_mae.py forward_loss ---
def mae(target, pred, mask, norm_pix_loss=True):
  target, pred, mask = _f64(target), _f64(pred), _f64(mask)
  if norm_pix_loss:
    mean = target.mean(-1, keepdims=True)
    var = target.var(-1, keepdims=True, ddof=1)
    target = (target - mean) / (var + 1.e-6)**.5
  loss = ((pred - target)**2).mean(-1)
  return (loss * mask).sum() / mask.sum()


# --- masked feature distillation (MaskDistill-style; spec in jkd docs) ---
def masked_feature(fs, ft, mask, kind, normalize_target=True, beta=1.0,
                   ln_eps=1e-5, cos_eps=1e-8):
  fs, ft, mask = _f64(fs), _f64(ft), _f64(mask)
  if normalize_target:
    mu = ft.mean(-1, keepdims=True)
    var = ft.var(-1, keepdims=True)
    ft = (ft - mu) / np.sqrt(var + ln_eps)
  if kind == "smooth_l1":
    d = np.abs(fs - ft)
    per = np.where(d < beta, 0.5 * d * d / beta, d - 0.5 * beta).mean(-1)
  else:
    ns = np.maximum(np.linalg.norm(fs, axis=-1), cos_eps)
    nt = np.maximum(np.linalg.norm(ft, axis=-1), cos_eps)
    per = 1.0 - (fs * ft).sum(-1) / (ns * nt)
  return (per * mask).sum() / max(mask.sum(), 1.0)


# --- TinyMIM vit.py Attention(return_relation) + forward_kd_loss ---
def _relations(q, k, v):
  scale = q.shape[-1]**-0.5
  attn = softmax((q @ k.swapaxes(-2, -1)) * scale, axis=-1)
  vv = softmax((v @ v.swapaxes(-2, -1)) * scale, axis=-1)
  return attn, vv


def tinymim(student_qkv, teacher_qkv):
  qk_s, vv_s = _relations(*(_f64(x) for x in student_qkv))
  qk_t, vv_t = _relations(*(_f64(x) for x in teacher_qkv))
  qk_loss = kl_div(np.log(qk_s), qk_t).sum(-1).mean()
  vv_loss = kl_div(np.log(vv_s), vv_t).sum(-1).mean()
  return qk_loss + vv_loss


# --- RepDistiller crd/memory.py ContrastMemory.forward + crd/criterion.py ContrastLoss ---
# HobbitLong/RepDistiller b84f547c5db6a35318d4671d7d5c4de74c822403 (mdistiller CRD.py copies
# them). v1 = student embedding, v2 = teacher embedding, memory_v1 the student bank,
# memory_v2 the teacher bank, idx (B, K+1) with the positive first.
def crd_scores(memory, idx, v, temperature):
  """exp(bmm(memory[idx], v) / T): (B, K+1)."""
  weight = _f64(memory)[np.asarray(idx).reshape(-1)].reshape(*np.shape(idx), -1)
  return np.exp(np.einsum('bkd,bd->bk', weight, _f64(v)) / temperature)


def crd_normalizer(out, n_data):
  """Z set on the first call: out.mean() * outputSize."""
  return out.mean() * n_data


def contrast_loss(x, n_data, eps=1e-7):
  bsz, m = x.shape[0], x.shape[1] - 1
  pn = 1.0 / float(n_data)
  p_pos = x[:, 0]
  log_d1 = np.log(p_pos / (p_pos + m * pn + eps))
  p_neg = x[:, 1:]
  log_d0 = np.log(np.full_like(p_neg, m * pn) / (p_neg + m * pn + eps))
  return -(log_d1.sum(0) + log_d0.reshape(-1, 1).sum(0)[0]) / bsz


def crd(f_s, f_t, memory_s, memory_t, idx, temperature, n_data, z_s=-1.0, z_t=-1.0):
  """CRDLoss.forward after the embeddings: (loss, Z_v1, Z_v2)."""
  out_v2 = crd_scores(memory_s, idx, f_t, temperature)   # teacher anchor, student bank
  out_v1 = crd_scores(memory_t, idx, f_s, temperature)   # student anchor, teacher bank
  z_v1 = crd_normalizer(out_v1, n_data) if z_s < 0 else z_s
  z_v2 = crd_normalizer(out_v2, n_data) if z_t < 0 else z_t
  loss = contrast_loss(out_v1 / z_v1, n_data) + contrast_loss(out_v2 / z_v2, n_data)
  return loss, z_v1, z_v2


def crd_memory_update(memory, y, v, momentum):
  """The `with torch.no_grad()` block: momentum update of rows y, L2-normalised, written back."""
  memory = _f64(memory).copy()
  pos = memory[y] * momentum + _f64(v) * (1 - momentum)
  memory[y] = pos / np.sqrt((pos**2).sum(1, keepdims=True))
  return memory


# --- mdistiller distillers/ReviewKD.py hcl_loss (NCHW) ---
# megvii-research/mdistiller a08d46f10d6102bd6e3f258ca5ac880b020ea259
def hcl(fstudent, fteacher):
  loss_all = 0.0
  for fs, ft in zip(fstudent, fteacher):
    fs, ft = _f64(fs), _f64(ft)
    _, _, h, _ = fs.shape
    loss = ((fs - ft)**2).mean()
    cnt, tot = 1.0, 1.0
    for l in (4, 2, 1):
      if l >= h:
        continue
      tmpfs = adaptive_avg_pool2d(fs, (l, l))
      tmpft = adaptive_avg_pool2d(ft, (l, l))
      cnt /= 2.0
      loss += ((tmpfs - tmpft)**2).mean() * cnt
      tot += cnt
    loss_all = loss_all + loss / tot
  return loss_all


# --- OFA-KD distillers/ofa.py ofa_loss ---
# Hao840/OFAKD f7bb896cac9879040800bde08a8cc2057a904c52
def ofa(ls, lt, target, eps, temperature=1.0):
  ls, lt = _f64(ls), _f64(lt)
  n, c = ls.shape
  mask = np.zeros((n, c))
  mask[np.arange(n), target] = 1.0
  pred_s = softmax(ls / temperature)
  pred_t = softmax(lt / temperature)
  prod = (pred_t + mask)**eps
  return np.sum(-(prod - mask) * np.log(pred_s), axis=-1).mean()


# --- Teacher-free KD my_loss_function.py loss_kd_regularization (the soft term) ---
# yuanli2333/Teacher-free-Knowledge-Distillation d000ab378a409535a5f5f645b473e05e27529a02
def tf_kd_reg(ls, target, correct_prob, temperature):
  """nn.KLDivLoss()(log_softmax(outputs), softmax(teacher_soft / T)): the mean over all B x K
  elements (KLDivLoss's default reduction); `multiplier` and `alpha` are weights."""
  ls = _f64(ls)
  n, k = ls.shape
  teacher_soft = np.full((n, k), (1 - correct_prob) / (k - 1))
  teacher_soft[np.arange(n), target] = correct_prob
  return kl_div(log_softmax(ls), softmax(teacher_soft / temperature)).mean()
