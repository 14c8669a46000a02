"""The persistent generation server: load the DiT once, serve many videos (see docs/server.md).

    torchrun --nproc_per_node N run_parallel.py --serve --port 8000 --state_dir ./server-state ...

Parts (one job each):

- :mod:`.config`   ``ServerConfig``, the server's limits and network settings;
- :mod:`.jobs`     ``JobStore``, jobs in SQLite (WAL) and their videos beside it, reconciled at start;
- :mod:`.requests` turning a ``POST /v1/videos`` body into a validated job (the CLI's sampling code);
- :mod:`.app`      the Flask app (``/v1/videos``, ``/health``, ``/ready``, ``/metrics``);
- :mod:`.metrics`  Prometheus metrics;
- :mod:`.worker`   the loop every rank runs: rank 0 picks the next job and broadcasts it;
- :mod:`.launch`   the ``--serve`` flags and the launcher behind ``run_parallel.py --serve``.

``stepvideo.service`` is the other server: the caption/VAE service this one calls.
"""
