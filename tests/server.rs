//! The real server on ephemeral ports, called with the generated gRPC client.

mod common;

use std::io::Cursor;
use std::time::Duration;

use image::{DynamicImage, ImageBuffer, ImageFormat, Luma, Rgb};
use tonic::Code;

use common::{random_model_dir, TestServer};
use octserve::config::{BatchingConfig, ServeConfig};
use octserve::pb::ClassifyRequest;

fn request(model: &str, image: Vec<u8>) -> ClassifyRequest {
    ClassifyRequest {
        model: model.into(),
        image,
        ..Default::default()
    }
}

fn encode(image: &DynamicImage, format: ImageFormat) -> Vec<u8> {
    let mut bytes = Vec::new();
    // The GIF encoder takes RGBA only.
    let image = match format {
        ImageFormat::Gif => DynamicImage::ImageRgba8(image.to_rgba8()),
        _ => image.clone(),
    };
    image
        .write_to(&mut Cursor::new(&mut bytes), format)
        .unwrap();
    bytes
}

fn gray(w: u32, h: u32) -> DynamicImage {
    DynamicImage::ImageLuma8(ImageBuffer::from_fn(w, h, |x, y| {
        Luma([((x * 7 + y * 3) % 256) as u8])
    }))
}

fn rgb(w: u32, h: u32) -> DynamicImage {
    DynamicImage::ImageRgb8(ImageBuffer::from_fn(w, h, |x, y| {
        Rgb([(x % 256) as u8, (y % 256) as u8, ((x + y) % 256) as u8])
    }))
}

/// A small, well-formed PNG whose header claims `w` x `h` pixels: IHDR, one short IDAT, IEND.
fn png_claiming(w: u32, h: u32) -> Vec<u8> {
    let mut ihdr = w.to_be_bytes().to_vec();
    ihdr.extend(h.to_be_bytes());
    ihdr.extend([8, 0, 0, 0, 0]); // 8-bit grayscale
                                  // A zlib stream with one stored block of 16 zero bytes.
    let mut idat = vec![0x78, 0x01, 0x01, 16, 0, !16, 0xff];
    idat.extend([0u8; 16]);
    idat.extend(0x0010_0001u32.to_be_bytes()); // Adler-32 of 16 zeros
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    for (kind, data) in [(&b"IHDR"[..], ihdr), (b"IDAT", idat), (b"IEND", Vec::new())] {
        let mut chunk = kind.to_vec();
        chunk.extend(&data);
        png.extend((data.len() as u32).to_be_bytes());
        png.extend(&chunk);
        png.extend(crc32fast::hash(&chunk).to_be_bytes());
    }
    png
}

async fn random_server(batching: Option<BatchingConfig>) -> (TestServer, tempfile::TempDir) {
    let variants = [
        ("vanilla", "resnet20", 0., 1.),
        ("octave", "oct-resnet20", 0.5, 1.),
    ];
    let dir = random_model_dir("toy", &variants, batching);
    (
        TestServer::start(ServeConfig::default(), dir.path()).await,
        dir,
    )
}

#[tokio::test]
async fn every_format_gray_and_rgb_of_odd_sizes_is_classified() {
    let (server, _dir) = random_server(None).await;
    let mut client = server.client();
    let formats = [
        ImageFormat::Png,
        ImageFormat::Jpeg,
        ImageFormat::WebP,
        ImageFormat::Gif,
        ImageFormat::Bmp,
        ImageFormat::Tiff,
    ];
    for format in formats {
        for image in [gray(28, 28), gray(33, 17), rgb(101, 57), rgb(7, 300)] {
            let bytes = encode(&image, format);
            let reply = client.classify(request("toy", bytes)).await;
            let reply = reply
                .unwrap_or_else(|s| panic!("{format:?} {}x{}: {s}", image.width(), image.height()))
                .into_inner();
            assert_eq!(reply.classes.len(), 5, "top_k 0 means 5");
            let scores: Vec<f32> = reply.classes.iter().map(|c| c.score).collect();
            assert!(
                scores.windows(2).all(|w| w[0] >= w[1]),
                "best first: {scores:?}"
            );
            assert!(scores.iter().sum::<f32>() <= 1.0001);
            let timing = reply.timing.unwrap();
            assert!(timing.batch_size >= 1 && timing.total_us >= timing.compute_us);
            assert!(["vanilla", "octave"].contains(&reply.variant.as_str()));
        }
    }
}

#[tokio::test]
async fn top_k_and_a_named_variant_are_honoured() {
    let (server, _dir) = random_server(None).await;
    let mut client = server.client();
    for (k, variant) in [
        (1, "octave"),
        (3, "vanilla"),
        (10, "octave"),
        (50, "vanilla"),
    ] {
        let mut req = request("toy", encode(&gray(28, 28), ImageFormat::Png));
        req.top_k = k;
        req.variant = variant.into();
        let reply = client.classify(req).await.unwrap().into_inner();
        assert_eq!(reply.classes.len(), (k as usize).min(10));
        assert_eq!(reply.variant, variant);
        let total: f32 = reply.classes.iter().map(|c| c.score).sum();
        if k >= 10 {
            assert!((total - 1.).abs() < 1e-4, "all classes sum to 1: {total}");
        }
    }
}

