//! One summand of a [`super::conv::conv_sum`]: a convolution and the map it reads, as it is,
//! pooled on read, or with a second map's pooled channels stacked after its own.

use super::map::{avg_pool2x2, Map};
use super::packed::PackedConv;
use crate::model::grid::halved;

/// One summand of [`super::conv::conv_sum`].
pub struct Term<'a> {
    pub(super) conv: &'a PackedConv,
    pub(super) input: &'a Map,
    /// The convolution reads `avg_pool2x2(input)`, pooled line by line as it reads it (no
    /// pooled map): only where `conv.reads_pooled()`.
    pub(super) pooled: bool,
    /// The channels of `avg_pool2x2(appended)`, read after the input's at every pixel: two
    /// convolutions of one output grid as one over the stacked channels (see [`Term::joint`]).
    pub(super) appended: Option<&'a Map>,
}

impl<'a> Term<'a> {
    /// `conv(input)`.
    pub fn of(conv: &'a PackedConv, input: &'a Map) -> Self {
        Self {
            conv,
            input,
            pooled: false,
            appended: None,
        }
    }

    /// `conv(cat(input, avg_pool2x2(appended)))` over channels, `input` pooled too where
    /// `pooled`: an octave layer's L->L and H->L convolutions as one GEMM with their kernels
    /// stacked, read in one pass over one band of lines. Only where `conv.reads_pooled()`.
    pub fn joint(conv: &'a PackedConv, input: &'a Map, pooled: bool, appended: &'a Map) -> Self {
        assert!(conv.reads_pooled(), "a joint term is read line by line");
        Self {
            conv,
            input,
            pooled,
            appended: Some(appended),
        }
    }

    /// `conv(avg_pool2x2(input))`: pooled as the convolution reads it where it can, otherwise
    /// into `store` first.
    pub fn pooled(conv: &'a PackedConv, input: &'a Map, store: &'a mut Option<Map>) -> Self {
        if conv.reads_pooled() {
            return Self {
                conv,
                input,
                pooled: true,
                appended: None,
            };
        }
        Self::of(conv, store.insert(avg_pool2x2(input)))
    }

    /// Whether the input is read as it is: neither pooled nor stacked with another.
    pub(super) fn reads_as_is(&self) -> bool {
        !self.pooled && self.appended.is_none()
    }

    /// Whether the GEMM reads the input map itself as A, copying nothing.
    pub(super) fn reads_in_place(&self) -> bool {
        self.conv.reads_input_directly() && self.reads_as_is()
    }

    /// The height and width the convolution reads.
    pub(super) fn grid(&self) -> (usize, usize) {
        let (h, w) = (self.input.h, self.input.w);
        if self.pooled {
            (halved(h), halved(w))
        } else {
            (h, w)
        }
    }
}
