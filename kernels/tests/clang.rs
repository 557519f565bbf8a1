//! The device source compiled by clang for NVPTX (sm_90a) and AMDGPU (gfx942), with no CUDA or
//! ROCm installed, for routing configs that exercise every branch of the routing kernel. The
//! compiler is found by the same rule as the AMD build ([`find_clang`]).
//!
//! Where no clang is found the test says so on stderr and passes, unless `SLUICE_REQUIRE_CLANG`
//! is set (CI sets it: a kernel that does not compile must fail CI, not a GPU run).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use sluice_kernels::toolchain::find_clang;
use sluice_kernels::{
    DISPATCH_COUNT_KERNEL, DISPATCH_RANK_TOKENS_KERNEL, DISPATCH_SCATTER_KERNEL,
    DISPATCH_WORDS_KERNEL, DispatchArgs, GemmKernel, HiddenKind, RANK_TOKENS_THREADS,
    ROUTE_DISPATCH_KERNEL, ROUTE_DISPATCH_LOGITS_KERNEL, RoutingConfig, WeightKind,
};
use sluice_tensor::{BiasRole, RoutingSpec, ScoringFunc, ScoringOrder, TopkMethod};

fn source() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("gpu/sluice_router.cu")
}

fn compile(clang: &str, target: &[&str], defines: &[String], out: &Path) -> String {
    let output = Command::new(clang)
        .args(["-std=c++17", "-O3", "-S", "-DSLUICE_NO_VENDOR_HEADERS", "--cuda-device-only"])
        .args(target)
        .args(defines)
        .arg(source())
        .arg("-o")
        .arg(out)
        .output()
        .unwrap_or_else(|e| panic!("could not start {clang}: {e}"));
    assert!(
        output.status.success(),
        "{clang} {target:?} {defines:?} failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    std::fs::read_to_string(out).unwrap()
}

fn configs() -> Vec<RoutingSpec> {
    use TopkMethod::*;
    let spec = |e, method, g, kg, k| {
        let scoring = if method == NoauxTc { ScoringFunc::Sigmoid } else { ScoringFunc::Softmax };
        RoutingSpec::builder(e, k)
            .scoring(scoring)
            .method(method)
            .groups(g, kg)
            .norm_topk_prob(true)
            .routed_scaling_factor(2.5)
            .build()
            .unwrap()
    };
    vec![
        spec(256, NoauxTc, 8, 4, 8),
        spec(160, GroupLimitedGreedy, 8, 3, 6),
        spec(384, NoauxTc, 1, 1, 8),
        spec(1024, NoauxTc, 1, 1, 32),
        spec(96, NoauxTc, 48, 10, 4),
        spec(64, Greedy, 1, 1, 6),
        RoutingSpec { scoring: ScoringFunc::SqrtSoftplus, ..spec(256, NoauxTc, 1, 1, 6) },
        RoutingSpec::builder(128, 4)
            .scoring_order(ScoringOrder::AfterTopk)
            .bias_role(BiasRole::Logits)
            .build()
            .unwrap(),
        RoutingSpec::builder(16, 1)
            .scoring(ScoringFunc::Sigmoid)
            .scoring_order(ScoringOrder::AfterTopk)
            .build()
            .unwrap(),
        // Hash routing: DeepSeek-V4's layer, and softmax scores over every lane slot of 1024.
        RoutingSpec { scoring: ScoringFunc::SqrtSoftplus, ..spec(256, Hash, 1, 1, 6) },
        spec(1024, Hash, 1, 1, 32),
    ]
}

#[test]
fn the_device_source_compiles_for_nvptx_and_amdgpu() {
    let Some(clang) = find_clang() else {
        assert!(
            std::env::var_os("SLUICE_REQUIRE_CLANG").is_none(),
            "SLUICE_REQUIRE_CLANG is set but no clang++ (19 to 22, or $SLUICE_CLANG) was found"
        );
        // Written past the test harness's capture, so the skip is visible in every run.
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED the_device_source_compiles_for_nvptx_and_amdgpu: no clang++ found \
             (install clang-19, or set SLUICE_CLANG)"
        );
        return;
    };
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let nvptx = [
        "-x",
        "cuda",
        // What NVRTC compiles for on Hopper: the architecture-specific target, which alone has the
        // warpgroup kernel's `wgmma`, and the PTX version that has it.
        "--cuda-gpu-arch=sm_90a",
        "-nocudainc",
        "-nocudalib",
        "-Xclang",
        "-target-feature",
        "-Xclang",
        "+ptx80",
    ];
    let amdgpu = ["-x", "hip", "--offload-arch=gfx942", "-nogpuinc", "-nogpulib"];
    for spec in configs() {
        let defines = RoutingConfig::new(&spec).unwrap().compiler_options();
        let ptx = compile(&clang, &nvptx, &defines, &dir.join("router.ptx"));
        let amd = compile(&clang, &amdgpu, &defines, &dir.join("router.s"));
        let mut nvidia_kernels = vec![
            sluice_kernels::ROUTE_KERNEL.to_owned(),
            sluice_kernels::ROUTE_LOGITS_KERNEL.to_owned(),
            "sluice_sum_partials".to_owned(),
            DISPATCH_COUNT_KERNEL.to_owned(),
            DISPATCH_SCATTER_KERNEL.to_owned(),
            DISPATCH_RANK_TOKENS_KERNEL.to_owned(),
        ];
        for tokens_per_block in [1, 2, 4, 8] {
            for experts_per_block in [1, 2] {
                nvidia_kernels
                    .push(GemmKernel::Gemv { tokens_per_block, experts_per_block }.name());
            }
        }
        for hidden in [HiddenKind::Bf16, HiddenKind::F16, HiddenKind::F32] {
            for weight in [WeightKind::Bf16, WeightKind::F32] {
                nvidia_kernels.push(GemmKernel::Simt { hidden, weight }.name());
            }
            for tiles in [1, 2, 4, 8] {
                nvidia_kernels.push(GemmKernel::Mma { hidden, tiles }.name());
            }
        }
        nvidia_kernels.push(GemmKernel::Tiles.name());
        nvidia_kernels.push(GemmKernel::Warpgroup.name());
        for name in &nvidia_kernels {
            assert!(
                ptx.contains(&format!(".entry {name}(")),
                "{spec}: {name} missing from the PTX"
            );
        }
        // Both routing kernels take every argument `route_args` packs, the hash ones included.
        let last = sluice_kernels::MAX_KERNEL_ARGS - 1;
        for route in [sluice_kernels::ROUTE_KERNEL, sluice_kernels::ROUTE_LOGITS_KERNEL] {
            assert!(ptx.contains(&format!("{route}_param_{last}")), "{spec}: {route}");
        }
        assert!(ptx.contains("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32"));
        assert!(ptx.contains("griddepcontrol.wait"));
        assert!(ptx.contains("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes"));
        assert!(ptx.contains("cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier"));
        assert!(ptx.contains("wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16"));
        // The warpgroup kernel takes its two tensor maps by value, as the driver lays them out.
        let map = ".param .align 64 .b8 sluice_gemm_warpgroup_param_1[128]";
        assert!(ptx.contains(map), "{spec}");
        // The dispatch kernels take `DispatchArgs` by value: the device struct has its size, and
        // the warps of one expert are ranked with `match.any`.
        let args = format!(
            ".param .align 8 .b8 {DISPATCH_SCATTER_KERNEL}_param_0[{}]",
            size_of::<DispatchArgs>()
        );
        assert!(ptx.contains(&args), "{spec}: {args} missing from the PTX");
        assert!(ptx.contains("match.any.sync.b32"), "{spec}");
        // The fused routing and layout: in every ranked-score config, taking the layout's
        // argument after the routing kernels' and the ticket last, and the layout by words of rows
        // after it, taking the same two; never on AMD.
        let fused = spec.method != TopkMethod::Hash;
        let words = format!(
            ".param .align 8 .b8 {DISPATCH_WORDS_KERNEL}_param_0[{}]",
            size_of::<DispatchArgs>()
        );
        assert_eq!(ptx.contains(&words), fused, "{spec}: {words}");
        assert_eq!(ptx.contains(&format!("{DISPATCH_WORDS_KERNEL}_param_1")), fused, "{spec}");
        assert!(!amd.contains(DISPATCH_WORDS_KERNEL), "{spec}: the words on AMD");
        for kernel in [ROUTE_DISPATCH_KERNEL, ROUTE_DISPATCH_LOGITS_KERNEL] {
            assert_eq!(ptx.contains(&format!(".entry {kernel}(")), fused, "{spec}: {kernel}");
            let layout = format!(
                ".param .align 8 .b8 {kernel}_param_{}[{}]",
                sluice_kernels::MAX_KERNEL_ARGS,
                size_of::<DispatchArgs>()
            );
            assert_eq!(ptx.contains(&layout), fused, "{spec}: {layout}");
            assert!(!amd.contains(kernel), "{spec}: {kernel} on AMD");
        }
        if fused {
            assert!(ptx.contains("atom.add.acq_rel.gpu.u32"), "{spec}: the ticket");
            assert!(ptx.contains("atom.shared.or.b64"), "{spec}: the rows of each expert");
        }
        // The rank-tokens kernel is launched with the block size its launch bounds name.
        let rank_tokens = ptx.split(&format!(".entry {DISPATCH_RANK_TOKENS_KERNEL}(")).nth(1);
        let bounds = format!(".maxntid {RANK_TOKENS_THREADS}, 1, 1");
        assert!(rank_tokens.is_some_and(|body| body.split('{').next().unwrap().contains(&bounds)));
        for kernel in [DISPATCH_COUNT_KERNEL, DISPATCH_SCATTER_KERNEL, DISPATCH_RANK_TOKENS_KERNEL]
        {
            assert!(amd.contains(&format!(".amdhsa_kernel {kernel}")), "{spec}: {kernel}");
        }
        // AMD has no mma.sync: the scalar GEMM and the routing kernel only, in wave64.
        assert!(amd.contains(".amdhsa_kernel sluice_route"), "{spec}");
        assert!(amd.contains(".amdhsa_kernel sluice_gemm_simt_f32_bf16"), "{spec}");
        assert!(amd.contains(".amdhsa_kernel sluice_gemv_1_1"), "{spec}: portable, wave64 too");
        assert!(!amd.contains("sluice_gemm_mma"), "{spec}");
    }
}
