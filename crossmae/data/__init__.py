"""Water data: samples, data sets, and the collate that packs and masks them."""

from crossmae.data.sample import DatasetSpec, ModalitySpec, Sample

__all__ = ["DatasetSpec", "ModalitySpec", "Sample"]
