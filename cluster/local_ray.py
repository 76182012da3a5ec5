"""A private local Ray: every one of its servers listens on 127.0.0.1 only.

`ray.init()` without an address starts a one-machine cluster whose GCS, raylet, workers
and agents listen on every interface (0.0.0.0 / ::) -- reachable from the network, for
what only this process uses. Passing `_node_ip_address="127.0.0.1"` alone changes nothing:
Ray replaces a loopback node address with the machine's network address
(`services.resolve_ip_for_localhost`) unless its "cluster mode" is off, which is what
`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` does (Ray's default on macOS and Windows). With both,
each server binds the node address, 127.0.0.1 (tests/test_faults_shards.py checks every
listening socket of the Ray processes).

Joining an existing cluster (`address=` or RAY_ADDRESS) is not this module's business:
that cluster's own settings decide where it listens.
"""

from __future__ import annotations

import os
from typing import Any

LOOPBACK = "127.0.0.1"
_CLUSTER_MODE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def init_local_ray(
    num_cpus: int | None = None,
    *,
    include_dashboard: bool = False,
    log_to_driver: bool = False,
    **kwargs: Any,
):
    """Start a local Ray bound to 127.0.0.1 (dashboard off unless asked; then on 127.0.0.1).

    Extra keyword arguments go to `ray.init`. Returns what `ray.init` returns.
    """
    import ray
    from ray._private import ray_constants

    # Cluster mode off only while Ray starts: the processes it starts inherit the setting,
    # and a later ray.init(address=...) in this process sees Ray's own default again.
    saved_env, saved_flag = os.environ.get(_CLUSTER_MODE), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[_CLUSTER_MODE] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False  # read at import; ray is imported by now
    try:
        return ray.init(
            num_cpus=num_cpus,
            include_dashboard=include_dashboard,
            dashboard_host=LOOPBACK,
            log_to_driver=log_to_driver,
            _node_ip_address=LOOPBACK,
            **kwargs,
        )
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop(_CLUSTER_MODE, None)
        else:
            os.environ[_CLUSTER_MODE] = saved_env
