//! Child processes that die with this process, however it ends.
//!
//! A `Drop` that kills a child does not run when this process is SIGKILLed: `kiln chaos`
//! killed that way left its nats-server and four nodes running for good (issue 23). The
//! kernel can send a child a signal when its parent goes (`PR_SET_PDEATHSIG`), but "parent"
//! there is the *thread* that forked it: a child started from a blocking-pool thread would be
//! killed when that thread idles out, seconds later, with this process alive. So every tied
//! child is forked by one thread that lives as long as the process: [`spawn_tied`] hands the
//! command to it.

use std::io;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};

type SpawnRequest = (Command, mpsc::SyncSender<io::Result<Child>>);

/// The spawner thread's queue. Unbounded: a caller waits for its own answer, so at most one
/// request per calling thread is ever queued.
static SPAWNER: OnceLock<Mutex<mpsc::Sender<SpawnRequest>>> = OnceLock::new();

fn spawner() -> &'static Mutex<mpsc::Sender<SpawnRequest>> {
    SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("kiln-spawner".into())
            .spawn(move || {
                // The sender is in a static, so this loop (and the thread, the children's
                // "parent") ends only with the process.
                for (mut command, reply) in rx {
                    let _ = reply.send(command.spawn());
                }
            })
            .expect("cannot start the spawner thread");
        Mutex::new(tx)
    })
}

/// Starts `command` as a child that the kernel SIGKILLs when this process ends, by any means.
pub fn spawn_tied(mut command: Command) -> io::Result<Child> {
    let parent = std::process::id();
    // SAFETY: between fork and exec, only async-signal-safe calls (prctl, getppid) and no
    // allocation.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The parent died before the prctl took effect: nothing would ever kill this one.
            if libc::getppid() as u32 != parent {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
    let (reply_tx, reply_rx) = mpsc::sync_channel(1);
    spawner()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .send((command, reply_tx))
        .map_err(|_| io::Error::other("the spawner thread is gone"))?;
    reply_rx.recv().map_err(|_| io::Error::other("the spawner thread is gone"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tied child started from a thread that then ends keeps running: the kernel's "parent"
    /// is the spawner thread, not the caller's.
    #[test]
    fn a_tied_child_outlives_the_thread_that_asked_for_it() {
        let mut child = std::thread::spawn(|| {
            let mut sleep = Command::new("sleep");
            sleep.arg("30");
            spawn_tied(sleep).unwrap()
        })
        .join()
        .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(300));
        assert!(child.try_wait().unwrap().is_none(), "the child died with the calling thread");
        child.kill().unwrap();
        child.wait().unwrap();
    }
}
