"""The README and docs stay honest and findable: no machine-local paths or links out of the
repository, no remarks about when or on whose machine work was done, no issue numbers,
every relative link resolves, every command named exists, the README under its size and
every docs page indexed."""

import pathlib
import re

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
README_LIMIT = 15_000  # Bytes.
LINK = re.compile(r'\[[^\]]*\]\(([^)\s]+)\)')
COMMAND = re.compile(r'python -m ddnn_jax\.([a-z_]+)')
# What a user's page must not say: (pattern, why).
FORBIDDEN = [
    (re.compile(r'(?:\.\./)+shared\b'), 'a link outside the repository'),
    (re.compile(r'(?<![\w.])/(?:work|root|home/\w+)/'), 'a machine-local path'),
    (re.compile(r'\b(?:this|that|the same|our) (?:VM|day|session|machine of ours)\b', re.I),
     'a remark about our machines or days'),
    (re.compile(r'\b(?:later|earlier|first|second|third) sessions?\b', re.I),
     'a remark about our working sessions'),
    (re.compile(r'\b(?:yesterday|this morning|tonight)\b', re.I), 'a remark about our days'),
    (re.compile(r'\bissues? #?\d+\b|(?<![\w/])#\d{2,}\b', re.I), 'an issue number'),
]


def pages():
  """Every Markdown page a user reads: the READMEs and docs/ (run records excluded)."""
  found = [REPO / 'README.md', REPO / 'bench' / 'README.md', REPO / 'launch' / 'README.md']
  found += sorted(p for p in (REPO / 'docs').rglob('*.md') if '/runs/' not in p.as_posix())
  return found


def problems(text: str, where: pathlib.Path) -> list[str]:
  """What is wrong with one page: forbidden words, dead links, commands that do not exist."""
  found = []
  for number, line in enumerate(text.splitlines(), 1):
    for pattern, why in FORBIDDEN:
      match = pattern.search(line)
      if match:
        found.append(f'{where.name}:{number}: {why}: {match.group(0)!r}')
  for target in LINK.findall(text):
    if re.match(r'[a-z]+:', target) or target.startswith('#'):
      continue
    path = (where.parent / target.split('#')[0]).resolve()
    if not path.exists():
      found.append(f'{where.name}: link {target!r} does not resolve')
  for name in COMMAND.findall(text):
    module = REPO / 'ddnn_jax' / f'{name}.py'
    if not module.exists() or "if __name__ == '__main__':" not in module.read_text():
      found.append(f'{where.name}: python -m ddnn_jax.{name} is no command')
  return found


@pytest.mark.parametrize('page', pages(), ids=lambda p: str(p.relative_to(REPO)))
def test_page_is_honest_and_its_links_resolve(page):
  assert problems(page.read_text(encoding='utf-8'), page) == []


def test_the_checks_can_fail(tmp_path):
  page = tmp_path / 'page.md'
  planted = ('See [the tables](../shared/PAPER-TABLES.md), run `python -m ddnn_jax.nosuch`,\n'
             'as measured on this VM (issue 36) in /work/main/runs.\n')
  found = problems(planted, page)
  assert any('outside the repository' in p for p in found)
  assert any("link '../shared/PAPER-TABLES.md' does not resolve" in p for p in found)
  assert any('ddnn_jax.nosuch is no command' in p for p in found)
  assert any('our machines or days' in p for p in found)
  assert any('issue number' in p for p in found)
  assert any('machine-local path' in p for p in found)


def test_readme_is_short():
  assert (REPO / 'README.md').stat().st_size <= README_LIMIT


def test_docs_index_links_every_page():
  """docs/README.md links every page of docs/; docs/studies/README.md every study."""
  docs = REPO / 'docs'

  def linked(index: pathlib.Path) -> set[pathlib.Path]:
    text = index.read_text(encoding='utf-8')
    return {(index.parent / t.split('#')[0]).resolve() for t in LINK.findall(text)}

  pages_ = {p.resolve() for p in docs.glob('*.md') if p.name != 'README.md'}
  studies = {p.resolve() for p in docs.glob('studies/*/README.md')}
  assert pages_ and studies
  assert sorted(pages_ - linked(docs / 'README.md')) == []
  assert sorted(studies - linked(docs / 'studies' / 'README.md')) == []
