"""One check of a whole run config, before anything is built, loaded or compiled.

`check(config, command)` walks every setting a run reads (types, ranges, and the constraints
between settings: heads divide widths, ratios in (0, 1), sparsity in [0, 1), N < M, supported
bit widths, known names) and raises a `UserError` for the first that cannot work, naming the key,
its value, what is allowed and how to fix it. Every command calls it right after loading the
config (`jkd.cli`), and `jkd pipeline` / `jkd demo` call it for every stage before the first
one starts, so a typo in the last stage does not surface an hour later.

What needs the dataset (classes, image size, split sizes) is `check_data`, which
`trainers.common.RunData.from_config` calls once the dataset's facts are read; what needs another
workdir (a teacher, `init_from`) is checked where that workdir is opened (`jkd.teacher`,
`trainers.common.load_init_from`). Keys that a config does not have are not checked: the rules
apply to the settings present.
"""
from __future__ import annotations

import math
import re
from typing import Any, Callable, Mapping

from jkd import tasks
from jkd.models.mim import METHODS as MIM_METHODS
from jkd.errors import UserError

# A rule returns None when the value is fine, else what it must be ("an integer >= 1").
Rule = Callable[[Any], 'str | None']

DTYPE_NAMES = ('float32', 'bfloat16', 'float16')
RNG_IMPLS = ('rbg', 'unsafe_rbg', 'threefry2x32')
QUANT_BITS = (4, 8, 32)  # int4, int8, or 32 = float (jkd.compress.quant.QTYPES + float).
MESH_AXES = ('data', 'fsdp', 'tensor')
_SPLIT = re.compile(r'^[\w-]+(\[-?\d*%?:-?\d*%?\])?$')


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def integer(lo: int | None = None, hi: int | None = None) -> Rule:
  def rule(v):
    if not _is_int(v) or (lo is not None and v < lo) or (hi is not None and v > hi):
      if lo is not None and hi is not None:
        return f'an integer in [{lo}, {hi}]'
      return f'an integer >= {lo}' if lo is not None else 'an integer'
    return None
  return rule


def number(lo: float | None = None, *, above: bool = False, hi: float | None = None,
           below: bool = False) -> Rule:
  """A finite number with `lo <= v` (`lo < v` when `above`) and `v <= hi` (`<` when `below`)."""
  left = '(' if above else '['
  right = ')' if below else ']'
  if lo is not None and hi is not None:
    text = f'a finite number in {left}{lo:g}, {hi:g}{right}'
  elif lo is not None:
    text = f'a finite number {">" if above else ">="} {lo:g}'
  else:
    text = 'a finite number'

  def rule(v):
    if not _is_num(v) or not math.isfinite(v):
      return text
    if lo is not None and (v < lo or (above and v == lo)):
      return text
    if hi is not None and (v > hi or (below and v == hi)):
      return text
    return None
  return rule


def one_of(*choices) -> Rule:
  def rule(v):
    return None if v in choices else 'one of ' + ', '.join(repr(c) for c in choices)
  return rule


def boolean(v):
  return None if isinstance(v, bool) else 'true or false'


def text(v):
  return None if isinstance(v, str) else 'a string'


def optional(inner: Rule) -> Rule:
  def rule(v):
    if v is None:
      return None
    must = inner(v)
    return None if must is None else f'None or {must}'
  return rule


def split_name(v):
  if isinstance(v, str) and _SPLIT.match(v):
    return None
  return "a TFDS-style split such as 'train', 'test[:1000]' or 'train[:90%]'"


def positive_ints(v):
  if (isinstance(v, (tuple, list)) and v and all(_is_int(x) and x >= 1 for x in v)):
    return None
  return 'a non-empty tuple of integers >= 1, e.g. (2, 2, 2, 2)'


def strings(v):
  if isinstance(v, (tuple, list)) and all(isinstance(x, str) for x in v):
    return None
  return "a tuple of names, e.g. ('encoder',)"


# ---------------------------------------------------------------- the tables

