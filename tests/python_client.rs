//! The Python client package (`python/kiln-client`) against this build: runs its pytest
//! suite, which starts its own nats-server and a `kiln up` node from this build's binary
//! (`python/kiln-client/tests/conftest.py`) and drives them with both the blocking and the
//! asyncio client: submit, uploads, events with resume, downloads with the sha256 check,
//! cancel, coded errors, batches, the cluster and models views.

mod common;

use std::process::Command;

use common::{python_with_nats, repo};

#[test]
fn the_python_client_package_passes_its_tests() {
    let nats_server = kiln_core::nats::server::find_server_binary().expect("nats-server (run scripts/setup.sh)");
    let output = Command::new(python_with_nats())
        .args(["-m", "pytest", "python/kiln-client/tests", "-q", "-p", "no:cacheprovider"])
        .current_dir(repo())
        .env("KILN_BIN", env!("CARGO_BIN_EXE_kiln"))
        .env("KILN_NATS_SERVER", nats_server)
        .env("PYTHONPATH", repo().join("python/kiln-client/src"))
        .env("PYTHONDONTWRITEBYTECODE", "1")
        // The suite's nodes and clients talk to its own server only.
        .env_remove("KILN_NATS_URL")
        .output()
        .expect("run pytest");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "pytest python/kiln-client/tests failed ({}):\n{stdout}\n{stderr}", output.status);
    // The suite skips itself when it finds no kiln binary; here it has one, so nothing skips.
    assert!(!stdout.contains("skipped"), "pytest skipped tests:\n{stdout}");
    println!("{stdout}");
}
