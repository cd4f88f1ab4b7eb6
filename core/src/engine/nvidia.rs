//! A GPU's free memory, from `nvidia-smi`: how an eviction on a `cuda:N` slot is checked (the
//! GPU's free memory grows by what the stopped worker held). Best effort: without `nvidia-smi`
//! (a CPU machine, a container without the tools) there is no figure, and nothing else changes.

use std::time::Duration;

/// How long one `nvidia-smi` query may take before it is given up.
const QUERY_TIMEOUT: Duration = Duration::from_secs(3);

/// Reads `nvidia-smi --query-gpu=index,memory.free --format=csv,noheader,nounits` output: the
/// free MiB of GPU `index`, in bytes.
pub fn parse_free(csv: &str, index: u32) -> Option<u64> {
    csv.lines().find_map(|line| {
        let (i, free) = line.split_once(',')?;
        (i.trim().parse::<u32>().ok()? == index).then_some(())?;
        free.trim().parse::<u64>().ok().map(|mib| mib << 20)
    })
}

/// The free memory of GPU `index` now, if `nvidia-smi` can say.
pub async fn free_bytes(index: u32) -> Option<u64> {
    let mut cmd = tokio::process::Command::new("nvidia-smi");
    cmd.args(["--query-gpu=index,memory.free", "--format=csv,noheader,nounits"]).kill_on_drop(true);
    let out = tokio::time::timeout(QUERY_TIMEOUT, cmd.output()).await.ok()?.ok()?;
    out.status.success().then(|| parse_free(&String::from_utf8_lossy(&out.stdout), index)).flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_free_memory_of_one_gpu_is_read_from_the_csv() {
        let csv = "0, 80000\n1, 1024\n";
        assert_eq!(parse_free(csv, 1), Some(1024 << 20));
        assert_eq!(parse_free(csv, 0), Some(80000 << 20));
        assert_eq!(parse_free(csv, 2), None);
        assert_eq!(parse_free("[N/A]", 0), None);
    }
}
