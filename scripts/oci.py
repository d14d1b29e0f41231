"""Write container images as OCI image archives, without a registry or a container engine.

Used by ``scripts/image``; standard library only, no root needed (except to read files only
root can read). The archive is an OCI image layout (image-spec v1.1, ``image-layout.md``) in
one uncompressed tar::

    oci-layout              {"imageLayoutVersion": "1.0.0"}
    index.json              one manifest descriptor, annotated with the image's name
    manifest.json           the docker-save form of the same image (RepoTags), for `docker load`
    blobs/sha256/<hex>      the gzipped layers, the config and the manifest, named by digest

It loads with ``ctr images import`` (containerd names the image from the index annotation
``io.containerd.image.name``), ``kind load image-archive`` (the same import), ``docker load``
(reads ``manifest.json``, like the archives ``docker save`` writes since Docker 25) and
``skopeo``/``umoci`` (``oci-archive:`` transport, ``org.opencontainers.image.ref.name``).

Everything is deterministic: the same directory trees, epoch and names give the same bytes,
hence the same digests. Layers are written as POSIX (pax) tars with entries sorted, a parent
directory before its children, mtimes set to the epoch, numeric owners only (0:0 unless the
owners are preserved), hardlinks as link entries to the first path, symlinks, device nodes and
FIFOs as themselves, and ``security.capability`` xattrs kept; the gzip header carries no name
and no time.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
import stat
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

# Media types (image-spec v1.1 media-types.md).
MT_LAYOUT_INDEX = "application/vnd.oci.image.index.v1+json"
MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"

# Index annotations that name the image.
ANN_CONTAINERD_NAME = "io.containerd.image.name"       # full reference, used by ctr/kind import
ANN_REF_NAME = "org.opencontainers.image.ref.name"     # the tag, per the OCI spec
ANN_CREATED = "org.opencontainers.image.created"

# Extended attributes carried into layers. Only file capabilities matter for an image (SELinux
# labels and the like belong to the host that unpacks it).
XATTRS = ("security.capability",)

GZIP_LEVEL = 6  # level 9 costs ~2x the time for ~1% less on these layers


# --------------------------------------------------------------------------------- references

@dataclass(frozen=True)
class Reference:
    """An image name, e.g. ``np-nft:dev`` -> docker.io/library/np-nft:dev."""

    repository: str  # fully qualified: docker.io/library/np-nft
    tag: str

    @property
    def full(self) -> str:
        return f"{self.repository}:{self.tag}"

    @property
    def familiar(self) -> str:
        """How Docker shows it (and writes it in manifest.json RepoTags): np-nft:dev."""
        repo = self.repository
        if repo.startswith("docker.io/"):
            repo = repo[len("docker.io/"):]
            if repo.startswith("library/") and repo.count("/") == 1:
                repo = repo[len("library/"):]
        return f"{repo}:{self.tag}"


_COMPONENT = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")
_TAG = re.compile(r"^[\w][\w.-]{0,127}$")


def parse_reference(name: str) -> Reference:
    """Normalise a name the way Docker and containerd do (distribution/reference rules, tags
    only: a digest reference cannot name an image being built)."""
    if "@" in name:
        raise ValueError(f"image name {name!r}: a digest cannot be used as a name")
    repo, tag = name, "latest"
    last = name.rsplit("/", 1)[-1]
    if ":" in last:
        repo, tag = name.rsplit(":", 1)
    if not _TAG.match(tag):
        raise ValueError(f"image name {name!r}: invalid tag {tag!r}")
    parts = repo.split("/")
    first = parts[0]
    if len(parts) > 1 and ("." in first or ":" in first or first == "localhost"):
        domain, path = first, parts[1:]
    else:
        domain, path = "docker.io", parts
        if len(path) == 1:
            path = ["library", *path]
    for comp in path:
        if not _COMPONENT.match(comp):
            raise ValueError(f"image name {name!r}: invalid path component {comp!r} "
                             "(lowercase letters, digits and separators . _ __ -)")
    return Reference("/".join([domain, *path]), tag)


# ------------------------------------------------------------------------------------ hashing

class _HashingWriter:
    """A write-only file object that hashes and counts what passes through it."""

    def __init__(self, out) -> None:
        self.out = out
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data) -> int:
        self.sha.update(data)
        self.size += len(data)
        if self.out is not None:
            self.out.write(data)
        return len(data)

    def tell(self) -> int:  # tarfile asks for the position when it opens in "w" mode
        return self.size

    def flush(self) -> None:
        if self.out is not None:
            self.out.flush()

    @property
    def digest(self) -> str:
        return "sha256:" + self.sha.hexdigest()


def _canonical_json(obj) -> bytes:
    """The exact bytes a descriptor's digest and size refer to."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


