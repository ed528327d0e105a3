//! Peak device memory of a piece of work: the most bytes it held at once on a CUDA device.
//!
//! How it is measured, and why that is exact: candle 0.11 allocates every CUDA buffer (tensors,
//! the input upload, im2col scratch, cuDNN workspaces) through `CudaStream::alloc` /
//! `alloc_zeros` of cudarc 0.19, which on a device with memory pools
//! (`CU_DEVICE_ATTRIBUTE_MEMORY_POOLS_SUPPORTED`, every GPU since Pascal under Linux) calls
//! `cuMemAllocAsync` with no pool named, i.e. from the device's current memory pool, and frees
//! with `cuMemFreeAsync` when the tensor is dropped. That pool counts the bytes in use
//! (`CU_MEMPOOL_ATTR_USED_MEM_CURRENT`) and keeps a high watermark of them
//! (`CU_MEMPOOL_ATTR_USED_MEM_HIGH`, resettable to 0 only). So: read the bytes in use before the
//! work (the weights and whatever else is alive), reset the watermark, run the work, read the
//! watermark: watermark minus bytes before is the most the work held at once, as the pool
//! accounts it (allocations rounded to the pool's granularity, which is what the device really
//! gives out). The driver's free-memory figure cannot say this: the pool keeps freed blocks, so
//! "free before minus free after" is only what the work left the pool holding.
//!
//! The pool belongs to the device, not to a thread or a stream, so two measured pieces of work
//! on one device at once would see each other's bytes: measurements on one pool are serialised
//! (a lock per pool). Every batch on a device goes through it, so batches of different variants
//! sharing a GPU are issued one after the other; they share candle's single stream per device
//! anyway, so the GPU itself ran them in order already.
//!
//! Where the device has no memory pools, cudarc allocates with `cuMemAlloc` and there is no
//! watermark to read: the driver's free-memory difference is reported instead, labelled
//! [`PeakSource::DriverFreeDelta`], a lower bound that must not be read as a peak.

use std::cell::Cell;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use candle_core::{DType, Device};
use serde::Serialize;

use crate::model::Model;

/// Where a peak figure comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PeakSource {
    /// The counting global allocator (`crate::alloc`): host memory, exact.
    HostAllocator,
    /// The CUDA memory pool's high watermark: device memory, exact.
    CudaMempool,
    /// The driver's free memory before minus after: what the work retained, not its peak.
    DriverFreeDelta,
}

/// The peak bytes some work held on a device, and how they were measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DevicePeak {
    pub bytes: usize,
    pub source: PeakSource,
}

/// The counters of a device memory pool that a peak measurement reads.
pub trait PoolCounters {
    /// Identifies the pool: measurements on the same key are serialised.
    fn key(&self) -> usize;
    /// Waits until work already queued on the device has finished (and freed what it frees).
    fn settle(&self) -> anyhow::Result<()>;
    /// Bytes allocated from the pool and not yet freed.
    fn used(&self) -> anyhow::Result<u64>;
    /// Sets the high watermark of the bytes in use to 0.
    fn reset_high(&self) -> anyhow::Result<()>;
    /// The most bytes in use since the last reset.
    fn high(&self) -> anyhow::Result<u64>;
}

thread_local! {
    /// Whether this thread is inside a pool measurement: a nested one would reset the outer
    /// one's watermark (and wait forever on the pool's lock).
    static MEASURING: Cell<bool> = const { Cell::new(false) };
}

/// Runs `work` and returns its result with the most bytes it held at once in `pool` above what
/// was in use when it started. Measurements on one pool run one at a time. The measurement's
/// own failure (a driver query, or a nested measurement) is the second value's error; `work`
/// runs either way.
pub fn measure_pool_peak<R>(
    pool: &impl PoolCounters,
    work: impl FnOnce() -> R,
) -> (R, anyhow::Result<usize>) {
    if MEASURING.with(Cell::get) {
        let err = anyhow::anyhow!("a device peak measurement is already running on this thread");
        return (work(), Err(err));
    }
    struct Leave;
    impl Drop for Leave {
        fn drop(&mut self) {
            MEASURING.with(|m| m.set(false));
        }
    }
    let lock = pool_lock(pool.key());
    let _serialised = lock.lock().unwrap_or_else(PoisonError::into_inner);
    MEASURING.with(|m| m.set(true));
    let _leave = Leave;
    let before = pool
        .settle()
        .and_then(|()| pool.used())
        .and_then(|used| pool.reset_high().map(|()| used));
    let out = work();
    let peak = before.and_then(|before| {
        pool.settle()?;
        // The watermark restarts at 0, so work that only frees leaves it below `before`.
        Ok(pool.high()?.saturating_sub(before) as usize)
    });
    (out, peak)
}

