"""Which device a shard runs on, and the guarantee that two shards never share one GPU.

A shard leases a device slot for as long as it samples: inside a process, slots are handed out
from a queue (one shard per slot at a time); across processes on one host (two flows, two workers
started by hand), a GPU is also guarded by an exclusive file lock named after its UUID, which
stays the same whatever ``CUDA_VISIBLE_DEVICES`` renumbers it to.
"""

from __future__ import annotations

import fcntl
import logging
import os
import queue
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from indusfactory.config import ExecutionConfig
from indusfactory.infra.errors import ModelLoadError

log = logging.getLogger("indusfactory.devices")  # the name operators filter on, kept from the flat layout

LOCK_DIR_ENV = "INDUSFACTORY_DEVICE_LOCK_DIR"
"""Where the per-GPU host locks live (default: the system's temporary folder)."""


@dataclass(frozen=True)
class DeviceSlot:
    """One place a shard can run: a torch device and the slot's index (two CPU slots share one device)."""

    device: torch.device
    index: int

    @property
    def name(self) -> str:
        return f"{self.device}#{self.index}"


def _check_cuda(device: torch.device) -> None:
    if not torch.cuda.is_available():
        raise ModelLoadError(f"execution device {device} is a GPU but no CUDA device is available")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ModelLoadError(
            f"execution device {device} does not exist: {torch.cuda.device_count()} CUDA "
            "device(s) are visible (CUDA_VISIBLE_DEVICES renumbers them from 0)"
        )


def generation_devices(execution: ExecutionConfig) -> list[torch.device]:
    """``execution.devices`` if set; else every visible GPU for device ``auto``/``cuda``, or the CPU."""
    if execution.devices:
        devices = [torch.device(name) for name in execution.devices]
        for device in devices:
            if device.type == "cuda":
                _check_cuda(device)
        return devices
    if execution.device == "cpu" or (execution.device == "auto" and not torch.cuda.is_available()):
        return [torch.device("cpu")]
    _check_cuda(torch.device("cuda"))
    return [torch.device("cuda", i) for i in range(torch.cuda.device_count())]


class DevicePool:
    """Hands each caller a slot no one else in this process holds; waits while all are taken."""

    def __init__(self, devices: list[torch.device]):
        self.slots = [DeviceSlot(device, i) for i, device in enumerate(devices)]
        self._free: queue.Queue[DeviceSlot] = queue.Queue()
        for slot in self.slots:
            self._free.put(slot)

    @contextmanager
    def lease(self) -> Iterator[DeviceSlot]:
        slot = self._free.get()
        try:
            with host_lock(slot.device):
                yield slot
        finally:
            self._free.put(slot)


_POOLS: dict[tuple[str, ...], DevicePool] = {}
_POOLS_LOCK = threading.Lock()


def device_pool(execution: ExecutionConfig) -> DevicePool:
    """The process's pool for the devices ``execution`` names (one pool per distinct list)."""
    devices = generation_devices(execution)
    key = tuple(str(d) for d in devices)
    with _POOLS_LOCK:
        if key not in _POOLS:
            _POOLS[key] = DevicePool(devices)
        return _POOLS[key]


def _gpu_identity(device: torch.device) -> str:
    index = device.index if device.index is not None else torch.cuda.current_device()
    uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
    return str(uuid) if uuid is not None else f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'all')}-{index}"


def lock_path_for(identity: str) -> Path:
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in identity)
    return Path(os.environ.get(LOCK_DIR_ENV) or tempfile.gettempdir()) / f"indusfactory-gpu-{safe}.lock"


@contextmanager
def exclusive_host_lock(identity: str) -> Iterator[None]:
    """Hold the host-wide lock of ``identity`` (blocks while another process holds it; freed if it dies)."""
    path = lock_path_for(identity)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("GPU %s is in use by another process on this host: waiting for it (%s)", identity, path)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextmanager
def host_lock(device: torch.device) -> Iterator[None]:
    """A GPU's host-wide lock; CPUs are shared and take none."""
    if device.type != "cuda":
        yield
        return
    with exclusive_host_lock(_gpu_identity(device)):
        yield