# key -> (rule, what it is / how to fix it). Checked wherever the key exists.
RUN_RULES: dict[str, tuple[Rule, str]] = {
    'seed': (integer(0), 'the seed of every random draw, e.g. 0'),
    'task': (one_of(*tasks.TASKS), 'what the model predicts (jkd.tasks)'),
    'rng_impl': (one_of(*RNG_IMPLS), "jax's PRNG; 'rbg' (fast) or 'threefry2x32' (portable)"),
    'batch_size': (integer(1), 'the global batch size, e.g. 128'),
    'eval_batch_size': (integer(1), 'the eval batch size, e.g. 1000'),
    'total_steps': (integer(0), '0 means config.num_epochs decides the length'),
    'label_smoothing': (number(0, hi=1, below=True), 'e.g. 0.1 (0 = off)'),
    'mixup_alpha': (number(0), 'the Beta(alpha, alpha) of mixup; 0 = off'),
    'log_every': (integer(1), 'steps between progress lines, e.g. 50'),
    'eval_every': (integer(0), 'steps between evaluations; 0 = at the end only'),
    'checkpoint_every': (integer(0), 'steps between checkpoints; 0 = at the end (and on a '
                         'signal) only'),
    'keep_checkpoints': (integer(1), 'how many recent checkpoints are kept; at least 1, or '
                         'nothing could be resumed'),
    'stop_check_every': (integer(1), 'steps between multi-process stop checks, e.g. 10'),
    'nan_patience': (integer(0), 'consecutive non-finite steps skipped before the run stops; '
                     '0 = stop at the first'),
    'resume_from_step': (integer(0), 'the checkpoint step to resume or evaluate; 0 = the '
                         'latest'),
    'init_from': (text, 'the workdir whose weights start this run, or empty'),
    'init_prefix': (strings, 'the sub-tree of its params to take'),
    'num_figure_images': (integer(0), 'images in reconstructions.png'),
    'mask_patch_size': (integer(0), "SimMIM's masking block in pixels; 0 = the model's patch"),
    'norm_pix_loss': (boolean, "MAE's per-patch normalised targets"),
    'kd_weight': (optional(number(0, hi=1)), 'the KD share of the loss (CE gets 1 - weight)'),
    'kd_temperature': (optional(number(0, above=True)), 'the KD temperature, e.g. 4'),
    'optim.name': (one_of('adamw', 'sgd', 'lamb'), 'the optimizer'),
    'optim.lr': (number(0, above=True), 'the peak learning rate, e.g. 1e-3'),
    'optim.lr_batch_base': (number(0), '0 = lr as given, else lr * batch_size / this'),
    'optim.warmup_steps': (integer(0), 'linear warm-up steps'),
    'optim.schedule': (one_of('cosine', 'linear', 'constant', 'step'), 'the lr schedule'),
    'optim.decay_rate': (number(0, above=True, hi=1), "the 'step' schedule's factor, e.g. 0.1"),
    'optim.accumulate_steps': (integer(1), 'train steps per optimizer update (gradient '
                               'accumulation); 1 = off'),
    'optim.min_lr_ratio': (number(0, hi=1), 'the final lr as a fraction of the peak'),
    'optim.weight_decay': (number(0), 'e.g. 0.05'),
    'optim.b1': (number(0, hi=1, below=True), "Adam's first-moment decay, e.g. 0.9"),
    'optim.b2': (number(0, hi=1, below=True), "Adam's second-moment decay, e.g. 0.999"),
    'optim.momentum': (number(0, hi=1, below=True), "SGD's momentum, e.g. 0.9 (0 = none)"),
    'optim.nesterov': (boolean, 'Nesterov momentum for SGD'),
    'optim.grad_clip': (number(0), 'the global gradient-norm clip; 0 = off'),
    'optim.layer_decay': (number(0, hi=1), 'layer-wise lr decay, e.g. 0.75; 0 = off'),
    'data.name': (text, 'the dataset name, e.g. fashion_mnist'),
    'data.data_dir': (optional(text), 'where the dataset files are; None = the default places'),
    'data.train_split': (split_name, 'the training split'),
    'data.eval_split': (split_name, 'the evaluation split'),
    'data.image_size': (optional(integer(1)), 'the side images are resized to; None = native'),
    'data.crop_padding': (integer(0), 'random-crop padding in pixels; 0 = no crop'),
    'data.flip': (boolean, 'random horizontal flips'),
    'data.num_workers': (integer(0), 'reader threads; 0 = in the calling thread'),
    'data.worker_processes': (integer(-1), 'Grain decoding processes; 0 = none, -1 = one per '
                              'core'),
    'data.dir': (text, 'the image folder, split folders or CSV/JSONL list (folder)'),
    'data.holdout': (number(0, hi=1, below=True), 'the fraction of each class held out as '
                     "'val' when the folder has no split folders, e.g. 0.1"),
    'data.split_seed': (integer(0), 'the seed of the held-out split'),
    'data.mode': (one_of('auto', 'RGB', 'L'), 'how images are decoded: colour, grey, or auto'),
    'data.prefetch': (integer(0), 'batches buffered ahead'),
    'data.crop_fraction': (number(0, above=True, hi=1), 'the eval center-crop fraction'),
    'data.train_resize': (one_of('opencv', 'pillow'), "how image files' train crops are "
                          "resized: OpenCV (fast) or Pillow's bilinear "
                          "(torchvision's pixels)"),
    'data.inception_crop': (boolean, 'random-resized crops of variable-size images'),
    'data.randaugment_ops': (integer(0), 'RandAugment ops per image; 0 = off (DeiT: 2)'),
    'data.randaugment_magnitude': (number(0, hi=10), 'RandAugment magnitude on timm\'s 0-10 '
                                   'scale (DeiT: 9)'),
    'data.randaugment_std': (number(0), 'the spread of the magnitude (DeiT: 0.5)'),
    'data.random_erasing': (number(0, hi=1), 'the probability of erasing a box (DeiT: 0.25)'),
    'data.repeated_aug': (integer(1), 'times each example is shown per epoch; 1 = off '
                          '(DeiT: 3)'),
    'data.num_classes': (integer(1), 'classes of the synthetic dataset'),
    'data.channels': (integer(1), 'channels of the synthetic images'),
    'data.num_examples': (integer(1), 'examples of the synthetic train split'),
    'data.num_eval_examples': (integer(1), 'examples of the synthetic test split'),
    'teacher.workdir': (text, 'the workdir of the trained teacher'),
    'teacher.checkpoint': (text, "a public checkpoint file as the teacher (imported as `jkd "
                           "import` does), or ''"),
    'teacher.model_fields': (lambda v: None if hasattr(v, 'keys') else 'a dict',
                             "the imported teacher's model fields, e.g. dict(num_heads=6)"),
    'teacher.dtype': (optional(one_of('', *DTYPE_NAMES)), "the teacher's compute dtype"),
    'teacher.ema': (boolean, "distil from the teacher run's EMA of the weights"),
    'teacher.combine': (one_of('average', 'separate'), 'how several teachers teach: one '
                        'averaged target, or each term once per teacher'),
    'ema.decay': (number(0, hi=1, below=True), 'the EMA of the weights, e.g. 0.999; 0 = off'),
    'teacher.model': (optional(text), 'a teacher model name (bench and plan)'),
    'teacher.cache.dir': (text, "the teacher cache's directory; '' = online teacher"),
    'teacher.cache.topk': (integer(1), 'logits kept per example, e.g. 10'),
    'teacher.cache.dtype': (one_of('float16', 'float32'), 'the stored logits\' dtype'),
    'teacher.cache.rest': (one_of('smooth', 'renorm'), 'how classes outside the top k are filled'),
    'teacher.cache.shard_steps': (integer(1), 'batches per cache shard, e.g. 100'),
    'prune.enabled': (boolean, 'magnitude pruning on or off'),
    'prune.target_sparsity': (number(0, hi=1, below=True), 'the final fraction of zero '
                              'weights, e.g. 0.5'),
    'prune.schedule': (one_of('cubic', 'constant'), 'how sparsity grows'),
    'prune.method': (one_of('magnitude', 'channel'), 'unstructured / N:M weights, or whole '
                     'channels (removed at export)'),
    'prune.criterion': (one_of('bn', 'l1'), "channel pruning's ranking: BatchNorm scale or "
                        'filter L1 norm'),
    'prune.scope': (one_of('global', 'layer'), 'one threshold for all weights, or per layer'),
    'prune.begin_step': (integer(0), 'the step pruning starts'),
    'prune.end_step': (integer(0), 'the step the target is reached; 0 = half of the run'),
    'prune.update_every': (integer(1), 'steps between mask updates, e.g. 10'),
    'quant.enabled': (boolean, 'quantization on or off'),
    'quant.mode': (one_of('qat', 'ptq'), 'quantization-aware training or post-training'),
    'quant.weight_bits': (one_of(*QUANT_BITS), 'weight bits: int8, int4, or 32 (float)'),
    'quant.act_bits': (one_of(*QUANT_BITS), 'activation bits: int8, int4, or 32 (float)'),
    'quant.module_path': (text, 'a regex of the modules to quantize, e.g. .*'),
    'bench.warmup_steps': (integer(0), 'untimed steps before timing'),
    'bench.steps': (integer(1), 'timed steps per repeat'),
    'bench.repeats': (integer(1), 'timed repeats'),
    'bench.peak_flops': (number(0), "the device's peak FLOP/s; 0 = look it up"),
}

