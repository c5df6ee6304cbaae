"""Cached teachers (FKD / ReLabel style): run the teacher once, then distill without it.

jkd's train iterator is deterministic: global batch k of a run, with its crop/flip, depends only
on (data settings, seed, batch size, k), and the step draws its mixup from (seed, k) alone
(`common.step_inputs`). So the teacher's view of every step is known before training, and the
cache is keyed by global batch index: `ensure(config)` runs the teacher over exactly the batches
the student will see (all `total_steps` of them, so every epoch's augmentation is covered) and
stores per example its top-k logits. The distill step then rebuilds the teacher's logits from
the `teacher_values` / `teacher_indices` / `teacher_rest` the iterator adds to each batch and
never runs (or loads) the teacher.

Layout of `config.teacher.cache.dir`:
  manifest.json          identity (teacher workdir + checkpoint step, data settings, seed, batch
                         size, mixup, k, dtype) and the shards written so far
  shard_000000.npz ...   `shard_steps` consecutive global batches each: values (S, B, k) and
                         rest (S, B) in cache dtype, indices (S, B, k) int16/int32
  eval_predictions.npy   the teacher's argmax on the eval split, for teacher accuracy and
                         agreement at eval time without the teacher

Classes outside the top k (k < C): `rest='smooth'` (default) gives each of them the log-mean-
exp of the teacher's non-top-k logits, so at temperature 1 they share the missing probability
mass 1 - sum(top-k p) equally. That is FKD's default "marginal smoothing" (Shen & Xing, "A Fast
Knowledge Distillation Framework for Visual Recognition", ECCV 2022; szq0214/FKD,
`--label_type marginal_smoothing_k5`), kept in logit space so kd's temperature still applies
(exact at T=1, an approximation of the tail at other T). `rest='renorm'` drops them (logit
-1e9): the softmax renormalises over the top k, FKD's `marginal_renorm`. With k = C the rebuilt
logits are the teacher's (in fp32; fp16 storage rounds them to ~1e-3 relative).

Shards are written atomically and listed in the manifest after each write, so an interrupted
build resumes where it stopped. A cache whose identity differs from the run is a `UserError`.
"""
from __future__ import annotations

import io
import json
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from jkd import data, interrupt, loop, parallel, storage, teachers
from jkd.data import randaugment
from jkd.checkpoint import read_latest_meta
from jkd.errors import UserError
from jkd.metrics import format_duration
from jkd.trainers import common
from jkd.trainers import distill_terms as T

FORMAT = 1
MANIFEST = 'manifest.json'
EVAL_PREDICTIONS = 'eval_predictions.npy'
REST_MODES = ('smooth', 'renorm')
DTYPES = {'float16': np.float16, 'float32': np.float32}
DEFAULTS = {'dir': '', 'topk': 10, 'dtype': 'float16', 'rest': 'smooth', 'shard_steps': 100}
# Data settings that do not change a batch's content (reader threads, buffers, where files are).
_NOT_IDENTITY = ('num_workers', 'prefetch', 'data_dir', 'eval_split')
# Augmentation settings that are left out of the identity while off (caches built before they
# existed stay valid); on, they change every batch and are part of it.
_OFF = {'randaugment_ops': 0, 'randaugment_magnitude': 9.0, 'randaugment_std': 0.5,
        'random_erasing': 0.0, 'repeated_aug': 1}
_DROPPED_LOGIT = -1e9


def settings(config) -> dict:
  """`config.teacher.cache` with defaults filled in and checked."""
  given = config.teacher.get('cache') or {}
  given = given.to_dict() if hasattr(given, 'to_dict') else dict(given)
  s = {**DEFAULTS, **given}
  if s['rest'] not in REST_MODES:
    raise UserError(f"config.teacher.cache.rest={s['rest']!r}: use one of {REST_MODES}.")
  if s['dtype'] not in DTYPES:
    raise UserError(f"config.teacher.cache.dtype={s['dtype']!r}: use one of {tuple(DTYPES)}.")
  if int(s['topk']) < 1 or int(s['shard_steps']) < 1:
    raise UserError('config.teacher.cache.topk and .shard_steps must be at least 1.')
  return s


