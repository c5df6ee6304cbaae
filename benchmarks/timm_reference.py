"""PyTorch/timm reference for `jkd bench`: the same train steps, timed the same way.

  python benchmarks/timm_reference.py --model vit_b16 [--json OUT.json]
  python benchmarks/timm_reference.py --model all --gap          # every job, jkd's token layout
  python benchmarks/timm_reference.py --model all --device cpu --no-compile --batch-size 2

Needs torch and timm (`pip install -e '.[torch]'`) and, for timings, a CUDA GPU. For each job it
builds the PyTorch equivalent of `configs/bench/<job>.py`, compiles it with `torch.compile`,
and times a full train step (forward and loss under bf16 autocast, backward, fused AdamW) on
one synthetic batch (N(0, 1) pixels, as if already normalised) that stays on the GPU. As in
`jkd bench`: `--warmup` untimed steps (these also trigger compilation), then `--steps` steps
timed `--repeats` times with a device sync at each end; the median repeat is reported as img/s.

Jobs (batch 256 unless `--batch-size`; AdamW weight decay 0.05 everywhere, as the jkd configs):
- `vit_b16`, `vit_s16`, `resnet50` (job `supervised`): timm `vit_base_patch16_224`,
  `vit_small_patch16_224`, `resnet50` (channels-last), 224×224, cross-entropy, lr 1e-3.
- `kd_vit_b16_s16` (job `distill`): a frozen `vit_base_patch16_224` teacher (eval mode,
  `torch.no_grad`, weights kept in bf16 as jkd keeps a bf16 teacher's) and a trained
  `vit_small_patch16_224` student, 224×224, loss `0.1 CE + 0.9 T² KL(softmax(t/T) ‖
  softmax(s/T))`, T = 4 (Hinton et al. 2015), KL averaged over the batch; lr 1e-3. Both
  networks are randomly initialised: only the teacher's cost is timed, as jkd's zero teacher.
- `mae_vit_b16` (job `mae`): MAE ViT-B/16 pretraining (He et al. 2022,
  https://arxiv.org/abs/2111.06377), written here from timm's `PatchEmbed`/`Block` as
  facebookresearch/mae `models_mae.py` builds it: per-example random masking of 75% of the 196
  patches by argsort of uniform noise (49 kept), encoder = 12 ViT-B blocks (width 768, 12 heads)
  on the kept tokens (+ class token), fixed 2-D sin-cos positions, decoder 512 wide × 8 blocks ×
  16 heads with a mask token, predicting 16·16·3 pixels per patch; loss MSE on the removed
  patches against per-patch normalised pixels (norm_pix_loss). AdamW lr 1.5e-4, β = (0.9, 0.95).
- `simmim_vit_b16` (job `simmim`): SimMIM ViT-B/16 pretraining (Xie et al. 2022,
  https://arxiv.org/abs/2111.09886) at 192×192 (12×12 patches): a random 60% of the 6×6 grid of
  32×32-pixel blocks is masked (ceil(36 · 0.6) = 22 blocks = 88 of 144 patches, per example);
  masked patch embeddings are replaced by a learned mask token; the ViT-B encoder (fixed 2-D
  sin-cos positions, stochastic depth rising linearly to 0.1) sees all tokens; a 1×1 conv to
  16·16·3 channels and a pixel shuffle reconstruct the image; loss L1 on masked pixels, summed
  and divided by (masked pixels + 1e-5) × 3 channels. AdamW lr 8e-4, β = (0.9, 0.999),
  gradients clipped to norm 5.
- `qat_vit_s16` (job `compress`): int8 quantization-aware training of `vit_small_patch16_224`,
  224×224, cross-entropy, lr 1e-3. Every `nn.Linear` (qkv, projections, MLPs, head) and the
  patch-embedding conv compute on fake-quantized operands: weights int8 symmetric per output
  channel, input activations int8 symmetric with a *dynamic* range (absmax at run time, no
  calibration, no observers); `s = absmax / 127.5`, `q = clip(round(x / s), -128, 127)`,
  straight-through gradient (identity). This is what jkd's Qwix QAT computes
  (`jkd/compress/quant.py`: dynamic activation ranges, since Qwix's static ones fail under
  jit): Qwix scales a dense layer's input per token (every axis but the contracted one) and a
  conv's input per example, so the reference does the same, not per tensor. A small explicit
  wrapper is used instead of `torch.ao.quantization` fake-quant modules, whose observers keep
  static (running min/max) ranges. The attention's own matmuls stay in bf16 (inside SDPA; in
  jkd inside the cuDNN kernel).

`--gap` builds every ViT the jkd way: no class token (196 tokens; supervised, KD and QAT ViTs
average-pool the tokens, `class_token=False, global_pool='avg'`; the MAE encoder sees 49
tokens and its decoder 196, the SimMIM encoder 144). Without it the ViTs keep the class token
of timm and of the official MAE/SimMIM code (197 tokens, MAE 50 and 197, SimMIM 145): at most
2% more FLOPs.

Deliberate differences from the official MAE/SimMIM code (none changes the work per step by
more than a few elementwise ops): bf16 autocast without a loss scaler (official: fp16 autocast
with a GradScaler); no per-parameter-group weight decay (official: none on biases and norms;
jkd applies it to all, and the fused update costs the same); masks drawn on the device inside
the compiled step (SimMIM's come from its CPU data loader; jkd draws them on device too);
SimMIM's ViT uses fixed sin-cos absolute positions and no layer scale, as jkd's (the paper's
ViT-B has a shared relative position bias and layer scale 0.1).

`--device cpu` is a functional check, not a benchmark: no autocast (float32, as jkd's `:cpu`
bench configs; CPU bf16 is slow and not what the GPU figures compare), unfused AdamW,
`--no-compile` recommended (torch.compile on CPU needs a C++ toolchain), warm-up 1 and 1 × 1
timed step unless given, no peak memory. It also runs the cheap mask checks (MAE keeps
exactly 49 of 196 tokens; SimMIM masks exactly 22 of 36 blocks, 88 of 144 patches), as the GPU
path does.
"""
import argparse
import contextlib
import dataclasses
import functools
import json
import math
import platform
import statistics
import sys
import time
import types

