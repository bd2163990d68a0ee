"""Telling a DICOM file cut short from a whole one, without reading its pixels.

Ingest reads headers only and stops before the pixel data, and pydicom reads
a file that ends early as if it ended there: a value it skips is seeked past
the end, a tag cut short reads as the end of the data set. So a file cut
anywhere would be recorded. :func:`cut_reason` checks, from where the header
read stopped, that every element, every item of an undefined length (what
compressed pixel data is made of) and every sequence's delimiter is there
whole, by reading their 8- or 12-byte headers and seeking over their values:
a few small reads per file, whatever the size of the pixel data.

A file that ends exactly between two elements before any pixel data cannot
be told by its bytes from a shorter object, such as an image written without
its pixel data on purpose: it is recorded (README, "Failure modes").
"""

from __future__ import annotations

import os
import struct
from typing import Any

import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag

# Pixel data elements (also Float and Double Float Pixel Data): the header
# read stops at the first of them.
PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})
# VRs whose explicit header is 12 bytes long (PS3.5, Table 7.1-1).
_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
# What writers and media pad a file with after its last element: zeros up
# to a sector or a block, a newline. Not a cut.
_PADDING = b"\0 \r\n\t"
# A tail longer than this is no padding, whatever it holds.
_LONGEST_PADDING = 1 << 20
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_TRAILING_PADDING = 0xFFFCFFFC
_UNDEFINED = 0xFFFFFFFF


class _Cut(Exception):
    """The file ends before the element being walked does; the message says where."""


def cut_reason(file: Any, dataset: Dataset) -> str:
    """Why ``file`` ends early ("" when it is whole), given the ``dataset``
    pydicom read from it with ``stop_before_pixels`` and the file positioned
    where that read stopped.

    Deflated files are not checked: their positions are in the inflated
    stream, not the file.
    """
    implicit, little = dataset.original_encoding
    syntax = getattr(dataset.get("file_meta"), "TransferSyntaxUID", None)
    if implicit is None or little is None or syntax == pydicom.uid.DeflatedExplicitVRLittleEndian:
        return ""
    size = os.fstat(file.fileno()).st_size
    walker = _Walker(file, size, "<" if little else ">", implicit)
    stopped = file.tell()
    try:
        if stopped < size:
            # The reader stops early only at pixel data: walk it and what follows.
            walker.elements(stopped)
            return ""
        # The header ran to the end of the file, or past it when the last
        # value was skipped rather than read: walk on from the last element
        # the reader kept, the rest of the header is what can be cut.
        kept_end = _last_kept_end(dataset, size)
        if kept_end:
            walker.elements(kept_end)
    except _Cut as cut:
        return f"truncated: the file ends {cut}"
    if stopped > size:
        return "truncated: the file ends inside an element's value"
    return ""


def _last_kept_end(dataset: Dataset, size: int) -> int:
    """Where the last element the reader kept ends; a value the file does not
    hold whole raises :class:`_Cut`."""
    end = 0
    for tag in dataset.keys():  # noqa: SIM118 - iterating a Dataset converts every element
        element = dataset.get_item(tag)
        if isinstance(element, RawDataElement) and element.length != _UNDEFINED:
            element_end = element.value_tell + element.length
            if element_end > size:
                raise _Cut(f"{element_end - size} bytes before the end of element {Tag(tag)}")
            end = max(end, element_end)
    return end


