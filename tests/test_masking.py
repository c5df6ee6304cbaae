"""Tests for jkd.masking: exact counts and layouts of SimMIM/MAE masks, token helpers."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jkd import masking


# (image_size, mask_patch_size, model_patch_size, ratio): SimMIM's Swin and ViT settings, a
# Fashion-MNIST-sized one, and edge ratios.
SIMMIM_CASES = [
    (192, 32, 4, 0.6),
    (224, 32, 16, 0.6),
    (28, 14, 7, 0.5),
    (32, 8, 4, 0.3),
    (32, 4, 4, 0.75),
    (32, 8, 4, 0.0),
    (32, 8, 4, 1.0),
]


@pytest.mark.parametrize("image_size,mask_patch,model_patch,ratio", SIMMIM_CASES)
def test_simmim_mask_shape_and_exact_count(image_size, mask_patch, model_patch, ratio):
  batch = 5
  mask = masking.simmim_mask(jax.random.key(0), batch, image_size, mask_patch, model_patch,
                             ratio)
  n = image_size // model_patch
  assert mask.shape == (batch, n, n)
  assert mask.dtype == jnp.int32
  mask = np.asarray(mask)
  assert set(np.unique(mask)) <= {0, 1}
  token_count = (image_size // mask_patch)**2
  scale = mask_patch // model_patch
  expected = math.ceil(token_count * ratio)
  np.testing.assert_array_equal(mask.sum(axis=(1, 2)), [expected * scale**2] * batch)


@pytest.mark.parametrize("image_size,mask_patch,model_patch,ratio", SIMMIM_CASES[:4])
def test_simmim_mask_is_constant_on_scale_blocks(image_size, mask_patch, model_patch, ratio):
  mask = np.asarray(
      masking.simmim_mask(jax.random.key(1), 4, image_size, mask_patch, model_patch, ratio))
  scale = mask_patch // model_patch
  grid = image_size // mask_patch
  blocks = mask.reshape(4, grid, scale, grid, scale)
  coarse = blocks[:, :, 0, :, 0]
  np.testing.assert_array_equal(blocks, np.broadcast_to(coarse[:, :, None, :, None],
                                                        blocks.shape))
  # Coarse count is SimMIM's mask_count.
  np.testing.assert_array_equal(coarse.sum(axis=(1, 2)), math.ceil(grid**2 * ratio))


def test_simmim_mask_randomness():
  args = (8, 192, 32, 4, 0.6)
  a = np.asarray(masking.simmim_mask(jax.random.key(0), *args))
  a_again = np.asarray(masking.simmim_mask(jax.random.key(0), *args))
  b = np.asarray(masking.simmim_mask(jax.random.key(1), *args))
  np.testing.assert_array_equal(a, a_again)
  assert not np.array_equal(a, b)
  # Examples of one batch are drawn independently: all 8 differ (36 choose 22 possibilities).
  assert len({m.tobytes() for m in a}) == len(a)


def test_simmim_mask_is_roughly_uniform_over_positions():
  # Every mask-patch should be masked with probability mask_count / token_count.
  mask = np.asarray(masking.simmim_mask(jax.random.key(3), 4000, 32, 8, 8, 0.5))
  freq = mask.mean(axis=0)
  np.testing.assert_allclose(freq, 8 / 16, atol=0.05)


def test_simmim_mask_under_jit():
  fn = jax.jit(masking.simmim_mask, static_argnums=(1, 2, 3, 4, 5))
  key = jax.random.key(4)
  np.testing.assert_array_equal(fn(key, 3, 192, 32, 4, 0.6),
                                masking.simmim_mask(key, 3, 192, 32, 4, 0.6))
  # Also traced with a key that is itself derived inside jit.
  out = jax.jit(lambda k: masking.simmim_mask(jax.random.split(k)[0], 2, 32, 8, 4, 0.6))(key)
  assert out.shape == (2, 8, 8)


@pytest.mark.parametrize(
    "image_size,mask_patch,model_patch,ratio,match",
    [
        (190, 32, 4, 0.6, r"image_size \(190\).*mask_patch_size \(32\)"),
        (192, 32, 5, 0.6, r"mask_patch_size \(32\).*model_patch_size \(5\)"),
        (192, 4, 8, 0.6, r"mask_patch_size \(4\).*model_patch_size \(8\)"),
        (192, 32, 4, 1.5, r"ratio"),
        (192, 32, 4, -0.1, r"ratio"),
        (192, 0, 4, 0.6, r"mask_patch_size"),
    ],
)
def test_simmim_mask_validation(image_size, mask_patch, model_patch, ratio, match):
  with pytest.raises(ValueError, match=match):
    masking.simmim_mask(jax.random.key(0), 2, image_size, mask_patch, model_patch, ratio)


@pytest.mark.parametrize("num_patches,ratio", [(196, 0.75), (49, 0.75), (16, 0.6), (10, 0.0),
                                               (10, 1.0), (64, 0.5)])
def test_mae_mask_shapes_and_exact_counts(num_patches, ratio):
  batch = 3
  m = masking.mae_mask(jax.random.key(0), batch, num_patches, ratio)
  len_keep = int(num_patches * (1 - ratio))
  assert m.ids_keep.shape == (batch, len_keep) and m.ids_keep.dtype == jnp.int32
  assert m.ids_restore.shape == (batch, num_patches) and m.ids_restore.dtype == jnp.int32
  assert m.mask.shape == (batch, num_patches) and m.mask.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(m.mask).sum(axis=1), [num_patches - len_keep] * batch)
  # Kept ids are exactly the zeros of the mask, and distinct.
  for b in range(batch):
    keep = np.asarray(m.ids_keep[b])
    assert len(set(keep.tolist())) == len_keep
    np.testing.assert_array_equal(np.sort(keep), np.flatnonzero(np.asarray(m.mask[b]) == 0))


def test_mae_mask_matches_reference_recipe():
  # MAE's recipe, written out with numpy on the same noise.
  key, batch, num_patches, ratio = jax.random.key(7), 4, 49, 0.75
  m = masking.mae_mask(key, batch, num_patches, ratio)
  noise = np.asarray(jax.random.uniform(key, (batch, num_patches)))
  ids_shuffle = np.argsort(noise, axis=1, kind="stable")
  ids_restore = np.argsort(ids_shuffle, axis=1, kind="stable")
  len_keep = int(num_patches * (1 - ratio))
  ref_mask = np.ones((batch, num_patches), np.float32)
  ref_mask[:, :len_keep] = 0
  ref_mask = np.take_along_axis(ref_mask, ids_restore, axis=1)
  np.testing.assert_array_equal(m.ids_keep, ids_shuffle[:, :len_keep])
  np.testing.assert_array_equal(m.ids_restore, ids_restore)
  np.testing.assert_array_equal(m.mask, ref_mask)


def test_mae_ids_restore_inverts_shuffle():
  m = masking.mae_mask(jax.random.key(2), 4, 196, 0.75)
  ids_restore = np.asarray(m.ids_restore)
  # Recover the shuffle as the inverse permutation of ids_restore.
  ids_shuffle = np.argsort(ids_restore, axis=1)
  np.testing.assert_array_equal(ids_shuffle[:, :m.ids_keep.shape[1]], m.ids_keep)
  for b in range(4):
    np.testing.assert_array_equal(ids_shuffle[b][ids_restore[b]], np.arange(196))
    np.testing.assert_array_equal(ids_restore[b][ids_shuffle[b]], np.arange(196))


def test_mae_gather_append_unshuffle_round_trip():
  batch, num_patches, dim, ratio = 3, 16, 5, 0.75
  tokens = jax.random.normal(jax.random.key(0), (batch, num_patches, dim))
  m = masking.mae_mask(jax.random.key(1), batch, num_patches, ratio)
  kept = masking.gather_tokens(tokens, m.ids_keep)
  len_keep = m.ids_keep.shape[1]
  assert kept.shape == (batch, len_keep, dim)
  mask_token = jnp.full((dim,), 123.0)
  filler = jnp.broadcast_to(mask_token, (batch, num_patches - len_keep, dim))
  full = masking.unshuffle_tokens(jnp.concatenate([kept, filler], axis=1), m.ids_restore)
  assert full.shape == tokens.shape
  removed = np.asarray(m.mask, bool)
  full, tokens = np.asarray(full), np.asarray(tokens)
  np.testing.assert_array_equal(full[~removed], tokens[~removed])
  np.testing.assert_array_equal(full[removed], np.broadcast_to(123.0, full[removed].shape))


def test_unshuffle_tokens_rejects_missing_mask_tokens():
  m = masking.mae_mask(jax.random.key(1), 2, 16, 0.75)
  kept = jnp.zeros((2, m.ids_keep.shape[1], 4))
  with pytest.raises(ValueError, match="L=16"):
    masking.unshuffle_tokens(kept, m.ids_restore)


def test_gather_tokens_indexes_per_example():
  x = jnp.arange(2 * 4 * 3).reshape(2, 4, 3)
  ids = jnp.array([[3, 0], [1, 1]])
  out = np.asarray(masking.gather_tokens(x, ids))
  np.testing.assert_array_equal(out[0], np.asarray(x)[0, [3, 0]])
  np.testing.assert_array_equal(out[1], np.asarray(x)[1, [1, 1]])


def test_mae_mask_randomness():
  a = masking.mae_mask(jax.random.key(0), 8, 49, 0.75)
  a_again = masking.mae_mask(jax.random.key(0), 8, 49, 0.75)
  b = masking.mae_mask(jax.random.key(1), 8, 49, 0.75)
  np.testing.assert_array_equal(a.mask, a_again.mask)
  np.testing.assert_array_equal(a.ids_restore, a_again.ids_restore)
  assert not np.array_equal(a.mask, b.mask)
  assert len({np.asarray(row).tobytes() for row in a.mask}) == 8


def test_mae_mask_under_jit():
  fn = jax.jit(masking.mae_mask, static_argnums=(1, 2, 3))
  key = jax.random.key(5)
  jitted, eager = fn(key, 4, 49, 0.75), masking.mae_mask(key, 4, 49, 0.75)
  assert isinstance(jitted, masking.MaeMask)
  for x, y in zip(jitted, eager):
    np.testing.assert_array_equal(x, y)


def test_mae_mask_validation():
  with pytest.raises(ValueError, match="ratio"):
    masking.mae_mask(jax.random.key(0), 2, 16, 1.2)
  with pytest.raises(ValueError, match="num_patches"):
    masking.mae_mask(jax.random.key(0), 2, 0, 0.5)


@pytest.mark.parametrize("shape,p", [((2, 28, 28, 1), 7), ((3, 32, 16, 3), 4),
                                     ((1, 8, 8, 2), 8)])
def test_patchify_unpatchify_round_trip(shape, p):
  images = jax.random.normal(jax.random.key(0), shape)
  b, height, width, c = shape
  patches = masking.patchify(images, p)
  h, w = height // p, width // p
  assert patches.shape == (b, h * w, p * p * c)
  np.testing.assert_array_equal(masking.unpatchify(patches, p, h, w, c), images)


def test_patchify_matches_mae_ordering():
  # MAE on NCHW: reshape (B, C, h, p, w, p), einsum 'nchpwq->nhwpqc', flatten.
  b, c, height, width, p = 2, 3, 8, 12, 4
  nchw = np.random.default_rng(0).normal(size=(b, c, height, width)).astype(np.float32)
  h, w = height // p, width // p
  ref = np.einsum("nchpwq->nhwpqc", nchw.reshape(b, c, h, p, w, p)).reshape(b, h * w, p * p * c)
  out = masking.patchify(jnp.asarray(nchw.transpose(0, 2, 3, 1)), p)
  np.testing.assert_array_equal(out, ref)
  # Token t covers rows (t // w)*p..., columns (t % w)*p...
  nhwc = nchw.transpose(0, 2, 3, 1)
  np.testing.assert_array_equal(np.asarray(out)[:, w + 2].reshape(b, p, p, c),
                                nhwc[:, p:2 * p, 2 * p:3 * p])


def test_patchify_validation():
  with pytest.raises(ValueError, match="multiple of patch size 8"):
    masking.patchify(jnp.zeros((1, 28, 28, 1)), 8)
  with pytest.raises(ValueError, match="expected"):
    masking.unpatchify(jnp.zeros((1, 16, 48)), 4, 4, 4, 1)


def test_upsample_mask():
  mask = jnp.array([[[1, 0], [0, 1]]], jnp.int32)
  up = np.asarray(masking.upsample_mask(mask, 3))
  assert up.shape == (1, 6, 6) and up.dtype == np.int32
  np.testing.assert_array_equal(up[0], np.kron(np.asarray(mask[0]), np.ones((3, 3), np.int32)))
  np.testing.assert_array_equal(masking.upsample_mask(mask, 1), mask)


def test_simmim_pixel_mask_lines_up_with_patchify():
  # The SimMIM loss multiplies a pixel mask with images: upsampling the token mask by the model
  # patch size must mark exactly the pixels of the masked patch tokens.
  image_size, model_patch = 32, 4
  mask = masking.simmim_mask(jax.random.key(0), 2, image_size, 8, model_patch, 0.6)
  pixel_mask = masking.upsample_mask(mask, model_patch)
  assert pixel_mask.shape == (2, image_size, image_size)
  per_token = masking.patchify(pixel_mask[..., None], model_patch)
  np.testing.assert_array_equal(per_token.min(axis=-1), mask.reshape(2, -1))
  np.testing.assert_array_equal(per_token.max(axis=-1), mask.reshape(2, -1))


def test_sizes_must_be_integers_and_old_style_keys_work():
  with pytest.raises(ValueError, match="image_size must be a positive integer"):
    masking.simmim_mask(jax.random.key(0), 2, 32.0, 8, 4, 0.5)
  old_key = jax.random.PRNGKey(0)
  assert masking.simmim_mask(old_key, 2, 32, 8, 4, 0.5).shape == (2, 8, 8)
  assert masking.mae_mask(old_key, 2, 16, 0.75).mask.shape == (2, 16)
