//! The Intel AMX kernel: eight 1 KiB tile registers, `tdpbf16ps` multiplies a 16x32 bf16 tile by a 32x16
//! one (VNNI pairs) into a 16x16 f32 tile. Stable Rust has no AMX intrinsics yet, so the instructions are
//! written in `asm!`, and the CPU check reads CPUID itself (`is_x86_feature_detected!("amx-tile")` is unstable).
use super::{Tiles, BLOCK, TILE_ELEMS};

/// Whether AMX-BF16 runs here: the CPU has AMX-TILE and AMX-BF16 (CPUID leaf 7, EDX bits 24 and 22), and
/// Linux granted this process the tile-data state (without that grant the first tile load faults).
pub fn available() -> bool {
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    {
        use std::sync::OnceLock;
        static OK: OnceLock<bool> = OnceLock::new();
        *OK.get_or_init(|| cpu_has_amx() && super::avx512::available() && request_tile_data())
    }
    #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
    {
        false
    }
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn cpu_has_amx() -> bool {
    use std::arch::x86_64::__cpuid_count;
    // Leaf 7 is only read when the maximum leaf reaches it.
    if __cpuid_count(0, 0).eax < 7 {
        return false;
    }
    let leaf7 = __cpuid_count(7, 0);
    let (amx_bf16, amx_tile) = (leaf7.edx & (1 << 22) != 0, leaf7.edx & (1 << 24) != 0);
    amx_bf16 && amx_tile
}

/// Asks Linux for permission to use the AMX tile-data register state (`arch_prctl(ARCH_REQ_XCOMP_PERM,
/// XFEATURE_XTILEDATA)`), for the whole process.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn request_tile_data() -> bool {
    const SYS_ARCH_PRCTL: std::ffi::c_long = 158;
    const ARCH_REQ_XCOMP_PERM: std::ffi::c_long = 0x1023;
    const XFEATURE_XTILEDATA: std::ffi::c_long = 18;
    extern "C" {
        fn syscall(number: std::ffi::c_long, ...) -> std::ffi::c_long;
    }
    // SAFETY: arch_prctl with these arguments only changes which register state the kernel saves for us.
    unsafe { syscall(SYS_ARCH_PRCTL, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 }
}

/// Tile configuration (palette 1): all eight tiles 16 rows of 64 bytes.
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

impl TileConfig {
    fn all_full() -> Self {
        let mut cfg = [0u8; 64];
        cfg[0] = 1; // palette
        for t in 0..8 {
            cfg[16 + 2 * t..18 + 2 * t].copy_from_slice(&64u16.to_le_bytes()); // bytes per row
            cfg[48 + t] = 16; // rows
        }
        TileConfig(cfg)
    }
}

/// Loads the tile configuration on the calling thread (before its first [`block`]).
pub fn configure_thread() {
    #[cfg(target_arch = "x86_64")]
    {
        assert!(available(), "AMX tiles used on a CPU without them");
        let cfg = TileConfig::all_full();
        // SAFETY: AMX is available and permitted (checked above); cfg is a valid 64-byte-aligned palette-1
        // configuration.
        unsafe { std::arch::asm!("ldtilecfg [{}]", in(reg) cfg.0.as_ptr(), options(nostack, readonly)) };
    }
}

/// One 32x32 block of sums: tiles 0-3 accumulate the 2x2 products, 4-5 hold the left tiles, 6-7 the right.
///
/// # Safety
/// AMX is available and [`configure_thread`] ran on this thread; `at` addresses 2 x `k_tiles` tiles inside
/// `a` (checked by the caller), `b` holds 2 * `k_tiles` packed tiles.
#[cfg(target_arch = "x86_64")]
pub unsafe fn block(a: &[u16], at: Tiles, b: &[u16], k_tiles: usize, sums: &mut [f32; BLOCK * BLOCK]) {
    let panel = k_tiles * TILE_ELEMS;
    assert!(k_tiles > 0 && b.len() >= 2 * panel);
    let out = sums.as_mut_ptr();
    let a0 = a.as_ptr().add(at.offset);
    std::arch::asm!(
        "tilezero tmm0",
        "tilezero tmm1",
        "tilezero tmm2",
        "tilezero tmm3",
        "2:",
        "tileloadd tmm4, [{a0} + {sa}]",
        "tileloadd tmm6, [{b0} + {sb}]",
        "tileloadd tmm5, [{a1} + {sa}]",
        "tdpbf16ps tmm0, tmm4, tmm6",
        "tileloadd tmm7, [{b1} + {sb}]",
        "tdpbf16ps tmm2, tmm5, tmm6",
        "tdpbf16ps tmm1, tmm4, tmm7",
        "tdpbf16ps tmm3, tmm5, tmm7",
        "add {a0}, {ka}",
        "add {a1}, {ka}",
        "add {b0}, 1024",
        "add {b1}, 1024",
        "dec {n}",
        "jnz 2b",
        // The f32 block is 32 floats (128 bytes) per row.
        "mov {sb}, 128",
        "tilestored [{o} + {sb}], tmm0",
        "tilestored [{o} + {sb} + 64], tmm1",
        "tilestored [{o} + {sb} + 2048], tmm2",
        "tilestored [{o} + {sb} + 2112], tmm3",
        a0 = inout(reg) a0 => _,
        a1 = inout(reg) a0.add(at.second) => _,
        b0 = inout(reg) b.as_ptr() => _,
        b1 = inout(reg) b.as_ptr().add(panel) => _,
        n = inout(reg) k_tiles => _,
        sa = in(reg) at.row * 2,
        ka = in(reg) at.step * 2,
        sb = inout(reg) 64usize => _,
        o = in(reg) out,
        options(nostack),
    );
}

#[cfg(not(target_arch = "x86_64"))]
pub unsafe fn block(_: &[u16], _: Tiles, _: &[u16], _: usize, _: &mut [f32; BLOCK * BLOCK]) {
    unreachable!("no AMX off x86-64")
}