def enabled(config) -> bool:
  """Whether the run distils from a cache (`config.teacher.cache.dir` set)."""
  teacher = config.get('teacher') or {}
  return bool((teacher.get('cache') or {}).get('dir'))


def check_terms(terms: list[dict]) -> None:
  """Only terms on logits can read a cache: it holds no teacher features."""
  feature = [f"{t['name']} ({t['kind']})" for t in terms if t['kind'] not in T.LOGIT_TERMS]
  if feature:
    raise UserError(f'config.teacher.cache.dir is set, but the terms {", ".join(feature)} read '
                    'teacher features, which the cache does not hold (only top-k logits). Drop '
                    'those terms, or distill with the online teacher '
                    "(--config.teacher.cache.dir='').")


def _read_manifest(directory: str) -> dict | None:
  path = storage.join(directory, MANIFEST)
  if not storage.isfile(path):
    return None
  try:
    manifest = storage.read_json(path)
  except (OSError, ValueError) as e:
    raise UserError(f'{path} is unreadable ({e}): remove the cache directory or point '
                    '--config.teacher.cache.dir to another one.') from e
  if (not isinstance(manifest, dict) or manifest.get('format') != FORMAT
      or not isinstance(manifest.get('identity'), dict)):
    raise UserError(f'{path} is not a jkd teacher cache (format {FORMAT}): point '
                    '--config.teacher.cache.dir to an empty or jkd-made directory.')
  _check_manifest(path, manifest)
  return manifest


def _check_manifest(path: str, manifest: dict) -> None:
  """UserError naming the field of a cache manifest that is not what `ensure` writes (a
  hand-edited or damaged file must not steer which shards are read or trusted)."""
  def bad(field, what):
    raise UserError(f'{path}: field {field!r} is {what}; the manifest is damaged or was edited. '
                    'Remove the cache directory (it is rebuilt) or point '
                    '--config.teacher.cache.dir to another one.')
  steps = manifest.get('shard_steps')
  if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
    bad('shard_steps', f'{steps!r}, not an integer >= 1')
  shards = manifest.get('shards')
  if not isinstance(shards, dict):
    bad('shards', f'{type(shards).__name__}, not a dict')
  for key, count in shards.items():
    if not key.isdigit() or not isinstance(count, int) or not 0 <= count <= steps:
      bad(f'shards[{key!r}]', f'{count!r}, not a batch count in [0, shard_steps]')
  ident = manifest['identity']
  for field, kind in (('topk', int), ('num_classes', int), ('batch_size', int)):
    if not isinstance(ident.get(field), kind) or ident[field] < 1:
      bad(f'identity.{field}', f'{ident.get(field)!r}, not an integer >= 1')
  if ident.get('dtype') not in DTYPES:
    bad('identity.dtype', f'{ident.get("dtype")!r}, not one of {tuple(DTYPES)}')


def _write_json(path: str, obj: dict) -> None:
  storage.write_text(path, json.dumps(obj, indent=1))  # A reader never sees half a manifest.


def _has_teacher(config) -> bool:
  """Whether the run names a teacher that can build the cache (one, or `config.teachers`)."""
  return bool(config.teacher.get('workdir')) or teachers.configured(config)


