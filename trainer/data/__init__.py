"""Data: image sets (sets), spurious captions (captions), the dataset and sampler (dataset), collate.

from trainer.data import load_image_set, ImageDataset, Collate
"""

from trainer.data.captions import RANDOM_WORDS, SpuriousCaptions, TemplateCaptions
from trainer.data.collate import Collate
from trainer.data.dataset import EpochSampler, ImageDataset
from trainer.data.sets import (
    SIMPLE_TEMPLATES,
    ImageSet,
    Template,
    fill_template,
    head_templates,
    load_image_set,
    load_templates,
    read_lines,
)

__all__ = [
    "RANDOM_WORDS",
    "SIMPLE_TEMPLATES",
    "Collate",
    "EpochSampler",
    "ImageDataset",
    "ImageSet",
    "SpuriousCaptions",
    "Template",
    "TemplateCaptions",
    "fill_template",
    "head_templates",
    "load_image_set",
    "load_templates",
    "read_lines",
]
