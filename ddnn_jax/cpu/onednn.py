"""oneDNN convolutions for XLA CPU, as FFI custom calls with their own gradients.

XLA CPU runs a CIFAR ResNet's 3x3 convolutions at 50-100 GFLOP/s on this machine;
oneDNN's brgemm kernels run the forward pass and both gradients at 170-230
(``bench/conv_kernels.py``). This module compiles ``csrc/onednn_conv.cc`` against the
oneDNN wheel (``pip install 'ddnn_jax[onednn]'``: ``onednn-cpu-gomp`` for the library,
``onednn-devel`` for its headers) and jax's FFI headers, once per environment, with the
system C++ compiler, and registers its handlers with XLA.

``conv_general_dilated`` is a drop-in for ``jax.lax.conv_general_dilated`` (flax's
``nn.Conv(conv_general_dilated=...)``): float32 NHWC/HWIO convolutions with equal
strides and symmetric padding go to oneDNN, everything else to XLA. Under a mesh
(``jax.sharding.use_abstract_mesh``, as ``steps.jit_steps`` traces) the call is a
``shard_map`` over the batch axis, so each device convolves its own slice, as XLA's
partitioner does for its own convolutions; on several devices without a mesh XLA
convolves. ``conv_bias_act`` is the inference call: a convolution with a bias, an optional
residual add and ReLU applied by oneDNN as it writes the output (the models fold each
BatchNorm into kernel and bias in inference, so a block needs no elementwise pass).
On by default where the ``onednn`` extra is installed (XLA convolves, silently, where it
is not); ``DDNN_JAX_ONEDNN=0`` turns it off, ``=1`` warns when it cannot run.
Results differ from XLA's only by float32 rounding (tests/test_onednn.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, PartitionSpec as P

from ddnn_jax.core import parallel
from ddnn_jax.cpu import defaults

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'csrc', 'onednn_conv.cc')
HANDLERS = {'forward': 'DdnnConvForward', 'input_grad': 'DdnnConvInputGrad',
            'kernel_grad': 'DdnnConvKernelGrad', 'inference': 'DdnnConvInference'}
# The oneDNN wheel's headers describe its SYCL/TBB build; the CPU library on PyPI
# (onednn-cpu-gomp) is the GNU OpenMP one, so the build sees this configuration instead.
_CONFIG_EDITS = {'#define DNNL_CPU_THREADING_RUNTIME DNNL_RUNTIME_TBB':
                 '#define DNNL_CPU_THREADING_RUNTIME DNNL_RUNTIME_OMP',
                 '#define DNNL_CPU_RUNTIME DNNL_RUNTIME_SYCL':
                 '#define DNNL_CPU_RUNTIME DNNL_RUNTIME_OMP',
                 '#define DNNL_GPU_RUNTIME DNNL_RUNTIME_SYCL':
                 '#define DNNL_GPU_RUNTIME DNNL_RUNTIME_NONE',
                 '#define DNNL_WITH_SYCL': '/* #undef DNNL_WITH_SYCL */'}


class Unavailable(RuntimeError):
  """oneDNN convolutions cannot be built or loaded here (the message says why)."""


def _prefixes() -> list[str]:
  """Where pip puts a wheel's data files (lib/, include/): the environment's prefix."""
  out = []
  for p in (os.environ.get('DDNN_JAX_ONEDNN_ROOT'), sysconfig.get_paths()['data'], sys.prefix,
            sys.base_prefix):
    if p and p not in out:
      out.append(p)
  return out


def _find(relative: str) -> str | None:
  for prefix in _prefixes():
    path = os.path.join(prefix, relative)
    if os.path.exists(path):
      return path
  return None


def _cache_dir() -> str:
  root = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return os.path.join(root, 'ddnn_jax')


def _build(output: str, library: str, header: str, compiler: str) -> None:
  """Compiles the handlers into ``output`` (atomically: concurrent builds are safe)."""
  os.makedirs(os.path.dirname(output), exist_ok=True)
  with tempfile.TemporaryDirectory(dir=os.path.dirname(output)) as tmp:
    include = os.path.dirname(os.path.dirname(os.path.dirname(header)))  # .../include
    config_dir = os.path.join(tmp, 'include', 'oneapi', 'dnnl')
    os.makedirs(config_dir)
    with open(os.path.join(os.path.dirname(header), 'dnnl_config.h')) as f:
      config = f.read()
    for old, new in _CONFIG_EDITS.items():
      config = config.replace(old + '\n', new + '\n')
    with open(os.path.join(config_dir, 'dnnl_config.h'), 'w') as f:
      f.write(config)
    target = os.path.join(tmp, 'lib.so')
    command = [compiler, '-O2', '-std=c++17', '-shared', '-fPIC', '-fopenmp', '-o', target,
               SOURCE, '-I' + os.path.join(tmp, 'include'), '-I' + include,
               '-I' + jax.ffi.include_dir(), library,
               '-Wl,-rpath,' + os.path.dirname(library), '-Wl,--no-undefined']
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
      last = (result.stderr.strip().splitlines() or ['(no output)'])[-1]
      raise Unavailable(f'compiling {os.path.basename(SOURCE)} failed: {last}')
    os.replace(target, output)


def _installed() -> tuple[str | None, str | None]:
  """The oneDNN library and its main header, where the ``onednn`` extra put them."""
  return (_find(os.path.join('lib', 'libdnnl.so.3')),
          _find(os.path.join('include', 'oneapi', 'dnnl', 'dnnl.hpp')))


def _compiler() -> str | None:
  return os.environ.get('CXX') or shutil.which('g++') or shutil.which('c++')


@functools.cache
def library_path() -> str:
  """The compiled handler library, built on first use; raises ``Unavailable``."""
  library, header = _installed()
  if library is None or header is None:
    raise Unavailable("the oneDNN library or headers are not installed "
                      "(pip install 'ddnn_jax[onednn]')")
  compiler = _compiler()
  if compiler is None:
    raise Unavailable('no C++ compiler (g++) to build the oneDNN convolutions')
  key = hashlib.sha256()  # A new source, oneDNN, jax or compiler builds anew.
  for path in (SOURCE, os.path.join(os.path.dirname(header), 'dnnl_version.h')):
    with open(path, 'rb') as f:
      key.update(f.read())
  for part in (os.path.realpath(library), jax.__version__, compiler):
    key.update(part.encode())
  output = os.path.join(_cache_dir(), f'onednn_conv-{key.hexdigest()[:16]}.so')
  if not os.path.exists(output):
    logging.info('Building oneDNN convolutions: %s', output)
    _build(output, library, header, compiler)
  return output


@functools.cache
def _registered() -> bool:
  lib = ctypes.cdll.LoadLibrary(library_path())
  for handler in HANDLERS.values():
    jax.ffi.register_ffi_target(handler, jax.ffi.pycapsule(getattr(lib, handler)),
                                platform='cpu')
  return True


_disabled = False  # Set by ``disabled()``.


def enabled() -> bool:
  """Whether convolutions should go to oneDNN where they can: unless ``DDNN_JAX_ONEDNN=0``
  or ``DDNN_JAX_CPU_DEFAULTS=0`` (every CPU speed setting off)."""
  if _disabled:
    return False
  return os.environ.get('DDNN_JAX_ONEDNN') != '0' and defaults.enabled()


def expected() -> bool:
  """Whether the convolutions should run here, judged without building or loading them
  (so before jax starts its backends): enabled, installed, and a C++ compiler found."""
  return enabled() and None not in _installed() and _compiler() is not None


@contextlib.contextmanager
def disabled():
  """XLA convolves what is traced inside (e.g. to read XLA's FLOP count: a custom call
  has none). Applies to new traces only: jax caches a function's trace."""
  global _disabled
  previous, _disabled = _disabled, True
  try:
    yield
  finally:
    _disabled = previous


