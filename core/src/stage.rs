//! What a pipeline's post-processing stages do, without the actors around them: run one
//! external command from a template (in its own process group, killed whole on timeout or
//! cancel, its output kept to explain a failure), and write camera metadata.

use std::path::Path;
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use tokio_util::sync::CancellationToken;

/// Bytes of stdout and stderr kept from a command, the last ones.
const KEPT_OUTPUT: usize = 4096;

#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum StageError {
    #[error("{0}")]
    Failed(String),
    #[error("timed out after {0} ms; its process group was killed")]
    Timeout(u64),
    #[error("cancelled")]
    Cancelled,
}

#[derive(Debug, Clone)]
pub struct CommandOutput {
    pub pid: u32,
    pub elapsed: Duration,
    pub stdout_tail: String,
    pub stderr_tail: String,
}

/// Replaces `{input}` and `{output}` in every argument.
pub fn expand(template: &[String], input: &Path, output: &Path) -> Vec<String> {
    template.iter().map(|a| a.replace("{input}", &input.display().to_string()).replace("{output}", &output.display().to_string())).collect()
}

async fn read_tail(mut r: impl tokio::io::AsyncRead + Unpin) -> String {
    let mut kept: Vec<u8> = Vec::new();
    let mut buf = [0u8; 8192];
    while let Ok(n) = r.read(&mut buf).await {
        if n == 0 {
            break;
        }
        kept.extend_from_slice(&buf[..n]);
        if kept.len() > 2 * KEPT_OUTPUT {
            kept.drain(..kept.len() - KEPT_OUTPUT);
        }
    }
    if kept.len() > KEPT_OUTPUT {
        kept.drain(..kept.len() - KEPT_OUTPUT);
    }
    String::from_utf8_lossy(&kept).trim().to_string()
}

/// Runs `argv` in a new process group. On timeout or cancel the whole group is killed (the
/// command's children too), so nothing it started outlives the stage.
pub async fn run_command(argv: &[String], timeout: Duration, cancel: &CancellationToken) -> Result<CommandOutput, StageError> {
    let started = Instant::now();
    let mut cmd = tokio::process::Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    crate::engine::process::dies_with_the_node(&mut cmd);
    let mut child = cmd.spawn().map_err(|e| StageError::Failed(format!("cannot start {:?}: {e}", argv[0])))?;
    let pid = child.id().unwrap_or(0);
    let stdout = tokio::spawn(read_tail(child.stdout.take().expect("piped")));
    let stderr = tokio::spawn(read_tail(child.stderr.take().expect("piped")));
    let kill_group = || {
        if pid > 0 {
            // SAFETY: plain syscall; the group is the command's own (process_group(0)).
            unsafe { libc::killpg(pid as i32, libc::SIGKILL) };
        }
    };
    let status = tokio::select! {
        status = child.wait() => status,
        _ = tokio::time::sleep(timeout) => {
            kill_group();
            let _ = child.wait().await;
            return Err(StageError::Timeout(timeout.as_millis() as u64));
        }
        _ = cancel.cancelled() => {
            kill_group();
            let _ = child.wait().await;
            return Err(StageError::Cancelled);
        }
    };
    // The command is done; anything it left running in its group goes too.
    kill_group();
    let stdout_tail = stdout.await.unwrap_or_default();
    let stderr_tail = stderr.await.unwrap_or_default();
    match status {
        Ok(s) if s.success() => Ok(CommandOutput { pid, elapsed: started.elapsed(), stdout_tail, stderr_tail }),
        Ok(s) => {
            let how = match (s.code(), std::os::unix::process::ExitStatusExt::signal(&s)) {
                (Some(code), _) => format!("exited with status {code}"),
                (None, Some(sig)) => format!("was killed by signal {sig}"),
                _ => "failed".to_string(),
            };
            let said = if stderr_tail.is_empty() { stdout_tail } else { stderr_tail };
            Err(StageError::Failed(format!("{:?} {how}: {said}", argv[0])))
        }
        Err(e) => Err(StageError::Failed(format!("cannot wait for {:?}: {e}", argv[0]))),
    }
}

