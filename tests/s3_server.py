"""A real S3-compatible server for the tests: moto's server mode on 127.0.0.1.

``start()`` runs it in a thread of this process and returns its endpoint; :func:`s3_env` is what
a process (the driver, Ray workers, subprocesses) needs in its environment to use it through
``clpd_ray.runtime.storage``, exactly as a user points clpd at MinIO or any S3-compatible store.
"""

from __future__ import annotations

import logging
import uuid

import pyarrow.fs as pafs


def start() -> tuple[object, str]:
    """(server, endpoint URL) of a new moto server on a free port of 127.0.0.1."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return server, f"http://{host}:{port}"


def s3_env(endpoint: str) -> dict[str, str]:
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }


def new_bucket(endpoint: str) -> str:
    """Create a bucket with a fresh name; returns ``s3://<name>``."""
    name = f"clpd-{uuid.uuid4().hex[:12]}"
    fs = pafs.S3FileSystem(
        endpoint_override=endpoint,
        region="us-east-1",
        access_key="testing",
        secret_key="testing",
        allow_bucket_creation=True,
    )
    fs.create_dir(name)
    return f"s3://{name}"
