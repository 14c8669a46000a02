"""Kept import path of the job server's Python client: the code is :mod:`stepvideo.job_server.client`."""

from .job_server.client import FINISHED, JobFailed, ServerError, VideoClient, build_parser, error_message, main  # noqa: F401
