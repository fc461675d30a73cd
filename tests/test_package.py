"""Packaging, signing, verification and safe extraction."""
import io
import json
import stat
import zipfile
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from microcores._package import (Package, build, extract, load_service, parse_manifest, sha256,
                                 sign, verify_signature)
from microcores._secure import public_bytes
from microcores.errors import PackageError
from microcores.services import Compute

DATA = Path(__file__).parent / "data"


def signed(pkg: Package):
    key = Ed25519PrivateKey.generate()
    return sign(pkg, key), public_bytes(key)


def test_builtin_package_verifies_extracts_and_loads(tmp_path):
    pkg, pub = signed(build(Compute))
    verify_signature(pkg, pub)
    m = extract(pkg, tmp_path / "x")
    assert m["name"] == "math.compute" and m["entry"]["module"] == "microswarm_builtins"
    cls = load_service(tmp_path / "x", m, namespace="_test_ns_compute")
    assert cls().run({"a": 2, "b": 5, "op": "mul"}) == {"result": 10.0}


def test_digest_is_stable_for_the_same_code():
    assert build(Compute).digest == build(Compute).digest


def test_signature_from_another_key_is_refused():
    pkg, _ = signed(build(Compute))
    with pytest.raises(PackageError, match="signature does not verify"):
        verify_signature(pkg, public_bytes(Ed25519PrivateKey.generate()))


def test_manifest_change_breaks_the_signature():
    pkg, pub = signed(build(Compute))
    m = json.loads(pkg.manifest)
    m["service"]["timeout"] = 1
    with pytest.raises(PackageError):
        verify_signature(Package(json.dumps(m).encode(), pkg.archive, pkg.signature), pub)


def _evil(entries: dict[str, bytes], listed: dict[str, bytes] | None = None, symlink: str | None = None) -> Package:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in entries.items():
            info = zipfile.ZipInfo(name)
            if name == symlink:
                info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, data)
    archive = buf.getvalue()
    manifest = {"format": 1, "name": "x.y", "version": "1", "entry": {"module": "m", "class": "C"},
                "files": {n: sha256(b) for n, b in (listed if listed is not None else entries).items()},
                "archive_sha256": sha256(archive), "service": {}}
    return Package(json.dumps(manifest).encode(), archive)


@pytest.mark.parametrize("name", ["../evil.py", "a/../../evil.py", "/etc/passwd", "C:/x.py", "a\\..\\b.py", "./a.py"])
def test_unsafe_paths_are_refused(tmp_path, name):
    with pytest.raises(PackageError, match="unsafe path"):
        extract(_evil({name: b"x = 1"}), tmp_path / "out")
    assert not (tmp_path / "evil.py").exists() and not (tmp_path / "out").exists()


def test_symlinks_are_refused(tmp_path):
    with pytest.raises(PackageError, match="not a regular file"):
        extract(_evil({"link.py": b"/etc/passwd"}, symlink="link.py"), tmp_path / "out")


def test_a_file_not_in_the_manifest_is_refused(tmp_path):
    with pytest.raises(PackageError, match="not listed"):
        extract(_evil({"m.py": b"x=1", "extra.py": b"y=2"}, listed={"m.py": b"x=1"}), tmp_path / "out")


def test_a_file_that_does_not_match_its_hash_is_refused(tmp_path):
    with pytest.raises(PackageError, match="does not match its sha256"):
        extract(_evil({"m.py": b"x=1"}, listed={"m.py": b"x=2"}), tmp_path / "out")


def test_zip_bomb_is_refused(tmp_path):
    with pytest.raises(PackageError, match="too large or too compressed"):
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
            zf.writestr("m.py", b"\0" * (50 << 20))
        archive = buf.getvalue()
        manifest = {"format": 1, "name": "x.y", "version": "1", "entry": {"module": "m", "class": "C"},
                    "files": {"m.py": "0" * 64}, "archive_sha256": sha256(archive), "service": {}}
        extract(Package(json.dumps(manifest).encode(), archive), tmp_path / "out")


def test_archive_must_match_the_manifest(tmp_path):
    pkg = build(Compute)
    with pytest.raises(PackageError, match="archive sha256"):
        extract(Package(pkg.manifest, pkg.archive + b"x"), tmp_path / "out")


def test_manifest_damage_is_a_clear_error():
    with pytest.raises(PackageError, match="not JSON"):
        parse_manifest(b"{")
    with pytest.raises(PackageError, match="format"):
        parse_manifest(b'{"format": 99}')


def test_class_from_main_travels_by_value(tmp_path):
    from pydantic import BaseModel

    from microcores import MicroCore

    class Num(BaseModel):
        v: int

    class Twice(MicroCore[Num, Num]):
        name = "notebook.twice"

        def process(self, data: Num) -> Num:
            return Num(v=data.v * 2)

    Twice.__module__ = "__main__"
    pkg = build(Twice)
    m = parse_manifest(pkg.manifest)
    assert m["entry"]["pickle"] == "service.pkl"
    extract(pkg, tmp_path / "p")
    assert load_service(tmp_path / "p", m)().run({"v": 21}) == {"v": 42}
