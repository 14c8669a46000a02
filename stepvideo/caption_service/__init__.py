"""Caption/VAE HTTP service (server, wire protocol, clients). See docs/service.md.

Nothing heavy is imported here: ``from stepvideo.caption_service.client import RemoteVAE`` does not pull
in Flask, and the server module does not import the models until they are loaded.
"""
