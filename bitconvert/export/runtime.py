"""The ONNX Runtime custom-op library for ``com.bitconvert`` (TernaryMatMul, Int6MatMul, Int8MatMul, CachedAttention,
DecoderLayer): headers, build, sessions.

The library is ``csrc/ternary_ort_op.cpp``, ``csrc/lm_head_ort_op.cpp`` (the int6 and int8 lm_heads'
``com.bitconvert::Int6MatMul`` and ``::Int8MatMul``), ``csrc/attention_ort_op.cpp`` and
``csrc/decoder_layer_ort_op.cpp`` compiled together with the kernels' own core (``bitconvert/kernels/csrc/
ternary_core.cpp`` and ``int8_core.cpp``, same flags), so ONNX Runtime runs the very SIMD paths and integer products
that the PyTorch kernels run. It is compiled on first use with the system C++ compiler (``$CXX`` or ``c++``)
and cached under ``$BITCONVERT_CACHE`` or ``~/.cache/bitconvert`` in a folder keyed by the sources, the flags and
the headers, so edits rebuild and nothing is rebuilt otherwise.

The onnxruntime wheel ships no C/C++ headers. They come from ``$ORT_INCLUDE_DIR`` if set, else from Debian's
``libonnxruntime-dev`` package of the trixie suite (onnxruntime 1.21), fetched once with ``apt-get download`` from a
temporary sources list and unpacked with ``dpkg -x`` into the cache (nothing is installed). Headers are only
backward-compatible: the library asks the runtime for the headers' API version, so they must be no newer than the
installed onnxruntime, which is checked before building.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from ..errors import BitconvertError, reason
from ..kernels import CFLAGS as CORE_FLAGS
from ..kernels import CSRC as CORE_DIR
from .ops import DOMAIN

OP_DIR = Path(__file__).parent / "csrc"
OP_SOURCE = OP_DIR / "ternary_ort_op.cpp"
SOURCES = (CORE_DIR / "ternary_core.cpp", CORE_DIR / "int8_core.cpp", OP_SOURCE, OP_DIR / "lm_head_ort_op.cpp",
           OP_DIR / "attention_ort_op.cpp", OP_DIR / "decoder_layer_ort_op.cpp")
HEADERS = (CORE_DIR / "ternary_core.h", CORE_DIR / "int8_core.h", CORE_DIR / "avxvnni.h", CORE_DIR / "fast_exp.h",
           CORE_DIR / "attention_core.h", CORE_DIR / "norm_core.h", CORE_DIR / "fp16.h",
           OP_DIR / "ort_op_common.h", OP_DIR / "ternary_job.h", OP_DIR / "attention_job.h")
FLAGS = ["-std=c++17", "-shared", "-fPIC", "-fvisibility=hidden", *CORE_FLAGS]
LIBRARY_NAME = "libbitconvert_ort.so"
HEADERS_PACKAGE = "libonnxruntime-dev"
HEADERS_SUITE = "trixie"
DEBIAN_MIRROR = "http://deb.debian.org/debian"


def cache_root() -> Path:
    return Path(os.environ.get("BITCONVERT_CACHE") or Path.home() / ".cache" / "bitconvert")


def header_api_version(include_dir: Path) -> int:
    """``ORT_API_VERSION`` of the headers in ``include_dir`` (the onnxruntime minor version they belong to)."""
    match = re.search(r"#define\s+ORT_API_VERSION\s+(\d+)", (include_dir / "onnxruntime_c_api.h").read_text())
    if match is None:
        raise BitconvertError(f"{include_dir}/onnxruntime_c_api.h defines no ORT_API_VERSION; not onnxruntime headers")
    return int(match.group(1))


def runtime_api_version() -> int:
    """The minor version of the installed onnxruntime (its C API version)."""
    import onnxruntime

    return int(onnxruntime.__version__.split(".")[1])


def _download_debian_headers(target: Path) -> None:
    """Unpack the include folder of Debian's libonnxruntime-dev into ``target`` (apt-get download + dpkg -x)."""
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        raise BitconvertError(
            "the onnxruntime C/C++ headers are needed to build the TernaryMatMul library: set ORT_INCLUDE_DIR to the "
            "include folder of an onnxruntime release no newer than the installed one (no apt-get here to fetch them)"
        )
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        (work / "lists" / "partial").mkdir(parents=True)
        (work / "cache" / "archives" / "partial").mkdir(parents=True)
        sources = work / "sources.list"
        sources.write_text(f"deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] {DEBIAN_MIRROR} "
                           f"{HEADERS_SUITE} main\n")
        options = ["-o", f"Dir::Etc::SourceList={sources}", "-o", "Dir::Etc::SourceParts=/dev/null",
                   "-o", f"Dir::State::Lists={work / 'lists'}", "-o", f"Dir::Cache={work / 'cache'}",
                   "-o", "APT::Sandbox::User=root", "-qq"]
        steps = [["apt-get", *options, "update"], ["apt-get", *options, "download", f"{HEADERS_PACKAGE}/{HEADERS_SUITE}"]]
        for step in steps:
            result = subprocess.run(step, cwd=work, capture_output=True, text=True)
            if result.returncode != 0:
                raise BitconvertError(
                    f"could not fetch {HEADERS_PACKAGE} from Debian {HEADERS_SUITE} ({result.stderr.strip()[-200:]}); "
                    "set ORT_INCLUDE_DIR to an onnxruntime include folder instead")
        package = next(work.glob(f"{HEADERS_PACKAGE}_*.deb"), None)
        unpacked = package and subprocess.run(["dpkg", "-x", str(package), str(work / "root")], capture_output=True)
        if not unpacked or unpacked.returncode != 0:
            raise BitconvertError(
                f"could not unpack {HEADERS_PACKAGE} from Debian {HEADERS_SUITE} (the Debian keyring and apt are "
                "needed); set ORT_INCLUDE_DIR to an onnxruntime include folder instead")
        staged = target.with_name(target.name + ".partial")
        shutil.rmtree(staged, ignore_errors=True)
        shutil.copytree(work / "root" / "usr" / "include" / "onnxruntime", staged)
        staged.replace(target)