@functools.cache
def unavailable_reason() -> str | None:
  """Why the oneDNN convolutions cannot run here, or None when they can."""
  try:
    _registered()
  except (Unavailable, OSError) as e:
    return str(e)
  return None


def active() -> bool:
  """Whether a convolution traced now for the default backend goes to oneDNN: enabled,
  on CPU, and built and loaded (a failed build is logged once; XLA then convolves)."""
  if not enabled() or jax.default_backend() != 'cpu' or not hasattr(jax, 'shard_map'):
    return False
  reason = unavailable_reason()
  if reason is not None:
    _log_unavailable_once(reason)
  return reason is None


@functools.cache
def _log_unavailable_once(reason: str) -> None:
  # Without the extra that is the plain default; asked for, or installed but failing, it
  # is worth a warning.
  quiet = None in _installed() and os.environ.get('DDNN_JAX_ONEDNN') != '1'
  (logging.info if quiet else logging.warning)(
      'oneDNN convolutions unavailable, XLA convolves: %s', reason)


def _out_shape(x_shape, kernel_shape, stride: int, pad: int) -> tuple[int, int, int, int]:
  """NHWC output shape of an NHWC x HWIO convolution with symmetric padding."""
  n, h, w, _ = x_shape
  kh, kw, _, o = kernel_shape
  return (n, (h + 2 * pad - kh) // stride + 1, (w + 2 * pad - kw) // stride + 1, o)


def _threads() -> int:
  """OpenMP threads per call: this process's cores over its CPU devices (each device
  runs its calls on its own thread; more threads than that were slower: docs/performance-notes.md)."""
  return max(1, defaults.available_cores() // jax.local_device_count())


def _call(handler: str, shape: tuple[int, ...], a, b, stride: int, pad: int):
  return jax.ffi.ffi_call(HANDLERS[handler], jax.ShapeDtypeStruct(shape, jnp.float32),
                          vmap_method='sequential')(
                              a, b, stride=np.int64(stride), pad=np.int64(pad),
                              threads=np.int64(_threads()))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv(x, kernel, stride: int, pad: int):
  shape = _out_shape(x.shape, kernel.shape, stride, pad)
  return _call('forward', shape, x, kernel, stride, pad)


def _conv_fwd(x, kernel, stride, pad):
  return _conv(x, kernel, stride, pad), (x, kernel)


def _conv_bwd(stride, pad, residuals, dy):
  x, kernel = residuals
  dx = _call('input_grad', x.shape, dy, kernel, stride, pad)
  dkernel = _call('kernel_grad', kernel.shape, x, dy, stride, pad)
  return dx, dkernel


_conv.defvjp(_conv_fwd, _conv_bwd)


def _per_device(fn, args, batched: Sequence[bool]):
  """``fn(*args)``; when a mesh is set, each device runs it on its slice of the batch of
  the ``batched`` arguments (and of the output), the others whole. Gradients of the
  unbatched ones (a kernel) are then summed over the axis, by shard_map's transpose."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return fn(*args)
  batch = P(parallel.DATA_AXIS)
  return jax.shard_map(fn, mesh=mesh, in_specs=tuple(batch if b else P() for b in batched),
                       out_specs=batch, axis_names={parallel.DATA_AXIS},
                       check_vma=False)(*args)


def _sharded(x, kernel, stride: int, pad: int):
  """``_conv``, per device under a mesh."""
  return _per_device(functools.partial(_conv, stride=stride, pad=pad), (x, kernel),
                     (True, False))


def _inference_call(x, kernel, bias, residual, stride: int, pad: int, relu: bool):
  shape = _out_shape(x.shape, kernel.shape, stride, pad)
  return jax.ffi.ffi_call(HANDLERS['inference'], jax.ShapeDtypeStruct(shape, jnp.float32),
                          vmap_method='sequential')(
                              x, kernel, bias, residual, stride=np.int64(stride),
                              pad=np.int64(pad), threads=np.int64(_threads()),
                              relu=np.int64(relu))


def _unfused(x, kernel, bias, residual, stride: int, pad: int, relu: bool):
  """What the inference call computes, from the training convolution (its gradient)."""
  y = _conv(x, kernel, stride, pad) + bias
  if residual.size:
    y = y + residual
  return jnp.maximum(y, 0.0) if relu else y


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _fused(x, kernel, bias, residual, stride: int, pad: int, relu: bool):
  return _inference_call(x, kernel, bias, residual, stride, pad, relu)


def _fused_fwd(x, kernel, bias, residual, stride, pad, relu):
  return _fused(x, kernel, bias, residual, stride, pad, relu), (x, kernel, bias, residual)


def _fused_bwd(stride, pad, relu, residuals, dy):
  # Inference is rarely differentiated; when it is, through the unfused ops.
  _, vjp = jax.vjp(lambda *a: _unfused(*a, stride, pad, relu), *residuals)
  return vjp(dy)


_fused.defvjp(_fused_fwd, _fused_bwd)


def fusable(x, kernel, strides: Sequence[int], padding, residual=None) -> bool:
  """Whether ``conv_bias_act`` runs these as one oneDNN call (else the caller runs
  its own ops): as ``conv_general_dilated`` would hand the convolution to oneDNN, and a
  float32 residual of the output's shape."""
  if not (_placeable(x) and active() and supported(
      x, kernel, strides, padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC'))):
    return False
  if residual is None:
    return True
  out = _out_shape(x.shape, kernel.shape, int(strides[0]), int(padding[0][0]))
  return residual.dtype == jnp.float32 and residual.shape == out


def conv_bias_act(x, kernel, bias, strides: Sequence[int], padding, *, relu: bool,
                  residual=None):
  """``relu(conv(x, kernel) + bias + residual)`` (ReLU and residual optional) as one
  oneDNN inference call: bias, residual add and ReLU are post-ops applied as the output is
  written. A BatchNorm in inference folds into ``kernel`` and ``bias``. Only where
  ``fusable``; differentiable (through the unfused ops)."""
  stride, pad = int(strides[0]), int(padding[0][0])
  extra = jnp.zeros((0,), jnp.float32) if residual is None else residual
  return _per_device(lambda x, k, b, r: _fused(x, k, b, r, stride, pad, bool(relu)),
                     (x, kernel, bias, extra), (True, False, False, residual is not None))


def _placeable(x) -> bool:
  """Whether each device can run the call on its own data: one device, or a mesh set
  whose 'data' axis divides the batch. XLA's partitioner does not know the custom call,
  so under a sharded jit without a mesh it would gather the whole batch on every device
  (correct, but slower than XLA's own convolution)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return jax.device_count() == 1
  # An Explicit axis (jax.make_mesh's default) types the batch's sharding: shard_map would
  # need it resharded first. ddnn_jax's meshes are Auto (parallel.create_mesh).
  return (set(mesh.axis_names) == {parallel.DATA_AXIS} and isinstance(x.shape[0], int)
          and x.shape[0] % mesh.shape[parallel.DATA_AXIS] == 0
          and all(t == AxisType.Auto for t in mesh.axis_types))


def supported(x, kernel, window_strides: Sequence[int], padding, lhs_dilation=None,
              rhs_dilation=None, dimension_numbers=None, feature_group_count: int = 1) -> bool:
  """Whether this ``lax.conv_general_dilated`` call is one the oneDNN handlers compute:
  float32 NHWC x HWIO, concrete shapes (``jax.export``'s symbolic batch stays with XLA),
  no groups or dilation, equal strides, the same padding on every side."""
  if not all(isinstance(d, int) for d in (*x.shape, *kernel.shape)):
    return False
  if (x.dtype != jnp.float32 or kernel.dtype != jnp.float32 or x.ndim != 4
      or feature_group_count != 1):
    return False
  numbers = jax.lax.conv_dimension_numbers(x.shape, kernel.shape, dimension_numbers)
  if tuple(numbers) != tuple(jax.lax.conv_dimension_numbers(x.shape, kernel.shape,
                                                            ('NHWC', 'HWIO', 'NHWC'))):
    return False
  if any(d not in (None, 1) for d in tuple(lhs_dilation or ()) + tuple(rhs_dilation or ())):
    return False
  if len(set(window_strides)) != 1 or isinstance(padding, str):
    return False
  pads = {p for pair in padding for p in pair}
  return len(pads) == 1


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         batch_group_count=1, precision=None, preferred_element_type=None):
  """``jax.lax.conv_general_dilated`` with oneDNN where ``supported`` (same arguments)."""
  if (batch_group_count == 1 and preferred_element_type is None and _placeable(lhs)
      and active() and supported(lhs, rhs, window_strides, padding, lhs_dilation,
                                 rhs_dilation, dimension_numbers, feature_group_count)):
    return _sharded(lhs, rhs, int(window_strides[0]), int(padding[0][0]))
  return jax.lax.conv_general_dilated(
      lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
      dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
      batch_group_count=batch_group_count, precision=precision,
      preferred_element_type=preferred_element_type)