def _teacher_ref(config) -> dict:
  """Which teacher checkpoint (workdir + step) the cache comes from; reads metadata only. For
  `config.teachers` (averaged: the cache holds the ensemble's combined logits), every teacher's
  reference, weight, dtype and EMA choice."""
  if teachers.configured(config):
    if teachers.combine(config) != 'average':
      raise UserError("config.teacher.cache.dir with config.teacher.combine='separate': a cache "
                      "holds one set of logits. Use combine='average' (the cache then holds the "
                      "teachers' weighted mean) or the online teachers.")
    entries = teachers.parse(config)
    return {'model': '+'.join(_one_ref(e['workdir'])['model'] for e in entries),
            'members': [{**_one_ref(e['workdir']), 'name': e['name'], 'weight': e['weight'],
                         'dtype': e['dtype'], 'ema': bool(e['ema'])} for e in entries]}
  ref = _one_ref(config.teacher.get('workdir'))
  if config.teacher.get('ema'):
    ref['ema'] = True
  return ref


def _one_ref(workdir: str) -> dict:
  step, meta = read_latest_meta(workdir)
  return {'workdir': storage.resolve(workdir), 'step': int(step),
          'model': (meta.get('config') or {}).get('model', {}).get('name') or meta.get('model')}


def identity(config, num_classes: int, teacher: dict) -> dict:
  """Everything that fixes the cached values: a cache is reused only if all of it matches."""
  s = settings(config)
  ident = {
      'teacher': teacher, 'teacher_dtype': config.teacher.get('dtype') or 'float32',
      'data': {k: v for k, v in sorted(config.data.to_dict().items())
               if k not in _NOT_IDENTITY and not (k in _OFF and v == _OFF[k])},
      'seed': int(config.seed), 'rng_impl': config.get('rng_impl', 'rbg'),
      'batch_size': int(config.batch_size), 'mixup_alpha': float(config.get('mixup_alpha', 0.0)),
      'topk': min(int(s['topk']), num_classes), 'dtype': s['dtype'], 'num_classes': num_classes,
  }
  return json.loads(json.dumps(ident))  # As read back from the manifest (tuples -> lists).


def _eval_identity(config) -> dict:
  keys = ('name', 'eval_split', 'image_size', 'crop_fraction')
  return {k: config.data.get(k) for k in keys}


def _mismatch(directory: str, saved: dict, now: dict) -> UserError:
  diff = [f'{k}: cache {saved.get(k)!r}, run {now.get(k)!r}' for k in sorted(set(saved) | set(now))
          if saved.get(k) != now.get(k)]
  return UserError(
      f'The teacher cache in {directory} was built for other settings ({"; ".join(diff)}), so its '
      'logits are not this run\'s batches. Point --config.teacher.cache.dir to a new directory '
      '(it is built there), or run with the settings the cache was built with; the cache was left '
      'untouched.')


def _plan(config) -> tuple[str, dict, int, int]:
  """(directory, settings, num_classes, total_steps) of the run."""
  info = data.get_info(config.data)
  steps = common.total_steps(config, info.num_examples[config.data.train_split])
  s = settings(config)
  return storage.resolve(s['dir']), s, info.num_classes, steps


def _shard_lengths(total_steps: int, shard_steps: int) -> list[int]:
  return [min(shard_steps, total_steps - i * shard_steps)
          for i in range(math.ceil(total_steps / shard_steps))]


