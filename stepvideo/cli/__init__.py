"""Command-line entry points of stepvideo, inside the package (they work from an installed copy).

- ``stepvideo.cli.generate``: one video (``torchrun -m stepvideo.cli.generate``; also
  ``run_parallel.py`` and the ``stepvideo-generate`` console script);
- ``stepvideo.cli.evaluate``: an eval set with one loaded model (``benchmark/evaluation.py``,
  ``stepvideo-eval``);
- ``stepvideo.cli.service``: the caption/VAE service (``api/call_remote_server.py``,
  ``stepvideo-service``);
- ``stepvideo.cli.demo``: the service and 2 ranks on the tiny model (``scripts/demo.sh``,
  ``stepvideo-demo``).

The argument groups and config builders (``stepvideo.cli.args``) are re-exported here, so
``from stepvideo import cli; cli.add_model_args(parser)`` keeps working.
"""
from .args import (LaunchConfigs, add_model_args, add_output_args, add_parallel_args, add_sampling_args,
                   configure_logging, launch_configs, output_config, parallel_config, runtime_config,
                   sampling_config, sampling_from_options, sampling_options, start_ranks, token_count)

__all__ = ["LaunchConfigs", "add_model_args", "add_output_args", "add_parallel_args", "add_sampling_args",
           "configure_logging", "launch_configs", "output_config", "parallel_config", "runtime_config",
           "sampling_config", "sampling_from_options", "sampling_options", "start_ranks", "token_count"]