# jkd.models.vit.POSEMBS (not imported: this module loads without jax); a test pins them equal.
POSEMBS = ('learn', 'sincos2d', 'sincos2d_mae', 'sincos2d_bv', 'none')

# Model fields, wherever a model has them (a ViT, a ResNet, a SimMIM / MAE model).
MODEL_RULES: dict[str, tuple[Rule, str]] = {
    'num_classes': (integer(0), 'classes of the head (0 = no head)'),
    'patch_size': (integer(1), 'the patch side in pixels'),
    'width': (integer(1), 'the token width (ViT) or first-stage channels (ResNet)'),
    'depth': (integer(1), 'the number of transformer blocks'),
    'num_heads': (integer(1), 'attention heads'),
    'head_dim': (optional(integer(1)), 'channels per attention head; None = width / num_heads'),
    'mlp_dim': (optional(integer(1)), 'the MLP width; None = 4 x width'),
    'dropout': (number(0, hi=1, below=True), 'the dropout rate'),
    'drop_path': (number(0, hi=1, below=True), 'the stochastic-depth rate'),
    'pool': (one_of('gap', 'token'), 'how the head reads the tokens'),
    'posemb': (one_of(*POSEMBS), 'the position embedding (jkd.models.vit.POSEMBS)'),
    'class_token': (optional(boolean), 'a class token; None = only with pool=token'),
    'fc_norm': (boolean, 'LayerNorm after pooling instead of before (MAE fine-tuning)'),
    'layer_scale': (number(0), "the blocks' LayerScale init; 0 = none"),
    'gelu_approximate': (boolean, "tanh GELU (big_vision's) instead of the exact one"),
    'rel_pos_bias': (one_of('none', 'shared', 'block'), "BEiT's relative position bias"),
    'norm_eps': (number(0, above=True), "the LayerNorms' epsilon, e.g. 1e-6"),
    'dtype': (one_of(*DTYPE_NAMES), 'the compute dtype'),
    'attention': (one_of('xla', 'cudnn', None), 'the attention kernel'),
    'remat': (one_of('none', 'full', 'dots'), 'activation checkpointing of the blocks'),
    'head_zero_init': (boolean, ''), 'distill_token': (boolean, ''),
    'sow_attention': (boolean, ''), 'cls_token': (boolean, ''),
    'zero_init_residual': (boolean, ''),
    'stage_sizes': (positive_ints, 'blocks per ResNet stage'),
    'block': (one_of('basic', 'bottleneck'), 'the ResNet block'),
    'stem': (one_of('imagenet', 'small'), 'the ResNet stem'),
    'bn_momentum': (number(0, hi=1, below=True), 'the BatchNorm running-average momentum'),
    'decoder_width': (integer(1), "the MAE decoder's width"),
    'decoder_depth': (integer(1), "the MAE decoder's blocks"),
    'decoder_heads': (integer(1), "the MAE decoder's attention heads"),
    'decoder_mlp_dim': (optional(integer(1)), "the MAE decoder's MLP width; None = 4 x width"),
    'channels': (integer(1), 'image channels the MIM decoder predicts'),
    'pad_tokens_to': (integer(0), "pad MAE's kept tokens to a multiple of this; 0 = auto"),
}


