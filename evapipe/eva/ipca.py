"""Incremental PCA: mean-centred, sklearn-style merging, with a warm-started randomised top-k SVD.

Each update takes the top right-singular vectors of the matrix A that stacks the previous estimate (singular
values x components), the new batch centred on its own mean, and a mean-correction row (as scikit-learn's
IncrementalPCA). A is never built, nor is the centred batch: one Rayleigh-Ritz step of a randomised range finder
needs only two products with the raw batch X, Y = A Z (from X Z) and B = Q^T A (from X^T [Q 1], whose last column
also gives the batch mean), where Z holds the previous components plus a few fresh random directions (the estimate
is its own warm start) and Q is an orthonormal basis of Y.

Choices, each measured by benchmarks/levers.py (figures in docs/performance.md, "Levers"):

* no power iteration once warm: the previous components are a warm start that one Rayleigh-Ritz step refines;
  a power iteration per batch costs about a tenth more wall time for no measurable gain in captured variance. The
  first (cold, random) update does FIRST_POWER_ITERATIONS, and while a batch is over YOUNG_SHARE of the tokens
  seen one more (few tokens per batch against many features: this keeps well-separated components at |cos| > 0.99
  with the exact PCA after a handful of batches);
* ``n_track`` = 2 x ``n_components`` tracked components: truncating to ``n_components`` after every batch (what
  PEFT does) drops the directions the next batches would have lifted into the top-k, and takes more batches to
  converge;
* fresh directions drawn from the batch's own row space (``_start``): without them new directions enter the
  estimate late, the cosine test passes too early and the worst layer's captured variance drops;
* the two passes over the batch run in float32; the small parts (orthonormalising Y, the SVD of B through its Gram
  matrix, means and variances) in float64, where they cost nothing and keep full precision;
* the big products run layer by layer (no stacked copies of the batches); the small ones of all layers of the same
  width together, in batched linear algebra;
* many small PCAs (the experts of a fused parameter: a few dozen tokens each per batch, fewer than their features)
  take the exact update instead, all at once (``_gram_update``): their A's padded into one float64 tensor and the
  top-k from batched eigendecompositions of A A^T. Done one at a time, per-call overhead dominated (a dense SVD per
  expert per batch: 17 s of a 42 s run on a 16-expert model);
* NaN/Inf in an input is found from sums the update computes anyway (``_refuse_non_finite``), before any state
  changes: an ``isfinite`` pass over every input cost a tenth of a run.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

import torch

EXTRA_RANDOM_DIRECTIONS = 8
FIRST_POWER_ITERATIONS = 2
YOUNG_SHARE = 1 / 4  # while a batch is more than this share of the tokens seen, one power iteration
GRAM_ROWS = 4  # A with at most this many x (tracked + random) rows or features: the exact batched Gram update
GRAM_RUN = 1.25  # one batched Gram update pads A to at most this times its shortest A's rows (products ~ rows^2)
_RANK_EPS = 1e-6  # Cholesky pivot below this times the largest (cond(Y) > 1e6): the basis for a deficient A


@dataclass
class PCAState:
    """Running PCA of one layer's inputs: everything needed to continue, checkpoint or report it."""

    n_features: int
    n_components: int
    n_track: int
    seed: int
    mean: torch.Tensor | None = None  # float64 (n_features,)
    var: torch.Tensor | None = None  # float64: population variance, summed over features
    n_seen: int = 0
    steps: int = 0
    components: torch.Tensor | None = None  # float32 (n_track, n_features), rows orthonormal
    singular_values: torch.Tensor | None = None  # float32 (n_track,)
    similarity: torch.Tensor | None = None  # |cos| of the top n_components vs the previous step
    history: list[float] = field(default_factory=list)  # min similarity per step, for inspection

    @property
    def fitted(self) -> bool:
        return self.components is not None

    def explained_variance_ratio(self) -> torch.Tensor:
        """Each tracked component's share of the layer inputs' total variance."""
        total = (self.var.sum() * self.n_seen).clamp_min(1e-30)
        return (self.singular_values.double() ** 2 / total).float()

    def top(self, k: int) -> torch.Tensor:
        return self.components[:k]