/// The lock that serialises measurements on the pool `key`.
fn pool_lock(key: usize) -> Arc<Mutex<()>> {
    static LOCKS: OnceLock<Mutex<HashMap<usize, Arc<Mutex<()>>>>> = OnceLock::new();
    let mut locks = LOCKS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    locks.entry(key).or_default().clone()
}

/// The feature maps one forward pass of `model` over `batch` images of `height` x `width` in
/// `dtype` must hold at once: the analytic peak (`Model::cost`, whose maps are f32 and whose
/// BatchNorm, ReLU and residual add work in place, as PyTorch's do), scaled to the batch and
/// the dtype. The plain candle network makes a new tensor for every op, so its measured peak
/// (host or device) is at least this: a measurement below it did not see the pass.
pub fn analytic_peak_bytes(
    model: &Model,
    batch: usize,
    height: usize,
    width: usize,
    dtype: DType,
) -> usize {
    let per_image_f32 = model.cost(height, width).peak_activation_bytes;
    batch * per_image_f32 / DType::F32.size_in_bytes() * dtype.size_in_bytes()
}

/// Runs `work` on `device` and returns its result with the peak device memory it held, or
/// `None` on the CPU, whose memory is host memory (measured by `crate::alloc::measure_peak`).
pub fn measure_device_peak<R>(
    device: &Device,
    work: impl FnOnce() -> R,
) -> (R, Option<anyhow::Result<DevicePeak>>) {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(cuda) = device {
        let (out, peak) = cuda_pool::measure(cuda, work);
        return (out, Some(peak));
    }
    if device.is_cpu() {
        return (work(), None);
    }
    let (out, peak) = measure_free_delta(device, work);
    (out, Some(peak))
}

/// The fallback for devices without a pool to read: free memory before minus after.
fn measure_free_delta<R>(
    device: &Device,
    work: impl FnOnce() -> R,
) -> (R, anyhow::Result<DevicePeak>) {
    let before = crate::device::memory_info(device);
    let out = work();
    let peak = match (before, crate::device::memory_info(device)) {
        (Some(before), Some(after)) => Ok(DevicePeak {
            bytes: before.free.saturating_sub(after.free),
            source: PeakSource::DriverFreeDelta,
        }),
        _ => Err(anyhow::anyhow!(
            "the device reports neither a memory pool nor its free memory"
        )),
    };
    (out, peak)
}

#[cfg(feature = "cuda")]
mod cuda_pool {
    //! The device's current memory pool, read through the CUDA driver.

    use std::ffi::c_void;
    use std::sync::Arc;

    use candle_core::cuda_backend::cudarc::driver::{result, sys, CudaStream};
    use candle_core::CudaDevice;

    use super::{measure_free_delta, measure_pool_peak, DevicePeak, PeakSource, PoolCounters};

    pub fn measure<R>(
        device: &CudaDevice,
        work: impl FnOnce() -> R,
    ) -> (R, anyhow::Result<DevicePeak>) {
        let stream = device.cuda_stream();
        let pool = match CudaPool::of(&stream) {
            Ok(Some(pool)) => pool,
            // No memory pools: cudarc allocates with cuMemAlloc, nothing keeps a watermark.
            Ok(None) => {
                return measure_free_delta(&candle_core::Device::Cuda(device.clone()), work)
            }
            Err(e) => return (work(), Err(e)),
        };
        let (out, bytes) = measure_pool_peak(&pool, work);
        let peak = bytes.map(|bytes| DevicePeak {
            bytes,
            source: PeakSource::CudaMempool,
        });
        (out, peak)
    }

    /// The pool `cuMemAllocAsync` draws from on the stream's device.
    struct CudaPool {
        stream: Arc<CudaStream>,
        pool: sys::CUmemoryPool,
    }

    impl CudaPool {
        /// `None` where the device has no memory pools (cudarc then allocates synchronously).
        fn of(stream: &Arc<CudaStream>) -> anyhow::Result<Option<Self>> {
            let ctx = stream.context();
            if !ctx.has_async_alloc() {
                return Ok(None);
            }
            ctx.bind_to_thread()?;
            // SAFETY: the device handle comes from a live context. The current pool (not the
            // default one) is the pool cuMemAllocAsync uses when none is named.
            let pool = unsafe { result::device::get_mem_pool(ctx.cu_device()) }?;
            Ok(Some(Self {
                stream: stream.clone(),
                pool,
            }))
        }