# ---------------------------------------------------------------- entry points


def check(config, command: str, trainer: str | None = None) -> None:
  """Checks every setting of a `jkd COMMAND` config; raises `UserError` for the first bad one.

  Args:
    config: the loaded ConfigDict (overrides applied).
    command: 'train', 'pretrain', 'distill', 'compress' (a run), or 'bench', 'plan', 'eval'
      (the same settings, read to build the same step).
    trainer: the trainer that runs it ('supervised', 'pretrain', 'distill', 'mim_distill',
      'compress'; `jkd.trainers.Trainer.check` passes it, and checks the loss terms with
      `check_terms`), None for bench / plan / eval.
  """
  for key, (rule, hint) in RUN_RULES.items():
    found, value = _lookup(config, key)
    if found:
      _apply(key, value, rule, hint)
  if _get(config, 'total_steps', 0) == 0 and _has(config, 'num_epochs'):
    _apply('num_epochs', config.num_epochs, number(0, above=True),
           'epochs of the train split (or set config.total_steps)')
  _check_crop(config)
  _check_mesh(config)
  if _has(config, 'sharding_rules'):
    from jkd import parallel  # pylint: disable=g-import-not-at-top  (jax, only when needed)
    parallel.merge_rules(config.sharding_rules)
  _check_quant_regex(config)
  _check_prune(config)
  _check_method(config, command, trainer)
  if _has(config, 'model'):
    check_model(config.model, mim=_mim_method(config, trainer), key='model')


