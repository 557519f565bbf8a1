//! The embedded AMD code objects, checked without an AMD GPU: every config for every required
//! architecture, AMDGPU ELF of the stated architecture, the kernels present (and no NVIDIA-only
//! ones), and from the AMDGPU metadata note: wave64, no scratch, no spills, registers and LDS
//! within budget.
//!
//! The metadata is read with llvm-readelf (19 or newer, found by the rule that finds clang). Where the build embeds nothing or no
//! llvm-readelf is found the tests say so and pass, unless `SLUICE_REQUIRE_CLANG` is set (CI).

use std::collections::HashMap;
use std::io::Write as _; // skips are written past the test harness's capture, to show in every run
use std::process::Command;

use sluice_backend_rocm::{CODE_OBJECTS, COMPILER, CodeObject, architectures, built_with_kernels};
use sluice_kernels::{
    AMD_WAVE_WIDTH, DISPATCH_COUNT_KERNEL, DISPATCH_RANK_TOKENS_KERNEL, DISPATCH_SCATTER_KERNEL,
    DispatchArgs, GemmKernel, HiddenKind, ROUTE_TOKENS_PER_BLOCK, WeightKind, offline_configs,
    toolchain,
};

const REQUIRED_ARCHS: [&str; 2] = ["gfx90a", "gfx942"];
/// VGPRs per lane: at most 128 keeps at least 4 waves per SIMD on CDNA2/CDNA3 (512 per SIMD lane).
const MAX_VGPRS: u64 = 128;
/// SGPRs per wave addressable by a kernel on CDNA.
const MAX_SGPRS: u64 = 102;
/// LDS per workgroup on CDNA.
const MAX_LDS_BYTES: u64 = 64 * 1024;

fn required() -> bool {
    std::env::var_os("SLUICE_REQUIRE_CLANG").is_some()
}

/// False (after saying why) when this build embeds no code objects and that is allowed.
fn have_objects(test: &str) -> bool {
    if built_with_kernels() {
        return true;
    }
    assert!(!required(), "SLUICE_REQUIRE_CLANG is set but the build embeds no AMD code objects");
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED {test}: built without AMD kernels (no clang++ 19 or newer at build time)"
    );
    false
}

/// Every kernel of the portable source: all but the tensor-core GEMM, which needs `mma.sync`.
/// The dispatch layout's kernels are among them, so the budgets below hold for them too.
fn expected_kernels() -> Vec<String> {
    let mut names: Vec<String> = [
        sluice_kernels::ROUTE_KERNEL,
        sluice_kernels::ROUTE_LOGITS_KERNEL,
        sluice_kernels::RESET_STATUS_KERNEL,
        "sluice_sum_partials",
        DISPATCH_COUNT_KERNEL,
        DISPATCH_SCATTER_KERNEL,
        DISPATCH_RANK_TOKENS_KERNEL,
    ]
    .map(str::to_owned)
    .into();
    for tokens_per_block in [1, 2, 4, 8] {
        for experts_per_block in [1, 2] {
            names.push(GemmKernel::Gemv { tokens_per_block, experts_per_block }.name());
        }
    }
    for hidden in [HiddenKind::Bf16, HiddenKind::F16, HiddenKind::F32] {
        for weight in [WeightKind::Bf16, WeightKind::F32] {
            names.push(GemmKernel::Simt { hidden, weight }.name());
        }
    }
    names.sort();
    names
}

#[test]
fn every_offline_config_is_embedded_for_every_required_architecture() {
    if !have_objects("every_offline_config_is_embedded_for_every_required_architecture") {
        return;
    }
    for arch in REQUIRED_ARCHS {
        assert!(architectures().contains(&arch), "{arch} missing from {:?}", architectures());
    }
    // Clang 20 and newer compile for gfx950, so a build with one embeds it (its probe compiles
    // a whole config, not a partial one that fails on every architecture).
    if clang_major(COMPILER).is_some_and(|major| major >= 20) {
        assert!(architectures().contains(&"gfx950"), "{COMPILER}: {:?}", architectures());
    }
    for config in offline_configs() {
        for arch in architectures() {
            let count =
                CODE_OBJECTS.iter().filter(|o| o.config == config.name && o.arch == arch).count();
            assert_eq!(count, 1, "{} for {arch}", config.name);
        }
    }
}

#[test]
fn every_code_object_is_an_amdgpu_elf_of_its_architecture_with_the_router_kernels() {
    if !have_objects(
        "every_code_object_is_an_amdgpu_elf_of_its_architecture_with_the_router_kernels",
    ) {
        return;
    }
    for object in CODE_OBJECTS {
        let info = object
            .inspect()
            .unwrap_or_else(|| panic!("{}.{} is not an AMDGPU ELF", object.config, object.arch));
        assert_eq!(info.arch, Some(object.arch), "{}", object.config);
        // AMD has no mma.sync: the tensor-core GEMM must not be built there.
        assert_eq!(info.kernels, expected_kernels(), "{}.{}", object.config, object.arch);
    }
}

