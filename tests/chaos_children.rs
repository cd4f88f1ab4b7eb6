//! `kiln chaos` killed by a signal takes its cluster with it (issue 23 item 18): an outside run
//! found four of its nodes still up 35 minutes after it was killed.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The pids whose parent is `pid`, read from `/proc/<pid>/stat` (field 4).
fn children_of(pid: u32) -> Vec<u32> {
    let mut children = vec![];
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(child) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else { continue };
        // The command name (field 2) may hold spaces; the fields after its ')' do not.
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else { continue };
        let ppid = rest.split_whitespace().nth(1).and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(pid) {
            children.push(child);
        }
    }
    children
}

/// Alive and not a zombie (a zombie has exited; only its exit status waits for its parent).
fn running(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat.rfind(')').and_then(|i| stat[i + 1..].split_whitespace().next()).is_some_and(|state| state != "Z"),
        Err(_) => false,
    }
}

#[test]
fn a_sigkilled_chaos_run_leaves_no_process_behind() {
    let dir = tempfile::tempdir().unwrap();
    let mut chaos = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["chaos", "--profile", "short", "--nodes", "3", "--jobs", "400", "--work-dir"])
        .arg(dir.path())
        .arg("--worker")
        .arg(common::demo_worker())
        .env("KILN_PYTHON", common::python_with_nats())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = chaos.id();
    // Its nats-server and three nodes, started.
    let started = Instant::now();
    let mut children = vec![];
    while started.elapsed() < Duration::from_secs(60) {
        children = children_of(pid);
        if children.len() >= 4 {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(children.len() >= 4, "kiln chaos started {} processes, not a server and three nodes", children.len());
    // And the nodes' own children (their workers), once they run.
    std::thread::sleep(Duration::from_secs(3));
    let mut tree = children_of(pid);
    tree.extend(tree.clone().into_iter().flat_map(children_of));

    chaos.kill().unwrap(); // SIGKILL: no destructor of chaos runs
    chaos.wait().unwrap();
    let killed = Instant::now();
    while killed.elapsed() < Duration::from_secs(10) && tree.iter().any(|p| running(*p)) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let left: Vec<u32> = tree.iter().copied().filter(|p| running(*p)).collect();
    for p in &left {
        unsafe { libc::kill(*p as i32, libc::SIGKILL) };
    }
    assert!(left.is_empty(), "still running 10 s after kiln chaos was SIGKILLed: {left:?} of {tree:?}");
    println!("{} processes gone {} ms after the SIGKILL", tree.len(), killed.elapsed().as_millis());
}
