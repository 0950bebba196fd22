"""indusfactory: self-annotated synthetic industrial defect datasets with Stable Diffusion.

The library layer, one sub-package per stage of the chain: ``sources`` (ingest), ``drivers``,
``learning``, ``generation``, ``publishing``, ``evaluation``, on ``infra``; ``config`` and ``schema``
are the contracts every stage shares; ``demo`` holds the sample data and the tiny model. It never
imports Prefect, ``tasks`` or ``flows``, which wrap it. docs/ARCHITECTURE.md walks the tree.
"""

import os

# transformers warns about optional torchvision image processors that the factory never uses.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

__version__ = "0.1.0"
