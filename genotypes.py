"""Genotypes: the discrete cells DARTS derives, their schema, parser and published examples.

Schema (defined here once, used everywhere):

* A cell has two input nodes, index 0 (output of cell k-2) and 1 (output of cell k-1), and
  ``n_nodes`` intermediate nodes with indices 2 .. n_nodes + 1.
* ``Genotype.normal`` / ``Genotype.reduce`` hold one list per intermediate node; each list holds
  ``(op_name, input_index)`` pairs, with ``input_index`` < the node's own index.
* ``normal_concat`` / ``reduce_concat`` are the node indices whose outputs are concatenated into
  the cell output (``range(2, 6)`` in DARTS).

Strings are parsed by :func:`from_str`, which walks the syntax tree of a restricted literal form;
nothing the user writes is ever evaluated as Python.
"""

from __future__ import annotations

import ast
import keyword
import os
import re
from collections import namedtuple
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F

from utils import UserError

Genotype = namedtuple("Genotype", "normal normal_concat reduce reduce_concat")

# The eight operations of DARTS (paper, section 3.1). The order fixes the columns of the alphas.
PRIMITIVES: list[str] = [
    "max_pool_3x3",
    "avg_pool_3x3",
    "skip_connect",  # identity (FactorizedReduce at stride 2)
    "sep_conv_3x3",
    "sep_conv_5x5",
    "dil_conv_3x3",
    "dil_conv_5x5",
    "none",
]

N_INPUT_NODES = 2

# Bounds on what a genotype may describe, checked before anything is built from the input, so
# that no string can exhaust memory or time (parsing any accepted string takes milliseconds and
# a few MB). All are generous: DARTS cells have 4 nodes of 2 inputs each, in about 500 characters.
MAX_NODES = 64  # intermediate nodes per cell; also the length of a concat range or list
MAX_INPUTS = 64  # (op, input) pairs per node
MAX_CHARS = 20_000  # a genotype string or file; ~3x the nested form of a 64-node DARTS cell
MAX_INT = 2**63  # |integer| in a genotype: larger ones are refused before they are printed
MAX_DEPTH = 8  # brackets: DARTS' nested form needs 4 (Genotype( [ [ ( )

# The tokens a genotype literal is made of. Anything else (operators, f-strings and other
# prefixed strings, escapes, attribute access, ...) is refused by :func:`_scan` before
# ``ast.parse`` sees it: with only these tokens and bounded nesting, parsing is linear in the
# length, so the worst string within MAX_CHARS costs what a long genotype costs.
_TOKEN = re.compile(
    "|".join(
        [
            r"\s+",
            r"[A-Za-z_][A-Za-z0-9_]*+(?!['\"])",  # a name not followed by a quote: no prefix
            r"-?(?:0[xXoObB][0-9a-fA-F_]++|[0-9][0-9_]*+)(?![A-Za-z0-9_'\"])",  # an integer
            r"'[^'\\\n]*+'",  # a string without escapes
            r'"[^"\\\n]*+"',
            r"[()\[\],=]",
        ]
    )
)


class GenotypeError(UserError, ValueError):
    """A genotype that cannot be parsed or does not describe a valid cell (one-line message)."""


def _concat(indices: Sequence[int]) -> range | list[int]:
    """Canonical concat: ``range`` when contiguous (as DARTS prints it), else a list."""
    idx = list(indices)
    if idx and idx == list(range(idx[0], idx[-1] + 1)):
        return range(idx[0], idx[-1] + 1)
    return idx


