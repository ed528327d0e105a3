//! The micro-kernel for 8-lane registers (AVX2 and FMA). With 16 registers, a row of a
//! 16-column panel takes two accumulators, so a strip is done four rows at a time: eight
//! independent accumulators, enough to keep both FMA pipes busy through the FMA latency.

use super::lanes::{self, Ymm};
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

/// Strip rows `first..first + ROWS` x `8 * NV` columns of the tile.
#[target_feature(enable = "avx2,fma")]
unsafe fn micro<const ROWS: usize, const NV: usize>(t: &Tile, s: &Store, first: usize) {
    lanes::micro::<Ymm, ROWS, NV>(t, s, first)
}
