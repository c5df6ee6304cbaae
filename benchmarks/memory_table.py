"""The per-device memory tables of docs/scaling.md, from `jkd.memory.estimate` (no devices).

  python benchmarks/memory_table.py                  # prints the markdown tables
  python benchmarks/memory_table.py --write docs/scaling.md   # replaces them in the doc

Teacher -> student distillation steps at 224×224, bf16 compute (fp32 student parameters and
AdamW state, bf16 teacher weights, as jkd keeps them), for the teachers ViT-B/16, ViT-L/16,
ViT-H/14 and the students ViT-S/16, ViT-B/16 (pairs where the teacher is larger), 128 examples per device
(DeiT's global batch 1024 on 8 GPUs; `--per-device-batch` changes it), on the meshes in
`SETUPS`. GPU rows use cuDNN flash attention (as configs/bench/*.py do on GPU), TPU rows XLA
attention. A second table trains the teachers themselves (no distillation: where FSDP matters),
a third gives, for one H100, the largest batch of each pair that the estimate fits in 80 GiB.
"""
import argparse
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from jkd import memory  # noqa: E402

GiB = memory.GiB
TEACHERS = ('vit_b16', 'vit_l16', 'vit_h14')
STUDENTS = ('vit_s16', 'vit_b16')
NAMES = {'vit_s16': 'ViT-S/16', 'vit_b16': 'ViT-B/16', 'vit_l16': 'ViT-L/16',
         'vit_h14': 'ViT-H/14'}
PER_DEVICE_BATCH = 128
CAPACITIES = (('80 GB', 80), ('32 GB', 32), ('16 GB', 16))  # GiB of HBM per device.
# (label, mesh, attention): GPU meshes for one 8×H100 node, TPU meshes for v4-32 / v5e-256.
SETUPS = (
    ('8 GPU data=8', {'data': 8}, 'cudnn'),
    ('8 GPU fsdp=8', {'fsdp': 8}, 'cudnn'),
    ('8 GPU fsdp=4 tensor=2', {'fsdp': 4, 'tensor': 2}, 'cudnn'),
    ('32 TPU fsdp=32', {'fsdp': 32}, 'xla'),
    ('256 TPU data=16 fsdp=16', {'data': 16, 'fsdp': 16}, 'xla'),
)
BEGIN, END = '<!-- memory_table:begin -->', '<!-- memory_table:end -->'


def pairs():
  rank = {n: i for i, n in enumerate(('vit_s16', 'vit_b16', 'vit_l16', 'vit_h14'))}
  return [(t, s) for t in TEACHERS for s in STUDENTS if rank[t] > rank[s]]


def model(name, attention):
  return {'name': name, 'dtype': 'bfloat16', 'attention': attention, 'pool': 'gap'}


def estimate(teacher, student, mesh, attention, per_device=None):
  devices = mesh.get('data', 1) * mesh.get('fsdp', 1) * mesh.get('tensor', 1)
  return memory.estimate(model(student, attention),
                         teacher=model(teacher, attention) if teacher else None,
                         global_batch=(per_device or PER_DEVICE_BATCH) * devices,
                         image_size=224, mesh=mesh)


def gib(n):
  return f'{n / GiB:.2f}'


def _row(first, label, e):
  marks = ' | '.join('✓' if e.fits(c * GiB) else '✗' for _, c in CAPACITIES)
  acts = gib(e.activations) + (f' + {gib(e.teacher_activations)}' if e.teacher else '')
  teacher = f' {gib(e.teacher_params)} |' if e.teacher else ''
  return (f'| {first} | {label} | {e.local_batch} | {gib(e.params)} | {gib(e.grads)} | '
          f'{gib(e.optimizer)} |{teacher} {gib(e.weight_copies)} | {acts} | '
          f'**{gib(e.total)}** | {marks} |')


def main_table() -> str:
  head = ('| teacher → student | mesh | local batch | student params | grads | AdamW state | '
          'teacher params | weight copies | activations (student + teacher) | total GiB | '
          + ' | '.join(c for c, _ in CAPACITIES) + ' |')
  lines = [head, '|' + '---|' * (head.count('|') - 1)]
  for teacher, student in pairs():
    for label, mesh, attention in SETUPS:
      lines.append(_row(f'{NAMES[teacher]} → {NAMES[student]}', label,
                        estimate(teacher, student, mesh, attention)))
  return '\n'.join(lines)


def teacher_training_table() -> str:
  head = ('| model | mesh | local batch | params | grads | AdamW state | weight copies | '
          'activations | total GiB | ' + ' | '.join(c for c, _ in CAPACITIES) + ' |')
  lines = [head, '|' + '---|' * (head.count('|') - 1)]
  for name in ('vit_l16', 'vit_h14'):
    for label, mesh, attention in SETUPS:
      lines.append(_row(NAMES[name], label, estimate(None, name, mesh, attention)))
  return '\n'.join(lines)


def single_h100_table() -> str:
  lines = ['| teacher → student | total GiB at batch 256 | largest batch in 80 GiB (estimate) | '
           'measured on H100 |', '|---|---|---|---|']
  for teacher, student in pairs():
    e = estimate(teacher, student, {'data': 1}, 'cudnn', per_device=256)
    one = estimate(teacher, student, {'data': 1}, 'cudnn', per_device=1).total
    per_example = estimate(teacher, student, {'data': 1}, 'cudnn', per_device=2).total - one
    largest = int((memory.USABLE_FRACTION * 80 * GiB - (one - per_example)) // per_example)
    lines.append(f'| {NAMES[teacher]} → {NAMES[student]} | {gib(e.total)} | {largest} | '
                 'pending |')
  return '\n'.join(lines)


def tables() -> str:
  return (f'{BEGIN}\nDistillation, {PER_DEVICE_BATCH} examples per device:\n\n{main_table()}\n\n'
          f'Training the teachers themselves, {PER_DEVICE_BATCH} examples per device:\n\n'
          f'{teacher_training_table()}\n\n'
          'Distillation on one H100 (mesh data=1, cuDNN attention):\n\n'
          f'{single_h100_table()}\n{END}')


def main():
  global PER_DEVICE_BATCH
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--write', default=None,
                      help=f'a markdown file whose {BEGIN} ... {END} block is replaced')
  parser.add_argument('--per-device-batch', type=int, default=PER_DEVICE_BATCH,
                      help='examples per device in the first two tables')
  args = parser.parse_args()
  PER_DEVICE_BATCH = args.per_device_batch
  text = tables()
  if not args.write:
    print(text)
    return
  with open(args.write) as f:
    doc = f.read()
  if BEGIN not in doc or END not in doc:
    sys.exit(f'{args.write} has no {BEGIN} ... {END} block to replace.')
  start, stop = doc.index(BEGIN), doc.index(END) + len(END)
  with open(args.write, 'w') as f:
    f.write(doc[:start] + text + doc[stop:])
  print(f'wrote the tables into {args.write}')


if __name__ == '__main__':
  main()
