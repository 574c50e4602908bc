"""tools/install_detectron2.py: the source archive is pinned by its sha256, and an importable
Detectron2 is used untouched. No network: pip is replaced by stand-ins."""

import hashlib
import importlib.util
import io
import os
import re
import subprocess
import tarfile
from typing import List

import pytest

from conftest import REPO

SCRIPT = os.path.join(REPO, "tools", "install_detectron2.py")


@pytest.fixture
def installer():
    """The script as a module (tools/ is no package)."""
    spec = importlib.util.spec_from_file_location("install_detectron2", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write(path: str, content: bytes) -> str:
    with open(path, "wb") as f:
        f.write(content)
    return path


def test_pin_is_a_sha256(installer):
    assert re.fullmatch(r"[0-9a-f]{64}", installer.SHA256)


def test_archive_with_other_content_is_refused(installer, tmp_path):
    path = _write(str(tmp_path / "pb1-detectron2-0.6.tar.gz"), b"a changed upload")
    actual = hashlib.sha256(b"a changed upload").hexdigest()
    with pytest.raises(installer.ArchiveMismatch) as e:
        installer.verify_archive(path)
    message = str(e.value)
    assert path in message
    assert f"sha256 {actual}" in message
    assert f"pinned at sha256 {installer.SHA256}" in message
    assert "SHA256 in tools/install_detectron2.py" in message  # what to do
    assert "official Detectron2" in message


def test_archive_with_the_pinned_hash_is_accepted(installer, tmp_path, monkeypatch):
    path = _write(str(tmp_path / "pb1-detectron2-0.6.tar.gz"), b"the pinned upload")
    monkeypatch.setattr(installer, "SHA256", hashlib.sha256(b"the pinned upload").hexdigest())
    installer.verify_archive(path)


def test_importable_detectron2_is_used_untouched(installer, monkeypatch, capsys):
    assert importlib.util.find_spec("detectron2") is not None  # the test environment's

    def no_subprocess(*args, **kwargs):
        raise AssertionError(f"ran {args}")

    monkeypatch.setattr(subprocess, "check_call", no_subprocess)
    monkeypatch.setattr(installer, "pip", no_subprocess)
    installer.main()
    assert "already installed" in capsys.readouterr().out


def _sdist(setup_py: str) -> bytes:
    """A stand-in for the source archive: pb1-detectron2-0.6/setup.py only."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        data = setup_py.encode()
        info = tarfile.TarInfo("pb1-detectron2-0.6/setup.py")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


class _FakePip:
    """Records pip's arguments; ``download`` writes ``archive`` into the ``-d`` folder."""

    def __init__(self, archive: bytes):
        self.archive = archive
        self.calls: List[tuple] = []
        self.requirement = ""
        self.installed_setup_py = ""

    def __call__(self, *args: str) -> None:
        self.calls.append(args)
        if args[0] == "download":
            with open(args[args.index("-r") + 1]) as f:
                self.requirement = f.read()
            dest = args[args.index("-d") + 1]
            _write(os.path.join(dest, "pb1-detectron2-0.6.tar.gz"), self.archive)
        elif args[0] == "install":
            with open(os.path.join(args[-1], "setup.py")) as f:
                self.installed_setup_py = f.read()


def _without_detectron2(installer, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(installer.importlib.util, "find_spec",
                        lambda name, *a: None if name == "detectron2" else real(name, *a))


def test_download_is_pinned_and_extension_disabled(installer, monkeypatch):
    archive = _sdist("setup(\n    ext_modules=get_extensions(),\n)\n")
    monkeypatch.setattr(installer, "SHA256", hashlib.sha256(archive).hexdigest())
    fake = _FakePip(archive)
    monkeypatch.setattr(installer, "pip", fake)
    _without_detectron2(installer, monkeypatch)
    installer.main()
    download, install = fake.calls
    assert download[0] == "download" and "--require-hashes" in download
    assert fake.requirement == f"pb1-detectron2==0.6 --hash=sha256:{installer.SHA256}\n"
    assert install[0] == "install"
    assert fake.installed_setup_py == "setup(\n    ext_modules=[],\n)\n"


def test_changed_upload_stops_the_install(installer, monkeypatch):
    fake = _FakePip(_sdist("import os; os.system('echo not the pinned archive')\n"))
    monkeypatch.setattr(installer, "pip", fake)
    _without_detectron2(installer, monkeypatch)
    with pytest.raises(SystemExit, match=f"pinned at sha256 {installer.SHA256}"):
        installer.main()
    assert [c[0] for c in fake.calls] == ["download"]  # never installed


def test_pip_refusal_says_what_to_do(installer, monkeypatch):
    def refusing_pip(*args: str) -> None:
        raise subprocess.CalledProcessError(1, ["pip", *args])

    monkeypatch.setattr(installer, "pip", refusing_pip)
    _without_detectron2(installer, monkeypatch)
    with pytest.raises(SystemExit, match="DO NOT MATCH THE HASHES.*SHA256 in tools/"):
        installer.main()
