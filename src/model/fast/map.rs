//! Feature maps in NHWC order and the cheap ops between convolutions.
//!
//! NHWC keeps a pixel's channels contiguous, so a 1x1 convolution reads its input as the
//! left-hand matrix of a GEMM as is, and every kxk patch row is `k` runs of `k * c` floats.

use std::ops::Range;

use super::threads;
use crate::alloc::uncounted;
use crate::model::grid::halved;

/// A batch of feature maps, `data[((n * h + y) * w + x) * c + ch]`. `data` holds exactly
/// `n * h * w * c` floats: the constructors make it so, and the convolutions, which read it by
/// pointer, check it ([`Map::assert_whole`]). Only the fast path builds or changes one.
#[derive(Clone, Debug, PartialEq)]
pub struct Map {
    pub(super) n: usize,
    pub(super) h: usize,
    pub(super) w: usize,
    pub(super) c: usize,
    pub(super) data: Vec<f32>,
}

/// Work below this many floats is not worth handing to another thread.
const PAR_MIN_FLOATS: usize = 1 << 14;

impl Map {
    pub fn zeros(n: usize, h: usize, w: usize, c: usize) -> Self {
        Self {
            n,
            h,
            w,
            c,
            data: vec![0.; n * h * w * c],
        }
    }

    /// From NHWC data; panics unless it holds `n * h * w * c` floats.
    pub fn from_nhwc(data: Vec<f32>, n: usize, h: usize, w: usize, c: usize) -> Self {
        let map = Self { n, h, w, c, data };
        map.assert_whole();
        map
    }

    /// Panics unless `data` holds exactly the map's `n * h * w * c` floats.
    pub fn assert_whole(&self) {
        assert_eq!(
            Some(self.data.len()),
            self.n
                .checked_mul(self.h)
                .and_then(|p| p.checked_mul(self.w))
                .and_then(|p| p.checked_mul(self.c)),
            "feature map length"
        );
    }

    pub fn pixels(&self) -> usize {
        self.n * self.h * self.w
    }

    /// Line `y` of image `image`: its `w` pixels' channels.
    pub fn line(&self, image: usize, y: usize) -> &[f32] {
        let len = self.w * self.c;
        &self.data[(image * self.h + y) * len..][..len]
    }

    pub fn pixel(&self, image: usize, y: usize, x: usize) -> &[f32] {
        let start = ((image * self.h + y) * self.w + x) * self.c;
        &self.data[start..start + self.c]
    }

    /// A copy of images `range` of the batch.
    pub fn images(&self, range: Range<usize>) -> Self {
        let len = self.h * self.w * self.c;
        Self {
            n: range.len(),
            data: self.data[range.start * len..range.end * len].to_vec(),
            ..*self
        }
    }

    /// Keeps the first `images` images and frees the memory of the rest.
    pub fn keep_images(&mut self, images: usize) {
        self.data.truncate(images * self.h * self.w * self.c);
        self.data.shrink_to_fit();
        self.n = images;
    }

    /// Writes the one-image map `image` (same height, width and channels) as image `at`.
    pub fn put_image(&mut self, at: usize, image: &Map) {
        assert_eq!(
            (image.n, image.h, image.w, image.c),
            (1, self.h, self.w, self.c)
        );
        let len = image.data.len();
        self.data[at * len..(at + 1) * len].copy_from_slice(&image.data);
    }

    /// From NCHW (candle's layout), line by line over the threads: each output line interleaves
    /// the same line of every channel plane. (Pixel by pixel on one thread this took ~1% of a
    /// ResNet-50 pass.)
    pub fn from_nchw(data: &[f32], n: usize, c: usize, h: usize, w: usize) -> Self {
        assert_eq!(data.len(), n * c * h * w, "NCHW input length");
        let mut map = Self::zeros(n, h, w, c);
        let plane = h * w;
        map.fill_rows(|image, y, line| {
            for ch in 0..c {
                let src = &data[(image * c + ch) * plane + y * w..][..w];
                for (pixel, &v) in line.chunks_exact_mut(c).zip(src) {
                    pixel[ch] = v;
                }
            }
        });
        map
    }

    /// Calls `fill(image, y, row)` for every output row, rows spread over the threads.
    fn fill_rows(&mut self, fill: impl Fn(usize, usize, &mut [f32]) + Sync) {
        let row_len = self.w * self.c;
        if row_len == 0 {
            return;
        }
        let rows_per_task = PAR_MIN_FLOATS.div_ceil(row_len);
        let h = self.h;
        // A thread waiting here may run other callers' work: not this pass's (`crate::alloc`).
        uncounted(|| {
            let tasks = self.data.chunks_mut(row_len * rows_per_task);
            threads::for_each_task(tasks.enumerate().collect(), |(task, chunk)| {
                for (i, row) in chunk.chunks_exact_mut(row_len).enumerate() {
                    let r = task * rows_per_task + i;
                    fill(r / h, r % h, row);
                }
            })
        });
    }
}

