//! The Fashion-MNIST test set in its idx format (`.gz` or plain), as Debian's
//! `dataset-fashion-mnist` installs it under `/usr/share/datasets/fashion-mnist/`.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{ensure, Context};

/// Grayscale images with their labels.
pub struct LabelledImages {
    pub height: usize,
    pub width: usize,
    /// `count * height * width` bytes, row-major.
    pub pixels: Vec<u8>,
    pub labels: Vec<u8>,
}

impl LabelledImages {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    pub fn image(&self, i: usize) -> &[u8] {
        let size = self.height * self.width;
        &self.pixels[i * size..(i + 1) * size]
    }
}

/// Loads `t10k-images-idx3-ubyte[.gz]` and `t10k-labels-idx1-ubyte[.gz]` from `dir`.
pub fn load_test_set(dir: &Path) -> anyhow::Result<LabelledImages> {
    let images = read_idx(&find(dir, "t10k-images-idx3-ubyte")?)?;
    let labels = read_idx(&find(dir, "t10k-labels-idx1-ubyte")?)?;
    ensure!(
        images.dims.len() == 3,
        "image file has dims {:?}",
        images.dims
    );
    ensure!(
        labels.dims == [images.dims[0]],
        "{} labels for {} images",
        labels.dims.first().unwrap_or(&0),
        images.dims[0]
    );
    Ok(LabelledImages {
        height: images.dims[1],
        width: images.dims[2],
        pixels: images.data,
        labels: labels.data,
    })
}

fn find(dir: &Path, stem: &str) -> anyhow::Result<PathBuf> {
    [format!("{stem}.gz"), stem.to_string()]
        .iter()
        .map(|name| dir.join(name))
        .find(|p| p.is_file())
        .with_context(|| format!("no {stem}[.gz] in {}", dir.display()))
}

struct Idx {
    dims: Vec<usize>,
    data: Vec<u8>,
}

/// An idx file of unsigned bytes: magic `0 0 8 ndim`, big-endian u32 dims, then the data.
fn read_idx(path: &Path) -> anyhow::Result<Idx> {
    let raw = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let bytes = if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(raw.as_slice())
            .read_to_end(&mut out)
            .with_context(|| format!("decompressing {}", path.display()))?;
        out
    } else {
        raw
    };
    ensure!(
        bytes.len() >= 4 && bytes[..3] == [0, 0, 8],
        "{} is not an idx file of unsigned bytes",
        path.display()
    );
    let ndim = bytes[3] as usize;
    let header = 4 + 4 * ndim;
    ensure!(bytes.len() >= header, "{} is truncated", path.display());
    let dims: Vec<usize> = bytes[4..header]
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]) as usize)
        .collect();
    let data = bytes[header..].to_vec();
    ensure!(
        data.len() == dims.iter().product::<usize>(),
        "{}: {} data bytes for dims {dims:?}",
        path.display(),
        data.len()
    );
    Ok(Idx { dims, data })
}
