//! The CI profile of `kiln chaos`: a real local cluster (nats-server, three node processes with
//! their worker processes) stormed with jobs, pipelines, batches and cancels while every kind of
//! fault is injected on a seeded schedule; then the invariants. Also: the same seed gives the
//! same schedule as the run reports.

use std::path::PathBuf;

use kiln::chaos::{ChaosOptions, FaultKind, Profile};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_short_chaos_profile_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let seed = 2026;
    let options = ChaosOptions {
        seed,
        profile: Profile::short(),
        node_binary: PathBuf::from(env!("CARGO_BIN_EXE_kiln")),
        fault_points: kiln_core::fault::compiled_in(),
        python: std::env::var("KILN_PYTHON").unwrap_or_else(|_| "python3".into()),
        worker: repo.join("examples/workers/demo_worker.py"),
        work_dir: Some(dir.path().to_path_buf()),
        report: Some(dir.path().join("report.json")),
    };
    assert!(options.fault_points, "test builds have the fault points");
    let report = kiln::chaos::run(options).await.unwrap();
    for i in &report.invariants {
        assert!(i.ok, "invariant failed: {}: {}", i.name, i.detail);
    }
    assert!(report.passed);
    // The report says what was injected, and it is the plan of that seed.
    let plan = kiln::chaos::plan(seed, &Profile::short());
    let mut planned: Vec<_> = plan.faults.iter().map(|f| (f.at_ms, f.kind)).collect();
    let mut reported: Vec<_> = report.faults.iter().map(|f| (f.fault.at_ms, f.fault.kind)).collect();
    planned.sort();
    reported.sort();
    assert_eq!(planned, reported);
    for kind in FaultKind::ALL {
        let injected = report.faults.iter().filter(|f| f.fault.kind == kind && f.skipped.is_empty()).count();
        // A worker kill finds no worker when the node has not started one yet; the rest must land.
        if kind != FaultKind::WorkerKill {
            assert!(injected >= 1, "{kind:?} was not injected: {:#?}", report.faults);
        }
    }
    assert!(report.retried > 0, "the faults cost retries");
    assert!(report.jobs_accepted >= report.submissions, "every submission accepted (batches add jobs)");
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.path().join("report.json")).unwrap()).unwrap();
    assert_eq!(json["passed"], true);
}
