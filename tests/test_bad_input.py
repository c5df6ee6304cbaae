"""Bad input through the real CLI (issue 19): every case ends with exit code 2 and one paragraph
(`jkd CMD: error: ...`) that names the key or file, without a traceback, and leaves every
checkpoint and export that existed before byte-identical.

The cases run in this process through `jkd.cli.main(argv)`, the function the `jkd` command
calls (`python -m jkd.cli` and the console script both return its value as the exit status), so
200-odd cases share one jax start-up and one compile cache. `test_cases_in_fresh_processes`
runs a sample through `python -m jkd.cli` in child processes: the same exit statuses and
messages there, and nothing printed at interpreter exit (where Orbax's abandoned reads used to
print asyncio tracebacks).
"""
import dataclasses
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from jkd import cli

from conftest import REPO, run_jkd

FM = os.path.join(REPO, 'configs', 'fashion_mnist')
SUP = f'{FM}/supervised.py:tiny'
MAE = f'{FM}/mae.py:tiny'
SIMMIM = f'{FM}/simmim.py:tiny'
DISTILL = f'{FM}/distill.py:tiny'
MIMD = f'{FM}/mim_distill.py:tiny'
COMPRESS = f'{FM}/compress.py:tiny'
FINETUNE = f'{FM}/finetune.py:tiny'
PIPELINE = f'{FM}/pipeline.py:tiny'
BENCH = os.path.join(REPO, 'configs', 'bench', 'vit_s16.py') + ':tiny'
PLAN = os.path.join(REPO, 'configs', 'bench', 'vit_s16.py')
VIT = ('--config.model.name=vit_nano_p4',)
FOLDER = os.path.join(REPO, 'configs', 'folder', 'supervised.py') + ':tiny'
MAE_PTH = os.path.join(REPO, 'tests', 'fixtures', 'import', 'mae_pretrain.pth')


@dataclasses.dataclass(frozen=True)
class Case:
  """argv with {placeholders} of the world's paths; `words`: all must be in the message."""
  id: str
  argv: tuple
  words: tuple


def C(id_, *argv, words):  # noqa: N802  (a table row)
  return Case(id_, argv, (words,) if isinstance(words, str) else tuple(words))


def train(*extra, w='{new}'):
  return ('train', '--config', SUP, '--workdir', w, *extra)


def pretrain(*extra, config=MAE, w='{new}'):
  return ('pretrain', '--config', config, '--workdir', w, *extra)


def distill(*extra, config=DISTILL, teacher='{good}', w='{new}'):
  t = (f'--config.teacher.workdir={teacher}',) if teacher else ()
  return ('distill', '--config', config, '--workdir', w, *t, *extra)


def compress(*extra, config=COMPRESS, init='{good}', w='{new}'):
  i = (f'--config.init_from={init}',) if init else ()
  return ('compress', '--config', config, '--workdir', w, *i, *extra)


def ev(*extra, w='{good}'):
  return ('eval', '--workdir', w, *extra)


def imp(checkpoint, *extra, w='{new}'):
  return ('import', '--checkpoint', checkpoint, '--workdir', w, '--config.model.num_heads=3',
          *extra)


