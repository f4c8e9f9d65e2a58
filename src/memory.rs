//! Process-wide memory settings for the command line.
//!
//! glibc's malloc serves every block over its mmap threshold (at most 32 MiB) with a fresh `mmap` and returns it
//! with `munmap` on free. A denoising step allocates the same large activations again and again, so each one
//! came back as newly mapped pages: page faults, zeroing and unmapping took about a fifth of a step (measured
//! with `perf` on `controlnet bench`). Keeping large blocks on the heap, and freed memory in the process, lets
//! the next step reuse them. Peak memory stays the same: the memory is reused, not added.

/// The environment variable that turns the tuning off (any value).
pub const OPT_OUT_ENV: &str = "CONTROLNET_DEFAULT_MALLOC";

#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod glibc {
    use std::os::raw::c_int;

    /// `<malloc.h>` parameter numbers.
    pub const M_TRIM_THRESHOLD: c_int = -1;
    pub const M_MMAP_MAX: c_int = -4;

    extern "C" {
        pub fn mallopt(param: c_int, value: c_int) -> c_int;
        pub fn malloc_trim(pad: usize) -> c_int;
    }
}

/// Makes malloc keep and reuse large freed blocks (glibc on Linux; elsewhere nothing happens). Skipped when
/// [`OPT_OUT_ENV`] is set or `GLIBC_TUNABLES` already sets malloc options. Returns whether it applied.
pub fn reuse_freed_memory() -> bool {
    let user_tuned = std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains("malloc"));
    if std::env::var_os(OPT_OUT_ENV).is_some() || user_tuned {
        return false;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes allocator parameters; called before the program allocates tensors.
        unsafe {
            // No mmap for large blocks: they come from the heap and return to it when freed.
            let no_mmap = glibc::mallopt(glibc::M_MMAP_MAX, 0) == 1;
            // Never give the top of the heap back to the kernel (the next step needs it again).
            let no_trim = glibc::mallopt(glibc::M_TRIM_THRESHOLD, i32::MAX) == 1;
            no_mmap && no_trim
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// Gives freed memory back to the kernel now (glibc's `malloc_trim`), e.g. after dropping a model, so the
/// resident size reflects what is still in use. Nothing happens elsewhere.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free pages to the kernel.
    unsafe {
        glibc::malloc_trim(0);
    }
}

/// Memory the kernel says a new allocation can get without swapping (`MemAvailable` of `/proc/meminfo`), in
/// bytes; `None` where that file does not exist or cannot be read (not Linux).
pub fn available_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    parse_mem_available(&text)
}

fn parse_mem_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find_map(|l| l.strip_prefix("MemAvailable:"))?;
    let kib: u64 = line.trim().strip_suffix("kB")?.trim().parse().ok()?;
    kib.checked_mul(1024)
}

/// Without a figure for the available memory, requests needing more than this are refused (a machine with less
/// would abort in the allocator instead of saying so).
pub const LIMIT_WHEN_UNKNOWN: u64 = 64 << 30;

/// Refuses a request that needs `need` bytes when `available` (see [`available_bytes`]) cannot hold it, before
/// anything is allocated: the error names `setting`, what is being made (`what`) and both figures.
pub fn check_fits(setting: &str, what: &str, need: u64, available: Option<u64>) -> crate::Result<()> {
    let (limit, of) = match available {
        Some(bytes) => (bytes, "available"),
        None => (LIMIT_WHEN_UNKNOWN, "allowed when the free memory cannot be read"),
    };
    if need > limit {
        return Err(crate::Error::setting(
            setting,
            format!("{what} needs about {} of memory, more than the {} {of}", format_bytes(need), format_bytes(limit)),
        ));
    }
    Ok(())
}

/// A byte count for messages: "28.0 GiB", "512.0 MiB", "1.2 TiB".
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_available_is_read_in_bytes() {
        let text = "MemTotal:       24683664 kB\nMemFree:        21338404 kB\nMemAvailable:   23123560 kB\n";
        assert_eq!(parse_mem_available(text), Some(23123560 * 1024));
        assert_eq!(parse_mem_available("MemTotal: 1 kB\n"), None);
    }

    #[test]
    fn a_request_that_cannot_fit_names_both_figures() {
        let err = check_fits("width", "a 100000x100000 image", 240 << 30, Some(16 << 30)).unwrap_err().to_string();
        assert_eq!(
            err,
            "width: a 100000x100000 image needs about 240.0 GiB of memory, more than the 16.0 GiB available"
        );
        assert!(check_fits("width", "x", 1 << 30, Some(16 << 30)).is_ok());
        assert!(check_fits("width", "x", LIMIT_WHEN_UNKNOWN + 1, None).is_err());
    }

    #[test]
    fn bytes_are_told_in_binary_units() {
        assert_eq!(format_bytes(512), "512 B");
        assert_eq!(format_bytes(3 << 30), "3.0 GiB");
        assert_eq!(format_bytes(30_000_000_000), "27.9 GiB");
    }
}
