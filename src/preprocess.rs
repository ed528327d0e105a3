//! Turns an encoded image of any format and size into the model's normalised input tensor data.
//!
//! Decoding uses the `image` crate; resizing uses `fast_image_resize` (SIMD, antialiased).
//! A sequential JPEG at least twice the model's input in both dimensions is instead decoded
//! scaled by 1/2, 1/4 or 1/8 inside the IDCT (`jpeg-decoder`), to the smallest of those sizes
//! still at least the input's, so a 24-megapixel photo for a 28x28 model never holds its full
//! size; the rest of the route (conversion, resize, normalisation) is the same.
//! Limits are checked from the header before any pixel is decoded, so a small file that claims
//! a huge size (a decompression bomb) is refused without allocating for it. [`read_header`] also
//! says how many bytes decoding will hold, which the server reserves from its decode budget
//! before [`decode_header`] runs.

use std::io::Cursor;

use fast_image_resize::images::Image as FirImage;
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use image::{DynamicImage, GrayImage, ImageDecoder, ImageFormat, ImageReader, Limits, RgbImage};
use jpeg_decoder::{CodingProcess, PixelFormat};

/// What a model expects: channels, size and per-channel normalisation.
#[derive(Clone, Debug, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
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
    /// colour type, plus the converted copy and the resized result. For a JPEG decoded scaled
    /// (see [`decode_header`]) these are the scaled size's, plus the decoder's component planes.
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
    let format = reader.format().ok_or(PreprocessError::UnknownFormat)?;
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
    let decode_bytes = match scaled_jpeg(bytes, format, width, height, spec) {
        Some(scaled) => scaled.decode_bytes(spec).saturating_add(resized),
        None => decoder
            .total_bytes()
            .saturating_add(pixels * channels)
            .saturating_add(resized),
    };
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
///
/// A JPEG that [`read_header`] found large enough is decoded scaled down in the IDCT (what its
/// `decode_bytes` counted); every other image is decoded at full size.
pub fn decode_header(
    bytes: &[u8],
    header: &Header,
    spec: &InputSpec,
) -> Result<Vec<f32>, PreprocessError> {
    let format = reader(bytes)?.format();
    let scaled = format.and_then(|f| scaled_jpeg(bytes, f, header.width, header.height, spec));
    let image = match scaled {
        Some(scaled) => scaled.decode(header)?,
        None => decode(bytes, header)?,
    };
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

/// A JPEG to be decoded scaled in its IDCT, set up (header read, scale chosen) and not yet
/// decoded.
struct ScaledJpeg<'a> {
    decoder: jpeg_decoder::Decoder<EndsInEoi<'a>>,
    width: u32,
    height: u32,
    format: PixelFormat,
    /// Bytes of the decoder's component planes at the scaled size (sampling factors and
    /// padding to whole MCUs included), held until it has interleaved them.
    planes: u64,
}

