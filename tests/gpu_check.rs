//! `tools/gpu/check.sh` without a GPU: it must never pass what it could not check. With the CPU
//! build of octserve (which cannot open `cuda`) and a PyTorch peer given no time, every step
//! fails with its reason, the failures close the log, and the exit status is 1.

use std::path::Path;
use std::process::Command;

fn script() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tools/gpu/check.sh")
        .display()
        .to_string()
}

#[test]
fn the_gpu_check_fails_every_step_it_cannot_run() {
    let out_dir = tempfile::tempdir().unwrap();
    let out = Command::new("bash")
        .arg(script())
        .env("OCTSERVE_BIN", env!("CARGO_BIN_EXE_octserve"))
        .env("OUT", out_dir.path())
        .env("BATCHES", "1 8")
        .env("ITERS", "1")
        .env("PEER_TIMEOUT", "1")
        .output()
        .expect("bash runs");
    let log = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{log}");
    let mut expected = vec![];
    for net in ["resnet50", "oct-resnet50 --alpha 0.5"] {
        for dtype in ["f32", "f16"] {
            expected.push(format!("parity {net} {dtype} did not run"));
            for batch in [1, 8] {
                expected.push(format!("bench {net} {dtype} batch {batch} did not run"));
            }
        }
    }
    expected.push("PyTorch peer benchmark did not run".into());
    expected.push("summary: results missing or implausible".into());
    for failure in &expected {
        assert!(
            log.contains(&format!("!! FAILED: {failure}")),
            "{failure}:\n{log}"
        );
        assert!(
            log.contains(&format!("   - {failure}")),
            "not listed: {failure}:\n{log}"
        );
    }
    // The octserve steps failed because the device could not be opened, not for want of a flag.
    assert!(log.contains("cannot open cuda"), "{log}");
    assert!(!log.contains("has no --"), "{log}");
    let saved = std::fs::read_to_string(out_dir.path().join("check.log")).unwrap();
    assert!(saved.contains("check(s) FAILED"), "{saved}");
}

#[test]
fn the_gpu_check_plan_checks_nothing_and_says_so() {
    let out = Command::new("bash")
        .args([script().as_str(), "--plan"])
        .output()
        .expect("bash runs");
    assert_eq!(out.status.code(), Some(2));
    let plan = String::from_utf8_lossy(&out.stdout);
    // 4 parity runs and 2 nets x 2 dtypes x 3 batches.
    assert_eq!(plan.matches("--parity --json").count(), 4, "{plan}");
    assert_eq!(
        plan.lines().filter(|l| l.starts_with("4. ")).count(),
        12,
        "{plan}"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("nothing was checked"));
}
