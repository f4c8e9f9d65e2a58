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