def check_terms(terms: list[dict]) -> None:
  """The options of parsed loss terms (`distill_terms.parse_terms` and the like): weights
  finite and >= 0, temperatures > 0, ..., and at least one positive weight."""
  for term in terms:
    name = term['name']
    _apply(f'losses.{name}.weight', term['weight'], number(0), 'the term\'s weight in the loss')
    for option, value in term.items():
      if option == 'temperature':
        _apply(f'losses.{name}.{option}', value, number(0, above=True), 'e.g. 4')
      elif option in ('alpha', 'beta', 'gamma', 'distance_weight', 'angle_weight'):
        _apply(f'losses.{name}.{option}', value, number(0), 'a weight inside the term')
      elif option == 'warmup_steps':
        _apply(f'losses.{name}.{option}', value, integer(0), 'steps of linear warm-up')
      elif option == 'label_smoothing':
        _apply(f'losses.{name}.{option}', value, number(0, hi=1, below=True), 'e.g. 0.1')
      elif option == 'p':
        _apply(f'losses.{name}.{option}', value, number(0, above=True), 'the norm power, e.g. 2')
      elif option in ('feat_dim', 'nce_k', 'max_mid_channel'):
        _apply(f'losses.{name}.{option}', value, integer(1), 'a size, e.g. 128')
      elif option == 'momentum':
        _apply(f'losses.{name}.{option}', value, number(0, hi=1, below=True),
               "the memory bank's momentum, e.g. 0.5")
      elif option == 'eps':
        _apply(f'losses.{name}.{option}', value, number(0), "OFA's target exponent, e.g. 1")
      elif option == 'correct_prob':
        _apply(f'losses.{name}.{option}', value, number(0, above=True, hi=1),
               "the virtual teacher's probability of the label, e.g. 0.99")
  if terms and not any(t['weight'] > 0 for t in terms):
    raise UserError(f'config.losses: every term has weight 0 ({", ".join(t["name"] for t in terms)}'
                    '), so the loss is constant and nothing would train. Give at least one term '
                    'a positive weight, e.g. --config.losses.ce.weight=1.')


