//! The gemm crate's f32 throughput on this CPU: the ceiling the fast path's wide convolutions
//! run against (they call the crate on tiles of patch rows).
//!
//!     cargo run --release --bin gemm_peak -- [THREADS] [REPEATS]
//!
//! Times `C = A x B` for a large square product and for two of ResNet-50's convolutions as one
//! GEMM each (batch 8: a 3x3 of layer3, 1568 x 2304 x 256, and a 1x1 of layer4, 392 x 2048 x
//! 512), on THREADS threads (default 2) through the crate's own rayon split, and prints one JSON
//! line per shape with the best GFLOP/s of REPEATS runs (default 10). On AVX-512 CPUs it first
//! prints the cores' own ceiling: independent 16-lane FMAs and nothing else, on THREADS threads.

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

/// GFLOP/s of `threads` threads each issuing independent 16-lane FMAs on registers (12 chains,
/// so that two FMA units never wait on a result): the arithmetic peak no GEMM can pass.
#[cfg(target_arch = "x86_64")]
fn fma_peak(threads: usize) -> Option<f64> {
    use std::arch::x86_64::*;

    const CHAINS: usize = 12;
    const STEPS: usize = 20_000_000;
    #[target_feature(enable = "avx512f")]
    unsafe fn chains() -> f32 {
        let (b, c) = (_mm512_set1_ps(0.999_999), _mm512_set1_ps(1e-7));
        let mut acc = [_mm512_set1_ps(1.); CHAINS];
        for _ in 0..STEPS {
            for x in acc.iter_mut() {
                *x = _mm512_fmadd_ps(*x, b, c);
            }
        }
        acc.iter().map(|&x| _mm512_reduce_add_ps(x)).sum()
    }
    if !is_x86_feature_detected!("avx512f") {
        return None;
    }
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            // SAFETY: AVX-512F was detected above.
            s.spawn(|| std::hint::black_box(unsafe { chains() }));
        }
    });
    let flops = (threads * STEPS * CHAINS * 16 * 2) as f64;
    Some(flops / start.elapsed().as_secs_f64() / 1e9)
}

#[cfg(not(target_arch = "x86_64"))]
fn fma_peak(_threads: usize) -> Option<f64> {
    None
}

fn main() {
    let mut args = std::env::args().skip(1).map(|a| a.parse::<usize>());
    let threads = args.next().transpose().ok().flatten().unwrap_or(2).max(1);
    let repeats = args.next().transpose().ok().flatten().unwrap_or(10).max(1);
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .expect("the first pool of the process");
    if let Some(rate) = (0..3).filter_map(|_| fma_peak(threads)).reduce(f64::max) {
        println!("{{\"shape\": \"fma-peak\", \"threads\": {threads}, \"gflops\": {rate:.1}}}");
    }
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