CASES = [
    # ---- command line
    C('no_command', words='COMMAND'),
    C('unknown_command', 'frobnicate', '--workdir', '{new}', words='frobnicate'),
    C('train_no_workdir', 'train', '--config', SUP, words='--workdir'),
    C('train_no_config', 'train', '--workdir', '{new}', words='--config'),
    C('override_without_value', *train('--config.batch_size'), words='--config.batch_size'),
    C('plan_devices_not_int', 'plan', '--config', PLAN, '--devices', 'eight', words='--devices'),
    # ---- config files
    C('config_empty', 'train', '--config', '{cfgs}/empty.py', '--workdir', '{new}',
      words=['empty.py', 'get_config']),
    C('config_returns_none', 'train', '--config', '{cfgs}/none.py', '--workdir', '{new}',
      words=['none.py', 'None']),
    C('config_raises', 'train', '--config', '{cfgs}/raises.py', '--workdir', '{new}',
      words=['raises.py', 'RuntimeError', 'boom']),
    C('config_returns_int', 'train', '--config', '{cfgs}/int.py', '--workdir', '{new}',
      words=['int.py', 'not a config']),
    C('config_syntax_error', 'train', '--config', '{cfgs}/syntax.py', '--workdir', '{new}',
      words=['syntax.py', 'SyntaxError']),
    C('config_import_error', 'train', '--config', '{cfgs}/imports.py', '--workdir', '{new}',
      words=['imports.py', 'no_such_module']),
    C('config_sys_exit', 'train', '--config', '{cfgs}/exits.py', '--workdir', '{new}',
      words=['exits.py', 'SystemExit']),
    C('config_missing', 'train', '--config', '{cfgs}/nope.py', '--workdir', '{new}',
      words=['nope.py', 'does not exist']),
    C('config_is_directory', 'train', '--config', '{cfgs}', '--workdir', '{new}',
      words='is a directory'),
    C('config_not_python', 'train', '--config', '{cfgs}/config.yaml', '--workdir', '{new}',
      words=['config.yaml', 'not a Python file']),
    C('config_bad_arg', 'train', '--config', f'{FM}/supervised.py:nonsense', '--workdir', '{new}',
      words=['supervised.py', 'nonsense']),
    C('config_arg_not_taken', 'train', '--config', '{cfgs}/noarg.py:tiny', '--workdir', '{new}',
      words=['noarg.py', 'takes no argument']),
    C('demo_bad_scale', 'demo', '--workdir', '{new}', '--config',
      os.path.join(REPO, 'configs', 'demo.py') + ':huge', words=['demo.py', 'huge']),
    # ---- overrides: keys and types
    C('unknown_key', *train('--config.optim.lrr=1'), words=['optim.lrr', 'lr']),
    C('int_not_int', *train('--config.batch_size=abc'), words=['batch_size', 'integer']),
    C('int_given_float', *train('--config.batch_size=1.5'), words='batch_size'),
    C('bool_not_bool', *train('--config.data.flip=maybe'), words=['data.flip', 'bool']),
    C('value_not_group', *train('--config.batch_size.x=1'), words=['batch_size', 'not a group']),
    C('dict_call_not_literal', *train('--config.mesh=dict(data=int(2))'), words=['mesh', 'dict']),
    C('nested_dict_bad_value', *train('--config.mesh=dict(data=dict(a=1))'),
      words='config.mesh.data'),
    C('model_field_unknown', *train('--config.model.distill_token=true'),
      words='distill_token'),
    C('unknown_loss_term_key', *distill('--config.losses.nope.weight=1'), words='losses.nope'),
    # ---- run settings
    C('total_steps_negative', *train('--config.total_steps=-5'), words='total_steps'),
    C('keep_checkpoints_zero', *train('--config.keep_checkpoints=0'), words='keep_checkpoints'),
    C('seed_negative', *train('--config.seed=-1'), words='config.seed'),
    C('rng_impl_unknown', *train('--config.rng_impl=foo'), words=['rng_impl', 'foo']),
    C('batch_size_zero', *train('--config.batch_size=0'), words='batch_size'),
    C('batch_size_negative', *train('--config.batch_size=-4'), words='batch_size'),
    C('eval_batch_size_zero', *train('--config.eval_batch_size=0'), words='eval_batch_size'),
    C('num_epochs_zero', *train('--config.total_steps=0', '--config.num_epochs=0'),
      words='num_epochs'),
    C('num_epochs_nan', *train('--config.total_steps=0', '--config.num_epochs=nan'),
      words='num_epochs'),
    C('log_every_zero', *train('--config.log_every=0'), words='log_every'),
    C('checkpoint_every_negative', *train('--config.checkpoint_every=-1'),
      words='checkpoint_every'),
    C('eval_every_negative', *train('--config.eval_every=-2'), words='eval_every'),
    C('label_smoothing_one', *train('--config.label_smoothing=1.0'), words='label_smoothing'),
    C('mixup_negative', *train('--config.mixup_alpha=-1'), words='mixup_alpha'),
    C('nan_patience_negative', *train('--config.nan_patience=-1'), words='nan_patience'),
    C('resume_from_step_negative', *train('--config.resume_from_step=-3'),
      words='resume_from_step'),
    C('stop_check_every_zero', *train('--config.stop_check_every=0'), words='stop_check_every'),
    C('mesh_two_fill_axes', *train('--config.mesh=dict(data=-1, fsdp=-1)'), words='mesh'),
    C('mesh_unknown_axis', *train('--config.mesh=dict(data=-1, model=2)'),
      words=['mesh.model', 'axis']),
    C('mesh_zero', *train('--config.mesh.fsdp=0'), words='mesh.fsdp'),
    C('mesh_too_many_devices', *train('--config.mesh.data=64'), words=['config.mesh', 'devices']),
    C('sharding_rule_bad_axis', *train("--config.sharding_rules=(('embed', 'model'),)"),
      words=['sharding_rules', 'model']),
    # ---- optimizer
    C('lr_inf', *train('--config.optim.lr=inf'), words='optim.lr'),
    C('lr_nan', *train('--config.optim.lr=nan'), words='optim.lr'),
    C('lr_negative', *train('--config.optim.lr=-0.1'), words='optim.lr'),
    C('lr_zero', *train('--config.optim.lr=0'), words='optim.lr'),
    C('b2_one', *train('--config.optim.b2=1.0'), words='optim.b2'),
    C('b1_negative', *train('--config.optim.b1=-0.1'), words='optim.b1'),
    C('weight_decay_negative', *train('--config.optim.weight_decay=-1'),
      words='optim.weight_decay'),
    C('grad_clip_negative', *train('--config.optim.grad_clip=-1'), words='optim.grad_clip'),
    C('warmup_negative', *train('--config.optim.warmup_steps=-10'), words='optim.warmup_steps'),
    C('schedule_unknown', *train('--config.optim.schedule=exponential'),
      words=['optim.schedule', 'exponential']),
    C('accumulate_zero', *train('--config.optim.accumulate_steps=0'),
      words='optim.accumulate_steps'),
    C('step_decay_rate_zero', *train('--config.optim.schedule=step', '--config.optim.decay_rate=0'),
      words='optim.decay_rate'),
    C('ema_decay_one', *train('--config.ema.decay=1.0'), words='ema.decay'),
    C('optimizer_unknown', *train('--config.optim.name=adam'), words=['optim.name', 'adam']),
    C('min_lr_ratio_two', *train('--config.optim.min_lr_ratio=2'), words='optim.min_lr_ratio'),
    C('momentum_too_big', *train('--config.optim.name=sgd', '--config.optim.momentum=1.5'),
      words='optim.momentum'),
    C('layer_decay_too_big', 'train', '--config', FINETUNE, '--workdir', '{new}',
      '--config.optim.layer_decay=1.5', words='optim.layer_decay'),
    # ---- data
    C('randaugment_ops_negative', *train('--config.data.randaugment_ops=-1'),
      words='data.randaugment_ops'),
    C('randaugment_magnitude_big', *train('--config.data.randaugment_magnitude=30.0'),
      words='data.randaugment_magnitude'),
    C('random_erasing_above_one', *train('--config.data.random_erasing=1.5'),
      words='data.random_erasing'),
    C('repeated_aug_zero', *train('--config.data.repeated_aug=0'), words='data.repeated_aug'),
    C('image_size_negative', *train('--config.data.image_size=-8'), words='data.image_size'),
    C('image_size_zero', *train('--config.data.image_size=0'), words='data.image_size'),
    C('data_dir_missing', *train('--config.data.data_dir=/nonexistent/fmnist'),
      words=['/nonexistent/fmnist', 'dataset-fashion-mnist']),
    C('data_dir_garbage', *train('--config.data.data_dir={data_garbage}'),
      words='data_garbage'),
    C('data_dir_truncated_gz', *train('--config.data.data_dir={data_truncated}'),
      words=['data_truncated', 'gzip']),
    C('data_dir_random_bytes', *train('--config.data.data_dir={data_random}'),
      words=['data_random', 'gzip']),
    C('data_dir_truncated_idx', *train('--config.data.data_dir={data_short_idx}'),
      words=['data_short_idx', 'truncated']),
    C('train_eval_split_empty', *train("--config.data.eval_split=test[5:5]"),
      words=['data.eval_split', 'no examples']),
    C('train_split_empty', *train("--config.data.train_split=train[100:100]"),
      words=['data.train_split', 'no examples']),
    C('train_split_unknown', *train('--config.data.train_split=validation'),
      words='validation'),
    C('train_split_bad_syntax', *train('--config.data.train_split=train[::2]'),
      words='data.train_split'),
    C('crop_padding_negative', *train('--config.data.crop_padding=-1'), words='data.crop_padding'),
    C('num_workers_negative', *train('--config.data.num_workers=-1'), words='data.num_workers'),
    C('crop_scale_reversed', *train('--config.data.crop_scale=(0.5, 0.1)'),
      words='data.crop_scale'),
    C('crop_fraction_zero', *train('--config.data.crop_fraction=0'), words='data.crop_fraction'),
    C('dataset_unknown', *train('--config.data.name=no_such_dataset'), words='no_such_dataset'),
    C('batch_larger_than_split', *train('--config.batch_size=60000'),
      words=['60000', 'train[:512]']),
    # ---- models
    C('model_unknown', *train('--config.model.name=resnet9000'), words='resnet9000'),
    C('resnet_width_zero', *train('--config.model.width=0'), words='model.width'),
    C('resnet_stage_sizes_zero', *train('--config.model.stage_sizes=(0, 1)'),
      words='model.stage_sizes'),
    C('resnet_block_unknown', *train('--config.model.block=weird'), words='model.block'),
    C('resnet_stem_unknown', *train('--config.model.stem=huge'), words='model.stem'),
    C('dtype_unknown', *train('--config.model.dtype=float64'), words='model.dtype'),
    C('num_classes_not_dataset', *train('--config.model.num_classes=5'),
      words=['model.num_classes', '10 classes']),
    C('vit_heads_do_not_divide', *train(*VIT, '--config.model.num_heads=5'),
      words=['model.num_heads', 'model.width']),
    C('vit_depth_zero', *train(*VIT, '--config.model.depth=0'), words='model.depth'),
    C('vit_patch_does_not_divide', *train(*VIT, '--config.model.patch_size=5'),
      words=['model.patch_size', '28']),
    C('vit_dropout_too_big', *train(*VIT, '--config.model.dropout=1.5'), words='model.dropout'),
    C('vit_drop_path_negative', *train(*VIT, '--config.model.drop_path=-0.1'),
      words='model.drop_path'),
    C('vit_pool_unknown', *train(*VIT, '--config.model.pool=cls'), words='model.pool'),
    C('vit_posemb_unknown', *train(*VIT, '--config.model.posemb=rope'), words='model.posemb'),
    C('vit_remat_unknown', *train(*VIT, '--config.model.remat=some'), words='model.remat'),
    C('vit_attention_unknown', *train(*VIT, '--config.model.attention=flash'),
      words='model.attention'),
    C('vit_sincos_width', *train(*VIT, '--config.model.posemb=sincos2d', '--config.model.width=99',
                                 '--config.model.num_heads=3'), words='model.width'),
    # ---- MIM pretraining
    C('mask_ratio_above_one', *pretrain('--config.mask_ratio=1.5'), words='mask_ratio'),
    C('mask_ratio_negative', *pretrain('--config.mask_ratio=-0.5'), words='mask_ratio'),
    C('mae_mask_ratio_zero', *pretrain('--config.mask_ratio=0'), words='mask_ratio'),
    C('simmim_mask_ratio_one', *pretrain('--config.mask_ratio=1', config=SIMMIM),
      words='mask_ratio'),
    C('decoder_heads_do_not_divide', *pretrain('--config.model.decoder_heads=5'),
      words=['model.decoder_heads', 'decoder_width']),
    C('decoder_width_zero', *pretrain('--config.model.decoder_width=0'),
      words='model.decoder_width'),
    C('mim_method_unknown', *pretrain('--config.method=bert'), words=['config.method', 'bert']),
    C('mim_encoder_not_vit', *pretrain('--config.model.name=resnet8_s'),
      words='resnet8_s'),
    C('simmim_mask_patch_not_multiple', *pretrain('--config.mask_patch_size=3', config=SIMMIM),
      words='mask_patch_size'),
    C('pretrain_init_from_ignored', *pretrain('--config.init_from={good}'),
      words='init_from'),
    C('simmim_has_no_cls_token', *pretrain('--config.model.cls_token=true', config=SIMMIM),
      words='cls_token'),
    # ---- distillation
    C('distill_no_teacher', *distill(teacher=''), words='teacher.workdir'),
    C('teacher_missing', *distill(teacher='/nonexistent/teacher'), words='/nonexistent/teacher'),
    C('teacher_not_a_workdir', *distill(teacher='{plain_dir}'), words='plain_dir'),
    C('teacher_is_pretraining_run', *distill(teacher='{mae}'),
      words=['teacher.workdir', 'masked-image-modeling']),
    C('teacher_other_classes', *distill(teacher='{five_classes}'),
      words=['teacher.workdir', '5-class']),
    C('teacher_dtype_unknown', *distill('--config.teacher.dtype=float64'),
      words='teacher.dtype'),
    C('kd_temperature_zero', *distill('--config.losses.kd.temperature=0'),
      words='losses.kd.temperature'),
    C('kd_weight_negative', *distill('--config.losses.kd.weight=-1'), words='losses.kd.weight'),
    C('all_weights_zero', *distill('--config.losses.kd.weight=0', '--config.losses.ce.weight=0'),
      words=['config.losses', 'weight 0']),
    C('crd_negatives_zero', *distill(config=f'{FM}/distill.py:tiny-crd',
                                     *('--config.losses.crd.nce_k=0',)),
      words='losses.crd.nce_k'),
    C('crd_momentum_one', *distill(config=f'{FM}/distill.py:tiny-crd',
                                   *('--config.losses.crd.momentum=1.0',)),
      words='losses.crd.momentum'),
    C('tf_kd_correct_prob_zero', *distill(config=f'{FM}/distill.py:tiny-tfkd',
                                          *('--config.losses.tf_kd.correct_prob=0.0',)),
      words='losses.tf_kd.correct_prob'),
    C('loss_option_unknown', *distill('--config.losses.kd.bogus=1'), words='bogus'),
    C('loss_kind_unknown', *distill("--config.losses=dict(x=dict(kind='nope'))"),
      words=['config.losses', 'nope']),
    C('tap_unknown', *distill(config=f'{FM}/distill.py:tiny-fitnet',
                              *('--config.losses.fitnet.student=stage9',)),
      words='stage9'),
    C('cache_dir_is_file', *distill('--config.teacher.cache.dir={a_file}'),
      words=['config.teacher.cache.dir', 'a_file']),
    C('cache_topk_zero', *distill('--config.teacher.cache.topk=0'), words='cache.topk'),
    C('cache_rest_unknown', *distill('--config.teacher.cache.rest=weird'), words='cache.rest'),
    C('cache_with_feature_term', *distill('--config.teacher.cache.dir={new}/cache',
                                          config=f'{FM}/distill.py:tiny-fitnet'),
      words=['cache.dir', 'fitnet']),
    C('cache_manifest_garbage', *distill('--config.teacher.cache.dir={cache_garbage}'),
      words='cache_garbage'),
    C('cache_manifest_edited', *distill('--config.teacher.cache.dir={cache_edited}'),
      words=['cache_edited', 'shard_steps']),
    C('distill_init_from_other_model', *distill('--config.init_from={mae}'),
      words=['init_from', 'vit_nano_p4']),
    C('mim_distill_classifier_teacher', *distill(config=MIMD), words='masked-image-modeling'),
    C('mim_distill_mask_ratio_one', *distill('--config.mask_ratio=1.0', config=MIMD,
                                             teacher='{mae}'), words='mask_ratio'),
    C('mim_distill_init_from', *distill('--config.init_from={mae}', config=MIMD, teacher='{mae}'),
      words='init_from'),
    # ---- compression
    C('compress_no_init_from', *compress(init=''), words='init_from'),
    C('compress_init_from_missing', *compress(init='/nonexistent/run'), words='/nonexistent/run'),
    C('compress_init_from_vit_run', *compress(init='{mae}'), words=['init_from', 'vit_nano_p4']),
    C('compress_init_from_other_resnet', *compress('--config.model.name=resnet20_s'),
      words=['init_from', 'resnet8_s']),
    C('compress_init_from_other_width', *compress('--config.model.width=8'),
      words=['init_from', 'tensors']),
    C('weight_bits_three', *compress('--config.quant.weight_bits=3'), words='quant.weight_bits'),
    C('act_bits_five', *compress('--config.quant.act_bits=5'), words='quant.act_bits'),
    C('quant_mode_unknown', *compress('--config.quant.mode=dynamic'), words='quant.mode'),
    C('quant_module_path_bad_regex', *compress('--config.quant.module_path=['),
      words='quant.module_path'),
    C('sparsity_above_one', *compress('--config.prune.target_sparsity=1.5',
                                      config=f'{FM}/compress.py:tiny-prune50'),
      words='prune.target_sparsity'),
    C('sparsity_one', *compress('--config.prune.target_sparsity=1.0',
                                config=f'{FM}/compress.py:tiny-prune50'),
      words='prune.target_sparsity'),
    C('n_m_reversed', *compress('--config.prune.n_m=(4, 2)', config=f'{FM}/compress.py:tiny-prune24'),
      words='prune.n_m'),
    C('n_m_zero', *compress('--config.prune.n_m=(0, 4)', config=f'{FM}/compress.py:tiny-prune24'),
      words='prune.n_m'),
    C('n_m_one_number', *compress('--config.prune.n_m=(2,)',
                                  config=f'{FM}/compress.py:tiny-prune24'), words='prune.n_m'),
    C('prune_schedule_unknown', *compress('--config.prune.schedule=linear'),
      words='prune.schedule'),
    C('prune_scope_unknown', *compress('--config.prune.scope=channel'), words='prune.scope'),
    C('prune_update_every_zero', *compress('--config.prune.update_every=0'),
      words='prune.update_every'),
    C('prune_ends_before_start', *compress('--config.prune.begin_step=10',
                                           '--config.prune.end_step=5'), words='prune.end_step'),
    C('kd_weight_shorthand_too_big', *compress('--config.kd_weight=1.5'), words='kd_weight'),
    C('kd_temperature_shorthand_zero', *compress('--config.kd_temperature=0',
                                                 '--config.kd_weight=0.5'),
      words='kd_temperature'),
    # ---- workdirs and existing runs
    C('workdir_is_file', *train(w='{a_file}'), words=['a_file', 'not a directory']),
    C('workdir_under_file', *train(w='{a_file}/run'), words=['a_file', 'cannot be created']),
    C('workdir_checkpoints_is_file', *train(w='{checkpoints_file}'),
      words=['checkpoints_file/checkpoints', 'not a directory']),
    C('resume_other_width', *train('--config.model.width=8', w='{good}'),
      words=['checkpoints', 'stage1_block0']),
    C('resume_other_model', *train('--config.model.name=resnet20_s', w='{good}'),
      words="'resnet8_s'"),
    C('resume_other_optimizer', *train('--config.optim.name=sgd', w='{good}'),
      words=['does not match', 'opt_state']),
    C('resume_as_other_kind', *compress(w='{good}'), words=["'train' run", 'compress']),
    C('resume_from_step_missing', *train('--config.resume_from_step=5', w='{good}'),
      words=['resume_from_step=5', '4, 8, 12']),
    C('resume_truncated_checkpoint', *train('--config.total_steps=16', w='{truncated}'),
      words=['step 12', 'damaged', 'resume_from_step=8']),
    C('resume_random_bytes_checkpoint', *train('--config.total_steps=16', w='{scrambled}'),
      words=['step 12', 'damaged']),
    C('resume_garbage_metadata', *train('--config.total_steps=16', w='{bad_meta}'),
      words=['step 12', 'unreadable']),
    *([C('workdir_read_only', *train(w='{read_only}/run'),
         words=['read_only', 'cannot be created'])] if os.geteuid() else []),
    C('workdir_locked', *train(w='{locked}'), words=['in use', 'pid']),
    C('metrics_jsonl_symlink', *train(w='{planted_link}'), words=['metrics.jsonl', 'symlink']),
    # ---- jkd eval
    C('eval_missing_workdir', *ev(w='/nonexistent/run'), words='/nonexistent/run'),
    C('eval_not_a_workdir', *ev(w='{plain_dir}'), words=['plain_dir', 'checkpoints']),
    C('eval_export_missing', *ev('--export'), words=['export/manifest.json', 'jkd compress']),
    C('eval_split_garbage', *ev('--split', 'test[[1'), words='test[[1'),
    C('eval_split_empty', *ev('--split', 'test[5:5]'), words=['eval_split', 'no examples']),
    C('eval_config_missing', *ev('--config', '{cfgs}/nope.py'), words='nope.py'),
    C('eval_unknown_override', *ev('--config.optim.lrr=1'), words='optim.lrr'),
    C('eval_truncated_checkpoint', *ev(w='{truncated}'), words=['step 12', 'damaged']),
    C('eval_random_bytes_checkpoint', *ev(w='{scrambled}'), words=['step 12', 'damaged']),
    C('eval_step_missing', *ev('--config.resume_from_step=7'), words=['step 7', '4, 8, 12']),
    C('export_manifest_garbage', *ev('--export', w='{export_garbage}'),
      words=['manifest.json', 'JSON']),
    C('export_manifest_truncated', *ev('--export', w='{export_truncated_manifest}'),
      words='manifest.json'),
    C('export_manifest_offset_edited', *ev('--export', w='{export_offset}'),
      words=['manifest.json', 'starts at byte']),
    C('export_manifest_dtype_edited', *ev('--export', w='{export_dtype}'),
      words=['manifest.json', 'object']),
    C('export_manifest_shape_edited', *ev('--export', w='{export_shape}'),
      words=['manifest.json', 'bytes']),
    C('export_weights_truncated', *ev('--export', w='{export_weights}'),
      words=['weights.bin', 'truncated']),
    C('export_program_garbage', *ev('--export', w='{export_program}'),
      words=['model.jaxexport', 'jax.export']),
    C('export_program_truncated', *ev('--export', w='{export_program_cut}'),
      words='model.jaxexport'),
    C('export_other_image_size', *ev('--export', '--config.data.image_size=32', w='{q8}'),
      words=['export', '32']),
    # ---- jkd bench / jkd plan
    C('bench_config_missing', 'bench', '--config', '{cfgs}/nope.py', '--workdir', '{new}',
      words='nope.py'),
    C('bench_steps_zero', 'bench', '--config', BENCH, '--workdir', '{new}',
      '--config.bench.steps=0', words='bench.steps'),
    C('bench_job_unknown', 'bench', '--config', BENCH, '--workdir', '{new}',
      '--config.bench.job=fly', words=['bench.job', 'fly']),
    C('bench_model_unknown', 'bench', '--config', BENCH, '--workdir', '{new}',
      '--config.model.name=vit_nope', words='vit_nope'),
    C('bench_batch_zero', 'bench', '--config', BENCH, '--workdir', '{new}',
      '--config.batch_size=0', words='batch_size'),
    C('plan_devices_zero', 'plan', '--config', PLAN, '--devices', '0', words='--devices'),
    C('plan_devices_negative', 'plan', '--config', PLAN, '--devices', '-1', words='--devices'),
    C('plan_device_memory_garbage', 'plan', '--config', PLAN, '--device-memory', 'lots',
      words='lots'),
    C('plan_teacher_unknown', 'plan', '--config', PLAN, '--teacher', 'vit_nope',
      words='vit_nope'),
    C('plan_mesh_does_not_divide', 'plan', '--config', PLAN, '--config.mesh.data=3',
      '--devices', '8', words='mesh'),
    C('plan_heads_do_not_divide', 'plan', '--config', PLAN, '--config.model.num_heads=7',
      words='model.num_heads'),
    # ---- jkd import (a public checkpoint)
    C('import_checkpoint_missing', 'import', '--checkpoint', '{root}/nope.safetensors',
      '--workdir', '{new}', words='nope.safetensors'),
    C('import_checkpoint_not_weights', 'import', '--checkpoint', '{cfgs}/raises.py',
      '--workdir', '{new}', words='raises.py'),
    C('import_model_unknown', 'import', '--checkpoint', MAE_PTH, '--workdir', '{new}',
      '--model', 'vit_nope', words='vit_nope'),
    C('import_model_other_architecture', 'import', '--checkpoint', MAE_PTH, '--workdir',
      '{new}', '--model', 'resnet8_s', words='resnet8_s'),
    C('import_posemb_unknown', 'import', '--checkpoint', MAE_PTH, '--workdir', '{new}',
      '--config.model.num_heads=3', '--config.model.posemb=spiral', words=['posemb', 'spiral']),
    C('import_into_existing_run', 'import', '--checkpoint', MAE_PTH, '--workdir', '{good}',
      words='{good}'),
    # ---- a folder of the user's images
    C('folder_dir_missing', 'train', '--config', FOLDER, '--workdir', '{new}',
      '--config.data.dir={root}/no_photos', words='no_photos'),
    C('folder_dir_is_a_file', 'train', '--config', FOLDER, '--workdir', '{new}',
      '--config.data.dir={cfgs}/empty.py', words='empty.py'),
    C('folder_holdout_out_of_range', 'train', '--config', FOLDER, '--workdir', '{new}',
      '--config.data.dir={root}', '--config.data.holdout=1.5', words='data.holdout'),
    C('folder_worker_processes_negative', 'train', '--config', FOLDER, '--workdir', '{new}',
      '--config.data.dir={root}', '--config.data.worker_processes=-2',
      words='data.worker_processes'),
    C('folder_train_resize_unknown', 'train', '--config', FOLDER, '--workdir', '{new}',
      '--config.data.dir={root}', '--config.data.train_resize=lanczos',
      words=['data.train_resize', 'lanczos']),
    C('folder_mode_unknown', 'train', '--config', FOLDER, '--workdir', '{new}',
      '--config.data.dir={root}', '--config.data.mode=CMYK', words=['data.mode', 'CMYK']),
    C('data_prepare_dir_missing', 'data', 'prepare', '--dir', '{root}/no_photos', '--out',
      '{new}', words='no_photos'),
    C('data_prepare_not_a_folder_config', 'data', 'prepare', '--config', SUP, '--out', '{new}',
      words='folder'),
    C('compress_prune_method_unknown', *compress('--config.prune.enabled=true',
                                                 '--config.prune.method=random'),
      words=['prune.method', 'random']),
    C('compress_channel_criterion_unknown', *compress('--config.prune.enabled=true',
                                                      '--config.prune.method=channel',
                                                      '--config.prune.criterion=taylor'),
      words=['prune.criterion', 'taylor']),
    # ---- jkd export and the exported file
    C('export_workdir_missing', 'export', '--workdir', '{root}/no_run', '--format', 'onnx',
      '--out', '{new}.onnx', words='no_run'),
    C('export_format_unknown', 'export', '--workdir', '{good}', '--format', 'caffe', '--out',
      '{new}.caffe', words='caffe'),
    C('export_overrides_refused', 'export', '--workdir', '{good}', '--format', 'onnx', '--out',
      '{new}.onnx', '--config.batch_size=3', words='overrides'),
    C('export_of_a_mim_run', 'export', '--workdir', '{mae}', '--format', 'onnx', '--out',
      '{new}.onnx', words='{mae}'),
    C('eval_export_file_missing', 'eval', '--export', '{root}/nope.onnx', words='nope.onnx'),
    C('eval_export_not_a_model', 'eval', '--export', '{cfgs}/raises.py', words='raises.py'),
    C('bench_export_file_missing', 'bench', '--export', '{root}/nope.tflite',
      words='nope.tflite'),
    # ---- pipelines and the demo
    C('pipeline_stage_command_unknown', 'pipeline', '--config', PIPELINE, '--workdir', '{new}',
      '--config.stages.teacher.command=fly', words=['teacher', 'fly']),
    C('pipeline_order_names_missing_stage', 'pipeline', '--config', PIPELINE, '--workdir',
      '{new}', "--config.order=('teacher', 'ghost')", words='ghost'),
    C('pipeline_stage_bad_override', 'pipeline', '--config', PIPELINE, '--workdir', '{new}',
      "--config.stages.student.overrides=('optim.lrr=1',)", words=['student', 'optim.lrr']),
    C('pipeline_stage_bad_value', 'pipeline', '--config', PIPELINE, '--workdir', '{new}',
      "--config.stages.student.overrides=('batch_size=0',)", words=['student', 'batch_size']),
    C('pipeline_stage_config_missing', 'pipeline', '--config', PIPELINE, '--workdir', '{new}',
      '--config.stages.teacher.config=fashion_mnist/nope.py', words=['teacher', 'nope.py']),
    C('pipeline_teacher_is_later_stage', 'pipeline', '--config', PIPELINE, '--workdir', '{new}',
      '--config.stages.assistant.teacher=student', words=['assistant', 'earlier stage']),
    C('demo_stage_bad_value', 'demo', '--workdir', '{new}', '--config',
      os.path.join(REPO, 'configs', 'demo.py') + ':fast',
      "--config.stages.student_kd.overrides=('losses.kd.temperature=0',)",
      words=['student_kd', 'losses.kd.temperature']),
    # ---- issue 29: deployable exports (jkd export / eval --export FILE / bench --export FILE)
    # Files in {xp} (= ROOT/export/, snapshotted) made by `_issue29_export_files` from the
    # committed tests/fixtures/deploy files.
    *[C(f'issue29_{cmd}_export_{os.path.basename(name)}', cmd, '--export', f'{{xp}}/{name}',
        words=words)
      for cmd in ('eval', 'bench') for name, words in (
          ('random.onnx', ['random.onnx', 'none of the formats']),
          ('empty.onnx', ['empty.onnx', 'empty']),
          ('truncated.onnx', ['truncated.onnx', 'damaged']),
          ('random.stablehlo', ['random.stablehlo', 'damaged']),
          ('empty.stablehlo', ['empty.stablehlo', 'empty']),
          ('truncated.stablehlo', ['truncated.stablehlo', 'damaged']),
          ('onnx_bytes.tflite', ['onnx_bytes.tflite', 'ONNX model', '.onnx']),
          ('text.tflite', ['text.tflite', 'none of the formats']),
          ('json_invalid.onnx', ['json_invalid.onnx.json', 'not valid JSON']),
          ('json_list.onnx', ['json_list.onnx.json', 'list']),
          ('json_empty_object.onnx', ['json_empty_object.onnx.json', "'format'", 'missing']),
          ('json_no_image_shape.onnx', ['json_no_image_shape.onnx.json', "'image_shape'"]),
          ('json_shape_text.onnx', ['json_shape_text.onnx.json', "'image_shape'"]),
          ('json_other_shape.onnx', ['json_other_shape.onnx', 'image_shape', '32, 32, 1']),
          ('json_other_channels.onnx', ['json_other_channels.onnx', 'image_shape', '28, 28, 3']),
          ('json_nan.onnx', ['json_nan.onnx.json', 'NaN']),
          ('json_inf_mean.onnx', ['json_inf_mean.onnx.json', "'mean'"]),
          ('json_huge_classes.onnx', ['json_huge_classes.onnx.json', "'num_classes'"]),
          ('json_huge_image.onnx', ['json_huge_image.onnx.json', "'image_shape'"]),
          ('json_bytes_string.onnx', ['json_bytes_string.onnx.json', "'bytes'"]),
          ('json_format_tflite.onnx', ['json_format_tflite.onnx.json', "'format'"]),
          ('stale_sha256.onnx', ['stale_sha256.onnx', 'sha256', 'Export again']),
          ('no_json.onnx', ['no_json.onnx.json', 'does not exist']),
          ('json_is_dir.onnx', ['json_is_dir.onnx.json', 'directory']),
          ('a_dir.onnx', ['a_dir.onnx', 'is a directory']),
          ('../special_files/fifo.onnx', ['fifo.onnx', 'not a regular file']),
          ('../special_files/dev_zero.onnx', ['dev_zero.onnx', 'not a regular file']),
          ('ansi\x1b[31mred.onnx', [r'ansi\x1b[31mred.onnx', 'none of the formats']),
      )],
    C('issue29_eval_export_bad_data_field', 'eval', '--export', '{xp}/json_bad_data.onnx',
      words=['json_bad_data.onnx.json', '"data"', 'eval_split']),
    C('issue29_eval_export_threads_negative', 'eval', '--export', '{xp}/tiny.onnx', '--threads',
      '-3', words='--threads -3'),
    C('issue29_eval_export_other_image_size', 'eval', '--export', '{xp}/tiny.onnx', '--config',
      SUP, '--config.data.image_size=32', '--split', 'test[:8]', words=['tiny.onnx', '32, 32']),
    C('issue29_bench_export_repeats_zero', 'bench', '--export', '{xp}/tiny.onnx', '--repeats',
      '0', words='--repeats 0'),
    C('issue29_bench_export_batch_negative', 'bench', '--export', '{xp}/tiny.onnx',
      '--batch-sizes', '1', '-2', words='--batch-sizes -2'),
    C('issue29_bench_export_batch_zero', 'bench', '--export', '{xp}/tiny.onnx', '--batch-sizes',
      '0', words='--batch-sizes 0'),
    C('issue29_bench_export_threads_negative', 'bench', '--export', '{xp}/tiny.onnx',
      '--threads', '-3', words='--threads -3'),
    C('issue29_bench_export_threads_zero', 'bench', '--export', '{xp}/tiny.tflite', '--threads',
      '0', words='--threads 0'),
    C('issue29_bench_export_result_is_dir', 'bench', '--export', '{xp}/benchdir.onnx',
      words=['benchdir.onnx.bench.json', 'directory']),
    *[C(f'issue29_export_{name}', 'export', '--workdir', '{good}', '--format', fmt, '--out',
        out, *flags, words=words) for name, fmt, out, flags, words in (
            ('calibration_batches_zero', 'onnx', '{new}.onnx',
             ('--int8', '--calibration-batches', '0'), '--calibration-batches 0'),
            ('calibration_batch_size_zero', 'onnx', '{new}.onnx',
             ('--int8', '--calibration-batch-size', '0'), '--calibration-batch-size 0'),
            ('calibration_seed_negative', 'onnx', '{new}.onnx',
             ('--int8', '--calibration-seed', '-1'), '--calibration-seed -1'),
            ('percentile_150', 'onnx', '{new}.onnx', ('--int8', '--calibration-method',
                                                      'percentile', '--percentile', '150'),
             '--percentile 150'),
            ('percentile_nan', 'onnx', '{new}.onnx', ('--int8', '--percentile', 'nan'),
             '--percentile nan'),
            ('tflite_batch_zero', 'tflite', '{new}.tflite', ('--batch', '0'), '--batch 0'),
            ('out_is_directory', 'onnx', '{xp}/a_dir.onnx', (), ['a_dir.onnx', 'directory']),
            ('out_sidecar_is_directory', 'onnx', '{xp}/json_is_dir.onnx', (),
             ['json_is_dir.onnx.json', 'directory']),
            ('out_under_a_file', 'onnx', '{a_file}/m.onnx', (), ['a_file', 'is a file']),
            ('out_into_locked_workdir', 'onnx', '{locked}/export/m.onnx', (),
             ['in use', 'pid']),
            ('out_url', 'onnx', 'gs://bucket/m.onnx', (), ['gs://bucket/m.onnx', 'local']),
        )],
    *([C('issue29_export_out_read_only', 'export', '--workdir', '{good}', '--format', 'onnx',
         '--out', '{read_only}/m.onnx', words=['read_only', 'not writable'])]
      if os.geteuid() else []),
    # ---- issue 29: folders, lists and `jkd data prepare` (the folders: _untrusted_folders)
    C('folder_symlink_loop', 'data', 'prepare', '--dir', '{f_loop}', '--out', '{new}',
      words=['{f_loop}/a/loop', 'loops back']),
    C('folder_symlink_leaves_root', 'data', 'prepare', '--dir', '{f_outside}', '--out', '{new}',
      words=['{f_outside}/a/ext', 'follow_links_outside']),
    C('folder_splits_share_a_file', 'data', 'prepare', '--dir', '{f_overlap}', '--out', '{new}',
      words=["splits 'train' and 'val'", '{f_overlap}/val/a/9.png']),
    C('folder_one_class', 'train', '--config', FOLDER, '--workdir', '{new}',
      '--config.data.dir={f_one}', words=['{f_one}', 'at least 2 classes']),
    C('folder_class_name_not_utf8', 'data', 'prepare', '--dir', '{f_badname}', '--out', '{new}',
      words=['{f_badname}/caf', 'not UTF-8']),
    C('list_not_utf8', 'data', 'prepare', '--dir', '{f_lists}/latin.csv', '--out', '{new}',
      words=['latin.csv, line 2', 'not UTF-8']),
    C('list_label_huge', 'data', 'prepare', '--dir', '{f_lists}/huge.csv', '--out', '{new}',
      words=['huge.csv, line 2', '20000000']),
    C('list_label_negative', 'data', 'prepare', '--dir', '{f_lists}/neg.csv', '--out', '{new}',
      words=['neg.csv, line 2', "'-3'"]),
    C('list_labels_sparse', 'data', 'prepare', '--dir', '{f_lists}/sparse.csv', '--out', '{new}',
      words=['sparse.csv', 'sparse', 'config.data.classes']),
    C('list_label_empty', 'data', 'prepare', '--dir', '{f_lists}/empty.csv', '--out', '{new}',
      words=['empty.csv, line 2', 'label is empty']),
    C('list_file_under_two_labels', 'data', 'prepare', '--dir', '{f_lists}/dup.csv', '--out',
      '{new}', words=['dup.csv, line 1', 'dup.csv, line 3', 'classes']),
    C('list_file_in_two_splits', 'data', 'prepare', '--dir', '{f_lists}/splits.csv', '--out',
      '{new}', words=['splits.csv, line 1', 'splits.csv, line 3', 'splits']),
    C('list_label_not_in_classes', 'data', 'prepare', '--dir', '{f_lists}/names.csv', '--out',
      '{new}', "--config.data.classes=('a', 'b')", words=['names.csv, line 3', 'zebra']),
    C('list_jsonl_label_not_text', 'data', 'prepare', '--dir', '{f_lists}/object.jsonl',
      '--out', '{new}', words=['object.jsonl, line 2', 'label']),
    C('list_jsonl_too_deep', 'data', 'prepare', '--dir', '{f_lists}/deep.jsonl', '--out',
      '{new}', words=['deep.jsonl, line 1', 'not JSON']),
    C('list_csv_huge_field', 'data', 'prepare', '--dir', '{f_lists}/long.csv', '--out',
      '{new}', words=['long.csv, line 2']),
    C('classes_named_twice', 'data', 'prepare', '--dir', '{f_ok}', '--out', '{new}',
      "--config.data.classes=('a', 'b', 'a')", words=['config.data.classes', "'a'"]),
    C('folder_class_not_in_classes', 'data', 'prepare', '--dir', '{f_three}', '--out', '{new}',
      "--config.data.classes=('a', 'b')", words=['config.data.classes', "'c'"]),
    C('image_bomb_jpeg_strict', 'data', 'prepare', '--dir', '{f_bomb}', '--out', '{new}',
      '--workers', '0', '--strict', words=['{f_bomb}/a/bomb.jpg', '40000x40000']),
    C('image_fifo_strict', 'data', 'prepare', '--dir', '{f_fifo}', '--out', '{new}',
      '--workers', '0', '--strict', words=['{f_fifo}/a/pipe.jpg', 'not a regular file']),
    C('data_prepare_shard_size_zero', 'data', 'prepare', '--dir', '{f_ok}', '--out', '{new}',
      '--shard-size', '0', words='--shard-size 0'),
    C('data_prepare_workers_negative', 'data', 'prepare', '--dir', '{f_ok}', '--out', '{new}',
      '--workers', '-3', words='--workers -3'),
    C('data_prepare_out_is_a_file', 'data', 'prepare', '--dir', '{f_ok}', '--out', '{a_file}',
      words=['--out', '{a_file}', 'is a file']),
    C('data_prepare_out_under_a_file', 'data', 'prepare', '--dir', '{f_ok}', '--out',
      '{a_file}/out', words=['--out', '{a_file}/out']),
    C('data_prepare_out_locked', 'data', 'prepare', '--dir', '{f_ok}', '--out', '{locked}',
      words=['{locked}', 'in use by', 'jkd train', 'another --out']),
    C('eval_folder_with_other_classes', 'eval', '--workdir', '{good}', '--config', FOLDER,
      '--config.data.dir={f_three}', words=['10 classes', '{f_three}', 'has 3']),
    # ---- issue 29: checkpoint readers and jkd import
    C('import_pth_tensor_beyond_storage', *imp('{ck29}/pth_oob.pth'),
      words=['pth_oob.pth', "'blocks.0.mlp.fc1.weight'", 'larger than its storage']),
    C('import_pth_stride_zero_expansion', *imp('{ck29}/pth_stride0.pth'),
      words=['pth_stride0.pth', 'larger than its storage']),
    C('import_pth_negative_stride', *imp('{ck29}/pth_negative_stride.pth'),
      words=['pth_negative_stride.pth', 'stride', 'non-negative integer']),
    C('import_pth_huge_offset', *imp('{ck29}/pth_offset.pth'),
      words=['pth_offset.pth', 'offset', 'never reads outside a storage']),
    C('import_pth_numel_beyond_bytes', *imp('{ck29}/pth_numel.pth'),
      words=['pth_numel.pth', 'claims 100 elements', 'holds 48 bytes']),
    C('import_pth_deflate_bomb', *imp('{ck29}/pth_bomb.pth'),
      words=['pth_bomb.pth', 'decompression bomb']),
    C('import_pth_truncated', *imp('{ck29}/pth_truncated.pth'),
      words=['pth_truncated.pth', 'truncated']),
    C('import_pth_bool_size', *imp('{ck29}/pth_bool_size.pth'),
      words=['pth_bool_size.pth', 'size', 'True']),
    C('import_pth_storage_viewed_200_times', *imp('{ck29}/pth_repeated.pth'),
      words=['pth_repeated.pth', 'twice the archive']),
    C('import_safetensors_tensors_share_bytes', *imp('{ck29}/st_overlap.safetensors'),
      words=['st_overlap.safetensors', 'overlapping data_offsets']),
    C('import_npz_truncated', *imp('{ck29}/npz_truncated.npz'),
      words=['npz_truncated.npz', 'truncated']),
    C('import_npz_object_array', *imp('{ck29}/npz_object.npz'),
      words=['npz_object.npz', 'dtype object']),
    C('import_npz_shape_beyond_bytes', *imp('{ck29}/npz_shape.npz'),
      words=['npz_shape.npz', '(40000, 40000)']),
    C('import_safetensors_offsets_beyond_data', *imp('{ck29}/st_offsets.safetensors'),
      words=['st_offsets.safetensors', 'data_offsets']),
    C('import_safetensors_dtype_unknown', *imp('{ck29}/st_dtype.safetensors'),
      words=['st_dtype.safetensors', 'dtype', 'F99']),
    C('import_checkpoint_is_directory', *imp('{ck29}'), words=['ck29', 'is a directory']),
    C('import_checkpoint_symlink_loop', *imp('{ck29}/loop.pth'),
      words=['loop.pth', 'symlink loop']),
    C('import_checkpoint_fifo', *imp('{ck29}/fifo.pth'), words=['fifo.pth', 'not a regular file']),
    C('import_checkpoint_dev_zero', *imp('/dev/zero'), words=['/dev/zero', 'not a regular file']),
    C('import_qkv_one_dimensional', *imp('{ck29}/qkv_1d.safetensors'),
      words=['blocks.0.attn.qkv.weight', '(6912,)', '2-D']),
    C('import_patch_embed_wrong_shape', *imp('{ck29}/patch_shape.safetensors'),
      words=['patch_embed/proj/kernel', '(8, 7, 3, 48)', '(8, 8, 3, 48)']),
    C('import_mlp_wrong_shape', *imp('{ck29}/mlp_shape.safetensors'),
      words=['encoder/block1/mlp/fc1/kernel', '(48, 96)', '(48, 192)']),
    C('import_nan_weights', *imp('{ck29}/nan.safetensors'),
      words=['nan.safetensors', 'NaN', 'blocks.0.attn.proj.weight']),
    C('import_into_workdir_a_run_holds', *imp(MAE_PTH, w='{locked}'),
      words=['{locked}', 'in use by', 'jkd train']),
    C('distill_teacher_checkpoint_beyond_storage',
      *distill('--config.teacher.checkpoint={ck29}/pth_oob.pth', teacher=None),
      words=['pth_oob.pth', 'larger than its storage']),
]


