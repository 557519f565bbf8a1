//! Router GEMM and full-gate timings of the CPU backend at the DeepSeek-V3 and Kimi-K2 gate shapes,
//! with the machine's bf16 and f32 peak for reference.
//!
//! ```text
//! cargo bench -p sluice-backend-cpu --bench gate -- [--shapes v3,k2] [--tokens 1,8,64,512,2048]
//!     [--x bf16,f32] [--threads N] [--kernel auto|avx512-bf16|avx2-fma|scalar] [--quick]
//! ```
//!
//! Each cell is the median of many calls after a warm-up (at least 20 calls and 0.3 s, 5 calls
//! with `--quick`); the weight stays cache-resident, as in the PyTorch anchors. GFLOP/s counts the
//! GEMM only (`2 T H E`), also for the full gate.

use std::hint::black_box;
use std::time::{Duration, Instant};

use half::bf16;
use sluice_backend_cpu::{CpuBackend, CpuKernel};
use sluice_tensor::dlpack::export_vec;
use sluice_tensor::{Backend, Dlpack, RoutingSpec, ScoringFunc, TopkMethod};

struct Shape {
    name: &'static str,
    hidden: usize,
    spec: RoutingSpec,
}

fn shapes() -> Vec<Shape> {
    let noaux = |e, groups, keep, scale| {
        RoutingSpec::builder(e, 8)
            .scoring(ScoringFunc::Sigmoid)
            .method(TopkMethod::NoauxTc)
            .groups(groups, keep)
            .norm_topk_prob(true)
            .routed_scaling_factor(scale)
            .build()
            .expect("valid spec")
    };
    vec![
        Shape { name: "v3", hidden: 7168, spec: noaux(256, 8, 4, 2.5) },
        Shape { name: "k2", hidden: 7168, spec: noaux(384, 1, 1, 2.827) },
    ]
}

struct Options {
    shapes: Vec<String>,
    tokens: Vec<usize>,
    x_types: Vec<String>,
    threads: Option<usize>,
    kernel: CpuKernel,
    quick: bool,
}

fn options() -> Options {
    let mut o = Options {
        shapes: vec!["v3".into(), "k2".into()],
        tokens: vec![1, 8, 64, 512, 2048],
        x_types: vec!["bf16".into(), "f32".into()],
        threads: None,
        kernel: CpuKernel::Auto,
        quick: false,
    };
    let list = |v: Option<String>| -> Vec<String> {
        v.unwrap_or_default().split(',').map(str::to_owned).collect()
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--shapes" => o.shapes = list(args.next()),
            "--tokens" => {
                o.tokens = list(args.next()).iter().map(|t| t.parse().expect("--tokens")).collect()
            }
            "--x" => o.x_types = list(args.next()),
            "--threads" => o.threads = args.next().and_then(|t| t.parse().ok()),
            "--kernel" => {
                let name = args.next().unwrap_or_default();
                o.kernel = [CpuKernel::Auto]
                    .into_iter()
                    .chain(CpuKernel::CONCRETE)
                    .find(|k| k.name() == name)
                    .expect("--kernel: auto, avx512-bf16, avx2-fma or scalar");
            }
            "--quick" => o.quick = true,
            // `cargo bench` passes `--bench`.
            _ => {}
        }
    }
    o
}

