import optuna
import pytest

from tuneforge.dsl import Problem, Space, bucket, categorical, pow2


def test_space_conditional_enumeration_and_validation():
    space = Space(categorical("strategy", ["ar", "ag"]), pow2("block_m", 16, 64),
                  categorical("chunks", [1, 2], when={"strategy": ["ag"]}))
    configs = list(space.enumerate())
    assert len(configs) == 3 + 3 * 2
    assert all(("chunks" in c) == (c["strategy"] == "ag") for c in configs)
    assert space.validate({"strategy": "ar", "block_m": 32}) == {"strategy": "ar", "block_m": 32}
    with pytest.raises(ValueError, match="not active"):
        space.validate({"strategy": "ar", "block_m": 32, "chunks": 2})
    with pytest.raises(ValueError, match="not one of"):
        space.validate({"strategy": "ar", "block_m": 48})


def test_space_sampling_through_optuna_only_asks_active_parameters():
    space = Space(categorical("strategy", ["ar", "ag"]), categorical("chunks", [1, 2], when={"strategy": ["ag"]}))
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0))
    for _ in range(12):
        t = study.ask()
        cfg = space.sample(t)
        assert set(cfg) == set(t.params)
        assert space.validate(cfg) == cfg
        study.tell(t, 1.0)


def test_problem_key_roundtrip_and_buckets():
    p = Problem.make("gemm", m=16, n=1024, k=5120)
    assert p.key == "gemm|m=16,n=1024,k=5120|bf16|w1"
    assert Problem.from_key(p.key) == p
    assert p.with_dims(m=32)["m"] == 32
    assert bucket(1) == 1 and bucket(3) == 4 and bucket(100) == 128 and bucket(10**6) == 8192
    with pytest.raises(ValueError):
        Problem.make("gemm", dtype="int3", m=1)
