"""Test modules that need an optional package skip cleanly where it is missing (the GPU image has
no streamlit): collection must not stop with an error, or `pytest -m gpu` runs nothing."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# A pytest plugin that makes packages unimportable, as on a machine without them: a real import
# failure (ModuleNotFoundError from the import system), raised before any test module is imported.
BLOCKER = '''
import importlib.abc
import sys

ABSENT = {absent!r}


class _Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ABSENT:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None


for loaded in [m for m in sys.modules if m.split(".")[0] in ABSENT]:
    del sys.modules[loaded]
sys.meta_path.insert(0, _Absent())
'''


def test_dashboard_modules_skip_where_streamlit_is_missing(tmp_path):
    # as on the GPU image: streamlit absent, and optuna/sqlalchemy unless carried as wheels
    (tmp_path / "absent_packages.py").write_text(BLOCKER.format(absent=("streamlit", "optuna", "sqlalchemy")))
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                          "-p", "absent_packages", "tests/test_dashboard.py", "tests/test_dashboard_browser.py"],
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": str(tmp_path)},
                         capture_output=True, text=True, timeout=120)
    out = run.stdout + run.stderr
    # 5: no test ran (both modules skipped); a collection error exits 2
    assert run.returncode == 5, f"collection failed without streamlit (exit {run.returncode}):\n{out}"
    assert "2 skipped in" in out and "could not import 'streamlit'" in out, out
