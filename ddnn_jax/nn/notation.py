"""How depths are written and read: one notation in tables, files, flags and messages.

A depth is a tuple with the number of blocks to run in each stage of a net, e.g.
(3, 4, 6, 3), written '3-4-6-3'; at a width multiplier below 1 it is a ``SubNet``,
written '3-4-6-3@0.5'. This module knows no net: ``architectures`` checks a depth
against one.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any, Union

Depth = tuple[int, ...]
DepthSpec = Union[str, Sequence[int]]


class SubNet(tuple):
  """A depth (block counts per stage) at a width multiplier: written ``2-2-2@0.5``.

  Width 1.0 is the plain depth: ``SubNet((2, 2, 2), 1.0) == (2, 2, 2)`` with the same hash,
  so every depth of a net without widths is the tuple it always was (``subnet`` returns
  one). A narrower one keeps its width through every operation that keeps its type.
  """
  width: float

  def __new__(cls, blocks: Sequence[int], width: float = 1.0):
    obj = super().__new__(cls, tuple(blocks))
    obj.width = float(width)
    return obj

  def __getnewargs__(self):
    return tuple(self), self.width

  def __eq__(self, other):
    if not isinstance(other, tuple):
      return NotImplemented
    return tuple.__eq__(self, other) and self.width == width_of(other)

  def __ne__(self, other):
    result = self.__eq__(other)
    return result if result is NotImplemented else not result

  def __hash__(self):
    return tuple.__hash__(self) if self.width == 1.0 else hash((tuple(self), self.width))

  def __repr__(self):
    return f'SubNet({tuple(self)!r}, {self.width:g})'


def subnet(blocks: Sequence[int], width: float = 1.0) -> Depth:
  """A depth at ``width``: the plain tuple at width 1, else a SubNet."""
  blocks = tuple(int(n) for n in blocks)
  return blocks if float(width) == 1.0 else SubNet(blocks, width)


def width_of(depth: Any) -> float:
  """The width multiplier of a depth (1.0 for a plain tuple)."""
  return getattr(depth, 'width', 1.0)


def blocks_of(depth: Any) -> tuple[int, ...]:
  return tuple(int(n) for n in depth)


def format_depth(depth: Any) -> str:
  """The one way a depth is written, in tables, files, flags and messages: (3, 4, 6, 3)
  -> '3-4-6-3' (blocks per stage, no spaces or brackets: it pastes into a shell and a
  file name), at a width below 1 '3-4-6-3@0.5'. A name stays as it is. ``parse_depth``
  reads it back, and other spellings."""
  if isinstance(depth, str):
    try:
      depth = parse_depth(depth)
    except ValueError:
      return depth
    if isinstance(depth, str):
      return depth
  try:
    text = '-'.join(str(int(d)) for d in depth)
  except (TypeError, ValueError):
    return repr(depth)
  width = width_of(depth)
  return text if width == 1.0 else f'{text}@{width:g}'


_DEPTH_EXAMPLE = 'block counts per stage such as 2-2-2 (also [2,2,2] or 2,2,2) or a net name'


def parse_depth(text: str) -> DepthSpec:
  """One depth as people write it: '2-2-2', '[2,2,2]', '(2, 2, 2)', '2,2,2', '2 2 2' ->
  (2, 2, 2); a net name ('resnet32') stays a name. A width follows an '@': '2-2-2@0.5',
  'resnet32@0.5' (a name and width stay text). Only the syntax is checked here;
  ``resolve_depth`` checks a depth against a net."""
  item = str(text).strip()
  if '@' in item:
    blocks, _, width_text = item.rpartition('@')
    try:
      width = float(width_text)
    except ValueError:
      raise ValueError(f'depth {item!r}: the width after @ must be a number, e.g. 2-2-2@0.5'
                       ) from None
    parsed = parse_depth(blocks)
    if isinstance(parsed, str):
      return f'{parsed}@{width:g}' if width != 1.0 else parsed
    return subnet(parsed, width)
  inner = item.strip('[]()').strip()
  if inner and (inner[0].isalpha()):
    if item != inner or not inner.replace('_', '').isalnum():
      raise ValueError(f'depth {item!r} is not a depth: give {_DEPTH_EXAMPLE}')
    return inner
  parts = [p for p in inner.replace(',', ' ').replace('-', ' ').split()]
  if not parts or not all(p.isdigit() for p in parts):
    raise ValueError(f'depth {item!r} is not a depth: give {_DEPTH_EXAMPLE}')
  return tuple(int(p) for p in parts)


def parse_depths(text: str) -> list[DepthSpec]:
  """A list of depths, e.g. a --depths flag: 'resnet44,5-5-5' -> ['resnet44', (5, 5, 5)].

  Depths are separated by commas or spaces; a depth is written as ``parse_depth`` reads
  it. Commas inside brackets belong to the depth ('[2,2,2],[1,1,1]'), and a list of bare
  numbers is one depth ('2,2,2': a single number is never a depth of these nets).
  """
  text = str(text).strip()
  items, level, current = [], 0, ''
  for char in text:  # Split at commas and spaces outside brackets.
    level += 1 if char in '[(' else -1 if char in '])' else 0
    if level < 0:
      raise ValueError(f'depths {text!r}: unbalanced brackets')
    if char in ', ' and level == 0:
      items.append(current)
      current = ''
    else:
      current += char
  if level:
    raise ValueError(f'depths {text!r}: unbalanced brackets')
  items = [i for i in [*items, current] if i.strip()]
  if items and all(i.strip().isdigit() for i in items):
    return [parse_depth(','.join(items))]
  for item in items:
    if item.strip().isdigit():
      raise ValueError(f'depths {text!r}: {item!r} alone is not a depth; write a depth as '
                       f'{_DEPTH_EXAMPLE}, and separate depths by commas')
  return [parse_depth(i) for i in items]


def subnet_specs(value: Any) -> list[DepthSpec]:
  """``model.subnets`` as people write it, in a config file or a flag, as a list of depths:
  '2-2-2', '2-2-2@0.5', '[2,2,2]', '2-2-2,1-1-1' (text, ``parse_depths``); (2, 2, 2) (one
  depth); ((2, 2, 2), '1-1-1', 'resnet32') (a tuple of depths, each a tuple or text)."""
  if isinstance(value, bytes):
    value = value.decode()
  if isinstance(value, str):
    return parse_depths(value)
  if not isinstance(value, Sequence):
    raise ValueError(f'{value!r} is not a depth or a tuple of depths: give {_DEPTH_EXAMPLE}')
  items = list(value)
  if items and all(isinstance(n, numbers.Integral) and not isinstance(n, bool) for n in items):
    return [tuple(int(n) for n in items)]  # One depth: (2, 2, 2).
  specs = []
  for item in items:
    if isinstance(item, str):
      specs.append(parse_depth(item))
    elif isinstance(item, Sequence) and not isinstance(item, bytes):
      specs.append(item if isinstance(item, SubNet) else tuple(item))
    else:
      raise ValueError(f'{item!r} is not a depth: give {_DEPTH_EXAMPLE}')
  return specs


def quoted(depth: Any) -> str:  # In error messages: names quoted.
  return repr(depth) if isinstance(depth, str) else format_depth(depth)


def check_depth(depth: Any, full: Depth, arch: str = 'the full net') -> Depth:
  """Validates a depth configuration against the full net's; returns it as a tuple."""
  if isinstance(depth, (str, bytes)) or not isinstance(depth, Sequence):
    raise ValueError(f'depth {quoted(depth)} must be a list of block counts per stage')
  if len(depth) != len(full):
    raise ValueError(
        f'depth {quoted(depth)} has {len(depth)} stages but {arch} has {len(full)}')
  for stage, (n, n_full) in enumerate(zip(depth, full)):
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
      raise ValueError(f'depth {quoted(depth)}: stage {stage} count {n!r} is not an integer')
    if n < 1:
      raise ValueError(f'depth {quoted(depth)}: stage {stage} needs at least 1 block, got {n}')
    if n > n_full:
      raise ValueError(
          f'depth {quoted(depth)}: stage {stage} has {n} blocks but {arch} '
          f'{quoted(full)} has only {n_full}')
  width = width_of(depth)
  if not 0 < width <= 1:
    raise ValueError(f'depth {quoted(depth)}: width {width:g} is not in (0, 1]')
  return subnet(depth, width)


def depth_name(depth: Depth) -> str:
  """Stable, readable key of a depth (BN statistics, metrics, workdirs): '5-5-5' or
  '5-5-5@0.5', the notation of ``format_depth``."""
  return format_depth(depth)
