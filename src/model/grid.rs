//! The spatial rule both forms of the networks (candle tensors and the fast path) share.

/// Output size of a 2x2 / stride-2 ceil-mode pool: odd sizes keep their last row/column. The
/// octave branches line up by it: a low map is `halved` of its high map on both axes.
pub fn halved(n: usize) -> usize {
    n.div_ceil(2)
}