def new_state(n_features: int, n_components: int, oversample: int | None, seed: int) -> PCAState:
    n_components = min(n_components, n_features)
    extra = n_components if oversample is None else oversample
    return PCAState(n_features, n_components, min(n_features, n_components + extra), seed)


class _Layer:
    """One layer's implicit A = [P; X - 1 mu^T; c] for this update, P = previous singular values x components,
    mu the batch mean, c = sqrt(n m / (n + m)) (previous mean - mu) the mean-correction row.

    X is held shifted by the running mean (by its own rough mean on the first batch) before any float32 product:
    inputs whose mean is large against their spread would otherwise lose their variance to float32 rounding.
    """

    def __init__(self, state: PCAState, x: torch.Tensor):
        self.state, self.m, n_prev = state, x.shape[0], state.n_seen
        shift = state.mean.to(x.dtype) if state.mean is not None else x.mean(0)
        self.shift = shift.double()
        self.x = x - shift
        self.scale = math.sqrt(n_prev * self.m / (n_prev + self.m))
        self.prev = None if not state.fitted else state.singular_values.unsqueeze(1) * state.components
        # previous mean - shift (float64; zero up to the shift's rounding once the running mean is the shift)
        self.prev_offset = None if state.mean is None else state.mean - self.shift
        self.mu_x: torch.Tensor | None = None  # float64 mean of the shifted batch, known after the first A^T product

    @property
    def mu(self) -> torch.Tensor:
        """The batch mean (float64)."""
        return self.mu_x + self.shift

    def times(self, z: torch.Tensor) -> list[torch.Tensor]:
        """Blocks of A z (float64): [P z,] (X - 1 mu^T) z[, c z]; the batch mean's part comes from X z itself."""
        xz = (self.x @ z).double()
        mz = xz.mean(0, keepdim=True)  # (mu - shift)^T z
        blocks = [xz - mz]
        if self.prev is not None:
            prev_mean_z = self.prev_offset @ z.double()
            blocks = [(self.prev @ z).double(), *blocks, self.scale * (prev_mean_z - mz)]
        return blocks

    def transposed_times(self, q: list[torch.Tensor]) -> torch.Tensor:
        """A^T q (float64, n x c) for q in blocks as from times(); also sets the batch mean."""
        q_x = q[1] if self.prev is not None else q[0]
        ones = q_x.new_ones(self.m, 1)
        xt = (self.x.mT @ torch.cat([q_x, ones], 1).float()).double()  # [X^T q_x, column sums]
        self.mu_x = xt[:, -1] / self.m
        out = xt[:, :-1] - self.mu_x.unsqueeze(1) * q_x.sum(0, keepdim=True)
        if self.prev is not None:
            c = self.scale * (self.prev_offset - self.mu_x)
            out = out + self.prev.double().mT @ q[0] + c.unsqueeze(1) * q[2]
        return out

    def dense(self) -> torch.Tensor:
        """A itself (float64), for small updates (few rows, or few features: about the batch's own size)."""
        x = self.x.double()
        self.mu_x = x.mean(0)
        blocks = [x - self.mu_x]
        if self.prev is not None:
            blocks = [self.prev.double(), *blocks, (self.scale * (self.prev_offset - self.mu_x)).unsqueeze(0)]
        return torch.cat(blocks)


def _gram(blocks: list[torch.Tensor]) -> torch.Tensor:
    return sum(b.mT @ b for b in blocks)


