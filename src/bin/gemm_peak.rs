//! The gemm crate's f32 throughput on this CPU: the ceiling the fast path's wide convolutions
//! run against (they call the crate on tiles of patch rows).
//!
//!     cargo run --release --bin gemm_peak -- [THREADS] [REPEATS]
//!
//! Times `C = A x B` for a large square product and for two of ResNet-50's convolutions as one
//! GEMM each (batch 8: a 3x3 of layer3, 1568 x 2304 x 256, and a 1x1 of layer4, 392 x 2048 x
//! 512), on THREADS threads (default 2) through the crate's own rayon split, and prints one JSON
//! line per shape with the best GFLOP/s of REPEATS runs (default 10).

use std::time::Instant;

fn gflops(m: usize, k: usize, n: usize, threads: usize, repeats: usize) -> f64 {
    let a: Vec<f32> = (0..m * k).map(|i| (i % 13) as f32 / 13.).collect();
    let b: Vec<f32> = (0..k * n).map(|i| (i % 7) as f32 / 7.).collect();
    let mut c = vec![0f32; m * n];
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    let mut best = f64::MAX;
    for _ in 0..repeats + 1 {
        let start = Instant::now();
        // SAFETY: the three row-major buffers hold m x k, k x n and m x n floats.
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                c.as_mut_ptr(),
                1,
                n as isize,
                false,
                a.as_ptr(),
                1,
                k as isize,
                b.as_ptr(),
                1,
                n as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                parallelism,
            )
        };
        best = best.min(start.elapsed().as_secs_f64());
    }
    2.0 * (m * k * n) as f64 / best / 1e9
}

fn main() {
    let mut args = std::env::args().skip(1).map(|a| a.parse::<usize>());
    let threads = args.next().transpose().ok().flatten().unwrap_or(2).max(1);
    let repeats = args.next().transpose().ok().flatten().unwrap_or(10).max(1);
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .expect("the first pool of the process");
    for (name, m, k, n) in [
        ("square", 2048, 2048, 2048),
        ("resnet50-layer3-3x3-b8", 1568, 2304, 256),
        ("resnet50-layer4-1x1-b8", 392, 2048, 512),
    ] {
        let rate = gflops(m, k, n, threads, repeats);
        println!(
            "{{\"shape\": \"{name}\", \"m\": {m}, \"k\": {k}, \"n\": {n}, \"threads\": {threads}, \"gflops\": {rate:.1}}}"
        );
    }
}
