"""Several frozen teachers as one: `config.teachers` (multi-teacher distillation).

`config.teachers` names the teachers, as a dict `{name: {workdir, weight, dtype, taps, ema}}`
(each field but `workdir` optional; the dict form can be overridden from the command line,
`--config.teachers.vit.weight=2`) or a list of such dicts (named `t0`, `t1`, ...). Each is a jkd
workdir (a run of any command, or a checkpoint made a workdir by `jkd import`):

  config.teachers = {'resnet': dict(workdir='runs/resnet'),
                     'vit': dict(workdir='runs/vit', weight=1.0, dtype='bfloat16',
                                 taps={'fitnet': 'block3'})}
  config.teacher.combine = 'average'          # or 'separate'

Weights are relative: they are normalised to sum to 1. `config.teacher.combine` says how the
teachers meet the loss terms of `config.losses`:

  'average'   every logit term (kd, dkd, dist, ...) reads one target, the weighted mean of the
              teachers' logits, z = sum_i w_i z_i; softmax(z / T) is then the normalised
              weighted geometric mean of the teachers' distributions at every temperature T
              (Hinton et al. 2015 distil an ensemble through the mean of its members).
  'separate'  every term against the teacher is computed once per teacher and summed with the
              weights: term = sum_i w_i term(student, teacher_i) (big_vision's distill trainer:
              one distance per teacher).

Feature terms (fitnet, at, rkd, crd, reviewkd, ...) are per teacher in both modes (features of
different architectures cannot be averaged): each teacher's copy reads its own tap
(`taps={term name: tap}`, else the term's `teacher=` option) and has its own projector or head.
Each copy is logged as `loss_TERM_TEACHER` beside the weighted `loss_TERM`.

`Ensemble` has the interface of `jkd.teacher.Teacher` that the trainers use (`place`,
`step_args`, `apply`, `description`, `variables`, `without_attention_maps`): each member is
frozen, placed by the student's sharding rules in its own storage dtype and passed to the step
as an argument; `apply` returns the combined logits, so `jkd compress`'s KD and the teacher
cache (FKD) read an averaged ensemble like one teacher.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections

from jkd.errors import UserError
from jkd.teacher import Teacher

COMBINE_MODES = ('average', 'separate')
# The fields of one entry of config.teachers and their defaults ('' dtype: config.teacher.dtype).
MEMBER_FIELDS: dict[str, Any] = {'workdir': '', 'weight': 1.0, 'dtype': '', 'taps': {},
                                 'ema': False}
# Logit terms (see distill_terms.LOGIT_TERMS) that read the teacher (all but 'ce').
_EXAMPLE = ("--config.teachers=\"{'resnet': {'workdir': 'runs/a'}, 'vit': {'workdir': "
            "'runs/b', 'weight': 0.5}}\"")


def configured(config) -> bool:
  """Whether the run names its teachers in `config.teachers` (else `config.teacher.workdir`)."""
  teachers = config.get('teachers')
  return bool(teachers) and len(teachers) > 0


def parse(config) -> list[dict]:
  """`config.teachers` as a list of complete entries {name, workdir, weight (normalised), dtype,
  taps, ema}, checked.

  Raises:
    UserError: unknown fields, a missing workdir, weights that are not positive, both
      `config.teacher.workdir` and `config.teachers` set, an unknown combine mode.
  """
  spec = config.get('teachers')
  if isinstance(spec, ml_collections.ConfigDict):
    spec = spec.to_dict()
  items = (list(spec.items()) if isinstance(spec, Mapping)
           else [(f't{i}', t) for i, t in enumerate(spec or [])])
  tcfg = config.get('teacher') or {}
  if tcfg.get('workdir'):
    raise UserError('Both config.teacher.workdir and config.teachers are set: name every teacher '
                    f"in config.teachers (e.g. {_EXAMPLE}) and leave config.teacher.workdir=''.")
  combine(config)
  entries = []
  for name, entry in items:
    entry = dict(entry)
    unknown = set(entry) - set(MEMBER_FIELDS)
    if unknown:
      raise UserError(f'config.teachers.{name}: unknown fields {sorted(unknown)}; a teacher has '
                      f'{", ".join(MEMBER_FIELDS)}.')
    entry = {'name': str(name), **MEMBER_FIELDS, **entry}
    if not entry['workdir']:
      raise UserError(f'config.teachers.{name}.workdir is empty: set it to the workdir of a '
                      f'trained model, e.g. --config.teachers.{name}.workdir=runs/teacher.')
    if not float(entry['weight']) > 0:
      raise UserError(f'config.teachers.{name}.weight={entry["weight"]}: weights must be '
                      'positive (they are normalised to sum to 1).')
    entry['dtype'] = entry['dtype'] or tcfg.get('dtype') or 'float32'
    entry['taps'] = dict(entry['taps'] or {})
    entries.append(entry)
  total = sum(float(e['weight']) for e in entries)
  for e in entries:
    e['weight'] = float(e['weight']) / total
  return entries


def combine(config) -> str:
  """`config.teacher.combine` ('average' when unset), checked."""
  mode = (config.get('teacher') or {}).get('combine') or 'average'
  if mode not in COMBINE_MODES:
    raise UserError(f'config.teacher.combine={mode!r}: use one of {", ".join(COMBINE_MODES)}.')
  return mode


def from_config(config, num_classes: int, image_shape) -> 'Teacher | Ensemble':
  """The run's frozen teacher: an `Ensemble` of `config.teachers` when it names any, else the
  one `Teacher` of `config.teacher.workdir`."""
  if not configured(config):
    return Teacher.from_config(config, num_classes, image_shape)
  return Ensemble.from_entries(parse(config), num_classes, image_shape, combine(config))


@dataclasses.dataclass(frozen=True)
class Ensemble:
  """Frozen teachers side by side, each under its name.

  Attributes:
    members: one `Teacher` per entry of `config.teachers`.
    names: their names (the keys of `variables` and of the per-teacher loss copies).
    weights: normalised weights (sum 1).
    taps: per teacher, {term name: tap} replacing a term's `teacher=` option.
    combine: 'average' or 'separate' (module docstring).
  """
  members: tuple[Teacher, ...]
  names: tuple[str, ...]
  weights: tuple[float, ...]
  taps: tuple[Mapping[str, str], ...]
  combine: str = 'average'

  @classmethod
  def from_entries(cls, entries: list[dict], num_classes: int, image_shape,
                   combine_mode: str = 'average') -> 'Ensemble':
    """Loads each entry's workdir (`Teacher.from_workdir`); `entries` as `parse` returns them."""
    if len({e['name'] for e in entries}) != len(entries):
      raise UserError('config.teachers: two teachers have the same name.')
    members = tuple(Teacher.from_workdir(e['workdir'], num_classes, image_shape,
                                         dtype=e['dtype'], ema=e['ema']) for e in entries)
    return cls(members, tuple(e['name'] for e in entries),
               tuple(e['weight'] for e in entries), tuple(e['taps'] for e in entries),
               combine_mode)

  @property
  def variables(self) -> dict:
    """{name: that teacher's host variables}."""
    return {n: m.variables for n, m in zip(self.names, self.members)}

  @property
  def image_shape(self):
    return self.members[0].image_shape

  @property
  def description(self) -> dict:
    """For summaries: the members' models joined by '+', and each teacher with its weight."""
    return {'workdir': '', 'model': '+'.join(m.description['model'] for m in self.members),
            'combine': self.combine,
            'teachers': {n: {**m.description, 'weight': w}
                         for n, m, w in zip(self.names, self.members, self.weights)}}

  def place(self, mesh) -> tuple[dict, dict]:
    """Each member placed as `Teacher.place` does (its own storage dtype); returns
    ({name: variables}, {name: shardings})."""
    placed = [m.place(mesh) for m in self.members]
    return ({n: p[0] for n, p in zip(self.names, placed)},
            {n: p[1] for n, p in zip(self.names, placed)})

  def step_args(self, mesh) -> tuple[tuple, tuple]:
    """`place` as a Task's `place_extra_args`: all teachers are the steps' last argument."""
    placed, shardings = self.place(mesh)
    return (placed,), (shardings,)

  def apply_members(self, variables, images, *, capture: bool = False):
    """Every member's forward pass: ({name: logits (B, C) fp32}, {name: its intermediates})."""
    logits, inter = {}, {}
    for name, member in zip(self.names, self.members):
      out, inter[name] = member.apply(variables[name], images, capture=capture)
      logits[name] = out.astype(jnp.float32)
    return logits, inter

  def combined(self, member_logits: Mapping[str, jax.Array]) -> jax.Array:
    """The weighted mean of the members' logits, sum_i w_i z_i (B, C) fp32."""
    return sum(w * member_logits[n] for n, w in zip(self.names, self.weights))

  def apply(self, variables, images, *, capture: bool = False):
    """Like `Teacher.apply`: (combined logits (B, C), {name: intermediates})."""
    logits, inter = self.apply_members(variables, images, capture=capture)
    return self.combined(logits), inter

  def without_attention_maps(self) -> 'Ensemble':
    return dataclasses.replace(
        self, members=tuple(m.without_attention_maps() for m in self.members))

  # ---------------------------------------------------------------- the loss terms per teacher

  def expand_terms(self, terms: list[dict], logit_terms, teacher_free=('ce',)) -> list[dict]:
    """The terms as the step computes them: a term that reads the teachers becomes one copy per
    teacher (name 'TERM_TEACHER', key 'member', the teacher's own tap), except a logit term in
    'average' mode, which reads the combined logits once. `teacher_free` kinds ('ce', 'tf_kd')
    read no teacher and stay one term."""
    out = []
    for term in terms:
      if term['kind'] in teacher_free or (self.combine == 'average'
                                          and term['kind'] in logit_terms):
        out.append(term)
        continue
      for name, taps in zip(self.names, self.taps):
        copy = dict(term, name=f"{term['name']}_{name}", member=name, of=term['name'])
        if 'teacher' in term:
          copy['teacher'] = taps.get(term['name'], term['teacher'])
        out.append(copy)
    return out

  def combine_values(self, terms: list[dict], values: Mapping[str, jax.Array]) -> dict:
    """Each term's value from the values of its copies (weighted sum), the copies kept too
    (logged as loss_TERM_TEACHER)."""
    out = dict(values)
    weights = dict(zip(self.names, self.weights))
    for term in terms:
      copies = [(n, values[f"{term['name']}_{n}"]) for n in self.names
                if f"{term['name']}_{n}" in values]
      if copies:
        out[term['name']] = sum(weights[n] * v for n, v in copies)
    return out
