//! The left-hand matrix of a convolution read in place: a band of the input lines a block of
//! output rows reads, copied once with zero borders (pooled or stacked as the term reads them),
//! and where each output row's taps start in it.

use std::cell::RefCell;
use std::ops::Range;

use super::kernel::{self, Lhs};
use super::map::pooled_line;
use super::term::Term;

thread_local! {
    /// Each thread's row starts of the block it reads by taps.
    static STARTS: RefCell<Vec<*const f32>> = const { RefCell::new(Vec::new()) };
}

/// Line `y` of image `image` of what `term`'s convolution reads, into `dst`: the input's line
/// (pooled if the term pools), with the pooled appended map's channels after each pixel's.
fn read_line(term: &Term, image: usize, y: usize, dst: &mut [f32]) {
    let x = term.input;
    let stride = x.c + term.appended.map_or(0, |a| a.c);
    if term.pooled {
        pooled_line(x, image, y, dst, stride);
    } else if stride == x.c {
        dst.copy_from_slice(x.line(image, y));
    } else {
        let line = x.line(image, y).chunks_exact(x.c);
        for (pixel, src) in dst.chunks_exact_mut(stride).zip(line) {
            pixel[..x.c].copy_from_slice(src);
        }
    }
    if let Some(appended) = term.appended {
        pooled_line(appended, image, y, &mut dst[x.c..], stride);
    }
}

/// Output rows `rows` of a convolution without patch rows: the input lines they read are copied
/// once (pooled or stacked as the term reads them), with zero borders, into `band`, where tap
/// `(ky, kx)` of every output pixel is the same step from the pixel's start (pixels `stride`
/// input pixels apart, output lines `stride` input lines apart); `run` multiplies them in place.
/// One copy of the input instead of `k * k / stride^2`. A 1x1 stride-1 convolution's band is
/// plain rows, which either back end reads.
pub fn tap_block(term: &Term, rows: Range<usize>, band: &mut Vec<f32>, run: impl Fn(Lhs)) {
    let conv = term.conv;
    let (h, w) = term.grid();
    let (k, pad, c, stride) = (conv.kernel, conv.padding, conv.c_in, conv.stride);
    assert!(
        k > 1 || stride == 1,
        "a strided 1x1 convolution reads patch rows"
    );
    let (ho, wo) = (conv.out_len(h), conv.out_len(w));
    let line_len = (w + 2 * pad) * c;
    // The block's output lines image by image (the first image from the block's first line,
    // the last to its last line), each image's with the `k - 1` input lines they overlap.
    let (first, last) = (rows.start, rows.end - 1);
    let (first_image, first_line) = (first / (ho * wo), first / wo % ho);
    let (last_image, last_line) = (last / (ho * wo), last / wo % ho);
    let lines = |image: usize| {
        let from = if image == first_image { first_line } else { 0 };
        let to = if image == last_image {
            last_line + 1
        } else {
            ho
        };
        from..to
    };
    // The input lines `n` output lines read, and where an image's start in the band: after
    // the first image's, whole images.
    let input_lines = |n: usize| stride * (n - 1) + k;
    let band_start = |image: usize| match image - first_image {
        0 => 0,
        later => (input_lines(lines(first_image).len()) + (later - 1) * input_lines(ho)) * line_len,
    };
    let len = band_start(last_image + 1);
    if band.len() < len {
        band.resize(len, 0.);
    }
    for image in first_image..=last_image {
        let (lines, start) = (lines(image), band_start(image));
        let band_lines =
            band[start..start + input_lines(lines.len()) * line_len].chunks_exact_mut(line_len);
        for (dst, y) in band_lines.zip((stride * lines.start) as isize - pad as isize..) {
            if y < 0 || y >= h as isize {
                dst.fill(0.);
                continue;
            }
            let (border, inner) = (pad * c, w * c);
            read_line(term, image, y as usize, &mut dst[border..border + inner]);
            dst[..border].fill(0.);
            dst[border + inner..].fill(0.);
        }
    }
    let band = &band[..];
    if k == 1 {
        let skipped = (rows.start % wo) * c;
        return run(Lhs::Rows {
            a: band[skipped..].as_ptr(),
            lda: c,
            in_map: false,
        });
    }
    STARTS.with_borrow_mut(|starts| {
        starts.clear();
        starts.resize(rows.len(), std::ptr::null());
        let (mut image, mut oy, mut ox) = (first_image, first_line, first % wo);
        let mut line = (oy - lines(image).start) * stride * line_len;
        // Output line by output line: within one, the starts are `stride * c` apart.
        let mut rest = &mut starts[..];
        while !rest.is_empty() {
            let (this_line, later) = rest.split_at_mut((wo - ox).min(rest.len()));
            let line_start = band[line + ox * stride * c..].as_ptr();
            kernel::fill_strided(this_line, line_start, stride * c);
            rest = later;
            (ox, oy) = (0, oy + 1);
            line += stride * line_len;
            if oy == ho {
                (oy, image) = (0, image + 1);
                line = band_start(image);
            }
        }
        let taps = conv.tap_offsets(w + 2 * pad);
        run(Lhs::Taps {
            starts,
            taps: &taps,
        });
    })
}