def check_data(config, info, shape) -> None:
  """What needs the dataset's facts (`data.DatasetInfo`, the input shape (H, W, C)): the model's
  classes, a ViT's patches against the image, non-empty splits."""
  num_classes = _get(config, 'model.num_classes', None)
  if num_classes is not None and num_classes != info.num_classes:
    raise UserError(
        f'config.model.num_classes={num_classes}, but the dataset {info.name!r} has '
        f'{info.num_classes} classes: the labels would not fit the head. Drop the override '
        '(the head then gets the dataset\'s classes) or use a dataset with that many classes.')
  for split_key in ('data.train_split', 'data.eval_split'):
    split = _get(config, split_key, None)
    if split in info.num_examples and info.num_examples[split] == 0:
      raise UserError(f'config.{split_key}={split!r} holds no examples: an empty split cannot be '
                      f'trained on or evaluated. Give a non-empty slice, e.g. '
                      f"'{split.split('[')[0]}[:1000]'.")
  patch = _model_value(config, 'patch_size')
  if _is_int(patch) and patch > 0 and (shape[0] % patch or shape[1] % patch):
    raise UserError(
        f'config.model.patch_size={patch} does not divide the images ({shape[0]}x{shape[1]}): a '
        'ViT cuts them into whole patches. Set --config.data.image_size to a multiple of '
        f'{patch}, or choose a patch size that divides {shape[0]} (e.g. '
        f'--config.model.patch_size={_divisor(shape[0], patch)}).')


def check_model(model_cfg, *, mim: str | None = None, key: str = 'model') -> None:
  """Checks a model config {name, dtype, ...fields}: a registered name, fields it has, each
  field's range, and the constraints between them (heads divide widths).

  Args:
    mim: 'simmim' / 'mae' for a masked-image-modeling model around the named ViT, 'either' for a
      MIM-distillation student (its method is its teacher's), None for a classifier.
  """
  from jkd import models  # pylint: disable=g-import-not-at-top  (flax, only when needed)
  cfg = model_cfg.to_dict() if hasattr(model_cfg, 'to_dict') else dict(model_cfg)
  name = cfg.get('name')
  if name not in models.names():
    raise UserError(f'config.{key}.name={name!r} is not a model jkd knows; available models: '
                    f'{", ".join(models.names())}.')
  if mim and 'patch_size' not in models.fields(name):
    raise UserError(f'config.{key}.name={name!r}: masked-image modeling needs a ViT encoder '
                    f'(a model with patches), and {name!r} is not one. Use e.g. '
                    f'--config.{key}.name=vit_nano_p4.')
  fields, defaults = _model_fields(name, mim)
  for field, value in cfg.items():
    if field == 'name':
      continue
    if field not in fields:
      raise UserError(f'config.{key}.{field}: model {name!r}'
                      f'{f" ({mim} pretraining)" if mim and mim != "either" else ""} has no '
                      f'field {field!r}; its fields are {", ".join(sorted(fields))}.')
    if field in MODEL_RULES:
      rule, hint = MODEL_RULES[field]
      _apply(f'{key}.{field}', value, rule, hint)
  value = {**defaults, **{k: v for k, v in cfg.items() if k != 'name'}}
  for width, heads in (('width', 'num_heads'), ('decoder_width', 'decoder_heads')):
    w, h = value.get(width), value.get(heads)
    if width == 'width' and value.get('head_dim') is not None:
      continue  # Heads of their own size (a head-pruned ViT): any count.
    if _is_int(w) and _is_int(h) and h > 0 and w % h:
      raise UserError(
          f'config.{key}.{heads}={h} does not divide config.{key}.{width}={w}: each attention '
          f'head gets {width} / {heads} channels. Choose {heads} among the divisors of {w} '
          f'({", ".join(str(d) for d in _divisors(w)[:8])}), or change {width}.')
  sincos = [f for f in ('width', 'decoder_width')
            if f in value and (str(value.get('posemb', '')).startswith('sincos') or mim == 'mae')]
  for field in sincos:
    if _is_int(value[field]) and value[field] % 4:
      raise UserError(
          f'config.{key}.{field}={value[field]}: a sin-cos position embedding needs a width '
          f'divisible by 4. Use a multiple of 4 (e.g. {value[field] - value[field] % 4 or 4})'
          + (", or posemb='learn'." if field == 'width' and mim != 'mae' else '.'))
  if value.get('distill_token') and cfg.get('num_classes') == 0:
    raise UserError(f'config.{key}.distill_token=True needs a classifier head, but '
                    f'config.{key}.num_classes=0. Drop one of the two.')


