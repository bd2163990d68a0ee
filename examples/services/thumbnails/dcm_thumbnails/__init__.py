"""Thumbnail example service for the dcm-processor job scheduler.

:mod:`dcm_thumbnails.registry` decides which series are image series (the
callback), :mod:`dcm_thumbnails.render` turns one DICOM frame into an 8-bit
Pillow image, and :mod:`dcm_thumbnails.worker` writes one PNG per series.
"""
