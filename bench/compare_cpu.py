"""ddnn_jax's training step against PyTorch (eager and torch.compile) and XLA CPU variants,
measured in one session in alternating rounds (one process per measurement).

  python bench/compare_cpu.py --net resnet56 --rounds 3 \
      --variants torch,baseline,ynn,ynn+dev2,ynn+dev2+tcmalloc
  python bench/compare_cpu.py --net resnet20 --mode infer --batch 256   # inference

Each round runs every variant once, in turn, so slow drifts of the machine hit all of
them. A variant is 'torch' or 'torch-eager' (the PyTorch reference script given by
--torch_reference, run by --torch_python in a venv of its own), 'torch-compile' (the same under torch.compile) or '+'-joined parts for
ddnn_jax's step:
  baseline   no CPU defaults of ddnn_jax (DDNN_JAX_CPU_DEFAULTS=0)
  default    ddnn_jax's CPU defaults, as shipped (oneDNN's convolutions where installed)
  ynn        --xla_cpu_experimental_ynn_fusion_type=+eltwise,+reduce
  devN       the batch sharded over N CPU devices
  tcmalloc   LD_PRELOAD=libtcmalloc_minimal.so.4
  notrunk    each depth its own forward pass (no shared trunk), as before issue 9
  bf16       bfloat16 compute, float32 parameters (model.dtype)
  onednn     oneDNN's convolutions, and a warning if they cannot run (DDNN_JAX_ONEDNN=1)
  xlaconv    XLA's own convolutions (DDNN_JAX_ONEDNN=0)
  autodiffbn flax's BatchNorm and autodiff, not ddnn_jax.cpu.batchnorm's (DDNN_JAX_FUSED_BN=0)
  xla=FLAGS  other XLA flags
  env=N=V    the environment variable N set to V (e.g. env=OMP_WAIT_POLICY=passive)
Prints per variant the median img/s, its ratio to each PyTorch reference measured, and
the fraction of GEMM peak (the variant's FLOPs per step / its step time / the matmul's
FLOP/s; ddnn_jax's FLOPs from XLA's cost analysis, PyTorch's from its FlopCounter);
appends every measurement to --json.
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
from ddnn_jax.cpu import defaults  # noqa: E402  (plain Python: no jax imported here)
NETS = {  # full net, sub-nets: the sets the issue measured.
    'resnet20': ('3,3,3', ['1,1,1', '2,2,2']),
    'resnet56': ('9,9,9', ['3,3,3', '5,5,5', '7,7,7']),
}


TCMALLOC = next((p for p in defaults.TCMALLOC_PATHS if os.path.exists(p)), None)


GEMM = """
import time, jax, jax.numpy as jnp
x = jax.random.normal(jax.random.key(0), (4096, 4096))
f = jax.jit(lambda a: a @ a)
f(x).block_until_ready()
start = time.perf_counter()
for _ in range(5):
  y = f(x)
y.block_until_ready()
print(2 * 4096 ** 3 * 5 / (time.perf_counter() - start))
"""


def gemm_flops_per_s() -> float:
  """FLOP/s of a float32 4096x4096 matmul under XLA, with ddnn_jax's CPU flags."""
  env = {**os.environ, 'XLA_FLAGS': defaults.YNN_FUSION}
  out = subprocess.run([sys.executable, '-c', GEMM], check=True, capture_output=True, text=True,
                       timeout=600, env=env)
  return float(out.stdout.split()[-1])


