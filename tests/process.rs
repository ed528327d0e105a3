//! The `octserve serve` process as an operator runs it: SIGTERM ends it within the grace period
//! whatever its clients hold open, SIGHUP never kills it (not even while it loads), SIGTERM
//! while it loads is a clean exit, decompression bombs sent side by side leave its peak memory
//! bounded, and at the file-descriptor limit it backs off and warns instead of spinning.
//!
//! These run the built binary rather than `octserve::server::run` inside the test process:
//! signal dispositions, peak RSS and the file-descriptor limit belong to a whole process. The
//! tests take turns, one server at a time, so that the times, CPU and memory they measure are
//! the server's own and not another test's on the same cores.

#![cfg(all(target_os = "linux", target_env = "gnu"))]

use std::future::Future;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use flate2::write::ZlibEncoder;
use flate2::Compression;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Code, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use octserve::pb::classifier_client::ClassifierClient;
use octserve::pb::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use octserve::pb::inference::model_infer_request::InferInputTensor;
use octserve::pb::inference::ModelInferRequest;
use octserve::pb::ClassifyRequest;

const MODEL: &str = "fashion-mnist";
/// Longest wait for a server to load its models and report SERVING.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest any one test runs, its server's start included.
const TEST_TIMEOUT: Duration = Duration::from_secs(240);
/// What an HTTP/2 client sends first.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

#[test]
fn sigterm_ends_the_process_within_the_grace_period_whatever_clients_hold() {
    serial(async {
        let grace = Duration::from_secs(1);
        let mut server = Server::spawn(&["--grace-period", "1"]);
        server.wait_serving().await;

        let silent = RawClient::open(server.grpc, b"");
        let preface_only = RawClient::open(server.grpc, PREFACE);

        let mut watch = HealthClient::new(server.channel().await)
            .watch(HealthCheckRequest::default())
            .await
            .unwrap()
            .into_inner();
        let first = watch
            .message()
            .await
            .unwrap()
            .expect("a first health status");
        assert_eq!(first.status, ServingStatus::Serving as i32);

        // The request stream stays open: the client never says it is done.
        let (requests, receiver) = mpsc::channel(4);
        requests.send(classify_request(small_png())).await.unwrap();
        let mut replies = classifier(server.channel().await)
            .classify_stream(ReceiverStream::new(receiver))
            .await
            .unwrap()
            .into_inner();
        let reply = replies.message().await.unwrap().expect("a first reply");
        assert!(
            reply.status.is_none() && !reply.classes.is_empty(),
            "{reply:?}"
        );

        server.signal(libc::SIGTERM);
        let sent = Instant::now();
        let watched = tokio::spawn(async move {
            let mut statuses = Vec::new();
            let end = loop {
                match watch.message().await {
                    Ok(Some(message)) => statuses.push(message.status),
                    Ok(None) => break None,
                    Err(status) => break Some(status.code()),
                }
            };
            (statuses, end, sent.elapsed())
        });
        let streamed = tokio::spawn(async move {
            let mut extra_replies = 0;
            let end = loop {
                match replies.message().await {
                    Ok(Some(_)) => extra_replies += 1,
                    Ok(None) => break None,
                    Err(status) => break Some(status),
                }
            };
            drop(requests);
            (extra_replies, end, sent.elapsed())
        });

        let (status, exit) = server
            .wait_exit(grace + Duration::from_secs(4))
            .await
            .unwrap_or_else(|| panic!("still running {:?} after SIGTERM", sent.elapsed()));
        eprintln!("SIGTERM to exit: {exit:?}");
        assert!(status.success(), "{status}; stderr:\n{}", server.stderr());

        let bound = Duration::from_secs(5);
        let (statuses, watch_end, watch_time) = tokio::time::timeout(bound, watched)
            .await
            .expect("the health watch outlived the process")
            .unwrap();
        eprintln!("health watch: saw {statuses:?}, then {watch_end:?} after {watch_time:?}");
        assert!(
            statuses.contains(&(ServingStatus::NotServing as i32)),
            "the watch never saw NOT_SERVING: {statuses:?}, then {watch_end:?}"
        );
        let (extra_replies, stream_end, stream_time) = tokio::time::timeout(bound, streamed)
            .await
            .expect("the ClassifyStream outlived the process")
            .unwrap();
        eprintln!("ClassifyStream: {extra_replies} more replies, then {stream_end:?} after {stream_time:?}");
        assert_eq!(extra_replies, 0);
        let stream_end = stream_end.expect("the ClassifyStream ended without a status");
        assert_eq!(stream_end.code(), Code::Unavailable, "{stream_end:?}");

        for (name, client) in [("silent", silent), ("preface only", preface_only)] {
            let closed = client.closed_after(sent);
            eprintln!("{name} connection closed after {closed:?}");
            assert!(closed <= exit, "{name}: closed {closed:?}, exit {exit:?}");
        }
    });
}

