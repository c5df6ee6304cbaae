"""The masked-image-modeling objective: one method's mask drawing, forward pass and loss.

  objective = MimObjective(model, config, image_size)     # config: method, mask_ratio, ...
  mask = objective.draw_mask(key, batch)
  loss = objective.loss(objective.forward(params, images, mask, train=True), images, mask)

`jkd pretrain` trains with it, MIM distillation holds one per model, and a frozen SimMIM / MAE
teacher (`jkd.teacher`) carries its own. The models are `jkd.models.mim`, the masks
`jkd.masking`, the losses `jkd.losses.simmim_l1` / `mae_mse`.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jkd import losses, masking
from jkd.errors import UserError


class MimObjective:
  """Mask drawing, forward pass and loss of one method, shared by train, eval and figures.

  Attributes:
    model: the SimMIM or MAE module.
    method: 'simmim' or 'mae'.
    image_size: square input side in pixels.
  """

  def __init__(self, model: nn.Module, config, image_size: int):
    self.model, self.method, self.image_size = model, config.method, image_size
    self.patch = model.patch_size
    self.ratio = float(config.mask_ratio)
    self.mask_patch_size = int(config.get('mask_patch_size', 0) or self.patch)
    self.norm_pix = bool(config.get('norm_pix_loss', True))
    # As configured (mask_patch_size 0 = the model's patch): what a run records as `meta['mim']`.
    self.settings = {'method': self.method, 'mask_ratio': self.ratio,
                     'mask_patch_size': int(config.get('mask_patch_size', 0) or 0),
                     'norm_pix_loss': self.norm_pix}
    if self.method == 'simmim' and (image_size % self.mask_patch_size or
                                    self.mask_patch_size % self.patch):
      raise UserError(f'config.mask_patch_size={self.mask_patch_size} must divide the image size '
                      f'{image_size} and be a multiple of the model patch size {self.patch}.')

  def draw_mask(self, key: jax.Array, batch: int):
    """SimMIM: (B, n, n) int, 1 = masked. MAE: `masking.MaeMask`."""
    if self.method == 'simmim':
      return masking.simmim_mask(key, batch, self.image_size, self.mask_patch_size, self.patch,
                                 self.ratio)
    return masking.mae_mask(key, batch, (self.image_size // self.patch)**2, self.ratio)

  def patch_mask(self, mask) -> jax.Array:
    """(B, L) float, 1 where a patch is masked/removed."""
    if self.method == 'simmim':
      return mask.reshape(mask.shape[0], -1).astype(jnp.float32)
    return mask.mask

  def loss(self, pred, target, mask, row_weight=None) -> jax.Array:
    """Mean reconstruction loss; `row_weight` (B,) zeroes padded eval rows."""
    if self.method == 'simmim':
      pixel_mask = masking.upsample_mask(mask.astype(jnp.float32), self.patch)
      if row_weight is not None:
        pixel_mask = pixel_mask * row_weight[:, None, None]
      return losses.simmim_l1(pred, target, pixel_mask)
    patch_mask = mask.mask if row_weight is None else mask.mask * row_weight[:, None]
    return losses.mae_mse(pred, masking.patchify(target, self.patch), patch_mask,
                          norm_pix=self.norm_pix)

  def forward(self, params, images, mask, *, train: bool, key=None):
    rngs = {'dropout': key} if key is not None else {}
    return self.model.apply({'params': params}, images, mask, train=train, rngs=rngs)

  def reconstruct(self, pred, target, mask) -> tuple[jax.Array, jax.Array]:
    """(prediction, reconstruction) as normalised images (B, H, W, C).

    The prediction is the raw output everywhere (MAE's with norm_pix mapped back to pixels by
    each target patch's own mean and std, as MAE's visualisation does); the reconstruction
    pastes it into the visible patches of the original (MAE's demo).
    """
    _, h, w, c = target.shape
    p = self.patch
    if self.method == 'mae':
      if self.norm_pix:
        t = masking.patchify(target, p)
        mean = t.mean(-1, keepdims=True)
        var = t.var(-1, keepdims=True, ddof=1)
        pred = pred * jnp.sqrt(var + 1e-6) + mean
      pred = masking.unpatchify(pred, p, h // p, w // p, c)
    pixel = masking.upsample_mask(
        self.patch_mask(mask).reshape(-1, h // p, w // p), p)[..., None]
    return pred, target * (1 - pixel) + pred * pixel
