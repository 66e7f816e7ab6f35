"""WebDataset tar shards as samples: one pass with the standard ``tarfile`` (stream mode, gzip allowed), continued
where the store broke off.

Members are grouped into samples as WebDataset does: the key is the member path up to the first dot of its
base name, the rest its extension (``000000001.jpg``, ``.json``, ``.txt``). Only image members are read (an
extension Pillow reads; ``--image-column EXT``: that one); the image is ``jpg`` first, then ``jpeg``, ``png``,
``webp``, then any. Other members, links, devices, FIFOs and hidden files are passed over unread.

- **Limits.** A sample whose image members hold more than ``max_sample_bytes`` in all is not read (a member's
  header gives its size, a sparse member's its full size) and becomes an error row; an extended header (pax,
  GNU long name) over ``HEADER_LIMIT`` breaks the shard. Only one sample's bytes are held at a time.
- **Repeats.** A member whose extension the sample already has starts the next sample, under the same key
  (``SampleKeys`` makes it unique), so two images named alike are two rows.
- **Damage.** A tar that ends inside a member or a header, or without its end-of-archive blocks (a cut
  download, a truncated ``.tar.gz``), gives the samples before the damage, then one error row naming where it
  broke. (``tarfile`` itself takes a header cut short for the end of the archive.)
- **Resume.** The position of a sample is the offset of its first member in the uncompressed tar. After a
  transient failure a plain tar is reopened at the next sample's byte (a ranged read on an object store); a
  compressed one is read again from its start, the members before that offset passed over.
"""
from __future__ import annotations

import posixpath
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field

from sat_export.faults import INPUT, IO, Retrying, error_kind, transient
from sat_export.options import SourceOptions
from sat_export.pipeline.inputs import InputItem
from sat_export.pipeline.shard_samples import SampleKeys, Shard, resumable, sample_item, shard_error
from sat_export.pipeline.stores import over_limit
from training.errors import first_line
from training.images import image_suffixes

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # preferred, in this order, when a sample holds several images
HEADER_LIMIT = 2**20  # bytes of one extended header (a pax record set, a GNU long name)
EXTENDED = {tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME,
            tarfile.GNUTYPE_LONGLINK}
END = -1  # the position after the last sample
DAMAGE = (tarfile.TarError, EOFError, OSError, ValueError, zlib.error)  # what a damaged or unreadable tar raises


class _StrictInfo(tarfile.TarInfo):
    """Headers as ``tarfile`` reads them, except that one cut short after the first is an error (``tarfile``
    ends the archive there), and an extended header over ``HEADER_LIMIT`` is refused before it is read."""

    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError) as err:
            if tar.offset == 0:
                raise
            raise tarfile.SubsequentHeaderError(f"{err}: the tar ends before its end-of-archive blocks") from None

    def _proc_member(self, tar):
        if self.type in EXTENDED and self.size > HEADER_LIMIT:
            raise tarfile.SubsequentHeaderError(f"an extended header of {self.size:,} bytes")
        return super()._proc_member(tar)


def split_member(name: str) -> tuple[str, str]:
    """WebDataset's split of a member name: ``dir/000001.seg.png`` -> (``dir/000001``, ``seg.png``)."""
    folder, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return posixpath.join(folder, stem) if folder else stem, ext.lower()


@dataclass
class _Sample:
    """The members of one sample read so far: every extension, the image members' bytes."""

    key: str
    exts: list[str] = field(default_factory=list)
    images: dict[str, bytes] = field(default_factory=dict)
    size: int = 0  # of its image members, read or not


def tar_samples(shard: Shard, sources: SourceOptions, retrying: Retrying) -> Iterator[InputItem]:
    """The samples of a tar shard, in order; a damaged one ends with one error item named after the shard."""
    reader = _TarReader(shard, sources)
    try:
        yield from resumable(shard, retrying, reader.read, 0)
    except DAMAGE as err:
        where = f"after {reader.last}" if reader.last else "at its start"
        kind = error_kind(err)
        what = "cannot read tar" if kind == IO else "truncated or corrupt tar"
        yield shard_error(shard, f"{what}, broken {where} ({first_line(err)})", kind)


class _TarReader:
    def __init__(self, shard: Shard, sources: SourceOptions):
        self.shard, self.column, self.limit = shard, sources.image_column, sources.max_sample_bytes
        self.keys = SampleKeys()
        self.suffixes = image_suffixes()
        self.last: str | None = None  # the last member passed, for the error row
        self.compressed: bool | None = None  # known once the tar has been opened

    def read(self, start: int) -> Iterator[tuple[InputItem, int]]:
        """The samples from the one whose first member is at ``start``, each with the next one's offset."""
        if start == END:
            return
        with self.shard.fs.open(self.shard.path, "rb") as f:
            seek = start > 0 and self.compressed is False and f.seekable()
            if seek:
                f.seek(start)
            with tarfile.open(fileobj=f, mode="r|" if seek else "r|*", tarinfo=_StrictInfo) as tar:
                self.compressed = tar.fileobj.comptype != "tar"
                base, sample = start if seek else 0, None
                while True:
                    try:
                        member = tar.next()
                    except DAMAGE as err:  # the sample read whole before the damage is kept, unless it is read again
                        if sample is not None and not transient(err):
                            yield self._item(sample), END
                        raise
                    if member is None:
                        break
                    tar.members.clear()  # stream mode keeps every header read; nothing here needs them
                    offset = base + member.offset
                    if offset < start:
                        continue
                    if member.isfile() and not posixpath.basename(member.name).startswith("."):
                        key, ext = split_member(member.name)
                        if sample is not None and (key != sample.key or ext in sample.exts):
                            yield self._item(sample), offset
                            sample = None
                        sample = sample or _Sample(key)
                        self._add(sample, tar, member, ext)
                    self.last = member.name
        if sample is not None:
            yield self._item(sample), END

    def _add(self, sample: _Sample, tar: tarfile.TarFile, member: tarfile.TarInfo, ext: str) -> None:
        sample.exts.append(ext)
        wanted = ext == self.column if self.column is not None else "." + ext.rsplit(".", 1)[-1] in self.suffixes
        if not wanted:
            return
        sample.size += member.size
        if sample.size > self.limit:
            sample.images.clear()  # over the limit: nothing more of it is read
        else:
            sample.images[ext] = tar.extractfile(member).read()

    def _item(self, sample: _Sample) -> InputItem:
        key = self.keys.unique(sample.key)
        if sample.size > self.limit:
            return sample_item(self.shard, key, error=over_limit("the sample's image", sample.size, self.limit),
                               error_kind=INPUT)
        if not sample.images:
            what = f"no {self.column!r} member" if self.column else "no image member"
            return sample_item(self.shard, key, error=f"sample has {what} (members: {', '.join(sorted(sample.exts))})",
                               error_kind=INPUT)
        ext = min(sample.images, key=lambda e: IMAGE_EXTS.index(e) if e in IMAGE_EXTS else len(IMAGE_EXTS))
        return sample_item(self.shard, key, data=sample.images[ext])