def parse(alpha: Iterable[torch.Tensor], k: int = 2) -> list[list[tuple[str, int]]]:
    """Derive the discrete cell from the alphas of one cell type (paper, section 2.4).

    ``alpha[i]`` has shape (2 + i, n_ops): one row per incoming edge of intermediate node i.
    Each edge is scored by its largest *softmax* weight among the non-``none`` operations, the
    top ``k`` edges are kept and each keeps that strongest op. (Ranking by raw alphas, as one
    earlier implementation does, is wrong: softmax weights are what the supernet mixes.)
    """
    none_idx = PRIMITIVES.index("none")
    gene = []
    for edges in alpha:
        weights = F.softmax(edges.detach().float(), dim=-1)
        weights[:, none_idx] = -1.0  # never pick `none`
        op_w, op_idx = weights.max(dim=-1)  # (n_edges,)
        top = torch.topk(op_w, min(k, len(op_w))).indices.tolist()
        gene.append([(PRIMITIVES[op_idx[e]], int(e)) for e in top])
    return gene


def parse_max_skip(
    alpha: Iterable[torch.Tensor], max_skip: int, k: int = 2
) -> tuple[list[list[tuple[str, int]]], int]:
    """:func:`parse` with at most ``max_skip`` skip-connects in the cell (P-DARTS, Chen et al.
    2019; DARTS.md section 9). Where :func:`parse` keeps more, the ``max_skip`` with the largest
    softmax weight stay; each node that loses one takes instead its next-best (input, op) pair
    by softmax weight among the inputs it does not use yet, other than ``none`` and
    ``skip_connect``. Returns the cell and the number of skip-connects replaced (0: the cell is
    :func:`parse`'s)."""
    alpha = [a.detach().float() for a in alpha]
    gene = parse(alpha, k)
    skip = PRIMITIVES.index("skip_connect")
    weights = [F.softmax(a, dim=-1) for a in alpha]  # (2 + i, n_ops) per node i
    # (softmax weight, node, position in the node) of every skip-connect the cell keeps
    skips = [
        (float(weights[n][e, skip]), n, j)
        for n, node in enumerate(gene)
        for j, (op, e) in enumerate(node)
        if op == "skip_connect"
    ]
    if len(skips) <= max_skip:
        return gene, 0
    skips.sort(key=lambda s: -s[0])  # strongest first; ties keep the node order (stable)
    banned = [PRIMITIVES.index("none"), skip]
    for _, n, j in skips[max_skip:]:
        w = weights[n].clone()
        w[:, banned] = -1.0
        for pos, (_, e) in enumerate(gene[n]):
            if pos != j:
                w[e] = -1.0  # an input the node already uses
        flat = int(torch.argmax(w))  # row-major: (input, op)
        e, op = divmod(flat, w.shape[1])
        gene[n][j] = (PRIMITIVES[op], e)
    return gene, len(skips) - max_skip


def to_str(genotype: Genotype) -> str:
    """The nested one-line form the search prints and :func:`from_str` reads back."""
    return repr(canonical(genotype))


def canonical(genotype: Genotype) -> Genotype:
    """Lists of lists of (str, int) tuples, concat as range when contiguous."""
    return Genotype(
        normal=[[(str(op), int(i)) for op, i in node] for node in genotype.normal],
        normal_concat=_concat(genotype.normal_concat),
        reduce=[[(str(op), int(i)) for op, i in node] for node in genotype.reduce],
        reduce_concat=_concat(genotype.reduce_concat),
    )


# --------------------------------------------------------------------------------------------
# Strict parsing
# --------------------------------------------------------------------------------------------
_FIELDS = Genotype._fields


def _token(node: ast.AST, src: str) -> str:
    token = ast.get_source_segment(src, node) or type(node).__name__
    return token if len(token) <= 60 else token[:57] + "..."


def _bad(node: ast.AST, src: str, why: str) -> GenotypeError:
    return GenotypeError(f"{why}: {_token(node, src)!r}")


def _at_most(node: ast.AST, src: str, field: str, n: int, limit: int, what: str) -> None:
    """Refuse a list or range of ``n`` elements, before it is built, if ``n`` > ``limit``."""
    if n > limit:
        raise GenotypeError(f"{field} {_token(node, src)} has {n} elements; {what}")


def _literal_int(node: ast.AST, src: str) -> int:
    if isinstance(node, ast.Constant) and type(node.value) is int:
        if abs(node.value) > MAX_INT:
            raise _bad(node, src, "integer too large")
        return node.value
    raise _bad(node, src, "expected an integer")


