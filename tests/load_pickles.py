"""Unpickling a job's objects as a worker does, recording what they need: every module a pickle refers
to (a class or function by reference, a module a function imports) and the file names of the code
objects pickled by value. Runs as a script in the fresh venv of tests/test_dataflow_jobs.py (it
imports nothing of this project itself), and is imported by that test for the local-path check.

    python load_pickles.py PICKLES.json   # [{"where": ..., "stream": base64}] -> a JSON report on stdout
"""

from __future__ import annotations

import base64
import io
import json
import pickle
import sys
import types


class RecordingUnpickler(pickle.Unpickler):
    """A pickle.Unpickler (what cloudpickle.loads is) that records the modules its globals come from,
    the modules cloudpickle's ``subimport`` imports, and the file names of the code objects it makes."""

    def __init__(self, stream: bytes):
        super().__init__(io.BytesIO(stream))
        self.modules: set[str] = set()
        self.code_files: set[str] = set()

    def _code(self, *args):
        made = types.CodeType(*args)
        self.code_files.add(made.co_filename)
        return made

    def find_class(self, module, name):
        self.modules.add(module)
        found = super().find_class(module, name)
        if found is types.CodeType:
            return self._code
        if "cloudpickle" not in module:
            return found
        if name == "_builtin_type":  # cloudpickle names CodeType through it
            return lambda type_name: self._code if type_name == "CodeType" else found(type_name)
        if name in ("subimport", "dynamic_subimport"):
            def subimport(module_name, *rest):
                self.modules.add(module_name)
                return found(module_name, *rest)
            return subimport
        return found


def load(stream: bytes) -> tuple[object, set[str], set[str]]:
    """(the object, the modules it refers to, the file names of its code objects)."""
    unpickler = RecordingUnpickler(stream)
    obj = unpickler.load()
    return obj, unpickler.modules, unpickler.code_files


def main(path: str) -> int:
    modules, failures = set(), []
    for record in json.load(open(path)):
        try:
            _, used, _ = load(base64.b64decode(record["stream"]))
            modules |= used
        except Exception as e:  # noqa: BLE001 - each failure is reported with where it was pickled
            failures.append(f"{record['where']}: {type(e).__name__}: {e}")
    files = {name: getattr(sys.modules.get(name), "__file__", None) for name in sorted(modules)}
    print(json.dumps({"modules": files, "failures": failures}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
