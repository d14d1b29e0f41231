"""scripts/oci.py writes spec-valid OCI image archives (no root, no container engine), and
scripts/image builds the small test images with it."""

from __future__ import annotations

import gzip
import hashlib
import importlib.machinery
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import oci  # noqa: E402


def tiny_rootfs(root: Path) -> Path:
    (root / "bin").mkdir(parents=True)
    (root / "etc").mkdir()
    (root / "empty").mkdir()
    (root / "bin/tool").write_bytes(b"#!/bin/sh\necho tool\n")
    (root / "bin/tool").chmod(0o755)
    (root / "etc/conf").write_text("a=1\n")
    (root / "etc/conf").chmod(0o600)
    os.link(root / "bin/tool", root / "bin/tool-hardlink")
    (root / "bin/sh").symlink_to("/bin/tool")
    (root / "etc/dangling").symlink_to("../nowhere")
    os.mkfifo(root / "etc/fifo")
    deep = root / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    (deep / "long-name-over-100-chars").write_text("x")
    return root


def read_archive(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def layer_members(blob: bytes) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(blob))) as tar:
        return tar.getmembers()


def build(tmp_path: Path, name: str = "np-nft:dev", epoch: int = 1700000000,
          sub: str = "a") -> oci.Written:
    work = tmp_path / sub
    rootfs = tiny_rootfs(work / "rootfs")
    blobs = work / "blobs"
    layer = oci.write_layer(rootfs, blobs, epoch=epoch, created_by="test layer")
    config = oci.ImageConfig(entrypoint=["/bin/tool"], cmd=["--help"])
    return oci.write_image(work / "image.tar", name, [layer], blobs, config, epoch=epoch)