def _pair(node: ast.AST, src: str) -> tuple[str, int]:
    if not (isinstance(node, (ast.Tuple, ast.List)) and len(node.elts) == 2):
        raise _bad(node, src, "expected an (op, input) pair")
    op_node, idx_node = node.elts
    if not (isinstance(op_node, ast.Constant) and isinstance(op_node.value, str)):
        raise _bad(op_node, src, "expected an op name in quotes")
    return op_node.value, _literal_int(idx_node, src)


def _cell(node: ast.AST, src: str, field: str) -> list[list[tuple[str, int]]]:
    """Nested form (a list per node) or the authors' flat form (two pairs per node)."""
    if not isinstance(node, (ast.List, ast.Tuple)) or not node.elts:
        raise _bad(node, src, f"{field} must be a non-empty list")
    cell = f"a cell has at most {MAX_NODES} nodes"
    _at_most(node, src, field, len(node.elts), 2 * MAX_NODES, f"{cell} (flat form: 2 pairs each)")
    nested = [
        isinstance(e, (ast.List, ast.Tuple))
        and e.elts
        and isinstance(e.elts[0], (ast.List, ast.Tuple))
        for e in node.elts
    ]
    if all(nested):
        nodes: list[ast.List | ast.Tuple] = node.elts  # type: ignore[assignment]
        _at_most(node, src, field, len(nodes), MAX_NODES, cell)
        for n in nodes:
            what = f"a node has at most {MAX_INPUTS} inputs"
            _at_most(n, src, f"{field} node", len(n.elts), MAX_INPUTS, what)
        return [[_pair(p, src) for p in n.elts] for n in nodes]
    if any(nested):
        raise GenotypeError(f"{field} mixes the nested and the flat form")
    pairs = [_pair(p, src) for p in node.elts]
    if len(pairs) % 2:
        raise GenotypeError(
            f"wrong number of nodes: the flat form of {field} needs two pairs per node, "
            f"got {len(pairs)} pairs"
        )
    return [pairs[i : i + 2] for i in range(0, len(pairs), 2)]


def _concat_node(node: ast.AST, src: str, field: str) -> list[int]:
    cell = f"a cell has at most {MAX_NODES} nodes"
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == "range"
        and not node.keywords
        and 1 <= len(node.args) <= 2
    ):
        bounds = [_literal_int(a, src) for a in node.args]
        start, stop = (0, *bounds) if len(bounds) == 1 else bounds
        _at_most(node, src, field, max(0, stop - start), MAX_NODES, cell)
        return list(range(start, stop))
    if isinstance(node, (ast.List, ast.Tuple)):
        _at_most(node, src, field, len(node.elts), MAX_NODES, cell)
        return [_literal_int(e, src) for e in node.elts]
    raise _bad(node, src, f"{field} must be range(a, b) or a list of integers")


def validate(genotype: Genotype) -> Genotype:
    """Check ops, input indices and concat; return the canonical genotype."""
    for field in ("normal", "reduce"):
        nodes = getattr(genotype, field)
        if not nodes:
            raise GenotypeError(f"wrong number of nodes: {field} has no nodes")
        if len(nodes) > MAX_NODES:
            raise GenotypeError(
                f"wrong number of nodes: {field} has {len(nodes)}; a cell has at most {MAX_NODES}"
            )
        for i, node in enumerate(nodes):
            node_id = N_INPUT_NODES + i
            if not node:
                raise GenotypeError(f"{field} node {node_id} has no inputs")
            if len(node) > MAX_INPUTS:
                raise GenotypeError(
                    f"{field} node {node_id} has {len(node)} inputs; a node has at most "
                    f"{MAX_INPUTS}"
                )
            for op, src in node:
                if op not in PRIMITIVES:
                    raise GenotypeError(
                        f"unknown op {op!r} in {field} (known: {', '.join(PRIMITIVES[:-1])})"
                    )
                if op == "none":
                    raise GenotypeError(f"op 'none' cannot be an edge of a discrete {field} cell")
                if not 0 <= src < node_id:
                    raise GenotypeError(
                        f"node index out of range: {field} node {node_id} takes input {src}, "
                        f"which must be in 0..{node_id - 1}"
                    )
        concat = list(getattr(genotype, field + "_concat"))
        last = N_INPUT_NODES + len(nodes) - 1
        if (
            not concat
            or len(set(concat)) != len(concat)
            or not all(N_INPUT_NODES <= c <= last for c in concat)
        ):
            raise GenotypeError(
                f"{field}_concat {concat} does not fit a cell with {len(nodes)} nodes "
                f"(indices must be distinct and in {N_INPUT_NODES}..{last})"
            )
    return canonical(genotype)