#[test]
fn an_early_sighup_does_not_kill_the_server() {
    serial(async {
        let mut server = Server::spawn(&[]);
        // Hangups from the moment it listens (its models load after that) until it serves.
        server.wait_log("listening").await;
        let mut while_loading = 0;
        while !server.is_serving().await {
            assert!(server.started.elapsed() < READY_TIMEOUT, "never served");
            server.signal(libc::SIGHUP);
            while_loading += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
            server.assert_running("after a SIGHUP while loading");
        }
        eprintln!(
            "{while_loading} SIGHUPs while loading, serving after {:?}",
            server.started.elapsed()
        );
        assert!(
            while_loading > 0,
            "the models loaded before the first SIGHUP"
        );

        server.signal(libc::SIGHUP);
        let reloaded = wait_for(Duration::from_secs(5), || {
            server.stderr().contains("repository re-read")
        })
        .await;
        assert!(
            reloaded,
            "no reload after SIGHUP; stderr:\n{}",
            server.stderr()
        );
        server.assert_running("after a SIGHUP while serving");
        let reply = classifier(server.channel().await)
            .classify(classify_request(small_png()))
            .await
            .unwrap()
            .into_inner();
        assert!(!reply.classes.is_empty(), "{reply:?}");
    });
}

#[test]
fn sigterm_while_loading_exits_cleanly() {
    serial(async {
        let mut server = Server::spawn(&[]);
        // As soon as SIGTERM is the server's to handle: the models load for longer than that.
        let handled = wait_for(Duration::from_secs(10), || server.catches(libc::SIGTERM)).await;
        assert!(
            handled,
            "SIGTERM never handled; stderr:\n{}",
            server.stderr()
        );
        let sent_at = server.started.elapsed();
        server.signal(libc::SIGTERM);
        let (status, exit) = server
            .wait_exit(Duration::from_secs(5))
            .await
            .expect("still running 5 s after SIGTERM");
        let stderr = server.stderr();
        eprintln!("SIGTERM {sent_at:?} after the start, exit {exit:?} later: {status}");
        assert!(status.success(), "{status}; stderr:\n{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(
            !stderr.contains("models loaded; serving"),
            "the models had loaded before SIGTERM: this tested nothing"
        );
    });
}

#[test]
fn decode_memory_stays_bounded_under_concurrent_bombs() {
    serial(async {
        const LIMIT_MIB: u64 = 640;
        // 36 MP of 8-bit gray and 40 MP of 16-bit RGBA, all black: tens to hundreds of KB
        // encoded, 36 MB and 320 MB decoded.
        let gray = zero_png(6000, 6000, 8, GRAY, 1);
        let rgba16 = zero_png(8000, 5000, 16, RGBA, 8);
        eprintln!(
            "bombs: {} KB gray, {} KB RGBA16",
            gray.len() >> 10,
            rgba16.len() >> 10
        );
        assert!(gray.len() < 100 << 10 && rgba16.len() < 1 << 20);

        let mut server = Server::spawn(&[]);
        server.wait_serving().await;
        eprintln!("peak RSS once serving: {} MiB", server.peak_rss_kib() >> 10);

        let channel = server.channel().await;
        let mut calls = tokio::task::JoinSet::new();
        // BOMBS_GRAY=64 gives the figure in BENCHMARKS.md; CI runs the default.
        let gray_bombs = env_count("BOMBS_GRAY", 24);
        for _ in 0..gray_bombs {
            let mut client = classifier(channel.clone());
            let request = classify_request(gray.clone());
            calls.spawn(async move { ("gray", client.classify(request).await.map(drop)) });
        }
        for _ in 0..4 {
            let mut client = GrpcInferenceServiceClient::new(channel.clone());
            let request = image_infer_request(&[&rgba16, &rgba16]);
            calls.spawn(async move { ("rgba16", client.model_infer(request).await.map(drop)) });
        }
        let answers = tokio::time::timeout(Duration::from_secs(120), calls.join_all())
            .await
            .expect("the bombs took over 120 s to answer");

        let mut gray_ok = 0;
        for (kind, answer) in &answers {
            let code = answer.as_ref().err().map_or(Code::Ok, Status::code);
            assert!(
                matches!(
                    code,
                    Code::Ok | Code::ResourceExhausted | Code::InvalidArgument
                ),
                "{kind}: {answer:?}"
            );
            gray_ok += usize::from(*kind == "gray" && code == Code::Ok);
        }
        eprintln!("answers: {:?}", codes(&answers));
        assert!(gray_ok > 0, "no gray bomb was classified: {answers:?}");

        let peak_mib = server.peak_rss_kib() >> 10;
        eprintln!("peak RSS after the bombs: {peak_mib} MiB (limit {LIMIT_MIB} MiB)");
        assert!(peak_mib < LIMIT_MIB, "peak RSS {peak_mib} MiB");
        server.assert_running("after the bombs");
    });
}