/// Median seconds per call of `f`, after a warm-up.
fn median(quick: bool, mut f: impl FnMut()) -> f64 {
    let warm_up = Instant::now();
    while warm_up.elapsed() < Duration::from_millis(if quick { 20 } else { 200 }) {
        f();
    }
    let (min_calls, min_time) = if quick { (5, 0.0) } else { (20, 0.3) };
    let mut samples = Vec::new();
    let start = Instant::now();
    while samples.len() < min_calls || start.elapsed().as_secs_f64() < min_time {
        let t = Instant::now();
        f();
        samples.push(t.elapsed().as_secs_f64());
    }
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

#[cfg(target_arch = "x86_64")]
mod peak {
    const ACCUMULATORS: usize = 24;

    /// `iterations` rounds of 24 independent `vdpbf16ps` (64 flops each), in assembly so that
    /// nothing but the 24 accumulators' dependency chains limits it.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub fn dpbf16(iterations: usize) {
        // SAFETY: the loop only touches the named vector registers and the counter; the CPU
        // supports the instructions (target features).
        unsafe {
            std::arch::asm!(
                "vpxord zmm31, zmm31, zmm31",
                "2:",
                "vdpbf16ps zmm0, zmm31, zmm31", "vdpbf16ps zmm1, zmm31, zmm31",
                "vdpbf16ps zmm2, zmm31, zmm31", "vdpbf16ps zmm3, zmm31, zmm31",
                "vdpbf16ps zmm4, zmm31, zmm31", "vdpbf16ps zmm5, zmm31, zmm31",
                "vdpbf16ps zmm6, zmm31, zmm31", "vdpbf16ps zmm7, zmm31, zmm31",
                "vdpbf16ps zmm8, zmm31, zmm31", "vdpbf16ps zmm9, zmm31, zmm31",
                "vdpbf16ps zmm10, zmm31, zmm31", "vdpbf16ps zmm11, zmm31, zmm31",
                "vdpbf16ps zmm12, zmm31, zmm31", "vdpbf16ps zmm13, zmm31, zmm31",
                "vdpbf16ps zmm14, zmm31, zmm31", "vdpbf16ps zmm15, zmm31, zmm31",
                "vdpbf16ps zmm16, zmm31, zmm31", "vdpbf16ps zmm17, zmm31, zmm31",
                "vdpbf16ps zmm18, zmm31, zmm31", "vdpbf16ps zmm19, zmm31, zmm31",
                "vdpbf16ps zmm20, zmm31, zmm31", "vdpbf16ps zmm21, zmm31, zmm31",
                "vdpbf16ps zmm22, zmm31, zmm31", "vdpbf16ps zmm23, zmm31, zmm31",
                "dec {n}",
                "jnz 2b",
                n = inout(reg) iterations => _,
                out("zmm0") _, out("zmm1") _, out("zmm2") _, out("zmm3") _, out("zmm4") _,
                out("zmm5") _, out("zmm6") _, out("zmm7") _, out("zmm8") _, out("zmm9") _,
                out("zmm10") _, out("zmm11") _, out("zmm12") _, out("zmm13") _, out("zmm14") _,
                out("zmm15") _, out("zmm16") _, out("zmm17") _, out("zmm18") _, out("zmm19") _,
                out("zmm20") _, out("zmm21") _, out("zmm22") _, out("zmm23") _, out("zmm31") _,
                options(nostack, nomem),
            );
        }
    }

    /// `iterations` rounds of 24 independent 512-bit FMAs (32 flops each), in assembly.
    #[target_feature(enable = "avx512f")]
    pub fn fma(iterations: usize) {
        // SAFETY: as in `dpbf16`.
        unsafe {
            std::arch::asm!(
                "vpxord zmm31, zmm31, zmm31",
                "2:",
                "vfmadd231ps zmm0, zmm31, zmm31", "vfmadd231ps zmm1, zmm31, zmm31",
                "vfmadd231ps zmm2, zmm31, zmm31", "vfmadd231ps zmm3, zmm31, zmm31",
                "vfmadd231ps zmm4, zmm31, zmm31", "vfmadd231ps zmm5, zmm31, zmm31",
                "vfmadd231ps zmm6, zmm31, zmm31", "vfmadd231ps zmm7, zmm31, zmm31",
                "vfmadd231ps zmm8, zmm31, zmm31", "vfmadd231ps zmm9, zmm31, zmm31",
                "vfmadd231ps zmm10, zmm31, zmm31", "vfmadd231ps zmm11, zmm31, zmm31",
                "vfmadd231ps zmm12, zmm31, zmm31", "vfmadd231ps zmm13, zmm31, zmm31",
                "vfmadd231ps zmm14, zmm31, zmm31", "vfmadd231ps zmm15, zmm31, zmm31",
                "vfmadd231ps zmm16, zmm31, zmm31", "vfmadd231ps zmm17, zmm31, zmm31",
                "vfmadd231ps zmm18, zmm31, zmm31", "vfmadd231ps zmm19, zmm31, zmm31",
                "vfmadd231ps zmm20, zmm31, zmm31", "vfmadd231ps zmm21, zmm31, zmm31",
                "vfmadd231ps zmm22, zmm31, zmm31", "vfmadd231ps zmm23, zmm31, zmm31",
                "dec {n}",
                "jnz 2b",
                n = inout(reg) iterations => _,
                out("zmm0") _, out("zmm1") _, out("zmm2") _, out("zmm3") _, out("zmm4") _,
                out("zmm5") _, out("zmm6") _, out("zmm7") _, out("zmm8") _, out("zmm9") _,
                out("zmm10") _, out("zmm11") _, out("zmm12") _, out("zmm13") _, out("zmm14") _,
                out("zmm15") _, out("zmm16") _, out("zmm17") _, out("zmm18") _, out("zmm19") _,
                out("zmm20") _, out("zmm21") _, out("zmm22") _, out("zmm23") _, out("zmm31") _,
                options(nostack, nomem),
            );
        }
    }

    /// GFLOP/s of `kernel` on `threads` threads (best of 5 runs).
    pub fn measure(threads: usize, flops_per_iteration: f64, kernel: fn(usize)) -> f64 {
        let iterations = 5_000_000;
        let mut best = f64::MAX;
        for _ in 0..5 {
            let start = std::time::Instant::now();
            std::thread::scope(|s| {
                for _ in 0..threads {
                    s.spawn(|| kernel(iterations));
                }
            });
            best = best.min(start.elapsed().as_secs_f64());
        }
        flops_per_iteration * (ACCUMULATORS * iterations * threads) as f64 / best / 1e9
    }

    /// `(bf16 peak, f32 FMA peak)` in GFLOP/s, if the CPU has AVX-512 BF16.
    pub fn peaks(threads: usize) -> Option<(f64, f64)> {
        if !(is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16")) {
            return None;
        }
        let bf16 = measure(threads, 64.0, |n| {
            // SAFETY: AVX-512F and AVX-512 BF16 were just detected.
            unsafe { dpbf16(n) }
        });
        let f32 = measure(threads, 32.0, |n| {
            // SAFETY: AVX-512F was just detected.
            unsafe { fma(n) }
        });
        Some((bf16, f32))
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod peak {
    pub fn peaks(_threads: usize) -> Option<(f64, f64)> {
        None
    }
}

fn pseudo_random(n: usize, seed: u32, scale: f32) -> Vec<f32> {
    let mut state = seed.wrapping_mul(2_654_435_761) | 1;
    (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            (state as f32 / u32::MAX as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

fn main() {
    let o = options();
    let mut builder = CpuBackend::builder().kernel(o.kernel);
    if let Some(threads) = o.threads {
        builder = builder.threads(threads);
    }
    let backend = builder.build().expect("backend");
    let threads = backend.threads();
    println!("kernel {}, {threads} threads", backend.kernel());
    let peaks = peak::peaks(threads);
    if let Some((bf16_peak, f32_peak)) = peaks {
        println!(
            "peak ({threads} threads, 24 independent accumulators): vdpbf16ps {bf16_peak:.0} \
             GFLOP/s, 512-bit FMA {f32_peak:.0} GFLOP/s"
        );
    }
    println!();
    println!(
        "| shape | x | T | GEMM ms | GEMM GFLOP/s | % bf16 peak | gate ms | gate GFLOP/s | \
         routing alone ms |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|");
    for shape in shapes().into_iter().filter(|s| o.shapes.iter().any(|n| n == s.name)) {
        let (h, e) = (shape.hidden, shape.spec.num_experts);
        let w: Vec<bf16> = pseudo_random(e * h, 1, 2.0 / (h as f32).sqrt())
            .into_iter()
            .map(bf16::from_f32)
            .collect();
        let bias = pseudo_random(e, 2, 0.05);
        let weight = export_vec(w, &[e, h]).expect("weight");
        let bias_for_routing = export_vec(bias.clone(), &[e]).expect("bias");
        let bias = export_vec(bias, &[e]).expect("bias");
        let router = backend.prepare_router(weight, Some(bias), &shape.spec).expect("prepare");
        for x_type in &o.x_types {
            for &t in &o.tokens {
                let x = pseudo_random(t * h, 3 + t as u32, 1.0);
                let x: Dlpack = match x_type.as_str() {
                    "f32" => export_vec(x, &[t, h]),
                    _ => export_vec(x.into_iter().map(bf16::from_f32).collect(), &[t, h]),
                }
                .expect("hidden");
                let gemm = median(o.quick, || {
                    black_box(router.router_gemm(&x).expect("gemm"));
                });
                let gate = median(o.quick, || {
                    black_box(router.route(&x).expect("route"));
                });
                let logits = router.router_gemm(&x).expect("gemm");
                let routing = median(o.quick, || {
                    black_box(
                        backend
                            .route_logits(&logits, Some(&bias_for_routing), &shape.spec)
                            .expect("route_logits"),
                    );
                });
                let flops = 2.0 * (t * h * e) as f64;
                let peak_share = peaks
                    .map(|(bf16_peak, _)| format!("{:.0}%", 100.0 * flops / gemm / 1e9 / bf16_peak))
                    .unwrap_or_else(|| "-".into());
                println!(
                    "| {} | {x_type} | {t} | {:.4} | {:.1} | {peak_share} | {:.4} | {:.1} | \
                     {:.4} |",
                    shape.name,
                    gemm * 1e3,
                    flops / gemm / 1e9,
                    gate * 1e3,
                    flops / gate / 1e9,
                    routing * 1e3,
                );
            }
        }
    }
}
