"""Where each actor loads a model or tokenizer from, and how it gets there.

Actors never receive a path on the driver's disk. A model source is one of:

- a directory the driver made (the embedded teacher ladder, the embedded tokenizer): the driver
  uploads it to the run's storage, ``<run>/models/<name>/`` (:func:`publish`, skipped when the
  same content is there already), and passes that location;
- an ``s3://`` URI from the config (``teachers.ladder[].path``, ``student.path``): passed as is;
- a local path or hub id from the config: passed as is; it must be valid on every node.

On the actor's node, :func:`fetch` turns an ``s3://`` source into a node-local directory cached by
content hash under ``$CLPD_MODEL_CACHE`` (default ``$TMPDIR/clpd-models``); anything else is
returned unchanged (a published model in a local run directory is read in place)::

    driver: ladder cache ──publish──▶ <run>/models/t-small/ ──fetch──▶ node: /tmp/clpd-models/<hash>/
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TypeVar

from clpd_ray.config import Config, ModelSpec
from clpd_ray.distill.models import shared_tokenizer_source
from clpd_ray.runtime import storage

__all__ = [
    "INDEX",
    "actor_sources",
    "content_hash",
    "fetch",
    "fetch_spec",
    "localise",
    "publish",
]

# Written last into a published model directory: its content hash and files.
INDEX = "clpd-model.json"

_Spec = TypeVar("_Spec", bound=ModelSpec)


def content_hash(local_dir: str | Path) -> str:
    """sha256 over the relative names and bytes of every file under ``local_dir``."""
    h = hashlib.sha256()
    root = Path(local_dir)
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        h.update(p.relative_to(root).as_posix().encode() + b"\0")
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def publish(local_dir: str | Path, dest: str) -> str:
    """Upload the driver-side directory ``local_dir`` to ``dest`` (a location in the run's
    storage) unless ``dest`` already holds the same content; returns ``dest``."""
    digest = content_hash(local_dir)
    index = storage.join(dest, INDEX)
    if storage.exists(index):
        try:
            if json.loads(storage.read_text(index)).get("sha256") == digest:
                return dest
        except ValueError:
            pass  # an unreadable index: upload again
    storage.delete_tree(dest)
    storage.upload_dir(local_dir, dest)
    root = Path(local_dir)
    sizes = {
        p.relative_to(root).as_posix(): p.stat().st_size for p in root.rglob("*") if p.is_file()
    }
    storage.write_text(index, json.dumps({"sha256": digest, "files": sizes}, indent=2))
    return dest


def _cache_root() -> Path:
    env = os.environ.get("CLPD_MODEL_CACHE")
    return Path(env) if env else Path(tempfile.gettempdir()) / "clpd-models"


def _remote_key(source: str) -> str:
    """The content hash of a published model; for any other ``s3://`` directory a hash of its
    location and file sizes (a changed upload gets a new cache entry)."""
    index = storage.join(source, INDEX)
    if storage.is_file(index):
        try:
            return str(json.loads(storage.read_text(index))["sha256"])
        except (ValueError, KeyError):
            pass
    listing = json.dumps([source, sorted(storage.file_sizes(source).items())])
    return hashlib.sha256(listing.encode()).hexdigest()


def fetch(source: str | Path) -> str:
    """A directory or hub id this node can load ``source`` from (see the module docstring)."""
    text = str(source)
    if not storage.is_s3(text):
        return text
    local = _cache_root() / _remote_key(text)[:32]
    if local.is_dir():
        return str(local)
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{local.name}-", dir=local.parent))
    try:
        storage.download_dir(text, tmp)
        try:
            tmp.rename(local)
        except OSError:
            if not local.is_dir():  # another actor on this node won the race: use its copy
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(local)


def fetch_spec(spec: _Spec) -> _Spec:
    """``spec`` with an ``s3://`` path replaced by the node-local copy."""
    if spec.path and storage.is_s3(spec.path):
        return spec.model_copy(update={"path": fetch(spec.path)})
    return spec


def localise(config: Config) -> Config:
    """``config`` with every ``s3://`` model path fetched to this node (the driver's checks and
    workload read models locally; the saved config and the actors keep the URIs)."""
    ladder = [fetch_spec(t) for t in config.teachers.ladder]
    return config.model_copy(
        update={
            "teachers": config.teachers.model_copy(update={"ladder": ladder}),
            "student": fetch_spec(config.student),
        }
    )


def actor_sources(
    config: Config, ladder_dirs: list[Path], tokenizer_dir: Path, run_uri: str
) -> tuple[list[str], str]:
    """(teacher sources, tokenizer source) to hand to the actors.

    ``ladder_dirs`` and ``tokenizer_dir`` are the driver-side directories of the workload; the
    ones clpd made are published under ``<run>/models/``, the ones the config names are passed
    as the config names them (an ``s3://`` URI, or a path / hub id valid on every node)."""
    models = storage.join(run_uri, "models")
    teachers = [
        _as_given(spec.path) if spec.path else publish(local, storage.join(models, spec.name))
        for spec, local in zip(config.teachers.ladder, ladder_dirs, strict=True)
    ]
    found = shared_tokenizer_source(config)
    if found is None or found[0] == "student.tokenizer":
        # The embedded task's tokenizer, or a tokenizer-only copy, made on the driver.
        tokenizer = publish(tokenizer_dir, storage.join(models, "tokenizer"))
    else:  # the student's (or strongest teacher's) checkpoint, as the workload chose it
        tokenizer = _as_given(found[1])
    return teachers, tokenizer


def _as_given(path: str) -> str:
    """A config's model path for the actors: an ``s3://`` URI or hub id unchanged, a local
    directory made absolute (it must exist at that path on every node)."""
    if storage.is_s3(path):
        return path
    local = Path(path).expanduser()
    return str(local.absolute()) if local.exists() else path
