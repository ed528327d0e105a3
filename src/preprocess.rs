//! Turns an encoded image of any format and size into the model's normalised input tensor data.
//!
//! Decoding uses the `image` crate; resizing uses `fast_image_resize` (SIMD, antialiased).
//! Limits are checked from the header before any pixel is decoded, so a small file that claims
//! a huge size (a decompression bomb) is refused without allocating for it.

use std::io::Cursor;

use fast_image_resize::images::Image as FirImage;
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use image::{DynamicImage, ImageReader, Limits};

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
#[serde(default)]
pub struct ImageLimits {
    /// One encoded image (and so one `Classify` message).
    pub max_encoded_bytes: usize,
    pub max_pixels: u64,
    /// One KServe `ModelInfer` message, which carries a whole batch of images or tensors.
    pub max_request_bytes: usize,
}

impl Default for ImageLimits {
    fn default() -> Self {
        Self {
            max_encoded_bytes: 8 << 20,
            max_pixels: 40_000_000,
            max_request_bytes: 32 << 20,
        }
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
}

/// Decodes, converts, resizes and normalises `bytes` into `channels * height * width` floats
/// in CHW order.
pub fn preprocess(
    bytes: &[u8],
    spec: &InputSpec,
    limits: &ImageLimits,
) -> Result<Vec<f32>, PreprocessError> {
    let image = decode(bytes, limits)?;
    let (pixels, pixel_type) = match spec.channels {
        1 => (DynamicImage::ImageLuma8(image.to_luma8()), PixelType::U8),
        _ => (DynamicImage::ImageRgb8(image.to_rgb8()), PixelType::U8x3),
    };
    let resized = resize(&pixels, pixel_type, spec)?;
    Ok(normalise(&resized, spec))
}

fn decode(bytes: &[u8], limits: &ImageLimits) -> Result<DynamicImage, PreprocessError> {
    if bytes.is_empty() {
        return Err(PreprocessError::Empty);
    }
    if bytes.len() > limits.max_encoded_bytes {
        return Err(PreprocessError::TooLarge {
            size: bytes.len(),
            limit: limits.max_encoded_bytes,
        });
    }
    let reader = || {
        ImageReader::new(Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|e| PreprocessError::Decode(e.to_string()))
    };
    let header = reader()?;
    if header.format().is_none() {
        return Err(PreprocessError::UnknownFormat);
    }
    let (width, height) = header
        .into_dimensions()
        .map_err(|e| PreprocessError::Decode(e.to_string()))?;
    if u64::from(width) * u64::from(height) > limits.max_pixels {
        return Err(PreprocessError::TooManyPixels {
            width,
            height,
            limit: limits.max_pixels,
        });
    }
    if width == 0 || height == 0 {
        return Err(PreprocessError::Decode("the image has no pixels".into()));
    }
    let mut decoder = reader()?;
    // Defence in depth: the decoder also refuses to allocate past the pixel budget (RGBA f32).
    let mut decoder_limits = Limits::default();
    decoder_limits.max_alloc = Some(limits.max_pixels.saturating_mul(16));
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
