"""The Video-VAE on its own: encode videos to latents, decode latents to mp4, reconstruct.

    python -m stepvideo.vae encode VIDEO.mp4 -o LATENTS.safetensors --model_dir ckpts
    python -m stepvideo.vae decode LATENTS.safetensors -o VIDEO.mp4 --vae_url http://host:8080
    python -m stepvideo.vae reconstruct VIDEO.mp4 -o OUT.mp4 --model_dir ckpts

The command is :mod:`stepvideo.cli.vae`.
Library: :mod:`.latents_file` (the one latents file format, also of the generator's kept latents
and ``python -m stepvideo.decode``), :mod:`.codec` (chunked encode/decode through any
:class:`~stepvideo.components.VAEComponent`, a ``LocalVAE`` or the service's ``RemoteVAE``, and
:func:`~stepvideo.vae.codec.latents_to_mp4`, the one latents -> mp4 function). Nothing heavy is
imported here.
"""
