"""Neural network modules. Import the submodule you need (``stepvideo.models.dit`` ...)."""