/// 2x2 average pool, stride 2, ceil mode: a window cut by the border averages what it covers
/// (as the candle form of the networks pools).
pub fn avg_pool2x2(x: &Map) -> Map {
    let mut out = Map::zeros(x.n, halved(x.h), halved(x.w), x.c);
    out.fill_rows(|image, oy, row| pooled_line(x, image, oy, row, x.c));
    out
}

/// Line `oy` of image `image` of [`avg_pool2x2`]`(x)`, written over whatever `dst` held, each
/// pixel's `x.c` channels `stride` floats after the previous one's: where a convolution reads
/// the pooled map, it pools each line it needs as it reads it, stacked after other channels if
/// need be.
pub fn pooled_line(x: &Map, image: usize, oy: usize, dst: &mut [f32], stride: usize) {
    let c = x.c;
    let mut pixels = dst
        .chunks_mut(stride)
        .map(|pixel| &mut pixel[..c])
        .enumerate();
    // Whole windows in one pass over the two input rows, four pixels per output pixel.
    let whole_windows = if 2 * oy + 1 < x.h { x.w / 2 } else { 0 };
    let pairs = |y: usize| x.data[((image * x.h + y) * x.w) * c..].chunks_exact(2 * c);
    for ((_, dst), (top, bottom)) in pixels
        .by_ref()
        .take(whole_windows)
        .zip(pairs(2 * oy).zip(pairs(2 * oy + 1)))
    {
        let ((t0, t1), (b0, b1)) = (top.split_at(c), bottom.split_at(c));
        for ((d, (a, b)), (e, f)) in dst.iter_mut().zip(t0.iter().zip(t1)).zip(b0.iter().zip(b1)) {
            *d = 0.25 * (a + b + e + f);
        }
    }
    // Windows cut by the right or bottom border: the mean of the cells they cover.
    let ys = 2 * oy..(2 * oy + 2).min(x.h);
    for (ox, dst) in pixels {
        let xs = 2 * ox..(2 * ox + 2).min(x.w);
        let scale = 1.0 / (ys.len() * xs.len()) as f32;
        dst.fill(0.);
        for y in ys.clone() {
            for xx in xs.clone() {
                let src = x.pixel(image, y, xx);
                dst.iter_mut().zip(src).for_each(|(d, s)| *d += s);
            }
        }
        dst.iter_mut().for_each(|d| *d *= scale);
    }
}

/// 3x3 max pool, stride 2, padding 1: the ResNet stem's. Each output line first takes the
/// maximum of its (up to) three input lines, value by value, into a line of scratch; each
/// output pixel is then the maximum of (up to) three pixels of that line. Every input line is
/// read by two output lines at most, in long contiguous runs, where a pixel-by-pixel window
/// read each input pixel up to four times, 64 floats at a time.
pub fn max_pool3x3s2p1(x: &Map) -> Map {
    let mut out = Map::zeros(x.n, halved(x.h), halved(x.w), x.c);
    let c = x.c;
    out.fill_rows(|image, oy, row| {
        LINE.with_borrow_mut(|lines| {
            let mut ys = window(oy, x.h);
            lines.clear();
            lines.extend_from_slice(x.line(image, ys.next().expect("a window covers a line")));
            ys.for_each(|y| max_into(lines, x.line(image, y)));
            for (ox, dst) in row.chunks_exact_mut(c).enumerate() {
                let mut xs = window(ox, x.w);
                let pixel = |xx: usize| &lines[xx * c..(xx + 1) * c];
                dst.copy_from_slice(pixel(xs.next().expect("a window covers a pixel")));
                xs.for_each(|xx| max_into(dst, pixel(xx)));
            }
        })
    });
    out
}

thread_local! {
    /// Each thread's line of column-wise maxima for [`max_pool3x3s2p1`].
    static LINE: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The input cells (lines or pixels) of output cell `o` of a 3-wide, stride-2, padding-1
/// window over `len` cells.
fn window(o: usize, len: usize) -> Range<usize> {
    (2 * o).saturating_sub(1)..(2 * o + 2).min(len)
}

/// `dst = max(dst, src)`, value by value: a select on a comparison, stored unconditionally,
/// which LLVM makes a vector maximum (`f32::max`'s NaN rule and a conditional store keep it
/// from one).
fn max_into(dst: &mut [f32], src: &[f32]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = if s > *d { s } else { *d };
    }
}

