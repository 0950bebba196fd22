"""indusfactory: self-annotated synthetic industrial defect datasets with Stable Diffusion.

The library layer: data contracts, drivers, masks, model loading, training, generation and export.
It never imports Prefect; ``tasks/`` and ``flows/`` wrap it.
"""

import os

# transformers warns about optional torchvision image processors that the factory never uses.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

__version__ = "0.1.0"