# ---------------------------------------------------------------- the parts


def _mim_method(config, trainer: str | None) -> str | None:
  """'simmim' / 'mae' (pretraining), 'either' (MIM distillation) or None (a classifier)."""
  method = _get(config, 'method', None)
  if trainer == 'pretrain' or (trainer is None and method in MIM_METHODS):
    return method if method in MIM_METHODS else None
  if trainer == 'mim_distill' or (trainer is None and method == 'mim'):
    return 'either'
  return None


def _check_method(config, command: str, trainer: str | None) -> None:
  method = _get(config, 'method', None)
  if trainer == 'pretrain' and method not in MIM_METHODS:
    raise UserError(f"config.method={method!r}: jkd pretrain runs 'simmim' or 'mae'. Set "
                    "--config.method=mae (or simmim).")
  if trainer in ('pretrain', 'mim_distill') or (trainer is None and method in (
      *MIM_METHODS, 'mim')):
    if _has(config, 'mask_ratio'):
      ratio = config.mask_ratio
      # MIM distillation: 0 means the teacher's ratio.
      zero_ok = trainer == 'mim_distill' or method == 'mim'
      if not (_is_num(ratio) and math.isfinite(ratio) and (0 < ratio < 1 or
                                                          (zero_ok and ratio == 0))):
        raise UserError(
            f'config.mask_ratio={ratio!r}: the fraction of masked patches must be in (0, 1)'
            + (' (or 0 for the teacher\'s)' if zero_ok else '') + ': 0 leaves nothing to '
            'reconstruct (a NaN loss) and 1 leaves nothing to see. Use e.g. '
            '--config.mask_ratio=0.75 (MAE) or 0.6 (SimMIM).')
  if trainer in ('pretrain', 'mim_distill') and _get(config, 'init_from', ''):
    raise UserError(f'config.init_from={config.init_from!r}: jkd {command} '
                    f'({"MIM pretraining" if trainer == "pretrain" else "MIM distillation"}) '
                    'starts from fresh weights and does not read init_from, so the setting '
                    'would be ignored. Drop it (fine-tune the result with `jkd train '
                    '--config configs/fashion_mnist/finetune.py --config.init_from=...` instead).')


def _check_crop(config) -> None:
  if not (_has(config, 'data.crop_scale') or _has(config, 'data.crop_ratio')):
    return
  from jkd.data.pipeline import check_crop  # pylint: disable=g-import-not-at-top
  check_crop(_get(config, 'data.crop_scale', (0.08, 1.0)),
             _get(config, 'data.crop_ratio', (3 / 4, 4 / 3)))


def _check_mesh(config) -> None:
  if not _has(config, 'mesh'):
    return
  mesh = config.mesh
  sizes = mesh.to_dict() if hasattr(mesh, 'to_dict') else mesh
  if not isinstance(sizes, Mapping):
    raise UserError(f'config.mesh={mesh!r} must be a dict of mesh axis sizes, e.g. '
                    '--config.mesh="dict(data=-1, fsdp=1, tensor=1)".')
  for axis, size in sizes.items():
    if axis not in MESH_AXES:
      raise UserError(f'config.mesh.{axis}: unknown mesh axis; the axes are '
                      f'{", ".join(MESH_AXES)}, e.g. --config.mesh="dict(data=2, fsdp=4)".')
    if not _is_int(size) or (size < 1 and size != -1):
      raise UserError(f'config.mesh.{axis}={size!r} must be an integer >= 1, or -1 for the '
                      'devices the other axes leave (at most one axis).')
  if list(sizes.values()).count(-1) > 1:
    raise UserError(f'config.mesh={sizes}: at most one axis may be -1 (it takes the devices the '
                    'others leave).')


