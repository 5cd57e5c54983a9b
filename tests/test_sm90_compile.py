"""Kernels that no GPU has run yet still compile for Hopper (conftest.compile_for_sm90): catches what
the interpreter forgives (constexpr branches binding different types, non-constexpr globals, ...)."""
from conftest import compile_for_sm90


def test_the_collective_kernel_compiles_for_sm90_in_every_kind():
    from tuneforge.kernels import _collective as C
    types = dict(x="*bf16", out="*bf16", stage="*bf16", slot_elems="i64", bases="*i64", flags="*i64",
                 state="*i64", max_spins="i64")
    compile_for_sm90("tuneforge.kernels._collective",
                     [("collective_kernel", dict(KIND=k.value, PUSH=k.value % 2 == 0, BLOCK=1024))
                      for k in (C.ALLGATHER, C.REDUCESCATTER, C.ONE_SHOT, C.TWO_SHOT)], types)
