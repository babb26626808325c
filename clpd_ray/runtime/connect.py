"""Joining a Ray cluster, with the connection and auth problems found in seconds, not minutes.

Left to itself, ``ray.init(address=...)`` retries an unreachable address for minutes and a
cluster that refuses the client's token ~20 times over 20 s, then raises ``ConnectionError``
(measured on Ray 2.60). ``clpd run`` checks first, before it writes anything, and stops with exit
2 and the fix::

    address ─▶ resolve (--address, cluster.address, RAY_ADDRESS; "auto" = the running cluster)
            ─▶ TCP connect to the GCS port (5 s)     unreachable  ─▶ ClusterError: the address,
                                                                      `ray status`
            ─▶ GCS handshake (Ray's own GcsClient,   token refused ─▶ ClusterError:
               what `ray status` uses; ~10 ms)                        `export RAY_AUTH_MODE=token`,
                                                                      `ray get-auth-token`
            ─▶ ray.init (kept: the run uses this connection)

No address means a local Ray started here, with token authentication on (Ray's default), and
SIGTERM blocked in its processes, so a SIGTERM to the whole process group (``kill -TERM -PGID``,
Slurm) reaches only the driver, which then stops at a step boundary (``cleanup.py``).
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

import ray

from clpd_ray.config import Config
from clpd_ray.errors import ClusterError
from clpd_ray.runtime.cleanup import shielding_ray_from_group_sigterm

__all__ = [
    "NAMESPACE",
    "check_address",
    "dashboard_url",
    "ensure_ray",
    "local_init_kwargs",
    "resolve_address",
]

NAMESPACE = "clpd"
_TCP_TIMEOUT_S = 5.0
_log = logging.getLogger(__name__)


def local_init_kwargs(config: Config) -> dict[str, Any]:
    """``ray.init`` arguments for a local cluster.

    Token authentication stays as Ray sets it (on for a local ``ray.init``): nothing here turns
    it off. The dashboard listens on ``cluster.dashboard_host``, 127.0.0.1 unless the user asks
    for another address. ``address="local"``: a new cluster even when a ``ray start`` cluster
    runs on this machine (plain ``ray.init()`` would join the one recorded in
    /tmp/ray/ray_current_cluster, and then refuse ``num_cpus``).
    """
    return {
        "address": "local",
        "num_cpus": config.cluster.num_cpus,
        "namespace": NAMESPACE,
        "dashboard_host": config.cluster.dashboard_host,
        "include_dashboard": None,
        "log_to_driver": False,
        "configure_logging": False,
    }


def resolve_address(config: Config, address: str | None) -> str | None:
    """The cluster to join: ``--address``, else ``cluster.address``, else ``RAY_ADDRESS`` (set
    by ``ray job submit`` and KubeRay for an entrypoint); ``None``: start a local Ray."""
    return address or config.cluster.address or os.environ.get("RAY_ADDRESS") or None


def check_address(address: str | None) -> None:
    """Stop with :class:`ClusterError` if ``address`` cannot be reached or refuses this client's
    credentials; nothing for ``None`` (a local Ray)."""
    if address is None:
        return
    if address.startswith("ray://"):  # Ray Client: only the port can be checked up front
        host, _, port = address[len("ray://") :].rpartition(":")
        _check_tcp(address, host, _port(address, port))
        return
    gcs = _bootstrap_address(address)
    host, _, port = gcs.rpartition(":")
    _check_tcp(address, host.strip("[]"), _port(address, port))
    _check_auth(address, gcs)


def ensure_ray(config: Config, address: str | None = None) -> None:
    """Join the cluster :func:`resolve_address` names (checked by :func:`check_address`), else
    start a local Ray with auth on. Nothing if this driver is already connected."""
    if ray.is_initialized():
        return
    address = resolve_address(config, address)
    check_address(address)
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        _log.warning(
            "RAY_AUTH_MODE=disabled is set in the environment: Ray's token authentication is "
            "off, so anyone who can reach the dashboard port can run code; unset it"
        )
    if not address:
        with shielding_ray_from_group_sigterm():
            ray.init(**local_init_kwargs(config))
        return
    try:
        ray.init(address=address, namespace=NAMESPACE, log_to_driver=False)
    except ray.exceptions.AuthenticationError:  # RAY_AUTH_MODE=token but no token here
        raise ClusterError(_auth_message(address)) from None
    except ConnectionError as err:  # the checks passed, yet the connection failed
        text = f"{err} {err.__cause__ or ''}"
        if "AuthenticationError" in text or "InvalidAuthToken" in text:
            raise ClusterError(_auth_message(address)) from None
        raise ClusterError(
            f"cannot connect to the Ray cluster at {address} ({err}); check it with `ray status` "
            "on the head node and pass the address it prints (host:6379)"
        ) from None


def dashboard_url() -> str | None:
    """The connected cluster's dashboard URL (``None`` when it runs without one)."""
    try:
        url = ray._private.worker.get_dashboard_url()  # what ray.init prints
    except Exception:  # not connected, or a Ray without this helper
        return None
    if not url:
        return None
    return url if "://" in url else f"http://{url}"


