//! Turns an encoded image of any format and size into the model's normalised input tensor data.
//!
//! Decoding uses the `image` crate; resizing uses `fast_image_resize` (SIMD, antialiased).
//! Limits are checked from the header before any pixel is decoded, so a small file that claims
//! a huge size (a decompression bomb) is refused without allocating for it. [`read_header`] also
//! says how many bytes decoding will hold, which the server reserves from its decode budget
//! before [`decode_header`] runs.

use std::io::Cursor;

use fast_image_resize::images::Image as FirImage;
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use image::{DynamicImage, ImageDecoder, ImageReader, Limits};

/// What a model expects: channels, size and per-channel normalisation.
#[derive(Clone, Debug, PartialEq, serde::Deserialize, serde::Serialize)]
pub struct InputSpec {
    /// 1 (grayscale) or 3 (RGB).
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    /// Per-channel mean and std applied to pixel values scaled to [0, 1].
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
}

/// Size limits for untrusted input.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ImageLimits {
    /// One encoded image (and so one `Classify` message).
    pub max_encoded_bytes: usize,
    pub max_pixels: u64,
    /// One KServe `ModelInfer` message, which carries a whole batch of images or tensors.
    pub max_request_bytes: usize,
    /// Bytes of decoded pixels held at once by all requests' decodes together. An image whose
    /// decode alone needs more is refused (INVALID_ARGUMENT).
    pub decode_budget_bytes: u64,
    /// Longest wait for decode budget, in milliseconds (capped by the request's deadline);
    /// past it the request is refused (RESOURCE_EXHAUSTED) without being decoded.
    pub decode_wait_ms: u64,
    /// One KServe `ModelInfer` response; a request whose outputs would be larger is refused.
    pub max_response_bytes: usize,
}

impl Default for ImageLimits {
    fn default() -> Self {
        Self {
            max_encoded_bytes: 8 << 20,
            max_pixels: 40_000_000,
            max_request_bytes: 32 << 20,
            decode_budget_bytes: 256 << 20,
            decode_wait_ms: 1000,
            max_response_bytes: 16 << 20,
        }
    }
}

impl ImageLimits {
    pub fn decode_wait(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.decode_wait_ms)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PreprocessError {
    #[error("the image is empty")]
    Empty,
    #[error("the image is {size} bytes, over the limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    #[error("the image is not in a supported format (PNG, JPEG, WebP, GIF, BMP or TIFF)")]
    UnknownFormat,
    #[error("the image claims {width}x{height} pixels, over the limit of {limit} pixels")]
    TooManyPixels { width: u32, height: u32, limit: u64 },
    #[error("the image could not be decoded: {0}")]
    Decode(String),
    #[error("decoding the image needs {need} bytes, over the decode budget of {budget} bytes")]
    OverBudget { need: u64, budget: u64 },
}

/// Allocation a decoder may always make, whatever the image's size: small images still need
/// their decoder's tables and strip buffers (TIFF's are larger than a small image's pixels).
const DECODER_SCRATCH: u64 = 16 << 20;

/// An encoded image checked against the limits, and what decoding it will hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub width: u32,
    pub height: u32,
    /// Bytes held at once while decoding and converting: the decoded pixels in the image's own
    /// colour type, plus the converted copy and the resized result.
    pub decode_bytes: u64,
}

impl Header {
    pub fn pixels(&self) -> u64 {
        u64::from(self.width) * u64::from(self.height)
    }
}

/// Decodes, converts, resizes and normalises `bytes` into `channels * height * width` floats
/// in CHW order.
pub fn preprocess(
    bytes: &[u8],
    spec: &InputSpec,
    limits: &ImageLimits,
) -> Result<Vec<f32>, PreprocessError> {
    let header = read_header(bytes, spec, limits)?;
    decode_header(bytes, &header, spec)
}