def ort_include_dir() -> Path:
    """A folder with ``onnxruntime_cxx_api.h`` whose API version the installed onnxruntime supports."""
    configured = os.environ.get("ORT_INCLUDE_DIR")
    if configured:
        include_dir = Path(configured)
        if not (include_dir / "onnxruntime_cxx_api.h").is_file():
            raise BitconvertError(f"ORT_INCLUDE_DIR='{configured}' has no onnxruntime_cxx_api.h")
    else:
        include_dir = cache_root() / "onnxruntime-headers" / HEADERS_SUITE
        if not (include_dir / "onnxruntime_cxx_api.h").is_file():
            include_dir.parent.mkdir(parents=True, exist_ok=True)
            _download_debian_headers(include_dir)
    headers, runtime = header_api_version(include_dir), runtime_api_version()
    if headers > runtime:
        raise BitconvertError(
            f"the onnxruntime headers in {include_dir} are for 1.{headers}, newer than the installed onnxruntime "
            f"1.{runtime}; upgrade onnxruntime or set ORT_INCLUDE_DIR to headers of 1.{runtime} or older")
    return include_dir


def _compiler() -> str:
    compiler = os.environ.get("CXX") or "c++"
    if shutil.which(compiler) is None:
        raise BitconvertError(f"no C++ compiler '{compiler}' to build the TernaryMatMul library (install g++ or set CXX)")
    return compiler


def build_library(include_dir: Path) -> Path:
    """Compile the library into the cache unless an identical build is there; returns its path."""
    compiler = _compiler()
    digest = hashlib.sha256(" ".join([compiler, *FLAGS]).encode())
    for path in (*SOURCES, *HEADERS, include_dir / "onnxruntime_c_api.h"):
        digest.update(path.read_bytes())
    folder = cache_root() / "ort_ops" / digest.hexdigest()[:16]
    library = folder / LIBRARY_NAME
    if library.is_file():
        return library
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / f"{LIBRARY_NAME}.{os.getpid()}.partial"
    command = [compiler, *FLAGS, f"-I{CORE_DIR}", f"-I{OP_DIR}", f"-I{include_dir}", *map(str, SOURCES), "-o",
               str(partial)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        partial.unlink(missing_ok=True)
        raise BitconvertError(f"building the TernaryMatMul library failed: {result.stderr.strip()[-400:]}")
    partial.replace(library)  # atomic: concurrent builders never see a half-written library
    return library


def custom_op_library() -> str:
    """Path of the compiled TernaryMatMul library for ``SessionOptions.register_custom_ops_library``."""
    return str(build_library(ort_include_dir()))


def uses_custom_op(path: str | os.PathLike) -> bool:
    """True if the ONNX model at ``path`` declares the ``com.bitconvert`` domain; raises for an unreadable file."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise BitconvertError(f"'{path}' is not a readable ONNX model ({type(exc).__name__})") from None
    return any(opset.domain == DOMAIN for opset in model.opset_import)


def session(path: str | os.PathLike, options=None, library: str | os.PathLike | None = None):
    """An ``onnxruntime.InferenceSession`` (CPU) for ``path``, with the TernaryMatMul library registered if the model
    uses it. ``options``: your ``SessionOptions``; ``library``: a prebuilt library instead of :func:`custom_op_library`.
    Problems (unreadable model, library missing, failing to load or not matching the model) raise BitconvertError."""
    import onnxruntime as ort

    if not Path(path).is_file():
        raise BitconvertError(f"no such ONNX model: '{path}'")
    options = options or ort.SessionOptions()
    if uses_custom_op(path):
        library = str(library or custom_op_library())
        if not Path(library).is_file():
            raise BitconvertError(f"the TernaryMatMul library '{library}' does not exist")
        try:
            options.register_custom_ops_library(library)
        except Exception as exc:
            raise BitconvertError(f"cannot load the TernaryMatMul library '{library}': {reason(exc)}") from None
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise BitconvertError(f"ONNX Runtime cannot run '{path}': {reason(exc)}") from None
