//! Compute devices: parsing `--device`, and device-memory queries where the device has them.

use candle_core::Device;

/// Parses `cpu`, `cuda` or `cuda:N`. CUDA needs a build with `--features cuda`.
pub fn parse_device(s: &str) -> anyhow::Result<Device> {
    let ordinal = match s {
        "cpu" => return Ok(Device::Cpu),
        "cuda" => 0,
        _ => s
            .strip_prefix("cuda:")
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| anyhow::anyhow!("unknown device '{s}'; use cpu, cuda or cuda:N"))?,
    };
    let hint = if cfg!(feature = "cuda") {
        ""
    } else {
        " (this binary was built without --features cuda)"
    };
    Device::new_cuda(ordinal).map_err(|e| anyhow::anyhow!("cannot open {s}: {e}{hint}"))
}

/// Free and total bytes of a device's memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryInfo {
    pub free: usize,
    pub total: usize,
}

impl MemoryInfo {
    pub fn used(&self) -> usize {
        self.total.saturating_sub(self.free)
    }
}

/// The device's memory as its driver reports it; `None` on the CPU (measured by the counting
/// allocator instead).
pub fn memory_info(device: &Device) -> Option<MemoryInfo> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(cuda) = device {
        let (free, total) = cuda.cuda_stream().context().mem_get_info().ok()?;
        return Some(MemoryInfo { free, total });
    }
    let _ = device;
    None
}

/// The `--device` spelling of a device: `cpu`, `cuda:N`.
pub fn device_name(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        other => format!("{other:?}"),
    }
}