def from_str(s: str) -> Genotype:
    """Parse ``Genotype(normal=..., normal_concat=..., reduce=..., reduce_concat=...)``.

    Accepts the nested form the search prints and the authors' flat form, or a published name
    (``DARTS_V1``, ``DARTS_V2``, ``DARTS``). Raises :class:`GenotypeError` naming the bad token,
    for any input: its size is bounded (``MAX_CHARS``, ``MAX_NODES``, ``MAX_INPUTS``) before
    anything is built from it, and input nested too deeply for the parser is refused.
    """
    s = s.strip()
    if s in NAMED:
        return NAMED[s]
    if len(s) > MAX_CHARS:
        raise GenotypeError(
            f"not a genotype: {len(s)} characters, at most {MAX_CHARS}: {s[:40]!r}..."
        )
    try:
        return _from_tree(s)
    except GenotypeError:
        raise
    except SyntaxError as e:
        where = f" at column {e.offset}" if e.offset else ""
        raise GenotypeError(f"not a genotype (syntax error{where}): {s[:60]!r}") from None
    except (RecursionError, MemoryError):  # the parser's stack, on input nested too deeply
        raise GenotypeError(
            f"not a genotype (nested too deeply or too large): {s[:60]!r}"
        ) from None
    except ValueError:  # e.g. a lone surrogate: bytes of the command line that are not UTF-8
        raise GenotypeError(f"not a genotype (not valid text): {s[:60]!r}") from None


def _scan(s: str) -> None:
    """Refuse, in one linear pass, any text that is not made of a genotype's literal tokens or
    nests brackets deeper than MAX_DEPTH, so that ``ast.parse`` only ever sees text it parses in
    linear time (operator chains, f-strings and deep nesting make it superlinear or recursive)."""
    try:
        s.encode()
    except UnicodeEncodeError:  # a lone surrogate: bytes of the command line that are not UTF-8
        raise GenotypeError(f"not a genotype (not valid text): {s[:60]!r}") from None
    pos = depth = 0
    last = ""  # the last token that is not whitespace
    while pos < len(s):
        m = _TOKEN.match(s, pos)
        if (
            m is None
            or (last in (")", "]") and s[pos] in "([")  # no call or index chains
            or keyword.iskeyword(m.group())  # no `not not ...`, `lambda`, `if` ...
        ):
            raise GenotypeError(
                f"not a genotype (unexpected {s[pos : pos + 10]!r} at column {pos + 1}): {s[:60]!r}"
            )
        char = s[pos]
        if char in "([":
            depth += 1
            if depth > MAX_DEPTH:
                raise GenotypeError(
                    f"not a genotype (brackets nested deeper than {MAX_DEPTH}): {s[:60]!r}"
                )
        elif char in ")]":
            depth -= 1
        if not char.isspace():
            last = char
        pos = m.end()


