"""Datasets as in-memory tensors in [0,1]: readers for IDX, CIFAR, ImageFolder and arrays;
seeded evaluation subsets; train/validation splits; the bundled Fashion-MNIST slice; in-memory data
(tensors, Datasets, DataLoaders) read with the same subset rule."""

from robkd.data.core import ImageData, check_labels, check_pixel_range, eval_subset, subset_positions, train_val_split
from robkd.data.memory import IN_MEMORY, MemoryData, content_sha256, from_memory, is_in_memory
from robkd.data.registry import DATASETS, dataset_info, find_data_locations, load_dataset

__all__ = [
    "DATASETS",
    "IN_MEMORY",
    "MemoryData",
    "content_sha256",
    "from_memory",
    "is_in_memory",
    "subset_positions",
    "ImageData",
    "check_labels",
    "check_pixel_range",
    "dataset_info",
    "eval_subset",
    "find_data_locations",
    "load_dataset",
    "train_val_split",
]
