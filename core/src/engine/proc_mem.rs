//! The memory of a worker's process group, read from /proc: what a `cpu:N` slot's budget counts
//! for a process model that declares no `memory_bytes`, and how an eviction is checked (the
//! group is gone, its memory given back).
//!
//! A worker leads its own process group (the engine starts it with `process_group(0)`), so the
//! group's id is the worker's pid, and the group holds every helper process it started.

/// One process as /proc shows it: its group, whether it is a zombie (which holds no memory
/// and is only waiting to be reaped), and its resident pages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcInfo {
    pub pgrp: u32,
    pub zombie: bool,
    pub rss_pages: u64,
}

/// Reads `/proc/<pid>/stat`'s state and process group, and `statm`'s resident pages. The
/// command name (field 2) is in parentheses and may itself hold spaces and parentheses: the
/// fields are counted after its last `)`.
pub fn parse_proc(stat: &str, statm: &str) -> Option<ProcInfo> {
    let after = &stat[stat.rfind(')')? + 1..];
    let mut fields = after.split_whitespace();
    let state = fields.next()?;
    let _ppid = fields.next()?;
    let pgrp = fields.next()?.parse().ok()?;
    let rss_pages = statm.split_whitespace().nth(1).and_then(|f| f.parse().ok()).unwrap_or(0);
    Some(ProcInfo { pgrp, zombie: state == "Z" || state == "X", rss_pages })
}

/// The live (not zombie) processes of group `pgrp` and their resident bytes together.
pub fn group_usage(procs: &[ProcInfo], pgrp: u32, page_bytes: u64) -> (usize, u64) {
    let members = procs.iter().filter(|p| p.pgrp == pgrp && !p.zombie);
    members.fold((0, 0), |(n, bytes), p| (n + 1, bytes + p.rss_pages * page_bytes))
}

fn page_bytes() -> u64 {
    // SAFETY: sysconf reads a constant of the system.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if page > 0 {
        page as u64
    } else {
        4096
    }
}

/// Every process /proc lists now (one vanishing while it is read is skipped).
fn all_processes() -> Vec<ProcInfo> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return vec![] };
    dir.filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_str().is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit())))
        .filter_map(|e| {
            let dir = e.path();
            let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
            let statm = std::fs::read_to_string(dir.join("statm")).unwrap_or_default();
            parse_proc(&stat, &statm)
        })
        .collect()
}

/// The live processes of group `pgrp` now and the bytes they hold resident.
pub fn process_group(pgrp: u32) -> (usize, u64) {
    group_usage(&all_processes(), pgrp, page_bytes())
}

/// [`process_group`] on tokio's blocking pool: reading every process's `stat` and `statm` takes
/// milliseconds on a busy host, which an actor's task must not spend on a runtime thread (the
/// slot's other messages, and every task sharing that thread, would wait).
pub async fn process_group_off_thread(pgrp: u32) -> (usize, u64) {
    tokio::task::spawn_blocking(move || process_group(pgrp)).await.unwrap_or((0, 0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_stat_line_is_read_past_a_command_name_with_parentheses() {
        let stat = "4242 (python3 (worker) x) S 1 4242 4242 0 -1 4194560 1 0 0 0";
        assert_eq!(parse_proc(stat, "5000 1200 300 1 0 900 0"), Some(ProcInfo { pgrp: 4242, zombie: false, rss_pages: 1200 }));
        assert_eq!(parse_proc("4243 (sh) Z 4242 4242 4242", "0 0 0"), Some(ProcInfo { pgrp: 4242, zombie: true, rss_pages: 0 }));
        assert_eq!(parse_proc("garbage", ""), None);
    }

    #[test]
    fn this_process_group_is_found_with_its_memory() {
        // SAFETY: getpgrp only reads.
        let me = unsafe { libc::getpgrp() } as u32;
        let (n, bytes) = process_group(me);
        assert!(n >= 1 && bytes > 1 << 20, "{n} processes, {bytes} bytes");
        assert_eq!(process_group(u32::MAX), (0, 0), "no such group");
    }

    proptest! {
        /// The group's figure counts exactly its live members: zombies and other groups add
        /// nothing.
        #[test]
        fn only_the_groups_live_members_count(procs in proptest::collection::vec((0u32..4, any::<bool>(), 0u64..1000), 0..20)) {
            let procs: Vec<ProcInfo> = procs.into_iter().map(|(pgrp, zombie, rss_pages)| ProcInfo { pgrp, zombie, rss_pages }).collect();
            let (n, bytes) = group_usage(&procs, 2, 4096);
            let live: Vec<&ProcInfo> = procs.iter().filter(|p| p.pgrp == 2 && !p.zombie).collect();
            prop_assert_eq!(n, live.len());
            prop_assert_eq!(bytes, live.iter().map(|p| p.rss_pages * 4096).sum::<u64>());
        }
    }
}