        fn get(&self, attr: sys::CUmemPool_attribute) -> anyhow::Result<u64> {
            let mut value: u64 = 0;
            // SAFETY: the watermark attributes are cuuint64_t; the pool belongs to a live device.
            unsafe {
                result::mem_pool::get_attribute(
                    self.pool,
                    attr,
                    (&mut value as *mut u64).cast::<c_void>(),
                )
            }?;
            Ok(value)
        }
    }

    impl PoolCounters for CudaPool {
        fn key(&self) -> usize {
            self.pool as usize
        }

        fn settle(&self) -> anyhow::Result<()> {
            Ok(self.stream.synchronize()?)
        }

        fn used(&self) -> anyhow::Result<u64> {
            self.get(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT)
        }

        fn reset_high(&self) -> anyhow::Result<()> {
            let mut zero: u64 = 0;
            // SAFETY: as in `get`; 0 is the only value the driver accepts for this attribute.
            unsafe {
                result::mem_pool::set_attribute(
                    self.pool,
                    sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                    (&mut zero as *mut u64).cast::<c_void>(),
                )
            }?;
            Ok(())
        }

        fn high(&self) -> anyhow::Result<u64> {
            self.get(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::time::Duration;

    use super::*;

    /// A pool that counts like the driver's: bytes in use, and their watermark since a reset.
    #[derive(Default)]
    struct FakePool(Mutex<(u64, u64)>);

    impl FakePool {
        fn alloc(&self, bytes: u64) {
            let mut c = self.0.lock().unwrap();
            c.0 += bytes;
            c.1 = c.1.max(c.0);
        }
        fn free(&self, bytes: u64) {
            self.0.lock().unwrap().0 -= bytes;
        }
    }

    impl PoolCounters for FakePool {
        fn key(&self) -> usize {
            self as *const Self as usize
        }
        fn settle(&self) -> anyhow::Result<()> {
            Ok(())
        }
        fn used(&self) -> anyhow::Result<u64> {
            Ok(self.0.lock().unwrap().0)
        }
        fn reset_high(&self) -> anyhow::Result<()> {
            self.0.lock().unwrap().1 = 0;
            Ok(())
        }
        fn high(&self) -> anyhow::Result<u64> {
            Ok(self.0.lock().unwrap().1)
        }
    }

    #[test]
    fn the_peak_is_the_most_held_at_once_above_what_was_in_use() {
        let pool = FakePool::default();
        pool.alloc(1000); // weights
        let ((), peak) = measure_pool_peak(&pool, || {
            pool.alloc(300);
            pool.alloc(200);
            pool.free(300);
            pool.alloc(100);
            pool.free(200);
            pool.free(100);
        });
        assert_eq!(peak.unwrap(), 500);
        // Work that frees memory held before it, then allocates less, held nothing extra.
        let ((), peak) = measure_pool_peak(&pool, || {
            pool.free(400);
            pool.alloc(100);
        });
        assert_eq!(peak.unwrap(), 0);
    }

    #[test]
    fn measurements_on_one_pool_do_not_see_each_other() {
        let pool = &FakePool::default();
        let (allocated, started) = mpsc::channel();
        let (finished, done) = mpsc::channel::<()>();
        std::thread::scope(|s| {
            let first = s.spawn(move || {
                measure_pool_peak(pool, || {
                    pool.alloc(10);
                    allocated.send(()).unwrap();
                    // A second measurement running now would add its bytes to this watermark.
                    let _ = done.recv_timeout(Duration::from_millis(300));
                    pool.free(10);
                })
                .1
            });
            started.recv().unwrap();
            let second = s.spawn(move || {
                let peak = measure_pool_peak(pool, || {
                    pool.alloc(1);
                    pool.free(1);
                })
                .1;
                let _ = finished.send(());
                peak
            });
            assert_eq!(first.join().unwrap().unwrap(), 10);
            assert_eq!(second.join().unwrap().unwrap(), 1);
        });
    }

    #[test]
    fn a_nested_measurement_fails_but_runs_its_work() {
        let pool = FakePool::default();
        let (inner, outer) = measure_pool_peak(&pool, || {
            pool.alloc(7);
            let (ran, inner) = measure_pool_peak(&pool, || true);
            pool.free(7);
            assert!(ran);
            inner
        });
        assert!(inner.is_err());
        assert_eq!(outer.unwrap(), 7);
    }

    #[test]
    fn the_cpu_has_no_device_peak() {
        let (value, peak) = measure_device_peak(&Device::Cpu, || 3);
        assert_eq!(value, 3);
        assert!(peak.is_none());
    }
}