try:  # The model classes below subclass nn.Module; `main` reports a missing install clearly.
  import torch  # First, so that with neither installed the message names torch.
  import torch.nn.functional as F
  from torch import nn
  import timm
  from timm.models.vision_transformer import Block, PatchEmbed
  _IMPORT_ERROR = None
except ImportError as _e:
  timm = torch = F = Block = PatchEmbed = None
  nn = types.SimpleNamespace(Module=object)
  _IMPORT_ERROR = _e


@dataclasses.dataclass(frozen=True)
class Job:
  """One `jkd bench` job's PyTorch counterpart.

  Attributes:
    kind: the step, as jkd's bench.json `job`: supervised, distill, mae, simmim or compress.
    timm_model: the trained network's timm name (the student of a KD job, the encoder's
      architecture for MAE/SimMIM).
    image_size: input side in pixels.
    channels_last: NHWC memory format (ResNet).
    teacher: timm name of the frozen teacher (KD only).
  """
  kind: str
  timm_model: str
  image_size: int = 224
  channels_last: bool = False
  teacher: str | None = None


JOBS = {
    'vit_b16': Job('supervised', 'vit_base_patch16_224'),
    'vit_s16': Job('supervised', 'vit_small_patch16_224'),
    'resnet50': Job('supervised', 'resnet50', channels_last=True),
    'kd_vit_b16_s16': Job('distill', 'vit_small_patch16_224', teacher='vit_base_patch16_224'),
    'mae_vit_b16': Job('mae', 'vit_base_patch16_224'),
    'simmim_vit_b16': Job('simmim', 'vit_base_patch16_224', image_size=192),
    'qat_vit_s16': Job('compress', 'vit_small_patch16_224'),
}

# ViT-B/16 as timm's vit_base_patch16_224 (and MAE's encoder): width, depth, heads, LN eps 1e-6.
VIT_B16 = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12)
LN = functools.partial(nn.LayerNorm, eps=1e-6) if _IMPORT_ERROR is None else None


def _require_torch(device: str):
  """Imports torch and timm, or exits with code 2 and what to install or where to run."""
  if _IMPORT_ERROR is not None:
    _fail(f'{_IMPORT_ERROR.name} is not installed. Install the PyTorch extras with '
          "`pip install -e '.[torch]'` (torch with CUDA, and timm) and run again.")
  if device == 'cuda' and not torch.cuda.is_available():
    _fail(f'no CUDA GPU is visible to torch (torch {torch.__version__}, CUDA build '
          f'{torch.version.cuda}). The reference timings need an NVIDIA GPU; run this on the '
          'GPU machine (or pass --device cpu --no-compile --batch-size 2 for a functional '
          'check).')
  return torch


def _fail(message: str):
  print(f'timm_reference.py: error: {message}', file=sys.stderr)
  sys.exit(2)


# ------------------------------------------------------------------------------------------
# Shared pieces
# ------------------------------------------------------------------------------------------


