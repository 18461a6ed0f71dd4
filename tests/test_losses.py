"""Every objective term against a hand-written NumPy computation."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddnn_jax.training import losses

D, B, C = 4, 5, 6  # full net + 3 sub-nets, batch, classes
STAGE_SHAPES = [(4, 4, 3), (2, 2, 5)]


# ---- NumPy reference -------------------------------------------------------

def np_softmax(z, t=1.0):
  e = np.exp(z / t - np.max(z / t, -1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def np_ce(z, y):
  return -np.mean(np.log(np_softmax(z))[np.arange(len(y)), y])


def np_kl(p_teacher, z_student, t=1.0):
  q = np_softmax(z_student, t)
  return np.mean(np.sum(p_teacher * (np.log(p_teacher) - np.log(q)), -1)) * t * t


def np_attention(f):
  a = f.sum(-1).reshape(f.shape[0], -1)
  return a / (np.sqrt((a * a).sum(-1, keepdims=True)) + 1e-6)


def np_ekd(z, att, y, w, alpha, t, ensemble=True):
  """Eq. 7, term by term; w and alpha: one value, or one per sub-net (the ensemble
  terms teaching the full net then use their mean)."""
  k = len(z) - 1
  w_k = np.broadcast_to(np.asarray(w, np.float64), (k,))
  alpha_k = np.broadcast_to(np.asarray(alpha, np.float64), (k,))
  p = [np_softmax(zi, t) for zi in z]
  p_et = np.mean(p, 0)
  loss = np_ce(z[0], y) + np.mean([np_ce(z[i], y) for i in range(1, k + 1)])
  kl = sum(w_k[i - 1] * np_kl(p[0], z[i], t) for i in range(1, k + 1))
  if ensemble:
    kl += np.mean(w_k) * np_kl(p_et, z[0], t)
  mse = 0.0
  for a in att:  # stages
    mse += sum(alpha_k[i - 1] * np.mean((a[0] - a[i])**2) for i in range(1, k + 1))
    if ensemble:
      mse += np.mean(alpha_k) * np.mean((np.mean(a, 0) - a[0])**2)
  return loss + kl / (k + 1) + mse / (k + 1)


@pytest.fixture
def inputs():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(D, B, C)).astype(np.float32) * 2
  features = [np.abs(rng.normal(size=(D, B, *s))).astype(np.float32) for s in STAGE_SHAPES]
  labels = rng.integers(0, C, B).astype(np.int32)
  return logits, features, labels


def _attention(features):
  return tuple(jax.vmap(losses.attention_map)(jnp.asarray(f)) for f in features)


# ---- single terms -----------------------------------------------------------

def test_kl_known_value():
  # KL([1/2, 1/2] || [1/4, 3/4]) = 1/2 ln 2 + 1/2 ln(2/3)
  teacher = jnp.array([[0.5, 0.5]])
  student_logits = jnp.log(jnp.array([[0.25, 0.75]]))
  expected = 0.5 * np.log(2) + 0.5 * np.log(2 / 3)
  np.testing.assert_allclose(losses.kl_divergence(teacher, student_logits), expected, rtol=1e-6)
  # Zero teacher probabilities contribute nothing (0 log 0 = 0), not NaN.
  assert float(losses.kl_divergence(jnp.array([[1.0, 0.0]]), jnp.zeros((1, 2)))) == pytest.approx(
      np.log(2), rel=1e-6)


def test_terms_match_numpy(inputs):
  logits, features, labels = inputs
  np.testing.assert_allclose(losses.cross_entropy(logits[1], labels), np_ce(logits[1], labels),
                             rtol=1e-5)
  p = np_softmax(logits[0], 2.0)
  np.testing.assert_allclose(losses.kl_divergence(p, logits[2], 2.0), np_kl(p, logits[2], 2.0),
                             rtol=1e-5)
  a = losses.attention_map(jnp.asarray(features[0][1]))
  chex.assert_shape(a, (B, 16))
  np.testing.assert_allclose(a, np_attention(features[0][1]), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(jnp.linalg.norm(a, axis=-1), np.ones(B), rtol=1e-5)


@pytest.mark.parametrize('w,alpha,t', [(1.0, 1.0, 1.0), (0.5, 100.0, 3.0), (2.0, 0.0, 1.0)])
def test_ekd_objective_matches_numpy(inputs, w, alpha, t):
  logits, features, labels = inputs
  att_np = [np.stack([np_attention(f[d]) for d in range(D)]) for f in features]
  loss, parts = losses.ddnn_objective('ekd', jnp.asarray(logits), _attention(features),
                                      jnp.asarray(labels), w=w, alpha=alpha, temperature=t)
  np.testing.assert_allclose(loss, np_ekd(logits, att_np if alpha else [], labels, w, alpha, t),
                             rtol=1e-5)
  chex.assert_shape([parts['ce']], (D,))
  chex.assert_shape([parts['kl'], parts['attention']], (D - 1,))


def _np_maps(features, stages=None):
  stages = range(len(features)) if stages is None else stages
  return [np.stack([np_attention(features[s][d]) for d in range(D)]) for s in stages]


def test_ekd_without_ensemble_teacher_matches_numpy(inputs):
  logits, features, labels = inputs
  loss, parts = losses.ddnn_objective('ekd_no_ensemble', jnp.asarray(logits),
                                      _attention(features), jnp.asarray(labels), w=0.5,
                                      alpha=20.0, temperature=2.0)
  want = np_ekd(logits, _np_maps(features), labels, 0.5, 20.0, 2.0, ensemble=False)
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  # The dropped terms are what EKD adds on top: the two differ by exactly them.
  ekd, _ = losses.ddnn_objective('ekd', jnp.asarray(logits), _attention(features),
                                 jnp.asarray(labels), w=0.5, alpha=20.0, temperature=2.0)
  np.testing.assert_allclose(ekd, np_ekd(logits, _np_maps(features), labels, 0.5, 20.0, 2.0),
                             rtol=1e-5)
  assert float(ekd) > float(loss)
  assert 'kl_full' not in parts and 'attention_full' not in parts
  chex.assert_shape([parts['kl'], parts['attention']], (D - 1,))


@pytest.mark.parametrize('mode', ['ekd', 'ekd_no_ensemble', 'ipkd', 'ipkd_ta'])
def test_per_subnet_weights_match_numpy(inputs, mode):
  logits, features, labels = inputs
  w, alpha = (0.2, 1.0, 3.0), (5.0, 0.0, 50.0)
  loss, _ = losses.ddnn_objective(mode, jnp.asarray(logits), _attention(features),
                                  jnp.asarray(labels), w=w, alpha=alpha)
  if mode.startswith('ekd'):
    want = np_ekd(logits, _np_maps(features), labels, w, alpha, 1.0,
                  ensemble=mode == 'ekd')
  else:
    p = [np_softmax(logits[d]) for d in range(D)]
    teacher = [p[0] if mode == 'ipkd' else p[k - 1] for k in range(1, D)]
    want = (np_ce(logits[0], labels) + np.mean([np_ce(logits[k], labels) for k in range(1, D)])
            + np.mean([w[k - 1] * np_kl(teacher[k - 1], logits[k]) for k in range(1, D)]))
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  # Equal per-sub-net weights are the scalar weight.
  same, _ = losses.ddnn_objective(mode, jnp.asarray(logits), _attention(features),
                                  jnp.asarray(labels), w=(0.7,) * 3, alpha=(9.0,) * 3)
  scalar, _ = losses.ddnn_objective(mode, jnp.asarray(logits), _attention(features),
                                    jnp.asarray(labels), w=0.7, alpha=9.0)
  np.testing.assert_allclose(same, scalar, rtol=1e-6)
  with pytest.raises(AssertionError):  # One weight per sub-net, K of them.
    losses.ddnn_objective(mode, jnp.asarray(logits), _attention(features),
                          jnp.asarray(labels), w=(1.0, 2.0))


def test_attention_from_chosen_stages_matches_numpy(inputs):
  logits, features, labels = inputs
  per_depth = [[jnp.asarray(f[d]) for f in features] for d in range(D)]
  chosen = losses.stacked_attention(per_depth, stages=(1,))
  assert len(chosen) == 1
  chex.assert_shape(chosen[0], (D, B, 4))  # Stage 1 is 2x2.
  loss, _ = losses.ddnn_objective('ekd', jnp.asarray(logits), chosen, jnp.asarray(labels),
                                  alpha=30.0)
  np.testing.assert_allclose(loss, np_ekd(logits, _np_maps(features, (1,)), labels, 1.0,
                                          30.0, 1.0), rtol=1e-5)
  # All stages (the default) sum the MSE over both: a larger attention term.
  every = losses.stacked_attention(per_depth)
  assert len(every) == 2
  np.testing.assert_allclose(every[1], chosen[0])
  full, _ = losses.ddnn_objective('ekd', jnp.asarray(logits), every, jnp.asarray(labels),
                                  alpha=30.0)
  np.testing.assert_allclose(full, np_ekd(logits, _np_maps(features), labels, 1.0, 30.0, 1.0),
                             rtol=1e-5)
  assert float(full) > float(loss)


def test_vmapped_terms_equal_python_loop(inputs):
  logits, features, labels = inputs
  attention = _attention(features)
  _, parts = losses.ddnn_objective('ekd', jnp.asarray(logits), attention, jnp.asarray(labels),
                                   temperature=2.0)
  teacher = jax.nn.softmax(logits[0] / 2.0)
  for k in range(1, D):
    np.testing.assert_allclose(parts['ce'][k], losses.cross_entropy(logits[k], labels),
                               rtol=1e-6)
    np.testing.assert_allclose(parts['kl'][k - 1],
                               losses.kl_divergence(teacher, logits[k], 2.0), rtol=1e-6)
    mse = sum(losses.attention_mse(a[0], a[k]) for a in attention)
    np.testing.assert_allclose(parts['attention'][k - 1], mse, rtol=1e-6)


def test_other_modes_match_numpy(inputs):
  logits, _, labels = inputs
  z, y = jnp.asarray(logits), jnp.asarray(labels)
  ce = [np_ce(logits[d], labels) for d in range(D)]
  p = [np_softmax(logits[d]) for d in range(D)]

  loss, parts = losses.ddnn_objective('individual', z[:1], (), y)
  np.testing.assert_allclose(loss, ce[0], rtol=1e-6)
  chex.assert_shape(parts['ce'], (1,))

  hard = ce[0] + np.mean(ce[1:])
  np.testing.assert_allclose(losses.ddnn_objective('ddnn', z, (), y)[0], hard, rtol=1e-6)

  ipkd = hard + 0.7 * np.mean([np_kl(p[0], logits[k]) for k in range(1, D)])
  np.testing.assert_allclose(losses.ddnn_objective('ipkd', z, (), y, w=0.7)[0], ipkd, rtol=1e-5)

  # Teacher assistants: each sub-net is taught by the next larger depth.
  ta = hard + 0.7 * np.mean([np_kl(p[k - 1], logits[k]) for k in range(1, D)])
  np.testing.assert_allclose(losses.ddnn_objective('ipkd_ta', z, (), y, w=0.7)[0], ta, rtol=1e-5)


def test_teachers_are_stop_gradient(inputs):
  logits, features, labels = inputs
  attention = _attention(features)
  w, alpha = 0.8, 5.0

  def ekd(z, a):
    return losses.ddnn_objective('ekd', z, a, labels, w=w, alpha=alpha)[0]

  def student_paths(z, a):
    # Only the student side of every term may carry gradient.
    sg = jax.lax.stop_gradient
    p = jax.nn.softmax(sg(z))
    loss = losses.cross_entropy(z[0], labels) + jnp.mean(
        jnp.stack([losses.cross_entropy(z[k], labels) for k in range(1, D)]))
    kl = sum(losses.kl_divergence(p[0], z[k]) for k in range(1, D))
    kl += losses.kl_divergence(jnp.mean(p, 0), z[0])
    mse = sum(sum(losses.attention_mse(sg(s[0]), s[k]) for k in range(1, D))
              + losses.attention_mse(sg(jnp.mean(s, 0)), s[0]) for s in a)
    return loss + w / D * kl + alpha / D * mse

  got = jax.grad(ekd, argnums=(0, 1))(jnp.asarray(logits), attention)
  want = jax.grad(student_paths, argnums=(0, 1))(jnp.asarray(logits), attention)
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize('mode,num_logits,message', [
    ('kd', 3, "unknown mode 'kd'"),
    ('individual', 3, 'give no sub-nets'),
    ('ekd', 1, 'needs at least one sub-net'),
])
def test_bad_mode_raises(mode, num_logits, message):
  with pytest.raises(ValueError, match=message):
    losses.ddnn_objective(mode, jnp.zeros((num_logits, 2, 3)), (), jnp.zeros(2, jnp.int32))


@pytest.mark.parametrize('mode', losses.MODES)
@pytest.mark.parametrize('w,alpha', [(1.0, 100.0), ((0.5, 1.0, 2.0), (10.0, 0.0, 30.0)),
                                     (2.0, 0.0)])
def test_weighted_terms_sum_to_the_loss(inputs, mode, w, alpha):
  logits, features, labels = inputs
  z = jnp.asarray(logits[:1] if mode == 'individual' else logits)
  loss, parts = losses.ddnn_objective(mode, z, _attention(features), jnp.asarray(labels), w=w,
                                      alpha=alpha, temperature=2.0)
  terms = losses.weighted_terms(mode, parts, w=w, alpha=alpha)
  np.testing.assert_allclose(sum(terms.values()), loss, rtol=1e-5)
  kinds = {'individual': {'ce'}, 'ddnn': {'ce'}, 'ipkd': {'ce', 'kl'}, 'ipkd_ta': {'ce', 'kl'}}
  with_attention = {'ce', 'kl', 'attention'} if np.any(np.asarray(alpha) != 0) else {'ce', 'kl'}
  assert {k.split('/')[0] for k in terms} == kinds.get(mode, with_attention)


def test_weighted_terms_by_hand(inputs):
  """EKD with K = 3: each sub-net's CE / 3, its KL w_k / 4, the full net's KL mean(w) / 4."""
  logits, features, labels = inputs
  w = (0.5, 1.0, 3.0)
  _, parts = losses.ddnn_objective('ekd', jnp.asarray(logits), _attention(features),
                                   jnp.asarray(labels), w=w, alpha=0.0)
  terms = losses.weighted_terms('ekd', parts, w=w, alpha=0.0)
  p = [np_softmax(logits[d]) for d in range(D)]
  np.testing.assert_allclose(terms['ce/0'], np_ce(logits[0], labels), rtol=1e-5)
  np.testing.assert_allclose(terms['ce/2'], np_ce(logits[2], labels) / 3, rtol=1e-5)
  np.testing.assert_allclose(terms['kl/3'], 3.0 * np_kl(p[0], logits[3]) / 4, rtol=1e-5)
  np.testing.assert_allclose(terms['kl/0'], np.mean(w) * np_kl(np.mean(p, 0), logits[0]) / 4,
                             rtol=1e-5)
  assert 'attention/0' not in terms