#[test]
fn accept_backs_off_and_warns_at_the_file_descriptor_limit() {
    serial(async {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("serve.toml");
        let manifest = models_dir().join(MODEL).join("manifest.toml");
        std::fs::write(
            &config,
            format!(
                "models = ['{}']\n\n[connections]\nmax_connections = 100000\n",
                manifest.display()
            ),
        )
        .unwrap();
        let mut server = Server::spawn_with_fd_limit(96, &["--config", config.to_str().unwrap()]);
        server.wait_serving().await;

        let connections: Vec<TcpStream> = (0..150)
            .map(|_| TcpStream::connect(server.grpc).unwrap())
            .collect();
        tokio::time::sleep(Duration::from_secs(2)).await;
        let window = Duration::from_secs(2);
        let before = server.cpu_seconds();
        tokio::time::sleep(window).await;
        let cpu = server.cpu_seconds() - before;
        eprintln!("CPU over {window:?} with the fd limit reached: {cpu:.2} s");
        server.assert_running("at the fd limit");
        assert!(cpu < 0.5, "the server used {cpu:.2} s of CPU in {window:?}");
        let stderr = server.stderr();
        assert!(
            stderr.contains("accepting a connection failed"),
            "no warning; stderr:\n{stderr}"
        );

        drop(connections);
        let serves_again = Instant::now();
        loop {
            let attempt = async {
                classifier(server.channel().await)
                    .classify(classify_request(small_png()))
                    .await
            };
            match tokio::time::timeout(Duration::from_secs(2), attempt).await {
                Ok(Ok(_)) => break,
                outcome if serves_again.elapsed() > Duration::from_secs(10) => {
                    panic!("no Classify 10 s after the connections closed: {outcome:?}")
                }
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        eprintln!(
            "serving again {:?} after the connections closed",
            serves_again.elapsed()
        );
    });
}

/// A running `octserve serve` on free local ports, its stderr in a file; killed when dropped.
struct Server {
    child: Child,
    grpc: SocketAddr,
    started: Instant,
    stderr: PathBuf,
    _dir: tempfile::TempDir,
}

impl Server {
    /// `serve` on the shipped models with `args` added.
    fn spawn(args: &[&str]) -> Self {
        Self::start(Command::new(env!("CARGO_BIN_EXE_octserve")), args)
    }

    /// The same, under `ulimit -n limit`.
    fn spawn_with_fd_limit(limit: u32, args: &[&str]) -> Self {
        let mut command = Command::new("sh");
        command.args([
            "-c",
            &format!("ulimit -n {limit} && exec \"$@\""),
            "sh",
            env!("CARGO_BIN_EXE_octserve"),
        ]);
        Self::start(command, args)
    }

    fn start(mut command: Command, args: &[&str]) -> Self {
        let grpc = free_port();
        let metrics = free_port();
        let dir = tempfile::tempdir().unwrap();
        let stderr = dir.path().join("stderr.log");
        let child = command
            .arg("serve")
            .arg("--models-dir")
            .arg(models_dir())
            .args(["--grpc-addr", &grpc.to_string()])
            .args(["--metrics-addr", &metrics.to_string()])
            .args(["--http-addr", &free_port().to_string()])
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        Self {
            child,
            grpc,
            started: Instant::now(),
            stderr,
            _dir: dir,
        }
    }

    fn pid(&self) -> libc::pid_t {
        self.child.id() as libc::pid_t
    }

    fn signal(&self, signal: libc::c_int) {
        // SAFETY: sends a signal to our own child, which has not been reaped (`Drop` reaps it).
        assert_eq!(unsafe { libc::kill(self.pid(), signal) }, 0);
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Waits (at most 10 s) until the server has logged `line`.
    async fn wait_log(&mut self, line: &str) {
        let logged = wait_for(Duration::from_secs(10), || self.stderr().contains(line)).await;
        self.assert_running("at its start");
        assert!(logged, "no {line:?} in 10 s; stderr:\n{}", self.stderr());
    }

    /// Whether the process has a handler of its own for `signal` (`SigCgt`).
    fn catches(&self, signal: libc::c_int) -> bool {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let mask = status
            .lines()
            .find_map(|line| line.strip_prefix("SigCgt:"))
            .expect("SigCgt in /proc/<pid>/status");
        let mask = u64::from_str_radix(mask.trim(), 16).unwrap();
        mask & (1 << (signal - 1)) != 0
    }

    fn assert_running(&mut self, when: &str) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!(
                "the server exited {when}: {status}; stderr:\n{}",
                self.stderr()
            );
        }
    }

    /// A fresh connection to the gRPC port.
    async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.grpc))
            .unwrap()
            .connect_timeout(Duration::from_secs(2))
            .connect()
            .await
            .unwrap()
    }

    /// Whether the health check answers SERVING now.
    async fn is_serving(&self) -> bool {
        let check = async {
            let channel = Channel::from_shared(format!("http://{}", self.grpc))
                .ok()?
                .connect()
                .await
                .ok()?;
            let response = HealthClient::new(channel)
                .check(HealthCheckRequest::default())
                .await
                .ok()?;
            Some(response.into_inner().status == ServingStatus::Serving as i32)
        };
        let answer = tokio::time::timeout(Duration::from_secs(2), check).await;
        answer.ok().flatten().unwrap_or(false)
    }

    async fn wait_serving(&mut self) {
        while !self.is_serving().await {
            self.assert_running("while loading");
            assert!(
                self.started.elapsed() < READY_TIMEOUT,
                "not serving {READY_TIMEOUT:?} after its start; stderr:\n{}",
                self.stderr()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The exit status and how long from now it took, if the process exits within `bound`.
    async fn wait_exit(&mut self, bound: Duration) -> Option<(ExitStatus, Duration)> {
        let since = Instant::now();
        while since.elapsed() < bound {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some((status, since.elapsed()));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        None
    }

    /// The process's peak resident set (`VmHWM`), in KiB.
    fn peak_rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let line = status
            .lines()
            .find_map(|line| line.strip_prefix("VmHWM:"))
            .expect("VmHWM in /proc/<pid>/status");
        line.trim().trim_end_matches("kB").trim().parse().unwrap()
    }

    /// User plus system CPU time the process has used, in seconds.
    fn cpu_seconds(&self) -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap();
        // The fields after the command name, which is in parentheses: utime and stime are
        // the 14th and 15th of the whole line.
        let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
        let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
        // SAFETY: sysconf only reads a system setting.
        let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        ticks as f64 / per_second as f64
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A raw TCP client that sends `bytes`, then only reads, until the server closes the
/// connection (or 20 s pass).
struct RawClient(JoinHandle<Option<Instant>>);

impl RawClient {
    fn open(addr: SocketAddr, bytes: &[u8]) -> Self {
        let mut stream = TcpStream::connect(addr).unwrap();
        stream.write_all(bytes).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        Self(std::thread::spawn(move || {
            let mut buf = [0; 4096];
            loop {
                match stream.read(&mut buf) {
                    Ok(0) => return Some(Instant::now()),
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                        return Some(Instant::now())
                    }
                    Err(_) => return None,
                }
            }
        }))
    }

    /// How long after `since` the server closed the connection.
    fn closed_after(self, since: Instant) -> Duration {
        let closed = self.0.join().unwrap().expect("the connection stayed open");
        closed.saturating_duration_since(since)
    }
}

/// Runs `test` on a runtime of its own, one test at a time, within [`TEST_TIMEOUT`].
fn serial(test: impl Future<Output = ()>) {
    static SERIAL: Mutex<()> = Mutex::new(());
    let _turn = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            tokio::time::timeout(TEST_TIMEOUT, test)
                .await
                .expect("the test ran past its time limit")
        });
}

