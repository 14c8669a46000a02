"""The persistent generation server: load the DiT once, serve many videos (see docs/server.md).

    torchrun --nproc_per_node N run_parallel.py --serve --port 8000 --state_dir ./server-state ...

Parts (one job each):

- :mod:`.config`   ``ServerConfig``, the server's limits and network settings;
- :mod:`.jobs`     ``JobStore``, jobs in SQLite (WAL) and their videos beside it, reconciled at start;
- :mod:`.requests` turning a ``POST /v1/videos`` body into a validated job (the CLI's sampling code);
- :mod:`.openai_fields` the shared OpenAI-style fields (``model``, ``seconds``, ``size``, ...) in our names;
- :mod:`.video_object` a job as the API shows it (the OpenAI ``Video`` fields plus ours);
- :mod:`.api_errors` the one shape of every ``/v1/`` error;
- :mod:`.context`  ``ServingContext``, what the routes share;
- :mod:`.app`      the Flask app; its routes are in :mod:`.views` (``/v1/videos``, ``/v1/models``,
  ``/health``, ``/ready``, ``/metrics``, and the page in the browser at ``/``, ``ui/index.html``);
- :mod:`.thumbnail` the first frame of a video as a JPEG/WebP;
- :mod:`.metrics`  Prometheus metrics;
- :mod:`.worker`   the loop every rank runs: rank 0 picks the next job and broadcasts it;
- :mod:`.launch`   the ``--serve`` flags and the launcher behind ``run_parallel.py --serve``.

``stepvideo.caption_service`` is the other server: the caption/VAE service this one calls.
"""
