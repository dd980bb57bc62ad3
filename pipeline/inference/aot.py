"""Networks compiled ahead of time, once per model version and platform (``torch.export`` + AOTInductor).

``torch.compile`` pays its compile (about 10 s on 2 cores) in every process, so a short
``predict`` job never earns it back. An AOTInductor package is compiled once, stored in
the per-user cache (:func:`pipeline.data.cache_root` ``/compiled``) and loaded by every
later process in well under a second.

A package is found by its key: a hash of the weights and architecture, the torch
version, the device type, the precision (float32, or bfloat16 autocast on a CPU) and the
exact input shape (the engine always feeds full batches of one window shape). A sidecar
JSON repeats the key; a package whose sidecar does not match what is asked for is
rebuilt, never trusted. A package that does not
load, or whose predictions (softmax probabilities over the channel axis) differ from the
eager network's by more than :data:`TOLERANCE` when it is built, is not used: the engine
goes on with ``torch.compile`` or the eager network, with one log line. The rejection is
remembered beside the would-be package, so later processes do not pay the build again.

Logits are not compared directly: a trained network's logits reach 15 or more, where
float32 kernels that sum in another order differ by about 1e-4 while the probabilities
agree to 3e-5. A bfloat16 package is held to :data:`TOLERANCE_BF16` against the eager network
under the same autocast: the two round bf16 products in different orders.

The cache has a size cap, ``registry.compiled_cache_max_gb`` (:data:`DEFAULT_MAX_GB` where no
config is loaded): every package loaded is marked used (its time), and after each build the
packages used longest ago are deleted, with their sidecars, until the rest fit; the one just built
never is. A process that had loaded a package before it was deleted keeps running it (the loader
has it open); one that looks for it later builds it again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
import weakref
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from pipeline.config.schema import RegistryConfig
from pipeline.data import cache_root, write_text_atomic

logger = logging.getLogger(__name__)

#: The largest difference in probability from the eager network a freshly built package may show.
TOLERANCE = 1e-4
#: The same for a bfloat16 package against the eager network in bfloat16 autocast (8 bits of mantissa:
#: the 20-minute hippocampus model's logits differ by up to 0.08 between the two on random input).
TOLERANCE_BF16 = 5e-2
SUFFIX = ".pt2"
#: ``registry.compiled_cache_max_gb`` where no config is loaded.
DEFAULT_MAX_GB = RegistryConfig.compiled_cache_max_gb
GB = 10**9

_WEIGHTS_DIGEST: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LOADED: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}


@dataclass(frozen=True)
class AotKey:
    """What a compiled package is only valid for.

    Args:
        weights: sha256 of the network's architecture and weights.
        torch_version: ``torch.__version__`` that compiled it.
        device_type: ``cpu`` or ``cuda``.
        input_shape: the one input shape it takes.
        precision: ``float32``, or ``bfloat16`` (the network under CPU bf16 autocast).
    """

    weights: str
    torch_version: str
    device_type: str
    input_shape: tuple[int, ...]
    precision: str = "float32"

    def digest(self) -> str:
        """The key as a file name."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:32]