# ------------------------------------------------------------------------------------- layers

@dataclass(frozen=True)
class Layer:
    digest: str    # sha256 of the gzipped blob (manifest layers[].digest)
    size: int      # its size in bytes
    diff_id: str   # sha256 of the uncompressed tar (config rootfs.diff_ids)
    unpacked: int  # bytes of file content in the layer (for reports)
    created_by: str = ""
    media_type: str = MT_LAYER_GZIP


def _walk(root: Path) -> Iterator[tuple[str, Path]]:
    """(archive name, path) for everything under root except root itself: sorted by name
    bytes, each directory right before its contents."""
    def rec(rel: str, path: Path) -> Iterator[tuple[str, Path]]:
        with os.scandir(path) as it:
            entries = sorted(it, key=lambda e: os.fsencode(e.name))
        for e in entries:
            name = f"{rel}/{e.name}" if rel else e.name
            yield name, Path(e.path)
            if e.is_dir(follow_symlinks=False):
                yield from rec(name, Path(e.path))
    yield from rec("", root)


def _tarinfo(name: str, path: Path, st: os.stat_result, epoch: int,
             preserve_owner: bool) -> tarfile.TarInfo | None:
    info = tarfile.TarInfo(name)
    info.mtime = epoch
    info.mode = stat.S_IMODE(st.st_mode)
    info.uid, info.gid = (st.st_uid, st.st_gid) if preserve_owner else (0, 0)
    info.uname = info.gname = ""
    mode = st.st_mode
    if stat.S_ISREG(mode):
        info.type, info.size = tarfile.REGTYPE, st.st_size
    elif stat.S_ISDIR(mode):
        info.type = tarfile.DIRTYPE
    elif stat.S_ISLNK(mode):
        info.type, info.linkname = tarfile.SYMTYPE, os.readlink(path)
    elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        info.type = tarfile.CHRTYPE if stat.S_ISCHR(mode) else tarfile.BLKTYPE
        info.devmajor, info.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
    elif stat.S_ISFIFO(mode):
        info.type = tarfile.FIFOTYPE
    else:  # sockets cannot be archived (nor would they mean anything in an image)
        print(f"oci: skipping socket {path}", file=sys.stderr)
        return None
    if not stat.S_ISLNK(mode):
        xattrs = {}
        for key in XATTRS:
            try:
                value = os.getxattr(path, key, follow_symlinks=False)
            except OSError:
                continue
            xattrs["SCHILY.xattr." + key] = value.decode("utf-8", "surrogateescape")
        info.pax_headers = xattrs
    return info


def write_layer(root: Path, blobs: Path, *, epoch: int = 0, preserve_owner: bool = False,
                created_by: str = "") -> Layer:
    """Archive the tree under ``root`` as one gzipped layer blob in ``blobs`` (a
    ``blobs/sha256`` directory), named by its digest. Owners are 0:0 unless
    ``preserve_owner`` (then the numeric uid/gid of each file)."""
    blobs.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=blobs, prefix=".layer-")
    unpacked = 0
    try:
        with os.fdopen(fd, "wb") as raw:
            compressed = _HashingWriter(raw)
            # filename="" and mtime=0: no name, no time in the gzip header
            with gzip.GzipFile(filename="", mode="wb", fileobj=compressed,
                               compresslevel=GZIP_LEVEL, mtime=0) as gz:
                uncompressed = _HashingWriter(gz)
                with tarfile.open(fileobj=uncompressed, mode="w", format=tarfile.PAX_FORMAT,
                                  encoding="utf-8") as tar:
                    first_path: dict[tuple[int, int], str] = {}  # (dev, ino) -> first name
                    for name, path in _walk(root):
                        st = path.lstat()
                        info = _tarinfo(name, path, st, epoch, preserve_owner)
                        if info is None:
                            continue
                        if info.type == tarfile.REGTYPE and st.st_nlink > 1:
                            key = (st.st_dev, st.st_ino)
                            if key in first_path:  # a hardlink to an earlier entry
                                info.type, info.size = tarfile.LNKTYPE, 0
                                info.linkname = first_path[key]
                                tar.addfile(info)
                                continue
                            first_path[key] = name
                        if info.type == tarfile.REGTYPE:
                            unpacked += info.size
                            with open(path, "rb") as f:
                                tar.addfile(info, f)
                        else:
                            tar.addfile(info)
        digest = compressed.digest
        final = blobs / digest.split(":", 1)[1]
        os.replace(tmp_name, final)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return Layer(digest=digest, size=compressed.size, diff_id=uncompressed.digest,
                 unpacked=unpacked, created_by=created_by)


