//! The one multiply loop and epilogue store of every micro-kernel, over what they need of a
//! vector register ([`Lanes`]): 16 lanes ([`Zmm`], AVX-512F) or 8 ([`Ymm`], AVX2 and FMA).
//!
//! Everything here is `#[inline(always)]`: it is inlined into the `#[target_feature]` kernel
//! that calls it, and the intrinsics into it there.

use std::arch::x86_64::*;

use super::tiled::{Store, Tile};

/// One vector register of `f32` lanes.
pub trait Lanes {
    type V: Copy;
    const N: usize;
    unsafe fn zero() -> Self::V;
    /// `N` floats from `src`.
    unsafe fn load(src: *const f32) -> Self::V;
    /// `real` (0..=N) floats from `src`, then zeros, reading nothing past them.
    unsafe fn load_first(src: *const f32, real: usize) -> Self::V;
    /// The first `real` lanes of `y` at `dst`, writing nothing past them.
    unsafe fn store_first(dst: *mut f32, y: Self::V, real: usize);
    /// `*src` in every lane.
    unsafe fn splat(src: *const f32) -> Self::V;
    /// `a * b + c`.
    unsafe fn fma(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    unsafe fn add(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn relu(y: Self::V) -> Self::V;
}

/// `ROWS` strip rows x `N * NV` columns of C from the tile's steps of A (broadcast) times the
/// panel (loaded); with `PREFETCH`, the next strip's rows are prefetched on the way
/// ([`Tile::next`]). A separate instance, so that the tap-reading calls (short K segments,
/// nothing to prefetch) keep their plain loop; and one more for calls that prefetch the next
/// panel group ([`Tile::ahead`]), so that the others issue no prefetch for it.
#[inline(always)]
pub unsafe fn micro<L: Lanes, const ROWS: usize, const NV: usize, const PREFETCH: bool>(
    t: &Tile,
    s: &Store,
) {
    if t.ahead.is_null() {
        micro_steps::<L, ROWS, NV, PREFETCH, false>(t, s)
    } else {
        micro_steps::<L, ROWS, NV, PREFETCH, true>(t, s)
    }
}

/// [`micro`], prefetching one line of [`Tile::ahead`] into L2 per K step where `AHEAD`.
#[inline(always)]
unsafe fn micro_steps<
    L: Lanes,
    const ROWS: usize,
    const NV: usize,
    const PREFETCH: bool,
    const AHEAD: bool,
>(
    t: &Tile,
    s: &Store,
) {
    let (taps, seg, mut b, c, ldc) = (t.taps, t.seg, t.b, t.c, t.ldc);
    let a: [*const f32; ROWS] = std::array::from_fn(|i| t.a[i]);
    let mut ahead = t.ahead;
    if taps.len() * seg <= SHALLOW_STEPS {
        prefetch_outputs::<L, ROWS, NV>(s, c, ldc);
    }
    let mut acc = [[L::zero(); NV]; ROWS];
    // K steps `$k` of the tap at `$tap`.
    macro_rules! steps {
        ($tap:expr, $k:expr) => {
            for k in $k {
                prefetch_panel::<L, NV>(b, k - $tap);
                if AHEAD {
                    _mm_prefetch::<_MM_HINT_T1>(ahead.wrapping_add((k - $tap) * 64));
                }
                let bv: [L::V; NV] =
                    std::array::from_fn(|v| L::load(b.add((k - $tap) * L::N * NV + L::N * v)));
                for (i, row) in acc.iter_mut().enumerate() {
                    let av = L::splat(a[i].add(k));
                    for (v, x) in row.iter_mut().enumerate() {
                        *x = L::fma(av, bv[v], *x);
                    }
                }
            }
        };
    }
    for &tap in taps {
        if !PREFETCH {
            steps!(tap, tap..tap + seg);
        } else {
            for line in (tap..tap + seg).step_by(LINE) {
                prefetch_next(t, line);
                steps!(tap, line..(line + LINE).min(tap + seg));
            }
        }
        b = b.add(seg * L::N * NV);
        ahead = ahead.wrapping_add(seg * 64);
    }
    store_tile::<L, ROWS, NV>(acc, s, c, ldc);
}

/// The K steps of one tap's segment of `$seg` steps at `$tap`, on paired panels: the kernel's
/// `$step!(kp, a)` for each pair `kp` of steps with A registers `$pairs(kp)`, the next strip's
/// rows prefetched on the way where `$prefetch` (as in [`micro`]), then for the last, unpaired
/// step of an odd segment (segments are even where there are several) with A registers `$odd`.
/// A macro rather than a function taking closures, so that no closure borrows the kernel's
/// accumulators, which LLVM may then leave on the stack.
macro_rules! paired_segment {
    ($t:expr, $tap:expr, $seg:expr, $prefetch:expr, $step:ident, $pairs:expr, $odd:expr) => {{
        use $crate::model::fast::kernel::lanes::{prefetch_next, LINE};
        if !$prefetch {
            for kp in 0..$seg / 2 {
                $step!(kp, $pairs(kp));
            }
        } else {
            for line in (0..$seg / 2).step_by(LINE / 2) {
                prefetch_next($t, $tap + 2 * line);
                for kp in line..(line + LINE / 2).min($seg / 2) {
                    $step!(kp, $pairs(kp));
                }
            }
        }
        if $seg % 2 == 1 {
            $step!($seg / 2, $odd);
        }
    }};
}
pub(super) use paired_segment;

/// How far ahead of the K step it multiplies the kernel prefetches the panel: 2 KiB, 16 steps
/// of a 32-column panel. The hardware prefetchers stop at each 4 KiB page, and a deep layer's
/// panel chunk (32-64 KiB) comes from memory on its first strip: without this, ResNet-50's
/// layer4 at batch 1 ran at half the GFLOP/s of layer2, waiting on its weights.
const PANEL_AHEAD_BYTES: usize = 2048;

/// Prefetches the panel's lines [`PANEL_AHEAD_BYTES`] past K step `step` of the panel at `b`
/// (`L::N * NV` floats a step). Past the panel's end it touches the next one's, or nothing
/// mapped, which a prefetch ignores.
#[inline(always)]
unsafe fn prefetch_panel<L: Lanes, const NV: usize>(b: *const f32, step: usize) {
    let step_bytes = L::N * NV * 4;
    let ahead = b
        .cast::<i8>()
        .wrapping_add(step * step_bytes + PANEL_AHEAD_BYTES);
    prefetch_lines::<_MM_HINT_T0>(ahead, step_bytes);
}

/// Prefetches with `HINT` every 64-byte line of the `bytes` from `from`.
#[inline(always)]
unsafe fn prefetch_lines<const HINT: i32>(from: *const i8, bytes: usize) {
    for line in (0..bytes).step_by(64) {
        _mm_prefetch::<HINT>(from.wrapping_add(line));
    }
}

/// The most K steps of a call that prefetches its outputs ([`prefetch_outputs`]): a deeper
/// call computes long enough for the hardware to bring them, and its prefetched lines would
/// leave L1 before the store.
const SHALLOW_STEPS: usize = 128;

/// Prefetches what the store of this micro-tile will touch: C's lines for writing, and the
/// addend rows' lines. Issued before the K loop, they arrive while it runs: a shallow
/// convolution (64 input channels, a 56x56 map) otherwise stalls on a read-for-ownership of
/// every output line and on every residual line it adds.
#[inline(always)]
unsafe fn prefetch_outputs<L: Lanes, const ROWS: usize, const NV: usize>(
    s: &Store,
    c: *mut f32,
    ldc: usize,
) {
    let bytes = (L::N * NV * 4).min(s.width * 4);
    for i in 0..ROWS {
        prefetch_lines::<_MM_HINT_ET0>(c.add(i * ldc).cast(), bytes);
        if s.addends.is_null() {
            continue;
        }
        for addend in *s.addends.add(i) {
            if !addend.is_null() {
                prefetch_lines::<_MM_HINT_T0>(addend.add(s.col0).cast(), bytes);
            }
        }
    }
}

/// K steps in one 64-byte line of A.
pub const LINE: usize = 16;

/// Prefetches the line holding K step `k` of each of the next strip's rows ([`Tile::next`]).
#[inline(always)]
pub unsafe fn prefetch_next(t: &Tile, k: usize) {
    for row in (*t.next).iter().take_while(|row| !row.is_null()) {
        _mm_prefetch::<_MM_HINT_T0>(row.add(k).cast());
    }
}

/// Stores a strip's sums `y` (row `i`, register `v`: columns `L::N * v..`) into C at `c`, after
/// what C holds where `s.load_c`, then the store's epilogue. Each step runs over every row
/// and register with its condition tested once, so that it unrolls and `y` stays in registers;
/// a panel's padding columns go through the slower partial path. (Plain loops: an iterator
/// adapter or `array::map` here is std code compiled without the caller's AVX, and calls the
/// intrinsics out of line.)
#[inline(always)]
pub unsafe fn store_tile<L: Lanes, const ROWS: usize, const NV: usize>(
    y: [[L::V; NV]; ROWS],
    s: &Store,
    c: *mut f32,
    ldc: usize,
) {
    if s.width >= L::N * NV {
        store_columns::<L, ROWS, NV, true>(y, s, c, ldc)
    } else {
        store_columns::<L, ROWS, NV, false>(y, s, c, ldc)
    }
}

/// [`store_tile`] for `FULL` registers or the panel's `s.width` real columns.
#[inline(always)]
unsafe fn store_columns<L: Lanes, const ROWS: usize, const NV: usize, const FULL: bool>(
    mut y: [[L::V; NV]; ROWS],
    s: &Store,
    c: *mut f32,
    ldc: usize,
) {
    let real = |v: usize| {
        if FULL {
            L::N
        } else {
            s.width.saturating_sub(L::N * v).min(L::N)
        }
    };
    if s.load_c {
        add_rows::<L, ROWS, NV>(&mut y, real, |i| c.add(i * ldc));
    }
    if !s.bias.is_null() {
        add_rows::<L, ROWS, NV>(&mut y, real, |_| s.bias);
    }
    if !s.addends.is_null() {
        for j in 0..2 {
            add_rows::<L, ROWS, NV>(&mut y, real, |i| {
                let addend = (*s.addends.add(i))[j];
                if addend.is_null() {
                    addend
                } else {
                    addend.add(s.col0)
                }
            });
        }
    }
    if s.relu {
        for row in y.iter_mut() {
            for x in row.iter_mut() {
                *x = L::relu(*x);
            }
        }
    }
    for (i, row) in y.iter().enumerate() {
        for (v, &x) in row.iter().enumerate() {
            L::store_first(c.add(i * ldc + L::N * v), x, real(v));
        }
    }
}

/// Adds the registers at `rows(i)` (`real(v)` lanes of register `v`) to row `i` of `y`, for
/// every row whose pointer is not null.
#[inline(always)]
unsafe fn add_rows<L: Lanes, const ROWS: usize, const NV: usize>(
    y: &mut [[L::V; NV]; ROWS],
    real: impl Fn(usize) -> usize,
    rows: impl Fn(usize) -> *const f32,
) {
    for (i, row) in y.iter_mut().enumerate() {
        let from = rows(i);
        if from.is_null() {
            continue;
        }
        for (v, x) in row.iter_mut().enumerate() {
            *x = L::add(*x, L::load_first(from.add(L::N * v), real(v)));
        }
    }
}

/// 16 lanes, partial ones masked.
pub struct Zmm;

impl Zmm {
    #[inline(always)]
    fn mask(real: usize) -> u16 {
        ((1u32 << real) - 1) as u16
    }
}

impl Lanes for Zmm {
    type V = __m512;
    const N: usize = 16;
    #[inline(always)]
    unsafe fn zero() -> __m512 {
        _mm512_setzero_ps()
    }
    #[inline(always)]
    unsafe fn load(src: *const f32) -> __m512 {
        _mm512_loadu_ps(src)
    }
    #[inline(always)]
    unsafe fn load_first(src: *const f32, real: usize) -> __m512 {
        _mm512_maskz_loadu_ps(Self::mask(real), src)
    }
    #[inline(always)]
    unsafe fn store_first(dst: *mut f32, y: __m512, real: usize) {
        _mm512_mask_storeu_ps(dst, Self::mask(real), y)
    }
    #[inline(always)]
    unsafe fn splat(src: *const f32) -> __m512 {
        _mm512_set1_ps(*src)
    }
    #[inline(always)]
    unsafe fn fma(a: __m512, b: __m512, c: __m512) -> __m512 {
        _mm512_fmadd_ps(a, b, c)
    }
    #[inline(always)]
    unsafe fn add(a: __m512, b: __m512) -> __m512 {
        _mm512_add_ps(a, b)
    }
    #[inline(always)]
    unsafe fn relu(y: __m512) -> __m512 {
        _mm512_max_ps(y, _mm512_setzero_ps())
    }
}

/// 8 lanes; partial ones go through a stack buffer (AVX2's masked moves are slow on some
/// CPUs).
pub struct Ymm;

impl Lanes for Ymm {
    type V = __m256;
    const N: usize = 8;
    #[inline(always)]
    unsafe fn zero() -> __m256 {
        _mm256_setzero_ps()
    }
    #[inline(always)]
    unsafe fn load(src: *const f32) -> __m256 {
        _mm256_loadu_ps(src)
    }
    #[inline(always)]
    unsafe fn load_first(src: *const f32, real: usize) -> __m256 {
        if real == 8 {
            return _mm256_loadu_ps(src);
        }
        let mut lanes = [0f32; 8];
        std::ptr::copy_nonoverlapping(src, lanes.as_mut_ptr(), real);
        _mm256_loadu_ps(lanes.as_ptr())
    }
    #[inline(always)]
    unsafe fn store_first(dst: *mut f32, y: __m256, real: usize) {
        if real == 8 {
            return _mm256_storeu_ps(dst, y);
        }
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), y);
        std::ptr::copy_nonoverlapping(lanes.as_ptr(), dst, real);
    }
    #[inline(always)]
    unsafe fn splat(src: *const f32) -> __m256 {
        _mm256_broadcast_ss(&*src)
    }
    #[inline(always)]
    unsafe fn fma(a: __m256, b: __m256, c: __m256) -> __m256 {
        _mm256_fmadd_ps(a, b, c)
    }
    #[inline(always)]
    unsafe fn add(a: __m256, b: __m256) -> __m256 {
        _mm256_add_ps(a, b)
    }
    #[inline(always)]
    unsafe fn relu(y: __m256) -> __m256 {
        _mm256_max_ps(y, _mm256_setzero_ps())
    }
}
