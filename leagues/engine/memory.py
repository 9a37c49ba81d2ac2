"""Device memory that can be released and mapped back at the same addresses (CUDA virtual memory management).

    memory = MappedMemory(num_bytes, device)       # reserve addresses, back them with physical memory
    cache = memory.view(torch.bfloat16, shape)     # an ordinary tensor over the mapped range
    memory.release()                               # physical memory back to the device; addresses kept
    memory.remap()                                 # new physical memory at the same addresses

Why: captured CUDA graphs hold raw device addresses. Freeing the KV cache with the caching allocator and
allocating it again puts it elsewhere, so every graph had to be captured again at wake (over a second a
step for a 1B model). Releasing only the physical pages behind a reserved address range keeps every
pointer valid, so sleep and wake cost a driver call each plus zeroing the cache.

The driver's `cuMem*` calls are reached through `ctypes` (the CUDA driver library that every CUDA process
already loads); `supported(device)` says whether this device and driver have them. The contents after
`remap` are undefined: callers zero what they read.
"""

import ctypes
from functools import cache

import torch

_CUdeviceptr = ctypes.c_uint64
_Handle = ctypes.c_uint64

_ALLOCATION_PINNED, _LOCATION_DEVICE, _ACCESS_READ_WRITE = 1, 1, 3
_ATTRIBUTE_VMM_SUPPORTED = 102  # CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED


class _Location(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class _AllocFlags(ctypes.Structure):
    _fields_ = [
        ("compressionType", ctypes.c_ubyte),
        ("gpuDirectRDMACapable", ctypes.c_ubyte),
        ("usage", ctypes.c_ushort),
        ("reserved", ctypes.c_ubyte * 4),
    ]


class _AllocationProp(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_int),
        ("requestedHandleTypes", ctypes.c_int),
        ("location", _Location),
        ("win32HandleMetaData", ctypes.c_void_p),
        ("allocFlags", _AllocFlags),
    ]


class _AccessDesc(ctypes.Structure):
    _fields_ = [("location", _Location), ("flags", ctypes.c_int)]


@cache
def _driver() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None


def _check(result: int, call: str) -> None:
    if result != 0:
        message = ctypes.c_char_p()
        _driver().cuGetErrorString(result, ctypes.byref(message))
        text = message.value.decode() if message.value else "unknown error"
        raise RuntimeError(f"{call} failed: CUDA error {result} ({text})")


def supported(device: torch.device) -> bool:
    """Whether `device` can release and re-map memory at fixed addresses (a CUDA device whose driver has it)."""
    if device.type != "cuda" or _driver() is None:
        return False
    torch.cuda.init()
    value = ctypes.c_int()
    index = device.index if device.index is not None else torch.cuda.current_device()
    if _driver().cuDeviceGetAttribute(ctypes.byref(value), _ATTRIBUTE_VMM_SUPPORTED, index) != 0:
        return False
    return bool(value.value)


class _CudaArray:
    """The `__cuda_array_interface__` of a mapped range, so torch can view it without owning it."""

    def __init__(self, address: int, num_bytes: int) -> None:
        self.__cuda_array_interface__ = {
            "shape": (num_bytes,),
            "typestr": "|u1",
            "data": (address, False),
            "version": 3,
            "strides": None,
        }


class MappedMemory:
    """`num_bytes` (rounded up to the allocation granularity) of device memory at addresses that outlive it."""

    def __init__(self, num_bytes: int, device: torch.device) -> None:
        if not supported(device):
            raise RuntimeError(f"{device}: CUDA virtual memory management is not available")
        self.device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
        self._prop = _AllocationProp()
        self._prop.type = _ALLOCATION_PINNED
        self._prop.location = _Location(_LOCATION_DEVICE, self.device.index)
        granularity = ctypes.c_size_t()
        self._call("cuMemGetAllocationGranularity", ctypes.byref(granularity), ctypes.byref(self._prop), 0)
        step = granularity.value
        self.num_bytes = max(-(-num_bytes // step) * step, step)
        address = _CUdeviceptr()
        self._call("cuMemAddressReserve", ctypes.byref(address), ctypes.c_size_t(self.num_bytes), 0, _CUdeviceptr(0), 0)
        self.address = address.value
        self._handle: _Handle | None = None
        self.remap()
        self._bytes = torch.as_tensor(_CudaArray(self.address, self.num_bytes), device=self.device)

    @property
    def mapped(self) -> bool:
        return self._handle is not None

    def view(self, dtype: torch.dtype, shape: tuple[int, ...], offset: int = 0) -> torch.Tensor:
        """A tensor of `shape` over the range from byte `offset` (valid only while mapped)."""
        count = torch.Size(shape).numel() * dtype.itemsize
        if offset % dtype.itemsize or offset + count > self.num_bytes:
            raise ValueError(f"a {tuple(shape)} {dtype} view at byte {offset} does not fit {self.num_bytes} bytes")
        return self._bytes[offset : offset + count].view(dtype).view(shape)

    def release(self) -> None:
        """Give the physical memory back to the device; the addresses stay reserved for `remap`."""
        if self._handle is None:
            return
        torch.cuda.synchronize(self.device)  # no kernel may still read or write the range
        self._call("cuMemUnmap", _CUdeviceptr(self.address), ctypes.c_size_t(self.num_bytes))
        self._call("cuMemRelease", self._handle)
        self._handle = None

    def remap(self) -> None:
        """Back the reserved addresses with new physical memory (contents undefined)."""
        if self._handle is not None:
            return
        handle = _Handle()
        self._call("cuMemCreate", ctypes.byref(handle), ctypes.c_size_t(self.num_bytes), ctypes.byref(self._prop), 0)
        try:
            self._call("cuMemMap", _CUdeviceptr(self.address), ctypes.c_size_t(self.num_bytes), 0, handle, 0)
        except RuntimeError:
            self._call("cuMemRelease", handle)
            raise
        access = _AccessDesc(_Location(_LOCATION_DEVICE, self.device.index), _ACCESS_READ_WRITE)
        self._call(
            "cuMemSetAccess", _CUdeviceptr(self.address), ctypes.c_size_t(self.num_bytes), ctypes.byref(access), 1
        )
        self._handle = handle

    def close(self) -> None:
        """Release the memory and the address range (no view may be used afterwards)."""
        if self.address is None:
            return
        self.release()
        self._call("cuMemAddressFree", _CUdeviceptr(self.address), ctypes.c_size_t(self.num_bytes))
        self.address = None

    def _call(self, name: str, *args) -> None:
        _make_current(self.device.index)
        _check(getattr(_driver(), name)(*args), name)


def _make_current(index: int) -> None:
    """Make the device's primary context (the one torch uses) current on this thread: the driver's memory calls
    act on the current context, and a thread that has made no CUDA call yet has none."""
    context = ctypes.c_void_p()
    _check(_driver().cuCtxGetCurrent(ctypes.byref(context)), "cuCtxGetCurrent")
    primary = ctypes.c_void_p()
    _check(_driver().cuDevicePrimaryCtxRetain(ctypes.byref(primary), index), "cuDevicePrimaryCtxRetain")
    _driver().cuDevicePrimaryCtxRelease_v2(index)  # torch holds its own reference; this one only looked it up
    if context.value != primary.value:
        _check(_driver().cuCtxSetCurrent(primary), "cuCtxSetCurrent")
