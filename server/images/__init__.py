"""Product images: intake, the pyvips pipeline, the placeholder, workers, storage.

`ImageService` (server.domain.images) ties them to the catalog; it is not imported here so
the image worker process, which imports this package, does not load the catalog and its
database and Redis clients.
"""

from server.adapters.images.intake import (
    ImageRejected,
    IntakeLimits,
    TooManyPixels,
    UnreadableImage,
    UnsupportedImageType,
    UploadTooLarge,
)
from server.adapters.images.pipeline import FORMATS, MEDIA_TYPES, SIZES, Encoding
from server.adapters.images.placeholder import MAX_PLACEHOLDER_CHARS
from server.adapters.images.storage import ImageStorage, LocalImageStorage, open_storage
from server.adapters.images.workers import ImagesBusy, ImageWorkers

__all__ = [
    "FORMATS",
    "MAX_PLACEHOLDER_CHARS",
    "MEDIA_TYPES",
    "SIZES",
    "Encoding",
    "ImageRejected",
    "ImageStorage",
    "ImageWorkers",
    "ImagesBusy",
    "IntakeLimits",
    "LocalImageStorage",
    "TooManyPixels",
    "UnreadableImage",
    "UnsupportedImageType",
    "UploadTooLarge",
    "open_storage",
]