def measure(variant, args, out):
  """(img/s, FLOPs per step, the raw JSON line) of one variant."""
  full, subs = NETS[args.net]
  env = dict(os.environ)
  if variant in ('torch', 'torch-eager', 'torch-compile'):
    impl = 'compile' if variant == 'torch-compile' else 'eager'
    cmd = [args.torch_python, args.torch_reference, '--full', full, '--subs', ';'.join(subs),
           '--mode', {'ekd': 'ekd', 'plain': 'plain', 'infer': 'infer'}[args.mode],
           '--impl', impl, '--batch', str(args.batch), '--steps', str(args.steps),
           '--json', out]
  else:
    flags, devices, dtype, parts = [], 0, 'float32', variant.split('+')
    # Only the parts named: ddnn_jax's own CPU defaults only in 'default'.
    env['DDNN_JAX_CPU_DEFAULTS'] = '1' if 'default' in parts else '0'
    for part in parts:
      if part == 'baseline':
        pass
      elif part == 'ynn':
        flags.append(defaults.YNN_FUSION)
      elif part.startswith('dev'):
        devices = int(part[3:])
      elif part == 'tcmalloc':
        if TCMALLOC is None:
          raise SystemExit('tcmalloc: apt-get install libtcmalloc-minimal4')
        env['LD_PRELOAD'] = TCMALLOC
      elif part == 'bf16':
        dtype = 'bfloat16'
      elif part == 'onednn':
        env['DDNN_JAX_ONEDNN'] = '1'
      elif part == 'xlaconv':
        env['DDNN_JAX_ONEDNN'] = '0'
      elif part == 'autodiffbn':
        env['DDNN_JAX_FUSED_BN'] = '0'
      elif part == 'notrunk':
        pass  # Read off the same run's 'ekd, no shared trunk' row.
      elif part.startswith('xla='):
        flags.append(part[4:])
      elif part.startswith('env='):  # env=NAME=VALUE: one environment variable.
        name, _, value = part[4:].partition('=')
        env[name] = value
      elif part != 'default':
        raise ValueError(f'unknown variant part {part!r}')
    modes = {'ekd': 'ekd', 'plain': 'individual', 'infer': 'infer'}[args.mode]
    cmd = [sys.executable, os.path.join(HERE, 'train_step.py'), '--arch', args.net,
           '--subnets', ','.join(s.replace(',', '-') for s in subs), '--batch', str(args.batch),
           '--modes', modes, *([] if 'notrunk' in variant else ['--no_per_depth']),
           '--rounds', '1', '--steps', str(args.steps), f'--xla_flags={" ".join(flags)}',
           '--dtype', dtype,
           '--json', out] + (['--devices', str(devices)] if devices else [])
  subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=3600, env=env)
  with open(out) as f:
    lines = [json.loads(line) for line in f]
  os.unlink(out)
  if variant.startswith('torch'):
    line = lines[-1]
    return line['img_per_s'], line.get('flops_per_step_flopcounter'), line
  full_name = f'individual {full.replace(",", "-")}'
  step = {'ekd': 'ekd', 'plain': full_name, 'infer': f'infer {full.replace(",", "-")}'}[args.mode]
  if 'notrunk' in variant:
    step = 'ekd, no shared trunk'
  (line,) = [x for x in lines if x['step'] == step]
  return line['img_per_s'], line['flops'], line


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--net', default='resnet56', choices=sorted(NETS))
  parser.add_argument('--mode', default='ekd', choices=['ekd', 'plain', 'infer'],
                      help='the EKD step of the depth set, the full net alone (CE), or the '
                      "full net's inference pass (use --batch 256)")
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--steps', type=int, default=10)
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--variants', default='torch,torch-compile,default')
  parser.add_argument('--torch_python', default='/tmp/torchref/bin/python')
  parser.add_argument('--torch_reference', default=os.environ.get('DDNN_JAX_TORCH_REFERENCE'),
                      help='the PyTorch reference script (torch_reference.py: the same nets '
                      'and EKD loss in PyTorch); needed by the torch variants')
  parser.add_argument('--json', help='append every measurement here')
  args = parser.parse_args()
  if any(v.startswith('torch') for v in args.variants.split(',')) and not args.torch_reference:
    parser.error('the torch variants need --torch_reference PATH (or $DDNN_JAX_TORCH_REFERENCE)')
  variants = [v for v in args.variants.split(',') if v]
  results = {v: [] for v in variants}
  step_flops = {}
  gemm = []
  for r in range(args.rounds):
    gemm.append(gemm_flops_per_s())
    print(f'round {r}: XLA float32 matmul 4096^2: {gemm[-1] / 1e9:.0f} GFLOP/s', flush=True)
    for variant in variants:
      with tempfile.NamedTemporaryFile(suffix='.jsonl', delete=False) as tmp:
        out = tmp.name
      img_s, flops, line = measure(variant, args, out)
      results[variant].append(img_s)
      step_flops[variant] = flops
      print(f'round {r}: {variant}: {img_s:.1f} img/s', flush=True)
      if args.json:
        with open(args.json, 'a') as f:
          f.write(json.dumps({'net': args.net, 'mode': args.mode, 'variant': variant,
                              'round': r, 'img_per_s': img_s, 'gemm_flops_per_s': gemm[-1],
                              'detail': line}) + '\n')
  peak = statistics.median(gemm)
  refs = {name: statistics.median(results[name]) for name in ('torch', 'torch-eager',
                                                              'torch-compile') if name in results}
  head = ['variant', 'median img/s', 'rounds', *(f'/ {name}' for name in refs),
          'fraction of GEMM peak']
  print(f'{args.net} {args.mode}, batch {args.batch}; XLA matmul {peak / 1e9:.0f} GFLOP/s '
        f'(median of {args.rounds} rounds)')
  print('| ' + ' | '.join(head) + ' |\n|' + '---|' * len(head))
  for variant, values in results.items():
    median = statistics.median(values)
    flops = step_flops.get(variant)
    fraction = f'{flops * median / args.batch / peak:.2f}' if flops else '-'
    cells = [variant, f'{median:.1f}', ', '.join(f'{v:.0f}' for v in values),
             *(f'{median / ref:.2f}' for ref in refs.values()), fraction]
    print('| ' + ' | '.join(cells) + ' |')


if __name__ == '__main__':
  main()
