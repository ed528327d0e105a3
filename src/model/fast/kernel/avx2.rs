//! The micro-kernel for 8-lane registers (AVX2 and FMA). With 16 registers, a row of a
//! 16-column panel takes two accumulators, so a strip is done four rows at a time: eight
//! independent accumulators, enough to keep both FMA pipes busy through the FMA latency.

use std::arch::x86_64::*;

use super::tiled::{Store, Tile};

/// One strip of `strip` rows times a panel of 8 columns (one register per row) or 16 (two).
pub unsafe fn micro_tile(strip: usize, panel_width: usize, t: &Tile, s: &Store) {
    macro_rules! rows {
        ($nv:literal, $first:expr, $count:expr; $($rows:literal)*) => {
            match $count {
                $($rows => micro::<$rows, $nv>(t, s, $first),)*
                _ => unreachable!("strips have 1..=MR rows"),
            }
        };
    }
    if panel_width == 8 {
        return rows!(1, 0, strip; 1 2 3 4 5 6 7 8);
    }
    rows!(2, 0, strip.min(4); 1 2 3 4);
    if strip > 4 {
        rows!(2, 4, strip - 4; 1 2 3 4);
    }
}

/// Strip rows `first..first + ROWS` x `8 * NV` columns of C from `kc` steps of A (broadcast)
/// times the panel (loaded).
#[target_feature(enable = "avx2,fma")]
unsafe fn micro<const ROWS: usize, const NV: usize>(t: &Tile, s: &Store, first: usize) {
    let Tile {
        taps,
        seg,
        mut b,
        ldc,
        ..
    } = *t;
    let a: [*const f32; ROWS] = std::array::from_fn(|i| t.a[first + i]);
    let c = t.c.add(first * ldc);
    let real: [usize; NV] = std::array::from_fn(|v| s.width.saturating_sub(8 * v).min(8));
    let mut acc = [[_mm256_setzero_ps(); NV]; ROWS];
    if s.load_c {
        for (i, row) in acc.iter_mut().enumerate() {
            for (v, x) in row.iter_mut().enumerate() {
                *x = load(c.add(i * ldc + 8 * v), real[v]);
            }
        }
    }
    for &tap in taps {
        for k in tap..tap + seg {
            let mut bv = [_mm256_setzero_ps(); NV];
            for (v, x) in bv.iter_mut().enumerate() {
                *x = _mm256_loadu_ps(b.add((k - tap) * 8 * NV + 8 * v));
            }
            for (i, row) in acc.iter_mut().enumerate() {
                let av = _mm256_broadcast_ss(&*a[i].add(k));
                for (v, x) in row.iter_mut().enumerate() {
                    *x = _mm256_fmadd_ps(av, bv[v], *x);
                }
            }
        }
        b = b.add(seg * 8 * NV);
    }
    for (i, row) in acc.iter().enumerate() {
        for (v, &x) in row.iter().enumerate() {
            store(x, real[v], s, first + i, 8 * v, c.add(i * ldc + 8 * v));
        }
    }
}

/// Stores the first `real` lanes of `y`, columns `col..` of strip row `i`, at `dst` after the
/// store's epilogue (bias, the row's addends, ReLU).
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn store(mut y: __m256, real: usize, s: &Store, i: usize, col: usize, dst: *mut f32) {
    if real == 0 {
        return;
    }
    if !s.bias.is_null() {
        y = _mm256_add_ps(y, load(s.bias.add(col), real));
    }
    for addend in s.addends[i] {
        if !addend.is_null() {
            y = _mm256_add_ps(y, load(addend.add(col), real));
        }
    }
    if s.relu {
        y = _mm256_max_ps(y, _mm256_setzero_ps());
    }
    if real == 8 {
        return _mm256_storeu_ps(dst, y);
    }
    let mut lanes = [0f32; 8];
    _mm256_storeu_ps(lanes.as_mut_ptr(), y);
    std::ptr::copy_nonoverlapping(lanes.as_ptr(), dst, real);
}

/// `real` (0..=8) floats from `src`, then zeros: a panel's last columns without reading past
/// the row (AVX2's masked moves are slow on some CPUs).
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn load(src: *const f32, real: usize) -> __m256 {
    if real == 8 {
        return _mm256_loadu_ps(src);
    }
    let mut lanes = [0f32; 8];
    std::ptr::copy_nonoverlapping(src, lanes.as_mut_ptr(), real);
    _mm256_loadu_ps(lanes.as_ptr())
}
