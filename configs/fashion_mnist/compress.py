r"""Compression of a trained Fashion-MNIST classifier: pruning and/or int8 QAT, then export.

  jkd train    --config configs/fashion_mnist/supervised.py --workdir /tmp/fmnist_sup
  jkd compress --config configs/fashion_mnist/compress.py:qat --workdir /tmp/fmnist_q8 \
               --config.init_from=/tmp/fmnist_sup
  jkd eval     --workdir /tmp/fmnist_q8 --export      # the exported integer model

Variants after the colon: `qat` (default: int8 weights per channel + int8 activations, QAT with
Qwix, 1 epoch), `ptq` (the same quantization, no training), `prune50` (50% global magnitude
pruning, cubic schedule, float export), `prune24` (2:4 semi-structured), `channel50`
(structured: half the channels of every group, BN-scale ranked, gradual, KD from
`--config.teacher.workdir`; a ViT loses half its attention heads and MLP units, L1-ranked;
`jkd export` writes the physically narrower model), `qat_kd` (int8 QAT
distilled from `--config.teacher.workdir`: 0.1 CE + 0.9 KD at T=4), `tiny` / `tiny-NAME` (test
size). The loss is `config.losses`, the logit terms of `jkd distill` (ce, kd, dkd, dist,
kd_logit_std), e.g. `--config.losses.kd.temperature=2`; `--config.kd_weight=W` (and
`--config.kd_temperature=T`) is a shorthand for CE weight 1 - W plus KD weight W. `config.model`
must name the model of `init_from` (default resnet8_s). Writes `export/` (weights.bin,
manifest.json, model.jaxexport) and summary.json with export_bytes, compression_ratio,
export_accuracy and sparsity.
"""
import ml_collections

from jkd.data import default_data_config
from jkd.defaults import base_config, parse_variant, shrink_for_tests
from jkd.deploy.export import default_deploy_config

VARIANTS = ('qat', 'ptq', 'prune50', 'prune24', 'qat_kd', 'channel50')


def get_config(arg=None):
  tiny, variant = parse_variant(arg, VARIANTS)
  c = base_config()
  c.data = default_data_config('fashion_mnist')
  c.model = ml_collections.ConfigDict({'name': 'resnet8_s', 'dtype': 'float32'})
  c.batch_size = 128
  c.num_epochs = 1.0
  c.optim.lr = 3e-4          # Fine-tuning a trained model: a tenth of the training lr.
  c.optim.weight_decay = 1e-4
  c.optim.warmup_steps = 20
  c.checkpoint_every = 1000
  c.log_every = 100
  c.prune = ml_collections.ConfigDict(dict(
      enabled=False, target_sparsity=0.5, schedule='cubic', scope='global', n_m=None,
      begin_step=0, end_step=0, update_every=10,  # end_step 0 = half of the run.
      method='magnitude', criterion='bn'))  # method 'channel': structured, see below.
  c.quant = ml_collections.ConfigDict(dict(
      enabled=False, mode='qat', weight_bits=8, act_bits=8, module_path='.*'))
  # Deployable files written by on_finish (docs/deploy.md): e.g. --config.deploy.formats="('onnx',)".
  c.deploy = default_deploy_config()
  c.teacher = ml_collections.ConfigDict({'workdir': '', 'checkpoint': '', 'model': '',
                                         'model_fields': {}, 'dtype': 'float32', 'ema': False})
  # Several teachers, averaged into one target (jkd/teachers.py), instead of teacher.workdir.
  c.teachers = ml_collections.ConfigDict()
  c.losses = ml_collections.ConfigDict({'ce': dict(weight=1.0)})
  c.kd_weight = None          # Shorthand: W sets losses to (1 - W) CE + W KD.
  c.kd_temperature = None     # Shorthand: the KD temperature (default 4).
  if variant in ('qat', 'ptq', 'qat_kd'):
    c.quant.enabled = True
    c.quant.mode = 'ptq' if variant == 'ptq' else 'qat'
  if variant == 'ptq':
    c.total_steps = 1        # One step: reports the quantized loss; nothing is trained.
  if variant == 'qat_kd':
    c.losses = ml_collections.ConfigDict({'ce': dict(weight=0.1),
                                          'kd': dict(weight=0.9, temperature=4.0)})
  if variant == 'prune50':
    c.num_epochs = 2.0
  if variant == 'prune24':
    c.prune.update(enabled=True, n_m=(2, 4))
    c.num_epochs = 2.0
  if variant == 'prune50':
    c.prune.enabled = True
  if variant == 'channel50':
    # Half the channels of every group removed (BN-scale ranked, cubic schedule over the first
    # half), distilled from the unpruned parent: --config.teacher.workdir=PARENT.
    c.prune.update(enabled=True, method='channel', criterion='bn', target_sparsity=0.5)
    c.losses = ml_collections.ConfigDict({'ce': dict(weight=0.1),
                                          'kd': dict(weight=0.9, temperature=4.0)})
    c.num_epochs = 2.0
  if tiny:
    shrink_for_tests(c, total_steps=1 if variant == 'ptq' else 6, log_every=2,
                     checkpoint_every=0, warmup_steps=1)
    c.prune.update_every = 2
  return c