# ---------------------------------------------------------------- the world the cases run in


def _main(argv) -> int:
  try:
    return cli.main(list(argv))
  except SystemExit as e:  # argparse
    return e.code


def _write(path, text):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w') as f:
    f.write(text)


def _damage_largest(workdir, step, how):
  d = os.path.join(workdir, 'checkpoints', str(step), 'state', 'ocdbt.process_0', 'd')
  path = max((os.path.join(d, f) for f in os.listdir(d)), key=os.path.getsize)
  size = os.path.getsize(path)
  if how == 'truncate':
    os.truncate(path, size // 10)
  else:
    with open(path, 'wb') as f:
      f.write(os.urandom(size))


def _edit_manifest(workdir, edit):
  path = os.path.join(workdir, 'export', 'manifest.json')
  with open(path) as f:
    manifest = json.load(f)
  edit(manifest)
  with open(path, 'w') as f:
    json.dump(manifest, f)


def _copy(world, src, name):
  dst = os.path.join(world['root'], name)
  shutil.copytree(world[src], dst, symlinks=True)
  world[name] = dst
  return dst


def snapshot(root) -> dict:
  """sha256 of every file under every checkpoints/ and export/ below `root`."""
  out = {}
  for base, dirs, files in os.walk(root):
    parts = base.split(os.sep)
    if 'checkpoints' in parts or 'export' in parts:
      for f in files:
        path = os.path.join(base, f)
        with open(path, 'rb') as fh:
          out[os.path.relpath(path, root)] = hashlib.sha256(fh.read()).hexdigest()
  return out


@pytest.fixture(scope='module')
def world(tmp_path_factory):
  """Trained runs (a supervised resnet8_s, an MAE ViT, a 5-class teacher, an int8 export) and
  damaged copies of them, config files and data directories that are wrong in every way."""
  root = str(tmp_path_factory.mktemp('bad_input'))
  w = {'root': root}
  for name in ('good', 'mae', 'five_classes', 'q8'):
    w[name] = os.path.join(root, name)
  assert _main(train(w=w['good'])) == 0
  assert _main(pretrain('--config.total_steps=4', '--config.checkpoint_every=4',
                        w=w['mae'])) == 0
  cfgs = w['cfgs'] = os.path.join(root, 'cfgs')
  _write(f'{cfgs}/five_classes.py', f"""import importlib.util
from jkd.data import default_data_config

def get_config():
  spec = importlib.util.spec_from_file_location('sup', {SUP.split(':')[0]!r})
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config('tiny')
  c.data = default_data_config('synthetic')
  c.data.update(num_classes=5, image_size=8, channels=1, train_split='train[:64]',
                eval_split='test[:64]')
  c.total_steps = c.checkpoint_every = 2
  return c
""")
  assert _main(['train', '--config', f'{cfgs}/five_classes.py', '--workdir',
                w['five_classes']]) == 0
  assert _main([a.format(**w) for a in compress('--config.total_steps=2', w=w['q8'])]) == 0
  _write(f'{cfgs}/empty.py', '')
  _write(f'{cfgs}/none.py', 'def get_config():\n  return None\n')
  _write(f'{cfgs}/raises.py', 'def get_config():\n  raise RuntimeError("boom")\n')
  _write(f'{cfgs}/int.py', 'def get_config():\n  return 5\n')
  _write(f'{cfgs}/syntax.py', 'def get_config(:\n')
  _write(f'{cfgs}/imports.py', 'import no_such_module\n')
  _write(f'{cfgs}/exits.py', 'import sys\nsys.exit(3)\n')
  _write(f'{cfgs}/config.yaml', 'batch_size: 3\n')
  _write(f'{cfgs}/noarg.py', 'from jkd.defaults import base_config\n\n'
         'def get_config():\n  return base_config()\n')

  from jkd.data import sources  # pylint: disable=g-import-not-at-top
  real = sources._fashion_mnist_dir(None)  # pylint: disable=protected-access
  names = sorted(f for f in os.listdir(real) if f.endswith('.gz'))
  for kind in ('garbage', 'truncated', 'random', 'short_idx'):
    d = w[f'data_{kind}'] = os.path.join(root, f'data_{kind}')
    os.makedirs(d)
    for name in names:
      with open(os.path.join(real, name), 'rb') as f:
        data = f.read()
      if kind == 'garbage':  # a valid gzip of text
        data = gzip.compress(b'this is not an IDX file\n')
      elif kind == 'truncated':
        data = data[:len(data) // 3]
      elif kind == 'random':
        data = os.urandom(4096)
      else:  # a valid gzip of a cut IDX file
        data = gzip.compress(gzip.decompress(data)[:5000])
      with open(os.path.join(d, name), 'wb') as f:
        f.write(data)

  w['a_file'] = os.path.join(root, 'a_file')
  _write(w['a_file'], 'not a directory\n')
  w['plain_dir'] = os.path.join(root, 'plain_dir')
  os.makedirs(w['plain_dir'])
  w['checkpoints_file'] = os.path.join(root, 'checkpoints_file')
  _write(os.path.join(w['checkpoints_file'], 'checkpoints'), 'not a directory\n')
  w['read_only'] = os.path.join(root, 'read_only')
  os.makedirs(w['read_only'])
  os.chmod(w['read_only'], 0o555)  # (root writes there all the same: its case is skipped)
  _damage_largest(_copy(w, 'good', 'truncated'), 12, 'truncate')
  _damage_largest(_copy(w, 'good', 'scrambled'), 12, 'scramble')
  _write(os.path.join(_copy(w, 'good', 'bad_meta'), 'checkpoints', '12', 'meta', 'metadata'),
         '{"kind": ')
  locked = _copy(w, 'good', 'locked')
  holder = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])
  w['holder'] = holder
  from jkd import lock  # pylint: disable=g-import-not-at-top
  record = dict(lock._holder_record('jkd train'), pid=holder.pid,  # pylint: disable=protected-access
                proc_start=lock._proc_start(holder.pid))  # pylint: disable=protected-access
  _write(os.path.join(locked, lock.LOCK_FILE), json.dumps(record))
  planted = _copy(w, 'good', 'planted_link')
  os.remove(os.path.join(planted, 'metrics.jsonl'))
  os.symlink(w['a_file'], os.path.join(planted, 'metrics.jsonl'))

  cache = w['cache_garbage'] = os.path.join(root, 'cache_garbage')
  _write(os.path.join(cache, 'manifest.json'), '{not json')
  cache = w['cache_edited'] = os.path.join(root, 'cache_edited')
  _write(os.path.join(cache, 'manifest.json'), json.dumps(
      {'format': 1, 'identity': {}, 'shard_steps': -1, 'shards': {}}))

  exports = {
      'export_garbage': lambda p: _write(p('manifest.json'), 'garbage{'),
      'export_truncated_manifest': lambda p: _write(p('manifest.json'), open(
          p('manifest.json')).read()[:300]),
      'export_offset': lambda p: _edit_manifest(os.path.dirname(os.path.dirname(p('x'))),
                                                lambda m: m['tensors'][1].update(offset=7)),
      'export_dtype': lambda p: _edit_manifest(os.path.dirname(os.path.dirname(p('x'))),
                                               lambda m: m['tensors'][0].update(dtype='object')),
      'export_shape': lambda p: _edit_manifest(os.path.dirname(os.path.dirname(p('x'))),
                                               lambda m: m['tensors'][0].update(shape=[999, 3])),
      'export_weights': lambda p: os.truncate(p('weights.bin'), 100),
      'export_program': lambda p: _write(p('model.jaxexport'), 'not a program'),
      'export_program_cut': lambda p: os.truncate(p('model.jaxexport'),
                                                  os.path.getsize(p('model.jaxexport')) // 2),
  }
  for name, damage in exports.items():
    d = _copy(w, 'q8', name)
    damage(lambda f, d=d: os.path.join(d, 'export', f))
  _issue29_export_files(w)
  _untrusted_folders(w)
  _issue29_checkpoints(w)
  w['before'] = snapshot(root)
  yield w
  holder.kill()
  holder.wait()


# ---------------------------------------------------------------- issue 29: exported files


def _issue29_export_files(w):
  """ROOT/export/ ({xp}): the committed tiny.onnx / tiny.stablehlo / tiny.tflite of
  tests/fixtures/deploy with their FILE.json, and damaged or hostile copies of them, one per
  case of the `issue29_` rows (made without an export: no conversion cost)."""
  import hashlib  # pylint: disable=g-import-not-at-top,redefined-outer-name
  fixtures = os.path.join(REPO, 'tests', 'fixtures', 'deploy')
  xp = w['xp'] = os.path.join(w['root'], 'export')
  os.makedirs(xp)

  def read(name):
    with open(os.path.join(fixtures, name), 'rb') as f:
      return f.read()

  def info_of(name):
    return json.loads(read(name + '.json'))

  def put(name, data, info=None, text=None):
    """FILE `name` with `data`; FILE.json from `info` (sha256 and bytes set to `data`'s
    unless `info` already differs there on purpose) or the raw `text`."""
    with open(os.path.join(xp, name), 'wb') as f:
      f.write(data)
    if info is not None:
      text = json.dumps(info)
    if text is not None:
      with open(os.path.join(xp, name + '.json'), 'w') as f:
        f.write(text)

  def matching(info, data, **fields):
    return dict(info, bytes=len(data), sha256=hashlib.sha256(data).hexdigest(), **fields)

  onnx_bytes, shlo = read('tiny.onnx'), read('tiny.stablehlo')
  onnx_info, shlo_info = info_of('tiny.onnx'), info_of('tiny.stablehlo')
  put('tiny.onnx', onnx_bytes, onnx_info)
  put('tiny.tflite', read('tiny.tflite'), info_of('tiny.tflite'))
  put('benchdir.onnx', onnx_bytes, onnx_info)
  os.makedirs(os.path.join(xp, 'benchdir.onnx.bench.json'))
  rng = __import__('random').Random(29)
  noise = bytes(rng.getrandbits(8) for _ in range(5000))
  put('random.onnx', b'\x99' + noise, matching(onnx_info, b'\x99' + noise))
  put('empty.onnx', b'', onnx_info)
  cut = onnx_bytes[:len(onnx_bytes) // 2]
  put('truncated.onnx', cut, matching(onnx_info, cut))
  put('random.stablehlo', b'\x10\x00\x00\x00' + noise, matching(shlo_info, b'\x10\x00\x00\x00'
                                                                + noise))
  put('empty.stablehlo', b'', shlo_info)
  cut = shlo[:len(shlo) // 2]
  put('truncated.stablehlo', cut, matching(shlo_info, cut))
  put('onnx_bytes.tflite', onnx_bytes, matching(info_of('tiny.tflite'), onnx_bytes))
  text = b'this is not a flatbuffer\n' * 10
  put('text.tflite', text, matching(info_of('tiny.tflite'), text))
  put('json_invalid.onnx', onnx_bytes, text='{"format": "onnx", ')
  put('json_list.onnx', onnx_bytes, text='[1, 2, 3]')
  put('json_empty_object.onnx', onnx_bytes, text='{}')
  put('json_no_image_shape.onnx', onnx_bytes,
      {k: v for k, v in onnx_info.items() if k != 'image_shape'})
  put('json_shape_text.onnx', onnx_bytes, dict(onnx_info, image_shape='28x28x1'))
  put('json_other_shape.onnx', onnx_bytes, dict(onnx_info, image_shape=[32, 32, 1]))
  put('json_other_channels.onnx', onnx_bytes, dict(onnx_info, image_shape=[28, 28, 3],
                                                   mean=[0.5] * 3, std=[0.25] * 3))
  put('json_nan.onnx', onnx_bytes, text=json.dumps(onnx_info).replace(
      '"num_classes": 10', '"num_classes": NaN'))
  put('json_inf_mean.onnx', onnx_bytes, text=json.dumps(onnx_info).replace(
      '"mean": [0.286]', '"mean": [1e400]'))
  put('json_huge_classes.onnx', onnx_bytes, dict(onnx_info, num_classes=10**12))
  put('json_huge_image.onnx', onnx_bytes, dict(onnx_info, image_shape=[10**6, 10**6, 1]))
  put('json_bytes_string.onnx', onnx_bytes, dict(onnx_info, bytes='24507'))
  put('json_format_tflite.onnx', onnx_bytes, dict(onnx_info, format='tflite'))
  put('json_bad_data.onnx', onnx_bytes, dict(onnx_info, data=dict(
      onnx_info['data'], eval_split='test[[1')))
  put('stale_sha256.onnx', onnx_bytes, dict(onnx_info, sha256='0' * 64))
  put('no_json.onnx', onnx_bytes)
  put('json_is_dir.onnx', onnx_bytes)
  os.makedirs(os.path.join(xp, 'json_is_dir.onnx.json'))
  os.makedirs(os.path.join(xp, 'a_dir.onnx'))
  # Outside export/: `snapshot` reads every file there, and these never end.
  xs = w['xs'] = os.path.join(w['root'], 'special_files')
  os.makedirs(xs)
  os.mkfifo(os.path.join(xs, 'fifo.onnx'))
  os.symlink('/dev/zero', os.path.join(xs, 'dev_zero.onnx'))
  for name in ('fifo.onnx.json', 'dev_zero.onnx.json'):
    with open(os.path.join(xs, name), 'w') as f:
      json.dump(onnx_info, f)
  put('ansi\x1b[31mred.onnx', noise, matching(onnx_info, noise))


def _untrusted_folders(w) -> None:
  """Issue 29's bad image folders and lists, under `w['root']`: small (8x8 PNGs), each wrong in
  one way; their paths go into `w` as f_<name>."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top

  def folder(name):
    # A hidden folder: the cases that list all of {root} as a dataset skip it.
    path = w[f'f_{name}'] = os.path.join(w['root'], '.issue29', name)
    return path

  def images(directory, n, shade=0):
    os.makedirs(directory, exist_ok=True)
    for i in range(n):
      Image.fromarray(np.full((8, 8), (shade * 50 + i * 7) % 256, np.uint8)).save(
          os.path.join(directory, f'{i}.png'))

  for name, classes in (('ok', 'ab'), ('three', 'abc'), ('one', 'a')):
    for k, c in enumerate(classes):
      images(os.path.join(folder(name), c), 3, k)
  loop = folder('loop')
  images(f'{loop}/a', 3)
  images(f'{loop}/b', 3, 1)
  os.symlink('.', f'{loop}/a/loop')  # 30 files became 430 examples
  outside = folder('outside')
  images(f'{outside}/a', 3)
  images(f'{outside}/b', 3, 1)
  os.symlink(os.path.join(w['f_ok'], 'b'), f'{outside}/a/ext')
  overlap = folder('overlap')
  for split in ('train', 'val'):
    images(f'{overlap}/{split}/a', 2)
    images(f'{overlap}/{split}/b', 2, 1)
  os.remove(f'{overlap}/val/a/1.png')
  os.link(f'{overlap}/train/b/0.png', f'{overlap}/val/a/9.png')  # one file in both splits
  bad = os.fsencode(folder('badname'))
  images(os.path.join(w['f_badname'], 'b'), 2)
  os.makedirs(os.path.join(bad, b'caf\xe9'))
  shutil.copy(os.path.join(w['f_badname'], 'b', '0.png'), os.path.join(bad, b'caf\xe9', b'0.png'))
  bomb = folder('bomb')
  images(f'{bomb}/a', 2)
  images(f'{bomb}/b', 2, 1)
  import io  # pylint: disable=g-import-not-at-top
  buffer = io.BytesIO()
  Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(buffer, 'JPEG')
  jpeg = bytearray(buffer.getvalue())
  sof = jpeg.find(b'\xff\xc0')
  jpeg[sof + 5:sof + 9] = (40000).to_bytes(2, 'big') * 2  # 40000x40000 claimed by 700 bytes
  with open(f'{bomb}/a/bomb.jpg', 'wb') as f:
    f.write(jpeg)
  fifo = folder('fifo')
  images(f'{fifo}/a', 2)
  images(f'{fifo}/b', 2, 1)
  os.mkfifo(f'{fifo}/a/pipe.jpg')  # reading it would wait forever
  lists = folder('lists')
  images(f'{lists}/a', 3)
  images(f'{lists}/b', 3, 1)
  texts = {
      'latin.csv': b'path,label\na/0.png,caf\xe9\nb/0.png,b\n',
      'huge.csv': b'a/0.png,0\nb/0.png,20000000\n',
      'neg.csv': b'a/0.png,0\nb/0.png,-3\n',
      'sparse.csv': b'a/0.png,0\na/1.png,1\nb/0.png,5000\n',
      'empty.csv': b'a/0.png,a\nb/0.png,\n',
      'dup.csv': b'a/0.png,a\nb/0.png,b\na/0.png,b\n',
      'splits.csv': b'a/0.png,a,train\nb/0.png,b,train\na/0.png,a,val\nb/1.png,b,val\n',
      'names.csv': b'a/0.png,a\nb/0.png,b\nb/1.png,zebra\n',
      'object.jsonl': b'{"path": "a/0.png", "label": "a"}\n{"path": "b/0.png", "label": {}}\n',
      'deep.jsonl': b'[' * 50000 + b'\n',
      'long.csv': b'a/0.png,a\n' + b'b/0.png,' + b'x' * 200000 + b'\n',
  }
  for name, data in texts.items():
    with open(os.path.join(lists, name), 'wb') as f:
      f.write(data)


def _issue29_checkpoints(w):
  """Checkpoint files that lie (issue 29) in w['ck29']: tensors beyond their storage, zip bombs,
  damaged zips and headers, a directory, a FIFO, a symlink loop, and timm ViTs whose tensors
  have the wrong shapes or NaN."""
  import io  # pylint: disable=g-import-not-at-top
  import zipfile  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  from import_weights import generate  # pylint: disable=g-import-not-at-top
  from pth_writer import TensorSpec, pickle_state_dict, write_pth  # pylint: disable=g-import-not-at-top
  d = w['ck29'] = os.path.join(w['root'], 'ck29')
  os.makedirs(d)
  one = TensorSpec.of(np.ones(1, np.float32))
  a = np.arange(12, dtype=np.float32).reshape(3, 4)
  specs = {
      'pth_oob': dict(one.__dict__, size=(192, 48), stride=(48, 1)),
      'pth_stride0': dict(one.__dict__, size=(40000, 40000), stride=(0, 0)),
      'pth_negative_stride': dict(TensorSpec.of(a).__dict__, stride=(-4, 1)),
      'pth_offset': dict(TensorSpec.of(a).__dict__, offset=2**40),
      'pth_numel': dict(TensorSpec.of(a).__dict__, numel=100),
  }
  for name, fields in specs.items():
    write_pth(os.path.join(d, f'{name}.pth'), {'blocks.0.mlp.fc1.weight': TensorSpec(**fields)})
  pkl = pickle_state_dict({'w': TensorSpec.of(a)}).replace(b'(K\x03K\x04t', b'(\x88K\x04t')
  with zipfile.ZipFile(os.path.join(d, 'pth_bool_size.pth'), 'w') as z:
    z.writestr('archive/data.pkl', pkl)
    z.writestr('archive/data/0', a.tobytes())
  big = TensorSpec.of(np.zeros(1 << 18, np.float32))  # 1 MB, rebuilt 200 times: 200 MB
  write_pth(os.path.join(d, 'pth_repeated.pth'), {f'w{i}': big for i in range(200)})
  with zipfile.ZipFile(os.path.join(d, 'pth_bomb.pth'), 'w', zipfile.ZIP_DEFLATED) as z:
    z.writestr('archive/data.pkl', pickle_state_dict({'w': TensorSpec.of(a)}))
    z.writestr('archive/data/0', bytes(100 << 20))  # 100 MB of zeros in 100 kB
  with open(MAE_PTH, 'rb') as f:
    data = f.read()
  with open(os.path.join(d, 'pth_truncated.pth'), 'wb') as f:
    f.write(data[:len(data) // 2])
  np.savez(os.path.join(d, 'npz_ok.npz'), w=a)
  with open(os.path.join(d, 'npz_ok.npz'), 'rb') as f:
    data = f.read()
  with open(os.path.join(d, 'npz_truncated.npz'), 'wb') as f:
    f.write(data[:len(data) - 30])
  np.savez(os.path.join(d, 'npz_object.npz'), w=np.array([{'x': 1}], dtype=object))
  npy = io.BytesIO()  # An npy header that claims 6.4 GB over 48 bytes of data.
  np.lib.format.write_array_header_1_0(npy, {'descr': '<f4', 'fortran_order': False,
                                             'shape': (40000, 40000)})
  with zipfile.ZipFile(os.path.join(d, 'npz_shape.npz'), 'w') as z:
    z.writestr('w.npy', npy.getvalue() + a.tobytes())
  save_file({'w': a}, os.path.join(d, 'st_ok.safetensors'))
  with open(os.path.join(d, 'st_ok.safetensors'), 'rb') as f:
    data = f.read()
  header = json.dumps({n: {'dtype': 'F32', 'shape': [12], 'data_offsets': [0, 48]}
                       for n in ('v', 'w')}).encode()  # two tensors over the same 48 bytes
  with open(os.path.join(d, 'st_overlap.safetensors'), 'wb') as f:
    f.write(len(header).to_bytes(8, 'little') + header + a.tobytes())
  for name, old, new in (('st_offsets', b'[0,48]', b'[0,4800000]'),
                         ('st_dtype', b'"F32"', b'"F99"')):
    assert old in data, (old, data[:100])
    with open(os.path.join(d, f'{name}.safetensors'), 'wb') as f:
      f.write(data.replace(old, new))
  os.symlink(os.path.join(d, 'loop.pth'), os.path.join(d, 'loop.pth'))
  os.mkfifo(os.path.join(d, 'fifo.pth'))
  with open(os.path.join(REPO, 'tests', 'fixtures', 'import', 'timm_vit.json')) as f:
    spec = json.load(f)
  good = generate(spec, {})
  bad = {'qkv_1d': {'blocks.0.attn.qkv.weight': good['blocks.0.attn.qkv.weight'].reshape(-1)},
         'patch_shape': {'patch_embed.proj.weight': good['patch_embed.proj.weight'][..., :7]},
         'mlp_shape': {'blocks.1.mlp.fc1.weight': good['blocks.1.mlp.fc1.weight'][:96]},
         'nan': {'blocks.0.attn.proj.weight': np.where(
             np.eye(48, dtype=bool), np.float32(np.nan), good['blocks.0.attn.proj.weight'])}}
  for name, changed in bad.items():
    save_file({k: np.ascontiguousarray(v) for k, v in {**good, **changed}.items()},
              os.path.join(d, f'{name}.safetensors'))


def _format(argv, world, tmp_path):
  values = {**{k: v for k, v in world.items() if isinstance(v, str)}, 'new': str(tmp_path / 'new')}
  return [a.format(**values) for a in argv]


def _check(case, code, out, err, world):
  text = out + err
  assert code == 2, (case.id, code, err[-3000:], out[-1500:])
  assert 'Traceback' not in text, (case.id, text[-4000:])
  assert 'error:' in err or 'usage:' in err, (case.id, err[-2000:])
  for word in case.words:
    assert word.format(**{k: v for k, v in world.items() if isinstance(v, str)}) in err, (
        case.id, word, err[-2000:])


@pytest.mark.parametrize('case', CASES, ids=[c.id for c in CASES])
def test_bad_input_exits_2_naming_it(case, world, tmp_path, capfd):
  argv = _format(case.argv, world, tmp_path)
  code = _main(argv)
  out, err = capfd.readouterr()
  _check(case, code, out, ' '.join(err.split()), world)
  assert snapshot(world['root']) == world['before'], f'{case.id} changed a checkpoint or export'
  locks = [b for b, _, files in os.walk(world['root']) if 'jkd.lock' in files]
  assert locks == [world['locked']], f'{case.id} left a lock: {locks}'


def test_at_least_100_cases_over_every_command():
  assert len(CASES) >= 100 and len({c.id for c in CASES}) == len(CASES)
  commands = {c.argv[0] for c in CASES if c.argv}
  assert {'train', 'pretrain', 'distill', 'compress', 'eval', 'bench', 'plan', 'pipeline',
          'demo', 'import', 'data', 'export'} <= commands


FRESH_PROCESS = ('config_raises', 'lr_inf', 'resume_truncated_checkpoint',
                 'eval_random_bytes_checkpoint', 'export_program_garbage', 'workdir_locked')


def test_cases_in_fresh_processes(world, tmp_path):
  """A sample through `python -m jkd.cli`: the same exit status and message, and nothing at
  interpreter exit (Orbax's abandoned reads of a damaged checkpoint used to print dozens of
  asyncio tracebacks there)."""
  by_id = {c.id: c for c in CASES}
  procs = []
  for name in FRESH_PROCESS:  # Two at a time: each mostly waits for its imports.
    argv = _format(by_id[name].argv, world, tmp_path / name)
    procs.append((name, subprocess.Popen(
        [sys.executable, '-m', 'jkd.cli', *argv], cwd=REPO, text=True, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, env=dict(os.environ, PYTHONUNBUFFERED='1'))))
    if len(procs) % 2 == 0:
      procs[-2][1].wait()
  for name, proc in procs:
    out, err = proc.communicate(timeout=300)
    _check(by_id[name], proc.returncode, out, ' '.join(err.split()), world)
  assert snapshot(world['root']) == world['before']


def test_batch_that_does_not_fit_in_memory(tmp_path):
  """batch_size=60000 under a 4 GB address-space limit: XLA cannot allocate the step, and the
  user gets exit 2 naming config.batch_size and what to do (it used to be a traceback)."""
  import resource  # pylint: disable=g-import-not-at-top

  def limit():
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
  argv = train('--config.batch_size=60000', '--config.data.train_split=train',
               '--config.eval_batch_size=128', w=str(tmp_path / 'w'))
  p = subprocess.run([sys.executable, '-m', 'jkd.cli', *argv], cwd=REPO, text=True,
                     capture_output=True, timeout=300, preexec_fn=limit,
                     env=dict(os.environ, PYTHONUNBUFFERED='1'))
  _check(Case('oom', argv, ('config.batch_size=60000', 'memory')), p.returncode, p.stdout,
         ' '.join(p.stderr.split()), {})



def test_validate_knows_every_position_embedding():
  """jkd.validate keeps its own copy of the names (it loads without jax); they must agree."""
  from jkd import validate
  from jkd.models import vit
  assert validate.POSEMBS == vit.POSEMBS


# ---------------------------------------------------------------- issue 29: writing exports


def _issue29_rows(prefix):
  return [c for c in CASES if c.id.startswith(prefix)]


def test_issue29_messages_escape_control_characters(world, tmp_path, capfd):
  """A file name with an ANSI escape reaches the message escaped (\\x1b), never raw."""
  for case in _issue29_rows('issue29_'):
    if 'ansi' not in case.id:
      continue
    assert _main(_format(case.argv, world, tmp_path)) == 2
    _, err = capfd.readouterr()
    assert '\x1b' not in err and r'\x1b[31m' in err, err


def _export_argv(world, out, *flags):
  return ['export', '--workdir', world['good'], '--format', 'stablehlo', '--out', out, *flags]


def _files(folder):
  """{name: bytes} of the regular files in `folder` (symlinks as 'link -> target')."""
  out = {}
  for name in sorted(os.listdir(folder)):
    path = os.path.join(folder, name)
    if os.path.islink(path):
      out[name] = f'link -> {os.readlink(path)}'
    elif os.path.isfile(path):
      with open(path, 'rb') as f:
        out[name] = f.read()
  return out


def test_issue29_export_replaces_planted_symlinks(world, tmp_path):
  """Symlinks planted at FILE and FILE.json are replaced by the new files; their targets
  outside are untouched (the writes used to follow them)."""
  outside = tmp_path / 'outside'
  outside.mkdir()
  for name in ('victim', 'victim.json'):
    (outside / name).write_text('keep me\n')
  folder = tmp_path / 'out'
  folder.mkdir()
  out = str(folder / 'm.stablehlo')
  os.symlink(outside / 'victim', out)
  os.symlink(outside / 'victim.json', out + '.json')
  assert _main(_export_argv(world, out)) == 0
  assert _files(outside) == {'victim': b'keep me\n', 'victim.json': b'keep me\n'}
  assert not os.path.islink(out) and not os.path.islink(out + '.json')
  from jkd.deploy import runtime  # pylint: disable=g-import-not-at-top
  assert runtime.open_file(out).num_classes == 10
  assert sorted(os.listdir(folder)) == ['m.stablehlo', 'm.stablehlo.json']


def test_issue29_export_full_disk_keeps_the_old_export(world, tmp_path):
  """A write that fails half-way (EFBIG: RLIMIT_FSIZE below the new file's size, SIGXFSZ
  ignored, in a child process) ends with exit 2 naming the file; the previous FILE and
  FILE.json are byte-identical and no temporary file is left."""
  folder = tmp_path / 'out'
  out = str(folder / 'm.stablehlo')
  assert _main(_export_argv(world, out)) == 0
  before = _files(folder)
  limit = len(before['m.stablehlo']) // 3
  code = ('import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); '
          f'resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); '
          'from jkd import cli; sys.exit(cli.main(sys.argv[1:]))')
  p = subprocess.run([sys.executable, '-c', code, *_export_argv(world, out, '--int8')],
                     cwd=REPO, text=True, capture_output=True, timeout=600,
                     env=dict(os.environ, PYTHONUNBUFFERED='1', JAX_ENABLE_COMPILATION_CACHE='0'))
  err = ' '.join(p.stderr.split())
  assert p.returncode == 2 and 'Traceback' not in p.stderr, p.stderr[-3000:]
  assert 'm.stablehlo' in err and 'File too large' in err and 'unchanged' in err, err
  assert _files(folder) == before


def test_issue29_read_only_file_system(world, tmp_path, capfd, monkeypatch):
  """EROFS at the write (a read-only file system, simulated at `tempfile.mkstemp`, where
  `storage.write_bytes` starts: permissions do not stop root): `jkd export` and `jkd eval
  --export FILE --workdir W` (eval.json) end with exit 2 naming the file; nothing changed."""
  import errno  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top
  folder = tmp_path / 'out'
  out = str(folder / 'm.stablehlo')
  assert _main(_export_argv(world, out)) == 0
  before = _files(folder)
  capfd.readouterr()

  def read_only(*a, **k):
    raise OSError(errno.EROFS, os.strerror(errno.EROFS))
  monkeypatch.setattr(tempfile, 'mkstemp', read_only)
  assert _main(_export_argv(world, out, '--int8')) == 2
  err = ' '.join(capfd.readouterr().err.split())
  assert 'm.stablehlo' in err and 'read-only' in err and 'Traceback' not in err, err
  assert _files(folder) == before
  w = str(tmp_path / 'w')
  shutil.copytree(world['good'], w, symlinks=True)
  files = sorted(os.listdir(w))
  assert _main(['eval', '--export', out, '--workdir', w, '--split', 'test[:16]']) == 2
  err = ' '.join(capfd.readouterr().err.split())
  assert 'eval.json' in err and 'read-only' in err and 'Traceback' not in err, err
  assert sorted(os.listdir(w)) == files


def test_issue29_compress_export_special_files(world, tmp_path, capfd):
  """`jkd eval --workdir W --export` (the jax.export program of `jkd compress`) with a FIFO as
  weights.bin or /dev/zero as model.jaxexport or manifest.json: exit 2 naming the file, at once
  (these used to block or read forever)."""
  for name, make in (('weights.bin', os.mkfifo),
                     ('model.jaxexport', lambda p: os.symlink('/dev/zero', p)),
                     ('manifest.json', lambda p: os.symlink('/dev/zero', p))):
    w = str(tmp_path / name)
    shutil.copytree(world['q8'], w, symlinks=True)
    path = os.path.join(w, 'export', name)
    os.remove(path)
    make(path)
    t0 = time.time()
    assert _main(ev('--export', w=w)) == 2
    err = ' '.join(capfd.readouterr().err.split())
    assert name in err and 'not a regular file' in err and 'Traceback' not in err, err
    assert time.time() - t0 < 60


def test_issue29_export_into_a_workdir_takes_and_releases_its_lock(world, tmp_path, monkeypatch):
  """`--out W/export/FILE` with W a workdir: the export holds W's lock while it writes (seen
  from the write itself) and releases it after."""
  from jkd import storage  # pylint: disable=g-import-not-at-top
  w = str(tmp_path / 'w')
  shutil.copytree(world['good'], w, symlinks=True)
  seen = []
  real = storage.write_bytes

  def spy(path, data):
    seen.append((os.path.basename(path), os.path.exists(os.path.join(w, 'jkd.lock'))))
    real(path, data)
  monkeypatch.setattr(storage, 'write_bytes', spy)
  out = os.path.join(w, 'export', 'm.stablehlo')
  assert _main(_export_argv(world, out)) == 0
  assert seen == [('m.stablehlo', True), ('m.stablehlo.json', True)]
  assert not os.path.exists(os.path.join(w, 'jkd.lock'))


def test_issue29_rows_in_fresh_processes(world, tmp_path):
  """Rows that reach the runtime's probe (a forked child) and the StableHLO reader, through
  `python -m jkd.cli`: the same exit status and message, nothing printed at interpreter exit."""
  by_id = {c.id: c for c in CASES}
  for name in ('issue29_bench_export_truncated.onnx', 'issue29_eval_export_truncated.stablehlo',
               'issue29_eval_export_json_other_channels.onnx'):
    argv = _format(by_id[name].argv, world, tmp_path / name)
    p = subprocess.run([sys.executable, '-m', 'jkd.cli', *argv], cwd=REPO, text=True,
                       capture_output=True, timeout=300,
                       env=dict(os.environ, PYTHONUNBUFFERED='1'))
    _check(by_id[name], p.returncode, p.stdout, ' '.join(p.stderr.split()), world)
    head = f'jkd {argv[0]}:'
    assert p.stderr.startswith(head + ' error:') and p.stderr.count(head) == 1, p.stderr
    assert 'Exception ignored' not in p.stderr, p.stderr
  assert snapshot(world['root']) == world['before']
