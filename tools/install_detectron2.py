#!/usr/bin/env python
"""Make ``import detectron2`` work in the current interpreter.

1. If Detectron2 is importable (e.g. the official build from source, with its compiled
   ops), it is used untouched.
2. Otherwise PyPI's ``pb1-detectron2==0.6`` (Detectron2 v0.6's Python code) is downloaded
   as source and installed with its C++ extension switched off: the source release lacks
   ``detectron2/layers/csrc``, so its own build fails, and no path of DAB-DETR needs those
   ops (``dab_detr._compat`` gives a clear error if one is called).
"""

import importlib.util
import os
import re
import subprocess
import sys
import tarfile
import tempfile

PACKAGE = "pb1-detectron2==0.6"


def pip(*args: str) -> None:
    subprocess.check_call([sys.executable, "-m", "pip", *args])


def main() -> None:
    if importlib.util.find_spec("detectron2") is not None:
        print("detectron2 is already installed; using it as it is.")
        return
    with tempfile.TemporaryDirectory() as tmp:
        # --no-build-isolation: the sdist's setup.py imports torch to read its metadata
        pip("download", "--no-deps", "--no-binary", ":all:", "--no-build-isolation", "-q",
            "-d", tmp, PACKAGE)
        (archive,) = [f for f in os.listdir(tmp) if f.endswith(".tar.gz")]
        with tarfile.open(os.path.join(tmp, archive)) as tar:
            # the "data" filter refuses links and paths out of tmp (Python >= 3.11.4)
            kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(tmp, **kwargs)
        src = os.path.join(tmp, archive[: -len(".tar.gz")])
        setup_py = os.path.join(src, "setup.py")
        text = open(setup_py).read()
        patched, n = re.subn(r"ext_modules=get_extensions\(\),", "ext_modules=[],", text)
        if n != 1:
            sys.exit(f"{setup_py}: could not find 'ext_modules=get_extensions(),' to disable")
        with open(setup_py, "w") as f:
            f.write(patched)
        pip("install", "-q", "--no-build-isolation", src)
    print(f"installed {PACKAGE} without its C++ extension")


if __name__ == "__main__":
    main()
