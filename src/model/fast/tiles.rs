//! How one convolution's output matrix (`pixels x channels`) is cut into the blocks the threads
//! compute.

use std::ops::Range;

/// The fewest rows per thread of a GEMM that copies its input and is split by rows.
pub const MIN_SPLIT_ROWS: usize = 16;

/// A rectangle of the output matrix (`pixels x channels`) computed by one task.
#[derive(Clone, Debug)]
pub struct Block {
    pub rows: Range<usize>,
    pub cols: Range<usize>,
}

/// Splits `m x n` into tiles of about `tile_rows` rows, at least one per thread: by rows while
/// there are enough, otherwise by columns as well (the small late layers at batch 1). Where
/// the GEMM reads copies of its input (a band of lines, patch rows), each task copies its own
/// rows' input, so those split by rows down to [`MIN_SPLIT_ROWS`] per thread: split by
/// columns, every task would copy all of it. Column blocks start on multiples of `align`.
pub fn blocks(
    m: usize,
    n: usize,
    tile_rows: usize,
    threads: usize,
    align: usize,
    copies_input: bool,
) -> Vec<Block> {
    let mut row_tiles = m.div_ceil(tile_rows).max(1);
    let mut col_tiles = 1;
    if row_tiles >= threads {
        row_tiles = row_tiles.next_multiple_of(threads);
    } else if copies_input && m >= threads * MIN_SPLIT_ROWS {
        row_tiles = threads;
    } else {
        col_tiles = threads.min(n.div_ceil(align)).max(1);
    }
    let rows_per = m.div_ceil(row_tiles).max(1);
    let cols_per = n.div_ceil(col_tiles).next_multiple_of(align);
    let mut out = Vec::with_capacity(row_tiles * col_tiles);
    for r0 in (0..m).step_by(rows_per) {
        for c0 in (0..n).step_by(cols_per) {
            out.push(Block {
                rows: r0..(r0 + rows_per).min(m),
                cols: c0..(c0 + cols_per).min(n),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_cover_the_matrix_once_and_split_by_columns_only_where_rows_are_few() {
        let cases = [(3136, 64, 455, 2), (49, 512, 56, 2), (10, 10, 512, 2)];
        for (&(m, n, tile, threads), copies_input) in
            cases.iter().flat_map(|c| [(c, false), (c, true)])
        {
            let bs = blocks(m, n, tile, threads, 32, copies_input);
            let mut seen = vec![0u8; m * n];
            for b in &bs {
                assert_eq!(b.cols.start % 32, 0);
                for r in b.rows.clone() {
                    for c in b.cols.clone() {
                        seen[r * n + c] += 1;
                    }
                }
            }
            assert!(seen.iter().all(|&s| s == 1), "{m}x{n}");
            assert!(bs.len() >= threads.min(n.div_ceil(32)), "{m}x{n}: {bs:?}");
            // Whole rows per task where there are enough rows (the 7x7 map is enough for a
            // GEMM that copies its input) or one column block.
            let by_rows = bs.iter().all(|b| b.cols == (0..n));
            let enough = m > tile || (copies_input && m >= threads * MIN_SPLIT_ROWS);
            assert_eq!(by_rows, enough || n <= 32, "{m}x{n}: {bs:?}");
        }
    }
}
