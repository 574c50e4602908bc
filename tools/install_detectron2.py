#!/usr/bin/env python
"""Make ``import detectron2`` work in the current interpreter.

1. If Detectron2 is importable (e.g. the official build from source, with its compiled
   ops), it is used untouched.
2. Otherwise PyPI's ``pb1-detectron2==0.6`` (Detectron2 v0.6's Python code) is downloaded
   as source and installed with its C++ extension switched off: the source release lacks
   ``detectron2/layers/csrc``, so its own build fails, and no path of DAB-DETR needs those
   ops (``dab_detr._compat`` gives a clear error if one is called).

The source archive is pinned by its sha256: pip refuses another one before running any of its
code (``--require-hashes``), and the archive is checked again before it is unpacked, so a
changed upload (or a mirror serving another file) is refused with an error saying what to do.
"""

import hashlib
import importlib.util
import os
import re
import subprocess
import sys
import tarfile
import tempfile

PACKAGE = "pb1-detectron2==0.6"
# sha256 of pb1-detectron2-0.6.tar.gz as PyPI has served it since its upload on 2022-09-29
SHA256 = "5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29"
WHAT_TO_DO = (
    "Refusing to install it. If you trust the new archive (compare it with Detectron2 v0.6's "
    "source), put its sha256 in SHA256 in tools/install_detectron2.py; or install the official "
    "Detectron2 (https://detectron2.readthedocs.io/en/latest/tutorials/install.html), which is "
    "then used as it is."
)


class ArchiveMismatch(RuntimeError):
    """The downloaded archive is not the pinned one."""


def pip(*args: str) -> None:
    subprocess.check_call([sys.executable, "-m", "pip", *args])


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_archive(path: str) -> None:
    """Raise :class:`ArchiveMismatch` unless ``path`` has the pinned sha256 (``SHA256``)."""
    actual = sha256_of(path)
    if actual != SHA256:
        raise ArchiveMismatch(
            f"{path}: sha256 {actual}, but {PACKAGE} is pinned at sha256 {SHA256}: this is not "
            f"the archive DAB-DETR was tested with. {WHAT_TO_DO}"
        )


def download(dest: str) -> str:
    """Download the pinned source archive into ``dest``, check it; returns its path."""
    requirement = os.path.join(dest, "requirement.txt")
    with open(requirement, "w") as f:
        f.write(f"{PACKAGE} --hash=sha256:{SHA256}\n")
    try:
        # --no-build-isolation: the sdist's setup.py imports torch to read its metadata; pip
        # checks the hash before running it
        pip("download", "--no-deps", "--no-binary", ":all:", "--no-build-isolation",
            "--require-hashes", "-q", "-d", dest, "-r", requirement)
    except subprocess.CalledProcessError as e:
        sys.exit(
            f"pip could not download {PACKAGE} (exit status {e.returncode}; its message is "
            "above). If it says THESE PACKAGES DO NOT MATCH THE HASHES, the archive the index "
            f"serves is not the one pinned here (sha256 {SHA256}). {WHAT_TO_DO}"
        )
    (archive,) = [f for f in os.listdir(dest) if f.endswith(".tar.gz")]
    path = os.path.join(dest, archive)
    verify_archive(path)
    return path


def install_without_extension(archive: str) -> None:
    """Unpack the source archive beside itself and pip-install it without its C++ ops."""
    folder = os.path.dirname(archive)
    with tarfile.open(archive) as tar:
        # the "data" filter refuses links and paths out of folder (Python >= 3.11.4)
        kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(folder, **kwargs)
    src = archive[: -len(".tar.gz")]
    setup_py = os.path.join(src, "setup.py")
    with open(setup_py) as f:
        text = f.read()
    patched, n = re.subn(r"ext_modules=get_extensions\(\),", "ext_modules=[],", text)
    if n != 1:
        sys.exit(f"{setup_py}: could not find 'ext_modules=get_extensions(),' to disable")
    with open(setup_py, "w") as f:
        f.write(patched)
    pip("install", "-q", "--no-build-isolation", src)


def main() -> None:
    if importlib.util.find_spec("detectron2") is not None:
        print("detectron2 is already installed; using it as it is.")
        return
    with tempfile.TemporaryDirectory() as tmp:
        try:
            archive = download(tmp)
        except ArchiveMismatch as e:
            sys.exit(str(e))
        install_without_extension(archive)
    print(f"installed {PACKAGE} without its C++ extension")


if __name__ == "__main__":
    main()
