"""benchmarks/sass_stats.py counts the instructions of a kernel's inner loop from nvdisasm output;
the parser is checked here on a hand-written listing (the compile itself needs Triton)."""

import pytest

from tests.scripts import load_script

SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   LOP3.LUT R2, R3, 0xf000f, RZ, 0xc0, !PT ;
        /*0020*/               @P0 LDG.E.128 R4, desc[UR4][R6.64] ;
        /*0030*/                   HFMA2.MMA R2, R2, R5, RZ ;
        /*0040*/                   HFMA2 R2, R2, R5, R2 ;
        /*0050*/              @!P1 BRA `(.L_x_0) ;
.L_x_1:
        /*0060*/                   FADD R8, R8, R9 ;
        /*0070*/                   BRA `(.L_x_1) ;
        /*0080*/                   EXIT ;
"""


def _module():
    return load_script("benchmarks", "sass_stats")


def test_loop_histogram_counts_the_largest_backward_loop_with_predicated_opcodes():
    counts = _module().loop_histogram(SASS)
    assert counts == {"LOP3": 1, "LDG": 1, "HFMA2": 2, "BRA": 1}


def test_parse_sets_reads_field_values_and_names_the_bad_item():
    from dataclasses import dataclass

    @dataclass
    class LaunchConfig:
        block_n: int = 64
        split_k: int | None = 4
        pdl: bool = False

    parse = _module().parse_sets
    assert parse(["block_n=16", "split_k=None", "pdl=True"], LaunchConfig) == dict(block_n=16, split_k=None, pdl=True)
    assert parse([], LaunchConfig) == {}
    with pytest.raises(ValueError, match=r"--set blocks=3: LaunchConfig has no field 'blocks' \(fields: block_n, pdl, split_k\)"):
        parse(["blocks=3"], LaunchConfig)
    with pytest.raises(ValueError, match="--set block_n=big: the value must be an integer, True, False or None"):
        parse(["block_n=big"], LaunchConfig)