def _orthonormalise(layers_blocks: list[list[torch.Tensor]]) -> list[list[torch.Tensor]] | None:
    """Orthonormal bases (float64, same blocks) of each layer's Y: Y R^-1 with R the Cholesky factor of Y^T Y.

    None when some Y has (numerically) dependent columns: the caller then takes the exact path.
    """
    r, info = torch.linalg.cholesky_ex(torch.stack([_gram(blocks) for blocks in layers_blocks]), upper=True)
    diag = r.diagonal(dim1=-2, dim2=-1)
    if bool((info != 0).any()) or bool((diag.amin(-1) <= _RANK_EPS * diag.amax(-1)).any()):
        return None
    eye = torch.eye(r.shape[-1], dtype=r.dtype, device=r.device).expand_as(r)
    t = torch.linalg.solve_triangular(r, eye, upper=True)
    return [[b @ t[j] for b in blocks] for j, blocks in enumerate(layers_blocks)]


def _orthonormalise_deficient(layers_blocks: list[list[torch.Tensor]]) -> list[list[torch.Tensor]] | None:
    """Orthonormal bases of each layer's Y when its columns are (numerically) dependent: the eigenvectors of
    Y^T Y with non-negligible eigenvalues, refined by one Cholesky step. The basis has fewer columns (the rank of A
    in the directions tried), and its memory is Y's, not that of a dense A. None if some Y is entirely zero."""
    out = []
    for blocks in layers_blocks:
        lam, v = torch.linalg.eigh(_gram(blocks))
        keep = lam > _RANK_EPS**2 * lam[-1].clamp_min(0)
        if lam[-1] <= 0 or not bool(keep.any()):
            return None
        t = v[:, keep] / lam[keep].sqrt()
        blocks = [b @ t for b in blocks]
        r = torch.linalg.cholesky(_gram(blocks), upper=True)  # close to I: well conditioned
        eye = torch.eye(r.shape[-1], dtype=r.dtype, device=r.device)
        out.append([b @ torch.linalg.solve_triangular(r, eye, upper=True) for b in blocks])
    return out


def _start(layer: _Layer, width: int) -> torch.Tensor:
    """(n, width): the previous components plus fresh directions drawn from the batch's own row space.

    The fresh directions are seeded random combinations of the batch's tokens (X^T omega, normalised): they lie
    where the new batch's variance is, so a new direction enters the estimate in the very update that shows it,
    which random directions of the whole space rarely manage without a power iteration.
    """
    s, x = layer.state, layer.x
    g = torch.Generator().manual_seed(s.seed * 1_000_003 + s.steps)
    omega = torch.randn(x.shape[0], width - (s.n_track if s.fitted else 0), generator=g).to(x.device)
    fresh = x.mT @ omega
    fresh = fresh / fresh.norm(dim=0, keepdim=True).clamp_min(1e-30)
    return torch.cat([s.components.T, fresh], 1) if s.fitted else fresh


def power_iterations(layers: list[_Layer]) -> int:
    """FIRST_POWER_ITERATIONS on the cold start; once warm, one while a batch is over YOUNG_SHARE of the tokens
    seen, else none (see the module docstring)."""
    if layers[0].prev is None:
        return FIRST_POWER_ITERATIONS
    return int(max(layer.m / (layer.m + layer.state.n_seen) for layer in layers) > YOUNG_SHARE)


def _randomised(layers: list[_Layer], k: int, deficient: bool = False) -> tuple[list, list] | None:
    """Top-k singular values and right singular vectors of each layer's A (fewer where A has a lower rank in the
    directions tried, with `deficient`); None if a basis was rank-deficient (then: again with `deficient`, one
    layer at a time) or, with `deficient`, A is zero."""
    orthonormalise = _orthonormalise_deficient if deficient else _orthonormalise
    width = k + EXTRA_RANDOM_DIRECTIONS
    zs = [_start(layer, width) for layer in layers]
    _refuse_non_finite([torch.isfinite(z).all() for z in zs])  # X^T omega sums every row: finite iff X is
    q = orthonormalise([layer.times(z) for layer, z in zip(layers, zs)])
    for _ in range(power_iterations(layers)):
        if q is None:
            return None
        z = orthonormalise([[layer.transposed_times(qj)] for layer, qj in zip(layers, q)])
        q = None if z is None else orthonormalise([lay.times(zj[0].float()) for lay, zj in zip(layers, z)])
    if q is None:
        return None
    b = torch.stack([layer.transposed_times(qj).mT for layer, qj in zip(layers, q)])  # B = Q^T A, (L, c, n)
    lam, u = torch.linalg.eigh(b @ b.mT)  # B B^T = U diag(s^2) U^T, ascending
    lam, u = lam.flip(-1)[:, :k], u.flip(-1)[..., :k]
    s = lam.clamp_min(0).sqrt()
    vh = (u.mT @ b) / s.clamp_min(1e-300).unsqueeze(-1)  # rows B^T u / s: the right singular vectors
    return list(s.float()), list(vh.float())