# ---------------------------------------------------------------------- checks


def _port(address: str, port: str) -> int:
    if not port.isdigit():
        raise ClusterError(
            f"--address {address}: not host:port (the head node's GCS address, e.g. "
            "10.0.0.1:6379, 'auto' for the cluster running on this machine, or "
            "ray://host:10001)"
        )
    return int(port)


def _bootstrap_address(address: str) -> str:
    """host:port of the GCS, as ``ray.init`` resolves it (``auto``: the running cluster)."""
    from ray._private.services import canonicalize_bootstrap_address

    try:
        gcs = canonicalize_bootstrap_address(address)
    except ConnectionError as err:  # "auto" with no cluster running here
        raise ClusterError(
            f"--address {address}: no running Ray cluster found from this machine ({err}); "
            "start one with `ray start --head`, or pass the head node's address (host:6379, "
            "as `ray status` on the head prints it)"
        ) from None
    except ValueError as err:
        raise ClusterError(
            f"--address {address}: {err}; give the head node's host:port (e.g. 10.0.0.1:6379)"
        ) from None
    if gcs is None:  # "local" (or an empty RAY_ADDRESS): ray.init would start a new cluster
        raise ClusterError(
            f"--address {address} names no cluster; drop --address to start a local Ray, or "
            "give the head node's host:port"
        )
    return gcs


def _check_tcp(address: str, host: str, port: int) -> None:
    try:
        socket.create_connection((host, port), timeout=_TCP_TIMEOUT_S).close()
    except OSError as err:
        why = err.strerror or type(err).__name__
        raise ClusterError(
            f"cannot reach the Ray cluster at {address} ({host}:{port}: {why} within "
            f"{_TCP_TIMEOUT_S:g} s); check the address with `ray status` on the head node (it "
            "prints the one to use, port 6379 by default), that the cluster is up, and that "
            "this machine can reach that port"
        ) from None


def _check_auth(address: str, gcs: str) -> None:
    """A GCS handshake, as ``ray status`` does: fails at once when the token is refused."""
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )
        from ray._raylet import GcsClient  # type: ignore[attr-defined]
    except ImportError:  # another Ray version: ray.init still reports the problem, slowly
        return
    if address == "auto":
        # As ray.init does for "auto" (only): a token saved on this machine turns auth on.
        maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    try:
        GcsClient(address=gcs)
    except ray.exceptions.AuthenticationError:
        raise ClusterError(_auth_message(address)) from None
    except Exception as err:  # reachable, but no Ray GCS answers there
        raise ClusterError(
            f"{address} answers but not as a Ray cluster ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}); pass the head node's GCS address "
            "(host:6379, as `ray status` prints it), not the dashboard's port"
        ) from None


def _auth_message(address: str) -> str:
    mode = os.environ.get("RAY_AUTH_MODE", "").lower()
    if mode != "token":
        why = "this client does not send one (RAY_AUTH_MODE is not token)"
    else:
        why = "it refused this client's token (missing or a different cluster's)"
    return (
        f"the Ray cluster at {address} requires token authentication and {why}: "
        "`export RAY_AUTH_MODE=token` and give this machine the cluster's token: run "
        "`ray get-auth-token` on the head node, then `export RAY_AUTH_TOKEN=<token>` here (or "
        "save it to ~/.ray/auth_token)"
    )
