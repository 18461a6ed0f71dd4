"""ddnn_jax's training step against the PyTorch eager reference, and XLA CPU variants,
measured in one session in alternating rounds (one process per measurement).

  python bench/compare_cpu.py --net resnet56 --rounds 3 \
      --variants torch,baseline,ynn,ynn+dev2,ynn+dev2+tcmalloc

Each round runs every variant once, in turn, so slow drifts of the machine hit all of
them. A variant is 'torch' (the reference, ../shared/bench/torch_reference.py, in its
own venv) or '+'-joined parts for ddnn_jax's step:
  baseline   no CPU defaults of ddnn_jax (DDNN_JAX_CPU_DEFAULTS=0)
  default    ddnn_jax's CPU defaults, as shipped
  ynn        --xla_cpu_experimental_ynn_fusion_type=+eltwise,+reduce
  devN       the batch sharded over N CPU devices
  tcmalloc   LD_PRELOAD=libtcmalloc_minimal.so.4
  notrunk    each depth its own forward pass (no shared trunk), as before issue 9
  xla=FLAGS  other XLA flags
Prints the median img/s of each and its ratio to PyTorch; appends every measurement to
--json.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from ddnn_jax import cpu_defaults  # noqa: E402  (plain Python: no jax imported here)
NETS = {  # full net, sub-nets: the sets the issue measured.
    'resnet20': ('3,3,3', ['1,1,1', '2,2,2']),
    'resnet56': ('9,9,9', ['3,3,3', '5,5,5', '7,7,7']),
}


TCMALLOC = next((p for p in cpu_defaults.TCMALLOC_PATHS if os.path.exists(p)), None)


def measure(variant, args, out):
  full, subs = NETS[args.net]
  env = dict(os.environ)
  if variant == 'torch':
    cmd = [args.torch_python, args.torch_reference, '--full', full, '--subs', ';'.join(subs),
           '--mode', args.mode if args.mode == 'ekd' else 'plain', '--impl', 'eager',
           '--batch', str(args.batch), '--steps', str(args.steps), '--json', out]
  else:
    flags, devices, parts = [], 0, variant.split('+')
    # Only the parts named: ddnn_jax's own CPU defaults only in 'default'.
    env['DDNN_JAX_CPU_DEFAULTS'] = '1' if 'default' in parts else '0'
    for part in parts:
      if part == 'baseline':
        pass
      elif part == 'ynn':
        flags.append(cpu_defaults.YNN_FUSION)
      elif part.startswith('dev'):
        devices = int(part[3:])
      elif part == 'tcmalloc':
        if TCMALLOC is None:
          raise SystemExit('tcmalloc: apt-get install libtcmalloc-minimal4')
        env['LD_PRELOAD'] = TCMALLOC
      elif part == 'notrunk':
        pass  # Read off the same run's 'ekd, no shared trunk' row.
      elif part.startswith('xla='):
        flags.append(part[4:])
      elif part != 'default':
        raise ValueError(f'unknown variant part {part!r}')
    cmd = [sys.executable, os.path.join(HERE, 'train_step.py'), '--arch', args.net,
           '--subnets', ','.join(s.replace(',', '-') for s in subs), '--batch', str(args.batch),
           '--modes', 'ekd' if args.mode == 'ekd' else 'individual',
           *([] if 'notrunk' in variant else ['--no_per_depth']),
           '--rounds', '1', '--steps', str(args.steps), f'--xla_flags={" ".join(flags)}',
           '--json', out] + (['--devices', str(devices)] if devices else [])
  subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=3600, env=env)
  with open(out) as f:
    lines = [json.loads(line) for line in f]
  os.unlink(out)
  if variant == 'torch':
    return lines[-1]['img_per_s'], lines[-1]
  full_name = f'individual [{full}]'
  step = 'ekd' if args.mode == 'ekd' else full_name
  if 'notrunk' in variant:
    step = 'ekd, no shared trunk'
  (line,) = [x for x in lines if x['step'] == step]
  return line['img_per_s'], line


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--net', default='resnet56', choices=sorted(NETS))
  parser.add_argument('--mode', default='ekd', choices=['ekd', 'plain'],
                      help='the EKD step of the depth set, or the full net alone (CE)')
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--steps', type=int, default=10)
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--variants', default='torch,default')
  parser.add_argument('--torch_python', default='/tmp/torchref/bin/python')
  parser.add_argument('--torch_reference',
                      default=os.path.join(HERE, '..', '..', 'shared', 'bench',
                                           'torch_reference.py'))
  parser.add_argument('--json', help='append every measurement here')
  args = parser.parse_args()
  variants = [v for v in args.variants.split(',') if v]
  results = {v: [] for v in variants}
  for r in range(args.rounds):
    for variant in variants:
      with tempfile.NamedTemporaryFile(suffix='.jsonl', delete=False) as tmp:
        out = tmp.name
      img_s, line = measure(variant, args, out)
      results[variant].append(img_s)
      print(f'round {r}: {variant}: {img_s:.1f} img/s', flush=True)
      if args.json:
        with open(args.json, 'a') as f:
          f.write(json.dumps({'net': args.net, 'mode': args.mode, 'variant': variant,
                              'round': r, 'img_per_s': img_s, 'detail': line}) + '\n')
  torch = statistics.median(results['torch']) if 'torch' in results else None
  print(f'| {args.net} {args.mode}, batch {args.batch} | median img/s | rounds | / PyTorch eager |')
  print('|---|---|---|---|')
  for variant, values in results.items():
    median = statistics.median(values)
    ratio = f'{median / torch:.2f}' if torch else '-'
    print(f'| {variant} | {median:.1f} | {", ".join(f"{v:.0f}" for v in values)} | {ratio} |')


if __name__ == '__main__':
  main()
