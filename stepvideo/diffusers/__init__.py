"""Step-Video the diffusers way (optional extra: ``pip install 'stepvideo[diffusers]'``).

``import stepvideo`` never imports this package; importing it imports diffusers. See
docs/diffusers.md. The classes are ours with diffusers' mixins (no second copy of the model):

* :class:`StepVideoTransformer3DModel` - the DiT (``ModelMixin``, ``ConfigMixin``, ``CacheMixin``);
* :class:`AutoencoderKLStepVideo`, :class:`StepVideoFlowMatchScheduler`,
  :class:`StepVideoCaptionEncoder` - the other components;
* :class:`StepVideoTextToVideoPipeline`, :class:`StepVideoImageToVideoPipeline` - ``DiffusionPipeline``s.
"""
from .components import AutoencoderKLStepVideo, StepVideoCaptionEncoder, StepVideoFlowMatchScheduler
from .pipeline_stepvideo import (StepVideoImageToVideoPipeline, StepVideoPipelineOutput,
                                 StepVideoTextToVideoPipeline)
from .transformer import StepVideoTransformer3DModel

__all__ = ["AutoencoderKLStepVideo", "StepVideoCaptionEncoder", "StepVideoFlowMatchScheduler",
           "StepVideoImageToVideoPipeline", "StepVideoPipelineOutput", "StepVideoTextToVideoPipeline",
           "StepVideoTransformer3DModel"]