# -------------------------------------------------------------------------------------- image

@dataclass
class ImageConfig:
    """The parts of the image configuration (image-spec config.md) that matter here."""

    entrypoint: list[str] | None = None
    cmd: list[str] | None = None
    env: list[str] = field(default_factory=lambda: [
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"])
    working_dir: str = "/"
    user: str = ""
    exposed_ports: list[str] = field(default_factory=list)  # "80/tcp"
    labels: dict[str, str] = field(default_factory=dict)
    architecture: str = "amd64"
    os: str = "linux"


def _rfc3339(epoch: int) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _put_blob(blobs: Path, data: bytes) -> tuple[str, int]:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    path = blobs / digest.split(":", 1)[1]
    if not path.exists():
        path.write_bytes(data)
    return digest, len(data)


@dataclass(frozen=True)
class Written:
    path: Path
    reference: Reference
    manifest_digest: str
    config_digest: str
    layers: tuple[Layer, ...]
    archive_size: int


def write_image(output: Path, name: str, layers: list[Layer], blobs: Path,
                config: ImageConfig, *, epoch: int = 0) -> Written:
    """Write the config and manifest for ``layers`` (already in ``blobs``), and pack
    oci-layout, index.json, manifest.json and the blobs into the tar ``output``."""
    ref = parse_reference(name)
    created = _rfc3339(epoch)
    cfg: dict = {"Env": list(config.env), "WorkingDir": config.working_dir}
    if config.entrypoint is not None:
        cfg["Entrypoint"] = list(config.entrypoint)
    if config.cmd is not None:
        cfg["Cmd"] = list(config.cmd)
    if config.user:
        cfg["User"] = config.user
    if config.exposed_ports:
        cfg["ExposedPorts"] = {p: {} for p in config.exposed_ports}
    if config.labels:
        cfg["Labels"] = dict(config.labels)
    image_config = {
        "created": created,
        "architecture": config.architecture,
        "os": config.os,
        "config": cfg,
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
        # one history entry per layer (none is an empty layer)
        "history": [{"created": created, "created_by": layer.created_by or "scripts/image"}
                    for layer in layers],
    }
    config_digest, config_size = _put_blob(blobs, _canonical_json(image_config))
    manifest = {
        "schemaVersion": 2,
        "mediaType": MT_MANIFEST,
        "config": {"mediaType": MT_CONFIG, "digest": config_digest, "size": config_size},
        "layers": [{"mediaType": layer.media_type, "digest": layer.digest, "size": layer.size}
                   for layer in layers],
        "annotations": {ANN_CREATED: created},
    }
    manifest_digest, manifest_size = _put_blob(blobs, _canonical_json(manifest))
    index = {
        "schemaVersion": 2,
        "mediaType": MT_LAYOUT_INDEX,
        "manifests": [{
            "mediaType": MT_MANIFEST,
            "digest": manifest_digest,
            "size": manifest_size,
            "platform": {"architecture": config.architecture, "os": config.os},
            "annotations": {ANN_CONTAINERD_NAME: ref.full, ANN_REF_NAME: ref.tag},
        }],
    }
    # docker load: the legacy manifest, pointing at the same blobs (gzipped layers are fine:
    # docker decompresses them and checks each against rootfs.diff_ids).
    docker_manifest = [{
        "Config": "blobs/sha256/" + config_digest.split(":", 1)[1],
        "RepoTags": [ref.familiar],
        "Layers": ["blobs/sha256/" + layer.digest.split(":", 1)[1] for layer in layers],
    }]
    files: list[tuple[str, bytes | Path]] = [
        ("oci-layout", _canonical_json({"imageLayoutVersion": "1.0.0"})),
        ("index.json", _canonical_json(index)),
        ("manifest.json", _canonical_json(docker_manifest)),
    ]
    wanted = {config_digest, manifest_digest, *(layer.digest for layer in layers)}
    for digest in sorted(wanted):
        files.append(("blobs/sha256/" + digest.split(":", 1)[1],
                      blobs / digest.split(":", 1)[1]))
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp{os.getpid()}")
    try:
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
            for d in ("blobs", "blobs/sha256"):
                info = tarfile.TarInfo(d)
                info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, epoch
                tar.addfile(info)
            for arcname, content in files:
                info = tarfile.TarInfo(arcname)
                info.mode, info.mtime = 0o644, epoch
                if isinstance(content, bytes):
                    info.size = len(content)
                    tar.addfile(info, _BytesReader(content))
                else:
                    info.size = content.stat().st_size
                    with open(content, "rb") as f:
                        tar.addfile(info, f)
        os.replace(tmp, output)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return Written(output, ref, manifest_digest, config_digest, tuple(layers),
                   output.stat().st_size)


class _BytesReader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def read(self, n: int = -1) -> bytes:
        end = len(self.data) if n < 0 else self.pos + n
        chunk = self.data[self.pos:end]
        self.pos += len(chunk)
        return chunk


# --------------------------------------------------------------------------------- validation

def verify_archive(path: Path) -> dict:
    """Check an archive against the image-layout rules this module relies on (digests and
    sizes of every blob, media types, diff_ids against the uncompressed layers, one history
    entry per layer, the index annotations, manifest.json describing the same image) and
    return {"name": ..., "config": {...}, "manifest": {...}}. Raises ValueError naming the
    problem. Reads the archive in place (nothing is extracted)."""
    with tarfile.open(path) as tar:
        members = {m.name.rstrip("/"): m for m in tar.getmembers()}

        def read(name: str) -> bytes:
            m = members.get(name)
            if m is None or not m.isfile():
                raise ValueError(f"{path}: no file {name}")
            return tar.extractfile(m).read()

        def blob(desc: dict, media_type: str) -> bytes:
            if desc.get("mediaType") != media_type:
                raise ValueError(f"{desc.get('digest')}: media type {desc.get('mediaType')!r}, "
                                 f"expected {media_type!r}")
            algo, hexd = desc["digest"].split(":", 1)
            data = read(f"blobs/{algo}/{hexd}")
            if "sha256:" + hashlib.sha256(data).hexdigest() != desc["digest"]:
                raise ValueError(f"blob {desc['digest']}: content does not match its digest")
            if len(data) != desc["size"]:
                raise ValueError(f"blob {desc['digest']}: size {len(data)} != {desc['size']}")
            return data

        layout = json.loads(read("oci-layout"))
        if layout.get("imageLayoutVersion") != "1.0.0":
            raise ValueError("oci-layout: imageLayoutVersion is not 1.0.0")
        index = json.loads(read("index.json"))
        if index.get("schemaVersion") != 2 or len(index.get("manifests", [])) != 1:
            raise ValueError("index.json: expected schemaVersion 2 and one manifest")
        desc = index["manifests"][0]
        manifest = json.loads(blob(desc, MT_MANIFEST))
        if manifest.get("schemaVersion") != 2 or manifest.get("mediaType") != MT_MANIFEST:
            raise ValueError("manifest: schemaVersion 2 and its mediaType expected")
        config = json.loads(blob(manifest["config"], MT_CONFIG))
        diff_ids = []
        for layer in manifest["layers"]:
            data = blob(layer, MT_LAYER_GZIP)
            diff_ids.append("sha256:" + hashlib.sha256(gzip.decompress(data)).hexdigest())
        if config.get("rootfs") != {"type": "layers", "diff_ids": diff_ids}:
            raise ValueError("config rootfs.diff_ids do not match the uncompressed layers")
        if len(config.get("history", [])) != len(diff_ids):
            raise ValueError("config history: one entry per layer expected")
        annotations = desc.get("annotations", {})
        name = annotations.get(ANN_CONTAINERD_NAME, "")
        ref = parse_reference(name)
        if ref.full != name:
            raise ValueError(f"{ANN_CONTAINERD_NAME} {name!r} is not a normalised name")
        if annotations.get(ANN_REF_NAME) != ref.tag:
            raise ValueError(f"{ANN_REF_NAME} is not the tag {ref.tag!r}")
        docker = json.loads(read("manifest.json"))
        if (len(docker) != 1 or docker[0].get("RepoTags") != [ref.familiar]
                or docker[0].get("Config") != "blobs/sha256/" + manifest["config"]["digest"][7:]
                or docker[0].get("Layers") != ["blobs/sha256/" + la["digest"][7:]
                                               for la in manifest["layers"]]):
            raise ValueError("manifest.json does not describe the same image")
        return {"name": name, "config": config, "manifest": manifest}


def copy_blob(src_blobs: Path, dst_blobs: Path, digest: str) -> None:
    """Reuse a blob from another blobs directory (e.g. a cached layer)."""
    hexd = digest.split(":", 1)[1]
    dst_blobs.mkdir(parents=True, exist_ok=True)
    if not (dst_blobs / hexd).exists():
        shutil.copyfile(src_blobs / hexd, dst_blobs / hexd)
