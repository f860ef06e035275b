"""Genotype derivation, parsing and published cells."""

import os

import pytest
import torch

import genotypes as gt

NONE = gt.PRIMITIVES.index("none")


def alpha_rows(*rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_parse_ranks_edges_by_softmax_not_raw_alpha():
    n = len(gt.PRIMITIVES)
    # Edge 0 has the largest raw alpha (3.0) but it shares the mass with another op at 2.9, so
    # its largest softmax weight is smaller than edge 1's, whose 2.0 stands alone.
    e0 = [0.0] * n
    e0[gt.PRIMITIVES.index("sep_conv_3x3")] = 3.0
    e0[gt.PRIMITIVES.index("sep_conv_5x5")] = 2.9
    e1 = [0.0] * n
    e1[gt.PRIMITIVES.index("dil_conv_3x3")] = 2.0
    e2 = [0.0] * n
    e2[gt.PRIMITIVES.index("max_pool_3x3")] = 0.5
    a = alpha_rows(e0, e1, e2)
    sm = torch.softmax(a, -1)
    assert sm[1].max() > sm[0].max() and a[0].max() > a[1].max()  # the premise
    gene = gt.parse([a], k=2)
    assert gene == [[("dil_conv_3x3", 1), ("sep_conv_3x3", 0)]]


def test_parse_never_picks_none_even_when_it_dominates():
    n = len(gt.PRIMITIVES)
    rows = []
    for j in range(3):
        r = [0.0] * n
        r[NONE] = 10.0
        r[gt.PRIMITIVES.index("avg_pool_3x3")] = 0.1 * j
        rows.append(r)
    gene = gt.parse([alpha_rows(*rows)], k=2)
    assert all(op != "none" for op, _ in gene[0])
    assert [i for _, i in gene[0]] == [2, 1]


def test_round_trip_of_printed_form():
    torch.manual_seed(0)
    alpha = [torch.randn(2 + i, len(gt.PRIMITIVES)) for i in range(4)]
    g = gt.Genotype(
        normal=gt.parse(alpha),
        normal_concat=range(2, 6),
        reduce=gt.parse([-a for a in alpha]),
        reduce_concat=range(2, 6),
    )
    s = gt.to_str(g)
    assert s.startswith("Genotype(normal=[[(")
    assert "normal_concat=range(2, 6)" in s
    assert gt.from_str(s) == g
    assert gt.to_str(gt.from_str(s)) == s


def test_published_genotypes_by_name_and_both_forms():
    assert gt.from_str("DARTS_V2") is gt.DARTS_V2
    assert gt.from_str("DARTS") == gt.DARTS_V2
    assert gt.DARTS_V1 != gt.DARTS_V2
    for g in (gt.DARTS_V1, gt.DARTS_V2):
        assert gt.from_str(gt.to_str(g)) == g  # nested form equals the flat form it came from
    assert gt.DARTS_V2.normal[3] == [("skip_connect", 0), ("dil_conv_3x3", 2)]
    assert list(gt.DARTS_V2.reduce_concat) == [2, 3, 4, 5]


def test_load_from_file(tmp_path):
    path = tmp_path / "genotype.txt"
    path.write_text(gt.to_str(gt.DARTS_V1) + "\n")
    assert gt.load(str(path)) == gt.DARTS_V1
    bad = tmp_path / "bad.txt"
    bad.write_text("hello")
    with pytest.raises(gt.GenotypeError, match="bad.txt"):
        gt.load(str(bad))


V2 = gt.to_str(gt.DARTS_V2)


@pytest.mark.parametrize(
    "text, message",
    [
        (V2.replace("sep_conv_3x3", "sep_conv_9x9", 1), "unknown op 'sep_conv_9x9'"),
        (V2.replace("('dil_conv_3x3', 2)", "('dil_conv_3x3', 5)"), "node index out of range"),
        (V2.replace("('dil_conv_3x3', 2)", "('dil_conv_3x3', -1)"), "expected an integer"),
        (
            gt._PUBLISHED["DARTS_V2"].replace(", ('dil_conv_3x3', 2)]", "]", 1),
            "wrong number of nodes",
        ),
        (V2.replace("normal_concat=range(2, 6)", "normal_concat=range(2, 9)"), "does not fit"),
        (V2.replace("('sep_conv_3x3', 0)", "('none', 0)", 1), "'none' cannot be an edge"),
        ("hello world", "not a genotype"),
        ("Genotype(normal=[], normal_concat=[2], reduce=[], reduce_concat=[2])", "non-empty"),
        ("Genotype(normal=[[('sep_conv_3x3', 0)]])", "missing normal_concat"),
        ("[1, 2, 3]", "not a genotype"),
        (V2.replace("range(2, 6)", "list(range(2, 6))", 1), "range(a, b) or a list"),
    ],
)
def test_malformed_genotypes_name_the_problem(text, message):
    with pytest.raises(gt.GenotypeError) as e:
        gt.from_str(text)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "payload",
    [
        "__import__('os').system('touch PWNED')",
        "Genotype(normal=__import__('os').system('touch PWNED'), normal_concat=[2], "
        "reduce=[[('skip_connect', 0)]], reduce_concat=[2])",
        "Genotype(normal=[[(open('PWNED', 'w').write('x') and 'skip_connect', 0)]], "
        "normal_concat=[2], reduce=[[('skip_connect', 0)]], reduce_concat=[2])",
    ],
)
def test_code_in_a_genotype_string_never_runs(payload, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(gt.GenotypeError):
        gt.from_str(payload)
    assert not os.path.exists(tmp_path / "PWNED")