/// The kernel-level fields of the AMDGPU metadata note, one map per kernel, by `.name`.
fn kernel_metadata(readelf: &str, object: &CodeObject) -> HashMap<String, HashMap<String, String>> {
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{}.{}.co", object.config, object.arch));
    std::fs::write(&path, object.elf).unwrap();
    let output = Command::new(readelf).arg("--notes").arg(&path).output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let text = String::from_utf8(output.stdout).unwrap();
    // In the YAML llvm-readelf prints, a kernel starts with "  - ." and its own fields are
    // indented by four; arguments are nested deeper.
    let mut kernels = Vec::new();
    let mut inside = false;
    for line in text.lines() {
        if line.starts_with("amdhsa.kernels:") {
            inside = true;
            continue;
        }
        if inside && !line.starts_with(' ') {
            inside = false;
        }
        if !inside {
            continue;
        }
        let field = if let Some(rest) = line.strip_prefix("  - ") {
            kernels.push(HashMap::new());
            rest
        } else if let Some(rest) = line.strip_prefix("    ").filter(|rest| rest.starts_with('.')) {
            rest
        } else {
            continue;
        };
        if let (Some(kernel), Some((key, value))) = (kernels.last_mut(), field.split_once(':')) {
            kernel.insert(key.trim().to_owned(), value.trim().to_owned());
        }
    }
    kernels.into_iter().map(|kernel| (kernel[".name"].clone(), kernel)).collect()
}

#[test]
fn every_kernel_is_wave64_without_scratch_or_spills_and_within_register_and_lds_budgets() {
    let test =
        "every_kernel_is_wave64_without_scratch_or_spills_and_within_register_and_lds_budgets";
    if !have_objects(test) {
        return;
    }
    let Some(readelf) = toolchain::find_versioned("llvm-readelf") else {
        assert!(
            !required(),
            "SLUICE_REQUIRE_CLANG is set but no llvm-readelf (19 to 22) was found"
        );
        let _ =
            writeln!(std::io::stderr(), "SKIPPED {test}: no llvm-readelf found (install llvm-19)");
        return;
    };
    let number = |kernel: &HashMap<String, String>, key: &str| -> u64 {
        kernel.get(key).unwrap_or_else(|| panic!("no {key}")).parse().unwrap()
    };
    for object in CODE_OBJECTS {
        let kernels = kernel_metadata(&readelf, object);
        let mut names: Vec<_> = kernels.keys().cloned().collect();
        names.sort();
        assert_eq!(names, expected_kernels(), "{}.{}", object.config, object.arch);
        for (name, kernel) in &kernels {
            let at = format!("{name} in {}.{}", object.config, object.arch);
            assert_eq!(number(kernel, ".wavefront_size"), 64, "{at}");
            assert_eq!(number(kernel, ".private_segment_fixed_size"), 0, "scratch in {at}");
            assert_eq!(number(kernel, ".vgpr_spill_count"), 0, "VGPR spills in {at}");
            assert_eq!(number(kernel, ".sgpr_spill_count"), 0, "SGPR spills in {at}");
            assert!(number(kernel, ".vgpr_count") <= MAX_VGPRS, "{at}: {kernel:?}");
            assert!(number(kernel, ".sgpr_count") <= MAX_SGPRS, "{at}: {kernel:?}");
            assert!(
                number(kernel, ".group_segment_fixed_size") <= MAX_LDS_BYTES,
                "{at}: {kernel:?}"
            );
        }
        // The dispatch kernels take `DispatchArgs` by value and nothing the runtime appends: the
        // argument segment is the device struct, of the host struct's size.
        for kernel in [DISPATCH_COUNT_KERNEL, DISPATCH_SCATTER_KERNEL, DISPATCH_RANK_TOKENS_KERNEL]
        {
            let bytes = number(&kernels[kernel], ".kernarg_segment_size");
            assert_eq!(
                bytes,
                size_of::<DispatchArgs>() as u64,
                "{kernel} in {}.{}: {bytes} bytes of arguments",
                object.config,
                object.arch
            );
        }
        // Every routing block keeps its warps' unbiased scores in LDS (f32 `[warps][E]`); the
        // ranked configs their warps' top-k candidate lists too (`[warps][wave]` keys and
        // experts, `[warps][K]` choices); and the configs whose groups are not whole lanes
        // (DeepSeek-V2's groups of 20 experts, 3 a lane) their per-warp group values.
        let route_lds = number(&kernels["sluice_route"], ".group_segment_fixed_size");
        let warps = ROUTE_TOKENS_PER_BLOCK;
        let hashed = define(object.config, "METHOD") == 3;
        let lists =
            if hashed { 0 } else { warps * (AMD_WAVE_WIDTH * 8 + define(object.config, "K") * 4) };
        let expected = (warps * define(object.config, "E") * 4 + lists) as u64;
        let groups_in_lds = object.config == "deepseek_v2";
        assert_eq!(
            route_lds > expected,
            groups_in_lds,
            "{}.{}: sluice_route uses {route_lds} bytes of LDS, its scores and lists {expected}",
            object.config,
            object.arch
        );
        assert!(route_lds >= expected, "{}.{}: {route_lds}", object.config, object.arch);
    }
}

/// The major version in a `clang --version` line ("... clang version 20.1.8 ...").
fn clang_major(version_line: &str) -> Option<u32> {
    let after = version_line.split("clang version ").nth(1)?;
    after.split('.').next()?.parse().ok()
}

#[test]
fn clang_versions_are_read_from_the_version_line() {
    assert_eq!(clang_major("Debian clang version 19.1.7 (3+b1)"), Some(19));
    assert_eq!(clang_major("Ubuntu clang version 20.1.8 (++20250804)"), Some(20));
    assert_eq!(clang_major(""), None);
}

/// The value of `-DSLUICE_{key}` in the offline config `name`.
fn define(name: &str, key: &str) -> usize {
    let config = offline_configs().find(|config| config.name == name).unwrap();
    let prefix = format!("-DSLUICE_{key}=");
    let define = config.defines.split(' ').find_map(|d| d.strip_prefix(prefix.as_str()));
    define.and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("no {key} in {}", config.defines))
}
