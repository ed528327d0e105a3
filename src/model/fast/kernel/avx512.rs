//! The micro-kernels for 16-lane registers (AVX-512F).

use std::arch::x86_64::*;

use super::lanes::{self, Ymm, Zmm};
use super::tiled::{Store, Tile};

/// The two floats at `$src` in every 64-bit lane of a register, by the integer broadcast: as a
/// plain load it issues once per cycle beside the FMAs on Zen 4, where `vbroadcastsd` (what
/// LLVM makes of `_mm512_set1_pd` and `_mm512_set1_epi64`) does not. A macro, as the asm needs
/// its caller's AVX-512.
macro_rules! broadcast_pair {
    ($src:expr) => {{
        let pair: __m512;
        std::arch::asm!(
            "vpbroadcastq {pair}, qword ptr [{src}]",
            pair = out(zmm_reg) pair,
            src = in(reg) $src,
            options(pure, readonly, nostack, preserves_flags),
        );
        pair
    }};
}

/// One strip of `strip` rows times a panel: 32 columns in two registers per row, or 8 or 16
/// columns on paired panels.
pub unsafe fn micro_tile(strip: usize, panel_width: usize, pairs: bool, t: &Tile, s: &Store) {
    macro_rules! call {
        ($($rows:literal)*) => {
            match (strip, panel_width, pairs, !t.next.is_null()) {
                $(
                    ($rows, 32, _, false) => micro::<$rows, 2, false>(t, s),
                    ($rows, 32, _, true) => micro::<$rows, 2, true>(t, s),
                    ($rows, 16, true, false) => micro_pairs::<$rows, 2, false>(t, s),
                    ($rows, 16, true, true) => micro_pairs::<$rows, 2, true>(t, s),
                    ($rows, 8, true, false) => micro_pairs::<$rows, 1, false>(t, s),
                    ($rows, 8, true, true) => micro_pairs::<$rows, 1, true>(t, s),
                    ($rows, _, _, false) => micro::<$rows, 1, false>(t, s),
                    ($rows, _, _, true) => micro::<$rows, 1, true>(t, s),
                )*
                _ => unreachable!("strips have 1..=MR rows"),
            }
        };
    }
    call!(1 2 3 4 5 6 7 8 9 10 11 12 13 14)
}

/// `ROWS x (16 * NV)` of the tile.
#[target_feature(enable = "avx512f")]
unsafe fn micro<const ROWS: usize, const NV: usize, const PREFETCH: bool>(t: &Tile, s: &Store) {
    lanes::micro::<Zmm, ROWS, NV, PREFETCH>(t, s)
}

/// `ROWS x (8 * NV)` of C from paired panels: each 16-lane register holds 8 columns for
/// two K steps, multiplied by the row's two A values broadcast as one 64-bit pair; the
/// halves are summed before the store. `PREFETCH` as in [`lanes::micro`]. Plain indexed
/// loops, as in [`lanes::micro`]: with the iterator loops this had before, LLVM came to keep
/// the accumulators on the stack, storing every one after each FMA, when edits elsewhere
/// changed the code inlined around them (ResNet-20's 16-channel layers 2.5 times as slow).
#[target_feature(enable = "avx512f")]
unsafe fn micro_pairs<const ROWS: usize, const NV: usize, const PREFETCH: bool>(
    t: &Tile,
    s: &Store,
) {
    let (taps, seg, mut b, c, ldc) = (t.taps, t.seg, t.b, t.c, t.ldc);
    let a: [*const f32; ROWS] = std::array::from_fn(|i| t.a[i]);
    let mut acc = [[_mm512_setzero_ps(); NV]; ROWS];
    // One paired K step `kp`, with `$a(i)` the A register of row `i`.
    macro_rules! step {
        ($kp:expr, $a:expr) => {{
            let mut bv = [_mm512_setzero_ps(); NV];
            for v in 0..NV {
                bv[v] = _mm512_loadu_ps(b.add(($kp * NV + v) * 16));
            }
            for i in 0..ROWS {
                let av = $a(i);
                for v in 0..NV {
                    acc[i][v] = _mm512_fmadd_ps(av, bv[v], acc[i][v]);
                }
            }
        }};
    }
    for &tap in taps {
        let pairs = |kp: usize| move |i: usize| broadcast_pair!(a[i].add(tap + 2 * kp));
        // The odd step's partner lanes get 0 (the panel's padding row is 0).
        let odd = |i: usize| _mm512_maskz_mov_ps(0x5555, _mm512_set1_ps(*a[i].add(tap + seg - 1)));
        lanes::paired_segment!(t, tap, seg, PREFETCH, step, pairs, odd);
        b = b.add(seg / 2 * 16 * NV);
    }
    // Each lane plus its partner, in the even lanes; those gathered in column order: 16
    // columns in one register from two, or 8 in the low half of one.
    let mut sums = [[_mm512_setzero_ps(); NV]; ROWS];
    for i in 0..ROWS {
        for v in 0..NV {
            sums[i][v] = _mm512_add_ps(acc[i][v], _mm512_permute_ps::<0b1011_0001>(acc[i][v]));
        }
    }
    let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    if NV == 2 {
        let mut y = [[_mm512_setzero_ps()]; ROWS];
        for i in 0..ROWS {
            y[i][0] = _mm512_permutex2var_ps(sums[i][0], even, sums[i][1]);
        }
        lanes::store_tile::<Zmm, ROWS, 1>(y, s, c, ldc);
    } else {
        let mut y = [[_mm256_setzero_ps()]; ROWS];
        for i in 0..ROWS {
            y[i][0] = _mm512_castps512_ps256(_mm512_permutexvar_ps(even, sums[i][0]));
        }
        lanes::store_tile::<Ymm, ROWS, 1>(y, s, c, ldc);
    }
}
