//! The Python worker SDK (`python/kiln-worker`) as part of `cargo test`: its pytest suite, run
//! with the checkout's source, talks the worker protocol to SDK workers and drives one through a
//! real nats-server and a `kiln node` built by this cargo (`KILN_BIN`).

mod common;

use std::process::Command;

use common::*;

#[test]
fn the_python_worker_sdk_suite_passes() {
    let repo = repo();
    let output = Command::new(python_with_nats())
        .args(["-m", "pytest", "python/kiln-worker/tests", "-q", "-p", "no:cacheprovider"])
        .current_dir(&repo)
        .env("KILN_BIN", env!("CARGO_BIN_EXE_kiln"))
        .env("PYTHONPATH", repo.join("python/kiln-worker/src"))
        // No __pycache__ folders left in the checkout by the test run.
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .output()
        .expect("run pytest (scripts/setup.sh installs it in the venv)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "pytest failed ({}):\n{stdout}\n{stderr}", output.status);
    // Every test ran: none was skipped (the node tests skip only without the kiln binary).
    assert!(!stdout.contains("skipped"), "pytest skipped tests:\n{stdout}");
    println!("{stdout}");
}
