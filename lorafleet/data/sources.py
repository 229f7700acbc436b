"""Where the public data sets come from: URL, archive format, pinned checksum, license.

``lorafleet data fetch NAME`` (lorafleet/data/fetch.py) downloads :data:`SOURCES` ``[NAME].url``,
refuses it unless its digest is the pinned one, and converts it to the layout
lorafleet/data/datasets.py reads (``sst2/{train,dev,test}.tsv``,
``20newsgroups/{train,test}.jsonl.gz`` + ``classes.txt``).

The pins are the archives' own, recorded by the libraries that fetch them:

* SST-2: GLUE's ``SST-2.zip``. No sha256 of it is recorded in this repository's sources
  (``/work/shared/data/sst2/SOURCE.md`` records the md5 of the extracted files only); torchtext's
  SST2 loader pins the zip's md5 ``9f81648d4199384278b86e315dac217c`` and the extracted
  ``train.tsv``'s md5 ``da409a0a939379ed32a470bc0f7fe99a``, which is the md5 SOURCE.md records for
  the ``train.tsv`` lorafleet was measured on. So this pin is an md5 (the digest known), not a sha256.
* 20 Newsgroups: Jason Rennie's ``20news-bydate.tar.gz``, sha256
  ``8f1b2514ca22a5ade8fbb9cfa5727df95fa587f4c87b786e15c759fa66d95610`` (the checksum scikit-learn's
  ``fetch_20newsgroups`` pins for the same archive on its figshare mirror).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

#: How an archive is converted: GLUE's SST-2 zip, or the 20news-bydate tarball.
ArchiveFormat = Literal["glue_sst2_zip", "newsgroups_bydate_tar"]


@dataclass(frozen=True)
class Source:
    """A public data set's archive: ``pin`` is ``ALGORITHM:HEXDIGEST`` (``sha256:...`` or ``md5:...``)."""

    name: str
    url: str
    pin: str
    archive: ArchiveFormat
    license: str
    cite: str


SOURCES: dict[str, Source] = {
    "sst2": Source(
        name="sst2",
        url="https://dl.fbaipublicfiles.com/glue/data/SST-2.zip",
        pin="md5:9f81648d4199384278b86e315dac217c",
        archive="glue_sst2_zip",
        license="GLUE's distribution of the Stanford Sentiment Treebank, for research use",
        cite="Socher et al. 2013 (SST); Wang et al. 2018 (GLUE)",
    ),
    "20newsgroups": Source(
        name="20newsgroups",
        url="http://qwone.com/~jason/20Newsgroups/20news-bydate.tar.gz",
        pin="sha256:8f1b2514ca22a5ade8fbb9cfa5727df95fa587f4c87b786e15c759fa66d95610",
        archive="newsgroups_bydate_tar",
        license="none stated; public Usenet posts collected by Ken Lang, distributed freely for research",
        cite="Lang 1995 (NewsWeeder); the 'bydate' split by Jason Rennie",
    ),
}