def ensure(config, *, log=print) -> dict:
  """Checks the cache in `config.teacher.cache.dir` against the run and builds what is missing.

  The one-time teacher pass: every train batch of the run (`total_steps` of them) through the
  teacher, top-k stored, plus the teacher's eval-split predictions. Resumable: shards already in
  the manifest are kept. With `config.teacher.workdir` empty, a complete cache is used as it is
  (its manifest names the teacher). Returns the manifest.

  Raises:
    UserError: the cache was built for other settings, or it is incomplete and no teacher is set.
  """
  directory, s, num_classes, total_steps = _plan(config)
  storage.ensure_dir(directory, 'config.teacher.cache.dir')
  if jax.process_index() != 0:
    log = lambda *_: None  # noqa: E731  (one progress stream per run)
  manifest = _read_manifest(directory)
  has_teacher = _has_teacher(config)
  if manifest is None and not has_teacher:
    raise UserError(f'No teacher cache in {directory} and no teacher to build one: set '
                    '--config.teacher.workdir=DIR (a trained jkd workdir).')
  teacher = _teacher_ref(config) if has_teacher else manifest['identity']['teacher']
  want = identity(config, num_classes, teacher)
  if manifest is not None and manifest['identity'] != want:
    raise _mismatch(directory, manifest['identity'], want)
  if manifest is None:
    manifest = {'format': FORMAT, 'identity': want, 'shard_steps': int(s['shard_steps']),
                'shards': {}, 'build_s': 0.0}
  lengths = _shard_lengths(total_steps, manifest['shard_steps'])
  missing = [i for i, n in enumerate(lengths) if manifest['shards'].get(str(i), 0) < n]
  eval_missing = (manifest.get('eval') or {}).get('identity') != _eval_identity(config)
  if not missing and not eval_missing:
    return manifest
  if not has_teacher:
    if missing:
      raise UserError(f'The teacher cache in {directory} covers fewer steps than this run '
                      f'({total_steps}) and no teacher is set to complete it: set '
                      '--config.teacher.workdir, or lower --config.total_steps.')
    return manifest  # Only the eval predictions are missing: eval without teacher metrics.
  _build(config, directory, manifest, lengths, missing, eval_missing, log)
  if jax.process_count() > 1:  # Process 0 wrote the files; the others read them next.
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices('jkd teacher cache built')
  return manifest