def _from_tree(s: str) -> Genotype:
    """:func:`from_str` proper: parse ``s`` and walk its tree (a few fixed levels deep)."""
    _scan(s)
    tree = ast.parse(s, mode="eval").body
    if not (
        isinstance(tree, ast.Call)
        and isinstance(tree.func, ast.Name)
        and tree.func.id == "Genotype"
    ):
        raise _bad(
            tree,
            s,
            f"not a genotype (expected Genotype(normal=..., ...) or one of {', '.join(NAMED)})",
        )
    if tree.args:
        raise _bad(tree.args[0], s, "use keyword arguments normal=, normal_concat=, ...")
    given = {kw.arg: kw.value for kw in tree.keywords}
    unknown = [k for k in given if k not in _FIELDS]
    missing = [k for k in _FIELDS if k not in given]
    if unknown or None in given:
        raise GenotypeError(f"unknown Genotype field {unknown[0] if unknown else '**'!r}")
    if missing:
        raise GenotypeError(f"Genotype is missing {', '.join(missing)}")
    g = Genotype(
        normal=_cell(given["normal"], s, "normal"),
        normal_concat=_concat_node(given["normal_concat"], s, "normal_concat"),
        reduce=_cell(given["reduce"], s, "reduce"),
        reduce_concat=_concat_node(given["reduce_concat"], s, "reduce_concat"),
    )
    return validate(g)


def load(arg: str) -> Genotype:
    """``--genotype`` value: a published name, the path of a genotype file, or a string."""
    if arg.strip() in NAMED:
        return NAMED[arg.strip()]
    if os.path.isfile(arg):
        try:
            with open(arg) as f:
                text = f.read(MAX_CHARS + 1)  # never more: the file may be huge
        except OSError as e:
            raise GenotypeError(f"cannot read genotype file {arg}: {e.strerror}") from None
        except UnicodeDecodeError:
            raise GenotypeError(f"cannot read genotype file {arg}: not a text file") from None
        if len(text) > MAX_CHARS:
            raise GenotypeError(f"{arg}: not a genotype: over {MAX_CHARS} characters")
        try:
            return from_str(text)
        except GenotypeError as e:
            raise GenotypeError(f"{arg}: {e}") from None
    return from_str(arg)


# --------------------------------------------------------------------------------------------
# Published cells (the authors' flat form, as in the paper's code release)
# --------------------------------------------------------------------------------------------
_PUBLISHED = {
    "DARTS_V1": "Genotype(normal=[('sep_conv_3x3', 1), ('sep_conv_3x3', 0), ('skip_connect', 0), "
    "('sep_conv_3x3', 1), ('skip_connect', 0), ('sep_conv_3x3', 1), "
    "('sep_conv_3x3', 0), ('skip_connect', 2)], normal_concat=[2, 3, 4, 5], "
    "reduce=[('max_pool_3x3', 0), ('max_pool_3x3', 1), ('skip_connect', 2), "
    "('max_pool_3x3', 0), ('max_pool_3x3', 0), ('skip_connect', 2), "
    "('skip_connect', 2), ('avg_pool_3x3', 0)], reduce_concat=[2, 3, 4, 5])",
    "DARTS_V2": "Genotype(normal=[('sep_conv_3x3', 0), ('sep_conv_3x3', 1), ('sep_conv_3x3', 0), "
    "('sep_conv_3x3', 1), ('sep_conv_3x3', 1), ('skip_connect', 0), "
    "('skip_connect', 0), ('dil_conv_3x3', 2)], normal_concat=[2, 3, 4, 5], "
    "reduce=[('max_pool_3x3', 0), ('max_pool_3x3', 1), ('skip_connect', 2), "
    "('max_pool_3x3', 1), ('max_pool_3x3', 0), ('skip_connect', 2), "
    "('skip_connect', 2), ('max_pool_3x3', 1)], reduce_concat=[2, 3, 4, 5])",
}
NAMED: dict[str, Genotype] = {}
NAMED.update({name: from_str(s) for name, s in _PUBLISHED.items()})
NAMED["DARTS"] = NAMED["DARTS_V2"]
DARTS_V1 = NAMED["DARTS_V1"]
DARTS_V2 = NAMED["DARTS_V2"]
DARTS = DARTS_V2