def _exact(layers: list[_Layer], k: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    svs, vhs = [], []
    for layer in layers:
        _, s, vh = torch.linalg.svd(layer.dense(), full_matrices=False)
        svs.append(s[:k].float())
        vhs.append(vh[:k].float())
    return svs, vhs


def _one_by_one(layers: list[_Layer], k: int) -> tuple[list, list]:
    """Layers whose A is rank-deficient in the directions tried: the same randomised update on a basis of the
    lower rank, layer by layer (memory as in the usual update, never a dense A); a zero A (every token equal, no
    history) takes the exact path, which is then as small as the batch."""
    svs, vhs = [], []
    for layer in layers:
        found = _randomised([layer], k, deficient=True)
        sv, vh = ([found[0][0]], [found[1][0]]) if found is not None else _exact([layer], k)
        svs += sv
        vhs += vh
    return svs, vhs


class NonFiniteInputs(Exception):  # noqa: N818 - a signal to the caller, who raises the user's DataError
    """Some inputs hold NaN or Inf (`indices` into update_many's lists); no state was changed."""

    def __init__(self, indices: list[int]):
        super().__init__(f"non-finite inputs at {indices}")
        self.indices = indices


def _refuse_non_finite(finite: list[torch.Tensor]) -> None:
    """One read of per-layer flags computed from a reduction the update needs anyway (a sum over the rows is finite
    exactly when every row is, barring overflow): no extra pass over the inputs."""
    bad = (~torch.stack(finite)).nonzero().flatten().tolist()
    if bad:
        raise NonFiniteInputs(bad)


def _batch_sum_of_squares(layer: _Layer) -> float:
    """The batch's centred sum of squares (usually one pass over X)."""
    m, mu_x = layer.m, layer.mu_x
    raw = float(torch.linalg.vector_norm(layer.x)) ** 2
    ss_b = raw - m * float(mu_x @ mu_x)
    if ss_b < 1e-2 * raw:  # the mean carries over 99% of the second moment: subtracting would cancel, centre first
        ss_b = float(torch.linalg.vector_norm(layer.x - mu_x.to(layer.x.dtype))) ** 2
    return ss_b


@dataclass
class _Solved:
    """One update of a list of states, not yet folded in: per state (stacked) the batch's rows, mean and centred sum
    of squares, and the new singular values and components."""

    m: torch.Tensor  # float64 (L,)
    mu: torch.Tensor  # float64 (L, n)
    ss: torch.Tensor  # float64 (L,)
    sv: torch.Tensor  # float32 (L, <= k)
    vh: torch.Tensor  # float32 (L, <= k, n)


def _gram_update(states: list[PCAState], xs: list[torch.Tensor]) -> _Solved:
    """The exact update of many small PCAs at once (the experts of a fused parameter; any layer whose A has few rows
    or few features): each A = [P; X - 1 mu^T; c] is built padded with zero rows, which change neither its
    singular values nor its right singular vectors, in one (L, rows, n) float64 tensor; the top-k come from batched
    eigendecompositions of A A^T (few rows) or A^T A (few features). Float64 throughout: the Gram matrices square
    the condition number, and these tensors are small. Exact, like a dense SVD of each A, with no loop over layers."""
    k, n, fitted = states[0].n_track, states[0].n_features, states[0].fitted
    device = xs[0].device
    rows = [x.shape[0] for x in xs]
    big, p = max(rows), (k if fitted else 0)
    m = torch.tensor(rows, dtype=torch.float64, device=device)
    a = torch.empty(len(xs), p + big + int(fitted), n, dtype=torch.float64, device=device)  # every block written
    batch = a[:, p:p + big]
    batch.copy_(torch.nn.utils.rnn.pad_sequence(list(xs), batch_first=True))
    sums = batch.sum(1)
    _refuse_non_finite(list(torch.isfinite(sums).all(-1).unbind()))
    mu = sums / m.unsqueeze(1)
    batch.sub_(mu.unsqueeze(1)).mul_((torch.arange(big, device=device) < m.unsqueeze(1)).unsqueeze(-1))
    ss = batch.square().sum((1, 2))
    if fitted:
        n_prev = torch.tensor([s.n_seen for s in states], dtype=torch.float64, device=device)
        a[:, :p] = torch.stack([s.singular_values.unsqueeze(1) * s.components for s in states])
        a[:, -1] = (n_prev * m / (n_prev + m)).sqrt().unsqueeze(1) * (torch.stack([s.mean for s in states]) - mu)
    if a.shape[1] <= n:
        lam, u = torch.linalg.eigh(a @ a.mT)  # ascending
        lam, u = lam.flip(-1)[:, :k], u.flip(-1)[..., :k]
        sv = lam.clamp_min(0).sqrt()
        vh = (u.mT @ a) / sv.clamp_min(1e-300).unsqueeze(-1)
    else:
        lam, v = torch.linalg.eigh(a.mT @ a)
        sv, vh = lam.flip(-1)[:, :k].clamp_min(0).sqrt(), v.flip(-1)[..., :k].mT
    keep = sv > _RANK_EPS * sv[:, :1]  # directions A does not have (fewer rows than k, padding): zero rows
    return _Solved(m, mu, ss, (sv * keep).float(), (vh * keep.unsqueeze(-1)).float())


def _randomised_update(states: list[PCAState], xs: list[torch.Tensor]) -> _Solved:
    """The randomised update (module docstring) of layers of many rows and features: batched small algebra."""
    k = states[0].n_track
    layers = [_Layer(s, x.float()) for s, x in zip(states, xs)]
    svs, vhs = _randomised(layers, k) or _one_by_one(layers, k)
    n = max(len(v) for v in svs)
    sv = torch.stack([torch.cat([v, v.new_zeros(n - len(v))]) for v in svs])
    vh = torch.stack([torch.cat([v, v.new_zeros(n - len(v), v.shape[1])]) for v in vhs])
    ss = torch.tensor([_batch_sum_of_squares(layer) for layer in layers], dtype=torch.float64, device=sv.device)
    m = torch.tensor([layer.m for layer in layers], dtype=torch.float64, device=sv.device)
    return _Solved(m, torch.stack([layer.mu for layer in layers]), ss, sv, vh)


def _sign_fix(vh: torch.Tensor) -> torch.Tensor:
    """Make each component's largest-magnitude entry positive, so output is deterministic."""
    idx = vh.abs().argmax(-1, keepdim=True)
    signs = torch.sign(torch.gather(vh, -1, idx))
    signs[signs == 0] = 1
    return vh * signs


def _commit(states: list[PCAState], solved: _Solved) -> None:
    """Fold a solved update into its states: moments (float64), sign-fixed components padded to n_track rows, and
    each state's similarity to its previous components; one read of the device for all states."""
    k, n, fitted = states[0].n_track, states[0].n_features, states[0].fitted
    m, mu, ss, sv, vh = solved.m, solved.mu, solved.ss, solved.sv, _sign_fix(solved.vh)
    if vh.shape[1] < k:  # fewer rows than tracked components so far: pad with zeros
        vh = torch.cat([vh, vh.new_zeros(len(states), k - vh.shape[1], n)], 1)
        sv = torch.cat([sv, sv.new_zeros(len(states), k - sv.shape[1])], 1)
    if fitted:
        n_prev = torch.tensor([s.n_seen for s in states], dtype=torch.float64, device=mu.device)
        total = n_prev + m
        delta = mu - torch.stack([s.mean for s in states])
        var = (torch.stack([s.var.sum() for s in states]) * n_prev + ss + delta.square().sum(-1) * n_prev * m / total)
        var, mean = var / total, mu - delta * (n_prev / total).unsqueeze(1)
        sims = (vh * torch.stack([s.components for s in states])).sum(-1).abs()
        wanted = torch.arange(k, device=sims.device) < torch.tensor([s.n_components for s in states],
                                                                    device=sims.device).unsqueeze(1)
        mins = torch.where(wanted, sims, torch.inf).amin(-1).tolist()
    else:
        var, mean = ss / m, mu
    for i, s in enumerate(states):
        if fitted:
            s.similarity = sims[i, :s.n_components]
            s.history.append(mins[i])
        s.mean, s.var, s.n_seen = mean[i], var[i], s.n_seen + int(m[i])
        s.components, s.singular_values = vh[i].contiguous(), sv[i].contiguous()
        s.steps += 1


def _solve(states: list[PCAState], xs: list[torch.Tensor]) -> list[tuple[list[int], _Solved]]:
    """One bucket (same width, tracked components, fitted or not): the layers whose A has few rows or few features
    take the exact batched Gram update, the others the randomised one."""
    k, n = states[0].n_track, states[0].n_features
    rows = [x.shape[0] + 1 + (k if states[0].fitted else 0) for x in xs]
    small = [i for i, r in enumerate(rows) if min(r, n) <= GRAM_ROWS * (k + EXTRA_RANDOM_DIRECTIONS)]
    large = [i for i in range(len(xs)) if i not in set(small)]
    parts = [(run, _gram_update) for run in runs_of_height(small, rows)]
    out, bad = [], []
    for part, solver in parts + ([(large, _randomised_update)] if large else []):
        try:
            out.append((part, solver([states[i] for i in part], [xs[i] for i in part])))
        except NonFiniteInputs as err:
            bad += [part[j] for j in err.indices]
    if bad:
        raise NonFiniteInputs(sorted(bad))
    return out


def runs_of_height(idx: list[int], rows: list[int]) -> list[list[int]]:
    """`idx` in runs of similar A heights: a batched Gram update pads every A to its run's tallest, and its products
    cost rows^2, so experts that the router fed unevenly (a few tokens here, a hundred there) must not all be padded
    to the busiest one (4x the work on a 16-expert model)."""
    out: list[list[int]] = []
    for i in sorted(idx, key=rows.__getitem__):
        if out and rows[i] <= GRAM_RUN * rows[out[-1][0]]:
            out[-1].append(i)
        else:
            out.append([i])
    return out


def update_many(states: list[PCAState], inputs: list[torch.Tensor]) -> None:
    """Fold one batch of tokens (rows) into each state; layers of the same width share batched algebra.

    Raises NonFiniteInputs, naming every input with a NaN or Inf, before any state changes."""
    buckets: dict[tuple, list[int]] = defaultdict(list)
    for i, (s, x) in enumerate(zip(states, inputs)):
        if x.shape[0] == 0:
            continue
        buckets[(s.n_features, s.n_track, s.fitted, x.device)].append(i)
    solved, bad = [], []
    for idx in buckets.values():
        try:
            solved += [([idx[j] for j in part], result)
                       for part, result in _solve([states[i] for i in idx], [inputs[i] for i in idx])]
        except NonFiniteInputs as err:
            bad += [idx[j] for j in err.indices]
    if bad:
        raise NonFiniteInputs(sorted(bad))
    for idx, result in solved:
        _commit([states[i] for i in idx], result)
