//! The README's first command: the five-peer demo, run as a user runs it, with `CARGO_TARGET_DIR`
//! set (common on developer machines), where the binary is not under `target/`.

use std::path::Path;
use std::process::Command;

#[test]
fn the_demo_runs_with_cargo_target_dir_set() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    // A folder of its own, kept between runs so a second run builds incrementally.
    let target = repo.join("target").join("demo-target");
    let out = Command::new("bash")
        .arg(repo.join("example/demo.sh"))
        .env("CARGO_TARGET_DIR", &target)
        .env_remove("RUST_LOG")
        .output()
        .expect("bash runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed:\n{stdout}\n{stderr}");
    assert!(target.join("release/qnode").exists());
    // p5 ends up serving both files it downloaded.
    assert!(stdout.contains("p5: 2 files"), "{stdout}");
}