/// Global average pool: `[n, c]` row-major.
pub fn global_avg_pool(x: &Map) -> Vec<f32> {
    let plane = x.h * x.w;
    let mut out = vec![0f32; x.n * x.c];
    for (image, sums) in out.chunks_exact_mut(x.c).enumerate() {
        let pixels = &x.data[image * plane * x.c..(image + 1) * plane * x.c];
        for pixel in pixels.chunks_exact(x.c) {
            sums.iter_mut().zip(pixel).for_each(|(s, v)| *s += v);
        }
        sums.iter_mut().for_each(|s| *s /= plane as f32);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp(n: usize, h: usize, w: usize, c: usize) -> Map {
        let mut m = Map::zeros(n, h, w, c);
        m.data
            .iter_mut()
            .enumerate()
            .for_each(|(i, v)| *v = (i % 13) as f32 - 6.);
        m
    }

    #[test]
    fn nchw_to_nhwc_moves_channels_last() {
        let nchw: Vec<f32> = (0..2 * 3 * 2 * 2).map(|i| i as f32).collect();
        let m = Map::from_nchw(&nchw, 2, 3, 2, 2);
        // image 1, y 0, x 1, channel 2 = NCHW index ((1 * 3 + 2) * 2 + 0) * 2 + 1.
        assert_eq!(m.pixel(1, 0, 1)[2], 21.);
    }

    #[test]
    fn avg_pool_averages_only_covered_cells_on_odd_sizes() {
        let x = ramp(1, 3, 3, 2);
        let p = avg_pool2x2(&x);
        // Even sizes take the whole-window pass: every output the mean of its four cells.
        let even = ramp(2, 4, 6, 3);
        let q = avg_pool2x2(&even);
        for (image, y, xx, ch) in [(0, 0, 0, 0), (1, 1, 2, 2), (1, 0, 1, 1)] {
            let cells = [(0, 0), (0, 1), (1, 0), (1, 1)];
            let sum: f32 = cells
                .iter()
                .map(|&(dy, dx)| even.pixel(image, 2 * y + dy, 2 * xx + dx)[ch])
                .sum();
            assert_eq!(q.pixel(image, y, xx)[ch], sum / 4.);
        }
        assert_eq!((p.h, p.w), (2, 2));
        let mean = |cells: &[(usize, usize)], ch: usize| {
            cells
                .iter()
                .map(|&(y, xx)| x.pixel(0, y, xx)[ch])
                .sum::<f32>()
                / cells.len() as f32
        };
        assert_eq!(
            p.pixel(0, 0, 0)[1],
            mean(&[(0, 0), (0, 1), (1, 0), (1, 1)], 1)
        );
        assert_eq!(p.pixel(0, 0, 1)[0], mean(&[(0, 2), (1, 2)], 0));
        assert_eq!(p.pixel(0, 1, 1)[1], mean(&[(2, 2)], 1));
    }

    #[test]
    fn max_pool_takes_the_window_maximum() {
        // Odd and even sizes: windows cut by the top, left, bottom and right borders.
        for (h, w) in [(5, 4), (6, 7), (1, 1), (2, 3)] {
            // Scrambled values, so that a window shifted by a cell finds another maximum.
            let mut x = ramp(2, h, w, 3);
            x.data
                .iter_mut()
                .enumerate()
                .for_each(|(i, v)| *v = ((i * 7919) % 1009) as f32 - 500.);
            let p = max_pool3x3s2p1(&x);
            assert_eq!((p.n, p.h, p.w, p.c), (2, halved(h), halved(w), 3));
            for (image, oy, ox, ch) in (0..2)
                .flat_map(|i| (0..p.h).map(move |oy| (i, oy)))
                .flat_map(|(i, oy)| (0..p.w).map(move |ox| (i, oy, ox)))
                .flat_map(|(i, oy, ox)| (0..3).map(move |ch| (i, oy, ox, ch)))
            {
                let rows = (2 * oy as isize - 1)..=(2 * oy as isize + 1);
                let expected = rows
                    .flat_map(|y| {
                        ((2 * ox as isize - 1)..=(2 * ox as isize + 1)).map(move |xx| (y, xx))
                    })
                    .filter(|&(y, xx)| y >= 0 && xx >= 0 && y < h as isize && xx < w as isize)
                    .map(|(y, xx)| x.pixel(image, y as usize, xx as usize)[ch])
                    .fold(f32::MIN, f32::max);
                assert_eq!(
                    p.pixel(image, oy, ox)[ch],
                    expected,
                    "{h}x{w} at {image} {oy} {ox} {ch}"
                );
            }
        }
    }
}
