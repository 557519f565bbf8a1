//! Compiles the shared kernel source (`kernels/gpu/`) into AMD code objects, one per offline routing
//! config and architecture, and embeds them.
//!
//! Debian's clang (19 or newer, found by `sluice_kernels::toolchain`, the rule the kernel tests use
//! too) builds them with no ROCm installed: `-nogpuinc -nogpulib` and our
//! own compat header. Each object is a raw ELF for one architecture (`--no-gpu-bundle-output`), so
//! no offload bundler is needed and the run time can try them one by one. Code object v5 is
//! pinned: clang-22 defaults to v6, which older ROCm runtimes refuse.
//!
//! Without a compiler the build warns and embeds nothing; the backend then reports "built without
//! AMD kernels". The workspace build never fails for it, unless `SLUICE_REQUIRE_CLANG` is set (CI
//! sets it: a kernel that does not compile must fail CI, not a run on an MI-series GPU).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use sluice_kernels::{offline_configs, toolchain};

/// Architectures every build with a compiler must cover: MI210/MI250 and MI300.
const REQUIRED_ARCHS: [&str; 2] = ["gfx90a", "gfx942"];
/// Built where the compiler accepts it (clang 20 and newer): MI350/MI355.
const OPTIONAL_ARCHS: [&str; 1] = ["gfx950"];

fn main() {
    let kernels = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../kernels/gpu");
    println!("cargo:rerun-if-changed={}", kernels.display());
    for var in [toolchain::CLANG_ENV, "SLUICE_REQUIRE_CLANG", "PATH"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let required = std::env::var_os("SLUICE_REQUIRE_CLANG").is_some();

    let built = match toolchain::find_clang() {
        Some(clang) => build_all(&clang, &kernels, &out),
        None => {
            Err("no clang++ 19 or newer found (install clang-19 and lld-19, or set SLUICE_CLANG)"
                .to_owned())
        }
    };
    let (compiler, objects) = match built {
        Ok(built) => built,
        Err(why) if required => panic!("SLUICE_REQUIRE_CLANG is set: {why}"),
        Err(why) => {
            println!("cargo:warning=sluice-backend-rocm is built without AMD kernels: {why}");
            (String::new(), Vec::new())
        }
    };
    std::fs::write(out.join("code_objects.rs"), table(&compiler, &objects))
        .expect("OUT_DIR is writable");
}

/// One compiled object: (config name, architecture, path).
type Object = (String, &'static str, PathBuf);

fn build_all(clang: &str, kernels: &Path, out: &Path) -> Result<(String, Vec<Object>), String> {
    let compiler =
        toolchain::version_line(clang).ok_or_else(|| format!("{clang} --version failed"))?;
    // The probe compiles the first offline config: a full set of defines the kernels accept.
    let probe = offline_configs().next().ok_or("the offline config list is empty")?.defines;
    let optional: Vec<_> = OPTIONAL_ARCHS
        .into_iter()
        .filter(|arch| compile(clang, kernels, arch, probe, &out.join("probe.co")).is_ok())
        .collect();
    let mut objects = Vec::new();
    for config in offline_configs() {
        for arch in REQUIRED_ARCHS.into_iter().chain(optional.iter().copied()) {
            let path = out.join(format!("{}.{arch}.co", config.name));
            compile(clang, kernels, arch, config.defines, &path)?;
            objects.push((config.name.to_owned(), arch, path));
        }
    }
    Ok((compiler, objects))
}

fn compile(
    clang: &str,
    kernels: &Path,
    arch: &str,
    defines: &str,
    out: &Path,
) -> Result<(), String> {
    let defines: Vec<&str> = defines.split(' ').collect();
    let output = Command::new(clang)
        .args(["-x", "hip", "-std=c++17", "-O3", "-DSLUICE_NO_VENDOR_HEADERS"])
        .args(["-nogpuinc", "-nogpulib", "--cuda-device-only", "--no-gpu-bundle-output"])
        .args(["-mcode-object-version=5", &format!("--offload-arch={arch}")])
        .args(&defines)
        .arg("-c")
        .arg(kernels.join("sluice_router.cu"))
        .arg("-o")
        .arg(out)
        .output()
        .map_err(|e| format!("could not start {clang}: {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{clang} --offload-arch={arch} {} failed:\n{}",
            defines.join(" "),
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

/// The Rust table `src/code_objects.rs` includes.
fn table(compiler: &str, objects: &[Object]) -> String {
    let mut text = format!(
        "/// The compiler that built the code objects (empty: none).\npub const COMPILER: &str = {compiler:?};\n"
    );
    text.push_str("/// Every embedded code object.\npub const CODE_OBJECTS: &[CodeObject] = &[\n");
    for (config, arch, path) in objects {
        writeln!(
            text,
            "    CodeObject {{ config: {config:?}, arch: {arch:?}, elf: include_bytes!({:?}) }},",
            path.display().to_string()
        )
        .expect("writing to a String");
    }
    text.push_str("];\n");
    text
}