def _build(config, directory, manifest, lengths, missing, eval_missing, log) -> None:
  t0 = time.perf_counter()
  ident = manifest['identity']
  info = data.get_info(config.data)
  teacher = teachers.from_config(config, info.num_classes,
                                 common.input_shape(info, config.data))
  mesh = parallel.make_mesh(config.get('mesh'))
  t_vars, t_shardings = teacher.place(mesh)
  k, num_classes = ident['topk'], ident['num_classes']
  store = DTYPES[ident['dtype']]
  index_dtype = jnp.int16 if num_classes < 2**15 else jnp.int32
  mixup_alpha = ident['mixup_alpha']
  augment = randaugment.augment_settings(config.data)  # part of the identity's data settings
  replicated = parallel.replicated(mesh)  # Every process gets whole batches back.

  def top_k(variables, batch, key, step):
    images, _, _ = common.step_inputs(batch, key, step, info, mixup_alpha, augment)
    logits, _ = teacher.apply(variables, images)
    values, indices, rest = top_k_logits(logits.astype(jnp.float32), k)
    return values, indices.astype(index_dtype), rest

  top_k = jax.jit(top_k, in_shardings=(t_shardings, parallel.batch_sharding(mesh), replicated,
                                       replicated), out_shardings=replicated)
  _, key = loop.run_keys(config)  # The key every train step of the run receives.
  iterator = data.make_train_iterator(config.data, global_batch_size=config.batch_size,
                                      seed=config.seed)
  shard_steps = manifest['shard_steps']
  todo = sum(lengths[i] for i in missing)
  done, started = 0, time.perf_counter()
  if missing:
    log(f'[teacher cache] {manifest["identity"]["teacher"]["model"]} teacher over {todo} batches '
        f'of {config.batch_size} ({len(missing)} shards of {shard_steps}) -> {directory}')
  for i in missing:
    first = i * shard_steps
    iterator.set_state({**iterator.get_state(), 'next_batch': first})
    outs = [top_k(t_vars, parallel.global_batch(next(iterator), mesh), key, np.int32(first + j))
            for j in range(lengths[i])]
    values, indices, rest = (np.stack(x) for x in zip(*jax.device_get(outs)))
    _write_shard(directory, i, values.astype(store), indices, rest.astype(store))
    manifest['shards'][str(i)] = lengths[i]
    manifest['build_s'] = round(manifest['build_s'] + time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    if jax.process_index() == 0:
      _write_json(storage.join(directory, MANIFEST), manifest)
    done += lengths[i]
    rate = done * config.batch_size / (time.perf_counter() - started)
    log(f'[teacher cache] shard {i + 1}/{len(lengths)}  {done}/{todo} batches  '
        f'{rate:,.0f} ex/s  ETA {format_duration((todo - done) * config.batch_size / rate)}')
    if jax.process_count() == 1:  # Shards are complete files: a stop here loses nothing.
      interrupt.check(f'while building the teacher cache ({done} of {todo} batches are saved in '
                      f'{directory}); run the same command again to continue it')
  iterator.close()
  if eval_missing:
    manifest['eval'] = _eval_predictions(config, directory, teacher, t_vars, t_shardings,
                                         info, mesh)
    manifest['build_s'] = round(manifest['build_s'] + time.perf_counter() - t0, 2)
    if jax.process_index() == 0:
      _write_json(storage.join(directory, MANIFEST), manifest)
    log(f'[teacher cache] teacher accuracy on {config.data.eval_split}: '
        f'{manifest["eval"]["teacher_accuracy"]:.4f}; built in '
        f'{format_duration(manifest["build_s"])}')


def _write_shard(directory: str, index: int, values, indices, rest) -> None:
  if jax.process_index() != 0:
    return
  buffer = io.BytesIO()
  np.savez(buffer, values=values, indices=indices, rest=rest)
  storage.write_bytes(storage.join(directory, f'shard_{index:06d}.npz'), buffer.getvalue())


def _eval_predictions(config, directory, teacher: Teacher, t_vars, t_shardings, info,
                      mesh) -> dict:
  """The teacher's argmax on every example of the eval split, saved in order."""
  def predict(variables, batch):
    images = data.normalize(batch['image'], info.mean, info.std, jnp.float32)
    logits, _ = teacher.apply(variables, images)
    return jnp.argmax(logits, -1), batch['mask'] > 0, batch['label']

  replicated = parallel.replicated(mesh)
  predict = jax.jit(predict, in_shardings=(t_shardings, parallel.batch_sharding(mesh)),
                    out_shardings=replicated)
  batch_size = config.get('eval_batch_size', config.batch_size)
  preds, labels = [], []
  for local in data.make_eval_iterator(config.data, config.data.eval_split,
                                       global_batch_size=batch_size):
    pred, mask, label = jax.device_get(predict(t_vars, parallel.global_batch(local, mesh)))
    preds.append(pred[mask])
    labels.append(label[mask])
  preds, labels = np.concatenate(preds).astype(np.int32), np.concatenate(labels)
  if jax.process_index() == 0:
    buffer = io.BytesIO()
    np.save(buffer, preds)
    storage.write_bytes(storage.join(directory, EVAL_PREDICTIONS), buffer.getvalue())
  return {'identity': _eval_identity(config), 'examples': int(len(preds)),
          'teacher_accuracy': float(np.mean(preds == labels)) if len(preds) else 0.0}


def _read_shard(path: str, manifest: dict) -> dict:
  """A shard's arrays, checked against the manifest (shapes, dtypes, index range)."""
  ident = manifest['identity']
  try:
    with np.load(io.BytesIO(storage.read_bytes(path)), allow_pickle=False) as f:
      shard = {name: f[name] for name in ('values', 'indices', 'rest')}
  except Exception as e:  # pylint: disable=broad-except  (zip, npy and key errors alike)
    raise UserError(f'{path} is damaged ({type(e).__name__}: {str(e)[:200]}): remove the cache '
                    'directory (it is rebuilt) or point --config.teacher.cache.dir to another '
                    'one.') from None
  values, indices, rest = shard['values'], shard['indices'], shard['rest']
  k, batch = ident['topk'], ident['batch_size']
  if (values.ndim != 3 or values.shape[1:] != (batch, k) or indices.shape != values.shape
      or rest.shape != values.shape[:2] or not np.issubdtype(indices.dtype, np.integer)
      or values.dtype != DTYPES[ident['dtype']]
      or (indices.size and (indices.min() < 0 or indices.max() >= ident['num_classes']))):
    raise UserError(f'{path} does not match its manifest (values {values.shape} '
                    f'{values.dtype}, indices {indices.shape} {indices.dtype}, rest {rest.shape}; '
                    f'expected (steps, {batch}, {k}) {ident["dtype"]}, class indices below '
                    f'{ident["num_classes"]}): remove the cache directory (it is rebuilt).')
  return shard


class CachedTeacherIterator:
  """Wraps the run's train iterator: batch k gains the cached teacher outputs of batch k.

  Adds 'teacher_values' (B_local, k) float, 'teacher_indices' (B_local, k) int and
  'teacher_rest' (B_local,) float. State (get/set) is the wrapped iterator's. The cache is opened
  and checked on the first batch, so building a Task (e.g. for `jkd eval`) needs no cache.
  """

  def __init__(self, iterator, config):
    self._iterator, self._config = iterator, config
    self._next = int(iterator.get_state().get('next_batch', 0))
    self._manifest = None
    self._shard = (-1, None)
    size = config.batch_size // jax.process_count()
    self._local = slice(jax.process_index() * size, (jax.process_index() + 1) * size)

  def __iter__(self):
    return self

  def _open(self) -> dict:
    directory, _, num_classes, _ = _plan(self._config)
    manifest = _read_manifest(directory)
    if manifest is None:
      raise UserError(f'No teacher cache in {directory}: run `jkd distill` with this config, '
                      'which builds it first.')
    teacher = (_teacher_ref(self._config) if _has_teacher(self._config)
               else manifest['identity']['teacher'])
    want = identity(self._config, num_classes, teacher)
    if manifest['identity'] != want:
      raise _mismatch(directory, manifest['identity'], want)
    self._directory = directory
    return manifest

  def _cached(self, k: int):
    if self._manifest is None:
      self._manifest = self._open()
    i, j = divmod(k, self._manifest['shard_steps'])
    if self._shard[0] != i:
      path = storage.join(self._directory, f'shard_{i:06d}.npz')
      if not storage.isfile(path):
        raise UserError(f'The teacher cache in {self._directory} has no batch {k} ({path} is '
                        'missing): run `jkd distill` with this config to complete it.')
      self._shard = (i, _read_shard(path, self._manifest))
    shard = self._shard[1]
    if j >= len(shard['values']):
      raise UserError(f'The teacher cache in {self._directory} ends before batch {k}: run '
                      '`jkd distill` with this config to complete it.')
    return {f'teacher_{name}': arr[j][self._local] for name, arr in shard.items()}

  def __next__(self) -> dict:
    batch = next(self._iterator)
    cached = self._cached(self._next)
    self._next += 1
    return {**batch, **cached}

  def get_state(self) -> dict:
    return self._iterator.get_state()

  def set_state(self, state: dict) -> None:
    self._iterator.set_state(state)
    self._next = int(state['next_batch'])

  def close(self) -> None:
    self._iterator.close()


def top_k_logits(logits: jax.Array, k: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """What the cache stores of (B, C) teacher logits: (values (B, k), indices (B, k), rest (B,)).

  values/indices are the k largest logits, largest first; rest = log(mean_{c not in top k}
  exp(logits[b, c])), the one logit that gives each left-out class an equal share of their
  softmax mass at temperature 1 (0 when k = C). `teacher_logits` inverts it.
  """
  num_classes = logits.shape[-1]
  values, indices = jax.lax.top_k(logits, k)
  if k == num_classes:
    return values, indices, jnp.zeros(logits.shape[:1], logits.dtype)
  kept = jax.nn.one_hot(indices, num_classes).sum(1) > 0
  rest = jax.nn.logsumexp(jnp.where(kept, -jnp.inf, logits), -1) - jnp.log(num_classes - k)
  return values, indices, rest


def teacher_logits(batch, num_classes: int, rest: str = 'smooth') -> jax.Array:
  """Rebuilds (B, C) fp32 teacher logits from a batch's cached top-k.

  logits[b, indices[b, i]] = values[b, i]; every other class gets `teacher_rest[b]` (the
  log-mean-exp of the teacher's other logits; rest='smooth') or -1e9 (rest='renorm'). A one-hot
  product instead of a scatter: exact (each class is hit at most once) and batch-shard friendly.
  """
  values = batch['teacher_values'].astype(jnp.float32)
  hit = jax.nn.one_hot(batch['teacher_indices'], num_classes, dtype=jnp.float32)  # (B, k, C)
  kept = hit.sum(1)
  fill = (batch['teacher_rest'].astype(jnp.float32)[:, None] if rest == 'smooth'
          else jnp.float32(_DROPPED_LOGIT))
  logits = jnp.einsum('bk,bkc->bc', values, hit) + fill * (1.0 - kept)
  return jax.lax.stop_gradient(logits)


def _eval_predictions_for(config) -> np.ndarray | None:
  directory = storage.resolve(settings(config)['dir'])
  try:
    manifest = _read_manifest(directory)
  except UserError:
    return None
  path = storage.join(directory, EVAL_PREDICTIONS)
  if (manifest is None or (manifest.get('eval') or {}).get('identity') != _eval_identity(config)
      or not storage.isfile(path)):
    return None
  try:
    preds = np.load(io.BytesIO(storage.read_bytes(path)), allow_pickle=False)
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(f'{path} is damaged ({type(e).__name__}: {str(e)[:200]}): remove it (it is '
                    'rebuilt with the cache).') from None
  if preds.ndim != 1 or not np.issubdtype(preds.dtype, np.integer):
    raise UserError(f'{path} holds {preds.dtype} {preds.shape}, not the teacher\'s predicted '
                    'classes: remove it (it is rebuilt with the cache).')
  return preds


def with_eval_predictions(config, batches):
  """Adds 'teacher_pred' (B_local,) int32 to each eval batch when the cache holds the teacher's
  predictions for this eval split (else returns `batches`): teacher accuracy and agreement
  without a teacher forward."""
  preds = _eval_predictions_for(config)
  if preds is None:
    return batches
  global_size = config.get('eval_batch_size', config.batch_size)
  size = global_size // jax.process_count()
  local = np.arange(jax.process_index() * size, (jax.process_index() + 1) * size)

  def generate():
    for i, batch in enumerate(batches):
      positions = i * global_size + local  # as `make_eval_iterator` lays the split out
      pred = np.where(positions < len(preds), preds[np.minimum(positions, len(preds) - 1)], 0)
      yield {**batch, 'teacher_pred': pred.astype(np.int32)}
  return generate()


def eval_batches(config, make_batches):
  """`with_eval_predictions` of a fresh pass of `make_batches()` (a Task's `eval_batches`)."""
  return with_eval_predictions(config, make_batches())


def describe(config) -> dict:
  """The teacher a cached run distils from (from the manifest when there is one)."""
  directory = storage.resolve(settings(config)['dir'])
  try:
    manifest = _read_manifest(directory)
  except UserError:
    manifest = None
  teacher = dict(manifest['identity']['teacher']) if manifest else {
      'workdir': config.teacher.get('workdir')}
  return {**teacher, 'cache_dir': directory}


def summary(config) -> dict:
  """Cache facts for the run summary: directory, k, one-time build seconds, teacher accuracy."""
  directory = storage.resolve(settings(config)['dir'])
  manifest = _read_manifest(directory) or {}
  return {'dir': directory, 'topk': manifest.get('identity', {}).get('topk'),
          'build_s': manifest.get('build_s'),
          'teacher_accuracy': (manifest.get('eval') or {}).get('teacher_accuracy')}
