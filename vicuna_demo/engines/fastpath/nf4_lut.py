"""Decoding eight 4-bit indices at once with byte permutes: the PTX that our NF4 GEMV runs per 32-bit word.

A 4-bit weight's value is ``code[index] * absmax``: a lookup in a 16-entry table. Done as a memory load per
value, the lookup, not memory, bounded our kernels. Here the table lives in the instruction stream instead:
its 16 half-precision values are 32 bytes, four 32-bit words of low bytes and four of high bytes, and the
GPU's byte-permute instruction (``prmt``: pick 4 bytes out of two words, each by a 3-bit selector) looks up
4 indices at once in one half of the table. One word of bitsandbytes' packed weights holds 8 indices; per
half-word: 4 permutes for the two table halves' low and high bytes, 2 to pick the half by each index's top
bit, 2 to interleave low and high bytes into fp16 pairs, then conversion to fp32 (about 5 instructions a
value, against a load each).

bitsandbytes packs two indices a byte, the first in the high nibble, so a little-endian word's nibbles,
lowest first, are elements 1, 0, 3, 2, 5, 4, 7, 6 of its 8.

The program is a list of operations (``program``), rendered once as PTX for Triton's
``inline_asm_elementwise`` (``ptx``); tests/test_quantized.py runs the same list in a NumPy emulation of the
instructions, which is how the selectors are checked without a GPU. The table values are rounded to fp16 (relative
error at most 2**-11, the rounding a de-quantized fp16 copy of the weight has anyway).
"""

from __future__ import annotations

import numpy as np

# element of the word (0-7) that each (half, nibble) decodes to
_ELEMENT = {(0, 0): 1, (0, 1): 0, (0, 2): 3, (0, 3): 2, (1, 0): 5, (1, 1): 4, (1, 2): 7, (1, 3): 6}


def table_words(code) -> list[int]:
    """The 16 table values as fp16, split into 4 words of low bytes and 4 of high bytes (index order)."""
    bits = np.asarray(code, dtype=np.float32).astype(np.float16).view(np.uint16).astype(np.uint32)
    assert bits.shape == (16,), "a 4-bit table has 16 values"
    lo, hi = bits & 0xFF, bits >> 8
    pack = lambda b: [int(b[i] | (b[i + 1] << 8) | (b[i + 2] << 16) | (b[i + 3] << 24)) for i in range(0, 16, 4)]  # noqa: E731
    return pack(lo) + pack(hi)


def program(code) -> list[tuple]:
    """(op, destination, sources...) over 32-bit registers; "$8" is the packed word, "$0".."$7" the outputs
    (fp32 bit patterns of elements 0-7)."""
    t = table_words(code)
    ops: list[tuple] = [("mov", f"t{i}", t[i]) for i in range(8)]
    for half in (0, 1):
        w = "$8"
        if half:
            ops.append(("shr", "w1", "$8", 16))
            w = "w1"
        ops += [("and", "c", w, 0x7777),                 # each index's low 3 bits: the byte within a table half
                ("shr", "s", w, 1), ("and", "s", "s", 0x4444), ("or", "s", "s", 0x3210),   # top bit: which half
                ("prmt", "la", "t0", "t1", "c"), ("prmt", "lb", "t2", "t3", "c"),        # low bytes, halves 0 / 1
                ("prmt", "ha", "t4", "t5", "c"), ("prmt", "hb", "t6", "t7", "c"),        # high bytes
                ("prmt", "lo", "la", "lb", "s"), ("prmt", "hi", "ha", "hb", "s"),
                ("prmt", "p01", "lo", "hi", 0x5140), ("prmt", "p23", "lo", "hi", 0x7362)]
        for pair, (first, second) in (("p01", (0, 1)), ("p23", (2, 3))):
            ops.append(("f16x2_to_f32", f"${_ELEMENT[(half, first)]}", f"${_ELEMENT[(half, second)]}", pair))
    return ops


def ptx(code, half: bool = False) -> str:
    """The program as one PTX block for ``tl.inline_asm_elementwise`` (8 fp32 outputs, 1 int32 input); with
    ``half``, 8 fp16 outputs (the pairs are split, not converted: 8 instructions a word fewer)."""
    regs = ["t0", "t1", "t2", "t3", "t4", "t5", "t6", "t7", "w1", "c", "s", "la", "lb", "ha", "hb", "lo", "hi",
            "p01", "p23"]
    name = lambda r: r if r.startswith("$") else f"%nf4_{r}"    # noqa: E731 (names clash with nothing of Triton's)
    arg = lambda a: name(a) if isinstance(a, str) else f"0x{a:08x}"   # noqa: E731
    lines = ["{", ".reg .b32 " + ", ".join(name(r) for r in regs) + ";", ".reg .b16 %nf4_h0, %nf4_h1;"]
    for op, dst, *src in program(code):
        if op == "mov":
            lines.append(f"mov.b32 {name(dst)}, {arg(src[0])};")
        elif op == "shr":
            lines.append(f"shr.u32 {name(dst)}, {arg(src[0])}, {src[1]};")
        elif op in ("and", "or"):
            lines.append(f"{op}.b32 {name(dst)}, {arg(src[0])}, {arg(src[1])};")
        elif op == "prmt":
            lines.append(f"prmt.b32 {name(dst)}, {arg(src[0])}, {arg(src[1])}, {arg(src[2])};")
        elif op == "f16x2_to_f32" and half:      # low half -> dst, high half -> src[0], as fp16
            lines.append(f"mov.b32 {{{name(dst)}, {name(src[0])}}}, {name(src[1])};")
        elif op == "f16x2_to_f32":       # low half -> dst, high half -> src[0]
            lines += [f"mov.b32 {{%nf4_h0, %nf4_h1}}, {name(src[1])};", f"cvt.f32.f16 {name(dst)}, %nf4_h0;",
                      f"cvt.f32.f16 {name(src[0])}, %nf4_h1;"]
    lines.append("}")
    return "\n".join(lines)