#[tokio::test]
async fn bad_images_are_invalid_argument_and_the_server_keeps_serving() {
    let (server, _dir) = random_server(None).await;
    let mut client = server.client();
    let png = encode(&gray(28, 28), ImageFormat::Png);
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "garbage",
            b"this is not an image at all".to_vec(),
            "not in a supported format",
        ),
        ("empty", Vec::new(), "empty"),
        (
            "truncated PNG",
            png[..png.len() / 2].to_vec(),
            "could not be decoded",
        ),
        (
            "decompression bomb",
            png_claiming(100_000, 100_000),
            "100000x100000",
        ),
    ];
    for (what, bytes, expected) in cases {
        let status = client.classify(request("toy", bytes)).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{what}: {status:?}");
        assert!(
            status.message().contains(expected),
            "{what}: {}",
            status.message()
        );
        let ok = client.classify(request("toy", png.clone())).await;
        assert!(ok.is_ok(), "after {what}: {ok:?}");
    }
}

#[tokio::test]
async fn unknown_model_or_variant_is_not_found() {
    let (server, _dir) = random_server(None).await;
    let mut client = server.client();
    let png = encode(&gray(28, 28), ImageFormat::Png);
    let status = client
        .classify(request("nope", png.clone()))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    // Callers find the served models with ListModels, which the API key guards like every
    // call: a typo does not list them.
    assert!(
        !status.message().contains("toy") && status.message().contains("ListModels"),
        "{}",
        status.message()
    );
    let mut req = request("toy", png);
    req.variant = "turbo".into();
    let status = client.classify(req).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert_eq!(status.message(), "model 'toy' has no variant 'turbo'");
}

#[tokio::test]
async fn list_models_reports_variants_and_their_costs() {
    let (server, _dir) = random_server(None).await;
    let models = server.models().await;
    assert_eq!(models.len(), 1);
    let toy = &models[0];
    assert_eq!(
        (toy.name.as_str(), toy.labels.len(), toy.input_height),
        ("toy", 10, 28)
    );
    let vanilla = toy.variants.iter().find(|v| v.name == "vanilla").unwrap();
    let octave = toy.variants.iter().find(|v| v.name == "octave").unwrap();
    assert!(vanilla.baseline && !octave.baseline);
    assert_eq!(octave.arch, "oct-resnet20");
    assert!(octave.macs < vanilla.macs);
    assert!(octave.activation_bytes < vanilla.activation_bytes);
    let saved = octave.stats.as_ref().unwrap().compute_savings_ratio;
    assert!((saved - (1. - octave.macs as f64 / vanilla.macs as f64)).abs() < 1e-9);
}

#[tokio::test]
async fn a_stream_gets_one_reply_per_image_in_order() {
    let (server, _dir) = random_server(None).await;
    let variants = ["vanilla", "octave", "octave", "vanilla", "octave"];
    let requests: Vec<ClassifyRequest> = variants
        .iter()
        .map(|v| ClassifyRequest {
            variant: v.to_string(),
            ..request("toy", encode(&gray(28, 28), ImageFormat::Png))
        })
        .collect();
    let mut replies = server
        .client()
        .classify_stream(futures::stream::iter(requests))
        .await
        .unwrap()
        .into_inner();
    let mut answered = Vec::new();
    while let Some(reply) = replies.message().await.unwrap() {
        answered.push(reply.variant);
    }
    assert_eq!(answered, variants);
}

#[tokio::test]
async fn health_is_serving_per_service_once_loaded() {
    let (server, _dir) = random_server(None).await;
    use tonic_health::pb::health_check_response::ServingStatus;
    assert_eq!(
        server.health("octserve.v1.Classifier").await,
        ServingStatus::Serving
    );
}

#[tokio::test]
async fn shutdown_answers_every_accepted_request_and_refuses_new_ones() {
    // A long queue delay keeps the requests waiting in the batcher when shutdown starts.
    let batching = BatchingConfig {
        max_batch_size: 64,
        max_queue_delay_us: 400_000,
        ..BatchingConfig::default()
    };
    let (mut server, _dir) = random_server(Some(batching)).await;
    let png = encode(&gray(28, 28), ImageFormat::Png);
    let in_flight: Vec<_> = (0..8)
        .map(|_| {
            let mut client = server.client();
            let req = ClassifyRequest {
                variant: "vanilla".into(),
                ..request("toy", png.clone())
            };
            tokio::spawn(async move { client.classify(req).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    server.shutdown();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let late = server
        .client()
        .classify(request("toy", png.clone()))
        .await
        .unwrap_err();
    assert_eq!(late.code(), Code::Unavailable, "{late:?}");
    for task in in_flight {
        let reply = task.await.unwrap();
        assert!(reply.is_ok(), "{reply:?}");
    }
    let stopped = tokio::time::timeout(Duration::from_secs(10), &mut server.handle).await;
    assert!(matches!(stopped, Ok(Ok(Ok(())))), "{stopped:?}");
}