/// Checks `bytes` against the limits from the image's header alone (no pixel is decoded) and
/// says what decoding it will cost.
pub fn read_header(
    bytes: &[u8],
    spec: &InputSpec,
    limits: &ImageLimits,
) -> Result<Header, PreprocessError> {
    if bytes.is_empty() {
        return Err(PreprocessError::Empty);
    }
    if bytes.len() > limits.max_encoded_bytes {
        return Err(PreprocessError::TooLarge {
            size: bytes.len(),
            limit: limits.max_encoded_bytes,
        });
    }
    let reader = reader(bytes)?;
    if reader.format().is_none() {
        return Err(PreprocessError::UnknownFormat);
    }
    let decoder = reader
        .into_decoder()
        .map_err(|e| PreprocessError::Decode(e.to_string()))?;
    let (width, height) = decoder.dimensions();
    let pixels = u64::from(width) * u64::from(height);
    if pixels > limits.max_pixels {
        return Err(PreprocessError::TooManyPixels {
            width,
            height,
            limit: limits.max_pixels,
        });
    }
    if pixels == 0 {
        return Err(PreprocessError::Decode("the image has no pixels".into()));
    }
    let channels = spec.channels as u64;
    let resized = (spec.height * spec.width) as u64 * channels;
    let decode_bytes = decoder
        .total_bytes()
        .saturating_add(pixels * channels)
        .saturating_add(resized);
    if decode_bytes > limits.decode_budget_bytes {
        return Err(PreprocessError::OverBudget {
            need: decode_bytes,
            budget: limits.decode_budget_bytes,
        });
    }
    Ok(Header {
        width,
        height,
        decode_bytes,
    })
}

fn reader(bytes: &[u8]) -> Result<ImageReader<Cursor<&[u8]>>, PreprocessError> {
    ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| PreprocessError::Decode(e.to_string()))
}

/// Decodes, converts, resizes and normalises an image [`read_header`] accepted.
pub fn decode_header(
    bytes: &[u8],
    header: &Header,
    spec: &InputSpec,
) -> Result<Vec<f32>, PreprocessError> {
    let image = decode(bytes, header)?;
    let (pixels, pixel_type) = match spec.channels {
        1 => (DynamicImage::ImageLuma8(image.to_luma8()), PixelType::U8),
        _ => (DynamicImage::ImageRgb8(image.to_rgb8()), PixelType::U8x3),
    };
    let resized = resize(&pixels, pixel_type, spec)?;
    Ok(normalise(&resized, spec))
}

fn decode(bytes: &[u8], header: &Header) -> Result<DynamicImage, PreprocessError> {
    let mut decoder = reader(bytes)?;
    // Defence in depth: the decoder refuses to allocate far past what the header promised
    // (its own scratch comes on top of the pixels the budget counts).
    let mut decoder_limits = Limits::default();
    decoder_limits.max_alloc = Some(header.decode_bytes.saturating_mul(2).max(DECODER_SCRATCH));
    decoder_limits.max_image_width = Some(header.width);
    decoder_limits.max_image_height = Some(header.height);
    decoder.limits(decoder_limits);
    decoder
        .decode()
        .map_err(|e| PreprocessError::Decode(e.to_string()))
}

fn resize(
    image: &DynamicImage,
    pixel_type: PixelType,
    spec: &InputSpec,
) -> Result<Vec<u8>, PreprocessError> {
    if image.width() as usize == spec.width && image.height() as usize == spec.height {
        return Ok(image.as_bytes().to_vec());
    }
    let mut dst = FirImage::new(spec.width as u32, spec.height as u32, pixel_type);
    let options = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Bilinear));
    Resizer::new()
        .resize(image, &mut dst, &options)
        .map_err(|e| PreprocessError::Decode(format!("resize failed: {e}")))?;
    Ok(dst.into_vec())
}

/// Interleaved u8 pixels (HWC) of `spec`'s size to normalised f32 planes (CHW).
pub fn normalise(pixels: &[u8], spec: &InputSpec) -> Vec<f32> {
    let plane = spec.height * spec.width;
    let mut out = vec![0f32; spec.channels * plane];
    for (c, dst) in out.chunks_exact_mut(plane).enumerate() {
        let scale = 1. / (255. * spec.std[c]);
        let offset = spec.mean[c] / spec.std[c];
        for (i, v) in dst.iter_mut().enumerate() {
            *v = f32::from(pixels[i * spec.channels + c]) * scale - offset;
        }
    }
    out
}