/// `Some` where `bytes` is a sequential (baseline or extended) 8-bit JPEG whose 1/2, 1/4 or
/// 1/8 scale is still at least `spec`'s size in both dimensions; `width` and `height` are the
/// full size `image` read from the header, which `jpeg-decoder` must agree with. Progressive
/// JPEGs (whose decoder holds every coefficient at full size whatever the scale), lossless and
/// 16-bit ones and anything `jpeg-decoder` cannot parse stay on the full-size route. A pure
/// function of its inputs, so [`read_header`] and [`decode_header`] always agree.
fn scaled_jpeg<'a>(
    bytes: &'a [u8],
    format: ImageFormat,
    width: u32,
    height: u32,
    spec: &InputSpec,
) -> Option<ScaledJpeg<'a>> {
    if format != ImageFormat::Jpeg {
        return None;
    }
    let fits = |denominator: u32| {
        width.div_ceil(denominator) as usize >= spec.width
            && height.div_ceil(denominator) as usize >= spec.height
    };
    let denominator = [8, 4, 2].into_iter().find(|&d| fits(d))?;
    let mut decoder = jpeg_decoder::Decoder::new(EndsInEoi::new(bytes));
    decoder.read_info().ok()?;
    let info = decoder.info()?;
    if info.coding_process != CodingProcess::DctSequential
        || info.pixel_format == PixelFormat::L16
        || (u32::from(info.width), u32::from(info.height)) != (width, height)
    {
        return None;
    }
    let requested = |len: u32| u16::try_from(len.div_ceil(denominator)).ok();
    let (scaled_width, scaled_height) =
        decoder.scale(requested(width)?, requested(height)?).ok()?;
    let (scaled_width, scaled_height) = (u32::from(scaled_width), u32::from(scaled_height));
    if (scaled_width as usize) < spec.width
        || (scaled_height as usize) < spec.height
        || (scaled_width, scaled_height) == (width, height)
    {
        return None;
    }
    // Each component's plane is whole blocks of whole MCUs: at most 3 blocks (sampling
    // factors go up to 4) past the image's own blocks in each direction, each block
    // `8 / denominator` pixels a side.
    let block = u64::from(8 / denominator);
    let blocks = |len: u32| u64::from(len.div_ceil(8)) + 3;
    let components = info.pixel_format.pixel_bytes() as u64;
    let planes = components * blocks(width) * block * blocks(height) * block;
    Some(ScaledJpeg {
        decoder,
        width: scaled_width,
        height: scaled_height,
        format: info.pixel_format,
        planes,
    })
}

impl ScaledJpeg<'_> {
    fn pixels(&self) -> u64 {
        u64::from(self.width) * u64::from(self.height)
    }

    /// Bytes held by [`ScaledJpeg::decode`] and the conversion to `spec`'s channels (the
    /// resized result is the caller's to add).
    fn decode_bytes(&self, spec: &InputSpec) -> u64 {
        let decoded = self.pixels() * self.format.pixel_bytes() as u64;
        // CMYK becomes RGB in place; a copy is made only where the channel count changes.
        let decoded_channels = match self.format {
            PixelFormat::L8 | PixelFormat::L16 => 1,
            PixelFormat::RGB24 | PixelFormat::CMYK32 => 3,
        };
        let converted = if decoded_channels == spec.channels {
            0
        } else {
            self.pixels() * spec.channels as u64
        };
        self.planes
            .saturating_add(decoded)
            .saturating_add(converted)
    }

    /// Decodes at the scaled size into luma or RGB (CMYK converted as `image`'s JPEG decoder
    /// does).
    fn decode(mut self, header: &Header) -> Result<DynamicImage, PreprocessError> {
        let expected = self.pixels() as usize * self.format.pixel_bytes();
        self.decoder.set_max_decoding_buffer_size(expected);
        // A hostile file that trips a panic in the decoder (or in one of the threads it starts
        // for a large image) is refused, not fatal to a caller that decodes inline.
        let decoded =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.decoder.decode()))
                .map_err(|_| PreprocessError::Decode("the JPEG decoder failed".into()))?
                .map_err(|e| PreprocessError::Decode(e.to_string()))?;
        if decoded.len() != expected {
            return Err(PreprocessError::Decode(format!(
                "the {}x{} JPEG decoded scaled to {} bytes, not the {expected} its header promised",
                header.width,
                header.height,
                decoded.len()
            )));
        }
        let (width, height) = (self.width, self.height);
        let image = match self.format {
            PixelFormat::L8 => GrayImage::from_raw(width, height, decoded).map(DynamicImage::from),
            PixelFormat::RGB24 => {
                RgbImage::from_raw(width, height, decoded).map(DynamicImage::from)
            }
            PixelFormat::CMYK32 => {
                RgbImage::from_raw(width, height, cmyk_to_rgb(decoded)).map(DynamicImage::from)
            }
            PixelFormat::L16 => None,
        };
        image.ok_or_else(|| PreprocessError::Decode("the scaled JPEG has no pixels".into()))
    }
}

/// A JPEG's bytes followed by end-of-image markers, as libjpeg reads a file that ends early:
/// `jpeg-decoder` refuses a JPEG whose scan or EOI is cut off, where `image`'s decoder (and so
/// the full-size route) decodes what is there and leaves the rest flat. With a marker waiting,
/// `jpeg-decoder` too fills the missing blocks with zero coefficients and stops. At most
/// 128 KiB of markers follow (more than any one segment's length), so no parse reads forever.
struct EndsInEoi<'a> {
    bytes: &'a [u8],
    tail: usize,
}