def sincos_2d(width: int, grid: int):
  """Fixed 2-D sin-cos position embedding, (1, grid*grid, width) float32, raster order.

  The first half of the channels encodes the row, the second the column; each half is
  [sin(pos · ω), cos(pos · ω)] with ω_k = 10000^(-k / (width/4)), k < width/4 (MAE's
  frequencies). A fixed buffer: it changes what is learned, not what a step costs.
  """
  assert width % 4 == 0, width
  omega = 1.0 / 10000 ** (torch.arange(width // 4, dtype=torch.float64) / (width / 4))
  pos = torch.arange(grid, dtype=torch.float64)
  rows, cols = torch.meshgrid(pos, pos, indexing='ij')

  def encode(p):  # (grid*grid,) -> (grid*grid, width/2)
    angles = p.reshape(-1, 1) * omega
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)

  return torch.cat([encode(rows), encode(cols)], dim=1).float().unsqueeze(0)


def _init_like_mae(module):
  """MAE's init (from the JAX ViT): xavier-uniform Linear weights, zero biases, unit LayerNorm."""
  if isinstance(module, nn.Linear):
    nn.init.xavier_uniform_(module.weight)
    if module.bias is not None:
      nn.init.zeros_(module.bias)
  elif isinstance(module, nn.LayerNorm):
    nn.init.ones_(module.weight)
    nn.init.zeros_(module.bias)


def _vit_blocks(width: int, depth: int, heads: int, drop_path: float = 0.0):
  """`depth` timm ViT blocks (MLP ratio 4, qkv bias, LN eps 1e-6); stochastic depth rising
  linearly from 0 at the first block to `drop_path` at the last (jkd's and SimMIM's schedule)."""
  rates = torch.linspace(0, drop_path, depth).tolist()
  return nn.Sequential(*[Block(width, heads, mlp_ratio=4.0, qkv_bias=True, drop_path=r,
                               norm_layer=LN) for r in rates])


def _patch_embed(image_size: int, patch: int, width: int):
  """timm's PatchEmbed, its conv initialised like a Linear on the flattened patch (MAE)."""
  embed = PatchEmbed(image_size, patch, 3, width)
  w = embed.proj.weight.data
  nn.init.xavier_uniform_(w.view(w.shape[0], -1))
  return embed


# ------------------------------------------------------------------------------------------
# MAE
# ------------------------------------------------------------------------------------------


class MaskedAutoencoder(nn.Module):
  """MAE ViT-B/16 pretraining step: forward returns the loss.

    x        = PatchEmbed(imgs) + pos                                 (N, L, D)
    keep     = int(L · (1 - ratio));  ids_shuffle = argsort(U[0, 1)^(N, L))  (small noise kept)
    ids_restore = argsort(ids_shuffle);  m = 1 where ids_restore >= keep  (removed patches)
    enc_in   = [cls] + gather(x, ids_shuffle[:, :keep])               (N, [1 +] keep, D)
    z        = LN(Blocks(enc_in))
    dec      = unshuffle([Linear_Dd(z), mask_token × (L - keep)], ids_restore) + pos_d
    pred     = Linear_{p²·3}(LN(Blocks_d([cls] + dec)))               (N, L, p²·3)
    target   = (patch - mean) / sqrt(var_unbiased + 1e-6)  per patch  (norm_pix_loss)
    loss     = Σ_{n,l} m[n,l] · mean_d (pred - target)² / Σ m

  At initialisation the loss is about 1 + E[pred²] ≈ 1.8: the normalised target contributes
  (d - 1)/d and the independent prediction its second moment (512 · 2/(512 + 768) = 0.8 for the
  xavier-initialised decoder_pred after a LayerNorm).

  Reference: He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022,
  facebookresearch/mae `models_mae.py` (written anew here from its description).
  """

  def __init__(self, *, image_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12,
               decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, mask_ratio=0.75,
               norm_pix_loss=True, class_token=True):
    super().__init__()
    self.patch_size, self.mask_ratio, self.norm_pix_loss = patch_size, mask_ratio, norm_pix_loss
    grid = image_size // patch_size
    self.num_patches = grid * grid
    self.len_keep = int(self.num_patches * (1 - mask_ratio))  # Python truncation, as MAE.
    self.patch_embed = _patch_embed(image_size, patch_size, embed_dim)
    # The class token has a zero position embedding in MAE, so it simply gets none here.
    self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
    self.register_buffer('pos_embed', sincos_2d(embed_dim, grid), persistent=False)
    self.blocks = _vit_blocks(embed_dim, depth, num_heads)
    self.norm = LN(embed_dim)
    self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
    self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
    self.register_buffer('decoder_pos_embed', sincos_2d(decoder_embed_dim, grid),
                         persistent=False)
    self.decoder_blocks = _vit_blocks(decoder_embed_dim, decoder_depth, decoder_num_heads)
    self.decoder_norm = LN(decoder_embed_dim)
    self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size ** 2 * 3)
    self.apply(_init_like_mae)
    for token in (self.cls_token, self.mask_token):
      if token is not None:
        nn.init.normal_(token, std=0.02)

  def random_masking(self, n: int, device):
    """Per-example uniform random subset of `len_keep` patches.

    Returns (ids_keep (n, keep), ids_restore (n, L), mask (n, L) float, 1 = removed).
    """
    noise = torch.rand(n, self.num_patches, device=device)
    ids_shuffle = torch.argsort(noise, dim=1)      # small noise is kept
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    # A patch is removed iff its position in the shuffled order is past the kept ones: the
    # same mask as scattering [0]*keep + [1]*(L - keep) back through ids_restore.
    mask = (ids_restore >= self.len_keep).float()
    return ids_shuffle[:, :self.len_keep], ids_restore, mask

  def patchify(self, imgs):
    """(N, 3, H, W) -> (N, L, p·p·3), each patch's pixels in (row, column, channel) order."""
    n, c, h, w = imgs.shape
    p = self.patch_size
    x = imgs.reshape(n, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(n, (h // p) * (w // p), p * p * c)

  def target(self, imgs):
    """(N, L, p·p·3) regression target: the patches, normalised per patch if norm_pix_loss."""
    target = self.patchify(imgs)
    if self.norm_pix_loss:
      mean = target.mean(dim=-1, keepdim=True)
      var = target.var(dim=-1, keepdim=True)  # unbiased, as MAE
      target = (target - mean) / (var + 1e-6) ** 0.5
    return target

  def check(self, batch: int, device) -> list[str]:
    """Asserts the mask keeps exactly `len_keep` patches per example and the norm-pix target
    has zero mean and unit (unbiased) variance per patch; returns what it checked."""
    ids_keep, ids_restore, mask = self.random_masking(batch, device)
    removed = self.num_patches - self.len_keep
    assert ids_keep.shape == (batch, self.len_keep), ids_keep.shape
    assert bool((mask.sum(1) == removed).all()), mask.sum(1)
    # The kept indices are distinct and exactly the unmasked patches.
    assert bool((mask.gather(1, ids_keep) == 0).all())
    assert bool((torch.sort(ids_restore, 1).values == torch.arange(
        self.num_patches, device=device)).all())
    if self.num_patches == 196 and self.mask_ratio == 0.75:
      assert self.len_keep == 49, self.len_keep
    if self.norm_pix_loss:
      side = int(self.num_patches ** 0.5) * self.patch_size
      target = self.target(torch.rand(batch, 3, side, side, device=device))
      assert float(target.mean(-1).abs().max()) < 1e-4
      assert float((target.var(-1) - 1).abs().max()) < 1e-3
    return [f'MAE keeps {self.len_keep} of {self.num_patches} patches per example '
            f'(removes {removed})']

  def forward(self, imgs):
    n = imgs.shape[0]
    x = self.patch_embed(imgs) + self.pos_embed
    ids_keep, ids_restore, mask = self.random_masking(n, imgs.device)
    d = x.shape[-1]
    x = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, d))
    if self.cls_token is not None:
      x = torch.cat([self.cls_token.expand(n, -1, -1), x], dim=1)
    x = self.norm(self.blocks(x))

    x = self.decoder_embed(x)
    prefix = 1 if self.cls_token is not None else 0
    cls, x = x[:, :prefix], x[:, prefix:]
    fill = self.mask_token.to(x.dtype).expand(n, self.num_patches - x.shape[1], -1)
    x = torch.cat([x, fill], dim=1)
    x = torch.gather(x, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    x = x + self.decoder_pos_embed
    x = torch.cat([cls.to(x.dtype), x], dim=1)
    x = self.decoder_norm(self.decoder_blocks(x))
    pred = self.decoder_pred(x)[:, prefix:]

    per_patch = ((pred.float() - self.target(imgs)) ** 2).mean(dim=-1)
    return (per_patch * mask).sum() / mask.sum()


# ------------------------------------------------------------------------------------------
# SimMIM
# ------------------------------------------------------------------------------------------


class SimMIM(nn.Module):
  """SimMIM ViT-B/16 pretraining step: forward returns the loss.

    m        = random block mask: ceil(g² · ratio) of the g×g grid of `mask_patch_size` blocks,
               each repeated (mask_patch_size / p)² times onto the patch grid      (N, h, w)
    x        = PatchEmbed(imgs);  x <- x · (1 - m) + mask_token · m;  x += pos
    z        = LN(Blocks([cls] + x))[patch tokens]                                 (N, h·w, D)
    x_rec    = PixelShuffle_p(Conv1×1_{p²·3}(z as (N, D, h, w)))                   (N, 3, H, W)
    loss     = Σ |imgs - x_rec| · m_pixels / (Σ m_pixels + 1e-5) / 3

  Reference: Xie et al., "SimMIM: A Simple Framework for Masked Image Modeling", CVPR 2022,
  microsoft/SimMIM `models/simmim.py` and `data/data_simmim.py` (`MaskGenerator`).
  """

  def __init__(self, *, image_size=192, patch_size=16, embed_dim=768, depth=12, num_heads=12,
               drop_path=0.1, mask_patch_size=32, mask_ratio=0.6, class_token=True):
    super().__init__()
    if image_size % mask_patch_size or mask_patch_size % patch_size:
      raise ValueError(f'image size {image_size}, mask patch {mask_patch_size} and patch '
                       f'{patch_size} must divide each other')
    self.patch_size, self.grid = patch_size, image_size // patch_size
    self.mask_grid = image_size // mask_patch_size
    self.mask_scale = mask_patch_size // patch_size
    # The same float expression as SimMIM's MaskGenerator (and jkd.masking.simmim_mask).
    self.mask_count = int(math.ceil(self.mask_grid ** 2 * mask_ratio))
    self.patch_embed = _patch_embed(image_size, patch_size, embed_dim)
    self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
    self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
    self.register_buffer('pos_embed', sincos_2d(embed_dim, self.grid), persistent=False)
    self.blocks = _vit_blocks(embed_dim, depth, num_heads, drop_path)
    self.norm = LN(embed_dim)
    self.decoder = nn.Sequential(nn.Conv2d(embed_dim, patch_size ** 2 * 3, kernel_size=1),
                                 nn.PixelShuffle(patch_size))
    self.apply(_init_like_mae)
    for token in (self.cls_token, self.mask_token):
      if token is not None:
        nn.init.trunc_normal_(token, std=0.02)

  def random_mask(self, n: int, device):
    """(n, h, w) float, 1 = masked: `mask_count` random blocks per example, at patch scale."""
    cells = self.mask_grid ** 2
    rank = torch.argsort(torch.argsort(torch.rand(n, cells, device=device), dim=1), dim=1)
    mask = (rank < self.mask_count).float().reshape(n, self.mask_grid, self.mask_grid)
    return mask.repeat_interleave(self.mask_scale, 1).repeat_interleave(self.mask_scale, 2)

  def check(self, batch: int, device) -> list[str]:
    """Asserts every example masks exactly `mask_count` blocks; returns what it checked."""
    mask = self.random_mask(batch, device)
    per_example = mask.flatten(1).sum(1)
    expected = self.mask_count * self.mask_scale ** 2
    assert mask.shape == (batch, self.grid, self.grid), mask.shape
    assert bool((per_example == expected).all()), per_example
    # Constant over each mask block: the block grid, not single patches, is what was drawn.
    blocks = mask.reshape(batch, self.mask_grid, self.mask_scale, self.mask_grid,
                          self.mask_scale)
    assert bool((blocks.amax((2, 4)) == blocks.amin((2, 4))).all())
    if self.grid == 12 and self.mask_grid == 6:
      assert (self.mask_count, expected) == (22, 88), (self.mask_count, expected)
    return [f'SimMIM masks {self.mask_count} of {self.mask_grid ** 2} blocks = {expected} of '
            f'{self.grid ** 2} patches ({expected / self.grid ** 2:.3f}) per example']

  def forward(self, imgs):
    n, c = imgs.shape[:2]
    mask = self.random_mask(n, imgs.device)
    x = self.patch_embed(imgs)
    m = mask.reshape(n, -1, 1).to(x.dtype)
    x = x * (1 - m) + self.mask_token.to(x.dtype) * m
    x = x + self.pos_embed
    if self.cls_token is not None:
      x = torch.cat([self.cls_token.expand(n, -1, -1), x], dim=1)
    x = self.norm(self.blocks(x))
    if self.cls_token is not None:
      x = x[:, 1:]
    z = x.transpose(1, 2).reshape(n, -1, self.grid, self.grid)
    x_rec = self.decoder(z)
    p = self.patch_size
    pixel_mask = mask.repeat_interleave(p, 1).repeat_interleave(p, 2).unsqueeze(1)
    loss = F.l1_loss(imgs, x_rec.float(), reduction='none')
    return (loss * pixel_mask).sum() / (pixel_mask.sum() + 1e-5) / c


# ------------------------------------------------------------------------------------------
# KD
# ------------------------------------------------------------------------------------------


class Distiller(nn.Module):
  """One KD step's forward: frozen teacher, trained student; returns the loss.

    loss = w_ce · CE(s, y) + w_kd · T² · (1/N) Σ_n KL(softmax(t_n/T) ‖ softmax(s_n/T))

  Reference: Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network", 2015;
  `jkd.losses.kd`.
  """

  def __init__(self, teacher, student, temperature=4.0, ce_weight=0.1, kd_weight=0.9):
    super().__init__()
    self.teacher, self.student = teacher.eval().requires_grad_(False), student
    self.temperature, self.ce_weight, self.kd_weight = temperature, ce_weight, kd_weight

  def train(self, mode: bool = True):
    super().train(mode)
    self.teacher.eval()  # Frozen: never in training mode, whatever the wrapper's mode.
    return self

  def kd(self, s, t):
    """T² · batch mean of KL(softmax(t/T) ‖ softmax(s/T)); s, t: (N, classes) fp32 logits."""
    temp = self.temperature
    return F.kl_div(F.log_softmax(s / temp, dim=-1), F.log_softmax(t / temp, dim=-1),
                    reduction='batchmean', log_target=True) * temp ** 2

  def check(self, device) -> list[str]:
    """Asserts the KD term against its definition on random logits; returns what it checked."""
    s, t = torch.randn(2, 2, 10, device=device) * 3
    p_t = torch.softmax(t / self.temperature, -1)
    by_hand = (p_t * (torch.log(p_t) - torch.log_softmax(s / self.temperature, -1))).sum(-1)
    kd = self.kd(s, t)
    assert abs(float(kd - self.temperature ** 2 * by_hand.mean())) < 1e-4, kd
    assert float(kd) > 0 and abs(float(self.kd(s, s))) < 1e-6
    return [f'KD term = T² · mean KL(p_t ‖ p_s), T = {self.temperature:g}, zero when s = t']

  def forward(self, images, labels):
    with torch.no_grad():
      t = self.teacher(images).float()
    s = self.student(images).float()
    return self.ce_weight * F.cross_entropy(s, labels) + self.kd_weight * self.kd(s, t)


# ------------------------------------------------------------------------------------------
# QAT
# ------------------------------------------------------------------------------------------


def fake_quant(x, keep_dims: tuple[int, ...], bits: int = 8):
  """Symmetric dynamic-range fake quantization with a straight-through gradient.

    s = max|x| / (2^(b-1) - 0.5)  over every axis not in `keep_dims`   (Qwix's bound, 127.5)
    q = clip(round(x / s), -2^(b-1), 2^(b-1) - 1);   out = q·s + (x - stopgrad(x))

  so d out / d x = 1 (STE, Bengio et al. 2013). `jkd.compress.quant.fake_quant` in torch; the
  scale is computed in float32 from the detached input, the result is in x's dtype. At the
  exact tie x / s = -127.5 (a group's negative absmax element) this rounds to -128 where XLA's
  division can land just inside and give -127: one step on one element, no cost difference.
  """
  keep = {d % x.ndim for d in keep_dims}
  reduce = tuple(d for d in range(x.ndim) if d not in keep)
  xd = x.detach().float()
  absmax = xd.abs().amax(dim=reduce, keepdim=True)
  scale = torch.where(absmax > 0, absmax / (2.0 ** (bits - 1) - 0.5), torch.ones_like(absmax))
  q = torch.clamp(torch.round(xd / scale), -2 ** (bits - 1), 2 ** (bits - 1) - 1)
  # (x - x.detach()) is exactly 0 with gradient 1: the forward value is q·s in x's dtype.
  return (q * scale).to(x.dtype) + (x - x.detach())


def check_fake_quant(device) -> list[str]:
  """Asserts `fake_quant`'s per-token int8 grid, its error bound and its STE gradient."""
  x = (torch.randn(3, 5, 64, device=device) * torch.rand(3, 5, 1, device=device) * 4
       ).requires_grad_(True)
  y = fake_quant(x, keep_dims=(0, 1))
  y.sum().backward()
  scale = x.detach().abs().amax(-1, keepdim=True) / 127.5
  levels = y.detach() / scale
  assert float((levels - levels.round()).abs().max()) < 1e-3   # on the int grid of its token
  assert float(levels.min()) >= -128 - 1e-3 and float(levels.max()) <= 127 + 1e-3
  assert float(((y.detach() - x.detach()).abs() - scale / 2).max()) <= 1e-6  # |error| <= s/2
  assert bool((x.grad == 1).all())                                           # STE
  return ['fake quant: int8 grid per token, |error| <= s/2, gradient 1 (STE)']


class FakeQuantLinear(nn.Module):
  """An nn.Linear computing on int8 fake-quantized weights (per output channel) and inputs
  (per token: every axis but the last, as Qwix's dot_general). Wraps, and trains, `layer`'s
  own parameters."""

  def __init__(self, layer, compute_dtype):
    super().__init__()
    self.layer, self.compute_dtype = layer, compute_dtype

  def forward(self, x):
    # Quantize what the matmul will read: the autocast dtype (bf16 on GPU), not fp32 masters.
    w = fake_quant(self.layer.weight.to(self.compute_dtype), keep_dims=(0,))
    x = fake_quant(x.to(self.compute_dtype), keep_dims=tuple(range(x.ndim - 1)))
    return F.linear(x, w, self.layer.bias)


class FakeQuantConv2d(nn.Module):
  """An nn.Conv2d on int8 fake-quantized weights (per output channel) and inputs (per
  example, as Qwix's conv_general_dilated)."""

  def __init__(self, layer, compute_dtype):
    super().__init__()
    self.layer, self.compute_dtype = layer, compute_dtype

  def forward(self, x):
    w = fake_quant(self.layer.weight.to(self.compute_dtype), keep_dims=(0,))
    x = fake_quant(x.to(self.compute_dtype), keep_dims=(0,))
    return self.layer._conv_forward(x, w, self.layer.bias)  # pylint: disable=protected-access


def quantize_for_training(model, compute_dtype):
  """Wraps every nn.Linear and nn.Conv2d of `model` in place; returns how many were wrapped."""
  wrappers = {nn.Linear: FakeQuantLinear, nn.Conv2d: FakeQuantConv2d}
  targets = [(name, m) for name, m in model.named_modules() if type(m) in wrappers]
  for name, layer in targets:
    parent_name, _, attr = name.rpartition('.')
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, wrappers[type(layer)](layer, compute_dtype))
  return len(targets)


# ------------------------------------------------------------------------------------------
# Building and timing a job
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Built:
  """A job ready to time: `model` (what torch.compile wraps), `loss(forward)` (one step's loss
  given the possibly compiled model), the trained parameters, AdamW's lr and betas, the
  gradient-norm clip (0: none), what goes into the results (`kwargs`, `extra`) and the
  descriptions of the checks that passed while building."""
  model: object
  loss: object
  params: list
  lr: float
  betas: tuple[float, float] = (0.9, 0.999)
  clip: float = 0.0
  kwargs: dict = dataclasses.field(default_factory=dict)
  extra: dict = dataclasses.field(default_factory=dict)
  checks: list = dataclasses.field(default_factory=list)


def _vit_kwargs(timm_name: str, gap: bool) -> dict:
  kwargs = {'num_classes': 1000}
  if gap and timm_name.startswith('vit'):
    kwargs.update(class_token=False, global_pool='avg')
  return kwargs


def build_job(name: str, *, batch_size: int, gap: bool, device) -> Built:
  """Builds model, inputs, loss and optimizer settings of job `name` (a key of JOBS)."""
  job = JOBS[name]
  memory_format = torch.channels_last if job.channels_last else torch.contiguous_format
  # bf16 on the GPU (autocast); the CPU check runs in float32 (see the module docstring).
  compute_dtype = torch.bfloat16 if device.type == 'cuda' else torch.float32
  images = torch.randn(batch_size, 3, job.image_size, job.image_size, device=device).contiguous(
      memory_format=memory_format)
  labels = torch.randint(0, 1000, (batch_size,), device=device)

  if job.kind in ('supervised', 'compress'):
    kwargs = _vit_kwargs(job.timm_model, gap)
    model = timm.create_model(job.timm_model, **kwargs)
    extra = {}
    if job.kind == 'compress':
      extra['fake_quant_layers'] = quantize_for_training(model, compute_dtype)
      extra['quantization'] = ('int8 symmetric fake quant, STE: weights per output channel; '
                               'inputs dynamic absmax, per token (Linear) / per example (conv)')
    model = model.to(device, memory_format=memory_format)
    return Built(model, lambda f: F.cross_entropy(f(images), labels), list(model.parameters()),
                 lr=1e-3, kwargs=kwargs, extra=extra,
                 checks=check_fake_quant(device) if job.kind == 'compress' else [])

  if job.kind == 'distill':
    kwargs = _vit_kwargs(job.timm_model, gap)
    student = timm.create_model(job.timm_model, **kwargs).to(device)
    # jkd keeps a bf16 teacher's weights in bf16 (never trained: fp32 masters buy nothing).
    teacher = timm.create_model(job.teacher, **_vit_kwargs(job.teacher, gap)).to(
        device, dtype=compute_dtype)
    model = Distiller(teacher, student)
    return Built(model, lambda f: f(images, labels), list(student.parameters()), lr=1e-3,
                 kwargs=kwargs, extra={'timm_teacher': job.teacher, 'temperature': 4.0,
                                       'loss': '0.1 CE + 0.9 KD'},
                 checks=model.check(device))

  if job.kind == 'mae':
    kwargs = dict(image_size=job.image_size, **VIT_B16, decoder_embed_dim=512, decoder_depth=8,
                  decoder_num_heads=16, mask_ratio=0.75, norm_pix_loss=True,
                  class_token=not gap)
    model = MaskedAutoencoder(**kwargs).to(device)
    return Built(model, lambda f: f(images), list(model.parameters()), lr=1.5e-4,
                 betas=(0.9, 0.95), kwargs=kwargs, checks=model.check(batch_size, device))

  if job.kind == 'simmim':
    kwargs = dict(image_size=job.image_size, **VIT_B16, drop_path=0.1, mask_patch_size=32,
                  mask_ratio=0.6, class_token=not gap)
    model = SimMIM(**kwargs).to(device)
    return Built(model, lambda f: f(images), list(model.parameters()), lr=8e-4,
                 betas=(0.9, 0.999), clip=5.0, kwargs=kwargs,
                 checks=model.check(batch_size, device))
  raise ValueError(f'unknown job kind {job.kind!r}')


def bench_model(name: str, *, batch_size: int, warmup: int, steps: int, repeats: int,
                compile_model: bool, gap: bool, device: str = 'cuda') -> dict:
  """Times the train step of job `name` (a key of JOBS); returns img/s and the details."""
  _require_torch(device)
  torch.manual_seed(0)
  on_gpu = device == 'cuda'
  if on_gpu:
    torch.backends.cudnn.benchmark = True
    # TF32 for any fp32 matmul left outside autocast, as XLA's default precision on GPU does.
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
  dev = torch.device(device)
  job = JOBS[name]
  built = build_job(name, batch_size=batch_size, gap=gap, device=dev)
  model = built.model
  model.train()
  optimizer = torch.optim.AdamW(built.params, lr=built.lr, betas=built.betas, weight_decay=0.05,
                                fused=on_gpu)
  forward = torch.compile(model) if compile_model else model
  autocast = (functools.partial(torch.autocast, 'cuda', dtype=torch.bfloat16) if on_gpu
              else contextlib.nullcontext)
  sync = torch.cuda.synchronize if on_gpu else (lambda: None)  # CPU ops are synchronous.

  def step():
    with autocast():
      loss = built.loss(forward)
    loss.backward()
    if built.clip:
      torch.nn.utils.clip_grad_norm_(built.params, built.clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss

  t0 = time.perf_counter()
  initial_loss = None
  for i in range(warmup):
    loss = step()
    if i == 0:  # The loss at initialisation (one sync, in the untimed warm-up only).
      initial_loss = float(loss.detach())
  sync()
  warmup_s = time.perf_counter() - t0
  if on_gpu:
    torch.cuda.reset_peak_memory_stats()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(steps):
      loss = step()
    sync()
    times.append((time.perf_counter() - t0) / steps)
  step_s = statistics.median(times)
  final_loss = float(loss.detach())
  return {
      'model': name,
      'job': job.kind,
      'timm_model': job.timm_model,
      'timm_kwargs': built.kwargs,
      **built.extra,
      'channels_last': job.channels_last,
      'compiled': compile_model,
      'batch_size': batch_size,
      'image_size': job.image_size,
      'examples_per_sec': round(batch_size / step_s, 2),
      'step_ms': round(step_s * 1e3, 3),
      'step_ms_all': [round(t * 1e3, 3) for t in times],
      'peak_memory_bytes': int(torch.cuda.max_memory_allocated()) if on_gpu else None,
      'warmup_s': round(warmup_s, 2),
      'initial_loss': initial_loss,
      'final_loss': final_loss if math.isfinite(final_loss) else str(final_loss),
      'checks': built.checks,
      'device': (torch.cuda.get_device_name() if on_gpu else
                 f'cpu ({platform.machine()}, {torch.get_num_threads()} threads)'),
      'autocast': 'bfloat16' if on_gpu else 'none (float32)',
      'torch_version': torch.__version__,
      'timm_version': timm.__version__,
      'input': f'one fixed synthetic batch resident on the {"GPU" if on_gpu else "CPU"}: '
               'input pipeline not measured',
  }


def _loss_str(loss) -> str:
  return f'{loss:.4f}' if isinstance(loss, float) else str(loss)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--model', choices=[*JOBS, 'all'], default='all',
                      help='a jkd bench job (configs/bench/<job>.py), or all')
  parser.add_argument('--batch-size', type=int, default=256)
  parser.add_argument('--warmup', type=int, default=None,
                      help='untimed steps, compilation included (jkd: config.bench.warmup_steps;'
                           ' default 3, on cpu 1)')
  parser.add_argument('--steps', type=int, default=None,
                      help='timed steps per repeat (default 10, on cpu 1)')
  parser.add_argument('--repeats', type=int, default=None,
                      help='the median repeat is reported (default 3, on cpu 1)')
  parser.add_argument('--no-compile', action='store_true', help='eager mode, no torch.compile')
  parser.add_argument('--gap', action='store_true',
                      help='ViTs without class token (as the jkd bench configs): supervised, KD '
                           'and QAT average-pooled, MAE/SimMIM encoders on patch tokens only')
  parser.add_argument('--device', choices=('cuda', 'cpu'), default='cuda',
                      help='cpu: a functional check (float32, no timing claim)')
  parser.add_argument('--json', help='write the results (a list) to this file')
  args = parser.parse_args(argv)
  _require_torch(args.device)
  cpu = args.device == 'cpu'
  warmup = args.warmup if args.warmup is not None else (1 if cpu else 3)
  steps = args.steps if args.steps is not None else (1 if cpu else 10)
  repeats = args.repeats if args.repeats is not None else (1 if cpu else 3)
  if min(steps, repeats) < 1 or warmup < 0:
    parser.error('--steps and --repeats must be at least 1, --warmup at least 0')
  names = list(JOBS) if args.model == 'all' else [args.model]
  results = []
  for name in names:
    r = bench_model(name, batch_size=args.batch_size, warmup=warmup, steps=steps,
                    repeats=repeats, compile_model=not args.no_compile, gap=args.gap,
                    device=args.device)
    results.append(r)
    peak = r['peak_memory_bytes']
    peak = f'{peak / 2**30:.2f} GiB' if peak is not None else 'n/a'
    print(f'{name:9s} timm {r["timm_model"]}: {r["examples_per_sec"]:,.1f} img/s, '
          f'{r["step_ms"]:.2f} ms/step (repeats {r["step_ms_all"]}), '
          f'peak {peak}, {r["device"]}', flush=True)
    initial, final = (_loss_str(r['initial_loss']), _loss_str(r['final_loss']))
    print(f'{"":9s} {r["job"]} step: loss {initial} at init, {final} after the timed steps'
          + ''.join(f'; {c}' for c in r['checks']), flush=True)
    if isinstance(r['final_loss'], str):
      print(f'warning: {name}: the loss is {final} after the timed steps; the timing stands but '
            'the step is numerically broken at these settings.', file=sys.stderr)
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(results, f, indent=2)
  return 0


if __name__ == '__main__':
  sys.exit(main())