def test_archive_is_a_valid_oci_layout(tmp_path):
    written = build(tmp_path)
    files = read_archive(written.path)
    assert json.loads(files["oci-layout"]) == {"imageLayoutVersion": "1.0.0"}
    # every blob is named by its digest
    for name, data in files.items():
        if name.startswith("blobs/sha256/"):
            assert hashlib.sha256(data).hexdigest() == name.rsplit("/", 1)[1]
    index = json.loads(files["index.json"])
    assert index["schemaVersion"] == 2
    assert index["mediaType"] == "application/vnd.oci.image.index.v1+json"
    [desc] = index["manifests"]
    assert desc["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    assert desc["platform"] == {"architecture": "amd64", "os": "linux"}
    assert desc["annotations"] == {"io.containerd.image.name": "docker.io/library/np-nft:dev",
                                   "org.opencontainers.image.ref.name": "dev"}
    manifest_bytes = files["blobs/sha256/" + desc["digest"][7:]]
    assert len(manifest_bytes) == desc["size"]
    manifest = json.loads(manifest_bytes)
    assert manifest["schemaVersion"] == 2
    assert manifest["config"]["mediaType"] == "application/vnd.oci.image.config.v1+json"
    config_bytes = files["blobs/sha256/" + manifest["config"]["digest"][7:]]
    assert len(config_bytes) == manifest["config"]["size"]
    config = json.loads(config_bytes)
    [layer] = manifest["layers"]
    assert layer["mediaType"] == "application/vnd.oci.image.layer.v1.tar+gzip"
    blob = files["blobs/sha256/" + layer["digest"][7:]]
    assert len(blob) == layer["size"]
    # diff_ids are the digests of the uncompressed layers
    diff_id = "sha256:" + hashlib.sha256(gzip.decompress(blob)).hexdigest()
    assert config["rootfs"] == {"type": "layers", "diff_ids": [diff_id]}
    assert config["architecture"] == "amd64" and config["os"] == "linux"
    assert config["config"]["Entrypoint"] == ["/bin/tool"]
    assert config["config"]["Cmd"] == ["--help"]
    assert config["config"]["Env"][0].startswith("PATH=")
    assert config["created"] == "2023-11-14T22:13:20Z"
    assert len(config["history"]) == 1
    # docker load's manifest.json describes the same image
    assert json.loads(files["manifest.json"]) == [{
        "Config": "blobs/sha256/" + manifest["config"]["digest"][7:],
        "RepoTags": ["np-nft:dev"],
        "Layers": ["blobs/sha256/" + layer["digest"][7:]]}]
    assert oci.verify_archive(written.path)["name"] == "docker.io/library/np-nft:dev"


def test_layer_entries(tmp_path):
    written = build(tmp_path)
    files = read_archive(written.path)
    members = layer_members(files["blobs/sha256/" + written.layers[0].digest[7:]])
    names = [m.name for m in members]
    assert names == sorted(names, key=lambda n: n.split("/"))  # parents first, sorted
    assert all(m.mtime == 1700000000 and m.uid == 0 and m.gid == 0 and not m.uname
               for m in members)
    by = {m.name: m for m in members}
    assert by["bin/tool"].isreg() and by["bin/tool"].mode == 0o755
    assert by["etc/conf"].mode == 0o600
    assert by["bin/tool-hardlink"].islnk() and by["bin/tool-hardlink"].linkname == "bin/tool"
    assert by["bin/sh"].issym() and by["bin/sh"].linkname == "/bin/tool"
    assert by["etc/dangling"].linkname == "../nowhere"
    assert by["etc/fifo"].isfifo()
    assert by["empty"].isdir()
    assert any(len(n) > 100 for n in names)  # pax long names
    assert written.layers[0].unpacked == len(b"#!/bin/sh\necho tool\n") + 4 + 1


def test_same_input_same_digests(tmp_path):
    a = build(tmp_path, sub="a")
    b = build(tmp_path, sub="b")
    assert a.manifest_digest == b.manifest_digest
    assert a.path.read_bytes() == b.path.read_bytes()
    c = build(tmp_path, sub="c", epoch=0)
    assert c.layers[0].diff_id != a.layers[0].diff_id


def test_verify_archive_catches_a_corrupt_blob(tmp_path):
    written = build(tmp_path)
    bad = tmp_path / "bad.tar"
    with tarfile.open(written.path) as src, tarfile.open(bad, "w") as dst:
        for m in src.getmembers():
            data = src.extractfile(m).read() if m.isfile() else None
            if m.name == "blobs/sha256/" + written.config_digest[7:]:
                data = data.replace(b'"amd64"', b'"arm64"')
            dst.addfile(m, io.BytesIO(data) if data is not None else None)
    with pytest.raises(ValueError, match="does not match its digest"):
        oci.verify_archive(bad)


@pytest.mark.parametrize("name,full,familiar", [
    ("np-nft:dev", "docker.io/library/np-nft:dev", "np-nft:dev"),
    ("busybox", "docker.io/library/busybox:latest", "busybox:latest"),
    ("user/app:1", "docker.io/user/app:1", "user/app:1"),
    ("localhost/np-nft/pause:1.0", "localhost/np-nft/pause:1.0", "localhost/np-nft/pause:1.0"),
    ("localhost:5000/x:y", "localhost:5000/x:y", "localhost:5000/x:y"),
    ("registry.k8s.io/e2e-test-images/agnhost:2.63.0",
     "registry.k8s.io/e2e-test-images/agnhost:2.63.0",
     "registry.k8s.io/e2e-test-images/agnhost:2.63.0"),
])
def test_references(name, full, familiar):
    ref = oci.parse_reference(name)
    assert (ref.full, ref.familiar) == (full, familiar)


@pytest.mark.parametrize("name", ["Upper:case", "a@sha256:00", "a:b:c", "a/:x", ""])
def test_bad_references(name):
    with pytest.raises(ValueError):
        oci.parse_reference(name)


def test_image_help_and_errors(tmp_path):
    image = [sys.executable, str(ROOT / "scripts/image")]
    proc = subprocess.run([*image, "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "agnhost" in proc.stdout and "--keep-rootfs" in proc.stdout
    proc = subprocess.run([*image, "agnhost", "--output", str(tmp_path / "a.tar")],
                          capture_output=True, text=True)
    assert proc.returncode == 1 and "--binary" in proc.stderr
    proc = subprocess.run([*image, "agnhost", "--binary", str(ROOT / "README.md"),
                           "--output", str(tmp_path / "a.tar")], capture_output=True, text=True)
    assert proc.returncode == 1 and "not an x86-64 ELF" in proc.stderr
    proc = subprocess.run([*image, "pause", "--tag", "Bad Name"], capture_output=True, text=True)
    assert proc.returncode == 1 and "invalid" in proc.stderr


@pytest.mark.skipif(not shutil.which("musl-gcc"), reason="musl-tools not installed")
def test_pause_image(tmp_path):
    out = tmp_path / "pause.tar"
    subprocess.run([sys.executable, str(ROOT / "scripts/image"), "pause", "--output", str(out)],
                   check=True, capture_output=True)
    info = oci.verify_archive(out)
    assert info["name"] == "localhost/np-nft/pause:1.0"
    assert info["config"]["config"]["Entrypoint"] == ["/pause"]


def _static_busybox() -> bool:
    loader = importlib.machinery.SourceFileLoader("np_nft_image", str(ROOT / "scripts/image"))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    image = importlib.util.module_from_spec(spec)
    loader.exec_module(image)
    info = image.elf_info(Path("/bin/busybox"))
    return info is not None and info[0]


@pytest.mark.skipif(not _static_busybox(), reason="busybox-static not installed")
def test_busybox_image(tmp_path):
    out = tmp_path / "busybox.tar"
    subprocess.run([sys.executable, str(ROOT / "scripts/image"), "busybox", "--output",
                    str(out)], check=True, capture_output=True)
    info = oci.verify_archive(out)
    assert info["name"] == "docker.io/library/busybox:latest"
    assert info["config"]["config"]["Cmd"] == ["sh"]
    files = read_archive(out)
    members = {m.name: m for m in layer_members(
        files["blobs/sha256/" + info["manifest"]["layers"][0]["digest"][7:]])}
    for applet in ("bin/sh", "bin/sleep", "usr/bin/nc", "usr/bin/wget", "usr/sbin/httpd",
                   "sbin/ip", "bin/ping", "usr/bin/nslookup"):
        assert members[applet].issym() and members[applet].linkname == "/bin/busybox"
    assert members["bin/busybox"].isreg() and members["tmp"].mode == 0o1777
