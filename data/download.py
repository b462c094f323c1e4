"""Download, cache and load the full rMD17 and original MD17 (sGDML) data sets.

Sources:

* rMD17 — A. S. Christensen & O. A. von Lilienfeld, "On the role of gradients for machine learning of
  molecular energies and forces", Mach. Learn.: Sci. Technol. 1, 045018 (2020), arXiv:2007.09593.
  Archive ``rmd17.tar.bz2`` from figshare (:data:`RMD17_URL`) holding
  ``rmd17/npz_data/rmd17_<mol>.npz`` (100,000 frames each; kcal/mol, kcal/mol/Å, Å) and
  ``rmd17/splits/index_{train,test}_0{1..5}.csv`` (0-based frame indices, 1,000 each).
* MD17 — S. Chmiela et al., "Machine learning of accurate energy-conserving molecular force fields",
  Sci. Adv. 3, e1603015 (2017). sGDML npz files (keys R, z, E, F; kcal/mol) from
  :data:`MD17_BASE_URL` (names in :data:`MD17_FILES`).

Files are cached in ``$EQUIFORCE_CACHE`` or ``~/.cache/equiforce`` (see :func:`cache_dir`).
Downloads go to a temporary file in the cache directory and are renamed into place only when
complete and verified. Without network access, place the file in the cache directory by hand;
the error message says where.

Checksums: :data:`KNOWN_SHA256` maps file names to SHA-256 digests that are verified. No digest of
the upstream files could be verified when this module was written, so the table starts empty: for
a file without a known digest the computed SHA-256 is recorded next to it as ``<file>.sha256`` on
first use (trust on first use), and later uses verify the file against that record.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from equiforce.atomic import atomic_path, atomic_write_bytes
from equiforce.data.errors import DataError
from equiforce.data.readers import read_md17_npz, read_rmd17_npz
from equiforce.data.splits import read_index_file, split_by_indices
from equiforce.data.structures import StructureSet

__all__ = [
    "KNOWN_SHA256",
    "MD17_BASE_URL",
    "MD17_FILES",
    "RMD17_ARCHIVE",
    "RMD17_MOLECULES",
    "RMD17_URL",
    "cache_dir",
    "extract_rmd17",
    "fetch",
    "fetch_md17",
    "fetch_rmd17",
    "load_md17",
    "load_rmd17",
    "load_rmd17_full_split",
    "load_rmd17_split",
    "sha256_file",
]

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike

RMD17_URL = "https://figshare.com/ndownloader/files/23950376"
RMD17_ARCHIVE = "rmd17.tar.bz2"
RMD17_MOLECULES: tuple[str, ...] = (
    "aspirin",
    "azobenzene",
    "benzene",
    "ethanol",
    "malonaldehyde",
    "naphthalene",
    "paracetamol",
    "salicylic",
    "toluene",
    "uracil",
)
RMD17_SPLITS = (1, 2, 3, 4, 5)

MD17_BASE_URL = "http://www.quantum-machine.org/gdml/data/npz/"
#: molecule → sGDML file name (the 2017 MD17 set; benzene is the corrected "benzene2017" release).
MD17_FILES: dict[str, str] = {
    "aspirin": "md17_aspirin.npz",
    "azobenzene": "azobenzene_dft.npz",
    "benzene": "md17_benzene2017.npz",
    "ethanol": "md17_ethanol.npz",
    "malonaldehyde": "md17_malonaldehyde.npz",
    "naphthalene": "md17_naphthalene.npz",
    "paracetamol": "paracetamol_dft.npz",
    "salicylic": "md17_salicylic.npz",
    "toluene": "md17_toluene.npz",
    "uracil": "md17_uracil.npz",
}

#: file name → expected SHA-256 hex digest. Empty: no upstream digest could be verified offline.
KNOWN_SHA256: dict[str, str] = {}

_ALIASES = {"salicylic_acid": "salicylic", "salicylic acid": "salicylic", "salicylicacid": "salicylic"}


def _molecule(name: str, known: tuple[str, ...] | list[str]) -> str:
    mol = _ALIASES.get(str(name).strip().lower(), str(name).strip().lower())
    if mol not in known:
        raise DataError(f"unknown molecule {name!r}; known: {sorted(known)}")
    return mol


def _split(split: int) -> int:
    if split not in RMD17_SPLITS:
        raise DataError(f"rMD17 split must be one of {RMD17_SPLITS}, got {split!r}")
    return int(split)


def cache_dir(cache: PathLike | None = None) -> Path:
    """The download cache directory (created if needed).

    Order: the ``cache`` argument, ``$EQUIFORCE_CACHE``, ``~/.cache/equiforce``.

    Raises:
      DataError: the directory cannot be created.
    """
    default = os.environ.get("EQUIFORCE_CACHE") or "~/.cache/equiforce"
    root = Path(cache if cache is not None else default).expanduser()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(f"cannot create cache directory {root}: {err}") from err
    return root


def sha256_file(path: PathLike, block: int = 1 << 20) -> str:
    """SHA-256 hex digest of a file, read in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def _verify(dest: Path, expected: str | None) -> None:
    """Check ``dest`` against ``expected`` or its recorded digest; record the digest if neither exists."""
    actual = sha256_file(dest)
    record = dest.with_name(dest.name + ".sha256")
    if expected:
        if actual != expected.lower():
            raise DataError(f"{dest}: SHA-256 mismatch (expected {expected}, got {actual}); delete the file and retry")
        return
    if record.is_file():
        recorded = record.read_text().split()[0] if record.read_text().split() else ""
        if recorded != actual:
            raise DataError(
                f"{dest}: SHA-256 {actual} differs from the digest {recorded} recorded in {record} on first "
                "use; the file changed (delete both files to re-download)"
            )
        return
    atomic_write_bytes(record, f"{actual}  {dest.name}\n".encode())
    logger.warning(
        "no known SHA-256 for %s; recorded the computed digest %s in %s (later uses are checked against it)",
        dest.name,
        actual,
        record,
    )


