"""The template DSL: spaces, problems, templates, the checker (and, for communication, the heap)."""
from tuneforge.dsl.problem import DEFAULT_BUCKETS, DTYPES, Problem, bucket, canonical_config
from tuneforge.dsl.space import Param, Space, categorical, integer, pow2
from tuneforge.dsl.template import Template, all_templates, get, register
from tuneforge.dsl.check import CheckResult, check, compare, poison

__all__ = ["DEFAULT_BUCKETS", "DTYPES", "Problem", "bucket", "canonical_config", "Param", "Space",
           "categorical", "integer", "pow2", "Template", "all_templates", "get", "register",
           "CheckResult", "check", "compare", "poison"]
