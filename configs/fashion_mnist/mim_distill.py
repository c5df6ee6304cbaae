r"""MIM-teacher distillation on Fashion-MNIST: a masked vit_nano_p4 student against a frozen MAE or
SimMIM teacher (a `jkd pretrain` workdir).

  jkd pretrain --config configs/fashion_mnist/mae.py --workdir /tmp/fmnist_mae
  jkd distill --config configs/fashion_mnist/mim_distill.py --workdir /tmp/fmnist_mimkd \
    --config.teacher.workdir=/tmp/fmnist_mae
  jkd train --config configs/fashion_mnist/finetune.py --workdir /tmp/fmnist_mimkd_ft \
    --config.init_from=/tmp/fmnist_mimkd --config.model.name=vit_nano_p4

The student takes the teacher's method (MAE or SimMIM), patch size and, unless set here, mask
ratio and SimMIM mask block; it has its own decoder (`decoder_*` fields apply to an MAE student,
`posemb` to a SimMIM one). Recipes after the colon (see `jkd/trainers/mim_distill.py`):
  (default)  pixel + teacher_pixel: the true pixels and the teacher's predicted pixels at the
             masked positions (the seed design's hard + soft targets);
  :pixel     pixel only -- plain masked pretraining of the student, the baseline;
  :feature   pixel + masked_feature: the teacher's full-image encoder tokens at the masked
             positions (MaskDistill), through a linear projector;
  :tinymim   pixel + tinymim_relation: the teacher's last-block Q-K / V-V relations (TinyMIM);
  :tiny, :tiny-NAME   the test-suite size of each.
Terms and options can be changed from the command line, e.g.
`--config.losses.teacher_pixel.weight=0.5` or `--config.losses.masked_feature.tokens=visible`.
Then fine-tune the student (the command above; `finetune.py`'s ViT must be the student's).

Measured on the shared 2-core CPU (one seed; other jobs running, 80-110 examples/s): teacher
vit_mini_p4 MAE (mae.py, 250 steps at batch 64, eval loss 0.5837 on test[:1000]); each student
300 steps with `--config.total_steps=300 --config.batch_size=64 --config.optim.lr=6e-3
--config.optim.warmup_steps=25 --config.data.eval_split='test[:1000]'` (4-5 min), then
finetune.py with `--config.model.name=vit_nano_p4 --config.total_steps=400
--config.optim.warmup_steps=40` (5-6.5 min, full test set):
  :pixel    eval norm-pix MSE 0.5948, fine-tuned 68.04%
  default   eval 0.5950 (0.0094 from the teacher's pixels), fine-tuned 67.51%
  :feature  eval 0.5786 (below the teacher's 0.5837), fine-tuned 68.39%
  no pretraining, same fine-tuning: 68.28%.
The soft pixel target changes nothing this short: the pixel-only student already predicts
within 0.013 of the teacher. The feature target lowers the reconstruction loss; the accuracy
differences are within one seed's noise at 0.85 fine-tuning epochs.
"""
import ml_collections

from jkd.data import default_data_config
from jkd.defaults import base_config, shrink_for_tests

RECIPES = {
    'default': {'pixel': dict(weight=1.0), 'teacher_pixel': dict(weight=1.0)},
    'pixel': {'pixel': dict(weight=1.0)},
    'feature': {'pixel': dict(weight=1.0), 'masked_feature': dict(
        weight=1.0, tokens='masked', teacher_block=-1, distance='smooth_l1',
        normalize_target=True, projector='auto')},
    'tinymim': {'pixel': dict(weight=1.0), 'tinymim_relation': dict(
        weight=1.0, student_block=-1, teacher_block=-1, temperature=1.0)},
}
# Every option is spelled out (defaults of jkd.trainers.mim_distill.TERMS) so that each can be
# overridden from the command line.


def get_config(arg=None):
  arg = arg or 'default'
  tiny = arg == 'tiny' or arg.startswith('tiny-')  # Not ':tinymim', a recipe.
  recipe = arg.split('-', 1)[1] if tiny and '-' in arg else ('default' if tiny else arg)
  if recipe not in RECIPES:
    raise ValueError(f'unknown recipe {recipe!r}; use one of {", ".join(RECIPES)} '
                     '(or tiny, tiny-NAME)')
  c = base_config()
  c.method = 'mim'              # Routes `jkd distill` to jkd.trainers.mim_distill.
  c.data = default_data_config('fashion_mnist')
  c.data.crop_padding = 0
  c.teacher = ml_collections.ConfigDict({'workdir': '', 'checkpoint': '', 'model': '',
                                         'model_fields': {}, 'dtype': 'float32'})
  c.model = ml_collections.ConfigDict({
      'name': 'vit_nano_p4', 'dtype': 'float32', 'posemb': 'sincos2d_mae',
      'decoder_width': 128, 'decoder_depth': 2, 'decoder_heads': 4})
  c.losses = ml_collections.ConfigDict(RECIPES[recipe])
  c.mask_ratio = 0.0            # 0 = the teacher's.
  c.mask_patch_size = 0         # SimMIM only; 0 = the teacher's.
  c.norm_pix_loss = True        # MAE only: the hard target's (and so the soft target's) space.
  c.num_figure_images = 8
  c.batch_size = 256
  c.eval_batch_size = 1000
  c.num_epochs = 20.0
  c.optim.lr = 1.5e-3
  c.optim.lr_batch_base = 256
  c.optim.b2 = 0.95
  c.optim.weight_decay = 0.05
  c.optim.warmup_steps = 200
  c.optim.grad_clip = 0.0
  c.checkpoint_every = 1000
  c.log_every = 50
  if tiny:
    c.model.update(decoder_width=64, decoder_depth=1, decoder_heads=2)
    shrink_for_tests(c, total_steps=16, log_every=4, checkpoint_every=8, warmup_steps=2,
                     eval_examples=128)
    c.optim.lr = 2e-3
    c.optim.lr_batch_base = 0
  return c