class _Walker:
    """Walks element and item headers from a position to the end of the file,
    seeking over defined-length values; raises :class:`_Cut` where the file
    ends inside one."""

    def __init__(self, file: Any, size: int, order: str, implicit: bool) -> None:
        self.file = file
        self.size = size
        self.order = order
        self.implicit = implicit
        self.top: int | None = None  # the top-level element being walked

    def elements(self, position: int) -> None:
        """Walk top-level elements until the end of the file. A Data Set
        Trailing Padding element cut short after whole pixel data, and a
        tail of padding bytes anywhere, are not cuts: writers and media pad
        files (a sector's zeros, a newline), and the image is whole. Other
        bytes after the pixel data that are no element are refused: pydicom
        reads such a file as an empty data set."""
        after_pixels = False
        while position < self.size:
            try:
                tag, length, header = self.header(position, top=True)
                self.top = tag
                end = self.value_end(position + header, length)
            except _Cut:
                if (after_pixels and self.top == _TRAILING_PADDING) or self.padding(position):
                    return
                raise
            after_pixels = after_pixels or tag in PIXEL_TAGS
            position = end

    def padding(self, position: int) -> bool:
        """Whether the file from ``position`` on is padding bytes only."""
        if self.size - position > _LONGEST_PADDING:
            return False
        self.file.seek(position)
        return not self.file.read().strip(_PADDING)

    def value_end(self, start: int, length: int, part: str = "") -> int:
        if length == _UNDEFINED:
            if self.top in PIXEL_TAGS and not part:
                last = self.last_frame(start)
                if last != start:
                    try:
                        return self.items(last)
                    except _Cut:
                        pass  # an offset table that points amiss: walk every item
            return self.items(start)
        end = start + length
        if end > self.size:
            raise _Cut(f"{end - self.size} bytes before the end of {part}{self.where()}")
        return end

    def last_frame(self, position: int) -> int:
        """Where to walk compressed pixel data from: its last frame, found in
        the Basic Offset Table (the first item), when that table is there and
        an item starts where it says; else its first item.

        Only the end of a file can be missing, so the frames before the last
        are there; walking their fragments (one seek and read each, some
        thousands in a long cine or a slide) would cost more than the rest of
        the header read."""
        tag, length, header = self.header(position)
        first = position + header + length  # the first item after the table
        if tag != _ITEM or length < 8 or length % 4 or first > self.size:
            return position
        self.file.seek(first - 4)
        (offset,) = struct.unpack(self.order + "I", self.file.read(4))
        last = first + offset
        if last + 8 > self.size or self.header(last)[0] != _ITEM:
            return position
        return last

    def items(self, position: int) -> int:
        """Walk the items of an undefined-length value up to its sequence
        delimiter (encapsulated pixel data and sequences alike)."""
        while True:
            tag, length, header = self.header(position)
            position += header
            if tag == _SEQUENCE_END:
                return position
            if tag == _ITEM and length == _UNDEFINED:
                position = self.item_elements(position)
            else:
                position = self.value_end(position, length, "an item of ")

    def item_elements(self, position: int) -> int:
        """Walk the elements of an undefined-length item up to its delimiter."""
        while True:
            tag, length, header = self.header(position)
            position += header
            if tag == _ITEM_END:
                return position
            position = self.value_end(position, length)

    def header(self, position: int, top: bool = False) -> tuple[int, int, int]:
        """An element's tag, value length and header size at ``position``."""
        self.file.seek(position)
        head = self.file.read(12)
        if len(head) < 8:
            if top and len(head) >= 4:
                group, element = struct.unpack(self.order + "HH", head[:4])
                self.top = group << 16 | element
                raise _Cut(f"inside the header of {self.where()}")
            if top:
                raise _Cut("inside an element's tag")
            if not head:
                raise _Cut(f"before the delimiter that ends {self.where()}")
            raise _Cut(f"inside an item's header in {self.where()}")
        group, element = struct.unpack(self.order + "HH", head[:4])
        vr = head[4:6]
        # Items have no VR; pydicom reads a VR that is not two capitals as an
        # element written implicitly, whatever the syntax says.
        if group == 0xFFFE or self.implicit or not (vr.isalpha() and vr.isupper()):
            return group << 16 | element, struct.unpack(self.order + "I", head[4:8])[0], 8
        if vr in _LONG_VRS:
            if len(head) < 12:
                if top:
                    self.top = group << 16 | element
                raise _Cut(f"inside the header of {self.where()}")
            return group << 16 | element, struct.unpack(self.order + "I", head[8:12])[0], 12
        return group << 16 | element, struct.unpack(self.order + "H", head[6:8])[0], 8

    def where(self) -> str:
        if self.top is None:
            return "an element"
        if self.top in PIXEL_TAGS:
            return "its pixel data"
        return f"element {Tag(self.top)}"
