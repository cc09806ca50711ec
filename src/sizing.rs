//! The default `server.max_connections`: the smaller of what the descriptor limit and what the
//! cgroup memory limit allow, so a memory-limited container is not OOM-killed by connections
//! its descriptor limit would still admit. Pure functions over the limit values and the cgroup
//! files' contents; [`read_memory_limit`] is the only I/O.

use std::path::{Path, PathBuf};

/// What one open client connection may cost: ~103 KiB measured (pingora's 64 KiB read buffer
/// and the rest; docs/operations.md, Sizing), rounded up for request heads and TLS state.
pub const CONNECTION_BYTES: u64 = 128 * 1024;

/// Memory kept out of the connection budget: the process itself (~40 MiB measured) with room
/// for allocator slack and the runtimes.
pub const BASE_RESERVE_BYTES: u64 = 64 * 1024 * 1024;

/// What one cached key may cost (~0.9 KiB measured), for the cache's share of the reserve.
pub const CACHED_KEY_BYTES: u64 = 1024;

/// Descriptors kept for listeners, upstream pools, the store and logs.
const DESCRIPTOR_RESERVE: u64 = 256;

/// Never default below this: a tiny limit would refuse a modest client.
const FLOOR: usize = 64;

/// A cgroup memory limit at or above this is "no limit" (cgroup v1 reports unlimited as
/// 9223372036854771712; no machine has 1 EiB).
const UNLIMITED: u64 = 1 << 60;

/// Where the default came from, for the startup log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Half the descriptor limit (each proxied request may hold an upstream connection too).
    Descriptors,
    /// The cgroup memory limit was the smaller bound.
    Memory,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Descriptors => "descriptor limit",
            Self::Memory => "cgroup memory limit",
        }
    }
}

/// The limit in a cgroup v2 `memory.max` or v1 `memory.limit_in_bytes` file: `None` for
/// "max", a value so large it means unlimited, or anything unreadable.
pub fn parse_memory_limit(contents: &str) -> Option<u64> {
    let text = contents.trim();
    if text == "max" {
        return None;
    }
    text.parse::<u64>().ok().filter(|&n| n > 0 && n < UNLIMITED)
}

/// The cgroup v2 directory of this process from `/proc/self/cgroup` (the `0::/path` line).
pub fn own_cgroup_v2(proc_self_cgroup: &str) -> Option<PathBuf> {
    proc_self_cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|p| Path::new("/sys/fs/cgroup").join(p.trim().trim_start_matches('/')))
}

/// Connections that fit in `limit` bytes once the base reserve and a full key cache of
/// `cache_capacity` entries are set aside.
pub fn connections_for_memory(limit: u64, cache_capacity: u64) -> usize {
    let reserve =
        BASE_RESERVE_BYTES.saturating_add(cache_capacity.saturating_mul(CACHED_KEY_BYTES));
    usize::try_from(limit.saturating_sub(reserve) / CONNECTION_BYTES).unwrap_or(usize::MAX)
}

/// Half the descriptor limit less a reserve.
pub fn connections_for_descriptors(nofile: u64) -> usize {
    usize::try_from(nofile.saturating_sub(DESCRIPTOR_RESERVE) / 2).unwrap_or(usize::MAX)
}

/// The default `server.max_connections`: the smaller of the descriptor and memory bounds (no
/// memory limit: descriptors alone), never below 64.
pub fn default_max_connections(
    nofile: u64,
    memory_limit: Option<u64>,
    cache_capacity: u64,
) -> (usize, Source) {
    let by_fd = connections_for_descriptors(nofile);
    let (n, source) = match memory_limit.map(|m| connections_for_memory(m, cache_capacity)) {
        Some(by_mem) if by_mem < by_fd => (by_mem, Source::Memory),
        _ => (by_fd, Source::Descriptors),
    };
    (n.max(FLOOR), source)
}

/// This process's cgroup memory limit: its own cgroup v2 `memory.max`, else the v2 file at the
/// mount root (a container's namespace), else cgroup v1's `memory.limit_in_bytes`.
pub fn read_memory_limit() -> Option<u64> {
    let read = |p: &Path| std::fs::read_to_string(p).ok();
    let own = read(Path::new("/proc/self/cgroup"))
        .and_then(|t| own_cgroup_v2(&t))
        .map(|d| d.join("memory.max"));
    own.into_iter()
        .chain([
            PathBuf::from("/sys/fs/cgroup/memory.max"),
            PathBuf::from("/sys/fs/cgroup/memory/memory.limit_in_bytes"),
        ])
        .find_map(|p| read(&p))
        .and_then(|t| parse_memory_limit(&t))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1024 * 1024;

    #[test]
    fn cgroup_files_read_as_limits() {
        assert_eq!(parse_memory_limit("max\n"), None);
        assert_eq!(parse_memory_limit("536870912\n"), Some(512 * MIB));
        // cgroup v1's "unlimited".
        assert_eq!(parse_memory_limit("9223372036854771712\n"), None);
        assert_eq!(parse_memory_limit(""), None);
        assert_eq!(parse_memory_limit("0"), None);
        assert_eq!(parse_memory_limit("garbage"), None);
        assert_eq!(
            own_cgroup_v2("0::/system.slice/keygate.service\n"),
            Some(PathBuf::from("/sys/fs/cgroup/system.slice/keygate.service"))
        );
        assert_eq!(
            own_cgroup_v2("0::/\n"),
            Some(PathBuf::from("/sys/fs/cgroup/"))
        );
        // cgroup v1 lines only: no v2 path.
        assert_eq!(own_cgroup_v2("4:memory:/docker/abc\n"), None);
    }

    #[test]
    fn a_512_mib_pod_gets_what_its_memory_holds_not_half_its_descriptors() {
        // The case: 1,048,576 descriptors gave 524,160 connections (~51 GiB at
        // 103 KiB each) to a 512 MiB pod.
        let (n, source) = default_max_connections(1 << 20, Some(512 * MIB), 100_000);
        assert_eq!(source, Source::Memory);
        // (512 MiB - 64 MiB - 100,000 KiB) / 128 KiB
        assert_eq!(
            n,
            ((512 * MIB - 64 * MIB - 100_000 * 1024) / (128 * 1024)) as usize
        );
        assert_eq!(n, 2802);
        assert!(n as u64 * 103 * 1024 + 40 * MIB + 100_000 * 922 < 512 * MIB);
    }

    #[test]
    fn descriptors_bound_when_memory_is_unlimited_or_larger() {
        assert_eq!(
            default_max_connections(1 << 20, None, 100_000),
            (524_160, Source::Descriptors)
        );
        assert_eq!(
            default_max_connections(1024, Some(64 * 1024 * MIB), 100_000),
            (384, Source::Descriptors)
        );
    }

    #[test]
    fn never_below_the_floor() {
        assert_eq!(default_max_connections(100, None, 0).0, 64);
        assert_eq!(
            default_max_connections(1 << 20, Some(32 * MIB), 100_000),
            (64, Source::Memory)
        );
    }
}
