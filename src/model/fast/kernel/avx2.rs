//! The micro-kernels for 8-lane registers (AVX2 and FMA). With 16 registers, a strip has 6
//! rows of two accumulators each: twelve independent accumulators, enough to keep both FMA
//! pipes busy through the FMA latency, beside the panel's two registers and one broadcast A.
//! A 16-column panel takes two registers of 8 columns; an 8-column panel has its rows paired,
//! each register holding 4 columns for two K steps, so that there too one A broadcast feeds
//! two FMAs (one per FMA made the narrow octave layers broadcast-bound on Zen 3).

use std::arch::x86_64::*;

use super::lanes::{self, Ymm};
use super::tiled::{Store, Tile};

/// One strip of `strip` (1..=6) rows times a panel of 16 columns, or 8 with rows paired.
pub unsafe fn micro_tile(strip: usize, panel_width: usize, t: &Tile, s: &Store) {
    macro_rules! call {
        ($($rows:literal)*) => {
            match (strip, panel_width, !t.next.is_null()) {
                $(
                    ($rows, 8, false) => micro_pairs::<$rows, false>(t, s),
                    ($rows, 8, true) => micro_pairs::<$rows, true>(t, s),
                    ($rows, _, false) => micro::<$rows, 2, false>(t, s),
                    ($rows, _, true) => micro::<$rows, 2, true>(t, s),
                )*
                _ => unreachable!("AVX2 strips have 1..=6 rows"),
            }
        };
    }
    call!(1 2 3 4 5 6)
}

/// `ROWS x (8 * NV)` of the tile.
#[target_feature(enable = "avx2,fma")]
unsafe fn micro<const ROWS: usize, const NV: usize, const PREFETCH: bool>(t: &Tile, s: &Store) {
    lanes::micro::<Ymm, ROWS, NV, PREFETCH>(t, s)
}

/// `ROWS x 8` of C from a paired panel: register `v` of a row holds columns `4v..4v + 4`, each
/// for two K steps, multiplied by the row's two A values broadcast as one 64-bit pair; the
/// halves are summed when stored. `PREFETCH` as in [`lanes::micro`].
#[target_feature(enable = "avx2,fma")]
unsafe fn micro_pairs<const ROWS: usize, const PREFETCH: bool>(t: &Tile, s: &Store) {
    let (taps, seg, a, mut b, c, ldc) = (t.taps, t.seg, t.a, t.b, t.c, t.ldc);
    let mut acc = [[_mm256_setzero_ps(); 2]; ROWS];
    // One paired K step `kp`, with `$a(i)` the A register of row `i`.
    macro_rules! step {
        ($kp:expr, $a:expr) => {{
            let bv = [
                _mm256_loadu_ps(b.add($kp * 16)),
                _mm256_loadu_ps(b.add($kp * 16 + 8)),
            ];
            for (i, row) in acc.iter_mut().enumerate() {
                let av = $a(i);
                row[0] = _mm256_fmadd_ps(av, bv[0], row[0]);
                row[1] = _mm256_fmadd_ps(av, bv[1], row[1]);
            }
        }};
    }
    for &tap in taps {
        let pairs = |kp: usize| {
            move |i: usize| {
                let pair = a[i].add(tap + 2 * kp).cast::<f64>().read_unaligned();
                _mm256_castpd_ps(_mm256_set1_pd(pair))
            }
        };
        // The odd step's partner lanes get 0 (the panel's padding row is 0).
        let odd = |i: usize| {
            _mm256_blend_ps::<0b0101_0101>(
                _mm256_setzero_ps(),
                _mm256_broadcast_ss(&*a[i].add(tap + seg - 1)),
            )
        };
        lanes::paired_segment!(t, tap, seg, PREFETCH, step, pairs, odd);
        b = b.add(seg / 2 * 16);
    }
    // Pair sums in the order 0 1 4 5 2 3 6 7 (`hadd` works within 128-bit halves), then the
    // middle 64-bit quarters swapped.
    let mut sums = [[_mm256_setzero_ps()]; ROWS];
    for (sum, [low, high]) in sums.iter_mut().zip(acc) {
        let pairs = _mm256_castps_pd(_mm256_hadd_ps(low, high));
        sum[0] = _mm256_castpd_ps(_mm256_permute4x64_pd::<0b11_01_10_00>(pairs));
    }
    lanes::store_tile::<Ymm, ROWS, 1>(sums, s, c, ldc);
}
