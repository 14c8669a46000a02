"""Caption/VAE HTTP service (server, wire protocol, clients). See docs/service.md.

Nothing heavy is imported here: ``from stepvideo.caption_service.client import RemoteVAE`` does not pull
in Flask. The server module imports the model classes (:mod:`.components`), not their weights:
those are read when the launcher loads them.
"""