/// Whether `condition` holds within `bound`.
async fn wait_for(bound: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let since = Instant::now();
    while !condition() {
        if since.elapsed() > bound {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    true
}

fn models_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models")
}

/// A port nobody listens on right now.
fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn classifier(channel: Channel) -> ClassifierClient<Channel> {
    ClassifierClient::new(channel)
}

fn classify_request(image: Vec<u8>) -> ClassifyRequest {
    ClassifyRequest {
        model: MODEL.into(),
        image,
        top_k: 3,
        ..Default::default()
    }
}

/// A KServe request of `images` as its BYTES input `image`, in Triton's raw layout.
fn image_infer_request(images: &[&[u8]]) -> ModelInferRequest {
    let mut raw = Vec::new();
    for image in images {
        raw.extend_from_slice(&(image.len() as u32).to_le_bytes());
        raw.extend_from_slice(image);
    }
    ModelInferRequest {
        model_name: MODEL.into(),
        inputs: vec![InferInputTensor {
            name: "image".into(),
            datatype: "BYTES".into(),
            shape: vec![images.len() as i64],
            ..Default::default()
        }],
        raw_input_contents: vec![raw],
        ..Default::default()
    }
}

/// The status codes of `answers`, counted per kind.
fn codes(answers: &[(&str, Result<(), Status>)]) -> Vec<(String, usize)> {
    let mut counts = std::collections::BTreeMap::new();
    for (kind, answer) in answers {
        let code = answer.as_ref().err().map_or(Code::Ok, Status::code);
        *counts.entry(format!("{kind} {code:?}")).or_default() += 1;
    }
    counts.into_iter().collect()
}

/// A 28x28 grayscale PNG: what the model takes, decoded in microseconds.
fn small_png() -> Vec<u8> {
    let image = image::GrayImage::from_fn(28, 28, |x, y| image::Luma([(x * 9 + y) as u8]));
    let mut png = std::io::Cursor::new(Vec::new());
    image.write_to(&mut png, image::ImageFormat::Png).unwrap();
    png.into_inner()
}

/// PNG colour types.
/// A count from the environment, or `default`.
fn env_count(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

const GRAY: u8 = 0;
const RGBA: u8 = 6;

/// An all-zero (black) PNG, written chunk by chunk without ever holding its pixels: one row of
/// zeros (filter byte 0, then `bytes_per_pixel * width` zeros) fed to zlib `height` times.
fn zero_png(
    width: u32,
    height: u32,
    bit_depth: u8,
    color_type: u8,
    bytes_per_pixel: usize,
) -> Vec<u8> {
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut header = Vec::new();
    header.extend_from_slice(&width.to_be_bytes());
    header.extend_from_slice(&height.to_be_bytes());
    header.extend_from_slice(&[bit_depth, color_type, 0, 0, 0]);
    png_chunk(&mut png, b"IHDR", &header);
    let row = vec![0; 1 + bytes_per_pixel * width as usize];
    let mut zlib = ZlibEncoder::new(Vec::new(), Compression::default());
    for _ in 0..height {
        zlib.write_all(&row).unwrap();
    }
    png_chunk(&mut png, b"IDAT", &zlib.finish().unwrap());
    png_chunk(&mut png, b"IEND", &[]);
    png
}

/// Appends a PNG chunk: length, type, data, CRC-32 of type and data.
fn png_chunk(png: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    png.extend_from_slice(&(data.len() as u32).to_be_bytes());
    let start = png.len();
    png.extend_from_slice(kind);
    png.extend_from_slice(data);
    let crc = crc32fast::hash(&png[start..]);
    png.extend_from_slice(&crc.to_be_bytes());
}
