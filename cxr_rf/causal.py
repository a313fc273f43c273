"""A structural causal model of a study's metadata, for counterfactual editing.

Pearl's three steps on discrete metadata: *abduction* (the exogenous noise that explains the
observed record, sampled from its exact posterior), *action* (``do()``: the intervened
variables' mechanisms are cut and their values set) and *prediction* (the descendants are
recomputed, in topological order, with the abducted noise). The image edit then conditions
the flow model on the counterfactual metadata (``conditions_with``).

Variables (``VARIABLES``) and their values (``DOMAINS``):

    age     ``conditioning.AGE_BINS``: "unknown", "0-19", "20-29", ..., "70-79", "80+". An
            intervention such as ``age=85`` picks the bin ("80+") and keeps the exact years for
            the image conditions (``conditions_with``).
    sex     ``conditioning.SEXES`` ("unknown", "M", "F")
    race    ``conditioning.RACES``
    view    ``conditioning.VIEWS``
    the 14 ``conditioning.FINDINGS``   ("negative", "positive")

Unknown, unmentioned, uncertain:

  * A record's "unknown" (sex "unknown", age -1, race "unknown", view "unknown") is a value
    of its own: it is fitted like any other (a parent's "unknown" selects its own rows of the
    child's table) and it can be observed, but not set by ``do()`` (an intervention sets a
    value; "the record does not know" is not one).
  * A finding has two mechanism states. In ``fit``, ``unmentioned`` (default "negative") and
    ``uncertain`` (default "exclude") say what the other two data states mean: "negative",
    "positive", or "exclude" (the record is left out of the tables that variable enters,
    its own and its children's; the rest of the record still counts). Unmentioned defaults
    to negative because reports name what they see: a finding the labeler found no mention
    of is almost always absent (the CheXpert "blank" convention; excluding it would drop most
    of MIMIC/CheXpert-style records from every table). Uncertain defaults to excluded: it is
    neither, and guessing would bias the table one way.
  * When a record is *observed* (``observed_of``), the same ``unmentioned`` rule applies
    (default negative); uncertain findings and anything not specified (a ``Conditions``
    None / ``UNSPECIFIED``) are missing: abduction samples them from their exact posterior
    given everything observed (joint enumeration), then abducts the noise. So several
    abductions also spread over what the record did not say.
  * "No Finding" is deterministic, not fitted: positive iff no other finding in the graph is
    positive. Its observed value is never evidence; it is recomputed from the others (the
    factual value reported is the recomputed one), also with ``propagate=False`` (a
    definition, not an effect).

Mechanisms are Gumbel-max (Oberst & Sontag 2019): x_v = argmax_k log P(k | pa_v) + g_vk with
g_vk iid Gumbel(0), one noise vector per variable shared by all of its parent values. The
posterior of g_v given x_v = k* and pa_v is exact and cheap (top-down): the max of the
perturbed logits is Gumbel(log Z) (Z = 1) and is the winner's; every other perturbed logit is
a Gumbel(log P(k | pa_v)) truncated below that max.

Graph files (``Graph.load``): JSON ``{"edges": {"child": ["parent", ...]}}`` or text lines
``A, B -> C, D`` (every left node is a parent of every right node; ``#`` comments). A file
describes a graph over all ``VARIABLES``; the ones it does not mention are roots. "No Finding"
takes no edges in a file: it is always the child of every other finding.

API:
    Graph(edges, nodes=None), Graph.default(), Graph.load(path), Graph.parse(text)
    fit(graph, metas, *, alpha=1.0, prior="marginal", unmentioned="negative",
        uncertain="exclude") -> Model;  Model.save(path), Model.load(path)
    sample(model, n, rng) -> int [n, N]   ancestral samples (value indices, graph.nodes order)
    forward(model, noise, do=None) -> int [n, N]   the mechanisms run on given noise
    assignment(model, row) -> {variable: value name}
    abduct(model, observed, rng, n_samples=1) -> (X [n, N], {node: noise [n, K]})
    intervene(model, observed, do, rng, n_samples=1, propagate=True) -> [Counterfactual]
    counterfactual_distribution(model, observed, do, rng, n_samples=1000, propagate=True)
    parse_set(text) -> {variable: value}      the editing CLI's ``--set``
    observed_of(conditions_or_meta, unmentioned="negative") -> {variable: value | None}
    conditions_with(conditions, counterfactual, do) -> Conditions
    edit(model, conditions, do, rng, propagate=True, unmentioned="negative")
        -> (Conditions, Counterfactual)     do: a dict or a --set string
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
from typing import Any, Mapping, Sequence

import numpy as np

from cxr_rf import conditioning as cond
from cxr_rf import errors
from cxr_rf.conditioning import Conditions

NO_FINDING = "No Finding"
DEMOGRAPHICS = ("age", "sex", "race", "view")
VARIABLES: tuple[str, ...] = DEMOGRAPHICS + cond.FINDINGS
FINDING_STATES = ("negative", "positive")
DOMAINS: dict[str, tuple[str, ...]] = {
    "age": cond.AGE_BINS, "sex": cond.SEXES, "race": cond.RACES, "view": cond.VIEWS,
    **{f: FINDING_STATES for f in cond.FINDINGS},
}
UNKNOWN = "unknown"
FORMAT = "cxr_rf.causal/1"
# Enumeration bound for the joint posterior of unobserved variables in abduction.
MAX_MISSING_CONFIGS = 1 << 16

# RadiT's causal graph (as read from its project page's figure), plus view as a root and
# "No Finding" as the deterministic child of every other finding (added by Graph itself).
DEFAULT_GRAPH = """\
# parents -> children; unmentioned variables (view) are roots
age -> Cardiomegaly, Edema, Fracture, Pleural Other, Pneumonia, Pneumothorax
sex -> Cardiomegaly, Edema, Fracture, Pleural Other, Pneumonia, Pneumothorax
race -> Cardiomegaly, Edema
Cardiomegaly -> Enlarged Cardiomediastinum, Pleural Effusion
Pneumonia -> Consolidation, Pleural Effusion
Fracture -> Pneumothorax
Pleural Other -> Pleural Effusion, Lung Opacity
Pneumothorax -> Atelectasis, Support Devices
Pleural Effusion -> Atelectasis, Support Devices
Edema, Consolidation, Atelectasis -> Lung Opacity
Lung Opacity -> Lung Lesion
"""

_SEX_ALIASES = {"m": "M", "male": "M", "f": "F", "female": "F"}
_VIEW_ALIASES = {"pa": "PA", "ap": "AP", "lateral": "LATERAL"}
_STATE_ALIASES = {"positive": "positive", "pos": "positive", "1": "positive", "true": "positive",
                  "yes": "positive", "negative": "negative", "neg": "negative", "0": "negative",
                  "false": "negative", "no": "negative"}


class CausalError(errors.UserError):
    """A bad graph, model file, variable name, value or intervention (one line)."""


def _canonical(name: str) -> str:
    """The variable called ``name`` (case-insensitive), or a one-line error listing them."""
    key = name.strip().lower()
    for v in VARIABLES:
        if v.lower() == key:
            return v
    raise CausalError(f"unknown variable {name.strip()!r}; valid: {', '.join(VARIABLES)}")


def _is_finding(v: str) -> bool:
    return v in cond.FINDINGS


# ---------------------------------------------------------------------------------- graph

class Graph:
    """A DAG over (a subset of) ``VARIABLES``: ``parents[node]`` in ``VARIABLES`` order and
    ``order`` (a topological order, ties in ``VARIABLES`` order). ``edges`` maps a child to
    its parents; ``nodes`` defaults to all variables. "No Finding", when a node, is the child
    of every other finding node and takes no edges of its own."""

    def __init__(self, edges: Mapping[str, Sequence[str]], nodes: Sequence[str] | None = None):
        names = set(VARIABLES if nodes is None else (_canonical(n) for n in nodes))
        par: dict[str, set[str]] = {}
        for child, ps in edges.items():
            c = _canonical(child)
            par.setdefault(c, set()).update(_canonical(p) for p in ps)
        for c, ps in par.items():
            names.add(c)
            names.update(ps)
            if c in ps:
                raise CausalError(f"causal graph has a cycle: {c} -> {c}")
        if NO_FINDING in par or any(NO_FINDING in ps for ps in par.values()):
            raise CausalError(f"{NO_FINDING!r} takes no edges: it is always the deterministic "
                              "child of every other finding (positive iff none is positive)")
        self.nodes: tuple[str, ...] = tuple(v for v in VARIABLES if v in names)
        rank = {v: i for i, v in enumerate(VARIABLES)}
        self.parents: dict[str, tuple[str, ...]] = {
            v: tuple(sorted(par.get(v, ()), key=rank.__getitem__)) for v in self.nodes}
        if NO_FINDING in names:
            self.parents[NO_FINDING] = tuple(v for v in self.nodes
                                             if _is_finding(v) and v != NO_FINDING)
        self.order: tuple[str, ...] = self._toposort()
        self.children: dict[str, tuple[str, ...]] = {
            v: tuple(c for c in self.order if v in self.parents[c]) for v in self.nodes}

    def _toposort(self) -> tuple[str, ...]:
        done: list[str] = []
        placed: set[str] = set()
        left = list(self.nodes)
        while left:
            ready = [v for v in left if all(p in placed for p in self.parents[v])]
            if not ready:
                raise CausalError(f"causal graph has a cycle: {' -> '.join(self._cycle(left))}")
            for v in ready:
                done.append(v)
                placed.add(v)
            left = [v for v in left if v not in placed]
        return tuple(done)

    def _cycle(self, left: Sequence[str]) -> list[str]:
        # Every node left has a parent left: walk parents until one repeats.
        left_set, path, seen = set(left), [left[0]], {left[0]: 0}
        while True:
            nxt = next(p for p in self.parents[path[-1]] if p in left_set)
            if nxt in seen:
                cyc = path[seen[nxt]:] + [nxt]
                return cyc[::-1]       # parent -> child direction
            seen[nxt] = len(path)
            path.append(nxt)

    def descendants(self, nodes: Sequence[str]) -> set[str]:
        out: set[str] = set()
        stack = list(nodes)
        while stack:
            for c in self.children[stack.pop()]:
                if c not in out:
                    out.add(c)
                    stack.append(c)
        return out

    def edge_dict(self) -> dict[str, list[str]]:
        """{child: [parents]} without the implicit "No Finding" edges (JSON, ``Graph(...)``)."""
        return {v: list(ps) for v, ps in self.parents.items() if ps and v != NO_FINDING}

    def __eq__(self, other) -> bool:
        return isinstance(other, Graph) and (self.nodes, self.parents) == (other.nodes,
                                                                           other.parents)

    def __repr__(self) -> str:
        return f"Graph({len(self.nodes)} nodes, {sum(map(len, self.parents.values()))} edges)"

    @classmethod
    def default(cls) -> "Graph":
        """RadiT's graph (``DEFAULT_GRAPH``) over all variables."""
        return cls.parse(DEFAULT_GRAPH)

    @classmethod
    def parse(cls, text: str, where: str = "causal graph") -> "Graph":
        """From the text format: lines ``A, B -> C, D``; ``#`` starts a comment."""
        edges: dict[str, list[str]] = {}
        for n, raw in enumerate(text.splitlines(), 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            parts = line.split("->")
            if len(parts) != 2 or not parts[0].strip() or not parts[1].strip():
                raise CausalError(f"{where} line {n}: expected 'parent[, parent] -> "
                                  f"child[, child]', got {line!r}")
            try:
                ps = [_canonical(p) for p in parts[0].split(",") if p.strip()]
                cs = [_canonical(c) for c in parts[1].split(",") if c.strip()]
            except CausalError as e:
                raise CausalError(f"{where} line {n}: {e}") from None
            for c in cs:
                edges.setdefault(c, []).extend(ps)
        try:
            return cls(edges)
        except CausalError as e:
            raise CausalError(f"{where}: {e}") from None

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Graph":
        """From a JSON file (``{"edges": {child: [parents]}}``) or the text format."""
        path = os.fspath(path)
        try:
            with open(path) as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise CausalError(f"cannot read causal graph {path}: {e.__class__.__name__}: "
                              f"{getattr(e, 'strerror', None) or e}") from None
        if text.lstrip().startswith("{"):
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                raise CausalError(f"causal graph {path} is not valid JSON: {e}") from None
            edges = data.get("edges") if isinstance(data, dict) else None
            if not isinstance(edges, dict) or not all(
                    isinstance(ps, list) and all(isinstance(p, str) for p in ps)
                    for ps in edges.values()):
                raise CausalError(f"causal graph {path}: expected {{\"edges\": {{\"child\": "
                                  f"[\"parent\", ...]}}}}")
            try:
                return cls(edges)
            except CausalError as e:
                raise CausalError(f"causal graph {path}: {e}") from None
        return cls.parse(text, where=f"causal graph {path}")


# ---------------------------------------------------------------------------------- values

def value_index(var: str, value: Any) -> int:
    """Index of ``value`` in ``DOMAINS[var]``; ages may be years (binned) or bin names."""
    dom = DOMAINS[var]
    if var == "age" and not isinstance(value, str):
        age = float(value)
        if not math.isfinite(age) or age < 0:
            return 0
        if age >= cond.MAX_AGE:
            raise CausalError(f"age must be in [0, {cond.MAX_AGE:g}) years, got {age:g}")
        return cond.age_bin(age)
    if isinstance(value, str):
        if value in dom:
            return dom.index(value)
        low = value.strip().lower()
        alias = {"sex": _SEX_ALIASES, "view": _VIEW_ALIASES}.get(var, {})
        if _is_finding(var):
            alias = _STATE_ALIASES
        if low in alias:
            return dom.index(alias[low])
        for i, d in enumerate(dom):
            if d.lower() == low:
                return i
    raise CausalError(f"bad value {value!r} for {var}; valid: "
                      f"{', '.join(dom)}{' or years' if var == 'age' else ''}")


def _bin_years(label: str) -> float | str:
    """A representative age for a bin: its middle (the open last bin "80+": 85)."""
    i = DOMAINS["age"].index(label)
    if i == 0:
        return UNKNOWN
    lo, hi = cond.AGE_EDGES[i - 1], cond.AGE_EDGES[i]
    return lo + 5.0 if i == len(cond.AGE_EDGES) - 1 else (lo + hi) / 2.0


def parse_set(text: str) -> dict[str, str | float]:
    """``"Cardiomegaly=positive,age=30,sex=F"`` -> ``{"Cardiomegaly": "positive", "age": 30.0,
    "sex": "F"}``: the editing CLI's ``--set``. A bare finding name means positive; ages are
    years (kept exact); "unknown" cannot be set. One-line ``CausalError`` on bad names/values."""
    out: dict[str, str | float] = {}
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        name, eq, value = (x.strip() for x in item.partition("="))
        var = _canonical(name)
        if not eq:
            if not _is_finding(var):
                raise CausalError(f"--set {item!r}: give {var} a value ({var}=...)")
            value = "positive"
        if not value:
            raise CausalError(f"--set {item!r}: empty value for {var}")
        if var in out:
            raise CausalError(f"--set names {var} twice")
        if var == "age" and value.lower() != UNKNOWN and value not in DOMAINS["age"]:
            try:
                years = float(value)
            except ValueError:
                raise CausalError(f"bad value {value!r} for age; give years (e.g. age=85) or a "
                                  f"bin: {', '.join(DOMAINS['age'][1:])}") from None
            value_index("age", years)   # range check
            if years < 0:
                raise CausalError(f"age must be in [0, {cond.MAX_AGE:g}) years, got {years:g}")
            out[var] = years
            continue
        out[var] = DOMAINS[var][value_index(var, value)]
        if out[var] == UNKNOWN:
            raise CausalError(f"--set {var}={value}: an intervention sets a value; 'unknown' "
                              "is not one")
    if not out:
        raise CausalError("--set names no variable (e.g. 'Cardiomegaly=positive,age=30')")
    return out


_POLICIES = ("negative", "positive", "exclude")


def _finding_value(code: int, unmentioned: str, uncertain: str) -> int:
    """Index in FINDING_STATES of a stored finding code, -1 when missing/excluded."""
    code = int(code)
    if code == cond.POSITIVE:
        return 1
    if code == cond.NEGATIVE:
        return 0
    policy = (unmentioned if code == cond.UNMENTIONED else uncertain if code == cond.UNCERTAIN
              else "exclude")
    return {"negative": 0, "positive": 1, "exclude": -1}[policy]


def _check_policy(name: str, value: str) -> None:
    if value not in _POLICIES:
        raise CausalError(f"{name} must be one of {', '.join(_POLICIES)}, got {value!r}")


def _record_indices(meta: Mapping, nodes: Sequence[str], unmentioned: str,
                    uncertain: str) -> list[int]:
    """One record (metas dict) as value indices over ``nodes``; -1 = missing."""
    findings = meta.get("findings")
    out = []
    for v in nodes:
        if _is_finding(v):
            code = None if findings is None else findings[cond.FINDINGS.index(v)]
            out.append(-1 if code is None else _finding_value(code, unmentioned, uncertain))
        elif v == "age":
            age = meta.get("age")
            out.append(-1 if age is None else
                       0 if isinstance(age, str) and age == UNKNOWN else value_index("age", age))
        else:
            val = meta.get(v)
            out.append(-1 if val is None else value_index(v, val))
    return out


def observed_of(record: Conditions | Mapping, unmentioned: str = "negative"
                ) -> dict[str, str | None]:
    """The SCM's observation of a ``Conditions`` or a metas dict: {variable: value name, or
    None where missing (uncertain findings, not-specified groups), which abduction samples}.
    Unmentioned findings follow ``unmentioned`` ("negative", "positive" or "exclude" =
    missing)."""
    _check_policy("unmentioned", unmentioned)
    if isinstance(record, Conditions):
        record = {"findings": np.asarray(record.findings), "sex": record.sex, "age": record.age,
                  "race": record.race, "view": record.view}
    idx = _record_indices(record, VARIABLES, unmentioned, "exclude")
    return {v: (None if i < 0 else DOMAINS[v][i]) for v, i in zip(VARIABLES, idx)}


# ---------------------------------------------------------------------------------- model

@dataclasses.dataclass
class Model:
    """A fitted SCM: ``tables[node]`` is P(node | parents) as float64 [*parent sizes, K]
    (parents in ``graph.parents[node]`` order); "No Finding" has none (deterministic)."""
    graph: Graph
    tables: dict[str, np.ndarray]
    info: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        self.tables = dict(self.tables)
        for v in self.graph.nodes:
            if v == NO_FINDING:
                continue
            if v not in self.tables:
                raise CausalError(f"causal model has no table for {v}")
            t = np.asarray(self.tables[v], np.float64)
            shape = tuple(len(DOMAINS[p]) for p in self.graph.parents[v]) + (len(DOMAINS[v]),)
            if t.shape != shape:
                raise CausalError(f"table of {v} has shape {t.shape}, expected {shape} "
                                  f"(parents {', '.join(self.graph.parents[v]) or 'none'})")
            if (t < 0).any() or not np.allclose(t.sum(-1), 1.0, atol=1e-6):
                raise CausalError(f"table of {v} is not a probability table (rows must sum to 1)")
            self.tables[v] = t / t.sum(-1, keepdims=True)
        self.col = {v: i for i, v in enumerate(self.graph.nodes)}
        with np.errstate(divide="ignore"):
            self.logp = {v: np.log(t) for v, t in self.tables.items() if v in self.col}

    def save(self, path: str | os.PathLike) -> None:
        data = {"format": FORMAT, "nodes": list(self.graph.nodes),
                "edges": self.graph.edge_dict(),
                "domains": {v: list(DOMAINS[v]) for v in self.graph.nodes},
                "tables": {v: t.tolist() for v, t in self.tables.items()}, "info": self.info}
        try:
            with open(path, "w") as f:
                json.dump(data, f)
        except OSError as e:
            raise CausalError(f"cannot write causal model {path}: {e.strerror or e}") from None

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Model":
        path = os.fspath(path)
        try:
            with open(path) as f:
                data = json.load(f)
        except OSError as e:
            raise CausalError(f"cannot read causal model {path}: {e.strerror or e}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CausalError(f"causal model {path} is not valid JSON: {e}") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise CausalError(f"{path} is not a causal model file (format {FORMAT})")
        try:
            for name, dom in data["domains"].items():
                v = _canonical(name)
                if tuple(dom) != DOMAINS[v]:
                    raise CausalError(f"values of {v} differ from this cxr_rf's "
                                      f"({', '.join(DOMAINS[v])})")
            graph = Graph(data["edges"], nodes=data["nodes"])
            return cls(graph, {v: np.asarray(t, np.float64) for v, t in data["tables"].items()},
                       data.get("info", {}))
        except CausalError as e:
            raise CausalError(f"causal model {path}: {e}") from None
        except (KeyError, TypeError, ValueError) as e:
            raise CausalError(f"causal model {path} is malformed: "
                              f"{e.__class__.__name__}: {e}") from None


def fit(graph: Graph, metas: Sequence[Mapping], *, alpha: float = 1.0, prior: str = "marginal",
        unmentioned: str = "negative", uncertain: str = "exclude") -> Model:
    """P(node | parents) from a dataset's records (``ReferenceSet(...).metas``).

    Each node's table counts the records whose node and parents all have a usable value
    (see the module doc for unknown / unmentioned / uncertain), plus Dirichlet pseudo-counts:
    ``prior="uniform"`` adds ``alpha`` to every cell (Laplace); ``prior="marginal"`` (default)
    adds ``alpha * K * m_k``, m the node's own (Laplace-smoothed) marginal, so a parent
    combination the data rarely shows falls back to the node's base rate rather than to
    50/50, which matters for findings with several demographic parents. ``alpha=0``: plain
    frequencies, and a combination without records takes the marginal."""
    _check_policy("unmentioned", unmentioned)
    _check_policy("uncertain", uncertain)
    if prior not in ("uniform", "marginal"):
        raise CausalError(f"prior must be 'uniform' or 'marginal', got {prior!r}")
    if not alpha >= 0:
        raise CausalError(f"alpha must be >= 0, got {alpha!r}")
    nodes = graph.nodes
    X = np.asarray([_record_indices(m, nodes, unmentioned, uncertain) for m in metas],
                   np.int64).reshape(-1, len(nodes))
    col = {v: i for i, v in enumerate(nodes)}
    tables, used = {}, {}
    for v in nodes:
        if v == NO_FINDING:
            continue
        K = len(DOMAINS[v])
        ps = graph.parents[v]
        x = X[:, col[v]]
        known = x >= 0
        marg = np.bincount(x[known], minlength=K).astype(np.float64)
        if marg.sum() + K * alpha > 0:
            m = (marg + alpha) / (marg.sum() + K * alpha)
        else:
            m = np.full(K, 1.0 / K)
        shape = tuple(len(DOMAINS[p]) for p in ps) + (K,)
        rows = known.copy()
        for p in ps:
            rows &= X[:, col[p]] >= 0
        flat = np.zeros(int(np.prod(shape)), np.float64)
        idx = np.ravel_multi_index(tuple(X[rows, col[p]] for p in ps) + (x[rows],), shape)
        np.add.at(flat, idx, 1.0)
        counts = flat.reshape(shape)
        pseudo = alpha * (np.ones(K) if prior == "uniform" else K * m)
        t = counts + pseudo
        tot = t.sum(-1, keepdims=True)
        t = np.where(tot > 0, t / np.where(tot > 0, tot, 1.0), m)
        tables[v] = t
        used[v] = int(rows.sum())
    info = {"num_records": len(X), "alpha": float(alpha), "prior": prior,
            "unmentioned": unmentioned, "uncertain": uncertain, "records_per_table": used}
    return Model(graph, tables, info)


# ---------------------------------------------------------------------------- mechanisms

def _gumbel(rng: np.random.Generator, shape) -> np.ndarray:
    return -np.log(-np.log(rng.uniform(np.finfo(np.float64).tiny, 1.0, shape)))


def _logits(model: Model, v: str, X: np.ndarray) -> np.ndarray:
    """log P(. | parents) of ``v`` for each row of ``X`` [n, N] -> [n, K]."""
    idx = tuple(X[:, model.col[p]] for p in model.graph.parents[v])
    if not idx:
        return np.broadcast_to(model.logp[v], (len(X), len(model.logp[v])))
    return model.logp[v][idx]


def _no_finding(model: Model, X: np.ndarray) -> np.ndarray:
    ps = [model.col[p] for p in model.graph.parents[NO_FINDING]]
    return ~(X[:, ps] == 1).any(1) if ps else np.ones(len(X), bool)


def _mechanism(model: Model, v: str, X: np.ndarray, noise: Mapping[str, np.ndarray]) -> np.ndarray:
    if v == NO_FINDING:
        return _no_finding(model, X).astype(np.int64)
    return np.argmax(_logits(model, v, X) + noise[v], axis=-1)


def sample(model: Model, n: int, rng: np.random.Generator) -> np.ndarray:
    """Ancestral samples: int [n, len(graph.nodes)] value indices (columns in ``graph.nodes``)."""
    X = np.zeros((n, len(model.graph.nodes)), np.int64)
    for v in model.graph.order:
        noise = {} if v == NO_FINDING else {v: _gumbel(rng, (n, len(DOMAINS[v])))}
        X[:, model.col[v]] = _mechanism(model, v, X, noise)
    return X


def forward(model: Model, noise: Mapping[str, np.ndarray],
            do: Mapping[str, Any] | None = None) -> np.ndarray:
    """The mechanisms run with given noise ({node: [n, K]}), ``do`` variables set (their
    mechanisms cut): int [n, len(graph.nodes)] value indices."""
    doi = _do_indices(model, do) if do else {}
    n = len(next(iter(noise.values())))
    X = np.zeros((n, len(model.graph.nodes)), np.int64)
    for v in model.graph.order:
        X[:, model.col[v]] = doi[v] if v in doi else _mechanism(model, v, X, noise)
    return X


def assignment(model: Model, row: np.ndarray) -> dict[str, str]:
    """One row of value indices as {variable: value name}."""
    return {v: DOMAINS[v][int(row[model.col[v]])] for v in model.graph.nodes}


def _observed_row(model: Model, observed: Mapping[str, Any]) -> np.ndarray:
    """Observed values as indices over graph.nodes; -1 = missing. Extra keys must be variables."""
    obs = {}
    for k, val in observed.items():
        v = _canonical(k)
        if v in model.col and val is not None:
            obs[v] = value_index(v, val)
    return np.asarray([obs.get(v, -1) for v in model.graph.nodes], np.int64)


def _complete(model: Model, row: np.ndarray, rng: np.random.Generator, n: int) -> np.ndarray:
    """n full assignments: the observed row, its missing variables drawn from their exact joint
    posterior given the observed ones (enumeration). "No Finding" is always recomputed."""
    nodes = model.graph.nodes
    if NO_FINDING in model.col:
        row = row.copy()
        row[model.col[NO_FINDING]] = -1
    missing = [v for v in nodes if row[model.col[v]] < 0 and v != NO_FINDING]
    sizes = [len(DOMAINS[v]) for v in missing]
    total = int(np.prod(sizes)) if missing else 1
    if total > MAX_MISSING_CONFIGS:
        raise CausalError(f"too many unobserved variables to abduct ({', '.join(missing)}: "
                          f"{total} combinations > {MAX_MISSING_CONFIGS}); specify some of them")
    C = np.repeat(row[None], total, 0)
    if missing:
        grid = np.asarray(list(itertools.product(*[range(s) for s in sizes])), np.int64)
        for j, v in enumerate(missing):
            C[:, model.col[v]] = grid[:, j]
    if NO_FINDING in model.col:
        C[:, model.col[NO_FINDING]] = _no_finding(model, C)
    logw = np.zeros(total)
    for v in nodes:
        if v != NO_FINDING:
            logw += np.take_along_axis(_logits(model, v, C), C[:, model.col[v]][:, None], 1)[:, 0]
    if not np.isfinite(logw).any():
        bad = assignment(model, np.maximum(row, 0))
        raise CausalError("the observation has probability 0 under the causal model: "
                          + ", ".join(f"{v}={bad[v]}" for v in nodes if row[model.col[v]] >= 0))
    if total == 1:
        return np.repeat(C, n, 0)
    w = np.exp(logw - logw.max())
    return C[rng.choice(total, size=n, p=w / w.sum())]


def abduct(model: Model, observed: Mapping[str, Any], rng: np.random.Generator,
           n_samples: int = 1) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Posterior samples of the exogenous noise given ``observed`` ({variable: value}; None or
    absent = unobserved, drawn from its posterior first). Returns (X [n, N] the full factual
    assignments, {node: Gumbel noise [n, K]}); forward with that noise reproduces X exactly.

    Per node, given x = k* and its parents' logits l (normalised, so log Z = 0): the max
    perturbed logit M ~ Gumbel(log Z) belongs to k*; every other k gets a Gumbel(l_k)
    truncated below M, -log(exp(-M) + exp(-G)) with G ~ Gumbel(l_k); g = perturbed - l.
    A category of probability 0 under these parents never wins here: its noise is a prior
    draw (it matters under other parent values)."""
    X = _complete(model, _observed_row(model, observed), rng, int(n_samples))
    noise = {}
    n = len(X)
    for v in model.graph.order:
        if v == NO_FINDING:
            continue
        K = len(DOMAINS[v])
        l = _logits(model, v, X)
        k = X[:, model.col[v]]
        logz = np.logaddexp.reduce(l, axis=-1)
        top = logz + _gumbel(rng, n)
        with np.errstate(invalid="ignore"):
            G = l + _gumbel(rng, (n, K))
            trunc = -np.logaddexp(-top[:, None], -G)
        win = np.arange(K)[None] == k[:, None]
        pert = np.where(win, top[:, None], trunc)
        with np.errstate(invalid="ignore"):
            g = pert - l
        g = np.where(np.isfinite(l), g, _gumbel(rng, (n, K)))
        noise[v] = g
    return X, noise


@dataclasses.dataclass
class Counterfactual:
    """One counterfactual sample: ``factual`` and ``values`` ({variable: value name}) and
    ``changes``: [{"variable", "from", "to", "via": [changed parents, or [] when intervened],
    "path": [intervened node, ..., variable]}] in topological order."""
    factual: dict[str, str]
    values: dict[str, str]
    changes: list[dict]


def _do_indices(model: Model, do: Mapping[str, Any]) -> dict[str, int]:
    out = {}
    for k, val in do.items():
        v = _canonical(k)
        if v not in model.col:
            raise CausalError(f"cannot intervene on {v}: not in the causal graph")
        if v == NO_FINDING:
            raise CausalError(f"cannot intervene on {NO_FINDING!r}: it is determined by the other "
                              "findings; set them instead")
        i = value_index(v, val)
        if DOMAINS[v][i] == UNKNOWN:
            raise CausalError(f"cannot set {v}=unknown: an intervention sets a value")
        out[v] = i
    if not out:
        raise CausalError("an intervention needs at least one variable")
    return out


def _counterfactual_rows(model, observed, do, rng, n_samples, propagate):
    doi = _do_indices(model, do)
    X, noise = abduct(model, observed, rng, n_samples)
    Y = X.copy()
    for v, i in doi.items():
        Y[:, model.col[v]] = i
    redo = model.graph.descendants(list(doi)) if propagate else (
        {NO_FINDING} if NO_FINDING in model.col else set())
    for v in model.graph.order:
        if v in redo and v not in doi:
            Y[:, model.col[v]] = _mechanism(model, v, Y, noise)
    return doi, X, Y


def intervene(model: Model, observed: Mapping[str, Any], do: Mapping[str, Any],
              rng: np.random.Generator, n_samples: int = 1, propagate: bool = True
              ) -> list[Counterfactual]:
    """``n_samples`` counterfactuals of ``observed`` under ``do`` (each its own abduction).
    ``propagate=False``: the plain edit, only the do-variables (and the deterministic "No
    Finding") change."""
    doi, X, Y = _counterfactual_rows(model, observed, do, rng, n_samples, propagate)
    out = []
    for x, y in zip(X, Y):
        changes, path = [], {}
        for v in model.graph.order:
            c = model.col[v]
            if x[c] == y[c] and v not in doi:
                continue
            if v in doi:
                via, path[v] = [], [v]
                if x[c] == y[c]:
                    continue
            else:
                via = [p for p in model.graph.parents[v] if p in path]
                path[v] = (path[via[0]] if via else []) + [v]
            changes.append({"variable": v, "from": DOMAINS[v][x[c]], "to": DOMAINS[v][y[c]],
                            "via": via, "path": path[v]})
        out.append(Counterfactual(assignment(model, x), assignment(model, y), changes))
    return out


def counterfactual_distribution(model: Model, observed: Mapping[str, Any],
                                do: Mapping[str, Any], rng: np.random.Generator,
                                n_samples: int = 1000, propagate: bool = True) -> dict[str, dict]:
    """Over ``n_samples`` abductions: {variable: {"changed": P(value differs from the factual),
    "states": {value: P(counterfactual value)}}}."""
    _, X, Y = _counterfactual_rows(model, observed, do, rng, n_samples, propagate)
    out = {}
    for v in model.graph.nodes:
        c = model.col[v]
        freq = np.bincount(Y[:, c], minlength=len(DOMAINS[v])) / len(Y)
        out[v] = {"changed": float((X[:, c] != Y[:, c]).mean()),
                  "states": {d: float(p) for d, p in zip(DOMAINS[v], freq)}}
    return out


# -------------------------------------------------------------------- to/from Conditions

def conditions_with(conditions: Conditions, cf: Counterfactual,
                    do: Mapping[str, Any] = {}) -> Conditions:
    """``conditions`` edited to the counterfactual: findings that changed (or were set) take
    the new positive/negative code, the others keep their original code (an unmentioned
    finding that stays negative stays unmentioned); an intervened age keeps its exact years,
    one changed through the graph takes its bin's middle; sex/race/view take new values."""
    do = {_canonical(k): v for k, v in do.items()}
    findings = list(conditions.findings)
    updates: dict[str, Any] = {}
    for v, new in cf.values.items():
        if new == cf.factual.get(v) and v not in do:
            continue
        if _is_finding(v):
            findings[cond.FINDINGS.index(v)] = cond.POSITIVE if new == "positive" else cond.NEGATIVE
        elif v == "age":
            val = do.get("age", new)
            updates["age"] = (float(val) if not isinstance(val, str)
                              else _bin_years(DOMAINS["age"][value_index("age", val)]))
        else:
            updates[v] = new
    return dataclasses.replace(conditions, findings=tuple(findings), **updates)


def edit(model: Model, conditions: Conditions, do: Mapping[str, Any] | str,
         rng: np.random.Generator, propagate: bool = True,
         unmentioned: str = "negative") -> tuple[Conditions, Counterfactual]:
    """One counterfactual of ``conditions`` under ``do`` (a dict or a ``--set`` string):
    (the new Conditions, the Counterfactual with its change report)."""
    if isinstance(do, str):
        do = parse_set(do)
    cf = intervene(model, observed_of(conditions, unmentioned), do, rng, 1, propagate)[0]
    return conditions_with(conditions, cf, do), cf
