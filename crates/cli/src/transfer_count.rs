//! Counts the bytes copied between host and GPU, so `run --verbose` and `bench` can show that a
//! denoising step moves nothing (issue: every per-step tensor stays on the device).
//!
//! candle reaches the GPU through cudarc, which calls the CUDA driver's `cuMemcpyHtoD*` /
//! `cuMemcpyDtoH*` for every host↔device copy (`Tensor::new`, `to_device`, `to_vec*`, …). With
//! the `cuda` feature this binary defines those four functions itself: the linker binds
//! cudarc's calls to them, they add the byte count to a counter and forward to the driver's own
//! function (found with `dlsym(RTLD_NEXT, …)`). Without the feature the counters stay at zero.

use std::sync::atomic::{AtomicU64, Ordering};

static HOST_TO_DEVICE: AtomicU64 = AtomicU64::new(0);
static DEVICE_TO_HOST: AtomicU64 = AtomicU64::new(0);

/// Bytes copied so far: (host → device, device → host).
pub fn totals() -> (u64, u64) {
    (
        HOST_TO_DEVICE.load(Ordering::Relaxed),
        DEVICE_TO_HOST.load(Ordering::Relaxed),
    )
}

/// Whether copies are counted at all (a `cuda` build).
pub const COUNTING: bool = cfg!(feature = "cuda");

#[cfg(feature = "cuda")]
mod interpose {
    use std::ffi::{c_int, c_void, CStr};
    use std::sync::atomic::Ordering;
    use std::sync::OnceLock;

    use super::{DEVICE_TO_HOST, HOST_TO_DEVICE};

    type CuResult = c_int;
    type DevicePtr = u64;
    type Stream = *mut c_void;
    /// CUDA_ERROR_NOT_FOUND: the driver lacks the function (never on a working install).
    const NOT_FOUND: CuResult = 500;

    /// The driver's own function `name`, looked up once.
    fn next(cell: &OnceLock<usize>, name: &CStr) -> usize {
        // SAFETY: dlsym with a NUL-terminated name; RTLD_NEXT skips this executable's symbol.
        *cell.get_or_init(|| unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr()) as usize })
    }

    #[no_mangle]
    pub unsafe extern "C" fn cuMemcpyHtoDAsync_v2(
        dst: DevicePtr,
        src: *const c_void,
        bytes: usize,
        stream: Stream,
    ) -> CuResult {
        static NEXT: OnceLock<usize> = OnceLock::new();
        let f = next(&NEXT, c"cuMemcpyHtoDAsync_v2");
        if f == 0 {
            return NOT_FOUND;
        }
        HOST_TO_DEVICE.fetch_add(bytes as u64, Ordering::Relaxed);
        let f: unsafe extern "C" fn(DevicePtr, *const c_void, usize, Stream) -> CuResult =
            std::mem::transmute(f);
        f(dst, src, bytes, stream)
    }

    #[no_mangle]
    pub unsafe extern "C" fn cuMemcpyHtoD_v2(
        dst: DevicePtr,
        src: *const c_void,
        bytes: usize,
    ) -> CuResult {
        static NEXT: OnceLock<usize> = OnceLock::new();
        let f = next(&NEXT, c"cuMemcpyHtoD_v2");
        if f == 0 {
            return NOT_FOUND;
        }
        HOST_TO_DEVICE.fetch_add(bytes as u64, Ordering::Relaxed);
        let f: unsafe extern "C" fn(DevicePtr, *const c_void, usize) -> CuResult =
            std::mem::transmute(f);
        f(dst, src, bytes)
    }

    #[no_mangle]
    pub unsafe extern "C" fn cuMemcpyDtoHAsync_v2(
        dst: *mut c_void,
        src: DevicePtr,
        bytes: usize,
        stream: Stream,
    ) -> CuResult {
        static NEXT: OnceLock<usize> = OnceLock::new();
        let f = next(&NEXT, c"cuMemcpyDtoHAsync_v2");
        if f == 0 {
            return NOT_FOUND;
        }
        DEVICE_TO_HOST.fetch_add(bytes as u64, Ordering::Relaxed);
        let f: unsafe extern "C" fn(*mut c_void, DevicePtr, usize, Stream) -> CuResult =
            std::mem::transmute(f);
        f(dst, src, bytes, stream)
    }

    #[no_mangle]
    pub unsafe extern "C" fn cuMemcpyDtoH_v2(
        dst: *mut c_void,
        src: DevicePtr,
        bytes: usize,
    ) -> CuResult {
        static NEXT: OnceLock<usize> = OnceLock::new();
        let f = next(&NEXT, c"cuMemcpyDtoH_v2");
        if f == 0 {
            return NOT_FOUND;
        }
        DEVICE_TO_HOST.fetch_add(bytes as u64, Ordering::Relaxed);
        let f: unsafe extern "C" fn(*mut c_void, DevicePtr, usize) -> CuResult =
            std::mem::transmute(f);
        f(dst, src, bytes)
    }
}