class Autocast(torch.nn.Module):
    """``network`` under CPU bfloat16 autocast, its output back in float32 (what is exported and compiled).

    Args:
        network: the float32 network.
    """

    def __init__(self, network: torch.nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.network(x).float()


def runnable(network: torch.nn.Module, precision: str) -> torch.nn.Module:
    """``network`` as the engine runs it on the CPU in ``precision`` (``float32`` or ``bfloat16``).

    Args:
        network: the float32 network.
        precision: resolved with :func:`pipeline.inference.accelerate.cpu_precision`.
    """
    return Autocast(network).eval() if precision == "bfloat16" else network


class _Runner:
    """A loaded package, called like the network (one tensor in, one out).

    Through torch's C++ loader directly: ``torch._inductor.aoti_load_package`` would first
    import Inductor and Dynamo, about 2 s of a short job, for nothing a loaded package needs.

    Args:
        path: the ``.pt2`` package.
    """

    def __init__(self, path: Path) -> None:
        self.loader = torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, -1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.loader.boxed_run([x])[0]


def weights_digest(network: torch.nn.Module) -> str:
    """sha256 of a network's class, parameters and buffers, cached until its weights change in place.

    Args:
        network: the network.
    """
    version = tuple(p._version for p in network.parameters())
    cached = _WEIGHTS_DIGEST.get(network)
    if cached is not None and cached[0] == version:
        return cached[1]
    h = hashlib.sha256(type(network).__qualname__.encode())
    for name, tensor in network.state_dict().items():
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    digest = h.hexdigest()
    _WEIGHTS_DIGEST[network] = (version, digest)
    return digest


def key_for(network: torch.nn.Module, input_shape: Sequence[int], device_type: str,
            precision: str = "float32") -> AotKey:
    """The key of ``network`` compiled for ``input_shape`` on ``device_type`` in ``precision`` with this torch.

    Args:
        network: the network.
        input_shape: the input it will take, batch included.
        device_type: ``cpu`` or ``cuda``.
        precision: ``float32`` or ``bfloat16``.
    """
    return AotKey(weights_digest(network), torch.__version__, device_type, tuple(int(n) for n in input_shape),
                  precision)


def package_path(key: AotKey) -> Path:
    """Where the package of ``key`` lives in the cache.

    Args:
        key: the package's key.
    """
    return cache_root() / "compiled" / f"{key.digest()}{SUFFIX}"


def _sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


def _rejection(path: Path) -> Path:
    return path.with_suffix(".rejected.json")


def rejected(key: AotKey) -> str | None:
    """Why a package for ``key`` was built and not used here before, or ``None``.

    Args:
        key: the package's key.
    """
    return rejection_reason(_rejection(package_path(key)), key)


def rejection_reason(note: Path, key: AotKey) -> str | None:
    """The reason in a rejection note written for ``key`` (a package's or an IR's), or ``None``.

    Args:
        note: the ``.rejected.json`` file beside where the network would be.
        key: what it must have been written for (a note for another key says nothing about this one).
    """
    try:
        stored = json.loads(note.read_text())
    except (OSError, ValueError):
        return None
    return str(stored.get("reason")) if stored.get("key") == json.loads(json.dumps(asdict(key))) else None


def _probabilities(logits: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits.float(), dim=1) if logits.shape[1] > 1 else torch.sigmoid(logits.float())


def sidecar_matches(sidecar: Path, key: AotKey) -> bool:
    """Whether the sidecar beside a cached network repeats ``key`` exactly (else it is never trusted).

    Args:
        sidecar: the JSON file written with the package or IR.
        key: what is asked for.
    """
    try:
        stored = json.loads(sidecar.read_text())
    except (OSError, ValueError):
        return False
    return stored == json.loads(json.dumps(asdict(key)))


def load(key: AotKey) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The compiled network of ``key`` from the cache, or ``None`` when there is none that can be trusted.

    Args:
        key: what the package must have been built for.
    """
    path = package_path(key)
    if str(path) in _LOADED:
        return _LOADED[str(path)]
    if not path.is_file():
        return None
    if not sidecar_matches(_sidecar(path), key):
        logger.warning("compiled network %s was built for another model, torch, device or shape; it will be rebuilt",
                       path.name)
        return None
    try:
        if not zipfile.is_zipfile(path):
            raise ValueError("not a package: torn or overwritten")
        runner = _Runner(path)
    except Exception as error:  # a torn or foreign file: torch raises many types
        logger.warning("compiled network %s does not load (%s); using the network without it", path.name,
                       str(error).splitlines()[0][:120] if str(error) else error.__class__.__name__)
        return None
    _LOADED[str(path)] = runner
    _mark_used(path)
    return runner


def _mark_used(path: Path) -> None:
    """Eviction goes by last use, not by when a package was built."""
    try:
        os.utime(path)
    except OSError:
        pass  # evicted meanwhile by another process: this one has it loaded already


#: OpenVINO's IR in the same cache (:mod:`pipeline.inference.openvino_runtime`): ``.ov.xml`` with ``.ov.bin``.
OV_SUFFIX = ".ov.xml"


def parts(path: Path) -> tuple[Path, ...]:
    """A cached network's files, the one looked for first: a package, its sidecar and rejection note, or an IR,
    its weights, sidecar and rejection note.

    Args:
        path: a package (``.pt2``) or an IR (``.ov.xml``) in the cache.
    """
    if path.name.endswith(OV_SUFFIX):
        stem = path.name[: -len(OV_SUFFIX)]
        return path, *(path.with_name(f"{stem}.ov.{ext}") for ext in ("bin", "json", "rejected.json"))
    return path, _sidecar(path), _rejection(path)


def packages() -> list[tuple[Path, int, float]]:
    """Every package (and OpenVINO IR) in the cache as ``(path, bytes with its sidecars, last use)``, the one used
    longest ago first."""
    folder = cache_root() / "compiled"
    found = []
    paths = [*folder.glob(f"*{SUFFIX}"), *folder.glob(f"*{OV_SUFFIX}")] if folder.is_dir() else []
    for path in paths:
        if path.name.startswith("."):
            continue  # a build in progress
        try:
            stat = path.stat()
        except OSError:
            continue  # deleted meanwhile
        size = stat.st_size + sum(p.stat().st_size for p in parts(path)[1:] if p.is_file())
        found.append((path, size, stat.st_mtime))
    return sorted(found, key=lambda f: (f[2], f[0].name))


def evict(cap_gb: float | None, keep: Path | None = None) -> list[Path]:
    """Delete the packages used longest ago until the cache holds at most ``cap_gb`` GB; never ``keep``.

    Args:
        cap_gb: ``registry.compiled_cache_max_gb`` (``None``: no cap, nothing is deleted).
        keep: the package just built.

    Returns:
        The packages deleted.
    """
    if cap_gb is None:
        return []
    found = packages()
    total = sum(size for _, size, _ in found)
    evicted = []
    for path, size, _ in found:
        if total <= cap_gb * GB:
            break
        if keep is not None and path == keep:
            continue
        # The package first: without it the sidecar alone is never taken for one.
        for part in parts(path):
            part.unlink(missing_ok=True)
        _LOADED.pop(str(path), None)
        total -= size
        evicted.append(path)
        logger.info("compiled-network cache: deleted %s (%.1f MB, the package used longest ago) to stay under %g GB",
                    path.name, size / 1e6, cap_gb)
    return evicted


def build(network: torch.nn.Module, key: AotKey,
          cache_max_gb: float | None = DEFAULT_MAX_GB) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """Compile ``network`` for ``key`` into the cache (checked against the eager network) and load it.

    Args:
        network: the network, in evaluation mode, on ``key.device_type``.
        key: the input shape, device and versions to build for.
        cache_max_gb: ``registry.compiled_cache_max_gb``: once built, the packages used longest ago are
            deleted until the cache fits it (never this one).

    Returns:
        The compiled network, or ``None`` (logged once) when this platform cannot build it.
    """
    path = package_path(key)
    why = rejected(key)
    if why is not None:
        logger.info("not compiling ahead of time: a package for this network was not used before (%s)", why)
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.{uuid.uuid4().hex[:8]}{SUFFIX}")
    device = torch.device(key.device_type)
    example = torch.randn(key.input_shape, generator=torch.Generator().manual_seed(0)).to(device)
    started = time.monotonic()
    # Importing the compiler warns on every CPU-only machine that it found no CUDA runtime: not news here.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    try:
        import torch._inductor.config as inductor_config

        # Frozen weights let Inductor pre-pack them and fold constants: inference only.
        inductor_config.freezing = True
        module = runnable(network.eval(), key.precision)
        with torch.no_grad():
            exported = torch.export.export(module, (example,))
            torch._inductor.aoti_compile_and_package(exported, package_path=str(tmp))
        runner = _Runner(tmp)
        with torch.inference_mode():
            difference = float((_probabilities(runner(example)) - _probabilities(module(example))).abs().max())
    except Exception as error:  # no compiler on this platform, or an operator AOTInductor cannot take
        tmp.unlink(missing_ok=True)
        logger.warning("ahead-of-time compile unavailable (%s)", str(error).splitlines()[0][:120] if str(error)
                       else error.__class__.__name__)
        return None
    if not difference <= (TOLERANCE_BF16 if key.precision == "bfloat16" else TOLERANCE):
        tmp.unlink(missing_ok=True)
        reason = f"its probabilities differ from the eager network's by {difference:.2g}"
        write_text_atomic(_rejection(path), json.dumps({"key": asdict(key), "reason": reason}, indent=1))
        logger.warning("ahead-of-time compiled network not used: %s", reason)
        return None
    write_text_atomic(_sidecar(path), json.dumps(asdict(key), indent=1))
    os.replace(tmp, path)
    logger.info("compiled the network ahead of time for %s %s (%s) in %.0f s (%s)", key.device_type,
                "x".join(map(str, key.input_shape)), key.precision, time.monotonic() - started, path.name)
    _LOADED[str(path)] = runner
    evict(cache_max_gb, keep=path)
    return runner