def _check_quant_regex(config) -> None:
  pattern = _get(config, 'quant.module_path', None)
  if isinstance(pattern, str):
    try:
      re.compile(pattern)
    except re.error as e:
      raise UserError(f'config.quant.module_path={pattern!r} is not a valid regular expression '
                      f'({e}). Use e.g. ".*" for every module.') from None


def _check_prune(config) -> None:
  if not _has(config, 'prune'):
    return
  n_m = _get(config, 'prune.n_m', None)
  if n_m not in (None, (), []):
    if not (isinstance(n_m, (tuple, list)) and len(n_m) == 2 and all(_is_int(x) for x in n_m)
            and 0 < n_m[0] < n_m[1]):
      raise UserError(f'config.prune.n_m={n_m!r}: N:M sparsity keeps N of every M weights, so '
                      'it must be two integers with 0 < N < M, e.g. --config.prune.n_m="(2, 4)" '
                      '(or None for unstructured pruning).')
  begin, end = _get(config, 'prune.begin_step', 0), _get(config, 'prune.end_step', 0)
  if _is_int(begin) and _is_int(end) and end and end < begin:
    raise UserError(f'config.prune.end_step={end} is before config.prune.begin_step={begin}: '
                    'pruning would end before it starts. Set end_step > begin_step (or 0 for '
                    'half of the run).')


# ---------------------------------------------------------------- helpers


def _model_fields(name: str, mim: str | None) -> tuple[set, dict]:
  """(the fields a model config may set, their defaults) for a classifier or a MIM model."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  from jkd import models  # pylint: disable=g-import-not-at-top
  fields = set(models.fields(name))
  defaults = {f: models.field_default(name, f) for f in fields}
  if mim:
    from jkd.models.mim import METHODS  # pylint: disable=g-import-not-at-top
    methods = METHODS.values() if mim == 'either' else [METHODS[mim]]
    extra = {}
    for cls in methods:
      for f in dataclasses.fields(cls):
        if f.name not in ('parent', 'name') and f.name not in defaults:
          extra.setdefault(f.name, f.default if f.default is not dataclasses.MISSING else None)
    fields = (fields & {f for cls in methods for f in (x.name for x in dataclasses.fields(cls))}
              ) | set(extra) | {'num_classes'}
    defaults = {**{k: v for k, v in defaults.items() if k in fields}, **extra}
  return fields, defaults


def _model_value(config, field: str):
  """The effective value of a model field: the config's, else the named model's default."""
  value = _get(config, f'model.{field}', None)
  if value is not None:
    return value
  try:
    from jkd import models  # pylint: disable=g-import-not-at-top
    return models.field_default(_get(config, 'model.name', ''), field)
  except (KeyError, UserError):
    return None


def _divisors(n: int) -> list[int]:
  return [d for d in range(1, n + 1) if n % d == 0]


def _divisor(n: int, near: int) -> int:
  return min(_divisors(n), key=lambda d: (abs(d - near), d))


def _apply(key: str, value, rule: Rule, hint: str) -> None:
  must = rule(value)
  if must is None:
    return
  raise UserError(f'config.{key}={_show(value)} cannot work: it must be {must}'
                  + (f' ({hint})' if hint else '') + f'. Pass --config.{key}=VALUE with a '
                  'value in that range, or fix it in the config file.')


def _show(value) -> str:
  text = repr(value)
  return text if len(text) <= 80 else text[:77] + '...'


def _lookup(config, key: str) -> tuple[bool, Any]:
  node = config
  for part in key.split('.'):
    if node is None or not hasattr(node, 'keys') or part not in node:
      return False, None
    node = node[part]
  return True, node


def _has(config, key: str) -> bool:
  return _lookup(config, key)[0]


def _get(config, key: str, default):
  found, value = _lookup(config, key)
  return value if found else default