impl<'a> EndsInEoi<'a> {
    const TAIL: usize = 1 << 17;

    fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, tail: 0 }
    }
}

impl std::io::Read for EndsInEoi<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if !self.bytes.is_empty() {
            return self.bytes.read(buf);
        }
        let n = buf.len().min(Self::TAIL - self.tail);
        for (i, b) in buf[..n].iter_mut().enumerate() {
            *b = if (self.tail + i).is_multiple_of(2) {
                0xFF
            } else {
                0xD9
            };
        }
        self.tail += n;
        Ok(n)
    }
}

/// `jpeg-decoder`'s CMYK (which has undone Adobe's inversion) to RGB in place, with the formula
/// of `image`'s decoder (zune-jpeg's, for CMYK and YCCK alike), so both routes agree.
fn cmyk_to_rgb(mut cmyk: Vec<u8>) -> Vec<u8> {
    fn blinn(value: u8, k: u8) -> u8 {
        let t = i32::from(value) * i32::from(k) + 128;
        ((t + (t >> 8)) >> 8) as u8
    }
    let pixels = cmyk.len() / 4;
    for i in 0..pixels {
        let k = 255 - cmyk[i * 4 + 3];
        for c in 0..3 {
            cmyk[i * 3 + c] = blinn(255 - cmyk[i * 4 + c], k);
        }
    }
    cmyk.truncate(pixels * 3);
    cmyk
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

#[cfg(test)]
mod tests {
    use super::*;
    use image::codecs::jpeg::JpegEncoder;
    use image::{GenericImageView, ImageEncoder};

    fn spec(channels: usize) -> InputSpec {
        InputSpec {
            channels,
            height: 28,
            width: 28,
            mean: vec![0.5; channels],
            std: vec![0.25; channels],
        }
    }

    /// A gradient with stripes and blobs at a few scales: smooth enough to survive JPEG, busy
    /// enough that a wrong scale, offset or channel order shows.
    fn pattern(width: u32, height: u32, channels: usize) -> DynamicImage {
        let value = |x: u32, y: u32, c: u32| {
            let (fx, fy) = (x as f32 / width as f32, y as f32 / height as f32);
            let stripes = ((x as f32 / (37. + 11. * c as f32)).sin() * 0.5 + 0.5) * 90.;
            let blobs = ((fx * 7. + c as f32).cos() * (fy * 5.).sin() * 0.5 + 0.5) * 80.;
            let gradient = (fx * 0.6 + fy * 0.4) * 85.;
            (stripes + blobs + gradient).min(255.) as u8
        };
        match channels {
            1 => GrayImage::from_fn(width, height, |x, y| image::Luma([value(x, y, 0)])).into(),
            _ => RgbImage::from_fn(width, height, |x, y| {
                image::Rgb([value(x, y, 0), value(x, y, 1), value(x, y, 2)])
            })
            .into(),
        }
    }

    fn jpeg(image: &DynamicImage) -> Vec<u8> {
        let mut out = Vec::new();
        JpegEncoder::new_with_quality(&mut out, 95)
            .write_image(
                image.as_bytes(),
                image.width(),
                image.height(),
                image.color().into(),
            )
            .unwrap();
        out
    }

    fn png(image: &DynamicImage) -> Vec<u8> {
        let mut out = Vec::new();
        image
            .write_to(&mut Cursor::new(&mut out), ImageFormat::Png)
            .unwrap();
        out
    }

    /// The route every image took before JPEGs were decoded scaled: full-size decode, then the
    /// same conversion, resize and normalisation.
    fn full_decode(bytes: &[u8], spec: &InputSpec) -> Vec<f32> {
        let image = image::load_from_memory(bytes).unwrap();
        let (pixels, pixel_type) = match spec.channels {
            1 => (DynamicImage::ImageLuma8(image.to_luma8()), PixelType::U8),
            _ => (DynamicImage::ImageRgb8(image.to_rgb8()), PixelType::U8x3),
        };
        normalise(&resize(&pixels, pixel_type, spec).unwrap(), spec)
    }

    fn mean_abs_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter().zip(b).map(|(a, b)| (a - b).abs()).sum::<f32>() / a.len() as f32
    }

    fn scaled_size(bytes: &[u8], spec: &InputSpec) -> Option<(u32, u32)> {
        let (width, height) = image::load_from_memory(bytes).unwrap().dimensions();
        scaled_jpeg(bytes, ImageFormat::Jpeg, width, height, spec).map(|s| (s.width, s.height))
    }

    /// Mean absolute difference allowed from the full-size route, in normalised units (here
    /// 1 / (255 * 0.25) per grey level, so 0.03 is about 2 levels). Measured on these images:
    /// 0.004-0.006 gray, 0.004-0.010 RGB, 0.002-0.005 CMYK and YCCK; no single value off by
    /// more than 0.032 (2 levels).
    const TOLERANCE: f32 = 0.03;

    #[test]
    fn a_large_jpeg_decoded_scaled_matches_the_full_decode() {
        let limits = ImageLimits::default();
        for image_channels in [1, 3] {
            let bytes = jpeg(&pattern(2000, 1500, image_channels));
            for channels in [1, 3] {
                let spec = spec(channels);
                assert_eq!(scaled_size(&bytes, &spec), Some((250, 188)));
                let scaled = preprocess(&bytes, &spec, &limits).unwrap();
                let diff = mean_abs_diff(&scaled, &full_decode(&bytes, &spec));
                eprintln!("{image_channels} -> {channels} channels: mean |diff| {diff}");
                assert!(diff < TOLERANCE, "{image_channels} -> {channels}: {diff}");
            }
        }
    }

    #[test]
    fn a_large_jpeg_reserves_a_sixteenth_of_the_same_png() {
        let limits = ImageLimits::default();
        for image_channels in [1, 3] {
            let image = pattern(2000, 1500, image_channels);
            for channels in [1, 3] {
                let spec = spec(channels);
                let jpeg = read_header(&jpeg(&image), &spec, &limits).unwrap();
                let png = read_header(&png(&image), &spec, &limits).unwrap();
                assert_eq!((jpeg.width, jpeg.height), (png.width, png.height));
                assert!(
                    jpeg.decode_bytes * 16 <= png.decode_bytes,
                    "{image_channels} -> {channels}: JPEG {} bytes, PNG {} bytes",
                    jpeg.decode_bytes,
                    png.decode_bytes
                );
            }
        }
    }

    #[test]
    fn a_small_jpeg_takes_the_full_size_route_unchanged() {
        let limits = ImageLimits::default();
        for image_channels in [1, 3] {
            // Under twice the input in width: halving would go below 28.
            let bytes = jpeg(&pattern(54, 90, image_channels));
            for channels in [1, 3] {
                let spec = spec(channels);
                assert_eq!(scaled_size(&bytes, &spec), None);
                let header = read_header(&bytes, &spec, &limits).unwrap();
                let image = image::load_from_memory(&bytes).unwrap();
                let full = image.as_bytes().len() + 54 * 90 * channels + 28 * 28 * channels;
                assert_eq!(header.decode_bytes, full as u64);
                let got = preprocess(&bytes, &spec, &limits).unwrap();
                assert_eq!(got, full_decode(&bytes, &spec));
            }
        }
    }

    #[test]
    fn the_scale_keeps_both_dimensions_at_least_the_inputs() {
        let spec = spec(1);
        // 1/8 would make the height 8: only halving keeps it at least 28.
        let bytes = jpeg(&pattern(2000, 60, 1));
        assert_eq!(scaled_size(&bytes, &spec), Some((1000, 30)));
        let got = preprocess(&bytes, &spec, &ImageLimits::default()).unwrap();
        assert!(mean_abs_diff(&got, &full_decode(&bytes, &spec)) < TOLERANCE);
        // Exactly 8 times the input: 1/8 gives the input's size, which needs no resize.
        let bytes = jpeg(&pattern(224, 232, 1));
        assert_eq!(scaled_size(&bytes, &spec), Some((28, 29)));
        let bytes = jpeg(&pattern(224, 224, 1));
        assert_eq!(scaled_size(&bytes, &spec), Some((28, 28)));
        let got = preprocess(&bytes, &spec, &ImageLimits::default()).unwrap();
        assert!(mean_abs_diff(&got, &full_decode(&bytes, &spec)) < TOLERANCE);
    }

    #[test]
    fn decode_header_decodes_within_what_read_header_reserved() {
        // 20 megapixels of gray: decoded at full size, 20 MB, past what the decoder may
        // allocate for this header (twice its decode bytes, at least 16 MiB).
        let image = GrayImage::from_fn(5000, 4000, |x, y| image::Luma([((x / 7) ^ (y / 5)) as u8]));
        let bytes = jpeg(&image.into());
        let spec = spec(1);
        let header = read_header(&bytes, &spec, &ImageLimits::default()).unwrap();
        assert!(header.decode_bytes < 2 << 20, "{}", header.decode_bytes);
        decode_header(&bytes, &header, &spec).unwrap();
        let full = Header {
            decode_bytes: u64::from(header.width) * u64::from(header.height),
            ..header
        };
        assert!(decode(&bytes, &header).is_err());
        decode(&bytes, &full).unwrap();
    }

    /// Segments (marker, payload) of a baseline JPEG up to its scan, and the scan's entropy-coded
    /// data.
    fn split_jpeg(bytes: &[u8]) -> (Vec<(u8, Vec<u8>)>, Vec<u8>) {
        let mut segments = Vec::new();
        let mut at = 2;
        loop {
            assert_eq!(bytes[at], 0xFF);
            let marker = bytes[at + 1];
            let len = usize::from(u16::from_be_bytes([bytes[at + 2], bytes[at + 3]]));
            let payload = bytes[at + 4..at + 2 + len].to_vec();
            at += 2 + len;
            if marker == 0xDA {
                assert_eq!(&bytes[bytes.len() - 2..], [0xFF, 0xD9]);
                return (segments, bytes[at..bytes.len() - 2].to_vec());
            }
            segments.push((marker, payload));
        }
    }

    fn segment(out: &mut Vec<u8>, marker: u8, payload: &[u8]) {
        out.extend([0xFF, marker]);
        out.extend(u16::try_from(payload.len() + 2).unwrap().to_be_bytes());
        out.extend(payload);
    }

    /// A 4-component Adobe JPEG (`transform` 0: CMYK, 2: YCCK) built from four grayscale JPEGs
    /// of one size and quality, one non-interleaved scan per component.
    fn four_component_jpeg(planes: [&DynamicImage; 4], transform: u8) -> Vec<u8> {
        let (width, height) = planes[0].dimensions();
        let mut out = vec![0xFF, 0xD8];
        let mut adobe = b"Adobe".to_vec();
        adobe.extend([0, 100, 0, 0, 0, 0, transform]);
        segment(&mut out, 0xEE, &adobe);
        let (tables, _) = split_jpeg(&jpeg(planes[0]));
        for (marker, payload) in &tables {
            if matches!(marker, 0xDB | 0xC4) {
                segment(&mut out, *marker, payload);
            }
        }
        let mut sof = vec![8];
        sof.extend((height as u16).to_be_bytes());
        sof.extend((width as u16).to_be_bytes());
        sof.push(4);
        for id in 1..=4 {
            sof.extend([id, 0x11, 0]);
        }
        segment(&mut out, 0xC0, &sof);
        for (id, plane) in (1..=4).zip(planes) {
            let (plane_tables, scan) = split_jpeg(&jpeg(plane));
            assert!(plane_tables
                .iter()
                .filter(|(m, _)| matches!(m, 0xDB | 0xC4))
                .eq(tables.iter().filter(|(m, _)| matches!(m, 0xDB | 0xC4))));
            segment(&mut out, 0xDA, &[1, id, 0x00, 0, 63, 0]);
            out.extend(scan);
        }
        out.extend([0xFF, 0xD9]);
        out
    }

    #[test]
    fn a_large_cmyk_or_ycck_jpeg_decoded_scaled_matches_the_full_decode() {
        let limits = ImageLimits::default();
        let rgb = pattern(1600, 1200, 3).to_rgb8();
        let plane = |c: usize| {
            DynamicImage::from(GrayImage::from_fn(1600, 1200, |x, y| {
                let p = rgb.get_pixel(x, y).0;
                image::Luma([if c < 3 { p[c] } else { p[0] / 3 + p[2] / 4 }])
            }))
        };
        let planes = [plane(0), plane(1), plane(2), plane(3)];
        for transform in [0, 2] {
            let bytes =
                four_component_jpeg([&planes[0], &planes[1], &planes[2], &planes[3]], transform);
            for channels in [1, 3] {
                let spec = spec(channels);
                assert_eq!(scaled_size(&bytes, &spec), Some((200, 150)));
                let header = read_header(&bytes, &spec, &limits).unwrap();
                // 4 bytes a pixel decoded, converted in place.
                assert!(header.decode_bytes < 1_000_000, "{}", header.decode_bytes);
                let scaled = preprocess(&bytes, &spec, &limits).unwrap();
                let diff = mean_abs_diff(&scaled, &full_decode(&bytes, &spec));
                eprintln!("transform {transform} -> {channels} channels: mean |diff| {diff}");
                assert!(
                    diff < TOLERANCE,
                    "transform {transform} -> {channels}: {diff}"
                );
            }
        }
    }

    #[test]
    fn limits_are_still_checked_on_the_full_size() {
        let bytes = jpeg(&pattern(2000, 1500, 1));
        let spec = spec(1);
        let limits = ImageLimits {
            max_pixels: 2000 * 1500 - 1,
            ..ImageLimits::default()
        };
        assert_eq!(
            read_header(&bytes, &spec, &limits),
            Err(PreprocessError::TooManyPixels {
                width: 2000,
                height: 1500,
                limit: 2000 * 1500 - 1
            })
        );
        let limits = ImageLimits {
            max_encoded_bytes: bytes.len() - 1,
            ..ImageLimits::default()
        };
        assert!(matches!(
            read_header(&bytes, &spec, &limits),
            Err(PreprocessError::TooLarge { .. })
        ));
        let need = read_header(&bytes, &spec, &ImageLimits::default())
            .unwrap()
            .decode_bytes;
        let limits = ImageLimits {
            decode_budget_bytes: need - 1,
            ..ImageLimits::default()
        };
        assert_eq!(
            read_header(&bytes, &spec, &limits),
            Err(PreprocessError::OverBudget {
                need,
                budget: need - 1
            })
        );
    }

    #[test]
    fn a_large_jpeg_cut_short_is_decoded_as_the_full_size_route_decodes_it() {
        let bytes = jpeg(&pattern(2000, 1500, 3));
        let spec = spec(3);
        let limits = ImageLimits::default();
        // No EOI; no EOI and the scan's last bytes.
        for len in [bytes.len() - 2, bytes.len() - 100] {
            let cut = &bytes[..len];
            assert_eq!(scaled_size(cut, &spec), Some((250, 188)));
            let got = preprocess(cut, &spec, &limits).unwrap();
            let diff = mean_abs_diff(&got, &full_decode(cut, &spec));
            assert!(diff < TOLERANCE, "cut to {len} bytes: {diff}");
        }
        // Half the scan: what is there matches; the missing rest is left flat by both routes,
        // but in the last decoded block's colour here and mid-grey in `image`'s decoder.
        let cut = &bytes[..bytes.len() / 2];
        let got = preprocess(cut, &spec, &limits).unwrap();
        let old = full_decode(cut, &spec);
        let top = |v: &[f32]| -> Vec<f32> {
            v.chunks(28 * 28)
                .flat_map(|plane| plane[..12 * 28].to_vec())
                .collect()
        };
        let diff = mean_abs_diff(&top(&got), &top(&old));
        assert!(diff < TOLERANCE, "half the scan, top rows: {diff}");
        // Cut inside the tables, before any scan: refused.
        let cut = &bytes[..300];
        if let Ok(header) = read_header(cut, &spec, &limits) {
            assert!(decode_header(cut, &header, &spec).is_err());
        }
    }
}
