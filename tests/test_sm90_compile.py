"""Kernels that no GPU has run yet still compile for Hopper: each is compiled for sm_90 through
triton.compile on a GPU target (PTX and cubin from the ptxas Triton ships), in a subprocess, since
`import tuneforge` here runs kernels in the interpreter. Catches what the interpreter forgives
(constexpr branches binding different types, non-constexpr ternaries over pointers, ...)."""
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent('''
    import os
    os.environ["TRITON_INTERPRET"] = "0"
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from tuneforge.kernels import _collective as C

    fn = C.collective_kernel
    types = dict(x="*bf16", out="*bf16", stage="*bf16", slot_elems="i64", m="i32", n="i32", bases="*i64",
                 flags="*i64", state="*i64", rank="i32", world="i32", max_spins="i64")
    for kind in (C.ALLGATHER, C.REDUCESCATTER, C.ONE_SHOT, C.TWO_SHOT):
        consts = dict(KIND=kind.value, PUSH=kind.value % 2 == 0, BLOCK=1024)
        sig = {a: "constexpr" if a in consts else types[a] for a in fn.arg_names}
        compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts),
                                  target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4))
        assert compiled.asm["cubin"], kind
        print("compiled", kind.value)
''')


def test_the_collective_kernel_compiles_for_sm90_in_every_kind():
    pytest.importorskip("triton.backends.nvidia")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == ["compiled", "0", "compiled", "1", "compiled", "2", "compiled", "3"]