def fetch(
    url: str,
    filename: str,
    cache: PathLike | None = None,
    sha256: str | None = None,
    timeout: float = 60.0,
) -> Path:
    """Return the cached file ``<cache>/<filename>``, downloading it from ``url`` if absent.

    The download streams into a temporary file in the cache directory, is hashed, verified and
    renamed into place (:func:`equiforce.atomic.atomic_path`), so a partial download never appears under the final
    name; the file gets the usual permissions (``0o666`` less the umask).
    The SHA-256 is checked against ``sha256``, else :data:`KNOWN_SHA256`, else the digest recorded
    in ``<file>.sha256`` (which is written on first use when no digest is known).

    Raises:
      DataError: the download failed (offline, HTTP error; the message names the URL and the path to
        place the file at manually), or a checksum mismatch.
    """
    root = cache_dir(cache)
    dest = root / filename
    expected = sha256 or KNOWN_SHA256.get(filename)
    if dest.is_file():
        _verify(dest, expected)
        return dest
    logger.info("downloading %s to %s", url, dest)
    with atomic_path(dest) as tmp:
        try:
            with open(tmp, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
                shutil.copyfileobj(resp, out, 1 << 20)
        except (urllib.error.URLError, OSError, ValueError) as err:
            raise DataError(
                f"could not download {url} ({type(err).__name__}: {err}). If this machine is offline, "
                f"download the file elsewhere and place it at {dest}"
            ) from err
        if expected:
            actual = sha256_file(tmp)
            if actual != expected.lower():
                raise DataError(f"download of {url} has SHA-256 {actual}, expected {expected}")
    _verify(dest, expected)
    return dest


def fetch_rmd17(cache: PathLike | None = None, timeout: float = 600.0) -> Path:
    """The full rMD17 archive ``rmd17.tar.bz2`` (cached; downloaded from :data:`RMD17_URL` if absent).

    Source: Christensen & von Lilienfeld, arXiv:2007.09593 (figshare dataset 12672038).

    Raises:
      DataError: download failure (offline: place ``rmd17.tar.bz2`` in the cache dir) or bad checksum.
    """
    return fetch(RMD17_URL, RMD17_ARCHIVE, cache=cache, timeout=timeout)


def fetch_md17(molecule: str, cache: PathLike | None = None, timeout: float = 600.0) -> Path:
    """The original MD17 sGDML npz file of ``molecule`` (cached; from :data:`MD17_BASE_URL`).

    Source: Chmiela et al., Sci. Adv. 3, e1603015 (2017).

    Raises:
      DataError: unknown molecule, download failure or bad checksum.
    """
    mol = _molecule(molecule, list(MD17_FILES))
    name = MD17_FILES[mol]
    return fetch(MD17_BASE_URL + name, name, cache=cache, timeout=timeout)


def load_md17(molecule: str, cache: PathLike | None = None) -> StructureSet:
    """All frames of an original MD17 molecule in eV, eV/Å, Å (downloaded/cached as needed).

    Source: Chmiela et al., Sci. Adv. 3, e1603015 (2017); the sGDML files store kcal/mol.

    Raises:
      DataError: unknown molecule, download failure, bad checksum or bad file.
    """
    return read_md17_npz(fetch_md17(molecule, cache=cache), energy_unit="kcal/mol", length_unit="Å")


def _find_rmd17_root(path: Path) -> Path | None:
    for cand in (path, path / "rmd17"):
        if (cand / "npz_data").is_dir():
            return cand
    return None


def extract_rmd17(archive: PathLike, dest: PathLike | None = None) -> Path:
    """Extract an ``rmd17.tar.bz2`` archive once and return the ``rmd17`` folder (with ``npz_data/``).

    Extraction goes into a temporary directory beside the target and is renamed into place, with
    tarfile's ``"data"`` filter (no absolute paths, links out of the tree or device files).

    Args:
      archive: the tarball.
      dest: directory to extract into (default: the archive's directory); the result is ``dest/rmd17``.

    Raises:
      DataError: missing or corrupt archive, or no ``npz_data`` folder in it.
    """
    archive = Path(archive)
    dest = Path(dest) if dest is not None else archive.parent
    target = dest / "rmd17"
    if (target / "npz_data").is_dir():
        return target
    if not archive.is_file():
        raise DataError(f"{archive}: no such archive")
    dest.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".rmd17-extract-", dir=dest))
    try:
        try:
            with tarfile.open(archive, "r:*") as tar:
                tar.extractall(tmp, filter="data")
        except (tarfile.TarError, OSError, EOFError) as err:
            raise DataError(f"{archive}: cannot extract archive ({type(err).__name__}: {err})") from err
        root = _find_rmd17_root(tmp)
        if root is None:
            raise DataError(f"{archive}: no rmd17/npz_data folder in the archive")
        os.replace(root, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_rmd17_full_split(
    source: PathLike, molecule: str, split: int = 1, extract_dir: PathLike | None = None
) -> tuple[StructureSet, StructureSet]:
    """Train and test sets of official rMD17 split ``split`` from the full data set.

    Reads ``npz_data/rmd17_<molecule>.npz`` and selects the frames listed (0-based) in
    ``splits/index_train_0<split>.csv`` and ``splits/index_test_0<split>.csv``.

    Source: Christensen & von Lilienfeld, arXiv:2007.09593.

    Args:
      source: the ``rmd17.tar.bz2`` archive (extracted once, see :func:`extract_rmd17`) or an extracted
        directory (the ``rmd17`` folder or its parent).
      molecule: one of :data:`RMD17_MOLECULES`.
      split: 1..5.
      extract_dir: where to extract an archive (default: beside it).

    Returns:
      ``(train, test)`` :class:`StructureSet` s in eV, eV/Å, Å.

    Raises:
      DataError: unknown molecule or split, missing files, out-of-range or overlapping indices, bad data.
    """
    mol = _molecule(molecule, RMD17_MOLECULES)
    k = _split(split)
    source = Path(source)
    if source.is_dir():
        root = _find_rmd17_root(source)
        if root is None:
            raise DataError(f"{source}: no npz_data folder (expected an extracted rMD17 archive)")
    else:
        root = extract_rmd17(source, extract_dir)
    full = read_rmd17_npz(root / "npz_data" / f"rmd17_{mol}.npz")
    train_idx = read_index_file(root / "splits" / f"index_train_{k:02d}.csv", n=len(full))
    test_idx = read_index_file(root / "splits" / f"index_test_{k:02d}.csv", n=len(full))
    try:
        train, test = split_by_indices(full, train_idx, test_idx)
    except DataError as err:
        raise DataError(f"{root / 'splits'}: split {k:02d}: {err}") from err
    return train, test


def load_rmd17(molecule: str, split: int = 1, cache: PathLike | None = None) -> tuple[StructureSet, StructureSet]:
    """Train/test sets of official rMD17 split ``split``, downloading and extracting the archive once.

    Source: Christensen & von Lilienfeld, arXiv:2007.09593.

    Raises:
      DataError: unknown molecule or split, download failure (offline: place ``rmd17.tar.bz2`` in the
        cache dir), bad checksum or bad data.
    """
    _molecule(molecule, RMD17_MOLECULES)
    _split(split)
    root = cache_dir(cache)
    if (root / "rmd17" / "npz_data").is_dir():
        return load_rmd17_full_split(root, molecule, split)
    return load_rmd17_full_split(fetch_rmd17(cache=root), molecule, split, extract_dir=root)


def load_rmd17_split(root: PathLike, molecule: str, split: int = 1) -> tuple[StructureSet, StructureSet]:
    """Train/test sets from per-split rMD17 npz files (layout of ``andersx/rmd17-npz``).

    Reads ``<root>/rmd17_<molecule>_train_0<split>.npz`` and ``..._test_0<split>.npz`` (1,000 frames each
    in the official splits; kcal/mol converted to eV). If both files carry ``old_indices`` (the frame's
    index in the original MD17 trajectory) the two sets are checked to share no frame.

    Source: Christensen & von Lilienfeld, arXiv:2007.09593; files from GitHub andersx/rmd17-npz (CC0 1.0).

    Returns:
      ``(train, test)`` :class:`StructureSet` s in eV, eV/Å, Å.

    Raises:
      DataError: unknown molecule or split, missing/corrupt file, overlapping train and test frames.
    """
    mol = _molecule(molecule, RMD17_MOLECULES)
    k = _split(split)
    root = Path(root)
    paths = [root / f"rmd17_{mol}_{part}_{k:02d}.npz" for part in ("train", "test")]
    for p in paths:
        if not p.is_file():
            raise DataError(f"{p}: no such file (expected per-split rMD17 files in {root})")
    train, test = (read_rmd17_npz(p) for p in paths)
    old = []
    for p in paths:
        try:
            with np.load(p, allow_pickle=False) as npz:
                old.append(np.asarray(npz["old_indices"]) if "old_indices" in npz.files else None)
        except (OSError, ValueError) as err:
            raise DataError(f"{p}: cannot read old_indices ({err})") from err
    if old[0] is not None and old[1] is not None:
        shared = np.intersect1d(old[0], old[1])
        if shared.size:
            raise DataError(
                f"{root}: rMD17 {mol} split {k:02d}: train and test share {shared.size} frames "
                f"(old_indices {shared[:10].tolist()})"
            )
    return train, test