/// The SHARP service's `/metadata` body: a row-major 3x3 intrinsic matrix (focal length `f`,
/// principal point at the image centre) and a 4x4 identity extrinsic matrix.
pub fn camera_metadata(job_id: &str, width: u32, height: u32, focal: f64) -> serde_json::Value {
    let (cx, cy) = (width as f64 / 2.0, height as f64 / 2.0);
    serde_json::json!({
        "task_id": job_id,
        "image_width": width,
        "image_height": height,
        "focal_length": focal,
        "intrinsic_matrix": [focal, 0.0, cx, 0.0, focal, cy, 0.0, 0.0, 1.0],
        "extrinsic_matrix": [1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0],
    })
}

/// Width and height of a PNG or JPEG file.
pub fn image_size(path: &Path) -> Result<(u32, u32), StageError> {
    // The header is enough: no decode, and no libtorch for a build without the engines.
    let size = imagesize::size(path).map_err(|e| StageError::Failed(format!("{} is not a readable image: {e}", path.display())))?;
    Ok((size.width as u32, size.height as u32))
}

/// Processes of group `pgid` that still run (zombies excluded: a killed orphan stays a zombie
/// until whatever adopted it reaps it, and runs nothing). Linux `/proc`; for tests and checks.
pub fn live_group_members(pgid: i32) -> Vec<i32> {
    let mut live = vec![];
    let Ok(entries) = std::fs::read_dir("/proc") else { return live };
    for entry in entries.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        // After the `(comm)` field: state, ppid, pgrp.
        let rest: Vec<&str> = stat.rsplit_once(')').map(|(_, r)| r.split_whitespace().collect()).unwrap_or_default();
        if rest.len() > 2 && rest[2] == pgid.to_string() && rest[0] != "Z" {
            live.push(pid);
        }
    }
    live
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Vec<String> {
        vec!["sh".into(), "-c".into(), script.into()]
    }

    #[tokio::test]
    async fn a_command_runs_and_a_failure_keeps_what_it_said() {
        let none = CancellationToken::new();
        let ok = run_command(&sh("echo hello"), Duration::from_secs(5), &none).await.unwrap();
        assert_eq!(ok.stdout_tail, "hello");
        let err = run_command(&sh("echo broken input >&2; exit 3"), Duration::from_secs(5), &none).await.unwrap_err();
        assert_eq!(err, StageError::Failed("\"sh\" exited with status 3: broken input".into()));
        let missing = run_command(&["/no/such/tool".to_string()], Duration::from_secs(5), &none).await.unwrap_err();
        assert!(missing.to_string().contains("cannot start"), "{missing}");
    }

    #[tokio::test]
    async fn a_hanging_command_is_killed_with_its_children_at_the_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let pids = dir.path().join("pids");
        // The command starts a child in its group, then hangs.
        let script = format!("sleep 300 & echo $$ > {}; wait", pids.display());
        let started = Instant::now();
        let err = run_command(&sh(&script), Duration::from_millis(300), &CancellationToken::new()).await.unwrap_err();
        assert_eq!(err, StageError::Timeout(300));
        assert!(started.elapsed() < Duration::from_secs(3));
        let pgid: i32 = std::fs::read_to_string(&pids).unwrap().trim().parse().unwrap();
        // SIGKILL is delivered asynchronously: give the kernel a moment.
        let mut live = live_group_members(pgid);
        for _ in 0..50 {
            if live.is_empty() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
            live = live_group_members(pgid);
        }
        assert_eq!(live, Vec::<i32>::new(), "process group {pgid} is gone, the background sleep included");
    }

    #[tokio::test]
    async fn cancel_kills_the_command() {
        let cancel = CancellationToken::new();
        let c = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            c.cancel();
        });
        let err = run_command(&sh("sleep 30"), Duration::from_secs(60), &cancel).await.unwrap_err();
        assert_eq!(err, StageError::Cancelled);
    }

    #[test]
    fn the_template_and_the_metadata() {
        let argv = expand(&["t".into(), "{input}".into(), "--out={output}".into()], Path::new("/a/in.ply"), Path::new("/b/o.sog"));
        assert_eq!(argv, ["t", "/a/in.ply", "--out=/b/o.sog"]);
        let m = camera_metadata("j", 1920, 1080, 1234.5);
        assert_eq!(m["intrinsic_matrix"], serde_json::json!([1234.5, 0.0, 960.0, 0.0, 1234.5, 540.0, 0.0, 0.0, 1.0]));
        assert_eq!(m["extrinsic_matrix"].as_array().unwrap().len(), 16);
    }
}
